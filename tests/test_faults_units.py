"""Fault handling in-process and fast: message validation (hypothesis), K-delivery dead-lettering, a
frame that crashes the pipeline, and the model manager refusing broken artifacts."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.inference.models import ModelManager
from services.inference.pipeline import FrameError, FrameOutput
from services.inference.settings import InferenceSettings
from services.inference.worker import Worker, validate
from shared import constants as C
from shared.accounting import Accounting, read_stats, unaccounted
from shared.redis_server import RedisServer
from shared.schema import MAX_MESSAGE_BYTES, Frame, jpeg_size
from tests.helpers.artifacts import CORRUPTIONS, make_artifact, make_corrupt_artifact
from tests.helpers.media import bomb, flat_jpeg
from tests.helpers.redis_servers import client_for

CAM = "unitcam"


JPEG = flat_jpeg()


def _frame(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "schema_version": 1,
        "kind": "frame",
        "camera_id": CAM,
        "seq": 1,
        "captured_at": time.time(),
        "width": 64,
        "height": 48,
        "jpeg": JPEG,
    }
    obj.update(overrides)
    return obj


def _fields(obj: Any) -> dict[bytes, bytes]:
    return {b"m": msgpack.packb(obj, use_bin_type=True)}


# -- validation ---------------------------------------------------------------------------------------
def test_a_good_frame_validates() -> None:
    frame = validate(_fields(_frame()), CAM)
    assert isinstance(frame, Frame) and frame.width == 64
    assert jpeg_size(JPEG) == (64, 48)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"m": b"\xc1not msgpack at all"}, "not msgpack"),
        ({b"x": b"no m field"}, "missing field"),
        (_fields(_frame(schema_version=2)), "schema_version"),
        (_fields(_frame(width=100_000)), "absurd dimensions"),
        (_fields(_frame(width=0)), "absurd dimensions"),
        (_fields(_frame(width=640, height=480)), "declares 640x480"),
        (_fields(_frame(jpeg=JPEG[: len(JPEG) // 2])), "truncated JPEG"),
        (_fields(_frame(jpeg=b"\xff\xd8" + bytes(200) + b"\xff\xd9")), "corrupt JPEG"),
        (_fields(_frame(camera_id="other")), "on unitcam's stream"),
        (_fields(_frame(camera_id="../../etc")), "invalid camera_id"),
        ({b"m": b"\x00" * (MAX_MESSAGE_BYTES + 1)}, "exceeds"),
        (_fields([1, 2, 3]), "not a map"),
    ],
)
def test_each_kind_of_bad_message_gets_a_reason(fields: dict[bytes, bytes], reason: str) -> None:
    result = validate(fields, CAM)
    assert isinstance(result, str) and reason in result


def test_a_jpeg_declaring_absurd_dimensions_is_refused_before_decoding() -> None:
    result = validate(_fields(_frame(jpeg=bomb(60000, 60000))), CAM)
    assert isinstance(result, str) and "absurd JPEG dimensions 60000x60000" in result


@given(cut=st.integers(min_value=0, max_value=len(JPEG) - 1))
def test_every_truncation_of_a_jpeg_is_refused(cut: int) -> None:
    result = validate(_fields(_frame(jpeg=JPEG[:cut])), CAM)
    assert isinstance(result, str)


#: msgpack's integer range
_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_values = st.one_of(
    st.none(), st.booleans(), _ints, st.floats(), st.text(max_size=20), st.binary(max_size=64)
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.one_of(
        st.binary(max_size=512),
        st.dictionaries(st.text(max_size=12), _values, max_size=8).map(lambda d: msgpack.packb(d)),
        st.fixed_dictionaries(
            {
                "schema_version": _ints,
                "kind": st.sampled_from(["frame", "result", ""]),
                "camera_id": st.one_of(st.text(max_size=70), _ints),
                "width": _ints,
                "height": _ints,
                "seq": st.one_of(_ints, st.floats()),
                "jpeg": st.binary(max_size=64),
            }
        ).map(lambda d: msgpack.packb(d, use_bin_type=True)),
    )
)
def test_garbage_never_raises_and_is_never_a_frame(payload: bytes) -> None:
    assert isinstance(validate({b"m": payload}, CAM), str)


# -- the worker against a real Redis -----------------------------------------------------------------
class StubPipeline:
    """Stands in for the detector pipeline: instant, and raises on a chosen JPEG ("poison")."""

    def __init__(self, poison: bytes | None = None) -> None:
        self.poison = poison
        self.calls = 0

    def process(self, jpegs: list[bytes], classifier: Any, threshold: Any) -> list[FrameOutput | FrameError]:
        self.calls += 1
        if self.poison is not None and self.poison in jpegs:
            raise RuntimeError("decoder crashed")
        now = time.time()
        return [FrameOutput(64, 48, (), now, now) for _ in jpegs]


@pytest.fixture()
def server(redis_server: RedisServer) -> RedisServer:
    """A throw-away server of each supported Redis version (tests/conftest.py)."""
    return redis_server


def _worker(server: RedisServer, tmp_path: Path, pipeline: StubPipeline, **overrides: Any) -> Worker:
    values: dict[str, Any] = {
        "redis_url": server.url,
        "claim_idle_ms": 100,
        "staleness_ms": 60_000,
        "max_deliveries": 3,
        "block_ms": 10,
        "max_wait_ms": 0,
        "models_dir": tmp_path / "models",
    }
    values.update(overrides)
    settings_ = InferenceSettings(**values)
    client = client_for(server)
    return Worker(
        settings_, pipeline, ModelManager(tmp_path / "models", "cpu"), threading.Event(), "w1", client
    )  # type: ignore[arg-type]


def _register(client: redis.Redis) -> Accounting:
    client.hset(C.CAMERAS_KEY, CAM, b"x")
    return Accounting(client)


def test_an_entry_is_dead_lettered_after_k_deliveries(server: RedisServer, tmp_path: Path) -> None:
    client = client_for(server)
    acc = _register(client)
    stream = C.frames_stream(CAM)
    from shared.streams import ensure_group

    ensure_group(client, stream, C.INFERENCE_GROUP)
    poison = acc.publish(CAM, _fields(_frame(seq=1)), 100).entry_id
    second = acc.publish(CAM, _fields(_frame(seq=2)), 100).entry_id
    # Workers that died holding them: the poison one was delivered 3 times, the other once.
    client.xreadgroup(C.INFERENCE_GROUP, "ghost", {stream: ">"}, count=2)
    for _ in range(2):
        client.xclaim(stream, C.INFERENCE_GROUP, "ghost", 0, [poison])
    time.sleep(0.2)  # idle past claim_idle_ms
    worker = _worker(server, tmp_path, StubPipeline())
    for _ in range(3):
        worker._step()
    stats = read_stats(client, CAM)
    assert stats[C.STAT_DEAD_LETTERED] == 1 and stats[C.STAT_PROCESSED] == 1, stats
    assert unaccounted(stats) == 0
    (record,) = [fields for _, fields in client.xrange(C.DEADLETTER_STREAM)]
    assert record[b"id"] == poison and b"gave up after 3 deliveries" in record[b"reason"]
    assert client.xpending(stream, C.INFERENCE_GROUP)["pending"] == 0
    assert second  # processed (stub pipeline), counted above


def test_a_frame_that_crashes_the_pipeline_is_dead_lettered_alone(
    server: RedisServer, tmp_path: Path
) -> None:
    client = client_for(server)
    acc = _register(client)
    bad = flat_jpeg(64, 48)[:-2] + b"\x00\x00\xff\xd9"  # valid headers, still a JPEG to validation
    ids = [
        acc.publish(CAM, _fields(_frame(seq=i, jpeg=bad if i == 2 else JPEG)), 100).entry_id for i in range(5)
    ]
    worker = _worker(server, tmp_path, StubPipeline(poison=bad), batch_size=8)
    worker._refresh_cameras()
    for _ in range(3):
        worker._step()
    stats = read_stats(client, CAM)
    assert stats[C.STAT_PROCESSED] == 4 and stats[C.STAT_DEAD_LETTERED] == 1, stats
    (record,) = [fields for _, fields in client.xrange(C.DEADLETTER_STREAM)]
    assert record[b"id"] == ids[2] and b"processing failed: RuntimeError" in record[b"reason"]


def test_stale_frames_are_dropped_not_processed(server: RedisServer, tmp_path: Path) -> None:
    client = client_for(server)
    acc = _register(client)
    pipeline = StubPipeline()
    worker = _worker(server, tmp_path, pipeline, staleness_ms=50)
    worker._refresh_cameras()
    for i in range(3):
        acc.publish(CAM, _fields(_frame(seq=i)), 100)
    time.sleep(0.15)
    worker._step()
    stats = read_stats(client, CAM)
    assert stats[C.STAT_DROPPED_STALE] == 3 and pipeline.calls == 0


class _Recorder:
    """A ``WorkerObserver`` that keeps what it is told."""

    def __init__(self) -> None:
        self.reads: list[tuple[list[bytes], float, float]] = []
        self.handled: list[tuple[int, float, float]] = []

    def on_read(self, entries: Any, started: float, finished: float) -> None:
        self.reads.append(([e.entry_id for e in entries], started, finished))

    def on_handled(self, entries: int, seconds: float, pipeline_seconds: float) -> None:
        self.handled.append((entries, seconds, pipeline_seconds))


def test_an_observer_sees_every_read_and_batch_and_changes_nothing(
    server: RedisServer, tmp_path: Path
) -> None:
    """The hooks the benchmark times the worker with (instead of patching its methods)."""
    client = client_for(server)
    acc = _register(client)
    ids = [acc.publish(CAM, _fields(_frame(seq=i)), 100).entry_id for i in range(5)]
    worker = _worker(server, tmp_path, StubPipeline(), batch_size=8)
    observer = _Recorder()
    worker.observer = observer
    worker._refresh_cameras()
    before = time.time()
    worker._step()
    (read,) = observer.reads
    assert read[0] == ids and before <= read[1] <= read[2] <= time.time()
    (handled,) = observer.handled
    assert handled[0] == 5 and handled[1] >= handled[2] >= 0
    stats = read_stats(client, CAM)
    assert stats[C.STAT_PROCESSED] == 5 and unaccounted(stats) == 0
    worker._step()  # nothing left to read: nothing to report
    assert len(observer.reads) == 1 and len(observer.handled) == 1


# -- model manager ------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_broken_artifact_is_refused_and_the_previous_keeps_serving(tmp_path: Path, how: str) -> None:
    events: list[tuple[str, str]] = []
    manager = ModelManager(tmp_path, "cpu", on_event=lambda level, msg: events.append((level, msg)))
    good = make_artifact(tmp_path, "v1", "2026-01-01T00:00:00+00:00")
    assert manager.check() and manager.current is not None
    broken = make_corrupt_artifact(tmp_path, "v2", "2026-01-02T00:00:00+00:00", how)
    assert manager.check() is False
    assert manager.current is not None and manager.current.meta.dirname == good.dirname
    assert events[-1][0] == "error" and broken.dirname in events[-1][1]
    assert manager.check() is False and len(events) == 2  # refused once, not at every poll
    newer = make_artifact(tmp_path, "v3", "2026-01-03T00:00:00+00:00")
    assert manager.check() is True and manager.current.meta.dirname == newer.dirname


def test_a_bad_pointer_is_reported_once(tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []
    manager = ModelManager(tmp_path, "cpu", on_event=lambda level, msg: events.append((level, msg)))
    (tmp_path / "current").write_text("../etc\n")
    assert manager.check() is False and manager.check() is False
    assert len(events) == 1 and events[0][0] == "error"


def test_a_model_event_wakes_the_model_manager(server: RedisServer, tmp_path: Path) -> None:
    from shared.schema import ModelEvent

    client = client_for(server)
    worker = _worker(server, tmp_path, StubPipeline())
    old = ModelEvent(name="gendernet", version="v8", path="gendernet-v8", at=time.time())
    client.xadd(C.MODEL_EVENTS_STREAM, old.to_fields())
    worker._poll_model_events()
    worker._poll_model_events()
    assert not worker.models._wake.is_set()  # nothing new since the worker started
    event = ModelEvent(name="gendernet", version="v9", path="gendernet-v9", at=time.time())
    client.xadd(C.MODEL_EVENTS_STREAM, event.to_fields())
    worker._poll_model_events()
    assert worker.models._wake.is_set()
    worker.models._wake.clear()
    worker._poll_model_events()  # the same event is not seen twice
    assert not worker.models._wake.is_set()


def test_a_slow_spell_never_stops_an_overload_aware_worker_for_good(
    server: RedisServer, tmp_path: Path
) -> None:
    """The worker drops at read the frames it expects to miss the staleness budget, from the time
    recent batches took. One very slow batch (a stall, a swap) must not make it expect every frame to
    miss, and so never process (nor measure) again: the estimate is bounded to half the budget per
    frame, a fresh frame is always tried, and fast batches bring the estimate back down."""
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    acc = _register(client)
    worker = _worker(server, tmp_path, StubPipeline(), staleness_ms=1000)
    worker._refresh_cameras()
    worker.expected.observe(1, 60.0)  # a batch of one took a minute
    assert worker.expected.per_frame_ms() == 500
    for i in range(20):
        acc.publish(CAM, _fields(_frame(seq=i)), 100)
        worker._step()
    stats = read_stats(client, CAM)
    assert stats[C.STAT_PROCESSED] == 20 and stats[C.STAT_DROPPED_STALE] == 0, stats
    assert worker.expected.per_frame_ms() < 50  # back down (the stub is instant)
