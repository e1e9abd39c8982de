"""torch-yunet against cv2-yunet, and its batching / letterbox mapping.

The equivalence test runs every photo in ../shared/data/faces/eval (1,077 images, about 20 s for both
backends on one CPU thread): yunet_s.pth in PyTorch and face_detection_yunet_2023mar.onnx in
cv2.FaceDetectorYN (exported from that checkpoint) must find the same faces at the default threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

torch = pytest.importorskip("torch")

from shared.detectors import Detections, DetectorConfig, FaceDetector, create  # noqa: E402
from shared.detectors.torch_yunet import Letterbox, TorchYuNet, load_yunet  # noqa: E402
from tests.helpers.paths import EVAL_DIR as EVAL  # noqa: E402
from tests.helpers.paths import WEIGHTS_DIR as WEIGHTS  # noqa: E402
from tests.helpers.paths import skip_without  # noqa: E402
from tests.helpers.photos import iou  # noqa: E402

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

#: Equivalence bounds: a cv2 face and its torch match overlap with IoU >= this ...
MIN_IOU = 0.9
#: ... and every landmark is within this fraction of the face box's long side of cv2's.
MAX_LANDMARK_ERR = 0.02
#: ... on at least this fraction of images (same face count required too).
MIN_MATCHING_IMAGES = 0.98

pytestmark = skip_without(WEIGHTS / "yunet_s.pth", EVAL)


@pytest.fixture(autouse=True, scope="module")
def _few_threads() -> Iterator[None]:
    # The CPU is shared (a model trains alongside); one thread each keeps the comparison fair too.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    yield
    torch.set_num_threads(before)


def _config(variant: str = "yunet_s") -> DetectorConfig:
    # The backends themselves, without the no-face fallback that create() adds by default.
    return DetectorConfig(weights_dir=WEIGHTS, variant=variant, fallback_sides=())


@pytest.fixture(scope="module")
def torch_det() -> TorchYuNet:
    det = create("torch-yunet", _config())
    assert isinstance(det, TorchYuNet)
    return det


@pytest.fixture(scope="module")
def cv2_det() -> FaceDetector:
    return create("cv2-yunet", _config())


def _eval_images() -> list[Path]:
    return sorted(p for p in EVAL.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _read(path: Path) -> npt.NDArray[np.uint8]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"unreadable image {path}"
    return np.asarray(image, np.uint8)


def _frames_with_faces(
    det: FaceDetector, count: int, size: tuple[int, int] = (480, 640)
) -> list[npt.NDArray[np.uint8]]:
    """``count`` eval photos stretched to ``size`` (h, w) that contain at least one face (deterministic)."""
    frames = []
    for path in _eval_images()[::7]:
        frame = np.asarray(cv2.resize(_read(path), (size[1], size[0]), interpolation=cv2.INTER_AREA))
        if len(det.detect([frame])[0]):
            frames.append(frame)
        if len(frames) == count:
            return frames
    raise AssertionError(f"fewer than {count} eval photos with a face")


def _match(ref: Detections, got: Detections) -> tuple[bool, list[float], list[float]]:
    """Match each ``ref`` face to its best-IoU ``got`` face; return (all within bounds, IoUs, landmark
    errors as a fraction of the ref box's long side)."""
    if len(ref) != len(got):
        return False, [], []
    ious, errs = [], []
    for i in range(len(ref)):
        overlaps = [iou(ref.boxes[i], got.boxes[j]) for j in range(len(got))]
        j = int(np.argmax(overlaps))
        ious.append(overlaps[j])
        dist = np.linalg.norm(ref.landmarks[i] - got.landmarks[j], axis=1).max()
        errs.append(float(dist / max(ref.boxes[i][2], ref.boxes[i][3])))
    ok = all(v >= MIN_IOU for v in ious) and all(e <= MAX_LANDMARK_ERR for e in errs)
    return ok, ious, errs


def _assert_same(a: Detections, b: Detections, atol: float) -> None:
    assert len(a) == len(b)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=atol)
    np.testing.assert_allclose(a.landmarks, b.landmarks, atol=atol)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def test_matches_cv2_yunet_on_eval_photos(torch_det: TorchYuNet, cv2_det: FaceDetector) -> None:
    paths = _eval_images()
    assert len(paths) >= 300, f"only {len(paths)} eval photos in {EVAL}"
    matching, all_ious, all_errs, mismatched = 0, [], [], []
    faces = 0
    for path in paths:
        image = _read(path)
        ref, got = cv2_det.detect([image])[0], torch_det.detect([image])[0]
        faces += len(ref)
        ok, ious, errs = _match(ref, got)
        matching += ok
        all_ious += ious
        all_errs += errs
        if not ok:
            mismatched.append(f"{path.relative_to(EVAL)}: cv2 {ref.scores} torch {got.scores}")
    fraction = matching / len(paths)
    log.info(
        "torch-yunet vs cv2-yunet: %d/%d images match (%.4f), %d faces, IoU min %.6f mean %.6f, "
        "landmark err max %.2e mean %.2e of box side",
        matching,
        len(paths),
        fraction,
        faces,
        min(all_ious, default=float("nan")),
        float(np.mean(all_ious)) if all_ious else float("nan"),
        max(all_errs, default=float("nan")),
        float(np.mean(all_errs)) if all_errs else float("nan"),
    )
    assert faces > len(paths) // 2, "cv2-yunet found almost no faces: wrong data or weights?"
    assert fraction >= MIN_MATCHING_IMAGES, "\n".join(mismatched[:20])


def test_batch_of_one_equals_batch_of_many(torch_det: TorchYuNet) -> None:
    frames = _frames_with_faces(torch_det, 8)
    batched = torch_det.detect(frames)
    for frame, many in zip(frames, batched, strict=True):
        _assert_same(torch_det.detect([frame])[0], many, atol=1e-3)


@pytest.mark.parametrize("size", [(480, 640), (300, 410)])  # the second needs padding to 320x416
def test_tensor_api_matches_numpy_api(torch_det: TorchYuNet, size: tuple[int, int]) -> None:
    frames = _frames_with_faces(torch_det, 3, size=size)
    bgr = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
    from_numpy = torch_det.detect(frames)
    from_bgr = [d.numpy() for d in torch_det.detect_tensor(bgr)]
    from_rgb = [d.numpy() for d in torch_det.detect_tensor(bgr.flip(1), channel_order="rgb")]
    for a, b, c in zip(from_numpy, from_bgr, from_rgb, strict=True):
        _assert_same(a, b, atol=1e-3)
        _assert_same(a, c, atol=1e-3)


def test_letterbox_mapping_round_trip() -> None:
    points = np.array([[0, 0], [10.5, 3.25], [639, 479]], np.float32)
    for lb in (Letterbox(1.0), Letterbox(0.5), Letterbox(0.37, 12.0, 40.5)):
        np.testing.assert_allclose(lb.to_frame(lb.to_canvas(points)), points, atol=1e-4)


@pytest.mark.parametrize("api", ["numpy", "tensor"])
def test_downscaled_frame_maps_back_to_frame_pixels(torch_det: TorchYuNet, api: str) -> None:
    """A frame twice max_side is detected at half size; its faces come back at twice the small frame's."""
    small = _frames_with_faces(torch_det, 1, size=(480, 640))[0]
    big = np.asarray(cv2.resize(small, (1280, 960), interpolation=cv2.INTER_CUBIC))
    expect = torch_det.detect([small])[0]
    if api == "numpy":
        got = torch_det.detect([big])[0]
    else:
        got = torch_det.detect_tensor(torch.from_numpy(big).permute(2, 0, 1)[None])[0].numpy()
    # Same faces in frame pixels: boxes 2x the small frame's (resampling costs a little accuracy).
    scaled = Detections(expect.boxes * 2, expect.landmarks * 2, expect.scores)
    ok, ious, errs = _match(scaled, got)
    assert ok, (len(scaled), len(got), ious, errs)


@pytest.mark.parametrize("api", ["numpy", "tensor"])
def test_mixed_sizes_in_one_batch_map_to_their_own_frame(torch_det: TorchYuNet, api: str) -> None:
    a = _frames_with_faces(torch_det, 1, size=(480, 640))[0]
    b = _frames_with_faces(torch_det, 2, size=(400, 300))[1]
    c = np.asarray(cv2.resize(a, (1280, 960), interpolation=cv2.INTER_CUBIC))  # downscaled to 640x480
    frames = [b, a, c]
    alone = [torch_det.detect([f])[0] for f in frames]
    if api == "numpy":
        together = torch_det.detect(frames)
    else:
        # Pack the frames at the top-left of one uint8 tensor, as a worker would.
        packed = torch.zeros((3, 3, 960, 1280), dtype=torch.uint8)
        for i, f in enumerate(frames):
            packed[i, :, : f.shape[0], : f.shape[1]] = torch.from_numpy(f).permute(2, 0, 1)
        sizes = [(f.shape[0], f.shape[1]) for f in frames]
        together = [d.numpy() for d in torch_det.detect_tensor(packed, sizes)]
    for frame, one, joint in zip(frames, alone, together, strict=True):
        assert len(one) > 0
        # A smaller frame on a larger canvas sees extra zero padding below/right of it, which nudges
        # the scores of faces at its edges; faces themselves must be the same, in this frame's pixels.
        ok, ious, errs = _match(one, joint)
        assert ok, (frame.shape, ious, errs)
        h, w = frame.shape[:2]
        assert (joint.boxes[:, 0] < w).all() and (joint.boxes[:, 1] < h).all()


def test_no_faces_and_empty_batch(torch_det: TorchYuNet) -> None:
    assert torch_det.detect([]) == []
    blank = torch_det.detect([np.zeros((240, 320, 3), np.uint8)])[0]
    assert len(blank) == 0
    assert blank.boxes.shape == (0, 4) and blank.landmarks.shape == (0, 5, 2)
    assert torch_det.detect_tensor(torch.zeros((0, 3, 64, 64), dtype=torch.uint8)) == []


@pytest.mark.parametrize(
    ("variant", "onnx_name"),
    [("yunet_s", "face_detection_yunet_2023mar.onnx"), ("yunet_n", "yunet_n_dynamic.onnx")],
)
def test_raw_head_outputs_match_the_onnx_export(variant: str, onnx_name: str) -> None:
    """Layer-level check: same input blob (BGR, 0..255, no normalisation), same 12 head outputs."""
    onnx = WEIGHTS / onnx_name
    if not onnx.is_file():
        pytest.skip(f"{onnx} absent")
    model = load_yunet(WEIGHTS / f"{variant}.pth", variant).fuse()
    image = np.asarray(cv2.resize(_read(_eval_images()[0]), (640, 480)), np.uint8)
    blob = cv2.dnn.blobFromImage(image)  # NCHW float32, BGR as read: what FaceDetectorYN feeds the net
    net = cv2.dnn.readNet(str(onnx))
    names = [f"{k}_{s}" for k in ("cls", "obj", "bbox", "kps") for s in (8, 16, 32)]
    net.setInput(blob)
    ref = dict(zip(names, net.forward(names), strict=True))
    with torch.inference_mode():
        maps = model(torch.from_numpy(blob))
    for level, stride in enumerate((8, 16, 32)):
        flat = maps[level][0].permute(1, 2, 0).reshape(-1, 16)
        ours = {
            "cls": torch.sigmoid(flat[:, 0:1]),
            "obj": torch.sigmoid(flat[:, 1:2]),
            "bbox": flat[:, 2:6],
            "kps": flat[:, 6:16],
        }
        for key, value in ours.items():
            want = ref[f"{key}_{stride}"].reshape(value.shape)
            np.testing.assert_allclose(value.numpy(), want, atol=2e-4, err_msg=f"{key}_{stride}")


def test_yunet_n_variant_loads_and_detects(torch_det: TorchYuNet) -> None:
    det_n = create("torch-yunet", _config(variant="yunet_n"))
    assert det_n.name == "torch-yunet"
    frames = _frames_with_faces(torch_det, 4)
    found = det_n.detect(frames)
    # A different model, so not the same boxes; it must still find faces in photos of faces.
    assert sum(len(d) > 0 for d in found) >= 3


def test_wrong_variant_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="does not fit YuNet variant 'yunet_n'"):
        load_yunet(WEIGHTS / "yunet_s.pth", "yunet_n")
    with pytest.raises(ValueError, match="unknown YuNet variant"):
        load_yunet(WEIGHTS / "yunet_s.pth", "yunet_x")
