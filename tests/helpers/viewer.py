"""The viewer under test: its settings for ``TestClient``, a real ``genderlens view`` process, and the
frames, results and cameras it reads, written to Redis exactly as capture and workers write them.

The viewer tests own database 13 of the test Redis (flushed before and after each test, see the
``rdb`` fixture in tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any

import httpx
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from services.viewer.settings import ViewerSettings
from shared import constants as C
from shared.schema import CameraInfo, Face, Frame, ModelRef, Result, Timestamps
from tests.helpers.net import free_port
from tests.helpers.paths import REPO
from tests.helpers.processes import genderlens
from tests.helpers.redis_servers import VIEWER_DB, VIEWER_REDIS_URL, connect_or_skip
from tests.helpers.waiting import wait_until

REDIS_DB, REDIS_URL = VIEWER_DB, VIEWER_REDIS_URL
_PARTS = redis.connection.parse_url(REDIS_URL)
REDIS_HOST, REDIS_PORT = str(_PARTS.get("host", "127.0.0.1")), int(_PARTS.get("port", 6379))
TEST_MODEL = ModelRef("test", "v1")
ARTIFACTS = REPO / "test-artifacts"


def redis_or_skip() -> redis.Redis:
    """A client of the viewer tests' database (not flushed); the test skips without a Redis."""
    return connect_or_skip(REDIS_URL)


def viewer_settings(redis_url: str | SecretStr = REDIS_URL, **overrides: Any) -> ViewerSettings:
    """Settings for the viewer app under ``TestClient``: no token, no blur, and TestClient's Host
    ("testserver") allowed; ``overrides`` win."""
    values: dict[str, Any] = {
        "redis_url": redis_url if isinstance(redis_url, SecretStr) else SecretStr(redis_url),
        "viewer_token": None,
        "blur_faces": False,
        "allowed_hosts": "testserver",  # TestClient's Host
    }
    values.update(overrides)
    return ViewerSettings(**values)


def camera(client: TestClient, camera_id: str) -> dict[str, Any] | None:
    """The viewer's /api/cameras entry of ``camera_id``, or None."""
    return next((c for c in client.get("/api/cameras").json() if c["id"] == camera_id), None)


# -- what capture and workers write -------------------------------------------------------------------
def register_camera(
    r: redis.Redis, camera_id: str, source: str = "test", status: str = "live", fps: float = 5.0
) -> None:
    now = time.time()
    info = CameraInfo(camera_id, source, fps, status, now, now)
    r.hset(C.CAMERAS_KEY, camera_id, info.pack())  # type: ignore[arg-type]
    r.set(C.camera_heartbeat_key(camera_id), status, ex=C.CAMERA_HEARTBEAT_TTL_S)


def publish_frame(
    r: redis.Redis, camera_id: str, seq: int, jpeg: bytes, width: int, height: int
) -> tuple[str, Frame]:
    frame = Frame(camera_id, seq, time.time(), width, height, jpeg)
    entry_id = r.xadd(C.frames_stream(camera_id), frame.to_fields(), maxlen=120, approximate=True)
    return (entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)), frame


def make_face(box: tuple[float, float, float, float], p_female: float | None) -> Face:
    x, y, w, h = box
    lms = ((x + w * 0.3, y + h * 0.4), (x + w * 0.7, y + h * 0.4), (x + w * 0.5, y + h * 0.6),
           (x + w * 0.35, y + h * 0.8), (x + w * 0.65, y + h * 0.8))  # fmt: skip
    if p_female is None:
        return Face(box=box, landmarks=lms, score=0.95, label="unknown", probs={})
    probs = {"female": p_female, "male": 1 - p_female}
    label = max(probs, key=lambda k: probs[k])
    return Face(box=box, landmarks=lms, score=0.95, label=label, probs=probs)


def result_for(frame_id: str, frame: Frame, faces: list[Face], model: ModelRef | None = TEST_MODEL) -> Result:
    """A worker's result for ``frame`` (its stream entry ``frame_id``), a few milliseconds later."""
    t = frame.captured_at
    return Result(
        camera_id=frame.camera_id,
        seq=frame.seq,
        frame_id=frame_id,
        width=frame.width,
        height=frame.height,
        timestamps=Timestamps(t, t + 0.005, t + 0.02, t + 0.025, t + 0.03),
        model=model,
        worker="test-worker",
        faces=tuple(faces),
    )


def publish_result(
    r: redis.Redis,
    frame_id: str,
    frame: Frame,
    faces: list[Face],
    model: ModelRef | None = TEST_MODEL,
) -> Result:
    result = result_for(frame_id, frame, faces, model)
    r.xadd(C.results_stream(frame.camera_id), result.to_fields(), maxlen=256, approximate=True)
    return result


# -- a real viewer process ------------------------------------------------------------------------------
class ViewerProcess:
    """A real ``genderlens view`` (uvicorn) on a free port against the viewer tests' database, its log
    in test-artifacts/. As a context manager: ready on entry, killed on exit."""

    def __init__(self, name: str, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = ARTIFACTS / f"{name}.log"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GENDERLENS_")},
            "GENDERLENS_REDIS_URL": REDIS_URL,
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.proc = genderlens(
            "view", "--port", str(self.port), env=full_env, log=self.log_path, inherit_env=False
        )

    def __enter__(self) -> ViewerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"viewer exited {self.proc.returncode}:\n{self.log()}")
            return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200

        wait_until(ready, timeout=timeout, interval=0.2, what="viewer ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class CuttableProxy:
    """A TCP forwarder to the real Redis that a test can cut and restore, to play a Redis outage
    without touching the Redis everyone else uses."""

    def __init__(self, target: tuple[str, int] = (REDIS_HOST, REDIS_PORT)) -> None:
        self.target = target
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{REDIS_DB}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        self._stop.clear()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.start()
