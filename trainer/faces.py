"""Detector set-up and the "which face is the photo's subject" rule, shared by the crop cache and eval."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.detectors import Detections, DetectorConfig, FaceDetector, create


def default_weights_dir() -> Path | None:
    """``../shared/weights/yunet`` beside the checkout when it exists (developer machines, CI)."""
    candidate = Path(__file__).resolve().parents[2] / "shared" / "weights" / "yunet"
    return candidate if candidate.is_dir() else None


def make_detector(
    name: str = "cv2-yunet",
    weights_dir: Path | None = None,
    score_threshold: float | None = None,
    max_side: int | None = None,
    fallback_sides: tuple[int, ...] | None = None,
) -> FaceDetector:
    """The serving detection policy (``shared.detectors.DetectorConfig``: long side 640, no-face fallback
    at 320 then 200, on every photo that needs it) unless told otherwise."""
    defaults = DetectorConfig()
    config = DetectorConfig(
        score_threshold=defaults.score_threshold if score_threshold is None else score_threshold,
        max_side=defaults.max_side if max_side is None else max_side,
        fallback_sides=defaults.fallback_sides if fallback_sides is None else fallback_sides,
        fallback_every=1,  # still photos: retry every one that needs it
        weights_dir=weights_dir if weights_dir is not None else default_weights_dir(),
    )
    return create(name, config)


def central_face(dets: Detections, width: int, height: int) -> int | None:
    """Index of the face whose box centre is nearest the image centre (ties: the larger box)."""
    if len(dets) == 0:
        return None
    boxes = dets.boxes.astype(np.float64)
    cx = boxes[:, 0] + boxes[:, 2] / 2
    cy = boxes[:, 1] + boxes[:, 3] / 2
    dist = np.round(np.hypot(cx - width / 2, cy - height / 2), 3)
    area = boxes[:, 2] * boxes[:, 3]
    order = np.lexsort((-area, dist))  # primary: distance, then larger area first
    return int(order[0])
