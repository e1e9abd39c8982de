"""The per-batch compute: decode -> detect -> align -> classify, for frames of any cameras.

One call handles a whole batch (frames of several cameras, of any sizes, in any order) and returns one
output per input frame, in input order, so the caller can route each result back to its camera and
sequence number. Nothing on the hot path loops per face: the detector receives the whole batch (the
PyTorch backend runs it as one forward pass, cv2 loops per image inside), all faces of all frames are
aligned by one call of the shared preprocessing function (one ``grid_sample`` per frame) and classified
in one forward pass. The only per-face Python is building the output records.

Two routes through the same stages, chosen by device:

* host route (CPU default): ``cv2.imdecode`` -> ``detector.detect`` on numpy BGR frames -> one uint8
  batch tensor (moved to the device through pinned memory when it is a GPU) -> align -> classify.
* device route (CUDA default with a detector that has ``detect_tensor``): ``torchvision.io.decode_jpeg``
  decodes the whole list on the GPU (nvjpeg) -> ``detect_tensor`` -> align -> classify, the frames never
  leaving the device; results cross to the host once per batch. It also runs on CPU (tests force it
  there with ``device_route=True``), so the GPU code is the same code with a device switch.

Each stage's time is added to :attr:`Pipeline.stats` (the benchmark and the worker's metrics read it).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import cv2
import numpy as np
import numpy.typing as npt
import torch
from prometheus_client import Counter

from shared.constants import UNKNOWN
from shared.detectors import Detections, FaceDetector
from shared.detectors.fallback import fallback_stats
from shared.models.artifact import Classifier, label_for
from shared.preprocess import align_faces, stack_frames
from shared.schema import Face, SchemaError, check_jpeg

#: Stage names in :class:`StageStats`, in pipeline order.
STAGES: tuple[str, ...] = ("decode", "detect", "crop", "classify")

#: How often the detector's no-face fallback (shared/detectors/fallback.py) ran, skipped or found a face.
DETECTOR_FALLBACK = Counter(
    "genderlens_worker_detector_fallback_total",
    "Frames with no face at the detection long side, by what the fallback did "
    "(retried, recovered = a smaller side found a face, skipped_by_budget, too_small)",
    ["outcome"],
)
_FALLBACK_OUTCOMES = ("retried", "recovered", "skipped_by_budget", "too_small")


def applied_threshold(classifier: Classifier, override: float | None) -> float:
    """The one uncertainty policy: a face is ``uncertain`` below the model's own threshold (chosen on
    its validation split, in its metadata) unless the worker's setting overrides it. The value travels
    with each result (``ModelRef.uncertain_threshold``) and the viewer applies it to smoothed labels."""
    return classifier.meta.uncertain_threshold if override is None else override


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


@dataclass
class StageStats:
    """Cumulative wall time per stage, and what went through (read and reset by the benchmark)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    batches: int = 0
    frames: int = 0
    faces: int = 0
    #: frames the detector's no-face fallback ran on, and those where it found a face
    fallback_retried: int = 0
    fallback_recovered: int = 0

    def add(self, stage: str, started: float) -> float:
        """Add the time since ``started`` (a perf_counter reading) to ``stage``; returns now."""
        now = time.perf_counter()
        self.seconds[stage] += now - started
        return now

    def reset(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.batches = self.frames = self.faces = 0
        self.fallback_retried = self.fallback_recovered = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "seconds": dict(self.seconds),
            "batches": self.batches,
            "frames": self.frames,
            "faces": self.faces,
            "fallback_retried": self.fallback_retried,
            "fallback_recovered": self.fallback_recovered,
        }


class _TensorDetections(Protocol):
    boxes: torch.Tensor
    landmarks: torch.Tensor
    scores: torch.Tensor


class TensorDetector(Protocol):
    """A detector that takes a uint8 [B, 3, H, W] batch already on its device (torch-yunet)."""

    name: str

    def detect_tensor(
        self, frames: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None, channel_order: Any = "bgr"
    ) -> Sequence[_TensorDetections]: ...


def decode_jpeg(data: bytes) -> npt.NDArray[np.uint8]:
    """JPEG bytes -> BGR image; raises DecodeError on anything that is not a decodable image, or
    that declares more pixels than ``shared.schema.MAX_PIXELS`` (checked before decoding)."""
    try:
        check_jpeg(data)
    except SchemaError as exc:
        raise DecodeError(exc.reason) from None
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if image is None or image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise DecodeError("undecodable JPEG")
    return np.asarray(image, dtype=np.uint8)


def decode_jpegs_on_device(jpegs: Sequence[bytes], device: torch.device) -> list[torch.Tensor | DecodeError]:
    """JPEG bytes -> RGB uint8 [3, H, W] tensors decoded on ``device`` (nvjpeg on CUDA, in one call for
    the whole list); an undecodable frame, or one over the pixel bound (``check_jpeg``, before any
    decoding), gives a DecodeError in its place instead of failing the batch."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_decode

    refused: dict[int, DecodeError] = {}
    for i, jpeg in enumerate(jpegs):
        try:
            check_jpeg(jpeg)
        except SchemaError as exc:
            refused[i] = DecodeError(exc.reason)
    # The input tensors must be on the CPU whatever the device; copy (bytes are read-only buffers).
    datas = [torch.from_numpy(np.frombuffer(j, dtype=np.uint8).copy()) for j in jpegs]

    def one(i: int, data: torch.Tensor) -> torch.Tensor | DecodeError:
        if i in refused:
            return refused[i]
        if data.numel() < 4:
            return DecodeError("undecodable JPEG")
        try:
            image = cast(torch.Tensor, tv_decode(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            return DecodeError("undecodable JPEG")
        return (
            image
            if image.ndim == 3 and image.shape[1] > 0 and image.shape[2] > 0
            else DecodeError("undecodable JPEG")
        )

    with warnings.catch_warnings():
        # torchvision 0.29 marks its codecs deprecated in favour of TorchCodec; they still work.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if device.type == "cuda" and not refused and all(d.numel() >= 4 for d in datas):
            try:
                return list(tv_decode(datas, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                pass  # one bad frame fails the batched call: find it frame by frame below
        return [one(i, d) for i, d in enumerate(datas)]


def size_groups(sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices of the frames of each size, in order of first appearance.

    The detector runs once per size group: a frame letterboxed onto a larger canvas next to bigger
    frames gets slightly different features near its border (the zero canvas is not the convolutions'
    zero padding), so grouping keeps each frame's detections independent of its batch companions; it
    also spares small frames the compute of a large padded canvas. Cameras are few, so are sizes.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(size, []).append(i)
    return list(groups.values())


class Pipeline:
    """Batch compute shared by the worker and the benchmark.

    ``device_route``: decode and detect on the device (see the module doc); None = yes on CUDA when the
    detector supports it. The host route is the one for CPU: cv2's decoder beats torchvision's there, and
    cv2-yunet only takes numpy frames.
    """

    def __init__(
        self, detector: FaceDetector, device: str | torch.device = "cpu", device_route: bool | None = None
    ) -> None:
        self.detector = detector
        self.device = torch.device(device)
        has_tensor_api = callable(getattr(detector, "detect_tensor", None))
        if device_route is None:
            device_route = has_tensor_api and self.device.type == "cuda"
        elif device_route and not has_tensor_api:
            raise ValueError(f"detector {detector.name} has no detect_tensor: cannot run on the device route")
        self.device_route = device_route
        self.stats = StageStats()
        self._fallback_seen = dict.fromkeys(_FALLBACK_OUTCOMES, 0)
        # OpenCV (decode, cv2-yunet) gets no more threads than torch was given (the worker's
        # torch_threads): two one-thread workers on two cores must not each run cv2 on both.
        if cv2.getNumThreads() > torch.get_num_threads():
            cv2.setNumThreads(torch.get_num_threads())

    # -- entry points ------------------------------------------------------------------------------
    @torch.inference_mode()
    def process(
        self, jpegs: list[bytes], classifier: Classifier | None, uncertain_threshold: float | None
    ) -> list[FrameOutput | FrameError]:
        """JPEG frames -> faces per frame (or the reason a frame could not be processed), in order."""
        if self.device_route:
            return self._process_on_device(jpegs, classifier, uncertain_threshold)
        started = time.perf_counter()
        images: list[npt.NDArray[np.uint8]] = []
        errors: dict[int, FrameError] = {}
        for i, data in enumerate(jpegs):
            try:
                images.append(decode_jpeg(data))
            except DecodeError as exc:
                errors[i] = FrameError(str(exc))
        self.stats.add("decode", started)
        outputs = iter(self.run(images, classifier, uncertain_threshold))
        return [errors[i] if i in errors else next(outputs) for i in range(len(jpegs))]

    @torch.inference_mode()
    def run(
        self,
        images: list[npt.NDArray[np.uint8]],
        classifier: Classifier | None,
        uncertain_threshold: float | None,
    ) -> list[FrameOutput]:
        """Decoded BGR frames (sizes may differ) -> faces per frame, with stage timestamps."""
        started = time.perf_counter()
        sizes = [(int(im.shape[1]), int(im.shape[0])) for im in images]
        detections = [Detections.empty()] * len(images)
        for group in size_groups(sizes):
            found = self.detector.detect([images[i] for i in group])
            for i, det in zip(group, found, strict=True):
                detections[i] = det
        self._count_fallback()
        started = self.stats.add("detect", started)
        detected_at = time.time()
        with_faces = [i for i, det in enumerate(detections) if len(det)]
        crops: torch.Tensor | None = None
        if classifier is not None and with_faces:
            # One uint8 BGR batch for every frame with faces; the warp acts on each channel alike, so
            # aligning BGR and swapping the channels of the small crops equals aligning RGB frames.
            frames = self._host_batch([images[i] for i in with_faces])
            counts = torch.tensor([len(detections[i]) for i in with_faces])
            index = torch.repeat_interleave(torch.arange(len(with_faces)), counts)
            landmarks = torch.from_numpy(np.concatenate([detections[i].landmarks for i in with_faces]))
            meta = classifier.meta
            crops = align_faces(frames, index, landmarks, meta.input_size, meta.margin, meta.template).flip(1)
            started = self.stats.add("crop", started)
        return self._finish(sizes, detections, crops, classifier, uncertain_threshold, detected_at, started)

    # -- device route ------------------------------------------------------------------------------
    def _process_on_device(
        self, jpegs: list[bytes], classifier: Classifier | None, uncertain_threshold: float | None
    ) -> list[FrameOutput | FrameError]:
        started = time.perf_counter()
        decoded = decode_jpegs_on_device(jpegs, self.device)
        frames_list = [d for d in decoded if isinstance(d, torch.Tensor)]
        started = self.stats.add("decode", started)
        outputs: list[FrameOutput] = []
        if frames_list:
            hw = [(int(f.shape[1]), int(f.shape[2])) for f in frames_list]
            # Frames of other sizes are padded at the bottom/right: pixel coordinates stay their own.
            frames = stack_frames(frames_list).contiguous(memory_format=torch.channels_last)
            detector = cast(TensorDetector, self.detector)
            found: list[_TensorDetections] = []
            groups = size_groups(hw)
            if len(groups) == 1:
                found = list(detector.detect_tensor(frames, hw, channel_order="rgb"))
            else:
                slots: list[_TensorDetections | None] = [None] * len(hw)
                for group in groups:
                    h, w = hw[group[0]]
                    sub = frames[torch.tensor(group, device=frames.device)][:, :, :h, :w]
                    for i, det in zip(group, detector.detect_tensor(sub, None, "rgb"), strict=True):
                        slots[i] = det
                found = [d for d in slots if d is not None]
            counts_list = [int(d.scores.shape[0]) for d in found]
            # One device->host copy for the whole batch's detections.
            flat = torch.cat(
                [
                    torch.cat([d.boxes.float(), d.landmarks.float().flatten(1), d.scores.float()[:, None]], 1)
                    for d in found
                ]
            )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # so the detect time is the detector's, not deferred
            self._count_fallback()
            started = self.stats.add("detect", started)
            detected_at = time.time()
            crops: torch.Tensor | None = None
            if classifier is not None and flat.shape[0]:
                index = torch.repeat_interleave(
                    torch.arange(len(found), device=frames.device),
                    torch.tensor(counts_list, device=frames.device),
                )
                landmarks = flat[:, 4:14].reshape(-1, 5, 2)
                meta = classifier.meta
                crops = align_faces(frames, index, landmarks, meta.input_size, meta.margin, meta.template)
                started = self.stats.add("crop", started)
            host = flat.cpu().numpy()
            detections = []
            offset = 0
            for n in counts_list:
                rows = host[offset : offset + n]
                offset += n
                detections.append(
                    Detections(
                        boxes=np.ascontiguousarray(rows[:, 0:4]),
                        landmarks=np.ascontiguousarray(rows[:, 4:14].reshape(-1, 5, 2)),
                        scores=np.ascontiguousarray(rows[:, 14]),
                    )
                )
            sizes = [(w, h) for h, w in hw]
            outputs = self._finish(
                sizes, detections, crops, classifier, uncertain_threshold, detected_at, started
            )
        it = iter(outputs)
        return [FrameError(str(d)) if isinstance(d, DecodeError) else next(it) for d in decoded]

    def _count_fallback(self) -> None:
        """Move what the detector's fallback did since the last batch into the stats and metrics."""
        stats = fallback_stats(self.detector)
        if stats is None:
            return
        now = stats.snapshot()
        for outcome in _FALLBACK_OUTCOMES:
            delta = int(now[outcome]) - self._fallback_seen[outcome]
            if delta:
                DETECTOR_FALLBACK.labels(outcome).inc(delta)
                self._fallback_seen[outcome] = int(now[outcome])
                if outcome == "retried":
                    self.stats.fallback_retried += delta
                elif outcome == "recovered":
                    self.stats.fallback_recovered += delta

    # -- shared tail -------------------------------------------------------------------------------
    def _host_batch(self, images: Sequence[npt.NDArray[np.uint8]]) -> torch.Tensor:
        """numpy BGR HxWx3 frames -> uint8 [B, 3, H, W] (BGR, channels_last view, no extra copy) on the
        device; frames of other sizes padded at the bottom/right."""
        height = max(int(im.shape[0]) for im in images)
        width = max(int(im.shape[1]) for im in images)
        if all(im.shape[0] == height and im.shape[1] == width for im in images):
            batch = np.stack(images)
        else:
            batch = np.zeros((len(images), height, width, 3), np.uint8)
            for i, im in enumerate(images):
                batch[i, : im.shape[0], : im.shape[1]] = im
        tensor = torch.from_numpy(batch)
        if self.device.type == "cuda":
            # Pinned staging memory makes the upload an asynchronous DMA.
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            tensor = tensor.to(self.device)
        return tensor.permute(0, 3, 1, 2)

    def _finish(
        self,
        sizes: list[tuple[int, int]],
        detections: Sequence[Detections],
        crops: torch.Tensor | None,
        classifier: Classifier | None,
        uncertain_threshold: float | None,
        detected_at: float,
        started: float,
    ) -> list[FrameOutput]:
        """Classify all crops in one forward pass and build each frame's output."""
        n_faces = sum(len(d) for d in detections)
        self.stats.batches += 1
        self.stats.frames += len(sizes)
        self.stats.faces += n_faces
        classes: list[str] | None = None
        prob_rows: list[list[float]] = []
        labels: list[str] = []
        if classifier is not None:
            classes = classifier.meta.classes
            if crops is not None and crops.shape[0]:
                probs = classifier.predict(crops).float().cpu()
            else:
                probs = torch.zeros((0, len(classes)))
            labels = label_for(probs, classes, applied_threshold(classifier, uncertain_threshold))
            prob_rows = probs.tolist()
        self.stats.add("classify", started)
        classified_at = time.time()
        outputs: list[FrameOutput] = []
        offset = 0
        for size, det in zip(sizes, detections, strict=True):
            n = len(det)
            faces = _faces(det, classes, prob_rows[offset : offset + n], labels[offset : offset + n])
            outputs.append(FrameOutput(size[0], size[1], faces, detected_at, classified_at))
            offset += n
        return outputs


def _faces(
    det: Detections, classes: list[str] | None, probs: list[list[float]], labels: list[str]
) -> tuple[Face, ...]:
    boxes, lms, scores = det.boxes.tolist(), det.landmarks.tolist(), det.scores.tolist()
    return tuple(
        Face(
            box=(boxes[i][0], boxes[i][1], boxes[i][2], boxes[i][3]),
            landmarks=tuple((p[0], p[1]) for p in lms[i]),
            score=scores[i],
            label=labels[i] if classes else UNKNOWN,
            probs=dict(zip(classes, probs[i], strict=True)) if classes else {},
        )
        for i in range(len(det))
    )
