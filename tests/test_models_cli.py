"""``genderlens models list|promote|rollback`` on real artifacts, with the model event on a real Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from services.cli import main
from shared import constants as C
from shared.models.artifact import current_dir
from shared.redis_server import RedisServer
from shared.schema import ModelEvent
from tests.helpers.artifacts import make_artifact, make_corrupt_artifact
from tests.helpers.net import free_port


@pytest.fixture()
def server(redis7_server: RedisServer) -> RedisServer:
    """A throw-away Redis 7 server (tests/conftest.py)."""
    return redis7_server


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
    lines = capsys.readouterr().out.splitlines()[1:4]  # after the header
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
    # v1 records no validation figures: the gate cannot judge it, so it is promoted only when told to.
    assert _run(models, server.url, "promote", "gendernet-v1", "--ignore-gate") == 0
    assert _current(models) == "gendernet-v1"
    assert _run(models, server.url, "promote", "nope") == 1


def test_promote_works_with_redis_down(models: Path) -> None:
    """The pointer file is the source of truth; the event is best effort."""
    assert _run(models, f"redis://127.0.0.1:{free_port()}/0", "promote", "v1", "--ignore-gate") == 0
    assert _current(models) == "gendernet-v1"


# -- what `list` shows, options after the action, and the promotion gate ---------------------------------
def _report(validation: dict[str, object], gate: dict[str, object] | None = None) -> dict[str, object]:
    return {"validation": validation, "test": validation, **({"gate": gate} if gate else {})}


def _rows(acc: float, n: int = 400, groups: dict[str, float] | None = None) -> dict[str, object]:
    """A validation report as the trainer writes it: per class recall and per group accuracy."""
    return {
        "n": n,
        "accuracy": acc,
        "per_class": {"female": {"n": n // 2, "accuracy": acc}, "male": {"n": n // 2, "accuracy": acc}},
        "per_group": {k: {"n": 150, "accuracy": v} for k, v in (groups or {}).items()},
    }


def _trained(
    models_dir: Path,
    version: str,
    created_at: str,
    val_acc: float | None,
    report: dict[str, object] | None = None,
    make_current: bool = False,
    **fields: object,
) -> str:
    """A real (untrained-weights) artifact that records validation figures as a training run does."""
    from shared.models.artifact import publish_untrained

    metrics = (
        {"val_accuracy": val_acc, "test_accuracy": val_acc, "test_n": 400} if val_acc is not None else {}
    )
    meta = publish_untrained(
        models_dir,
        name="gender",
        version=version,
        width=8,
        make_current=make_current,
        created_at=created_at,
        metrics=metrics,
        **fields,
    )
    if report is not None:
        (models_dir / meta.dirname / "report.json").write_text(json.dumps(report))
    return meta.dirname


def _events(url: str) -> list[ModelEvent]:
    client = redis.Redis.from_url(url)
    try:
        return [ModelEvent.from_fields(f) for _, f in client.xrange(C.MODEL_EVENTS_STREAM)]
    finally:
        client.close()


def test_list_shows_what_each_model_is_with_the_split_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _trained(
        tmp_path,
        "a",
        "2026-01-01T00:00:00+00:00",
        0.91,
        _report(_rows(0.91, n=2327), gate={"promote": False}),
        make_current=True,
        training={"mode": "frozen-features", "config": {}},
        input_size=64,
    )
    assert main(["models", "list", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    assert header.split() == [
        "VERSION",
        "CREATED",
        "ARCH",
        "MODE",
        "INPUT",
        "SIZE",
        "VAL",
        "ACC",
        "TEST",
        "ACC",
        "GATE",
    ]
    assert row.startswith("* gender-a")
    for text in ("gendernet(width=8)", "frozen-features", "64px", "MB", "91.00% n=2327", "refused"):
        assert text in row, (text, row)
    assert "own validation split" in out and "acc=" not in out
    assert main(["models", "list", "--json", "--models-dir", str(tmp_path)]) == 0
    listing = json.loads(capsys.readouterr().out)
    (entry,) = listing["versions"]
    assert entry["current"] and entry["arch"] == "gendernet" and entry["arch_config"] == {"width": 8}
    assert entry["metrics"]["validation"] == {"accuracy": 0.91, "n": 2327, "ece": None}
    assert entry["size_bytes"] > 1000 and entry["mode"] == "frozen-features" and entry["gate"] == "refused"


def test_options_work_after_the_action(models: Path, server: RedisServer) -> None:
    """Regression (#11 item 17): `models rollback --redis-url URL` was refused by argparse."""
    assert main(["models", "rollback", "--models-dir", str(models), "--redis-url", server.url]) == 0
    assert _current(models) == "gendernet-v1"
    assert [e.version for e in _events(server.url)] == ["v1"]  # announced on the URL given after it
    assert main(["models", "list", "--models-dir", str(models)]) == 0
    assert main(["models", "promote", "v3", "--ignore-gate", "--no-event", "--models-dir", str(models)]) == 0
    assert _current(models) == "gendernet-v3"
    assert len(_events(server.url)) == 1  # --no-event after the action was honoured too
    # Before the action still works, and a value there is not overwritten by the action's default.
    assert main(["models", "--models-dir", str(models), "--redis-url", server.url, "rollback"]) == 0
    assert len(_events(server.url)) == 2


def test_promote_applies_the_gate_on_recorded_metrics(
    tmp_path: Path, server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _trained(tmp_path, "good", "2026-01-01T00:00:00+00:00", 0.92, _report(_rows(0.92)), True)
    weak = _trained(tmp_path, "weak", "2026-01-02T00:00:00+00:00", 0.55, _report(_rows(0.55)))
    capsys.readouterr()
    assert _run(tmp_path, server.url, "promote", weak) == 1
    out = capsys.readouterr().out
    assert _current(tmp_path) == good and _events(server.url) == []
    assert f"WARNING: quality gate refused {weak}" in out and "NOT made current" in out
    assert "recorded metrics" in out and "NOT like with like" in out
    assert "55.00% vs current 92.00%" in out and f"promote {weak} --ignore-gate" in out
    assert _run(tmp_path, server.url, "promote", weak, "--ignore-gate") == 0
    assert "made current anyway (--ignore-gate)" in capsys.readouterr().out
    assert _current(tmp_path) == weak and [e.path for e in _events(server.url)] == [weak]
    # Going back to the better model passes the gate; rollback is never gated.
    assert _run(tmp_path, server.url, "promote", good) == 0
    assert "quality gate: passed" in capsys.readouterr().out


def test_promote_reuses_the_like_with_like_figures_of_the_training_run(
    tmp_path: Path, server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The candidate's run measured the current model on its own validation images (0.50 there,
    though it recorded 0.92 on its split): promote compares with that, not with the recorded figure."""
    cur = _trained(tmp_path, "cur", "2026-01-01T00:00:00+00:00", 0.92, _report(_rows(0.92)), True)
    baseline = {"mode": "same validation images", "name": cur, "accuracy": 0.50, "note": "n=400"}
    cand = _trained(
        tmp_path, "cand", "2026-01-02T00:00:00+00:00", 0.60, _report(_rows(0.60), {"baseline": baseline})
    )
    capsys.readouterr()
    assert _run(tmp_path, server.url, "promote", cand) == 0
    out = capsys.readouterr().out
    assert "same validation images" in out and "60.00% vs current 50.00%" in out
    assert _current(tmp_path) == cand


def test_promote_refuses_an_unfair_model_and_says_which_groups(
    tmp_path: Path, server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    _trained(tmp_path, "cur", "2026-01-01T00:00:00+00:00", 0.80, _report(_rows(0.80)), True)
    groups = {"A": 0.97, "B": 0.95, "C": 0.78, "tiny": 0.10}  # tiny has n=150 too: see min-n below
    cand = _trained(tmp_path, "cand", "2026-01-02T00:00:00+00:00", 0.90, _report(_rows(0.90, groups=groups)))
    capsys.readouterr()
    assert _run(tmp_path, server.url, "promote", cand, "--gate-min-n", "151") == 0  # no group judged
    assert "not judged" in capsys.readouterr().out
    assert _run(tmp_path, server.url, "rollback") == 0
    capsys.readouterr()
    assert _run(tmp_path, server.url, "promote", cand) == 1
    out = capsys.readouterr().out
    assert "[FAIL] group accuracy gap: 87.00 points (A 97.00% n=150 vs tiny 10.00% n=150)" in out
    assert "[ok] validation accuracy" in out and "[ok] per-class recall gap" in out


def test_promote_refuses_a_model_without_validation_figures(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "--models-dir", str(models), "--no-event", "promote", "v1"]) == 1
    assert "cannot judge it" in capsys.readouterr().out
    assert _current(models) == "gendernet-v3"
