"""Helpers shared by the viewer's API and browser tests (this module holds no tests itself).

Real everything: the Redis at 127.0.0.1:6379 (database 13 only, flushed before and after), JPEG frames
made from the real face photos in ``../shared/data/faces/eval``, and results built with the schema
classes exactly as workers publish them.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import redis

from shared import constants as C
from shared.schema import CameraInfo, Face, Frame, ModelRef, Result, Timestamps
from tests.support import redis_url_for_db

REDIS_DB = 13
REDIS_URL = redis_url_for_db(REDIS_DB)
_PARTS = redis.connection.parse_url(REDIS_URL)
REDIS_HOST, REDIS_PORT = str(_PARTS.get("host", "127.0.0.1")), int(_PARTS.get("port", 6379))
SHARED = Path(__file__).resolve().parents[2] / "shared"
EVAL_DIR = SHARED / "data" / "faces" / "eval"
WEIGHTS_DIR = SHARED / "weights" / "yunet"
REPO = Path(__file__).resolve().parents[1]
TEST_MODEL = ModelRef("test", "v1")


def redis_or_skip() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL} ({exc}); the viewer tests need a real one")
    return client


def photo_paths(n: int, gender: str | None = None) -> list[Path]:
    """Real head-and-shoulders portraits (Pixabay part of the eval set), in a fixed order."""
    if not EVAL_DIR.is_dir():
        pytest.skip(f"face photos not found at {EVAL_DIR} (../shared/data/faces/eval)")
    genders = [gender] if gender else ["female", "male"]
    per = [sorted((EVAL_DIR / g / "pixabay").glob("*.jpg")) for g in genders]
    out: list[Path] = []
    for i in range(max(len(p) for p in per)):
        for paths in per:
            if i < len(paths):
                out.append(paths[i])
        if len(out) >= n:
            break
    if len(out) < n:
        pytest.skip(f"need {n} photos in {EVAL_DIR}, found {len(out)}")
    return out[:n]


def photo_jpeg(path: Path, width: int = 480) -> tuple[bytes, int, int]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    scale = width / image.shape[1]
    image = cv2.resize(image, (width, round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes(), image.shape[1], image.shape[0]


def register_camera(r: redis.Redis, camera_id: str, source: str = "test", status: str = "live") -> None:
    now = time.time()
    info = CameraInfo(camera_id, source, 5.0, status, now, now)
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


def publish_result(
    r: redis.Redis,
    frame_id: str,
    frame: Frame,
    faces: list[Face],
    model: ModelRef | None = TEST_MODEL,
) -> Result:
    t = frame.captured_at
    result = Result(
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
    r.xadd(C.results_stream(frame.camera_id), result.to_fields(), maxlen=256, approximate=True)
    return result


def detect_faces(jpeg: bytes) -> list[tuple[float, float, float, float]]:
    """Real face boxes from YuNet (the same weights the workers use), for results that match a photo."""
    onnx = WEIGHTS_DIR / "face_detection_yunet_2023mar.onnx"
    if not onnx.is_file():
        pytest.skip(f"YuNet weights not found at {onnx}")
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    detector = cv2.FaceDetectorYN.create(str(onnx), "", (image.shape[1], image.shape[0]), 0.6)
    _, faces = detector.detect(image)
    if faces is None:
        return []
    return [tuple(float(v) for v in f[:4]) for f in faces]  # type: ignore[misc]


def wait_until(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = check()
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check} (last: {last!r})")


def sharpness(image: np.ndarray) -> float:
    """Variance of the Laplacian: high for detailed pixels, near zero once blurred."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
