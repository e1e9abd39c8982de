"""The per-batch compute: decode -> detect -> align -> classify, for frames of any cameras.

All faces of all frames in a batch are aligned by one call of the shared preprocessing function and
classified in one forward pass; the detector receives the whole batch (the PyTorch backend runs it as
one forward pass, cv2 loops inside).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
import torch

from shared.detectors import Detections, FaceDetector
from shared.models.artifact import UNKNOWN, Classifier, label_for
from shared.preprocess import align_faces, bgr_to_tensor, stack_frames
from shared.schema import Face


class DecodeError(ValueError):
    pass


@dataclass(frozen=True)
class FrameOutput:
    width: int
    height: int
    faces: tuple[Face, ...]
    detected_at: float
    classified_at: float


@dataclass(frozen=True)
class FrameError:
    """A frame the pipeline could not process (e.g. an undecodable JPEG): dead-letter it."""

    reason: str


def decode_jpeg(data: bytes) -> npt.NDArray[np.uint8]:
    """JPEG bytes -> BGR image; raises DecodeError on anything that is not a decodable image."""
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if image is None or image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise DecodeError("undecodable JPEG")
    return np.asarray(image, dtype=np.uint8)


class Pipeline:
    def __init__(self, detector: FaceDetector, device: str | torch.device = "cpu") -> None:
        self.detector = detector
        self.device = torch.device(device)

    def process(
        self, jpegs: list[bytes], classifier: Classifier | None, uncertain_threshold: float | None
    ) -> list[FrameOutput | FrameError]:
        """JPEG frames -> faces per frame (or the reason a frame could not be processed)."""
        results: list[FrameOutput | FrameError] = []
        images: list[npt.NDArray[np.uint8]] = []
        for data in jpegs:
            try:
                images.append(decode_jpeg(data))
                results.append(FrameError(""))  # placeholder, replaced below
            except DecodeError as exc:
                results.append(FrameError(str(exc)))
        outputs = iter(self.run(images, classifier, uncertain_threshold))
        return [next(outputs) if isinstance(r, FrameError) and not r.reason else r for r in results]

    def run(
        self,
        images: list[npt.NDArray[np.uint8]],
        classifier: Classifier | None,
        uncertain_threshold: float | None,
    ) -> list[FrameOutput]:
        """Decoded BGR frames -> faces per frame, with stage timestamps."""
        sizes = [(int(im.shape[1]), int(im.shape[0])) for im in images]
        detections = self.detector.detect(images) if images else []
        detected_at = time.time()
        if classifier is None:
            classified_at = time.time()
            return [
                FrameOutput(*size, _faces(det, None, [], []), detected_at, classified_at)
                for size, det in zip(sizes, detections, strict=True)
            ]
        with_faces = [i for i, det in enumerate(detections) if len(det)]
        probs = torch.zeros((0, len(classifier.meta.classes)))
        if with_faces:
            frames = stack_frames([bgr_to_tensor(images[i]) for i in with_faces]).to(self.device)
            index = torch.cat(
                [torch.full((len(detections[i]),), k, dtype=torch.int64) for k, i in enumerate(with_faces)]
            )
            landmarks = torch.from_numpy(np.concatenate([detections[i].landmarks for i in with_faces]))
            crops = align_faces(frames, index, landmarks, classifier.meta.input_size, classifier.meta.margin)
            probs = classifier.predict(crops).cpu()
        threshold = (
            classifier.meta.uncertain_threshold if uncertain_threshold is None else uncertain_threshold
        )
        labels = label_for(probs, classifier.meta.classes, threshold)
        classified_at = time.time()
        outputs: list[FrameOutput] = []
        offset = 0
        prob_rows = probs.tolist()
        for size, det in zip(sizes, detections, strict=True):
            n = len(det)
            outputs.append(
                FrameOutput(
                    *size,
                    _faces(
                        det,
                        classifier.meta.classes,
                        prob_rows[offset : offset + n],
                        labels[offset : offset + n],
                    ),
                    detected_at,
                    classified_at,
                )
            )
            offset += n
        return outputs


def _faces(
    det: Detections, classes: list[str] | None, probs: list[list[float]], labels: list[str]
) -> tuple[Face, ...]:
    faces = []
    boxes, lms, scores = det.boxes.tolist(), det.landmarks.tolist(), det.scores.tolist()
    for i in range(len(det)):
        faces.append(
            Face(
                box=(boxes[i][0], boxes[i][1], boxes[i][2], boxes[i][3]),
                landmarks=tuple((p[0], p[1]) for p in lms[i]),
                score=scores[i],
                label=labels[i] if classes else UNKNOWN,
                probs=dict(zip(classes, probs[i], strict=True)) if classes else {},
            )
        )
    return tuple(faces)
