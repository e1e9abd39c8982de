"""API tests of the viewer: ``with TestClient(app)`` (the lifespan and its reader task run) against the
real Redis (database 13), real JPEG frames made from real face photos, results published with the
schema classes as workers do."""

from __future__ import annotations

import importlib.metadata
import json
import threading
import time
from typing import Any

import cv2
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError
from starlette.websockets import WebSocketDisconnect

from services.viewer.app import create_app
from services.viewer.routes.streams import BOUNDARY
from services.viewer.settings import ViewerSettings
from shared import constants as C
from shared.schema import CameraRequest, Event, SchemaError
from tests.helpers.photos import detect_faces, photo_jpeg, photo_paths, sharpness
from tests.helpers.viewer import (
    CuttableProxy,
    camera,
    make_face,
    publish_frame,
    publish_result,
    register_camera,
    viewer_settings,
)
from tests.helpers.waiting import wait_until


def settings(**overrides: Any) -> ViewerSettings:
    """The viewer under test: quick to show "no signal" (2 s), streams at up to 20 fps."""
    return viewer_settings(**{"no_signal_after_s": 2.0, "stream_fps": 20.0, **overrides})


class Feeder:
    """Plays a camera and (optionally) a worker: real photos as frames at ~10 fps, each with a result
    carrying the faces YuNet finds in that photo."""

    def __init__(self, r: redis.Redis, camera_id: str, n_photos: int = 2, results: bool = True) -> None:
        self.r, self.camera_id, self.results = r, camera_id, results
        self.photos = [photo_jpeg(p) for p in photo_paths(n_photos)]
        self.boxes = [detect_faces(jpeg) for jpeg, _, _ in self.photos]
        self.stop = threading.Event()
        self.beat = True  #: refresh the camera heartbeat (False: play a dead capture process)
        self.seq = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Feeder:
        register_camera(self.r, self.camera_id)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)

    def _run(self) -> None:
        while not self.stop.is_set():
            i = (self.seq // 10) % len(self.photos)  # each photo for ~1 s, like a slideshow
            jpeg, w, h = self.photos[i]
            entry_id, frame = publish_frame(self.r, self.camera_id, self.seq, jpeg, w, h)
            if self.results:
                p = 0.9 if i % 2 == 0 else 0.1
                publish_result(self.r, entry_id, frame, [make_face(b, p) for b in self.boxes[i]])
            if self.seq % 10 == 0 and self.beat:
                self.r.set(C.camera_heartbeat_key(self.camera_id), "live", ex=C.CAMERA_HEARTBEAT_TTL_S)
            self.seq += 1
            self.stop.wait(0.1)


def decode(jpeg: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


# -- schema ------------------------------------------------------------------------------------------
def test_camera_request_round_trip() -> None:
    request = CameraRequest(action="add", camera_id="lobby", source="rtsp://cam/1", at=123.5)
    assert CameraRequest.from_fields(request.to_fields()) == request
    remove = CameraRequest(action="remove", camera_id="lobby", source="", at=1.0)
    assert CameraRequest.from_fields(remove.to_fields()) == remove
    for bad in (
        CameraRequest(action="explode", camera_id="lobby", source="x", at=1.0),
        CameraRequest(action="add", camera_id="../etc", source="x", at=1.0),
        CameraRequest(action="add", camera_id="lobby", source=" ", at=1.0),
    ):
        with pytest.raises(SchemaError):
            CameraRequest.from_fields(bad.to_fields())
    with pytest.raises(SchemaError):
        CameraRequest.from_fields({b"m": b"\x93garbage"})


def test_refuses_to_bind_off_localhost_without_a_token() -> None:
    with pytest.raises(ValidationError, match="without GENDERLENS_VIEWER_TOKEN"):
        ViewerSettings(host="0.0.0.0", viewer_token=None)
    assert ViewerSettings(host="0.0.0.0", viewer_token=SecretStr("s3cret-viewer-token")).host == "0.0.0.0"
    import argparse

    from services.viewer.main import load_settings

    with pytest.raises(SystemExit, match="without GENDERLENS_VIEWER_TOKEN"):
        load_settings(argparse.Namespace(host="0.0.0.0", port=None, redis_url=None, blur_faces=None))


# -- live API ----------------------------------------------------------------------------------------
def test_cameras_latest_snapshot_and_stream(rdb: redis.Redis) -> None:
    with Feeder(rdb, "cam-a") as feeder, TestClient(create_app(settings())) as client:
        cam = wait_until(
            lambda: (c := camera(client, "cam-a")) and c["status"] == "live" and c["faces"] and c
        )
        for key in ("id", "source", "fps", "last_frame_age_ms", "faces", "status", "latency_ms"):
            assert key in cam
        assert cam["faces"] >= 1 and cam["last_frame_age_ms"] < 2000
        wait_until(lambda: camera(client, "cam-a")["fps"] > 3, what="fps measured")

        latest = client.get("/api/cameras/cam-a/latest").json()
        assert latest["seq"] >= 0 and latest["faces"] and latest["tracks"]
        assert latest["tracks"][0]["label"] in ("female", "male", "uncertain")
        assert set(latest["stages_ms"]) >= {"queue", "detect", "classify", "publish", "total"}

        snap = client.get("/cameras/cam-a/snapshot.jpg")
        assert snap.status_code == 200 and snap.headers["content-type"] == "image/jpeg"
        assert snap.headers["x-genderlens-kind"] == "shown"
        assert decode(snap.content).shape[1] == 480

        response = client.get("/cameras/cam-a/stream.mjpg?max_frames=3")
        assert response.headers["content-type"].startswith("multipart/x-mixed-replace")
        parts = [p for p in response.content.split(f"--{BOUNDARY}".encode()) if p.strip()]
        assert len(parts) == 3
        for part in parts:
            head, _, body = part.partition(b"\r\n\r\n")
            assert b"image/jpeg" in head
            decode(body.rstrip(b"\r\n"))
        assert feeder.seq > 0


def test_without_results_the_stream_shows_raw_frames_not_a_frozen_one(rdb: redis.Redis) -> None:
    with Feeder(rdb, "cam-raw", results=False), TestClient(create_app(settings())) as client:
        wait_until(lambda: camera(client, "cam-raw")["status"] == "live")
        first = client.get("/cameras/cam-raw/snapshot.jpg")
        assert first.headers["x-genderlens-kind"] == "raw"
        # the picture keeps moving: the slideshow changes photo every second
        wait_until(
            lambda: client.get("/cameras/cam-raw/snapshot.jpg").content != first.content,
            what="a newer raw frame",
        )
        assert camera(client, "cam-raw")["inference"] is False


def test_no_signal_when_heartbeat_is_gone_or_frames_stop(rdb: redis.Redis) -> None:
    with TestClient(create_app(settings())) as client:
        with Feeder(rdb, "cam-x"):
            wait_until(lambda: camera(client, "cam-x")["status"] == "live")
        # frames stopped: no signal after no_signal_after_s (2 s), with a placeholder, not the last frame
        wait_until(lambda: camera(client, "cam-x")["status"] == "no_signal", timeout=5)
        assert client.get("/cameras/cam-x/snapshot.jpg").headers["x-genderlens-kind"] == "no_signal"
        with Feeder(rdb, "cam-x") as feeder:
            wait_until(lambda: camera(client, "cam-x")["status"] == "live")
            feeder.beat = False
            rdb.delete(C.camera_heartbeat_key("cam-x"))
            # heartbeat gone (capture dead) -> no signal at the next refresh, though frames just came
            feeder_beat = time.monotonic()
            wait_until(lambda: camera(client, "cam-x")["status"] == "no_signal", timeout=3)
            assert time.monotonic() - feeder_beat < 3


def test_camera_ids_are_validated_everywhere(rdb: redis.Redis) -> None:
    with TestClient(create_app(settings())) as client:
        for path in (
            "/cameras/BAD/stream.mjpg",
            "/cameras/a%2F..%2Fb/snapshot.jpg",
            "/api/cameras/x*y/latest",
            "/api/cameras/..%2F..%2Fetc/latest",
        ):
            assert client.get(path).status_code in (404, 422), path
        assert client.get("/cameras/nope/stream.mjpg").status_code == 404
        assert client.get("/api/cameras/nope/latest").status_code == 404
        assert client.delete("/api/cameras/Bad Id").status_code == 422
        assert client.delete("/api/cameras/nope").status_code == 404
        r = client.post("/api/cameras", json={"source": "0", "camera_id": "a:b*"})
        assert r.status_code == 422
        assert rdb.xlen(C.CAMERA_REQUESTS_STREAM) == 0


def test_add_and_remove_camera_requests(rdb: redis.Redis, tmp_path: Any) -> None:
    folder = tmp_path / "clip"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.jpg"), np.full((40, 60, 3), 128, np.uint8))  # a folder capture can play
    folder = folder.resolve()  # requests carry the checked, resolved path
    with TestClient(create_app(settings(source_dirs=[tmp_path]))) as client:
        r = client.post("/api/cameras", json={"source": str(folder), "camera_id": "door"})
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["camera_id"] == "door" and body["action"] == "add"
        [(entry_id, fields)] = rdb.xrange(C.CAMERA_REQUESTS_STREAM)
        request = CameraRequest.from_fields(fields)
        assert (request.action, request.camera_id, request.source) == ("add", "door", str(folder))
        assert entry_id.decode() == body["request_id"]
        # id derived from the source when not given
        r = client.post("/api/cameras", json={"source": str(folder)})
        assert r.status_code == 202 and r.json()["camera_id"] == "clip"
        # a source that is not one
        r = client.post("/api/cameras", json={"source": str(tmp_path / "missing.mp4")})
        assert r.status_code == 422

        with Feeder(rdb, "door"):
            wait_until(lambda: camera(client, "door"))
            assert (
                client.post("/api/cameras", json={"source": str(folder), "camera_id": "door"}).status_code
                == 409
            )
            r = client.delete("/api/cameras/door")
            assert r.status_code == 202
            assert camera(client, "door") is None
            assert not rdb.hexists(C.CAMERAS_KEY, "door")
            assert not rdb.exists(C.camera_heartbeat_key("door"))
            last = CameraRequest.from_fields(rdb.xrevrange(C.CAMERA_REQUESTS_STREAM, count=1)[0][1])
            assert (last.action, last.camera_id) == ("remove", "door")

    with TestClient(create_app(settings(allow_camera_control=False))) as client:
        assert client.post("/api/cameras", json={"source": str(folder)}).status_code == 403


def test_stats_pending_workers_and_refused_model(rdb: redis.Redis) -> None:
    register_camera(rdb, "cam-s")
    jpeg, w, h = photo_jpeg(photo_paths(1)[0])
    for seq in range(3):
        publish_frame(rdb, "cam-s", seq, jpeg, w, h)
    rdb.hset(C.stats_key("cam-s"), mapping={"published": 3, "processed": 1, "dropped_stale": 1})
    rdb.xgroup_create(C.frames_stream("cam-s"), C.INFERENCE_GROUP, id="0")
    rdb.xreadgroup(C.INFERENCE_GROUP, "w1", {C.frames_stream("cam-s"): ">"}, count=2)  # 2 pending
    rdb.hset(C.worker_key("w1"), mapping={"name": "w1", "model": "m-1", "processed": 7, "at": time.time()})
    rdb.expire(C.worker_key("w1"), 10)
    refused = Event("error", "w1", "refused model m-2: bad checksum; still serving m-1", time.time())
    rdb.xadd(C.EVENTS_STREAM, refused.to_fields())
    with TestClient(create_app(settings())) as client:
        wait_until(lambda: camera(client, "cam-s"))
        stats = client.get("/api/stats").json()
        assert stats["cameras"]["cam-s"] == {
            "published": 3,
            "processed": 1,
            "dropped_stale": 1,
            "evicted": 0,
            "dead_lettered": 0,
            "publish_failed": 0,
            "dropped_stale_publish": 0,
            "dropped_stale_predicted": 0,
            "pending": 2,
        }
        assert [w["name"] for w in stats["workers"]] == ["w1"]
        assert stats["workers"][0]["processed"] == 7
        assert stats["model"]["refused"]["message"].startswith("refused model m-2")
        events = client.get("/api/events").json()
        assert events[-1]["message"].startswith("refused model")


def test_token_protects_pages_streams_api_and_websocket(rdb: redis.Redis) -> None:
    token = "s3cret-token-for-tests"
    with Feeder(rdb, "cam-t"), TestClient(create_app(settings(viewer_token=SecretStr(token)))) as client:
        page = client.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 401 and 'name="token"' in page.text
        assert client.get("/api/cameras").status_code == 401
        assert client.get("/cameras/cam-t/stream.mjpg?max_frames=1").status_code == 401
        assert client.get("/docs").status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/healthz").status_code == 200
        with pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws") as ws:
            ws.receive_text()
        bearer = {"Authorization": f"Bearer {token}"}
        assert client.get("/api/cameras", headers={"Authorization": "Bearer wrong"}).status_code == 401
        wait_until(lambda: camera_with(client, bearer, "cam-t"))
        assert client.get("/cameras/cam-t/stream.mjpg?max_frames=1", headers=bearer).status_code == 200

        bad = client.post("/login", data={"token": "nope"}, follow_redirects=False)
        assert bad.status_code == 401 and "Wrong token" in bad.text
        good = client.post("/login", data={"token": token, "next": "//evil.example"}, follow_redirects=False)
        assert good.status_code == 303 and good.headers["location"] == "/"
        cookie = good.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert token not in cookie  # the cookie holds a derived value, never the token
        # the client keeps the cookie now
        assert client.get("/", headers={"Accept": "text/html"}).status_code == 200
        assert client.get("/api/cameras").status_code == 200
        with client.websocket_connect("/ws") as ws:
            assert json.loads(ws.receive_text())["type"] == "stats"


def camera_with(client: TestClient, headers: dict[str, str], camera_id: str) -> bool:
    r = client.get("/api/cameras", headers=headers)
    return r.status_code == 200 and any(c["id"] == camera_id for c in r.json())


def test_websocket_pushes_stats_and_results(rdb: redis.Redis) -> None:
    with Feeder(rdb, "cam-w"), TestClient(create_app(settings())) as client:
        wait_until(lambda: camera(client, "cam-w"))
        with client.websocket_connect("/ws") as ws:
            kinds: dict[str, dict[str, Any]] = {}
            deadline = time.monotonic() + 10
            while len(kinds) < 2 and time.monotonic() < deadline:
                message = json.loads(ws.receive_text())
                kinds.setdefault(message["type"], message)
        stats, result = kinds["stats"], kinds["result"]
        assert stats["redis"] == "ok" and any(c["id"] == "cam-w" for c in stats["cameras"])
        assert {"faces", "female", "male", "uncertain"} <= set(stats["totals"])
        assert result["camera"] == "cam-w" and result["faces"]
        assert result["faces"][0]["track_id"] >= 1
        assert set(result["stages_ms"]) >= {"queue", "detect", "classify", "publish", "total"}
        assert result["model"] == {"name": "test", "version": "v1"}


def shown_snapshot(client: TestClient, camera_id: str, query: str = "") -> bytes:
    """The current annotated picture, once it is a frame paired with its result (not a placeholder)."""
    kinds: list[str] = []

    def get() -> bytes | None:
        r = client.get(f"/cameras/{camera_id}/snapshot.jpg{query}")
        kinds.append(r.headers["x-genderlens-kind"])
        return r.content if kinds[-1] == "shown" else None

    try:
        return wait_until(get, timeout=5)  # type: ignore[no-any-return]
    except AssertionError as exc:
        raise AssertionError(f"snapshot kinds seen: {kinds[-10:]}") from exc


def test_blur_smears_face_boxes_only(rdb: redis.Redis) -> None:
    with Feeder(rdb, "cam-b", n_photos=1), TestClient(create_app(settings())) as plain_client:
        wait_until(lambda: camera(plain_client, "cam-b")["faces"])
        boxes = [t["box"] for t in plain_client.get("/api/cameras/cam-b/latest").json()["tracks"]]
        assert boxes
        plain = decode(shown_snapshot(plain_client, "cam-b"))
        with TestClient(create_app(settings(blur_faces=True))) as blur_client:
            wait_until(lambda: camera(blur_client, "cam-b")["faces"])
            blurred = decode(shown_snapshot(blur_client, "cam-b"))
        # ?blur=1 can add blurring on a viewer without the setting
        asked = decode(shown_snapshot(plain_client, "cam-b", "?blur=1"))
    x, y, w, h = (int(v) for v in boxes[0])
    inner = (
        slice(y + h // 4, y + 3 * h // 4),
        slice(x + w // 4, x + 3 * w // 4),
    )  # inside, off the drawn box
    assert sharpness(blurred[inner]) < 0.2 * sharpness(plain[inner])
    assert sharpness(asked[inner]) < 0.2 * sharpness(plain[inner])
    # the rest of the picture is untouched (bottom rows, below the face and the overlay text)
    outside = (slice(plain.shape[0] - 40, plain.shape[0] - 5), slice(0, plain.shape[1]))
    if y + h * 1.3 < plain.shape[0] - 40:
        assert (
            abs(sharpness(blurred[outside]) - sharpness(plain[outside])) < 0.2 * sharpness(plain[outside]) + 5
        )


def test_malformed_messages_are_skipped(rdb: redis.Redis) -> None:
    with Feeder(rdb, "cam-m"), TestClient(create_app(settings())) as client:
        wait_until(lambda: camera(client, "cam-m")["status"] == "live")
        rdb.xadd(C.frames_stream("cam-m"), {b"m": b"\xc1not msgpack"})
        rdb.xadd(C.results_stream("cam-m"), {b"x": b"1"})
        rdb.hset(C.CAMERAS_KEY, "Bad Id", b"junk")
        rdb.hset(C.CAMERAS_KEY, "junk-cam", b"junk")
        time.sleep(1.5)
        cams = client.get("/api/cameras").json()
        assert [c["id"] for c in cams] == ["cam-m"] and cams[0]["status"] == "live"
        assert "genderlens_viewer_bad_messages_total" in client.get("/metrics").text


def test_ops_endpoints(rdb: redis.Redis) -> None:
    with Feeder(rdb, "cam-o"), TestClient(create_app(settings())) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        wait_until(lambda: client.get("/readyz").status_code == 200)
        wait_until(lambda: camera(client, "cam-o"))
        client.get("/cameras/cam-o/stream.mjpg?max_frames=2")
        metrics = client.get("/metrics").text
        for name in (
            "genderlens_viewer_frames_total",
            "genderlens_viewer_latency_seconds_bucket",
            "genderlens_viewer_served_frames_total",
            "genderlens_viewer_redis_up",
        ):
            assert name in metrics
        spec = client.get("/openapi.json").json()
        for path in ("/api/cameras", "/api/cameras/{camera_id}/latest", "/api/stats", "/api/model"):
            assert path in spec["paths"]
        assert client.get("/docs").status_code == 200
        assert client.get("/").status_code == 200


def test_openapi_describes_every_reply() -> None:
    """/docs described almost nothing: one route had a response model, the others said "any object".
    Every JSON reply (errors included) now has a schema that names its fields, every route that
    takes a camera id documents 404 and 422, and the API's version is the package's."""
    spec = create_app(settings()).openapi()
    assert spec["info"]["version"] == importlib.metadata.version("genderlens")
    components = spec["components"]["schemas"]

    def described(schema: dict[str, Any]) -> bool:
        if "$ref" in schema:
            target = components[schema["$ref"].rsplit("/", 1)[-1]]
            return bool(target.get("properties")) and all(described(v) for v in target["properties"].values())
        if "anyOf" in schema:
            return all(described(s) for s in schema["anyOf"] if s.get("type") != "null")
        if schema.get("type") == "array":
            return described(schema.get("items", {}))
        if schema.get("type") == "object":  # a map (counts, probabilities): its values must be typed
            values = schema.get("additionalProperties")
            return isinstance(values, dict) and described(values)
        return bool(schema.get("type") or schema.get("enum") or schema.get("const"))

    json_replies = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            replies = operation["responses"]
            assert any(code.startswith("2") for code in replies), (method, path)
            if "{camera_id}" in path:
                assert {"404", "422"} <= set(replies), (method, path)
            for code, reply in replies.items():
                assert reply.get("description"), (method, path, code)
                for media, body in reply.get("content", {}).items():
                    if "json" in media:
                        assert described(body.get("schema", {})), (method, path, code, body)
                        json_replies += 1
    assert json_replies >= 20
    # The routes that reach Redis say they can answer 503.
    for path, method in (
        ("/api/stats", "get"),
        ("/api/cameras", "post"),
        ("/api/cameras/{camera_id}", "delete"),
    ):
        assert "503" in spec["paths"][path][method]["responses"], path


def test_redis_outage_shows_reconnecting_then_recovers(rdb: redis.Redis, tmp_path: Any) -> None:
    proxy = CuttableProxy()
    proxy.start()
    folder = tmp_path / "slides"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.jpg"), np.full((48, 64, 3), 128, np.uint8))
    try:
        with (
            Feeder(rdb, "cam-r"),
            TestClient(
                create_app(settings(redis_url=SecretStr(proxy.url), source_dirs=[tmp_path]))
            ) as client,
        ):
            wait_until(lambda: camera(client, "cam-r")["status"] == "live")
            proxy.cut()
            wait_until(lambda: camera(client, "cam-r")["status"] == "reconnecting", timeout=8)
            assert client.get("/readyz").status_code == 503
            assert client.get("/cameras/cam-r/snapshot.jpg").headers["x-genderlens-kind"] == "reconnecting"
            # Every route that needs Redis answers 503 (one handler), not 500.
            for response in (
                client.get("/api/stats"),
                client.post("/api/cameras", json={"source": str(folder), "camera_id": "cam-new"}),
                client.delete("/api/cameras/cam-r"),
            ):
                assert response.status_code == 503, (response.request.method, response.text)
                assert response.json()["detail"].startswith("redis unavailable")
            proxy.restore()
            wait_until(lambda: camera(client, "cam-r")["status"] == "live", timeout=12)
            assert client.get("/readyz").status_code == 200
    finally:
        proxy.cut()


def test_counts_go_to_zero_when_results_stop(rdb: redis.Redis) -> None:
    """With 0 workers the page kept showing the last counts as if they were current."""
    with Feeder(rdb, "cam-z") as feeder, TestClient(create_app(settings())) as client:
        wait_until(lambda: (c := camera(client, "cam-z")) and c["faces"] >= 1 and c["inference"])
        feeder.results = False  # the last worker went away; frames keep coming
        cam = wait_until(lambda: (c := camera(client, "cam-z")) and not c["inference"] and c, timeout=8)
        assert cam["status"] == "live" and cam["faces"] == 0 and cam["counts"]["female"] == 0
        with client.websocket_connect("/ws") as ws:
            stats = json.loads(ws.receive_text())
        assert stats["totals"]["faces"] == 0
