"""The no-face fallback, in one place: a wrapper that ``shared.detectors.create`` puts around every backend.

Why: YuNet downscaled to 640 on the long side misses some large, close-up faces (they score below the
threshold at that scale) that it finds when the same frame is downscaled further. So when a frame has no
face at ``max_side``, it is tried again at each of ``fallback_sides`` (320, then 200) until one finds a
face. A side that is not below the long side already tried is skipped (it would see the same pixels), so
small frames and 200 px chips are never retried.

What it costs, and how that is bounded: a retry at 320 and 200 costs about 40% of a 640 pass (measured
in docs/detection.md), paid only by frames with no face. Still photos (eval, the trainer's crop cache)
pay it on every such frame (``fallback_every = 1``). A live camera pointed at an empty room would pay it
on nearly every frame, so the worker sets ``fallback_every = N``: the fallback runs on one empty frame in
N, and on every empty frame right after it found a face (a person close to the camera is then found in
every frame), until it has failed N times in a row. An empty room then costs at most 1/N of the retry.

Every decision is counted (:class:`FallbackStats`): frames, frames empty at ``max_side``, retried,
skipped by the budget, too small to retry, recovered, and which side recovered them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from shared.detectors import Detections, DetectorConfig, FaceDetector


@dataclass
class FallbackStats:
    """Counters since start (the worker's metrics, eval's report and the bench read them)."""

    frames: int = 0  #: frames detected
    empty: int = 0  #: frames with no face at max_side
    retried: int = 0  #: empty frames the fallback ran on
    skipped: int = 0  #: empty frames the budget (fallback_every) left alone
    too_small: int = 0  #: empty frames not larger than any fallback side (nothing to retry)
    recovered: int = 0  #: retried frames in which a fallback side found a face
    by_side: dict[int, int] = field(default_factory=dict)  #: side -> frames it recovered

    def snapshot(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "empty_at_max_side": self.empty,
            "retried": self.retried,
            "skipped_by_budget": self.skipped,
            "too_small": self.too_small,
            "recovered": self.recovered,
            "recovered_by_side": {str(k): v for k, v in sorted(self.by_side.items(), reverse=True)},
        }


class _Scalable(Protocol):
    name: str
    config: DetectorConfig

    def detect(
        self, images: Sequence[npt.NDArray[np.uint8]], max_side: int | None = None
    ) -> list[Detections]: ...


class FallbackDetector:
    """A backend plus the no-face fallback (numpy API: the :class:`FaceDetector` protocol)."""

    def __init__(self, inner: _Scalable) -> None:
        self.inner = inner
        self.name = inner.name
        self.config = inner.config
        self.sides = tuple(inner.config.fallback_sides)
        self.every = inner.config.fallback_every
        self.stats = FallbackStats()
        self._lock = threading.Lock()
        self._since = 0  #: empty frames since the budget last admitted one
        self._hot = 0  #: empty frames still admitted unconditionally after a recovery

    # -- policy ------------------------------------------------------------------------------------
    def _plan(self, long_sides: Sequence[int], empty: Sequence[int]) -> list[int]:
        """Which of the empty frames (indices) get a retry; counts the others."""
        admitted = []
        with self._lock:
            self.stats.frames += len(long_sides)
            self.stats.empty += len(empty)
            for i in empty:
                tried = min(long_sides[i], self.config.max_side)
                if not any(side < tried for side in self.sides):
                    self.stats.too_small += 1
                elif self._admit():
                    admitted.append(i)
                else:
                    self.stats.skipped += 1
            self.stats.retried += len(admitted)
        return admitted

    def _admit(self) -> bool:
        if self.every <= 1 or self._hot > 0:
            return True
        self._since += 1
        if self._since >= self.every:
            self._since = 0
            return True
        return False

    def _settle(self, recovered_sides: Sequence[int | None]) -> None:
        """Record the outcome of each retried frame (the side that found a face, or None)."""
        with self._lock:
            for side in recovered_sides:
                if side is not None:
                    self.stats.recovered += 1
                    self.stats.by_side[side] = self.stats.by_side.get(side, 0) + 1
                    self._hot = self.every
                elif self._hot > 0:
                    self._hot -= 1

    def _cascade(
        self,
        todo: list[int],
        long_sides: Sequence[int],
        found: list[Any],
        run: Callable[[list[int], int], Sequence[Any]],
    ) -> None:
        """Retry the frames ``todo`` at each fallback side in turn; ``run(indices, side)`` detects."""
        tried = {i: min(long_sides[i], self.config.max_side) for i in todo}
        recovered: dict[int, int] = {}
        for side in self.sides:
            batch = [i for i in todo if i not in recovered and side < tried[i]]
            if not batch:
                continue
            for i, det in zip(batch, run(batch, side), strict=True):
                tried[i] = side
                if len(det):
                    found[i] = det
                    recovered[i] = side
        self._settle([recovered.get(i) for i in todo])

    # -- FaceDetector ------------------------------------------------------------------------------
    def detect(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[Detections]:
        found = self.inner.detect(images)
        long_sides = [int(max(im.shape[0], im.shape[1])) for im in images]
        todo = self._plan(long_sides, [i for i, d in enumerate(found) if len(d) == 0])
        if todo:
            self._cascade(
                todo, long_sides, found, lambda idx, side: self.inner.detect([images[i] for i in idx], side)
            )
        return found


class _TensorBackend(_Scalable, Protocol):
    def detect_tensor(
        self,
        frames: Any,
        sizes: Sequence[tuple[int, int]] | None = None,
        channel_order: Literal["bgr", "rgb"] = "bgr",
        max_side: int | None = None,
    ) -> Sequence[Any]: ...


class TensorFallbackDetector(FallbackDetector):
    """The same for a backend with the tensor API (torch-yunet): frames stay on the device."""

    inner: _TensorBackend

    def __init__(self, inner: _TensorBackend) -> None:
        super().__init__(inner)
        self.inner = inner

    def detect_tensor(
        self,
        frames: Any,
        sizes: Sequence[tuple[int, int]] | None = None,
        channel_order: Literal["bgr", "rgb"] = "bgr",
    ) -> list[Any]:
        import torch

        found = list(self.inner.detect_tensor(frames, sizes, channel_order))
        hw = list(sizes) if sizes is not None else [(int(frames.shape[2]), int(frames.shape[3]))] * len(found)
        long_sides = [max(h, w) for h, w in hw]
        todo = self._plan(long_sides, [i for i, d in enumerate(found) if len(d) == 0])
        if todo:

            def run(idx: list[int], side: int) -> Sequence[Any]:
                sub = frames.index_select(0, torch.tensor(idx, device=frames.device))
                return self.inner.detect_tensor(sub, [hw[i] for i in idx], channel_order, side)

            self._cascade(todo, long_sides, found, run)
        return found


def with_fallback(detector: FaceDetector) -> FallbackDetector:
    """Wrap a backend built by ``create`` (it must accept ``max_side`` in ``detect``)."""
    if not isinstance(getattr(detector, "config", None), DetectorConfig):
        raise TypeError(f"detector {detector.name} has no DetectorConfig: cannot add the fallback")
    if callable(getattr(detector, "detect_tensor", None)):
        return TensorFallbackDetector(detector)  # type: ignore[arg-type]
    return FallbackDetector(detector)  # type: ignore[arg-type]


def fallback_stats(detector: object) -> FallbackStats | None:
    """The fallback counters of a detector made by ``create`` (None when it has no fallback)."""
    return detector.stats if isinstance(detector, FallbackDetector) else None
