"""The promotion gate (trainer/gate.py): a new model is always published, but becomes current only when
it is at least as good as the current one on the validation split and fair enough there.

The case from issue #10: a 2-epoch run that scores about 0.5 went live with no warning and turned every
face `uncertain`. Here it is published, not promoted, with a warning in one block of the trainer's
output and in its report, and a running worker keeps serving the old model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from services.cli import main as cli_main
from shared import constants as C
from shared.models.artifact import current_dir, list_versions, publish_untrained, read_meta, set_current
from shared.models.promotion import NO_BASELINE, RECORDED, SAME_SPLIT, Baseline, GateSettings, decide, gap
from shared.redis_server import RedisServer
from tests.helpers.datasets import copy_rows, manifest_rows, spread
from tests.helpers.paths import REPO, skip_without
from tests.helpers.paths import TRAIN_DIR as TRAIN
from tests.helpers.paths import WEIGHTS_DIR as WEIGHTS
from tests.helpers.processes import genderlens, stop
from tests.helpers.waiting import wait_until

SHIPPED = REPO / "models"

needs_shared = skip_without(TRAIN / "manifest.csv", WEIGHTS)


# -- the decision, on figures ---------------------------------------------------------------------------
def _report(
    acc: float, classes: dict[str, tuple[int, float]], groups: dict[str, tuple[int, float]]
) -> dict[str, Any]:
    return {
        "n": sum(n for n, _ in classes.values()),
        "accuracy": acc,
        "per_class": {k: {"n": n, "accuracy": a} for k, (n, a) in classes.items()},
        "per_group": {k: {"n": n, "accuracy": a} for k, (n, a) in groups.items()},
    }


BALANCED = {"female": (500, 0.9), "male": (500, 0.9)}


def test_quality_check_allows_the_tolerance_and_no_more() -> None:
    base = Baseline(SAME_SPLIT, "gender-old", 0.900, None, "both run on 1000 images")
    settings = GateSettings(tolerance=0.005)
    assert decide(_report(0.895, BALANCED, {}), base, settings).promote
    refused = decide(_report(0.8949, BALANCED, {}), base, settings)
    assert not refused.promote
    assert refused.reasons == [
        "validation accuracy 89.49% is below the current model's 90.00% (same validation images), "
        "by more than the allowed 0.50 points"
    ]
    # No current model: nothing to beat, but fairness is still judged.
    alone = decide(_report(0.5, BALANCED, {}), Baseline(NO_BASELINE, None, None, None, "none"), settings)
    assert alone.promote and alone.checks[0].passed


def test_fairness_checks_judge_only_classes_and_groups_with_enough_images() -> None:
    settings = GateSettings(max_class_gap=0.03, max_group_gap=0.12, min_n=100)
    groups = {"A": (300, 0.95), "B": (200, 0.80), "C": (40, 0.30)}  # C is too small to judge
    decision = decide(
        _report(0.9, {"female": (500, 0.86), "male": (500, 0.94)}, groups),
        Baseline(RECORDED, "old", 0.85, None, "its own split"),
        settings,
    )
    assert not decision.promote
    assert [c.passed for c in decision.checks] == [True, False, False]
    assert decision.reasons == [
        "per-class recall gap 8.00 points (male 94.00% vs female 86.00%) exceeds the limit of 3.00 points",
        "group accuracy gap 15.00 points (A 95.00% vs B 80.00%) exceeds the limit of 12.00 points",
    ]
    assert "not judged (n < 100): C" in decision.checks[2].detail
    summary = decision.to_json()
    assert summary["candidate"]["group_gap"]["worst"] == {"name": "B", "accuracy": 0.8, "n": 200}
    assert summary["comparison"] == RECORDED and summary["settings"]["min_n"] == 100
    assert gap({"A": {"n": 5, "accuracy": 1.0}}, 100)["gap"] is None


# -- on real training runs ------------------------------------------------------------------------------
def _subset(dest: Path, per_class: int) -> Path:
    """UTKFace chips of both classes, with their manifest rows (so groups and ages are known)."""
    rows = manifest_rows(TRAIN)
    picked = []
    for label in ("female", "male"):
        picked += spread([r for r in rows if r["relpath"].startswith(f"{label}/")], per_class)
    return copy_rows(TRAIN, dest, picked)


def _train_args(data: Path, tmp: Path, models: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--epochs", "2", "--batch-size", "16", "--threads", "1",
        "--out", str(models), "--cache-dir", str(tmp / "cache"), "--weights-dir", str(WEIGHTS),
        "--checkpoint-dir", str(tmp / "run"), "--val-fraction", "0.25", "--test-fraction", "0.2", *extra,
    ]  # fmt: skip


@pytest.fixture()
def server(redis7_server: RedisServer) -> RedisServer:
    """A throw-away Redis 7 server (tests/conftest.py)."""
    return redis7_server


def _serving(client: redis.Redis, worker: str) -> str | None:
    value = client.hget(C.worker_key(worker), "model")
    return value.decode() if value else None


@needs_shared
@pytest.mark.slow
def test_two_epoch_run_is_published_not_promoted_and_the_worker_keeps_the_old_model(
    tmp_path: Path, server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    shipped = current_dir(SHIPPED)
    assert shipped is not None
    shutil.copytree(shipped, models / shipped.name)
    set_current(models, shipped.name)
    data = _subset(tmp_path / "data", per_class=60)

    client = redis.Redis.from_url(server.url, socket_timeout=5)
    env = {
        "GENDERLENS_REDIS_URL": server.url,
        "GENDERLENS_MODELS_DIR": str(models),
        "GENDERLENS_WEIGHTS_DIR": str(WEIGHTS),
        "GENDERLENS_MODEL_POLL_S": "0.5",
        "GENDERLENS_TORCH_THREADS": "1",
        "GENDERLENS_DEVICE": "cpu",
    }
    worker = genderlens("infer", "--name", "gate-worker", env=env, log=tmp_path / "worker.log")
    try:
        wait_until(lambda: _serving(client, "gate-worker") == shipped.name, 120, "the worker to serve v1")

        code = cli_main(_train_args(data, tmp_path, models, "--redis-url", server.url))
        out = capsys.readouterr().out
        assert code == 0, out

        new = [m for m in list_versions(models) if m.dirname != shipped.name]
        assert len(new) == 1, "the new model is published"
        candidate = new[0].dirname
        target = current_dir(models)
        assert target is not None and target.name == shipped.name, "but it is not current"

        # One block of the output says so, and why, and how to override.
        block = out[out.index("WARNING: quality gate refused") :]
        assert block.startswith(
            f"WARNING: quality gate refused {candidate}: published, NOT made current "
            f"(current stays {shipped.name})"
        )
        assert "compared with: " + shipped.name + " (same validation images: both run on these" in block
        assert "[FAIL] validation accuracy" in block
        assert "why: validation accuracy" in block
        assert f"genderlens models promote {candidate} --ignore-gate" in block
        assert out.count("quality gate") == 1

        report = json.loads((models / candidate / "report.json").read_text())
        gate = report["gate"]
        assert gate["promote"] is False and gate["comparison"] == SAME_SPLIT
        assert gate["baseline"]["name"] == shipped.name
        assert gate["baseline"]["report"]["n"] == report["validation"]["n"] == gate["candidate"]["n"]
        assert gate["candidate"]["accuracy"] < 0.8 < gate["baseline"]["accuracy"]  # ~0.5 against ~0.95
        assert {"class_gap", "group_gap", "current_class_gap", "current_group_gap"} <= gate[
            "candidate"
        ].keys()

        # Nothing was announced, and the worker keeps the old model through several polls.
        assert client.xlen(C.MODEL_EVENTS_STREAM) == 0
        time.sleep(3.0)
        assert _serving(client, "gate-worker") == shipped.name

        # The override: `models promote ... --ignore-gate` (options after the action) makes it current,
        # and the same worker then swaps to it, so it would have noticed a moved pointer above.
        argv = ["models", "promote", candidate, "--ignore-gate", "--models-dir", str(models)]
        assert cli_main([*argv, "--redis-url", server.url]) == 0
        assert "made current anyway (--ignore-gate)" in capsys.readouterr().out
        wait_until(lambda: _serving(client, "gate-worker") == candidate, 60, "the worker to swap models")
    finally:
        code = stop(worker)
        client.close()
    assert code == 0, (tmp_path / "worker.log").read_text()[-3000:]


@needs_shared
@pytest.mark.slow
def test_gate_judges_fairness_and_runs_a_current_model_with_another_input_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The current model has another input size (80 px): the gate still runs it on this run's
    validation images, through its own contract; a zero group-gap limit makes the fairness check fail."""
    models = tmp_path / "models"
    old = publish_untrained(models, name="wide", version="1", width=8, input_size=80)
    data = _subset(tmp_path / "data", per_class=40)
    args = _train_args(
        data, tmp_path, models, "--no-announce", "--gate-max-group-gap", "0", "--gate-min-n", "1"
    )
    args[args.index("--epochs") + 1] = "1"
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "WARNING: quality gate refused" in out and "[FAIL] group accuracy gap" in out
    target = current_dir(models)
    assert target is not None and target.name == old.dirname
    (candidate,) = [m for m in list_versions(models) if m.dirname != old.dirname]
    gate = json.loads((models / candidate.dirname / "report.json").read_text())["gate"]
    assert gate["comparison"] == SAME_SPLIT and gate["baseline"]["name"] == old.dirname
    assert gate["baseline"]["report"]["n"] == gate["candidate"]["n"] > 0
    worst, best = gate["candidate"]["group_gap"]["worst"], gate["candidate"]["group_gap"]["best"]
    assert gate["candidate"]["group_gap"]["gap"] == pytest.approx(best["accuracy"] - worst["accuracy"])
    assert any(p.name.startswith("crops-") for p in (tmp_path / "cache").iterdir())
    assert len([p for p in (tmp_path / "cache").iterdir() if p.name.startswith("crops-")]) == 2  # 64 + 80 px
    assert read_meta(models / candidate.dirname).input_size == 64
