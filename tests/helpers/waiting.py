"""The one way tests wait: poll, never sleep a fixed time, and give up with a message that says what."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    check: Callable[[], T | None],
    timeout: float = 10.0,
    what: str = "",
    *,
    interval: float = 0.1,
    procs: Mapping[str, subprocess.Popen[bytes]] | None = None,
) -> T:
    """Call ``check`` every ``interval`` seconds until it returns something truthy, and return that.

    An exception from ``check`` counts as "not yet" (the thing waited for may not answer yet) and is
    named in the failure, raised as an ``AssertionError`` after ``timeout`` seconds. With ``procs``,
    the wait fails at once when one of those processes exits.
    """
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        for name, proc in (procs or {}).items():
            if proc.poll() is not None:
                raise AssertionError(
                    f"{name} exited with {proc.returncode} while waiting for {what or check}"
                )
        try:
            value = check()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:g}s waiting for {what or check} (last error: {last_exc!r})"
    ) from last_exc
