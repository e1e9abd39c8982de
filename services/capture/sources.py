"""Frame sources behind one small protocol and a registry keyed by kind.

A source spec is parsed once (``shared.sources.parse_source``: the contract shared with ``up`` and
the viewer) into a ``SourceSpec``; ``open_source`` builds the registered backend for its kind.
Kinds: ``webcam`` (``0`` / ``webcam:0``), ``file`` (a video file), ``stream`` (``rtsp://``,
``http(s)://``) and ``folder`` (a folder of images, a slideshow).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import numpy.typing as npt

from shared.sources import IMAGE_SUFFIXES, SourceError, SourceSpec

log = logging.getLogger(__name__)

Image = npt.NDArray[np.uint8]


class FrameSource(Protocol):
    #: frames per second the source produces natively (0 when unknown)
    native_fps: float

    def read(self) -> Image | None:
        """The next frame (BGR), or None when the source has ended or was lost."""
        ...

    def close(self) -> None: ...


SourceFactory = Callable[[SourceSpec, "SourceOptions"], FrameSource]
_REGISTRY: dict[str, SourceFactory] = {}


@dataclass(frozen=True)
class SourceOptions:
    fps: float
    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    slide_seconds: float = 1.0


def register_source(kind: str) -> Callable[[SourceFactory], SourceFactory]:
    def deco(factory: SourceFactory) -> SourceFactory:
        _REGISTRY[kind] = factory
        return factory

    return deco


def open_source(spec: SourceSpec, options: SourceOptions) -> FrameSource:
    if spec.kind not in _REGISTRY:
        raise SourceError(f"unknown source kind {spec.kind!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[spec.kind](spec, options)


class _VideoCaptureSource:
    """cv2.VideoCapture for webcams, streams and files, with open/read timeouts where the backend
    supports them (FFmpeg does for network streams)."""

    def __init__(self, spec: SourceSpec, options: SourceOptions) -> None:
        self.spec = spec
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(options.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(options.read_timeout_s * 1000),
        ]
        if spec.kind == "webcam":
            cap = cv2.VideoCapture(int(spec.target), cv2.CAP_ANY, params)
        else:
            cap = cv2.VideoCapture(spec.target, cv2.CAP_ANY, params)
        if not cap.isOpened():
            cap.release()
            hint = (
                "no camera could be opened; pass --source with a video file, a folder of images or an "
                "rtsp:// URL"
                if spec.kind == "webcam"
                else "check that it exists and is a readable video"
            )
            raise SourceError(f"cannot open source {spec.redacted()!r}: {hint}")
        self._cap = cap
        self.native_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not (0 < self.native_fps < 1000):
            self.native_fps = 0.0
        self._fps = options.fps
        self._started = time.monotonic()
        self._index = -1

    def read(self) -> Image | None:
        if self.spec.kind == "file" and self.native_fps > 0:
            # Play a file in real time: skip the frames that fall between two published ticks.
            wanted = int((time.monotonic() - self._started) * self.native_fps)
            while self._index < wanted - 1:
                if not self._cap.grab():
                    return None
                self._index += 1
        ok, frame = self._cap.read()
        self._index += 1
        if not ok or frame is None:
            return None
        return np.asarray(frame, dtype=np.uint8)

    def close(self) -> None:
        self._cap.release()


@register_source("webcam")
@register_source("stream")
@register_source("file")
def _video_capture(spec: SourceSpec, options: SourceOptions) -> FrameSource:
    return _VideoCaptureSource(spec, options)


class FolderSource:
    """A folder of images played as a slideshow: each image is shown for ``slide_seconds``.
    Unreadable files are skipped with a warning, never fatal."""

    def __init__(self, spec: SourceSpec, options: SourceOptions) -> None:
        root = Path(spec.target)
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise SourceError(f"folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.native_fps = 0.0
        self._slide = options.slide_seconds
        self._started = time.monotonic()
        self._current: tuple[int, Image] | None = None

    def read(self) -> Image | None:
        index = int((time.monotonic() - self._started) / self._slide)
        if index >= len(self.files):
            return None
        if self._current is None or self._current[0] != index:
            image = cv2.imread(str(self.files[index]), cv2.IMREAD_COLOR)
            if image is None:
                log.warning("skipping unreadable image %s", self.files[index])
                self._started -= self._slide  # move on to the next image at once
                return self.read()
            self._current = (index, np.asarray(image, dtype=np.uint8))
        return self._current[1]

    def close(self) -> None:
        self._current = None


@register_source("folder")
def _folder(spec: SourceSpec, options: SourceOptions) -> FrameSource:
    return FolderSource(spec, options)
