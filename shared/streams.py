"""Redis and Redis Streams helpers shared by every service.

- ``connect`` builds a client where every call has a timeout.
- ``RedisBackoff`` is the retry policy (``shared.backoff``) every service uses through an outage, with its logs.
- ``ensure_group`` creates the consumer group (idempotent; recreates it after a Redis restart).
- ``autoclaim`` wraps XAUTOCLAIM so callers see one shape on Redis 6.2 and 7.x.
- ``Quarantine`` keeps one camera's broken keys (wrong type, ...) that camera's problem: each is set
  aside and retried on its own capped backoff while the others flow.
- ``eviction_warning`` / ``warn_if_evicting``: Redis must not evict our keys; every service checks the
  server's ``maxmemory-policy`` when it connects and warns loudly (log and event) if it would.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import ResponseError

from shared import constants as C
from shared.backoff import Backoff, capped_delay
from shared.credentials import redact_url as redact_url  # re-exported: the one redaction function
from shared.schema import Event

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


class RedisBackoff(Backoff):
    """:class:`shared.backoff.Backoff` through a Redis outage: ``wait`` logs each retry, ``reset`` logs
    the recovery (once, and only after an outage)."""

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

    def reset(self) -> int:
        attempts = super().reset()
        if attempts:
            log.info("redis reachable again after %d retries", attempts)
        return attempts


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


@dataclass
class Quarantine:
    """Keys (streams) that failed with an error of their own (WRONGTYPE: someone wrote a string where a
    camera's stream belongs), set aside so that one camera's bad state stays that camera's problem.

    Each key is retried after its own capped exponential backoff (``base_s`` doubling to ``cap_s``);
    a success (``clear``) forgets it. ``add`` and ``clear`` say whether the state changed, so that the
    caller reports it once (log, event, metric), not at every retry."""

    base_s: float = 1.0
    cap_s: float = 60.0
    _retry_at: dict[str, float] = field(default_factory=dict)
    _attempts: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, now: float | None = None) -> bool:
        """Set ``key`` aside (again). True when it was not quarantined before."""
        attempt = self._attempts.get(key, 0)
        self._attempts[key] = attempt + 1
        delay = capped_delay(attempt, self.base_s, self.cap_s)
        self._retry_at[key] = (time.monotonic() if now is None else now) + delay
        return attempt == 0

    def blocked(self, key: str, now: float | None = None) -> bool:
        """True while ``key`` waits for its next retry."""
        retry_at = self._retry_at.get(key)
        return retry_at is not None and (time.monotonic() if now is None else now) < retry_at

    def retry_in(self, key: str) -> float:
        return max(0.0, self._retry_at.get(key, 0.0) - time.monotonic())

    def clear(self, key: str) -> bool:
        """``key`` works again. True when it was quarantined."""
        self._retry_at.pop(key, None)
        return self._attempts.pop(key, None) is not None


#: Part of the error Redis answers to XADD on a stream whose last id is the largest possible one
#: (``shared.accounting``'s scripts match it literally).
EXHAUSTED_ID_ERROR = "exhausted the last possible ID"


def is_key_error(exc: BaseException) -> bool:
    """An error that belongs to one key, not to the server or the connection: WRONGTYPE (a string or
    hash where a stream belongs) or an exhausted stream id. Other keys keep working."""
    text = str(exc)
    return isinstance(exc, ResponseError) and ("WRONGTYPE" in text or EXHAUSTED_ID_ERROR in text)


#: Policies under which Redis never deletes keys on its own (anything else may delete stats hashes,
#: heartbeats or whole streams under memory pressure, silently).
SAFE_EVICTION_POLICIES = frozenset({"noeviction"})


def eviction_warning(memory_info: Mapping[Any, Any]) -> str | None:
    """The warning to give for a server whose ``INFO memory`` is ``memory_info``, or None if it never
    evicts keys. ``volatile-*`` policies count too: heartbeats carry a TTL."""
    raw = memory_info.get("maxmemory_policy", memory_info.get(b"maxmemory_policy"))
    if raw is None:
        return None
    policy = raw.decode() if isinstance(raw, bytes) else str(raw)
    if policy in SAFE_EVICTION_POLICIES:
        return None
    maxmemory = int(memory_info.get("maxmemory", memory_info.get(b"maxmemory", 0)) or 0)
    limit = f"maxmemory {maxmemory} bytes" if maxmemory else "maxmemory unset (no limit yet)"
    return (
        f"Redis maxmemory-policy is {policy!r} ({limit}): under memory pressure Redis may silently "
        "delete frame accounting counters, heartbeats or whole streams; set "
        "maxmemory-policy noeviction (docs/reliability.md)"
    )


def event_fields(level: str, source: str, message: str) -> dict[Any, Any]:
    """An operational event (``EVENTS_STREAM`` entry) that the viewer shows."""
    return Event(level=level, source=source, message=message, at=time.time()).to_fields()


def publish_event(client: redis.Redis, level: str, source: str, message: str) -> None:
    """XADD an event, best effort: a failure is logged, never raised."""
    try:
        client.xadd(
            C.EVENTS_STREAM, event_fields(level, source, message), maxlen=C.EVENTS_MAXLEN, approximate=True
        )
    except redis.RedisError as exc:
        log.warning("could not publish event: %s", exc)


def warn_if_evicting(client: redis.Redis, source: str) -> str | None:
    """Check the server's eviction policy (at start); log a warning and publish an error event if it
    may evict keys. Returns the warning. Best effort: a failed check is logged, never fatal."""
    try:
        info: Any = client.info("memory")
    except redis.RedisError as exc:
        log.warning("%s: could not check the Redis eviction policy: %s", source, exc)
        return None
    warning = eviction_warning(info)
    if warning is not None:
        log.warning("%s: %s", source, warning)
        publish_event(client, "error", source, warning)
    return warning
