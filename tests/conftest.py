"""Fixtures shared by the whole suite.

Tests use real parts: the Redis 7 server on 127.0.0.1:6379 (each test module its own db number, or a
throw-away server from ``shared.redis_server``), the real YuNet weights and face photos handed over in
``../shared``, and real processes. Where ``../shared`` is absent (a fresh machine) the tests that need
it skip with a reason; CI sets GENDERLENS_REQUIRE_SHARED=1 (see .ci/run), and then any skip that is
not about a missing GPU fails the run instead, so a green CI always means everything ran.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support import TEST_REDIS_URL

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
EVAL_DIR = SHARED / "data" / "faces" / "eval"
TRAIN_DIR = SHARED / "data" / "faces" / "train"
WEIGHTS_DIR = SHARED / "weights" / "yunet"
#: Skips that are legitimate even in CI: this machine has no GPU.
_ALLOWED_SKIP = re.compile(r"cuda|gpu", re.IGNORECASE)


def _strict() -> bool:
    return os.environ.get("GENDERLENS_REQUIRE_SHARED") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if _strict() and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not _ALLOWED_SKIP.search(reason):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, where everything must run: {reason}"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not EVAL_DIR.is_dir() or not WEIGHTS_DIR.is_dir():
        pytest.skip(f"../shared (face photos and YuNet weights) not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def eval_dir(shared_dir: Path) -> Path:
    return EVAL_DIR


@pytest.fixture(scope="session")
def weights_dir(shared_dir: Path) -> Path:
    return WEIGHTS_DIR


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The session's Redis 7 (db 9 for tests that use this fixture; flushed per test)."""
    url = TEST_REDIS_URL
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {url}: {exc}")
    return url


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()
