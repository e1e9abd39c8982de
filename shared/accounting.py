"""Exactly-once frame accounting, done inside Redis by two small Lua scripts.

Every frame capture publishes ends in exactly one of the per-camera counters (``stats_key``):
``processed``, ``dropped_stale`` (at read, or at publish: then ``dropped_stale_publish`` is counted
beside it), ``evicted`` or ``dead_lettered``; so once the streams are drained
``published == processed + dropped_stale + evicted + dead_lettered`` holds for every camera. Two
scripts keep it exact, because a counter incremented outside the operation it counts drifts on every
crash, retry and race:

``PUBLISH`` (capture)
    XADDs the frame, counts it ``published`` and, when the stream is over its cap, trims it exactly
    to the cap and counts as ``evicted`` the trimmed entries the group never delivered (id above the
    group's last-delivered-id), all atomically. Entries that *were* delivered and are trimmed while
    still pending are not counted here: their worker may still finish them (it holds the payload), or,
    if it died, the claimer finds them gone (``shared.streams.autoclaim``) and counts them evicted then.

    A stream whose last id is exhausted (an entry with id ``18446744073709551615-18446744073709551615``
    written by someone else: XADD can never add to it again) is deleted and re-created with its group
    in the same script, and every frame published but not yet settled (all of them live in that
    stream, undelivered or pending) is counted ``evicted``: none can be settled any more, since their
    ack on the new stream's group removes nothing. Capture then carries on.

``SETTLE`` (workers)
    XACKs one entry and, only if the ack removed it from the group's pending list, increments the
    outcome counter and XADDs the entry's result or dead-letter record. A frame claimed by a second
    worker while the first was merely slow is therefore counted (and its result published) once: the
    loser's XACK returns 0 and its script does nothing. An optional second field is counted with the
    outcome (``dropped_stale_publish`` with ``dropped_stale``: a breakdown, outside the equation). An
    output stream whose last id is exhausted is deleted and written afresh (results and dead letters
    are capped logs that viewers and people read; losing their history beats losing every new entry).

Both scripts run through redis-py ``Script`` objects: EVALSHA, falling back to loading the script when
Redis answers NOSCRIPT (after a restart its script cache is empty), in pipelines too.

Frames capture could not hand to Redis at all (queue overflow, Redis down) never became entries: they
are counted apart as ``publish_failed`` and are outside the equation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import redis
from redis.commands.core import Script

from shared import constants as C

# Both scripts match the error of an XADD to an exhausted stream by shared.streams.EXHAUSTED_ID_ERROR.
#: KEYS: frames stream, stats hash. ARGV: maxlen, group, then field/value pairs of the entry.
#: Returns {entry id, evicted now by the cap, frames lost by a reset of an exhausted stream (-1: none)}.
PUBLISH_LUA: Final = """
local stream, stats = KEYS[1], KEYS[2]
local maxlen, group = tonumber(ARGV[1]), ARGV[2]
local xadd = {'XADD', stream, '*'}
for i = 3, #ARGV do xadd[#xadd + 1] = ARGV[i] end
local ok, id = pcall(redis.call, unpack(xadd))
local lost = -1
if not ok then
  local msg = type(id) == 'table' and id.err or tostring(id)
  if not string.find(msg, 'exhausted the last possible ID', 1, true) then return redis.error_reply(msg) end
  -- Every frame published and not yet settled is in this stream (undelivered, or pending in the
  -- group): deleting it ends them all, so they are counted evicted here, exactly once.
  local c = redis.call('HMGET', stats, 'published', 'processed', 'dropped_stale', 'evicted', 'dead_lettered')
  lost = (tonumber(c[1]) or 0) - (tonumber(c[2]) or 0) - (tonumber(c[3]) or 0)
    - (tonumber(c[4]) or 0) - (tonumber(c[5]) or 0)
  if lost < 0 then lost = 0 end
  if lost > 0 then redis.call('HINCRBY', stats, 'evicted', lost) end
  redis.call('DEL', stream)
  redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  id = redis.call(unpack(xadd))
end
redis.call('HINCRBY', stats, 'published', 1)
local excess = redis.call('XLEN', stream) - maxlen
local evicted = 0
if excess > 0 then
  -- The group's last-delivered-id: every entry above it was never handed to a worker.
  local last = nil
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  if ok then
    for _, g in ipairs(groups) do
      local name, lastid = nil, nil
      for i = 1, #g, 2 do
        if g[i] == 'name' then name = g[i + 1] end
        if g[i] == 'last-delivered-id' then lastid = g[i + 1] end
      end
      if name == group then last = lastid end
    end
  end
  local lms, lseq = -1, -1
  if last then
    local dash = string.find(last, '-', 1, true)
    lms, lseq = tonumber(string.sub(last, 1, dash - 1)), tonumber(string.sub(last, dash + 1))
  end
  for _, e in ipairs(redis.call('XRANGE', stream, '-', '+', 'COUNT', excess)) do
    local dash = string.find(e[1], '-', 1, true)
    local ms, seq = tonumber(string.sub(e[1], 1, dash - 1)), tonumber(string.sub(e[1], dash + 1))
    if ms > lms or (ms == lms and seq > lseq) then evicted = evicted + 1 end
  end
  -- Exact (not ~) so that what was counted above is exactly what goes.
  redis.call('XTRIM', stream, 'MAXLEN', maxlen)
  if evicted > 0 then redis.call('HINCRBY', stats, 'evicted', evicted) end
end
return {id, evicted, lost}
"""

#: KEYS: frames stream, stats hash[, output stream]. ARGV: group, entry id, stat field, a second field
#: counted with it ("" for none), output maxlen, then field/value pairs of the output entry.
#: Returns 1 when this call settled the entry, else 0.
SETTLE_LUA: Final = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[4], 1) end
if #KEYS > 2 then
  local xadd = {'XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*'}
  for i = 6, #ARGV do xadd[#xadd + 1] = ARGV[i] end
  local ok, err = pcall(redis.call, unpack(xadd))
  if not ok then
    local msg = type(err) == 'table' and err.err or tostring(err)
    if not string.find(msg, 'exhausted the last possible ID', 1, true) then return redis.error_reply(msg) end
    redis.call('DEL', KEYS[3])
    redis.call(unpack(xadd))
  end
end
return 1
"""


@dataclass(frozen=True)
class Published:
    entry_id: bytes
    evicted: int
    #: The stream's last id was exhausted: it was re-created, and this many frames in flight were lost
    #: (counted evicted); None when nothing of the kind happened.
    reset_lost: int | None = None


class Accounting:
    """The two scripts bound to a client (they also run on that client's pipelines)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._publish: Script = client.register_script(PUBLISH_LUA)
        self._settle: Script = client.register_script(SETTLE_LUA)

    def publish(
        self,
        camera_id: str,
        fields: Mapping[Any, Any],
        maxlen: int,
        group: str = C.INFERENCE_GROUP,
    ) -> Published:
        """XADD ``fields`` to the camera's frames stream, counted and capped (see ``PUBLISH_LUA``)."""
        args: list[Any] = [maxlen, group]
        for key, value in fields.items():
            args.extend((key, value))
        reply: Any = self._publish(keys=[C.frames_stream(camera_id), C.stats_key(camera_id)], args=args)
        lost = int(reply[2])
        return Published(
            entry_id=bytes(reply[0]), evicted=int(reply[1]), reset_lost=lost if lost >= 0 else None
        )

    def settle(
        self,
        pipe: redis.client.Pipeline,
        stream: str,
        camera_id: str,
        entry_id: bytes,
        stat: str,
        output: str | None = None,
        output_fields: Mapping[Any, Any] | None = None,
        output_maxlen: int = 0,
        group: str = C.INFERENCE_GROUP,
        also: str = "",
    ) -> None:
        """Queue on ``pipe``: ack ``entry_id``, and only if that settled it count ``stat`` (and
        ``also``, a breakdown field, when given) and XADD ``output_fields`` to ``output``. The
        pipeline's reply for this call is 1 or 0."""
        keys = [stream, C.stats_key(camera_id)]
        args: list[Any] = [group, entry_id, stat, also, output_maxlen]
        if output is not None:
            keys.append(output)
            for key, value in (output_fields or {}).items():
                args.extend((key, value))
        self._settle(keys=keys, args=args, client=pipe)


def read_stats(client: redis.Redis, camera_id: str) -> dict[str, int]:
    """The camera's counters, every accounting field present (0 when never incremented)."""
    raw: Any = client.hgetall(C.stats_key(camera_id))
    stats = {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}
    for name in (*C.STAT_FIELDS, *C.STAT_EXTRA_FIELDS):
        stats.setdefault(name, 0)
    return stats


def unaccounted(stats: Mapping[str, int]) -> int:
    """published minus every terminal outcome: the frames still in flight (0 once drained)."""
    return stats.get(C.STAT_PUBLISHED, 0) - sum(
        stats.get(k, 0)
        for k in (C.STAT_PROCESSED, C.STAT_DROPPED_STALE, C.STAT_EVICTED, C.STAT_DEAD_LETTERED)
    )
