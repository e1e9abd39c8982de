"""Regression tests of issue 11, items 9, 10, 12, 13, 14 and 15: bad data inside Redis (and in the
models folder) must not take anything down.

Real parts throughout: throw-away Redis servers (7 and, where the two differ, 6.2), real workers built
by ``build_worker`` (the real pipeline with cv2-yunet and the YuNet weights in ../shared), the real
viewer app under ``TestClient`` (its lifespan and reader task run), real ``genderlens capture``
processes, real JPEGs (made with OpenCV, or real photos) and real model artifacts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from services.inference.main import build_worker
from services.inference.settings import InferenceSettings
from services.inference.worker import Worker
from services.viewer.app import create_app
from services.viewer.routes.streams import BOUNDARY
from services.viewer.settings import ViewerSettings
from services.viewer.state import Shown
from services.viewer.tracker import TrackedFace
from shared import constants as C
from shared.accounting import Accounting, read_stats, unaccounted
from shared.redis_server import RedisServer
from shared.schema import Event, Frame, Result
from shared.streams import ensure_group
from tests.helpers.artifacts import make_artifact
from tests.helpers.media import bomb
from tests.helpers.media import flat_jpeg as jpeg
from tests.helpers.net import metric_sample
from tests.helpers.paths import WEIGHTS_DIR, require_shared
from tests.helpers.photos import make_photo_folder
from tests.helpers.processes import Services, service_env
from tests.helpers.redis_servers import client_for
from tests.helpers.viewer import camera, make_face, result_for
from tests.helpers.viewer import register_camera as register
from tests.helpers.viewer import viewer_settings as base_viewer_settings
from tests.helpers.waiting import wait_until

MAX_ID = "18446744073709551615-18446744073709551615"


# -- helpers ----------------------------------------------------------------------------------------
def frame_fields(camera_id: str, seq: int, data: bytes, width: int, height: int) -> dict[Any, Any]:
    return Frame(camera_id, seq, time.time(), width, height, data).to_fields()


@pytest.fixture()
def server7(redis7_server: RedisServer) -> RedisServer:
    """A throw-away Redis 7 server (tests/conftest.py)."""
    return redis7_server


@pytest.fixture()
def server(redis_server: RedisServer) -> RedisServer:
    """A throw-away server of each supported Redis version (tests/conftest.py)."""
    return redis_server


def real_worker(server: RedisServer, tmp_path: Path, name: str = "w1", **overrides: Any) -> Worker:
    """A worker as ``genderlens infer`` builds it: real cv2-yunet pipeline, real model manager."""
    require_shared()
    values: dict[str, Any] = {
        "redis_url": server.url,
        "models_dir": tmp_path / "models",
        "weights_dir": WEIGHTS_DIR,
        "detector": "cv2-yunet",
        "device": "cpu",
        "torch_threads": 1,
        "staleness_ms": 60_000,
        "block_ms": 50,
        "max_wait_ms": 0,
        "claim_idle_ms": 1000,
        "cameras_refresh_s": 0.2,
        "worker_name": name,
    }
    values.update(overrides)
    worker, _ = build_worker(InferenceSettings(**values), threading.Event())
    return worker


class Running:
    """``worker.run()`` (the real loop, which survives any error) in a thread."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.thread = threading.Thread(target=worker.run, daemon=True)

    def __enter__(self) -> Worker:
        self.thread.start()
        return self.worker

    def __exit__(self, *exc: object) -> None:
        self.worker.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "worker did not stop"


def events(client: redis.Redis) -> list[Event]:
    return [Event.from_fields(f) for _, f in client.xrange(C.EVENTS_STREAM)]


def viewer_settings(url: str) -> ViewerSettings:
    return base_viewer_settings(url, no_signal_after_s=30.0, stream_fps=20.0)


def metric(client: TestClient, name: str, **labels: str) -> float:
    return metric_sample(client.get("/metrics").text, name, **labels)


def publish_pair(
    client: redis.Redis, camera_id: str, seq: int, result_changes: dict[str, Any] | None = None
) -> Frame:
    """A real frame and a result for it; ``result_changes`` bends the result the way a broken or
    hostile producer would (packed raw, past the schema classes)."""
    data = jpeg(320, 240, shade=seq * 20 % 255)
    frame = Frame(camera_id, seq, time.time(), 320, 240, data)
    entry_id = client.xadd(C.frames_stream(camera_id), frame.to_fields())
    obj = result_for(entry_id.decode(), frame, [make_face((100.0, 60.0, 80.0, 100.0), 0.9)]).to_dict()
    for key, value in (result_changes or {}).items():
        if key.startswith("face."):
            obj["faces"][0][key[5:]] = value
        elif key.startswith("ts."):
            obj["timestamps"][key[3:]] = value
        else:
            obj[key] = value
    client.xadd(C.results_stream(camera_id), {b"m": msgpack.packb(obj, use_bin_type=True)})
    return frame


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"invalid JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


# == item 9: decompression bombs =====================================================================
def test_9_the_viewer_never_decodes_a_bomb(server7: RedisServer) -> None:
    """A 30000x30000 JPEG declared as 640x480 took the viewer to 5.3 GB and its snapshot never
    returned; an honest 8192x8192 one costs 200 MB and half a second per render. Both are refused by
    the schema's header check before they reach the ring buffer: the picture stays the last good
    frame."""
    client = client_for(server7)
    register(client, "cam")
    with TestClient(create_app(viewer_settings(server7.url))) as viewer:
        for seq in range(3):
            client.xadd(C.frames_stream("cam"), frame_fields("cam", seq, jpeg(320, 240), 320, 240))
        wait_until(lambda: (c := camera(viewer, "cam")) and c["status"] == "live", 15, what="camera live")
        view = viewer.app.state.viewer.cameras["cam"]  # type: ignore[attr-defined]
        seen = view.frames_seen
        bad = metric(viewer, "genderlens_viewer_bad_messages_total", kind="frames")
        client.xadd(C.frames_stream("cam"), frame_fields("cam", 3, bomb(30000, 30000), 640, 480))
        client.xadd(C.frames_stream("cam"), frame_fields("cam", 4, bomb(8192, 8192), 8192, 8192))
        wait_until(
            lambda: (
                view.frames_seen
                - seen
                + metric(viewer, "genderlens_viewer_bad_messages_total", kind="frames")
                - bad
                >= 2
            ),
            15,
            what="the viewer to read both bombs",
        )
        assert view.frames_seen == seen, "a bomb reached the ring buffer"
        snap = viewer.get("/cameras/cam/snapshot.jpg")
        assert snap.status_code == 200 and snap.headers["x-genderlens-kind"] == "raw"
        image = cv2.imdecode(np.frombuffer(snap.content, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape[:2] == (240, 320), "the snapshot shows the last good frame"


def test_9_a_worker_refuses_a_tiny_jpeg_declaring_8192x8192_before_decoding(
    server: RedisServer, tmp_path: Path
) -> None:
    """727 bytes declaring 8192x8192 cost a worker 3-7 s each: now dead-lettered from its header."""
    client = client_for(server)
    register(client, "cam")
    worker = real_worker(server, tmp_path)
    acc = Accounting(client)
    data = bomb(8192, 8192)
    assert len(data) < 1000
    bombs = [acc.publish("cam", frame_fields("cam", i, data, 8192, 8192), 100).entry_id for i in range(3)]
    good = acc.publish("cam", frame_fields("cam", 3, jpeg(), 64, 48), 100).entry_id
    with Running(worker):
        wait_until(lambda: unaccounted(read_stats(client, "cam")) == 0, 60, what="all four settled")
    stats = read_stats(client, "cam")
    assert stats[C.STAT_DEAD_LETTERED] == 3 and stats[C.STAT_PROCESSED] == 1, stats
    reasons = {f[b"id"]: f[b"reason"].decode() for _, f in client.xrange(C.DEADLETTER_STREAM)}
    assert set(reasons) == set(bombs) and good not in reasons
    assert all("absurd dimensions 8192x8192" in r for r in reasons.values()), reasons


# == item 10: non-finite numbers and wrong shapes ====================================================
def test_10_results_with_non_finite_numbers_or_wrong_shapes_are_skipped_and_the_viewer_goes_on(
    server7: RedisServer,
) -> None:
    """An infinite box made the snapshot 500 and ended the MJPEG stream; NaN timestamps reached the
    WebSocket as NaN (invalid JSON); a map where a landmark list belongs raised KeyError in the reader.
    Each is now refused by the schema (counted as a bad message) and everything goes on."""
    client = client_for(server7)
    register(client, "cam")
    with TestClient(create_app(viewer_settings(server7.url))) as viewer:
        publish_pair(client, "cam", 0)
        view = wait_until(
            lambda: (v := viewer.app.state.viewer.cameras.get("cam")) and v.shown and v,  # type: ignore[attr-defined]
            15,
            what="a shown result",
        )
        # The counter is the process's: other tests in this run may have counted bad results too.
        bad = metric(viewer, "genderlens_viewer_bad_messages_total", kind="results")
        with viewer.websocket_connect("/ws") as ws:
            publish_pair(client, "cam", 1, {"face.box": [math.inf, 0.0, 10.0, 10.0]})
            publish_pair(client, "cam", 2, {"ts.captured": math.nan, "ts.published": math.nan})
            publish_pair(client, "cam", 3, {"face.landmarks": [{"x": 1.0, "y": 2.0}] * 5})
            publish_pair(client, "cam", 4)
            wait_until(lambda: view.shown.result.seq == 4, 15, what="the good result after the bad ones")
            assert metric(viewer, "genderlens_viewer_bad_messages_total", kind="results") - bad == 3
            snap = viewer.get("/cameras/cam/snapshot.jpg")
            assert snap.status_code == 200 and snap.headers["x-genderlens-seq"] == "4"
            messages = []
            while not any(m.get("type") == "result" and m.get("seq") == 4 for m in messages):
                messages.append(strict_json(ws.receive_text()))  # raises on NaN / Infinity
            assert {m["seq"] for m in messages if m.get("type") == "result"} <= {0, 4}
        response = viewer.get("/cameras/cam/stream.mjpg?max_frames=3")
        parts = [p for p in response.content.split(f"--{BOUNDARY}".encode()) if p.strip()]
        assert len(parts) == 3


def test_10_a_frame_that_fails_to_render_is_skipped_and_counted(server7: RedisServer) -> None:
    """Defence in depth behind the schema: whatever a frame does to the drawing code (here an infinite
    box, as a future bug might let through), that frame is skipped and counted; the snapshot answers
    with the previous picture and the stream goes on."""
    client = client_for(server7)
    register(client, "cam")
    with TestClient(create_app(viewer_settings(server7.url))) as viewer:
        publish_pair(client, "cam", 0)
        state = viewer.app.state.viewer  # type: ignore[attr-defined]
        view = wait_until(lambda: (v := state.cameras.get("cam")) and v.shown and v, 15, what="shown")
        good = viewer.get("/cameras/cam/snapshot.jpg")
        assert good.headers["x-genderlens-kind"] == "shown"
        shown: Shown = view.shown
        bad_face = TrackedFace(1, (math.inf, 0.0, 10.0, 10.0), 0.9, "female", 0.9, "female", 0.9)
        bad_result = dataclasses.replace(shown.result, seq=99)
        view.shown = Shown(shown.frame, bad_result, (bad_face,), shown.received_at)
        view.notify()
        snap = viewer.get("/cameras/cam/snapshot.jpg")
        assert snap.status_code == 200
        assert snap.headers["x-genderlens-kind"] == "skipped"
        assert snap.content == good.content, "the previous picture stays"
        assert metric(viewer, "genderlens_viewer_render_errors_total", camera="cam") == 1
        response = viewer.get("/cameras/cam/stream.mjpg?max_frames=2")
        assert len([p for p in response.content.split(f"--{BOUNDARY}".encode()) if p.strip()]) == 2
        publish_pair(client, "cam", 100)
        wait_until(
            lambda: viewer.get("/cameras/cam/snapshot.jpg").headers["x-genderlens-kind"] == "shown",
            15,
            what="the next good frame drawn",
        )
        assert metric(viewer, "genderlens_viewer_render_errors_total", camera="cam") == 1  # not retried


# == item 12: one camera's bad state stays that camera's problem =====================================
def test_12_a_wrong_typed_stream_key_stalls_only_its_own_camera_in_the_worker(
    server: RedisServer, tmp_path: Path
) -> None:
    """A registry entry whose frames key was a string cut every worker to ~2 frames in 15 s across all
    cameras. Now that camera is set aside (an error event, a metric, its own backoff) and the others
    flow; a stream that turns bad later is set aside the same way."""
    client = client_for(server)
    for cam in ("cam-a", "cam-b", "evil"):
        register(client, cam)
    client.set(C.frames_stream("evil"), "not a stream")
    acc = Accounting(client)
    with Running(real_worker(server, tmp_path)):
        for seq in range(20):
            for cam in ("cam-a", "cam-b"):
                acc.publish(cam, frame_fields(cam, seq, jpeg(), 64, 48), 100)
        wait_until(
            lambda: all(read_stats(client, c)[C.STAT_PROCESSED] == 20 for c in ("cam-a", "cam-b")),
            60,
            what="both good cameras processed in full",
        )
        assert any(e.level == "error" and "evil" in e.message for e in events(client))
        from services.inference.worker import ISOLATED

        assert ISOLATED.labels("evil")._value.get() == 1
        # cam-b's stream turns bad while the worker reads it: cam-a keeps flowing.
        client.delete(C.frames_stream("cam-b"))
        client.set(C.frames_stream("cam-b"), "broken")
        for seq in range(20, 30):
            acc.publish("cam-a", frame_fields("cam-a", seq, jpeg(), 64, 48), 100)
        wait_until(
            lambda: read_stats(client, "cam-a")[C.STAT_PROCESSED] == 30, 60, what="cam-a after cam-b broke"
        )
        wait_until(lambda: any("cam-b" in e.message for e in events(client)), 10, what="cam-b reported")
        # Repaired: cam-b comes back on its own once its backoff expires.
        client.delete(C.frames_stream("cam-b"))
        for seq in range(5):
            acc.publish("cam-b", frame_fields("cam-b", 100 + seq, jpeg(), 64, 48), 100)
        wait_until(
            lambda: read_stats(client, "cam-b")[C.STAT_PROCESSED] == 25, 30, what="cam-b back after repair"
        )


def test_12_a_wrong_typed_key_leaves_the_other_cameras_live_in_the_viewer(server7: RedisServer) -> None:
    """The same bad registry entry made the viewer show every camera as no-signal."""
    client = client_for(server7)
    register(client, "cam-a")
    register(client, "evil")
    client.set(C.frames_stream("evil"), "not a stream")
    stop = threading.Event()

    def feed() -> None:
        seq = 0
        while not stop.is_set():
            publish_pair(client, "cam-a", seq)
            seq += 1
            stop.wait(0.1)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        with TestClient(create_app(viewer_settings(server7.url))) as viewer:
            view = wait_until(
                lambda: (v := viewer.app.state.viewer.cameras.get("cam-a")) and v.results_seen > 10 and v,  # type: ignore[attr-defined]
                20,
                what="cam-a's results flowing",
            )
            seen = view.results_seen
            wait_until(lambda: view.results_seen > seen + 10, 10, what="cam-a still flowing")
            assert camera(viewer, "cam-a")["status"] == "live"  # type: ignore[index]
            assert camera(viewer, "evil")["status"] == "no_signal"  # type: ignore[index]
    finally:
        stop.set()
        feeder.join(5)


def test_12_capture_recovers_from_an_exhausted_stream_id(
    server: RedisServer,
    tmp_path: Path,
    services: Services,
) -> None:
    """An entry with the largest possible id stopped capture for good ("stream has exhausted the last
    possible ID"). The publish script now re-creates the stream and its group, counts the frames that
    were in flight as evicted (the accounting stays exact), and capture carries on."""
    photos = make_photo_folder(tmp_path / "photos", count=3, width=320)
    client = client_for(server)
    services.base_env = service_env(server.url, tmp_path / "models")
    services.capture("capture", photos, "cam", fps=10)

    def published() -> int:
        return read_stats(client, "cam")[C.STAT_PUBLISHED]

    wait_until(lambda: published() >= 5, 60, what="capture publishing")
    client.xadd(C.frames_stream("cam"), {b"m": b"hostile"}, id=MAX_ID)
    before = published()
    wait_until(lambda: published() >= before + 10, 30, what="capture publishing after the exhausted id")
    assert any(e.level == "error" and "exhausted" in e.message for e in events(client))
    assert services.terminate("capture") == 0
    stats = read_stats(client, "cam")
    assert stats[C.STAT_EVICTED] >= 1, stats
    # Nothing read the stream: every published frame is either counted evicted or still in it.
    assert unaccounted(stats) == client.xlen(C.frames_stream("cam")), stats
    groups: Any = client.xinfo_groups(C.frames_stream("cam"))
    assert [g["name"] for g in groups] in ([C.INFERENCE_GROUP.encode()], [C.INFERENCE_GROUP])


def test_12_the_viewer_follows_a_stream_reset_below_its_cursor(server7: RedisServer) -> None:
    """The viewer read the largest-id entry, so its cursor stayed there after the stream was
    re-created: XREAD past the new stream's last id returns nothing, forever."""
    client = client_for(server7)
    register(client, "cam")
    acc = Accounting(client)
    ensure_group(client, C.frames_stream("cam"), C.INFERENCE_GROUP)
    with TestClient(create_app(viewer_settings(server7.url))) as viewer:
        for seq in range(3):
            acc.publish("cam", frame_fields("cam", seq, jpeg(), 64, 48), 100)
        view = wait_until(
            lambda: (v := viewer.app.state.viewer.cameras.get("cam")) and v.frames_seen and v,  # type: ignore[attr-defined]
            15,
            what="frames read",
        )
        client.xadd(C.frames_stream("cam"), {b"m": b"hostile"}, id=MAX_ID)
        wait_until(
            lambda: metric(viewer, "genderlens_viewer_bad_messages_total", kind="frames") >= 1,
            15,
            what="the viewer to read the hostile entry",
        )
        assert acc.publish("cam", frame_fields("cam", 3, jpeg(), 64, 48), 100).reset_lost is not None
        stop = threading.Event()

        def feed() -> None:
            seq = 4
            while not stop.is_set():
                client.set(C.camera_heartbeat_key("cam"), "live", ex=C.CAMERA_HEARTBEAT_TTL_S)
                acc.publish("cam", frame_fields("cam", seq, jpeg(), 64, 48), 100)
                seq += 1
                stop.wait(0.1)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            seen = view.frames_seen
            current = viewer.app.state.viewer.cameras  # type: ignore[attr-defined]
            wait_until(
                lambda: current["cam"].frames_seen > seen + 10, 20, what="frames of the re-created stream"
            )
        finally:
            stop.set()
            feeder.join(5)


# == item 13: unbounded memory =======================================================================
def test_13_dead_letters_keep_the_reason_size_and_hash_not_the_pixels(
    server7: RedisServer, tmp_path: Path
) -> None:
    """60 bad 4 MB frames grew the dead-letter stream to 252 MB (the cap allowed about 80 GiB)."""
    import hashlib

    client = client_for(server7)
    register(client, "cam")
    acc = Accounting(client)
    big = jpeg()[:-2] + b"\x00" * (4 * 1024 * 1024)  # 4 MB, no end-of-image marker: truncated
    fields = frame_fields("cam", 0, big, 64, 48)
    for _ in range(10):
        acc.publish("cam", fields, 100)
    with Running(real_worker(server7, tmp_path)):
        wait_until(lambda: read_stats(client, "cam")[C.STAT_DEAD_LETTERED] == 10, 60, what="dead letters")
    records = [f for _, f in client.xrange(C.DEADLETTER_STREAM)]
    assert len(records) == 10
    for record in records:
        assert b"payload" not in record
        assert b"truncated JPEG" in record[b"reason"]
        assert int(record[b"size"]) > 4 * 1024 * 1024
        assert record[b"sha256"].decode() == hashlib.sha256(fields[b"m"]).hexdigest()
    usage = int(client.memory_usage(C.DEADLETTER_STREAM) or 0)
    assert usage < 64 * 1024, f"dead-letter stream holds {usage} bytes"


def _rewrite_meta(folder: Path, **changes: Any) -> None:
    meta_file = folder / "model.json"
    data = json.loads(meta_file.read_text())
    data.update(changes)
    meta_file.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("arch", "config", "reason"),
    [
        ("gendernet", {"width": 2000}, "width=2000 is outside gendernet's bounds"),
    ],
)
def test_13_an_artifact_asking_for_a_huge_model_is_refused_from_its_metadata(
    tmp_path: Path, arch: str, config: dict[str, Any], reason: str
) -> None:
    """Width 2000 or 3000 ensemble members loaded for 9-39 s and held 1.5-3 GB while frames went stale.
    The bounds each architecture declares are checked when the metadata is read: nothing is built."""
    from services.inference.models import ModelManager
    from shared.models.artifact import ArtifactError, read_meta

    messages: list[str] = []
    manager = ModelManager(tmp_path, "cpu", on_event=lambda level, msg: messages.append(msg))
    good = make_artifact(tmp_path, "v1", "2026-01-01T00:00:00+00:00")
    assert manager.check()
    huge = make_artifact(tmp_path, "v2", "2026-01-02T00:00:00+00:00")
    _rewrite_meta(tmp_path / huge.dirname, arch=arch, arch_config=config)
    with pytest.raises(ArtifactError, match=reason):
        read_meta(tmp_path / huge.dirname)
    assert manager.check() is False
    assert manager.current is not None and manager.current.meta.dirname == good.dirname
    assert reason in messages[-1]


def test_13_the_parameter_bound_covers_architectures_without_declared_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An architecture registered without limits (as new ones may be) is still bounded: the model is
    counted on the meta device, before any memory is allocated or any weights are read."""
    from torch import nn

    from shared.models import archs
    from shared.models.artifact import ArtifactError, count_parameters, load_artifact, read_meta

    def wide(num_classes: int, width: int = 8) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, width), nn.Linear(width, num_classes))

    monkeypatch.setitem(archs.ARCHITECTURES, "test_wide", wide)
    monkeypatch.setitem(archs.ARCH_LIMITS, "test_wide", {})
    meta = make_artifact(tmp_path, "v1", "2026-01-01T00:00:00+00:00")
    folder = tmp_path / meta.dirname
    _rewrite_meta(folder, arch="test_wide", arch_config={"width": 8})
    assert count_parameters(read_meta(folder)) == 3 * 64 * 64 * 8 + 8 + 8 * 2 + 2
    _rewrite_meta(folder, arch="test_wide", arch_config={"width": 1_000_000})  # 12.3e9 parameters
    with pytest.raises(ArtifactError, match="more than 100,000,000"):
        load_artifact(folder)


def test_13_a_symlink_out_of_the_models_dir_is_refused(tmp_path: Path) -> None:
    """A symlink in the models folder made the worker load an artifact from elsewhere."""
    from services.inference.models import ModelManager
    from shared.models.artifact import ArtifactError, current_dir, list_versions, load_artifact

    models, outside = tmp_path / "models", tmp_path / "outside"
    good = make_artifact(models, "v1", "2026-01-01T00:00:00+00:00")
    evil = make_artifact(outside, "evil", "2026-01-02T00:00:00+00:00", make_current=False)
    # 1. a version directory that is a symlink to an artifact outside
    (models / "gendernet-v9").symlink_to(outside / evil.dirname, target_is_directory=True)
    (models / "current").write_text("gendernet-v9\n")
    with pytest.raises(ArtifactError, match="outside"):
        current_dir(models)
    messages: list[str] = []
    manager = ModelManager(models, "cpu", on_event=lambda level, msg: messages.append(msg))
    assert manager.check() is False and manager.current is None and "outside" in messages[-1]
    assert [m.version for m in list_versions(models)] == ["v1"]
    # 2. `current` itself a symlink to a pointer file outside
    (models / "current").unlink()
    (outside / "pointer").write_text(good.dirname + "\n")
    (models / "current").symlink_to(outside / "pointer")
    with pytest.raises(ArtifactError, match="outside"):
        current_dir(models)
    # 3. a file inside a version directory that is a symlink to a file outside
    (models / "current").unlink()
    (models / "current").write_text(good.dirname + "\n")
    weights = models / good.dirname / "model.safetensors"
    weights.unlink()
    weights.symlink_to(outside / evil.dirname / "model.safetensors")
    with pytest.raises(ArtifactError, match="outside"):
        load_artifact(current_dir(models) or models)
    # A models folder that is itself a symlink (a mounted volume) is fine.
    (tmp_path / "linked").symlink_to(outside, target_is_directory=True)
    assert load_artifact(tmp_path / "linked" / evil.dirname).meta.version == "evil"


# == item 14: staleness at publish ===================================================================
class SlowPipeline:
    """The real pipeline, taking ``delay_s`` longer per batch (a contended CPU)."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def process(self, jpegs: list[bytes], classifier: Any, threshold: Any) -> Any:
        time.sleep(self.delay_s)
        return self.inner.process(jpegs, classifier, threshold)


def test_14_a_result_older_than_the_budget_when_its_batch_is_done_is_dropped_and_counted(
    server: RedisServer, tmp_path: Path
) -> None:
    """With 4 cameras at 15 fps on 2 workers, results up to 2.2 s old reached the wall though the
    budget was 500 ms: staleness was checked only at read. Now it holds at publish too, in the same
    once-only settle accounting (dropped_stale, with dropped_stale_publish beside it), and
    /api/stats says so."""
    client = client_for(server)
    register(client, "cam")
    acc = Accounting(client)
    worker = real_worker(server, tmp_path, staleness_ms=1000, batch_size=4)
    worker.pipeline = SlowPipeline(worker.pipeline, 1.5)  # type: ignore[assignment]
    for seq in range(4):  # fresh when the worker reads them (one batch), stale once it is done
        acc.publish("cam", frame_fields("cam", seq, jpeg(), 64, 48), 100)
    with Running(worker):
        wait_until(lambda: unaccounted(read_stats(client, "cam")) == 0, 30, what="all settled")
    stats = read_stats(client, "cam")
    assert stats[C.STAT_PROCESSED] == 0 and client.xlen(C.results_stream("cam")) == 0, stats
    assert stats[C.STAT_DROPPED_STALE] == 4 and stats[C.STAT_DROPPED_STALE_PUBLISH] == 4, stats
    assert stats[C.STAT_PUBLISHED] == (
        stats[C.STAT_PROCESSED]
        + stats[C.STAT_DROPPED_STALE]
        + stats[C.STAT_EVICTED]
        + stats[C.STAT_DEAD_LETTERED]
    )
    with TestClient(create_app(viewer_settings(server.url))) as viewer:
        wait_until(lambda: camera(viewer, "cam"), 15, what="camera known to the viewer")
        row = viewer.get("/api/stats").json()["cameras"]["cam"]
        assert row["dropped_stale"] == 4 and row["dropped_stale_publish"] == 4, row


# == item 15: an evicting Redis ======================================================================
def test_15_every_service_warns_loudly_when_redis_may_evict(
    server: RedisServer,
    tmp_path: Path,
    services: Services,
) -> None:
    """Under allkeys-lru the stats hash was evicted silently (published went from 988 to 50). Capture,
    workers and the viewer now check the policy when they connect: a log line and an error event."""
    client = client_for(server)
    client.config_set("maxmemory-policy", "allkeys-lru")
    photos = make_photo_folder(tmp_path / "photos", count=2, width=320)
    services.base_env = service_env(server.url, tmp_path / "models")
    services.capture("capture", photos, "cam", fps=5)
    worker = real_worker(server, tmp_path)
    with Running(worker), TestClient(create_app(viewer_settings(server.url))):
        wait_until(
            lambda: (
                {"capture cam", "worker w1", "viewer"}
                <= {e.source for e in events(client) if "allkeys-lru" in e.message}
            ),
            30,
            what="an eviction warning from each service",
        )
    assert "maxmemory-policy is 'allkeys-lru'" in services.log("capture")
    assert all(e.level == "error" and "noeviction" in e.message for e in events(client))
    from shared.streams import warn_if_evicting

    client.config_set("maxmemory-policy", "noeviction")
    assert warn_if_evicting(client, "probe") is None  # the policy to use: nothing to say


def test_9_capture_keeps_its_frames_within_the_pixel_bound(tmp_path: Path) -> None:
    """max_width allows 8192: capture also scales a frame into the bound every reader applies, so a
    big camera is downscaled rather than refused by every worker."""
    from services.capture.service import CaptureService
    from services.capture.settings import CaptureSettings
    from shared.schema import MAX_PIXELS
    from shared.sources import parse_source

    (tmp_path / "src").mkdir()
    settings = CaptureSettings(max_width=8192, redis_url=SecretStr("redis://127.0.0.1:1/0"))
    capture = CaptureService(settings, parse_source(str(tmp_path / "src")), "cam", threading.Event())
    for height, width in ((6144, 8192), (8192, 1024), (720, 1280)):
        frame = capture._encode(np.zeros((height, width, 3), np.uint8), 0)
        assert frame is not None
        back = Frame.from_fields(frame.to_fields())
        assert back.width * back.height <= MAX_PIXELS
        assert abs(back.width / back.height - width / height) < 0.01
    assert (back.width, back.height) == (1280, 720)


# == item 14, under overload: compute for the frames that can still make the budget ===================
class PerFramePipeline:
    """The real pipeline, taking ``per_frame_s`` longer per frame (a slow model on a busy CPU: a batch
    costs what its frames cost), and counting the frames it is given."""

    def __init__(self, inner: Any, per_frame_s: float) -> None:
        self.inner, self.per_frame_s = inner, per_frame_s
        self.frames = 0
        self.passes: list[int] = []  # frames per call

    def process(self, jpegs: list[bytes], classifier: Any, threshold: Any) -> Any:
        self.frames += len(jpegs)
        self.passes.append(len(jpegs))
        time.sleep(self.per_frame_s * len(jpegs))
        return self.inner.process(jpegs, classifier, threshold)


def _slow_worker(server: RedisServer, tmp_path: Path, **overrides: Any) -> tuple[Worker, PerFramePipeline]:
    """A real worker whose pipeline takes 0.3 s per frame, under a 2 s budget."""
    worker = real_worker(server, tmp_path, staleness_ms=2000, **overrides)
    slow = PerFramePipeline(worker.pipeline, 0.3)
    worker.pipeline = slow  # type: ignore[assignment]
    return worker, slow


def _results(client: redis.Redis, camera_id: str) -> list[Result]:
    return [Result.from_fields(f) for _, f in client.xrange(C.results_stream(camera_id))]


def _check_equation(stats: dict[str, int]) -> None:
    assert unaccounted(stats) == 0, stats
    assert (
        stats[C.STAT_DROPPED_STALE_PUBLISH] + stats[C.STAT_DROPPED_STALE_PREDICTED]
        <= stats[C.STAT_DROPPED_STALE]
    ), stats


def test_14_an_overloaded_worker_drops_the_hopeless_frames_at_read_and_publishes_the_newest(
    server: RedisServer, tmp_path: Path
) -> None:
    """With the budget enforced at publish, a contended run (4 cameras at 15 fps on 2 workers) put 3-6
    of 1,200 frames on the wall: a worker read the oldest pending frames, spent its compute on frames
    already close to the budget, finished them past it and dropped them all at publish. Now it
    expects a batch to take what recent ones took per frame and processes a camera's newest frames
    first; the older ones, which could not make it, are dropped at read (``dropped_stale_predicted``).
    Here: 8 frames 0.2 s apart, read in one go, 0.3 s per frame, a 2 s budget. Before: all 8 processed
    (2.4 s), all 8 dropped at publish, nothing on the wall."""
    client = client_for(server)
    register(client, "cam")
    acc = Accounting(client)
    worker, slow = _slow_worker(server, tmp_path, batch_size=8)
    acc.publish("cam", frame_fields("cam", 0, jpeg(), 64, 48), 100)
    worker._step()  # a live frame first: the worker has measured its pace, as a running one has
    assert read_stats(client, "cam")[C.STAT_PROCESSED] == 1
    for seq in range(1, 9):  # then a backlog (the worker was busy): 1.4 s to 0 s old when read
        if seq > 1:
            time.sleep(0.2)
        acc.publish("cam", frame_fields("cam", seq, jpeg(shade=seq), 64, 48), 100)
    slow.frames = 0
    worker._step()
    stats = read_stats(client, "cam")
    backlog = [r.seq for r in _results(client, "cam") if r.seq > 0]
    assert stats[C.STAT_PROCESSED] >= 2 and 8 in backlog, (stats, backlog)
    # Frames 1-4 cannot make it even in a batch of their own tail (0.8 s old + 5 frames x 0.3 s):
    # dropped at read, never decoded; the compute went to the newest frames only.
    assert set(backlog) <= {5, 6, 7, 8} and slow.frames <= 4, (backlog, slow.frames)
    assert stats[C.STAT_DROPPED_STALE_PREDICTED] >= 4, stats
    assert stats[C.STAT_PROCESSED] + stats[C.STAT_DROPPED_STALE] == 9, stats
    _check_equation(stats)


def test_14_an_overloaded_worker_reads_past_a_backlog_and_serves_every_camera(
    server7: RedisServer, tmp_path: Path
) -> None:
    """XREADGROUP hands out a stream's oldest entries first (COUNT per stream). A camera with a
    backlog used to get only its oldest frames into the batch (processed, then dropped at publish)
    while its fresh ones waited behind them. Now the worker reads on past the frames that cannot make
    the budget and chooses each camera's newest frame before any camera's second: every camera gets
    its newest frame on the wall, and nothing else is computed."""
    client = client_for(server7)
    for cam in ("a", "b", "c"):
        register(client, cam)
    acc = Accounting(client)
    worker, slow = _slow_worker(server7, tmp_path, batch_size=4)
    acc.publish("b", frame_fields("b", 0, jpeg(), 64, 48), 100)
    worker._step()  # learns its pace
    assert read_stats(client, "b")[C.STAT_PROCESSED] == 1
    for seq in range(10):  # camera a: 10 frames 0.25 s apart (the oldest already past the budget)
        if seq:
            time.sleep(0.25)
        acc.publish("a", frame_fields("a", seq, jpeg(shade=seq), 64, 48), 100)
    acc.publish("b", frame_fields("b", 1, jpeg(), 64, 48), 100)
    acc.publish("c", frame_fields("c", 0, jpeg(), 64, 48), 100)
    slow.frames = 0
    worker._step()
    served = {cam: [r.seq for r in _results(client, cam)] for cam in ("a", "b", "c")}
    assert served == {"a": [9], "b": [0, 1], "c": [0]}, served
    assert slow.frames == 3, slow.frames
    stats = read_stats(client, "a")
    assert stats[C.STAT_DROPPED_STALE] == 9 and stats[C.STAT_DROPPED_STALE_PREDICTED] >= 1, stats
    for cam in ("a", "b", "c"):
        _check_equation(read_stats(client, cam))
    with TestClient(create_app(viewer_settings(server7.url))) as viewer:
        wait_until(lambda: camera(viewer, "a"), 15, what="camera known to the viewer")
        row = viewer.get("/api/stats").json()["cameras"]["a"]
        assert row["dropped_stale_predicted"] == stats[C.STAT_DROPPED_STALE_PREDICTED] >= 1, row


def test_a_pass_of_the_pipeline_never_exceeds_batch_size(server7: RedisServer, tmp_path: Path) -> None:
    """A read takes up to ``batch_size`` frames per camera, so three cameras hand one step three times
    that; every frame that makes the budget is processed, in passes of at most ``batch_size`` (one
    pass of all of them would hold that many decoded frames at once: on a GPU, its memory)."""
    client = client_for(server7)
    for cam in ("a", "b", "c"):
        register(client, cam)
    acc = Accounting(client)
    worker = real_worker(server7, tmp_path, batch_size=2)
    counting = PerFramePipeline(worker.pipeline, 0.0)
    worker.pipeline = counting  # type: ignore[assignment]
    for cam in ("a", "b", "c"):
        for seq in range(2):
            acc.publish(cam, frame_fields(cam, seq, jpeg(shade=seq), 64, 48), 100)
    worker._step()
    assert sum(counting.passes) == 6 and max(counting.passes) <= 2, counting.passes
    for cam in ("a", "b", "c"):
        stats = read_stats(client, cam)
        assert stats[C.STAT_PROCESSED] == 2, stats
        _check_equation(stats)


def test_14_a_worker_that_keeps_up_drops_nothing(server7: RedisServer, tmp_path: Path) -> None:
    """The other side of the above: one camera at 15 fps on an idle worker, every frame processed,
    none dropped by the expected-time check (nor by any other), under the default 500 ms budget."""
    client = client_for(server7)
    register(client, "cam")
    acc = Accounting(client)
    worker = real_worker(server7, tmp_path, staleness_ms=500)
    with Running(worker):
        started = time.monotonic()
        for seq in range(45):  # 3 s at 15 fps
            time.sleep(max(0.0, started + seq / 15 - time.monotonic()))
            acc.publish("cam", frame_fields("cam", seq, jpeg(), 64, 48), 100)
        wait_until(lambda: unaccounted(read_stats(client, "cam")) == 0, 30, what="all settled")
    stats = read_stats(client, "cam")
    assert stats[C.STAT_PROCESSED] == 45 and stats[C.STAT_DROPPED_STALE] == 0, stats
    assert stats[C.STAT_DROPPED_STALE_PREDICTED] == 0, stats
