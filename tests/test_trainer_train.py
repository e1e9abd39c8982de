"""A two-epoch training run on a tiny real subset of ../shared, resume, the Redis announcement and the
artifact it publishes (loadable, metadata round-trips)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch

from services.cli import main as cli_main
from shared.models.artifact import ModelMeta, current_dir, list_versions, load_artifact, read_meta
from shared.preprocess import PREPROCESS_VERSION
from tests.helpers.datasets import class_subset
from tests.helpers.paths import REPO, skip_without
from tests.helpers.paths import TRAIN_DIR as TRAIN
from tests.helpers.paths import WEIGHTS_DIR as WEIGHTS
from tests.helpers.redis_servers import redis_url_for_db

needs_shared = skip_without(TRAIN / "female", WEIGHTS)


def _tiny_subset(dest: Path, per_class: int = 24) -> Path:
    class_subset(TRAIN, dest, per_class, step=400)
    (dest / "female" / "corrupt.jpg").write_bytes(b"\xff\xd8\x00 broken")
    (dest / "male" / "notes.txt").write_text("not an image")
    return dest


def _train_args(data: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--epochs", "2", "--batch-size", "16", "--threads", "1",
        "--out", str(tmp / "models"), "--cache-dir", str(tmp / "cache"), "--weights-dir", str(WEIGHTS),
        "--checkpoint-dir", str(tmp / "run"), "--val-fraction", "0.25", "--test-fraction", "0.2", *extra,
    ]  # fmt: skip


@needs_shared
def test_two_epoch_run_publishes_a_loadable_artifact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _tiny_subset(tmp_path / "data")
    url = redis_url_for_db(9)
    assert cli_main(_train_args(data, tmp_path, "--redis-url", url, "--name", "tinytest")) == 0
    out = capsys.readouterr().out
    assert "1 unreadable images skipped" in out and "no detectable face" in out

    models = tmp_path / "models"
    art = current_dir(models)
    assert art is not None and art.is_dir()
    meta = read_meta(art)
    assert meta.name == "tinytest" and meta.classes == ["female", "male"]
    assert meta.preprocess_version == PREPROCESS_VERSION and meta.input_size == 64
    assert meta.data_fingerprint.startswith("sha256:") and meta.training["epochs_run"] == 2
    assert ModelMeta.model_validate_json(meta.model_dump_json()) == meta  # round-trips
    assert json.loads((art / "model.json").read_text())["version"] == meta.version
    for name in ("report.json", "reliability.png", "confusion_matrix.png", "learning_curves.png"):
        assert (art / name).stat().st_size > 100, name
    report = json.loads((art / "report.json").read_text())
    assert {"accuracy", "per_class", "per_group", "per_age", "ece", "confusion_matrix"} <= report[
        "test"
    ].keys()

    clf = load_artifact(art)
    probs = clf.predict(torch.zeros((3, 3, 64, 64), dtype=torch.uint8))
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(1), torch.ones(3))

    # The announcement reached Redis (best effort, but here Redis is up).
    client = redis.Redis.from_url(url)
    try:
        entries = client.xrevrange("genderlens:model-events", count=20)
    finally:
        client.close()
    from shared.schema import ModelEvent

    events = [ModelEvent.from_fields(fields) for _, fields in entries]
    assert any(e.version == meta.version and e.path == meta.dirname for e in events)

    # Second run: the crop cache is hit; resume continues from the saved epoch.
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 2
    args = _train_args(data, tmp_path, "--resume", str(ckpt), "--no-announce")
    args[args.index("--epochs") + 1] = "3"
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "epoch 3:" in out and "epoch 1:" not in out
    assert len(list_versions(models)) == 2


@needs_shared
def test_unreachable_redis_still_publishes(tmp_path: Path) -> None:
    data = _tiny_subset(tmp_path / "data", per_class=8)
    args = _train_args(data, tmp_path, "--redis-url", "redis://127.0.0.1:1/0")
    args[args.index("--epochs") + 1] = "1"
    assert cli_main(args) == 0
    assert current_dir(tmp_path / "models") is not None


def test_python_dash_m_trainer_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--data" in proc.stdout and "--resume" in proc.stdout


def test_empty_class_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d" / "female").mkdir(parents=True)
    (tmp_path / "d" / "male").mkdir(parents=True)
    import cv2
    import numpy as np

    cv2.imwrite(str(tmp_path / "d" / "female" / "a.jpg"), np.zeros((32, 32, 3), np.uint8))
    assert cli_main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "m")]) == 2
    assert "class 'male' has no usable images" in capsys.readouterr().err
