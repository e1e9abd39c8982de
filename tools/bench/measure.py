"""What the benchmark measures besides time: CPU and memory of processes, latency percentiles, the
figures of one mode, and what else the machine is doing (psutil, from the ``bench`` extra)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in (50, 95, 99)}


@dataclass
class Usage:
    """CPU and memory of a set of processes between ``start()`` and ``stop()``."""

    pids: list[int]
    _cpu0: float = 0.0
    _t0: float = 0.0
    cpu_percent: float = 0.0
    rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    _sampler: threading.Thread | None = field(default=None, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def _cpu(self) -> float:
        return sum(cpu_seconds(pid) or 0.0 for pid in self.pids)

    def _rss(self) -> float:
        import psutil

        total = 0
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(pid).memory_info().rss
        return total / 2**20

    def start(self) -> Usage:
        self._cpu0, self._t0 = self._cpu(), time.perf_counter()
        self._done.clear()

        def sample() -> None:
            while not self._done.wait(0.25):
                self.peak_rss_mb = max(self.peak_rss_mb, self._rss())

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()
        return self

    def stop(self) -> Usage:
        self._done.set()
        if self._sampler is not None:
            self._sampler.join()
        elapsed = time.perf_counter() - self._t0
        self.cpu_percent = round(100 * (self._cpu() - self._cpu0) / max(elapsed, 1e-9), 1)
        self.rss_mb = round(self._rss(), 1)
        self.peak_rss_mb = round(max(self.peak_rss_mb, self.rss_mb), 1)
        return self


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far; None when it is gone."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def figures(
    frames: int,
    faces: int,
    seconds: float,
    latencies_ms: Sequence[float],
    stage_seconds: dict[str, float],
    usage: Usage,
) -> dict[str, Any]:
    """One mode's figures: rates, latency percentiles, mean ms per frame per stage, CPU and memory."""
    return {
        "frames": frames,
        "faces": faces,
        "seconds": round(seconds, 3),
        "fps": round(frames / seconds, 2) if seconds > 0 else 0.0,
        "faces_per_s": round(faces / seconds, 2) if seconds > 0 else 0.0,
        "latency_ms": percentiles(latencies_ms),
        "stages_ms": {k: round(1000 * v / max(frames, 1), 3) for k, v in stage_seconds.items()},
        "cpu_percent": usage.cpu_percent,
        "rss_mb": usage.rss_mb,
    }


def host() -> dict[str, Any]:
    """What else the machine is doing (the figures depend on it): load and the busiest processes.

    Without psutil (not installed: the ``bench`` extra is missing) only the load is reported, with a
    note saying why the busy processes are missing."""
    found: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()]}
    try:
        found["busy_processes"] = _busy_processes()
    except ImportError:
        found["busy_processes"] = []
        found["note"] = "psutil is not installed (the bench extra): busy processes unknown"
    return found


def _busy_processes(top: int = 4, min_percent: float = 5.0) -> list[dict[str, Any]]:
    """The ``top`` processes using at least ``min_percent`` of a core over one second (not this one)."""
    import psutil

    procs = [p for p in psutil.process_iter() if p.pid != os.getpid()]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)  # the first call only starts the measurement
    time.sleep(1.0)
    busy: list[tuple[float, psutil.Process]] = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            busy.append((p.cpu_percent(None), p))
    busy.sort(key=lambda item: item[0], reverse=True)
    found = []
    for pct, p in busy[:top]:
        if pct < min_percent:
            break
        with contextlib.suppress(psutil.Error):
            found.append({"pid": p.pid, "cpu_percent": pct, "cmd": " ".join(p.cmdline())[:120]})
    return found
