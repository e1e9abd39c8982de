"""The system mode: a throw-away Redis, a publisher process and W real worker processes; every frame is
followed from publish to result, and the figures come from the results read back."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import constants as C
from shared.redis_server import RedisServer
from shared.schema import CameraInfo, Result
from shared.streams import connect, ensure_group
from tools.bench.measure import Usage, cpu_seconds, figures, percentiles
from tools.bench.processes import PublisherSpec, WorkerSpec, answered, publisher_main, worker_main

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext


@dataclass
class SystemConfig:
    models_dir: Path
    weights_dir: Path
    detector: str
    device: str
    batch_size: int
    max_wait_ms: int
    cameras: int
    staleness_ms: int = 500
    frames_maxlen: int = 120


#: Closed-loop (max rate) runs measure throughput: the publisher keeps frames queued on purpose, so a
#: frame's age there is queueing the bench made, not staleness; a worker slowed by a busy machine must
#: not drop them (that made the figures, and the test, depend on the load).
CLOSED_LOOP_STALENESS_MS = 3_600_000


class _Fleet:
    """The worker processes and the publisher of one run, and the events and queue between them."""

    def __init__(self, ctx: SpawnContext, workers: Sequence[WorkerSpec], publisher: PublisherSpec) -> None:
        self.stop_evt, self.go_evt = ctx.Event(), ctx.Event()
        self.out: Any = ctx.Queue()
        self.readies = [ctx.Event() for _ in workers]
        self.workers = [
            ctx.Process(target=worker_main, args=(spec, self.stop_evt, ready, self.out), daemon=True)
            for spec, ready in zip(workers, self.readies, strict=True)
        ]
        self.publisher = ctx.Process(
            target=publisher_main, args=(publisher, self.go_evt, self.out), daemon=True
        )
        for proc in [*self.workers, self.publisher]:
            proc.start()

    def wait_started(self, stall_s: float) -> None:
        """Wait until every worker is ready (detector built, model loaded, warmed up).

        No fixed deadline: on a busy machine a worker may take minutes to import torch and warm up, and
        that is not a failure. A worker fails to start when it exits, or when it has used no CPU at all
        for ``stall_s`` (stuck, not slow)."""
        for ready, proc in zip(self.readies, self.workers, strict=True):
            assert proc.pid is not None
            cpu, progressed = cpu_seconds(proc.pid), time.monotonic()
            while not ready.wait(0.5):
                if not proc.is_alive():
                    raise RuntimeError(f"bench worker failed to start (exit code {proc.exitcode})")
                now_cpu = cpu_seconds(proc.pid)
                if now_cpu is not None and now_cpu != cpu:
                    cpu, progressed = now_cpu, time.monotonic()
                elif time.monotonic() - progressed > stall_s:
                    raise RuntimeError(f"bench worker stuck while starting: no CPU used for {stall_s:.0f}s")

    def stop(self) -> None:
        self.stop_evt.set()
        self.go_evt.set()

    def reports(self) -> list[dict[str, Any]]:
        """What each process reported on its way out (after ``stop``); then they are joined."""
        found = [self.out.get(timeout=60) for _ in range(len(self.workers) + 1)]
        for proc in [*self.workers, self.publisher]:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        return found


@dataclass
class _Measured:
    usage: Usage  #: the workers
    side: Usage  #: the publisher and Redis
    started: float  #: time.time() when the publisher was let go
    wall: float


def _wait_answered(client: Any, cameras: Sequence[str], n_frames: int, fleet: _Fleet, stall_s: float) -> None:
    """Until every frame is accounted for; fails when none is for ``stall_s`` or a worker died."""
    done, progressed = -1, time.monotonic()
    while True:
        now_done = answered(client, cameras)
        if now_done >= n_frames:
            return
        if now_done != done:
            done, progressed = now_done, time.monotonic()
        if time.monotonic() - progressed > stall_s or not all(p.is_alive() for p in fleet.workers):
            raise RuntimeError(f"system run stalled: {now_done}/{n_frames} frames answered")
        time.sleep(0.02)


def _measure(
    fleet: _Fleet, server: RedisServer, client: Any, cameras: Sequence[str], n_frames: int, stall_s: float
) -> _Measured:
    fleet.wait_started(stall_s)
    time.sleep(0.3)  # let every worker reach its blocking read
    assert server.process is not None
    usage = Usage([p.pid for p in fleet.workers if p.pid is not None]).start()
    side = Usage([fleet.publisher.pid or 0, server.process.pid]).start()
    fleet.go_evt.set()
    started = time.time()
    _wait_answered(client, cameras, n_frames, fleet, stall_s)
    usage.stop()
    side.stop()
    return _Measured(usage, side, started, time.time() - started)


def _worker_specs(
    cfg: SystemConfig, url: str, jpegs: Sequence[bytes], workers: int, threads: int, live: bool, n_frames: int
) -> list[WorkerSpec]:
    return [
        WorkerSpec(
            url,
            str(cfg.models_dir),
            str(cfg.weights_dir),
            cfg.detector,
            cfg.device,
            threads,
            cfg.batch_size,
            cfg.max_wait_ms,
            n_frames + 64,  # keep every result: they are read back after the run
            f"bench-worker-{i}",
            jpegs[0],
            # The closed loop measures throughput: every frame must be answered, however late.
            # The fixed-rate run is live video, under the live staleness budget.
            cfg.staleness_ms if live else CLOSED_LOOP_STALENESS_MS,
        )
        for i in range(workers)
    ]


def run_system(
    cfg: SystemConfig,
    jpegs: Sequence[bytes],
    workers: int,
    threads: int,
    rate_fps: float | None = None,
    seconds: float = 10.0,
    stall_s: float = 300.0,
) -> dict[str, Any]:
    """One run of publisher -> ``workers`` worker processes -> results, on a fresh throw-away Redis.

    ``stall_s``: give up when nothing progresses for this long (a starting worker uses no CPU, or no
    frame is answered), never merely because the machine is slow."""
    ctx = mp.get_context("spawn")  # fresh interpreters: no inherited torch thread pools or locks
    cameras = [f"bench{i}" for i in range(cfg.cameras)]
    with RedisServer() as server:
        client = connect(server.url, 10.0, "bench")
        now = time.time()
        for cam in cameras:  # register the cameras as capture does, before the workers look
            info = CameraInfo(cam, "bench clip", rate_fps or 0.0, "live", now, now)
            client.hset(C.CAMERAS_KEY, cam, info.pack())  # type: ignore[arg-type]
            ensure_group(client, C.frames_stream(cam), C.INFERENCE_GROUP)
        publisher = PublisherSpec(
            server.url,
            list(jpegs),
            cameras,
            rate_fps,
            seconds,
            2 * cfg.batch_size * workers,
            cfg.frames_maxlen,
        )
        specs = _worker_specs(cfg, server.url, jpegs, workers, threads, rate_fps is not None, publisher.total)
        fleet = _Fleet(ctx, specs, publisher)
        try:
            measured = _measure(fleet, server, client, cameras, publisher.total, stall_s)
        finally:
            fleet.stop()
        reports = fleet.reports()
        results = [
            Result.from_fields(fields)
            for cam in cameras
            for _, fields in client.xrange(C.results_stream(cam))  # type: ignore[union-attr]
        ]
        stats: dict[str, Any] = {cam: client.hgetall(C.stats_key(cam)) for cam in cameras}
        client.close()
    found = _figures(results, [r for r in reports if "stats" in r], measured)
    found.update(_run_facts(cfg, publisher, workers, threads, results, stats, reports))
    found["cpu_percent_publisher_and_redis"] = measured.side.cpu_percent
    found["rss_mb_peak"] = measured.usage.peak_rss_mb
    return found


def _figures(
    results: list[Result], worker_reports: list[dict[str, Any]], measured: _Measured
) -> dict[str, Any]:
    """Rates over the span from the first capture to the last publish; latency = published - captured;
    stage times summed over the workers, with their Redis I/O."""
    latencies = [(r.timestamps.published - r.timestamps.captured) * 1000 for r in results]
    first = min(r.timestamps.captured for r in results) if results else measured.started
    last = max(r.timestamps.published for r in results) if results else measured.started + measured.wall
    span = max(last - first, 1e-9)
    stage_s: dict[str, float] = {}
    for rep in worker_reports:
        for k, v in rep["stats"]["seconds"].items():
            stage_s[k] = stage_s.get(k, 0.0) + v
    stage_s["redis_io"] = sum(r["redis_io_s"] for r in worker_reports)
    faces = sum(len(r.faces) for r in results)
    found = figures(len(results), faces, span, latencies, stage_s, measured.usage)
    found["stages_ms"]["queue_p50"] = percentiles(
        [(r.timestamps.read - r.timestamps.captured) * 1000 for r in results]
    )["p50"]
    return found


def _run_facts(
    cfg: SystemConfig,
    publisher: PublisherSpec,
    workers: int,
    threads: int,
    results: list[Result],
    stats: dict[str, Any],
    reports: list[dict[str, Any]],
) -> dict[str, Any]:
    """What ran, the cameras' counters, and whether every frame came back once, in time."""
    counters: dict[str, int] = {}
    for per_cam in stats.values():
        for k, v in per_cam.items():
            key = k.decode() if isinstance(k, bytes) else str(k)
            counters[key] = counters.get(key, 0) + int(v)
    # Results in order per camera: the worker must route every frame to its own camera and seq.
    seqs = {cam: [r.seq for r in results if r.camera_id == cam] for cam in publisher.cameras}
    latencies = [(r.timestamps.published - r.timestamps.captured) * 1000 for r in results]
    rate_fps = publisher.rate_fps
    return {
        "workers": workers,
        "detector": ",".join(sorted({r["detector"] for r in reports if "stats" in r})),
        "threads_per_worker": threads or "default",
        "cameras": len(publisher.cameras),
        "mode": "max rate (closed loop)" if rate_fps is None else f"{rate_fps:g} fps per camera",
        "published": publisher.total,
        "counters": counters,
        "stale_results": sum(lat > cfg.staleness_ms for lat in latencies),
        "staleness_ms": cfg.staleness_ms,
        "worker_staleness_ms": cfg.staleness_ms if rate_fps is not None else None,
        "max_latency_ms": round(max(latencies), 2) if latencies else None,
        "results_per_camera": {cam: len(v) for cam, v in seqs.items()},
        "no_duplicate_results": all(len(v) == len(set(v)) for v in seqs.values()),
    }
