"""Helpers for end-to-end tests: clips made of real face photos, subprocesses, waiting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")

#: The Redis 7 server the suite talks to (CI: the one on 127.0.0.1:6379). Point it elsewhere with
#: GENDERLENS_TEST_REDIS_URL so that two suites on one machine never flush each other's databases.
TEST_REDIS_URL = os.environ.get("GENDERLENS_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def redis_url_for_db(db: int) -> str:
    """The test Redis server, database ``db`` (each module that owns a database keeps its number)."""
    base = TEST_REDIS_URL.rsplit("/", 1)[0] if TEST_REDIS_URL.count("/") > 2 else TEST_REDIS_URL
    return f"{base}/{db}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # the thing waited for may not answer yet
            last_exc = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last error: {last_exc!r})")


def face_photos(eval_dir: Path, n: int, source: str = "pixabay") -> list[Path]:
    """n real portraits, alternating female/male, deterministic."""
    female = sorted((eval_dir / "female" / source).glob("*.jpg"))
    male = sorted((eval_dir / "male" / source).glob("*.jpg"))
    out: list[Path] = []
    for i in range(n):
        pool = female if i % 2 == 0 else male
        out.append(pool[(i * 7) % len(pool)])
    return out


@dataclass(frozen=True)
class Placed:
    """Where a photo was pasted in a frame: offset and scale (photo px -> frame px)."""

    photo: Path
    x: int
    y: int
    scale: float

    def to_frame(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        bx, by, bw, bh = box
        return (self.x + bx * self.scale, self.y + by * self.scale, bw * self.scale, bh * self.scale)


def compose_frame(photo: Path, size: tuple[int, int] = (640, 480)) -> tuple[npt.NDArray[np.uint8], Placed]:
    """Paste a photo, scaled to fit, at the centre of a grey frame."""
    width, height = size
    image = cv2.imread(str(photo))
    assert image is not None, photo
    scale = min(width / image.shape[1], height / image.shape[0]) * 0.9
    resized = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)))
    frame = np.full((height, width, 3), 90, np.uint8)
    x = (width - resized.shape[1]) // 2
    y = (height - resized.shape[0]) // 2
    frame[y : y + resized.shape[0], x : x + resized.shape[1]] = resized
    return frame, Placed(photo, x, y, scale)


def write_clip(path: Path, photos: Sequence[Path], frames_per_photo: int, fps: int = 15) -> list[Placed]:
    """An MJPG .avi in which each photo is shown for frames_per_photo frames."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (640, 480))
    placed = []
    for photo in photos:
        frame, where = compose_frame(photo)
        placed.append(where)
        for _ in range(frames_per_photo):
            writer.write(frame)
    writer.release()
    assert path.stat().st_size > 0
    return placed


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def genderlens(*args: str, env: dict[str, str], log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a `genderlens` subcommand as a real process (in its own session, so a test can signal
    the whole group)."""
    out = log.open("ab") if log else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    """SIGTERM, wait; SIGKILL the group if it does not exit. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            raise AssertionError(f"{proc.args} did not stop within {timeout_s}s of SIGTERM") from None
    return int(proc.returncode)
