"""How the bench waits for its workers to start (issue 11, item 18): no fixed deadline, so a worker
that is slow because the machine is busy is waited for, while one that exits or sits idle is a clear
failure. Real spawned processes; the targets live here, in a module that imports no torch, so a child
starts in well under a second."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import pytest

pytest.importorskip("psutil")

from tools.bench.system import _Fleet


def _slow_start(ready: Any, busy_s: float) -> None:
    """Uses the CPU for ``busy_s`` (a slow, busy start: importing torch, warming up), then is ready."""
    end = time.monotonic() + busy_s
    while time.monotonic() < end:
        pass
    ready.set()
    time.sleep(60)


def _stuck(ready: Any) -> None:
    """Never ready and uses no CPU: stuck, not slow."""
    time.sleep(60)


def _crash(ready: Any) -> None:
    raise SystemExit(3)


def _fleet(target: Any, *args: Any) -> _Fleet:
    """A fleet of one worker process running ``target`` (the publisher is not needed to start)."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=target, args=(ready, *args), daemon=True)
    proc.start()
    fleet = _Fleet.__new__(_Fleet)
    fleet.readies, fleet.workers = [ready], [proc]
    return fleet


def _end(fleet: _Fleet) -> None:
    for proc in fleet.workers:
        proc.kill()
        proc.join(10)


def test_a_slow_but_busy_worker_is_waited_for_past_the_stall_limit() -> None:
    fleet = _fleet(_slow_start, 4.0)
    try:
        started = time.monotonic()
        fleet.wait_started(stall_s=1.5)
        assert time.monotonic() - started >= 3.0  # waited well past stall_s: it was using CPU
        assert fleet.readies[0].is_set()
    finally:
        _end(fleet)


def test_an_idle_worker_is_reported_stuck() -> None:
    fleet = _fleet(_stuck)
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="stuck while starting: no CPU used for 2s"):
            fleet.wait_started(stall_s=2.0)
        assert time.monotonic() - started < 30
    finally:
        _end(fleet)


def test_a_worker_that_exits_is_reported_with_its_exit_code() -> None:
    fleet = _fleet(_crash)
    try:
        with pytest.raises(RuntimeError, match=r"failed to start \(exit code 3\)"):
            fleet.wait_started(stall_s=30.0)
    finally:
        _end(fleet)
