"""Real ``genderlens`` processes: one way to start them (``genderlens``), stop them and keep their logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.paths import REPO, WEIGHTS_DIR

#: The ``genderlens`` command of this checkout, run by this interpreter (the venv's).
GENDERLENS = [sys.executable, "-m", "services.cli"]


def genderlens(
    *args: str, env: Mapping[str, str], log: Path | None = None, inherit_env: bool = True
) -> subprocess.Popen[bytes]:
    """Start a ``genderlens`` subcommand as a real process, in its own session (so a test can signal
    the whole group), its output appended to ``log``. ``env`` adds to this process's environment, or
    with ``inherit_env=False`` is the whole environment."""
    with log.open("ab") if log else open(os.devnull, "wb") as out:  # the child keeps its own copy
        return subprocess.Popen(
            [*GENDERLENS, *args],
            cwd=REPO,
            env={**os.environ, **env} if inherit_env else dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    """SIGTERM, wait; SIGKILL the group if it does not exit (and fail). Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            raise AssertionError(f"{proc.args!r} did not stop within {timeout_s}s of SIGTERM") from None
    return int(proc.returncode)


def service_env(redis_url: str, models_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of capture and inference processes under test: the given Redis and models, the
    YuNet weights of ../shared, CPU, one thread, fast refreshes, logs unbuffered."""
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


@dataclass
class Services:
    """Real ``genderlens`` processes with their output in log files; all stopped on ``close``."""

    log_dir: Path
    base_env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        proc = genderlens(*args, env={**self.base_env, **env}, log=self.log_dir / f"{name}.log")
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

    @contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Print every process's log when the block fails, so the failure shows what they said."""
        try:
            yield
        except BaseException:
            print(self.dump_logs())
            raise
