"""The batched inference pipeline: batching never changes an answer, frames keep their identity, and the
device route (the CUDA code) runs on CPU with the same results.

Frames are composed from real photos of ../shared/data/faces/eval by the benchmark's clip builder; the
classifier is an untrained gendernet made decisive (scaled head) so labels are far from any threshold.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from services.inference.pipeline import FrameError, FrameOutput, Pipeline  # noqa: E402
from shared.detectors import DetectorConfig, FaceDetector, create  # noqa: E402
from shared.detectors.auto import default_detector  # noqa: E402
from shared.models.archs import build_model  # noqa: E402
from shared.models.artifact import Classifier, load_artifact, publish_untrained  # noqa: E402
from tests.helpers.paths import EVAL_DIR as EVAL  # noqa: E402
from tests.helpers.paths import WEIGHTS_DIR as WEIGHTS  # noqa: E402
from tests.helpers.paths import skip_without  # noqa: E402
from tools.bench.clip import build_clip  # noqa: E402
from tools.bench.inprocess import compare, run_naive, run_pipeline  # noqa: E402

pytestmark = skip_without(WEIGHTS / "yunet_s.pth", EVAL)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The CPU is shared with other jobs; one thread is both faster under contention and deterministic.
    before, before_cv = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    yield
    torch.set_num_threads(before)
    cv2.setNumThreads(before_cv)


def make_classifier(models_dir: Path) -> Classifier:
    """An untrained gendernet whose head is scaled up so its probabilities are far from 0.5."""
    torch.manual_seed(1)
    model = build_model("gendernet", 2).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(200.0)  # type: ignore[index,union-attr]
    meta = publish_untrained(
        models_dir, name="testnet", version="v1", seed=1, model=model, uncertain_threshold=0.6
    )
    return load_artifact(models_dir / meta.dirname, "cpu")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    return make_classifier(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return build_clip(EVAL, 10, seed=3).jpegs


@pytest.fixture(scope="module")
def detectors() -> dict[str, FaceDetector]:
    return {name: create(name, DetectorConfig(weights_dir=WEIGHTS)) for name in ("cv2-yunet", "torch-yunet")}


def _outputs(results: list[FrameOutput | FrameError]) -> list[FrameOutput]:
    assert all(isinstance(r, FrameOutput) for r in results), results
    return [r for r in results if isinstance(r, FrameOutput)]


def assert_same(a: FrameOutput, b: FrameOutput, box_tol: float = 1e-3) -> None:
    assert (a.width, a.height) == (b.width, b.height)
    assert len(a.faces) == len(b.faces)
    for fa, fb in zip(a.faces, b.faces, strict=True):
        np.testing.assert_allclose(fa.box, fb.box, atol=box_tol)
        np.testing.assert_allclose(fa.landmarks, fb.landmarks, atol=box_tol)
        assert fa.label == fb.label
        assert fa.probs.keys() == fb.probs.keys()
        np.testing.assert_allclose(list(fa.probs.values()), list(fb.probs.values()), atol=1e-4)


ROUTES = [("cv2-yunet", False), ("torch-yunet", False), ("torch-yunet", True)]


@pytest.mark.parametrize(("name", "device_route"), ROUTES, ids=["cv2-host", "torch-host", "torch-device"])
def test_batch_of_one_equals_batch_of_many(
    name: str,
    device_route: bool,
    detectors: dict[str, FaceDetector],
    classifier: Classifier,
    jpegs: list[bytes],
) -> None:
    pipeline = Pipeline(detectors[name], "cpu", device_route=device_route)
    many = _outputs(pipeline.process(jpegs, classifier, None))
    ones = [_outputs(pipeline.process([j], classifier, None))[0] for j in jpegs]
    assert sum(len(o.faces) for o in many) >= len(jpegs)  # the clip has faces to compare
    labels = {f.label for o in many for f in o.faces}
    assert labels <= {"female", "male", "uncertain"} and labels & {"female", "male"}
    for a, b in zip(many, ones, strict=True):
        assert_same(a, b)


def _resized(jpeg: bytes, size: tuple[int, int]) -> bytes:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    return cv2.imencode(".jpg", cv2.resize(image, size, interpolation=cv2.INTER_AREA))[1].tobytes()


MIXED = [(640, 480), (320, 240), (800, 600), (480, 640), (1280, 720)]


@pytest.mark.parametrize(("name", "device_route"), ROUTES, ids=["cv2-host", "torch-host", "torch-device"])
def test_mixed_sizes_in_one_batch_keep_their_own_results(
    name: str,
    device_route: bool,
    detectors: dict[str, FaceDetector],
    classifier: Classifier,
    jpegs: list[bytes],
) -> None:
    frames = [_resized(j, s) for j, s in zip(jpegs, MIXED, strict=False)]
    frames.insert(2, b"not a jpeg")
    pipeline = Pipeline(detectors[name], "cpu", device_route=device_route)
    batch = pipeline.process(frames, classifier, None)
    assert len(batch) == len(frames)
    assert isinstance(batch[2], FrameError) and "corrupt JPEG" in batch[2].reason
    good = [out for i, out in enumerate(batch) if i != 2]
    for out, size, jpeg in zip(good, MIXED, [f for i, f in enumerate(frames) if i != 2], strict=True):
        assert isinstance(out, FrameOutput)
        assert (out.width, out.height) == size
        alone = _outputs(pipeline.process([jpeg], classifier, None))[0]
        # torch-yunet's device route downscales big frames with antialiased bilinear on the device, not
        # cv2's INTER_AREA: the same faces, boxes within a pixel or two.
        tol = 2.0 if device_route and max(size) > 640 else 1e-3
        assert_same(out, alone, box_tol=tol)
        for face in out.faces:
            x, y, w, h = face.box
            assert -w < x < size[0] and -h < y < size[1]  # in this frame's own pixels


def test_device_route_on_cpu_matches_host_route(
    detectors: dict[str, FaceDetector], classifier: Classifier, jpegs: list[bytes]
) -> None:
    host = _outputs(
        Pipeline(detectors["torch-yunet"], "cpu", device_route=False).process(jpegs, classifier, None)
    )
    dev = _outputs(
        Pipeline(detectors["torch-yunet"], "cpu", device_route=True).process(jpegs, classifier, None)
    )
    for a, b in zip(host, dev, strict=True):
        # torchvision's and OpenCV's JPEG decoders may round a pixel differently.
        assert_same(a, b, box_tol=1.0)


def test_undecodable_frames_keep_their_place(
    detectors: dict[str, FaceDetector], classifier: Classifier
) -> None:
    good = build_clip(EVAL, 1, seed=5).jpegs[0]
    for route in (False, True):
        pipeline = Pipeline(detectors["torch-yunet"], "cpu", device_route=route)
        out = pipeline.process([b"", good, b"\xff\xd8garbage", good], classifier, None)
        assert [type(o) for o in out] == [FrameError, FrameOutput, FrameError, FrameOutput]
        assert _same_faces(out[1], out[3])
        assert pipeline.process([b"junk"], classifier, None) == [
            FrameError("corrupt JPEG: no start-of-image marker")
        ]
        assert pipeline.process([], classifier, None) == []


def test_a_decompression_bomb_is_refused_before_decoding_on_both_routes(
    detectors: dict[str, FaceDetector], classifier: Classifier
) -> None:
    """A 700-byte JPEG declaring 8192x8192 cost a worker 3-7 s and 200 MB each: both routes now read
    its frame header first and refuse it (issue 11, item 9)."""
    good = build_clip(EVAL, 1, seed=5).jpegs[0]
    data = bytearray(good)
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (8192).to_bytes(2, "big") + (8192).to_bytes(2, "big")
    for route in (False, True):
        pipeline = Pipeline(detectors["torch-yunet"], "cpu", device_route=route)
        out = pipeline.process([bytes(data), good], classifier, None)
        assert isinstance(out[0], FrameError) and "absurd JPEG dimensions 8192x8192" in out[0].reason
        assert isinstance(out[1], FrameOutput)


def _same_faces(a: Any, b: Any) -> bool:
    return [f.box for f in a.faces] == [f.box for f in b.faces]


def test_without_a_model_faces_are_unknown(detectors: dict[str, FaceDetector], jpegs: list[bytes]) -> None:
    for route in (False, True):
        out = _outputs(
            Pipeline(detectors["torch-yunet"], "cpu", device_route=route).process(jpegs[:3], None, None)
        )
        faces = [f for o in out for f in o.faces]
        assert faces and all(f.label == "unknown" and f.probs == {} for f in faces)


def test_uncertain_threshold_override(
    detectors: dict[str, FaceDetector], classifier: Classifier, jpegs: list[bytes]
) -> None:
    pipeline = Pipeline(detectors["cv2-yunet"], "cpu")
    everything_uncertain = _outputs(pipeline.process(jpegs[:3], classifier, 1.0))
    assert {f.label for o in everything_uncertain for f in o.faces} == {"uncertain"}


def test_stage_stats_count_what_went_through(
    detectors: dict[str, FaceDetector], classifier: Classifier, jpegs: list[bytes]
) -> None:
    pipeline = Pipeline(detectors["cv2-yunet"], "cpu")
    out = _outputs(pipeline.process(jpegs[:4], classifier, None))
    snap = pipeline.stats.snapshot()
    assert snap["batches"] == 1 and snap["frames"] == 4
    assert snap["faces"] == sum(len(o.faces) for o in out)
    assert all(snap["seconds"][s] > 0 for s in ("decode", "detect", "crop", "classify"))
    pipeline.stats.reset()
    assert pipeline.stats.frames == 0 and sum(pipeline.stats.seconds.values()) == 0


def test_device_route_needs_a_tensor_detector(detectors: dict[str, FaceDetector]) -> None:
    with pytest.raises(ValueError, match="detect_tensor"):
        Pipeline(detectors["cv2-yunet"], "cpu", device_route=True)
    assert not Pipeline(detectors["torch-yunet"], "cpu").device_route  # CPU default: host route
    assert Pipeline(detectors["torch-yunet"], "cuda").device_route  # CUDA default: device route


def test_auto_detector_resolves_by_device_and_threads() -> None:
    assert default_detector("cuda:0") == default_detector("cuda", threads=8) == "torch-yunet"
    assert default_detector("cpu", threads=1) == "torch-yunet"
    assert default_detector("cpu", threads=2) == "cv2-yunet"
    det = create("auto", DetectorConfig(weights_dir=WEIGHTS, device="cpu"))
    assert det.name == "torch-yunet"  # this module runs torch on one thread


def test_auto_is_in_the_registry_whoever_imports_it_and_the_pipeline_registers_nothing() -> None:
    """The detector "auto" used to be registered as a side effect of importing the pipeline: a caller
    of ``shared.detectors`` alone (eval, a tool) got "unknown detector 'auto'"."""
    code = f"""
import sys
from shared import detectors
assert "auto" in detectors.available(), detectors.available()
det = detectors.create("auto", detectors.DetectorConfig(weights_dir={str(WEIGHTS)!r}))
assert det.name in ("cv2-yunet", "torch-yunet"), det.name
assert "services.inference.pipeline" not in sys.modules
before = dict(detectors._REGISTRY)
import services.inference.pipeline
assert detectors._REGISTRY == before, "importing the pipeline changed the detector registry"
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr


def test_naive_loop_and_pipeline_give_identical_outputs(classifier: Classifier, jpegs: list[bytes]) -> None:
    """The benchmark's baseline must compute exactly what the pipeline computes, only slower."""
    naive_fig, naive = run_naive(jpegs, classifier, WEIGHTS, 0.6)
    pipe_fig, piped = run_pipeline(jpegs, classifier, "cv2-yunet", WEIGHTS, 0.6, "cpu", 4)
    result = compare(naive, piped)
    assert result["identical"], result
    assert result["faces_compared"] == naive_fig["faces"] == pipe_fig["faces"] > 0


# --------------------------------------------------------------------------------------- in the worker


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    from shared.redis_server import RedisServer, RedisServerError

    try:
        server = RedisServer().start()
    except RedisServerError as exc:
        pytest.skip(f"no redis-server: {exc}")
    yield server.url
    server.stop()


def test_worker_routes_a_mixed_batch_back_to_each_camera_and_seq(
    redis_url: str, tmp_path: Path, jpegs: list[bytes]
) -> None:
    """Three cameras with frames of different sizes, read as one batch by one worker: every result lands
    on its own camera's results stream with its own seq, size and faces."""
    from services.inference.main import build_worker
    from services.inference.settings import InferenceSettings
    from shared import constants as C
    from shared.schema import CameraInfo, Frame, Result
    from shared.streams import connect, ensure_group

    make_classifier(tmp_path / "models")
    cameras = {"cam-a": (640, 480), "cam-b": (320, 240), "cam-c": (800, 600)}
    client = connect(redis_url)
    client.flushdb()
    sent: dict[tuple[str, int], bytes] = {}
    now = time.time()
    for cam in cameras:
        client.hset(C.CAMERAS_KEY, cam, CameraInfo(cam, "test", 15.0, "live", now, now).pack())  # type: ignore[arg-type]
        ensure_group(client, C.frames_stream(cam), C.INFERENCE_GROUP)
    for seq in range(3):  # interleaved, so one read holds every camera
        for k, (cam, size) in enumerate(cameras.items()):
            jpeg = _resized(jpegs[(seq * 3 + k) % len(jpegs)], size)
            frame = Frame(cam, seq, time.time(), size[0], size[1], jpeg)
            client.xadd(C.frames_stream(cam), frame.to_fields())
            sent[(cam, seq)] = jpeg
    settings = InferenceSettings(
        redis_url=redis_url,
        models_dir=tmp_path / "models",
        weights_dir=WEIGHTS,
        detector="cv2-yunet",
        device="cpu",
        batch_size=16,
        max_wait_ms=50,
        worker_name="test-worker",
        staleness_ms=60_000,
    )
    stop = threading.Event()
    worker, models = build_worker(settings, stop)
    models.check()
    batches: list[int] = []
    process = worker.pipeline.process

    def spy(jpegs: list[bytes], *args: Any) -> list[FrameOutput | FrameError]:
        batches.append(len(jpegs))
        return process(jpegs, *args)

    worker.pipeline.process = spy  # type: ignore[method-assign]
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while sum(client.xlen(C.results_stream(c)) for c in cameras) < len(sent):  # type: ignore[misc]
            assert time.monotonic() < deadline, "worker did not answer every frame"
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert max(batches) > 1, f"frames were not batched: {batches}"
    reference = Pipeline(create("cv2-yunet", DetectorConfig(weights_dir=WEIGHTS)), "cpu")
    assert models.current is not None
    seen = set()
    for cam, size in cameras.items():
        for _, fields in client.xrange(C.results_stream(cam)):  # type: ignore[union-attr]
            result = Result.from_fields(fields)
            assert result.camera_id == cam
            # one uncertainty policy: the threshold the worker applied travels with the result
            assert result.model is not None and result.model.uncertain_threshold == 0.6
            assert (result.width, result.height) == size
            key = (cam, result.seq)
            assert key in sent and key not in seen
            seen.add(key)
            alone = _outputs(reference.process([sent[key]], models.current, None))[0]
            np.testing.assert_allclose([f.box for f in result.faces], [f.box for f in alone.faces], atol=1e-3)
            assert [f.label for f in result.faces] == [f.label for f in alone.faces]
    assert seen == set(sent)
