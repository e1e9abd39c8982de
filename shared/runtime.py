"""Process plumbing every service shares: logging set-up, one stop event wired to SIGTERM/SIGINT,
the worker/consumer name, and the optional Prometheus /metrics server."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from types import FrameType

log = logging.getLogger(__name__)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        force=True,
    )


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
