"""One detection policy for every caller (shared/detectors): long side 640, and when no face is found
there, a retry at 320 then 200 (``shared.detectors.fallback``), which ``create`` adds to every backend.
Its cost on empty frames is bounded by ``fallback_every`` (the live worker's default: 1 in 8), and every
decision is counted.

The close-up photos are real eval photos (all <= 512 px, so 640 is their full size) whose large face
YuNet misses at 640 and finds smaller (found by ``tools/detection_policy.py``, which looks at no label).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import torch

from services.inference.pipeline import DETECTOR_FALLBACK, Pipeline
from services.inference.settings import InferenceSettings
from shared.detectors import DetectorConfig, create
from shared.detectors.fallback import FallbackDetector, TensorFallbackDetector, fallback_stats
from tests.helpers.paths import EVAL_DIR as EVAL
from tests.helpers.paths import WEIGHTS_DIR as WEIGHTS
from tests.helpers.paths import skip_without
from tests.helpers.photos import iou

#: missed at 640; found at this side (the same for both backends)
CLOSE_UPS = {"female/pixabay/face-5097981_1280.jpg": 320, "male/pixabay/man-6701984_1280.jpg": 200}
#: missed at every side
NEVER = "female/pixabay/girl-1210198_1280.jpg"

pytestmark = skip_without(WEIGHTS, EVAL / NEVER)


def _read(rel: str) -> npt.NDArray[np.uint8]:
    image = cv2.imread(str(EVAL / rel))
    assert image is not None, rel
    return np.asarray(image, np.uint8)


def _empty_frames(n: int) -> list[npt.NDArray[np.uint8]]:
    """640x480 frames of real photos blurred beyond recognition: no face at any side (checked)."""
    raw = create("cv2-yunet", DetectorConfig(weights_dir=WEIGHTS, fallback_sides=()))
    frames = []
    for path in sorted((EVAL / "male" / "pixabay").glob("*.jpg"))[: 4 * n]:
        frame = cv2.GaussianBlur(cv2.resize(cv2.imread(str(path)), (640, 480)), (0, 0), 40)
        if all(len(raw.detect([frame], side)[0]) == 0 for side in (640, 320, 200)):  # type: ignore[call-arg]
            frames.append(np.asarray(frame, np.uint8))
        if len(frames) == n:
            return frames
    raise AssertionError("not enough empty frames")


def _count_calls(det: FallbackDetector) -> list[int | None]:
    """Record the side of every call the wrapper makes to its backend (None = the config's)."""
    calls: list[int | None] = []
    inner_detect: Callable[..., Any] = det.inner.detect

    def spy(images: Any, max_side: int | None = None) -> Any:
        calls.extend([max_side] * len(images))
        return inner_detect(images, max_side)

    det.inner.detect = spy  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("backend", ["cv2-yunet", "torch-yunet"])
def test_fallback_finds_close_up_faces_that_640_misses(backend: str) -> None:
    raw = create(backend, DetectorConfig(weights_dir=WEIGHTS, fallback_sides=()))
    det = create(backend, DetectorConfig(weights_dir=WEIGHTS))  # the policy, as every caller gets it
    assert isinstance(det, FallbackDetector) and det.sides == (320, 200)
    photos = [_read(rel) for rel in CLOSE_UPS] + [_read(NEVER)]
    assert [len(d) for d in raw.detect(photos)] == [0, 0, 0]  # the problem
    # One photo per call: torch-yunet letterboxes a mixed-size batch onto one canvas, which can change
    # borderline detections (the worker groups frames by size for that reason).
    found = [det.detect([photo])[0] for photo in photos]
    assert [len(d) > 0 for d in found] == [True, True, False]
    for det_i, photo in zip(found[:2], photos, strict=False):
        x, y, w, h = det_i.boxes[0].tolist()
        assert w > 0.3 * photo.shape[1] and 0 <= x + w / 2 <= photo.shape[1]  # a close-up, in photo pixels
        assert 0 <= y + h / 2 <= photo.shape[0]
    stats = fallback_stats(det)
    assert stats is not None
    assert (stats.frames, stats.empty, stats.retried, stats.recovered) == (3, 3, 3, 2)
    assert stats.by_side == {320: 1, 200: 1}


def test_fallback_on_the_device_route_keeps_frames_on_the_device() -> None:
    det = create("torch-yunet", DetectorConfig(weights_dir=WEIGHTS))
    assert isinstance(det, TensorFallbackDetector)
    photo = _read(next(iter(CLOSE_UPS)))
    frames = torch.from_numpy(photo).permute(2, 0, 1)[None].contiguous()
    (found,) = det.detect_tensor(frames)
    (host,) = det.detect([photo])
    assert len(found) == len(host) == 1
    # The same face (the device resizes with antialiased bilinear, the host with INTER_AREA).
    assert iou(found.boxes[0].tolist(), host.boxes[0].tolist()) > 0.9
    assert det.stats.recovered == 2


def test_budget_bounds_the_cost_on_empty_frames_and_follows_a_close_up() -> None:
    det = create("cv2-yunet", DetectorConfig(weights_dir=WEIGHTS, fallback_every=4))
    assert isinstance(det, FallbackDetector)
    calls = _count_calls(det)
    empty = _empty_frames(8)
    for frame in empty + empty:  # an empty room: 16 frames
        assert len(det.detect([frame])[0]) == 0
    # One frame in four gets the retry (at 320 and 200): 16 + 4 * 2 backend passes, not 16 * 3.
    assert len(calls) == 16 + 4 * 2 and calls.count(None) == 16
    assert (det.stats.retried, det.stats.skipped) == (4, 12)

    close_up = _read(next(iter(CLOSE_UPS)))
    shown = [len(det.detect([close_up])[0]) > 0 for _ in range(8)]
    # Missed until the budget admits a retry (the 4th empty frame), then found in every frame.
    assert shown == [False, False, False, True, True, True, True, True]
    # When the person leaves, empty frames are still retried, until 4 retries in a row find nothing.
    before = det.stats.retried
    for frame in empty:
        det.detect([frame])
    assert det.stats.retried - before == 4 + 1  # 4 while "hot", then 1 in 4 again
    assert det.stats.recovered == 5


def test_frames_too_small_for_any_fallback_side_are_not_retried() -> None:
    det = create("cv2-yunet", DetectorConfig(weights_dir=WEIGHTS))
    assert isinstance(det, FallbackDetector)
    calls = _count_calls(det)
    chip = cv2.resize(_empty_frames(1)[0], (200, 200))  # a 200 px chip (UTKFace size): nothing smaller
    small = cv2.resize(chip, (300, 300))  # 300 px: only 200 is below it
    det.detect([chip, small])
    assert calls == [None, None, 200]
    assert (det.stats.too_small, det.stats.retried) == (1, 1)


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="decreasing"):
        create("cv2-yunet", DetectorConfig(weights_dir=WEIGHTS, fallback_sides=(200, 320)))
    with pytest.raises(ValueError, match="fallback_every"):
        create("cv2-yunet", DetectorConfig(weights_dir=WEIGHTS, fallback_every=0))
    raw = create("cv2-yunet", DetectorConfig(weights_dir=WEIGHTS, fallback_sides=()))
    assert not isinstance(raw, FallbackDetector) and fallback_stats(raw) is None
    auto = create("auto", DetectorConfig(weights_dir=WEIGHTS))
    assert isinstance(auto, FallbackDetector) and not isinstance(auto.inner, FallbackDetector)


def test_worker_settings_and_pipeline_count_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = InferenceSettings()
    assert (settings.detector_max_side, settings.fallback_sides, settings.detector_fallback_every) == (
        640,
        (320, 200),
        8,
    )
    monkeypatch.setenv("GENDERLENS_DETECTOR_FALLBACK_SIDES", "")
    assert InferenceSettings().fallback_sides == ()
    monkeypatch.setenv("GENDERLENS_DETECTOR_FALLBACK_SIDES", "320;200")
    with pytest.raises(SystemExit, match="detector_fallback_sides"):
        InferenceSettings.load("infer")
    monkeypatch.delenv("GENDERLENS_DETECTOR_FALLBACK_SIDES")

    from services.inference.main import build_worker
    from tests.helpers.redis_servers import TEST_REDIS_URL

    worker_settings = InferenceSettings(
        redis_url=TEST_REDIS_URL, weights_dir=WEIGHTS, detector="cv2-yunet", models_dir=Path("models")
    )
    worker, _ = build_worker(worker_settings, threading.Event())
    try:
        det = worker.pipeline.detector
        assert isinstance(det, FallbackDetector) and (det.sides, det.every) == ((320, 200), 8)
    finally:
        worker.client.close()

    pipeline = Pipeline(create("cv2-yunet", DetectorConfig(weights_dir=WEIGHTS)), "cpu")
    recovered = DETECTOR_FALLBACK.labels("recovered")._value.get()
    outputs = pipeline.run([_read(next(iter(CLOSE_UPS))), _empty_frames(1)[0]], None, None)
    assert [len(o.faces) for o in outputs] == [1, 0]
    assert (pipeline.stats.fallback_retried, pipeline.stats.fallback_recovered) == (2, 1)
    assert DETECTOR_FALLBACK.labels("recovered")._value.get() == recovered + 1
