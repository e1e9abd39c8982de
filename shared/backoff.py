"""The one retry-delay policy: capped exponential backoff.

Every retry in the project waits ``base_s``, then twice that, then four times... up to ``cap_s``:
services riding out a Redis outage (``shared.streams.RedisBackoff``), capture reopening a lost source,
a key set aside after an error of its own (``shared.streams.Quarantine``), and ``genderlens up``
restarting a child that exited. Standard library only, so anything may use it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def capped_delay(attempt: int, base_s: float, cap_s: float) -> float:
    """The delay before retry number ``attempt`` (0 for the first): ``base_s * 2**attempt``, at most
    ``cap_s``."""
    return min(cap_s, base_s * 2 ** min(attempt, 64))  # the exponent is bounded: no float overflow


@dataclass
class Backoff:
    """Capped exponential backoff for one retried thing; ``reset()`` after a success.

    ``jitter`` spreads each delay over 50-100% of its value, so that clients that lost the same server
    at the same moment do not all retry in step; without it the delays are exact (a supervisor's
    restart schedule, which people read in its log)."""

    base_s: float = 0.1
    cap_s: float = 5.0
    jitter: bool = True
    attempt: int = field(default=0, init=False)

    def next_delay(self) -> float:
        delay = capped_delay(self.attempt, self.base_s, self.cap_s)
        self.attempt += 1
        return delay * (0.5 + random.random() / 2) if self.jitter else delay

    def reset(self) -> int:
        """Start again from ``base_s``. Returns how many retries there had been."""
        attempts, self.attempt = self.attempt, 0
        return attempts
