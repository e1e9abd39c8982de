"""The system run's child processes: a real worker (what ``genderlens infer`` runs, timed through the
worker's observer hooks) and a publisher that sends the clip as capture does.

They start by ``spawn`` (fresh interpreters), so this module imports nothing heavy at the top: the
publisher never loads torch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event as MpEvent

    from services.inference.settings import InferenceSettings
    from services.inference.worker import Entry


@dataclass(frozen=True)
class WorkerSpec:
    redis_url: str
    models_dir: str
    weights_dir: str
    detector: str
    device: str
    threads: int
    batch_size: int
    max_wait_ms: int
    results_maxlen: int
    name: str
    warmup_jpeg: bytes
    staleness_ms: int

    def settings(self) -> InferenceSettings:
        from services.inference.settings import InferenceSettings

        return InferenceSettings(
            redis_url=self.redis_url,
            models_dir=Path(self.models_dir),
            weights_dir=Path(self.weights_dir),
            detector=self.detector,
            device=self.device,
            torch_threads=self.threads,
            batch_size=self.batch_size,
            max_wait_ms=self.max_wait_ms,
            results_maxlen=self.results_maxlen,
            staleness_ms=self.staleness_ms,
            worker_name=self.name,
            log_level="WARNING",
        )


class IoTimer:
    """A :class:`services.inference.worker.WorkerObserver` that adds up the worker's Redis I/O:
    time in reads that returned frames, minus any wait for the newest of them to be published (told
    by its stream id: the read was blocked on the publisher, not on Redis), plus time in ``handle``
    outside the pipeline (unpack, pack, the settle script's round trip)."""

    def __init__(self) -> None:
        self.read_s = 0.0
        self.handle_s = 0.0
        self.pipeline_s = 0.0

    def on_read(self, entries: Sequence[Entry], started: float, finished: float) -> None:
        from shared.streams import parse_stream_id

        newest = max(parse_stream_id(e.entry_id)[0] for e in entries) / 1000
        self.read_s += finished - max(started, min(newest, finished))

    def on_handled(self, entries: int, seconds: float, pipeline_seconds: float) -> None:
        self.handle_s += seconds
        self.pipeline_s += pipeline_seconds

    @property
    def redis_io_s(self) -> float:
        return self.read_s + max(0.0, self.handle_s - self.pipeline_s)


def worker_main(spec: WorkerSpec, stop_evt: MpEvent, ready_evt: MpEvent, out: Any) -> None:
    """One worker process: ``build_worker`` (what ``genderlens infer`` runs), warmed up, timed by an
    :class:`IoTimer`; it reports its pipeline's stage times and its Redis I/O when ``stop_evt`` is set."""
    import torch

    from services.inference.main import build_worker
    from shared.runtime import setup_logging

    setup_logging("WARNING")
    if spec.threads:
        torch.set_num_threads(spec.threads)
        cv2.setNumThreads(spec.threads)
    stop = threading.Event()
    worker, models = build_worker(spec.settings(), stop)
    models.check()
    pipeline = worker.pipeline
    pipeline.process([spec.warmup_jpeg] * spec.batch_size, models.current, None)  # warm-up
    pipeline.stats.reset()
    timer = IoTimer()
    worker.observer = timer

    def watch() -> None:
        stop_evt.wait()
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    ready_evt.set()
    worker.run()
    out.put(
        {
            "name": spec.name,
            "detector": pipeline.detector.name,
            "stats": pipeline.stats.snapshot(),
            "redis_io_s": timer.redis_io_s,
        }
    )


@dataclass(frozen=True)
class PublisherSpec:
    """Closed loop (``rate_fps`` None: at most ``in_flight`` frames unanswered, the whole clip once), or
    ``rate_fps`` per camera for ``seconds``."""

    redis_url: str
    jpegs: Sequence[bytes]
    cameras: Sequence[str]
    rate_fps: float | None
    seconds: float
    in_flight: int
    frames_maxlen: int

    @property
    def total(self) -> int:
        if self.rate_fps is None:
            return len(self.jpegs)
        return max(1, round(self.seconds * self.rate_fps * len(self.cameras)))


def answered(client: Any, cameras: Sequence[str]) -> int:
    """Frames of ``cameras`` that have an outcome (processed, dropped as stale or dead-lettered)."""
    from shared import constants as C

    pipe = client.pipeline(transaction=False)
    for cam in cameras:
        pipe.hmget(C.stats_key(cam), [C.STAT_PROCESSED, C.STAT_DROPPED_STALE, C.STAT_DEAD_LETTERED])
    return sum(int(v or 0) for row in pipe.execute() for v in row)


def publisher_main(spec: PublisherSpec, go_evt: MpEvent, out: Any) -> None:
    """Publish the clip as capture does (same Frame schema, same accounting), round robin over the
    cameras, once ``go_evt`` is set."""
    from shared.accounting import Accounting
    from shared.schema import Frame
    from shared.streams import connect

    client = connect(spec.redis_url, 5.0, "bench-publisher")
    accounting = Accounting(client)
    size = np.asarray(cv2.imdecode(np.frombuffer(spec.jpegs[0], np.uint8), cv2.IMREAD_COLOR)).shape
    height, width = int(size[0]), int(size[1])
    seqs = dict.fromkeys(spec.cameras, 0)
    total = spec.total
    go_evt.wait()
    started = time.perf_counter()
    sent = 0
    while sent < total:
        if spec.rate_fps is None:
            while sent - answered(client, spec.cameras) >= spec.in_flight:
                # Workers hold up to two batches each, so a few ms here never starves them, while
                # polling faster would take CPU from them on a small machine.
                time.sleep(0.003)
        else:
            delay = started + sent / (spec.rate_fps * len(spec.cameras)) - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        cam = spec.cameras[sent % len(spec.cameras)]
        frame = Frame(cam, seqs[cam], time.time(), width, height, spec.jpegs[sent % len(spec.jpegs)])
        seqs[cam] += 1
        accounting.publish(cam, frame.to_fields(), spec.frames_maxlen)
        sent += 1
    out.put({"sent": sent, "seconds": time.perf_counter() - started})
