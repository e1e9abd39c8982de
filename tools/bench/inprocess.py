"""The in-process modes, no Redis: the tutorial's naive loop and the worker's batched ``Pipeline`` on
the same frames, and how far their outputs are apart (they must be identical: see the package doc)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import torch

from services.inference.pipeline import FrameError, FrameOutput, Pipeline
from shared.detectors import DetectorConfig, create, resize_for_detection
from shared.detectors.cv2_yunet import ONNX_NAME
from shared.models.artifact import Classifier, label_for
from shared.preprocess import crop_faces_bgr
from tools.bench.measure import Usage, figures

Outputs = list[list["FaceOut"]]


@dataclass
class FaceOut:
    box: tuple[float, ...]
    label: str
    probs: tuple[float, ...]


class _NaiveLoop:
    """The tutorial loop's work on one frame, timed per stage: decode, detect (cv2's own YuNet call),
    then one face at a time: crop, to tensor, classify with a batch of one."""

    def __init__(self, classifier: Classifier, weights_dir: Path, score_threshold: float, bbox_crop: bool):
        cfg = DetectorConfig(score_threshold=score_threshold)
        self.net = cv2.FaceDetectorYN.create(
            str(weights_dir / ONNX_NAME), "", (320, 320), cfg.score_threshold, cfg.nms_threshold, cfg.top_k
        )
        self.max_side = cfg.max_side
        self.fallback_sides = cfg.fallback_sides
        self.classifier = classifier
        self.bbox_crop = bbox_crop
        self.stages = dict.fromkeys(("decode", "detect", "crop", "classify"), 0.0)
        self.latencies: list[float] = []
        self._input_size: tuple[int, int] | None = None

    def reset(self) -> None:
        self.stages = dict.fromkeys(self.stages, 0.0)
        self.latencies.clear()

    def frame(self, jpeg: bytes) -> list[FaceOut]:
        t0 = time.perf_counter()
        image = np.asarray(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), np.uint8)
        t1 = time.perf_counter()
        self.stages["decode"] += t1 - t0
        boxes, landmarks = self._detect(image)
        self.stages["detect"] += time.perf_counter() - t1
        # One face at a time: what this loop is here to measure.
        faces = [self._face(image, box, lms) for box, lms in zip(boxes, landmarks, strict=True)]
        self.latencies.append(1000 * (time.perf_counter() - t0))
        return faces

    def _detect(
        self, image: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """At ``max_side``, and when that finds no face at each smaller fallback side in turn: the
        detection policy the pipeline's detector follows (``shared.detectors.fallback``, every empty
        frame retried, as the bench's pipeline does), so that their outputs can be compared."""
        tried = min(max(image.shape[:2]), self.max_side)
        boxes, landmarks = self._detect_at(image, self.max_side)
        for side in self.fallback_sides:
            if len(boxes) or side >= tried:
                continue
            boxes, landmarks = self._detect_at(image, side)
            tried = side
        return boxes, landmarks

    def _detect_at(
        self, image: npt.NDArray[np.uint8], max_side: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        small, scale = resize_for_detection(image, max_side)  # a no-op for 640x480 frames at 640
        if self._input_size != (small.shape[1], small.shape[0]):
            self._input_size = (small.shape[1], small.shape[0])
            self.net.setInputSize(self._input_size)
        _, found = self.net.detect(small)
        found = np.zeros((0, 15), np.float32) if found is None else np.asarray(found, np.float32)
        boxes = found[:, :4] / np.float32(scale)
        landmarks = found[:, 4:14].reshape(-1, 5, 2) / np.float32(scale)
        return boxes, landmarks

    def _face(self, image: npt.NDArray[np.uint8], box: Any, lms: Any) -> FaceOut:
        meta = self.classifier.meta
        t0 = time.perf_counter()
        if self.bbox_crop:
            x, y, w, h = (int(v) for v in box)
            patch = image[max(y, 0) : max(y + h, 1), max(x, 0) : max(x + w, 1)]
            crop = cv2.resize(patch, (meta.input_size, meta.input_size))[None, :, :, ::-1]  # BGR -> RGB
        else:
            crop = crop_faces_bgr(image, lms[None], meta.input_size, meta.margin, meta.template)
        tensor = torch.from_numpy(np.ascontiguousarray(crop)).permute(0, 3, 1, 2)
        t1 = time.perf_counter()
        probs = self.classifier.predict(tensor)  # normalise + forward (batch of one) + softmax
        label = label_for(probs, meta.classes, meta.uncertain_threshold)[0]
        self.stages["crop"] += t1 - t0
        self.stages["classify"] += time.perf_counter() - t1
        return FaceOut(tuple(box.tolist()), label, tuple(probs[0].tolist()))


def run_naive(
    jpegs: Sequence[bytes],
    classifier: Classifier,
    weights_dir: Path,
    score_threshold: float,
    bbox_crop: bool = False,
) -> tuple[dict[str, Any], Outputs]:
    """The tutorial loop (see the package doc). ``bbox_crop``: crop the box instead of aligning."""
    loop = _NaiveLoop(classifier, weights_dir, score_threshold, bbox_crop)
    loop.frame(jpegs[0])  # warm-up (first-call allocations), not counted
    loop.reset()
    usage = Usage([os.getpid()]).start()
    started = time.perf_counter()
    with torch.inference_mode():
        outputs = [loop.frame(jpeg) for jpeg in jpegs]
    seconds = time.perf_counter() - started
    usage.stop()
    faces = sum(len(o) for o in outputs)
    return figures(len(jpegs), faces, seconds, loop.latencies, loop.stages, usage), outputs


def _face_outs(out: FrameOutput | FrameError, classes: Sequence[str]) -> list[FaceOut]:
    if isinstance(out, FrameError):
        return []
    return [FaceOut(f.box, f.label, tuple(f.probs[c] for c in classes)) for f in out.faces]


def run_pipeline(
    jpegs: Sequence[bytes],
    classifier: Classifier,
    detector_name: str,
    weights_dir: Path,
    score_threshold: float,
    device: str,
    batch_size: int,
    device_route: bool | None = None,
) -> tuple[dict[str, Any], Outputs]:
    """The worker's Pipeline on consecutive batches of ``batch_size`` frames, in this process."""
    detector = create(
        detector_name, DetectorConfig(score_threshold=score_threshold, weights_dir=weights_dir, device=device)
    )
    pipeline = Pipeline(detector, device, device_route=device_route)
    pipeline.process(list(jpegs[:batch_size]), classifier, None)  # warm-up, not counted
    pipeline.stats.reset()
    outputs: Outputs = []
    latencies: list[float] = []
    usage = Usage([os.getpid()]).start()
    started = time.perf_counter()
    for i in range(0, len(jpegs), batch_size):
        t0 = time.perf_counter()
        batch = pipeline.process(list(jpegs[i : i + batch_size]), classifier, None)
        done = 1000 * (time.perf_counter() - t0)
        latencies += [done] * len(batch)
        outputs += [_face_outs(out, classifier.meta.classes) for out in batch]
    seconds = time.perf_counter() - started
    usage.stop()
    stats = pipeline.stats
    result = figures(len(jpegs), stats.faces, seconds, latencies, stats.seconds, usage)
    backend = getattr(detector, "inner", detector)  # the backend behind the no-face fallback wrapper
    result["detector"] = detector.name if detector_name != "auto" else f"auto ({type(backend).__name__})"
    result["batch_size"] = batch_size
    return result, outputs


def compare(a: Outputs, b: Outputs) -> dict[str, Any]:
    """How far two runs' outputs on the same frames are apart."""
    same_count = sum(len(x) == len(y) for x, y in zip(a, b, strict=True))
    boxes_equal = labels_equal = 0
    max_box = max_prob = 0.0
    faces = 0
    for x, y in zip(a, b, strict=True):
        if len(x) != len(y):
            continue
        for fx, fy in zip(x, y, strict=True):
            faces += 1
            box_diff = max(abs(p - q) for p, q in zip(fx.box, fy.box, strict=True))
            max_box = max(max_box, box_diff)
            boxes_equal += box_diff <= 1e-3
            labels_equal += fx.label == fy.label
            max_prob = max(max_prob, *(abs(p - q) for p, q in zip(fx.probs, fy.probs, strict=True)))
    return {
        "frames": len(a),
        "frames_same_face_count": same_count,
        "faces_compared": faces,
        "boxes_equal": boxes_equal,
        "labels_equal": labels_equal,
        "max_box_diff_px": round(max_box, 4),
        "max_prob_diff": float(f"{max_prob:.3g}"),
        "identical": same_count == len(a) and boxes_equal == faces and labels_equal == faces,
    }
