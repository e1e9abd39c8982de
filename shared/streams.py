"""Redis and Redis Streams helpers shared by every service.

- ``connect`` builds a client where every call has a timeout.
- ``Backoff`` is the capped exponential retry policy every service uses through an outage.
- ``ensure_group`` creates the consumer group (idempotent; recreates it after a Redis restart).
- ``autoclaim`` wraps XAUTOCLAIM so callers see one shape on Redis 6.2 and 7.x.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import ResponseError

from shared.credentials import redact_url as redact_url  # re-exported: the one redaction function

log = logging.getLogger(__name__)

#: What a dropped or restarting Redis raises; services catch exactly these to back off and retry.
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    ConnectionResetError,
    BrokenPipeError,
)


def connect(url: str, timeout_s: float = 5.0, name: str | None = None) -> redis.Redis:
    """A synchronous client whose every call is bounded by ``timeout_s`` (blocking stream reads add
    their own BLOCK time on top, see ``read_timeout``)."""
    client = redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=15,
        client_name=name,
        decode_responses=False,
    )
    return client


@dataclass
class Backoff:
    """Capped exponential backoff with jitter; ``reset()`` after a success."""

    base_s: float = 0.1
    cap_s: float = 5.0
    attempt: int = field(default=0, init=False)

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.base_s * (2**self.attempt))
        self.attempt += 1
        return delay * (0.5 + random.random() / 2)

    def wait(self, stop: threading.Event, what: str, exc: BaseException) -> None:
        delay = self.next_delay()
        log.warning(
            "%s: redis unavailable (%s: %s); retry %d in %.2fs",
            what,
            type(exc).__name__,
            exc,
            self.attempt,
            delay,
        )
        stop.wait(delay)

    def reset(self) -> None:
        if self.attempt:
            log.info("redis reachable again after %d retries", self.attempt)
        self.attempt = 0


def ensure_group(client: redis.Redis, stream: str, group: str, start_id: str = "0") -> bool:
    """Create ``group`` on ``stream`` (and the stream). Returns True if it was created now.

    ``start_id="0"`` so that frames already in a freshly created stream are not skipped.
    """
    try:
        client.xgroup_create(stream, group, id=start_id, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


@dataclass(frozen=True)
class Claimed:
    """Normalised XAUTOCLAIM reply.

    ``entries`` are the claimed entries that still exist. Pending entries whose stream entry is gone
    (trimmed) are reported differently by the two servers, so they come back in two lists:

    - ``deleted``: Redis 7 lists their ids in a third reply element and removes them from the pending
      list itself; the caller only counts them (nobody can ack them any more).
    - ``deleted_pending``: Redis 6.2 returns them as ``[nil, nil]`` (ids lost) and leaves them pending,
      now owned by this consumer; we find their ids (see ``autoclaim``) and the caller must XACK them
      (and count them only if its ack removed them, as ``shared.accounting.SETTLE_LUA`` does).
    """

    next_id: bytes
    entries: list[tuple[bytes, dict[bytes, bytes]]]
    deleted: list[bytes] = field(default_factory=list)
    deleted_pending: list[bytes] = field(default_factory=list)


def _fields(raw_fields: Any) -> dict[bytes, bytes]:
    if isinstance(raw_fields, dict):
        return dict(raw_fields)
    flat: Sequence[bytes] = raw_fields
    return dict(zip(flat[::2], flat[1::2], strict=True))


def autoclaim(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    min_idle_ms: int,
    start_id: bytes | str = b"0-0",
    count: int = 32,
) -> Claimed:
    """XAUTOCLAIM entries idle at least ``min_idle_ms`` to ``consumer``, the same way on 6.2 and 7.x."""
    reply: Any = client.execute_command(
        "XAUTOCLAIM", stream, group, consumer, min_idle_ms, start_id, "COUNT", count
    )
    next_id = bytes(reply[0])
    entries: list[tuple[bytes, dict[bytes, bytes]]] = []
    deleted: list[bytes] = [bytes(x) for x in reply[2]] if len(reply) > 2 and reply[2] else []
    lost_ids = 0
    for item in reply[1] or []:
        if item is None or item[0] is None or item[1] is None:
            lost_ids += 1  # Redis 6.2: a claimed entry that was trimmed; its id is not in the reply
            continue
        entries.append((bytes(item[0]), _fields(item[1])))
    deleted_pending: list[bytes] = []
    if lost_ids:
        deleted_pending = _trimmed_pending(client, stream, group, consumer, {e[0] for e in entries}, count)
    return Claimed(next_id=next_id, entries=entries, deleted=deleted, deleted_pending=deleted_pending)


def _trimmed_pending(
    client: redis.Redis, stream: str, group: str, consumer: str, claimed: set[bytes], count: int
) -> list[bytes]:
    """Ids pending for ``consumer`` whose entry no longer exists in ``stream`` (Redis 6.2 path).

    The 6.2 claim just moved them to ``consumer``; any other such id it owned is equally gone and
    equally due an ack, so looking at everything the consumer owns is correct, not just this batch.
    """
    rows: Any = client.xpending_range(stream, group, "-", "+", count + 64, consumername=consumer)
    candidates = [bytes(r["message_id"]) for r in rows if bytes(r["message_id"]) not in claimed]
    if not candidates:
        return []
    pipe = client.pipeline(transaction=False)
    for entry_id in candidates:
        pipe.xrange(stream, entry_id, entry_id)
    exists = pipe.execute()
    return [entry_id for entry_id, found in zip(candidates, exists, strict=True) if not found]


def parse_stream_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def stream_id_age_ms(entry_id: bytes | str, now: float | None = None) -> float:
    """How old an entry is by its id (ids start with the server's ms clock)."""
    ms, _ = parse_stream_id(entry_id)
    return (now if now is not None else time.time()) * 1000 - ms
