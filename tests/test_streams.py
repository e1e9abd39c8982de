"""The accounting scripts and ``shared.streams.autoclaim`` on real Redis 7 and Redis 6.2 servers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from shared import constants as C
from shared.accounting import Accounting, read_stats, unaccounted
from shared.redis_server import RedisServer
from shared.streams import autoclaim, ensure_group
from tests.helpers.redis_servers import client_for

CAM = "cam1"
STREAM = C.frames_stream(CAM)


@pytest.fixture()
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of a throw-away server of each supported Redis version (tests/conftest.py)."""
    c = client_for(redis_server)
    yield c
    c.close()


def _publish(acc: Accounting, n: int, maxlen: int) -> list[bytes]:
    return [acc.publish(CAM, {b"m": b"frame-%d" % i}, maxlen).entry_id for i in range(n)]


def _settle_all(acc: Accounting, client: redis.Redis, ids: list[bytes], stat: str) -> list[int]:
    pipe = client.pipeline(transaction=False)
    for entry_id in ids:
        acc.settle(pipe, STREAM, CAM, entry_id, stat)
    return [int(x) for x in pipe.execute()]


def test_publish_counts_and_measures_eviction_of_undelivered(client: redis.Redis) -> None:
    ensure_group(client, STREAM, C.INFERENCE_GROUP)
    acc = Accounting(client)
    _publish(acc, 10, maxlen=4)
    stats = read_stats(client, CAM)
    assert stats[C.STAT_PUBLISHED] == 10
    assert stats[C.STAT_EVICTED] == 6  # never read by anyone, trimmed by the cap
    assert client.xlen(STREAM) == 4


def test_publish_without_group_counts_every_trimmed_entry(client: redis.Redis) -> None:
    acc = Accounting(client)
    _publish(acc, 7, maxlen=5)
    assert read_stats(client, CAM)[C.STAT_EVICTED] == 2


def test_delivered_then_trimmed_is_counted_once_by_the_claimer(client: redis.Redis) -> None:
    """a1, a2 delivered (pending, their worker died); a3 never delivered; all three trimmed."""
    ensure_group(client, STREAM, C.INFERENCE_GROUP)
    acc = Accounting(client)
    ids = _publish(acc, 4, maxlen=4)
    client.xreadgroup(C.INFERENCE_GROUP, "dead", {STREAM: ">"}, count=2)
    ids += _publish(acc, 3, maxlen=4)
    stats = read_stats(client, CAM)
    assert stats[C.STAT_EVICTED] == 1  # only a3: a1 and a2 were delivered, the script leaves them
    claimed = autoclaim(client, STREAM, C.INFERENCE_GROUP, "live", 0, count=10)
    assert claimed.entries == []
    gone = claimed.deleted or claimed.deleted_pending
    assert sorted(gone) == sorted(ids[:2])
    # What the worker does with them (see Worker._evict_trimmed).
    if claimed.deleted:
        client.hincrby(C.stats_key(CAM), C.STAT_EVICTED, len(claimed.deleted))
    assert sum(_settle_all(acc, client, claimed.deleted_pending, C.STAT_EVICTED)) == len(
        claimed.deleted_pending
    )
    assert client.xpending(STREAM, C.INFERENCE_GROUP)["pending"] == 0
    # The rest is read and processed: the equation closes.
    reply = client.xreadgroup(C.INFERENCE_GROUP, "live", {STREAM: ">"}, count=10)
    rest = [entry_id for entry_id, _ in reply[0][1]]
    assert rest == ids[3:]
    assert _settle_all(acc, client, rest, C.STAT_PROCESSED) == [1] * 4
    stats = read_stats(client, CAM)
    assert stats[C.STAT_EVICTED] == 3
    assert unaccounted(stats) == 0


def test_settle_counts_once_when_two_workers_race(client: redis.Redis) -> None:
    ensure_group(client, STREAM, C.INFERENCE_GROUP)
    acc = Accounting(client)
    (entry_id,) = _publish(acc, 1, maxlen=10)
    client.xreadgroup(C.INFERENCE_GROUP, "slow", {STREAM: ">"}, count=1)
    claimed = autoclaim(client, STREAM, C.INFERENCE_GROUP, "claimer", 0)
    assert [e[0] for e in claimed.entries] == [entry_id]
    results = C.results_stream(CAM)
    for _ in range(2):  # the claimer, then the slow original owner
        pipe = client.pipeline(transaction=False)
        acc.settle(pipe, STREAM, CAM, entry_id, C.STAT_PROCESSED, results, {b"m": b"r"}, 100)
        pipe.execute()
    assert read_stats(client, CAM)[C.STAT_PROCESSED] == 1
    assert client.xlen(results) == 1


def test_scripts_survive_a_flushed_script_cache(client: redis.Redis) -> None:
    """After a Redis restart the script cache is empty: EVALSHA falls back to loading the script."""
    ensure_group(client, STREAM, C.INFERENCE_GROUP)
    acc = Accounting(client)
    _publish(acc, 1, maxlen=10)
    client.script_flush()
    (entry_id,) = _publish(acc, 1, maxlen=10)
    client.xreadgroup(C.INFERENCE_GROUP, "w", {STREAM: ">"}, count=2)
    client.script_flush()
    assert _settle_all(acc, client, [entry_id], C.STAT_DROPPED_STALE) == [1]
    assert read_stats(client, CAM)[C.STAT_PUBLISHED] == 2


def test_autoclaim_returns_live_entries_and_moves_the_cursor(client: redis.Redis) -> None:
    ensure_group(client, STREAM, C.INFERENCE_GROUP)
    acc = Accounting(client)
    ids = _publish(acc, 5, maxlen=10)
    client.xreadgroup(C.INFERENCE_GROUP, "dead", {STREAM: ">"}, count=5)
    first = autoclaim(client, STREAM, C.INFERENCE_GROUP, "live", 0, count=3)
    assert [e[0] for e in first.entries] == ids[:3]
    assert first.entries[0][1] == {b"m": b"frame-0"}
    second = autoclaim(client, STREAM, C.INFERENCE_GROUP, "live", 0, start_id=first.next_id, count=3)
    assert [e[0] for e in second.entries] == ids[3:]
    assert not second.deleted and not second.deleted_pending
    # Not idle long enough: nothing is taken.
    assert autoclaim(client, STREAM, C.INFERENCE_GROUP, "other", 60_000).entries == []


MAX_ID = "18446744073709551615-18446744073709551615"


def test_an_exhausted_stream_is_recreated_and_what_was_in_flight_counted_evicted(client: redis.Redis) -> None:
    """An entry with the largest possible id (written by anyone) made every later XADD fail for good.
    The publish script re-creates the stream and its group and counts the frames that were in flight
    (undelivered or pending: none can be settled any more) as evicted; the equation stays exact."""
    ensure_group(client, STREAM, C.INFERENCE_GROUP)
    acc = Accounting(client)
    ids = _publish(acc, 5, maxlen=100)
    client.xreadgroup(C.INFERENCE_GROUP, "w", {STREAM: ">"}, count=2)  # two pending
    assert _settle_all(acc, client, ids[:1], C.STAT_PROCESSED) == [1]
    client.xadd(STREAM, {b"m": b"hostile"}, id=MAX_ID)
    with pytest.raises(redis.ResponseError, match="exhausted the last possible ID"):
        client.xadd(STREAM, {b"m": b"plain"})
    published = acc.publish(CAM, {b"m": b"after"}, 100)
    assert published.reset_lost == 4  # 5 published - 1 processed; the hostile entry was never published
    assert client.xlen(STREAM) == 1
    groups: Any = client.xinfo_groups(STREAM)
    assert [g["name"] for g in groups] == [C.INFERENCE_GROUP.encode()]
    # The worker that held ids[1] settles it late: nothing is counted twice.
    assert _settle_all(acc, client, [ids[1]], C.STAT_PROCESSED) == [0]
    reply = client.xreadgroup(C.INFERENCE_GROUP, "w", {STREAM: ">"}, count=10)
    assert [e[0] for e in reply[0][1]] == [published.entry_id]
    assert _settle_all(acc, client, [published.entry_id], C.STAT_PROCESSED) == [1]
    stats = read_stats(client, CAM)
    assert (stats[C.STAT_PUBLISHED], stats[C.STAT_PROCESSED], stats[C.STAT_EVICTED]) == (6, 2, 4)
    assert unaccounted(stats) == 0
    assert acc.publish(CAM, {b"m": b"next"}, 100).reset_lost is None


def test_settle_writes_to_an_exhausted_output_stream_afresh(client: redis.Redis) -> None:
    ensure_group(client, STREAM, C.INFERENCE_GROUP)
    acc = Accounting(client)
    (entry_id,) = _publish(acc, 1, maxlen=10)
    client.xreadgroup(C.INFERENCE_GROUP, "w", {STREAM: ">"}, count=1)
    results = C.results_stream(CAM)
    client.xadd(results, {b"m": b"hostile"}, id=MAX_ID)
    pipe = client.pipeline(transaction=False)
    acc.settle(pipe, STREAM, CAM, entry_id, C.STAT_PROCESSED, results, {b"m": b"r"}, 100)
    assert pipe.execute() == [1]
    assert [f for _, f in client.xrange(results)] == [{b"m": b"r"}]
    assert read_stats(client, CAM)[C.STAT_PROCESSED] == 1
