"""The one retry-delay policy (shared/backoff.py) and the places that use it keep their schedules."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from shared.backoff import Backoff, capped_delay
from shared.streams import Quarantine, RedisBackoff


def test_capped_delay_doubles_from_base_to_cap() -> None:
    assert [capped_delay(a, 0.5, 10.0) for a in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert capped_delay(10_000, 0.1, 5.0) == 5.0  # no overflow, however long the outage


def test_backoff_jitter_stays_within_half_to_full_delay_and_reset_starts_over() -> None:
    backoff = Backoff(base_s=1.0, cap_s=8.0)
    for attempt in range(6):
        full = capped_delay(attempt, 1.0, 8.0)
        assert full / 2 <= backoff.next_delay() <= full
    assert backoff.reset() == 6
    assert backoff.attempt == 0 and backoff.reset() == 0


def test_up_restarts_a_child_after_1s_doubling_to_30s_and_starts_over_once_it_ran_long() -> None:
    """The supervisor's schedule is exact (no jitter) and unchanged: 1, 2, 4, 8, 16, 30, 30 s."""
    from services.up import HEALTHY_AFTER_S, Child, Supervisor

    supervisor = Supervisor(env={}, stop=threading.Event())
    child = Child("capture-x", "capture", ["true"], {})
    delays = []
    for _ in range(7):
        child.process = subprocess.Popen([sys.executable, "-c", "pass"])
        child.process.wait()
        child.started_mono = 0.0
        supervisor._reap(child, 1, now=1.0)
        delays.append(child.restart_at - 1.0)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    child.started_mono = 0.0
    supervisor._reap(child, 1, now=HEALTHY_AFTER_S + 1.0)  # it had run long enough: healthy again
    assert child.restart_at - (HEALTHY_AFTER_S + 1.0) == 1.0


def test_quarantine_retries_a_key_on_the_same_schedule() -> None:
    quarantine = Quarantine(base_s=1.0, cap_s=4.0)
    at = []
    for _ in range(4):
        quarantine.add("k", now=100.0)
        at.append(quarantine._retry_at["k"] - 100.0)
    assert at == [1.0, 2.0, 4.0, 4.0]


def test_redis_backoff_logs_each_retry_and_the_recovery_once(caplog: pytest.LogCaptureFixture) -> None:
    backoff = RedisBackoff(base_s=0.001, cap_s=0.001)
    stop = threading.Event()
    with caplog.at_level("INFO", logger="shared.streams"):
        backoff.wait(stop, "worker w", ConnectionError("refused"))
        backoff.wait(stop, "worker w", ConnectionError("refused"))
        backoff.reset()
        backoff.reset()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("worker w: redis unavailable (ConnectionError: refused); retry" in m for m in messages) == 2
    assert messages.count("redis reachable again after 2 retries") == 1
