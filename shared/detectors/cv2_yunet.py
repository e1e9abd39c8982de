"""YuNet through OpenCV's ``cv2.FaceDetectorYN`` (ONNX, CPU). One image at a time: OpenCV has no batch
API, so ``detect`` loops; the PyTorch backend is the batched one."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import cv2
import numpy as np
import numpy.typing as npt

from shared.detectors import Detections, DetectorConfig, register, resize_for_detection
from shared.weights import resolve_weights

ONNX_NAME = "face_detection_yunet_2023mar.onnx"


class Cv2YuNet:
    name = "cv2-yunet"

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        path = resolve_weights(ONNX_NAME, config.weights_dir, config.weights_cache_dir)
        try:
            self._net = cv2.FaceDetectorYN.create(
                str(path), "", (320, 320), config.score_threshold, config.nms_threshold, config.top_k
            )
        except cv2.error as exc:
            raise RuntimeError(f"OpenCV could not load YuNet from {path}: {exc}") from exc
        # FaceDetectorYN keeps per-size state; one caller at a time.
        self._lock = threading.Lock()
        self._size: tuple[int, int] | None = None

    def detect(
        self, images: Sequence[npt.NDArray[np.uint8]], max_side: int | None = None
    ) -> list[Detections]:
        """``max_side``: detect at this long side instead of the config's (the no-face fallback)."""
        side = self.config.max_side if max_side is None else max_side
        return [self._detect_one(image, side) for image in images]

    def _detect_one(self, image: npt.NDArray[np.uint8], max_side: int) -> Detections:
        small, scale = resize_for_detection(image, max_side)
        height, width = small.shape[:2]
        with self._lock:
            if self._size != (width, height):
                self._net.setInputSize((width, height))
                self._size = (width, height)
            _, faces = self._net.detect(small)
        if faces is None or len(faces) == 0:
            return Detections.empty()
        faces = np.asarray(faces, dtype=np.float32) / np.float32(scale)
        scores = faces[:, 14] * np.float32(scale)  # undo the division for the score column
        return Detections(
            boxes=np.ascontiguousarray(faces[:, 0:4]),
            landmarks=np.ascontiguousarray(faces[:, 4:14].reshape(-1, 5, 2)),
            scores=np.ascontiguousarray(scores),
        )


@register("cv2-yunet")
def _factory(config: DetectorConfig) -> Cv2YuNet:
    return Cv2YuNet(config)
