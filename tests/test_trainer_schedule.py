"""The learning-rate schedule: torch's SequentialLR(LinearLR, cosine) gives the rates the trainer's own
formula gave (so a run trains as before), each parameter group decays to the same share of its own peak,
and its state, saved in every checkpoint, makes a resumed run go on exactly as an uninterrupted one."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.cli import main as cli_main
from shared.models.artifact import current_dir
from tests.helpers.paths import TRAIN_DIR as TRAIN
from tests.helpers.paths import WEIGHTS_DIR as WEIGHTS
from tests.helpers.paths import skip_without
from trainer.train import LR_FLOOR, make_scheduler, restore_schedule


def _formula(step: int, total: int, warmup: int, base: float) -> float:
    """The schedule as the trainer wrote it by hand before it used torch's schedulers."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(scales: tuple[float, ...] = (1.0,), base: float = 3e-3) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": s * base, "lr_scale": s} for s in scales]
    return torch.optim.AdamW(groups, lr=base)


def _rates(opt: torch.optim.Optimizer, scheduler: Any, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(
    ("steps_per_epoch", "epochs", "warmup_epochs"), [(146, 40, 1.0), (3, 2, 1.0), (5, 3, 0.0), (7, 4, 0.5)]
)
def test_the_schedule_gives_the_rates_of_the_old_formula(
    steps_per_epoch: int, epochs: int, warmup_epochs: float
) -> None:
    opt = _optimizer((1.0, 0.1))
    scheduler = make_scheduler(opt, steps_per_epoch, epochs, warmup_epochs)
    total, warmup = steps_per_epoch * epochs, int(warmup_epochs * steps_per_epoch)
    for step, (head, backbone) in enumerate(_rates(opt, scheduler, total)):
        want = _formula(step, total, warmup, 3e-3)
        # float32, as the optimiser applies it: the same rate at every step
        assert np.float32(head) == np.float32(want), step
        assert math.isclose(backbone, 0.1 * want, rel_tol=1e-12), step
    assert math.isclose(opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"], 0.1, rel_tol=1e-12)
    assert LR_FLOOR == 0.02


def test_a_resumed_schedule_goes_on_as_an_uninterrupted_one() -> None:
    steps_per_epoch, epochs, stop = 5, 4, 7
    shape = {"steps_per_epoch": steps_per_epoch, "epochs": epochs, "warmup_epochs": 1.0}
    opt = _optimizer((1.0, 0.1))
    whole = _rates(opt, make_scheduler(opt, steps_per_epoch, epochs, 1.0), steps_per_epoch * epochs)

    opt = _optimizer((1.0, 0.1))
    scheduler = make_scheduler(opt, steps_per_epoch, epochs, 1.0)
    first = _rates(opt, scheduler, stop)
    buf = io.BytesIO()
    torch.save({"shape": shape, "state": scheduler.state_dict()}, buf)  # as in the checkpoint
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)

    opt = _optimizer((1.0, 0.1))  # a new process: fresh optimiser and scheduler, then the saved state
    scheduler = make_scheduler(opt, steps_per_epoch, epochs, 1.0)
    restore_schedule(scheduler, saved, shape, stop)
    assert first + _rates(opt, scheduler, steps_per_epoch * epochs - stop) == whole

    # A checkpoint without the state (older ones): the same rates, replayed to the step.
    opt = _optimizer((1.0, 0.1))
    scheduler = make_scheduler(opt, steps_per_epoch, epochs, 1.0)
    restore_schedule(scheduler, None, shape, stop)
    assert first + _rates(opt, scheduler, steps_per_epoch * epochs - stop) == whole


needs_shared = skip_without(TRAIN / "female", WEIGHTS)


def _history(models: Path) -> list[dict[str, float]]:
    art = current_dir(models)
    assert art is not None
    history: list[dict[str, float]] = json.loads((art / "report.json").read_text())["training"]["history"]
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in history]


@needs_shared
def test_an_interrupted_run_resumed_trains_as_an_uninterrupted_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for label in ("female", "male"):
        (data / label).mkdir(parents=True)
        for src in sorted((TRAIN / label).glob("*.jpg"))[::500][:16]:
            shutil.copy(src, data / label / src.name)

    def args(run: str, *extra: str) -> list[str]:
        return [
            "train", "--data", str(data), "--epochs", "3", "--batch-size", "8", "--threads", "1",
            "--out", str(tmp_path / run / "models"), "--cache-dir", str(tmp_path / "cache"),
            "--weights-dir", str(WEIGHTS), "--checkpoint-dir", str(tmp_path / run / "ckpt"),
            "--val-fraction", "0.25", "--test-fraction", "0.2", "--no-announce", "--patience", "9", *extra,
        ]  # fmt: skip

    assert cli_main(args("whole")) == 0
    # Interrupted: the time budget stops it after its first epoch (a checkpoint per epoch).
    assert cli_main(args("parts", "--max-minutes", "0.00001", "--no-publish")) == 0
    checkpoint = torch.load(
        tmp_path / "parts" / "ckpt" / "checkpoint.pt", map_location="cpu", weights_only=True
    )
    assert checkpoint["epoch"] == 0 and checkpoint["schedule"]["state"]["last_epoch"] > 0
    assert cli_main(args("parts", "--resume", str(tmp_path / "parts" / "ckpt" / "checkpoint.pt"))) == 0
    whole, parts = _history(tmp_path / "whole" / "models"), _history(tmp_path / "parts" / "models")
    assert [row["epoch"] for row in parts] == [1, 2, 3]
    assert [row["lr"] for row in parts] == [row["lr"] for row in whole]
    # The same run: the data order and augmentation are seeded per epoch, and the checkpoint holds
    # torch's global generator that dropout draws from, so every epoch's losses are the same.
    assert parts == whole
