"""Process plumbing every service and command shares: the one logging set-up, a command's report on
stdout, one stop event wired to SIGTERM/SIGINT, the worker/consumer name, the optional Prometheus
/metrics server, and children that die with their parent."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)


#: One line per record; the process id tells apart the processes that share a terminal (``genderlens up``).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def setup_logging(level: str | int = "INFO", *, replace: bool = True) -> None:
    """Configure the root logger (stderr, :data:`LOG_FORMAT`), the same way in every process.

    ``replace=False`` leaves logging alone when something already configured it: the trainer's
    commands and the dev tools also run inside other programs (tests, notebooks), whose handlers
    must survive; a service's main replaces whatever an import may have set up."""
    if not replace and logging.getLogger().handlers:
        return
    logging.basicConfig(level=level, format=LOG_FORMAT, force=True)


def say(message: str) -> None:
    """A command's own report on stdout (what it was asked for: figures, verdicts, paths), as opposed
    to logging (stderr, diagnostics). Flushed, so it stays in order with progress bars and logs."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: loops finish their in-flight work, then exit 0."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info("received %s: draining and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def default_consumer_name(prefix: str) -> str:
    """Unique per process (host + pid), so two workers never share a consumer name."""
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}"


def start_metrics_server(host: str, port: int) -> None:
    """Serve the default Prometheus registry on ``host:port`` (/metrics) when ``port`` is set."""
    if not port:
        return
    from prometheus_client import start_http_server

    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` (Linux; None elsewhere): the child gets ``sig`` when
    its parent dies, even by SIGKILL, so nothing is left orphaned.

    The kernel sends it when the *thread* that forked the child exits, not the process: start such
    children from the main thread (or one that lives as long as the process), never from a
    short-lived thread such as a ``threading.Timer``. libc is looked up here, in the parent, so that
    the child only makes two system calls between fork and exec; if the parent died before the
    child asked, the child sees a new parent pid and exits at once."""
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:
            os._exit(1)

    return preexec
