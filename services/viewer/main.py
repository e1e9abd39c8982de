"""``genderlens view``: serve the live wall, the annotated streams and the API."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn

from services.viewer.settings import ViewerSettings
from shared.runtime import setup_logging
from shared.streams import redact_url

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ViewerSettings.add_flags(parser, "host", "port", "redis_url", "blur_faces")


def load_settings(args: argparse.Namespace) -> ViewerSettings:
    # e.g. a non-localhost bind without a token: refuse to start, say why.
    return ViewerSettings.from_args("view", args)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    setup_logging(settings.log_level)
    from services.viewer.app import create_app

    app = create_app(settings)
    log.info(
        "viewer on http://%s:%d (redis %s, token %s, blur %s)",
        settings.host,
        settings.port,
        redact_url(settings.redis_url.get_secret_value()),
        "required" if settings.viewer_token else "off",
        "on" if settings.blur_faces else "off",
    )
    # Access logs off: every MJPEG client and API poll would log a line per request.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=5,
        # The client address is the peer's own: uvicorn would otherwise take X-Forwarded-For from any
        # local client, and one guesser could pose as many (failed logins are limited per client).
        proxy_headers=False,
    )
    _CleanExitServer(config, on_exit=app.state.stop_streams).run()
    return 0


class _CleanExitServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT end in exit status 0 after the graceful shutdown.

    uvicorn re-raises a captured signal once it has shut down (the process then dies of SIGTERM,
    status -15); for our services a drained, clean stop is exit 0, which supervisors and tests check.
    """

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Tell the app first: its endless MJPEG responses then end within 0.5 s instead of holding
        # the graceful shutdown until its timeout.
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
