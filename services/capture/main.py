"""``genderlens capture``: one source, one camera."""

from __future__ import annotations

import argparse
import logging
import threading

from services.capture.settings import CaptureSettings
from shared.constants import is_valid_camera_id
from shared.runtime import install_stop_handlers, setup_logging, start_metrics_server
from shared.sources import SourceError, parse_source

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    CaptureSettings.add_flags(parser, "source", "camera_id", "fps", "loop", "redis_url", "metrics_port")


def load_settings(args: argparse.Namespace) -> CaptureSettings:
    """Settings from the environment and flags (``genderlens up`` validates children with this too).
    The source is best given in the environment (GENDERLENS_SOURCE): ``ps`` shows every process's
    command line, with any password in a URL."""
    return CaptureSettings.from_args("capture", args)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    setup_logging(settings.log_level)
    try:
        spec = parse_source(settings.source)
    except SourceError as exc:
        raise SystemExit(f"genderlens capture: {exc}") from None
    camera_id = settings.camera_id or spec.default_camera_id
    if not is_valid_camera_id(camera_id):
        raise SystemExit(f"genderlens capture: invalid --camera-id {camera_id!r} (use a-z, 0-9, '-' and '_')")
    from services.capture.service import CaptureService

    stop = threading.Event()
    install_stop_handlers(stop)
    start_metrics_server(settings.metrics_host, settings.metrics_port)
    log.info("capture %s from %s at %.1f fps", camera_id, spec.redacted(), settings.fps)
    try:
        return CaptureService(settings, spec, camera_id, stop).run()
    except SourceError as exc:
        log.error("%s", exc)
        return 2
