"""Face detectors behind one small protocol and a registry keyed by name.

A backend module registers itself with ``@register("name")``; ``create(name, config)`` builds one and an
unknown name is a clear error at start-up. Backends whose dependencies are heavy (torch) are imported
lazily by name so a service that never asks for them never imports them. ``"auto"`` is one of them: it
picks cv2-yunet or torch-yunet for the device and threads (:mod:`shared.detectors.auto`).

Detection policy (one for every caller: worker, eval, the trainer's crop cache): frames are downscaled to
``max_side`` (640) on the long side; when no face is found there, ``create`` wraps the backend so that the
frame is tried again at the smaller ``fallback_sides`` (320, then 200), where large close-up faces that
score low at 640 are found. ``fallback_every`` bounds what that costs a live camera whose frames are mostly
empty (see :mod:`shared.detectors.fallback`; measurements in docs/detection.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

#: Smaller long sides tried when nothing is found at ``max_side`` (docs/detection.md: measured on the
#: face-found rate and speed, never on labels).
DEFAULT_FALLBACK_SIDES: tuple[int, ...] = (320, 200)


@dataclass(frozen=True)
class DetectorConfig:
    #: YuNet's score threshold (docs/detection.md, "The score threshold": no labels looked at): with the
    #: policy below, 0.6 finds a face in 99.8% of the eval photos, OpenCV's default 0.9 in 94.0%.
    score_threshold: float = 0.6
    nms_threshold: float = 0.3
    top_k: int = 100
    #: Frames are downscaled so their long side is at most this before detection (large faces score
    #: low at full size; 640 is YuNet's training scale). Boxes are mapped back to frame pixels.
    max_side: int = 640
    #: When nothing is found at ``max_side``, try again at these smaller long sides, in order, until a
    #: face is found (a side not below the long side already tried is skipped, so sides >= max_side
    #: never run). () = no fallback.
    fallback_sides: tuple[int, ...] = DEFAULT_FALLBACK_SIDES
    #: Run the fallback on at most one in this many frames that have no face at ``max_side``, except right
    #: after it found a face (then on every empty frame until it fails this many times in a row).
    #: 1 = every empty frame (still photos); the live worker sets more (an empty room is the common case).
    fallback_every: int = 1
    weights_dir: Path | None = None
    weights_cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "genderlens" / "weights")
    device: str = "cpu"
    #: Which checkpoint a PyTorch backend loads (``yunet_s`` matches the cv2 ONNX).
    variant: str = "yunet_s"


@dataclass(frozen=True)
class Detections:
    """Faces found in one image, in that image's pixel coordinates.

    boxes: float32 [N, 4] as (x, y, w, h); landmarks: float32 [N, 5, 2]; scores: float32 [N].
    """

    boxes: npt.NDArray[np.float32]
    landmarks: npt.NDArray[np.float32]
    scores: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty() -> Detections:
        return Detections(
            np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros((0,), np.float32)
        )


@runtime_checkable
class FaceDetector(Protocol):
    name: str

    def detect(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[Detections]:
        """Detect faces in a batch of BGR uint8 images (HxWx3, sizes may differ)."""
        ...


_REGISTRY: dict[str, Callable[[DetectorConfig], FaceDetector]] = {}
#: name -> module that registers it, imported on first use.
_LAZY: dict[str, str] = {
    "cv2-yunet": "shared.detectors.cv2_yunet",
    "torch-yunet": "shared.detectors.torch_yunet",
    "auto": "shared.detectors.auto",
}


def register(
    name: str,
) -> Callable[[Callable[[DetectorConfig], FaceDetector]], Callable[[DetectorConfig], FaceDetector]]:
    def deco(factory: Callable[[DetectorConfig], FaceDetector]) -> Callable[[DetectorConfig], FaceDetector]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def create(name: str, config: DetectorConfig) -> FaceDetector:
    """Build the backend ``name``, wrapped with the no-face fallback when ``config.fallback_sides``."""
    if name not in _REGISTRY and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(available())}")
    _check_policy(config)
    detector = _REGISTRY[name](config)
    from shared.detectors.fallback import FallbackDetector, with_fallback

    if config.fallback_sides and not isinstance(detector, FallbackDetector):
        return with_fallback(detector)
    return detector


def _check_policy(config: DetectorConfig) -> None:
    sides = config.fallback_sides
    if config.max_side < 32:
        raise ValueError(f"detector max_side {config.max_side} is too small (at least 32)")
    if any(s < 32 for s in sides) or list(sides) != sorted(set(sides), reverse=True):
        raise ValueError(f"detector fallback sides {sides} must be distinct, >= 32 and decreasing")
    if config.fallback_every < 1:
        raise ValueError(f"detector fallback_every must be >= 1, not {config.fallback_every}")


def resize_for_detection(image: npt.NDArray[np.uint8], max_side: int) -> tuple[npt.NDArray[np.uint8], float]:
    """Downscale so the long side is <= max_side; returns the image and the scale applied."""
    import cv2

    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale >= 1.0:
        return image, 1.0
    resized = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    return np.asarray(resized, dtype=np.uint8), scale
