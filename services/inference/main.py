"""``genderlens infer``: one inference worker."""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from services.inference.settings import InferenceSettings
from shared.device import resolve_device
from shared.runtime import default_consumer_name, install_stop_handlers, setup_logging, start_metrics_server
from shared.settings import Flag

if TYPE_CHECKING:
    from services.inference.models import ModelManager
    from services.inference.worker import Worker

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    InferenceSettings.add_flags(
        parser,
        "redis_url",
        "models_dir",
        "weights_dir",
        "detector",
        "device",
        "batch_size",
        Flag("worker_name", "--name"),
        "metrics_port",
    )
    parser.add_argument(
        "--check-health",
        action="store_true",
        help="exit 0 if the worker's health file is fresh, 1 otherwise (container healthcheck)",
    )


def load_settings(args: argparse.Namespace) -> InferenceSettings:
    settings = InferenceSettings.from_args("infer", args)
    if settings.block_ms / 1000 >= settings.redis_timeout_s:
        raise SystemExit("genderlens infer: block_ms must be shorter than redis_timeout_s")
    return settings


def check_health(settings: InferenceSettings) -> int:
    if not settings.health_file:
        print("no GENDERLENS_HEALTH_FILE configured")  # noqa: T201 (healthcheck output)
        return 1
    try:
        age = time.time() - Path(settings.health_file).stat().st_mtime
    except FileNotFoundError:
        print(f"{settings.health_file} missing: worker not started or not consuming")  # noqa: T201
        return 1
    if age > settings.health_max_age_s:
        print(f"worker stalled: last loop {age:.0f}s ago")  # noqa: T201
        return 1
    return 0


def build_worker(settings: InferenceSettings, stop: threading.Event) -> tuple[Worker, ModelManager]:
    """Build the detector, model manager, pipeline and worker (also used by bench and tests)."""
    import torch

    from services.inference.models import ModelManager
    from services.inference.pipeline import Pipeline
    from services.inference.worker import Worker
    from shared.detectors import DetectorConfig, create

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = str(resolve_device(settings.device, "genderlens infer"))
    detector = create(
        settings.detector,
        DetectorConfig(
            score_threshold=settings.detector_score_threshold,
            max_side=settings.detector_max_side,
            fallback_sides=settings.fallback_sides,
            fallback_every=settings.detector_fallback_every,
            weights_dir=settings.weights_dir,
            weights_cache_dir=settings.weights_cache_dir,
            device=device,
        ),
    )
    name = settings.worker_name or default_consumer_name("worker")
    events: list[Worker] = []
    models = ModelManager(
        settings.models_dir,
        device,
        on_event=lambda level, msg: events[0].publish_event(level, msg) if events else None,
    )
    worker = Worker(settings, Pipeline(detector, device), models, stop, name)
    events.append(worker)
    return worker, models


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    if args.check_health:
        return check_health(settings)
    setup_logging(settings.log_level)
    from shared.detectors import DetectorConfig  # noqa: F401  (fail fast on a broken install)
    from shared.weights import WeightsError

    stop = threading.Event()
    install_stop_handlers(stop)
    try:
        worker, models = build_worker(settings, stop)
    except (ValueError, WeightsError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    models.check()
    if models.current is None:
        log.warning(
            "no model in %s: faces will be labelled 'unknown' until one is published", settings.models_dir
        )
    models.start(stop, settings.model_poll_s)
    start_metrics_server(settings.metrics_host, settings.metrics_port)
    done = threading.Event()
    threading.Thread(
        target=_drain_watchdog,
        args=(stop, done, settings.drain_timeout_s),
        name="drain-watchdog",
        daemon=True,
    ).start()
    try:
        return worker.run()
    finally:
        done.set()


def _drain_watchdog(stop: threading.Event, done: threading.Event, timeout_s: float) -> None:
    """After SIGTERM the worker gets ``timeout_s`` to finish and ack its batch; past that it is stuck
    (a hung device or socket), and exiting non-zero is better than never: whatever it still holds is
    pending and another worker claims it."""
    stop.wait()
    if not done.wait(timeout_s):
        log.error("drain did not finish within %.1fs; exiting without it", timeout_s)
        logging.shutdown()
        os._exit(1)
