"""``genderlens models list|promote|rollback`` on real artifacts, with the model event on a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.cli import main
from shared import constants as C
from shared.models.artifact import current_dir
from shared.redis_server import RedisServer
from shared.schema import ModelEvent
from tests.faults_support import REDIS7, make_artifact, make_corrupt_artifact


@pytest.fixture()
def server() -> Iterator[RedisServer]:
    if not REDIS7.is_file():
        pytest.skip(f"no Redis 7 at {REDIS7}")
    with RedisServer(binary=REDIS7) as srv:
        yield srv


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    """v1 (good), v2 (broken), v3 (good, current)."""
    make_artifact(tmp_path, "v1", "2026-01-01T00:00:00+00:00")
    make_corrupt_artifact(tmp_path, "v2", "2026-01-02T00:00:00+00:00", "truncated_weights")
    make_artifact(tmp_path, "v3", "2026-01-03T00:00:00+00:00")
    return tmp_path


def _run(models: Path, url: str, *args: str) -> int:
    return main(["models", "--models-dir", str(models), "--redis-url", url, *args])


def _current(models: Path) -> str:
    target = current_dir(models)
    assert target is not None
    return target.name


def test_list_marks_the_current_version(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--models-dir", str(models), "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line[2:].split()[0] for line in lines] == ["gendernet-v1", "gendernet-v2", "gendernet-v3"]
    assert lines[2].startswith("* ") and not lines[0].startswith("*")


def test_rollback_skips_a_broken_version_and_announces_it(models: Path, server: RedisServer) -> None:
    assert _run(models, server.url, "rollback") == 0
    assert _current(models) == "gendernet-v1"  # v2 does not load, so the previous servable is v1
    client = redis.Redis.from_url(server.url)
    ((_, fields),) = client.xrange(C.MODEL_EVENTS_STREAM)
    event = ModelEvent.from_fields(fields)
    assert (event.version, event.path) == ("v1", "gendernet-v1")
    assert _run(models, server.url, "rollback") == 1  # nothing older than v1
    assert _current(models) == "gendernet-v1"


def test_promote_refuses_a_broken_version_and_takes_a_good_one(models: Path, server: RedisServer) -> None:
    assert _run(models, server.url, "promote", "v2") == 1
    assert _current(models) == "gendernet-v3"
    assert _run(models, server.url, "promote", "gendernet-v1") == 0
    assert _current(models) == "gendernet-v1"
    assert _run(models, server.url, "promote", "nope") == 1


def test_promote_works_with_redis_down(models: Path) -> None:
    """The pointer file is the source of truth; the event is best effort."""
    from tests.support import free_port

    assert _run(models, f"redis://127.0.0.1:{free_port()}/0", "promote", "v1") == 0
    assert _current(models) == "gendernet-v1"
