"""The end of a training run: the artifact's metadata (its contract, metrics and provenance), publishing
it, the promotion gate's verdict, and the announcement on Redis.

A trained model is always published (atomically, ``shared.models.artifact.publish``), but it becomes
``current`` only when the promotion gate passes it (``shared.models.promotion``, on the like-with-like
figures of ``trainer.gate``), or with ``--ignore-gate``; then running workers are told at once
(``shared.events``; best effort, they poll ``current`` anyway).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from torch import nn

from shared.events import announce_model
from shared.fsutil import atomic_write
from shared.models.artifact import ModelMeta, new_version, publish
from shared.models.promotion import Baseline, decide
from shared.preprocess import PREPROCESS_VERSION
from shared.runtime import say
from trainer.report import plots, to_json
from trainer.settings import TrainSettings


def git_commit() -> str | None:
    """The trainer's git commit, ``-dirty`` when trainer/ or shared/ have local changes; None outside
    a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "trainer", "shared"],
            cwd=here.parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


def command_line() -> str:
    """How this run was started, for the model card (``genderlens train ...`` or ``python -m trainer``)."""
    argv = sys.argv
    if argv[1:2] == ["train"]:
        return " ".join(["genderlens", *argv[1:]])
    return " ".join(["python -m trainer", *argv[1:]])


def metrics(report: dict[str, Any], val_report: dict[str, Any]) -> dict[str, Any]:
    """The artifact's headline figures: test and validation accuracy and ECE, test breakdowns."""
    return {
        "test_accuracy": report["accuracy"],
        "test_ece": report["ece"],
        "test_n": report["n"],
        "val_accuracy": val_report["accuracy"],
        "val_ece": val_report["ece"],
        "per_class": {k: v["accuracy"] for k, v in report["per_class"].items()},
        "per_group": {k: v["accuracy"] for k, v in report["per_group"].items()},
        "per_age": {k: v["accuracy"] for k, v in report["per_age"].items()},
    }


def artifact_meta(
    settings: TrainSettings,
    config: dict[str, Any],
    classes: list[str],
    *,
    mode: str,
    backbone: str | None,
    cpu_bf16: bool,
    mean_std: tuple[list[float], list[float]],
    threshold: float,
    fingerprint: str,
    git_commit: str | None,
    full_report: dict[str, Any],
) -> ModelMeta:
    """The new version's metadata: its serving contract (architecture, classes, chip, normalisation,
    threshold), its figures and how it was made (the report's ``training`` section, less the history)."""
    training = full_report["training"]
    return ModelMeta(
        name=settings.name,
        version=new_version(),
        arch=config["arch"],
        arch_config=config["arch_config"],
        classes=classes,
        input_size=config["input_size"],
        template=config["template"],
        backbone=backbone,
        mode=mode,
        cpu_bf16=cpu_bf16,
        margin=config["margin"],
        mean=mean_std[0],
        std=mean_std[1],
        preprocess_version=PREPROCESS_VERSION,
        uncertain_threshold=threshold,
        metrics=metrics(full_report["test"], full_report["validation"]),
        data_fingerprint=fingerprint,
        git_commit=git_commit,
        training={k: v for k, v in training.items() if k != "history"},
    )


def write_report(folder: Path, full_report: dict[str, Any], history: list[dict[str, float]]) -> None:
    """``--no-publish``: the report and its plots in the run's folder, nothing published."""
    atomic_write(folder / "report.json", to_json(full_report))
    for fname, data in plots(full_report["test"], history).items():
        atomic_write(folder / fname, data)
    say(f"not published; report in {folder}")


def publish_gated(
    settings: TrainSettings,
    model: nn.Module,
    meta: ModelMeta,
    full_report: dict[str, Any],
    history: list[dict[str, float]],
    baseline: Baseline,
) -> Path:
    """Judge the model against ``baseline`` (the gate's verdict goes into its report), publish it,
    make it current if the gate passed (or ``--ignore-gate``; never with ``--no-current``), print
    the verdict, and announce it when it became current."""
    decision = decide(full_report["validation"], baseline, settings.gate)
    full_report["gate"] = decision.to_json()
    make_current = not settings.no_current and (decision.promote or settings.ignore_gate)
    extra = {"report.json": to_json(full_report), **plots(full_report["test"], history)}
    path = publish(settings.out, model.cpu(), meta, make_current=make_current, extra_files=extra)
    say(f"published {path}{' (current)' if make_current else ''}")
    hint = f"genderlens models promote {meta.dirname} --ignore-gate --models-dir {settings.out}"
    say("\n".join(decision.lines(meta.dirname, make_current, hint)))
    if not settings.no_announce and make_current:
        url = settings.redis_url.get_secret_value()
        announce_model(url, meta, timeout_s=settings.redis_timeout_s, client_name="trainer")
    return path
