"""The promotion decision: may a model become ``current``? Judged from validation figures alone (no
torch, no images), so ``genderlens models promote`` and ``genderlens train`` apply the same checks with
the same flags; ``trainer.gate`` measures the like-with-like figures a training run feeds it.

A new model is always published, but it becomes ``current`` only when it is at least as good as the
current one on the validation split, and fair enough there; otherwise the command says why (one block
of its output, and the ``gate`` section of ``report.json``), and ``--ignore-gate`` overrides it.

The checks (defaults, and why, in docs/training.md):

1. **Quality.** Validation accuracy must not fall more than ``tolerance`` below the current model's,
   on the same validation images when the training run could measure that (``trainer.gate``), else
   on the two models' *recorded* validation metrics, and the output says so.
2. **Fairness.** The gap between the best and the worst per-class recall, and between the best and the
   worst group (``group`` of the dataset: race in UTKFace), on validation, must not exceed
   ``max_class_gap`` / ``max_group_gap``. Only classes and groups with at least ``min_n`` validation
   images count: below that a gap is mostly sampling noise.

No current model, or a current model that does not load (workers would not be serving it), is not a
reason to refuse: the quality check passes with a note, and fairness is still checked.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from shared.models.artifact import ModelMeta

#: How the candidate was compared with the current model.
SAME_SPLIT: Final = "same validation images"
RECORDED: Final = "recorded metrics"
NO_BASELINE: Final = "no current model"


@dataclass(frozen=True)
class GateSettings:
    """The gate's limits (fractions, 0..1). Defaults justified in docs/training.md."""

    #: Largest allowed drop in validation accuracy against the current model. 0.005 is about one
    #: standard error of the difference between two similar models on UTKFace's 2,327 validation images.
    tolerance: float = 0.005
    #: Largest allowed gap between the best and worst per-class recall (the project's target for
    #: women vs men is 3 points; the trainer's class-balance offset makes it ~0 on validation).
    max_class_gap: float = 0.03
    #: Largest allowed gap between the best and worst group accuracy. The shipped model has 5.4 points on
    #: validation (9.5 on test); 12 leaves two standard errors of noise above it.
    max_group_gap: float = 0.12
    #: Classes and groups with fewer validation images are listed but not judged.
    min_n: int = 100


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The gate's flags, identical on ``genderlens train`` and ``genderlens models promote``."""
    d = GateSettings()
    p.add_argument(
        "--ignore-gate",
        action="store_true",
        help="make the model current even when the quality/fairness gate refuses it",
    )
    p.add_argument(
        "--gate-tolerance",
        type=float,
        default=d.tolerance,
        help="largest allowed drop in validation accuracy against the current model",
    )
    p.add_argument(
        "--gate-max-class-gap",
        type=float,
        default=d.max_class_gap,
        help="largest allowed gap between best and worst per-class recall on validation",
    )
    p.add_argument(
        "--gate-max-group-gap",
        type=float,
        default=d.max_group_gap,
        help="largest allowed gap between best and worst group accuracy on validation",
    )
    p.add_argument(
        "--gate-min-n",
        type=int,
        default=d.min_n,
        help="classes/groups with fewer validation images are not judged",
    )


def settings_from_args(args: argparse.Namespace) -> GateSettings:
    settings = GateSettings(
        tolerance=args.gate_tolerance,
        max_class_gap=args.gate_max_class_gap,
        max_group_gap=args.gate_max_group_gap,
        min_n=args.gate_min_n,
    )
    for name in ("tolerance", "max_class_gap", "max_group_gap"):
        if not 0.0 <= getattr(settings, name) <= 1.0:
            raise SystemExit(f"--gate-{name.replace('_', '-')} must be between 0 and 1")
    if settings.min_n < 1:
        raise SystemExit("--gate-min-n must be at least 1")
    return settings


# ------------------------------------------------------------------------------------------ decision
@dataclass(frozen=True)
class Baseline:
    """What the candidate is compared with: the current model, and how it was measured."""

    mode: str  #: SAME_SPLIT, RECORDED or NO_BASELINE
    name: str | None  #: the current model's directory name
    accuracy: float | None  #: its validation accuracy (on the same images, or as recorded)
    report: dict[str, Any] | None  #: its validation report (per class, per group...) when known
    note: str  #: how the comparison was made, in words


def gap(rows: dict[str, dict[str, Any]], min_n: int) -> dict[str, Any]:
    """Best-minus-worst accuracy over the rows (class or group -> {n, accuracy}) with n >= min_n."""
    judged = {k: v for k, v in rows.items() if int(v.get("n", 0)) >= min_n}
    small = {k: int(v.get("n", 0)) for k, v in rows.items() if k not in judged}
    if len(judged) < 2:
        return {"gap": None, "best": None, "worst": None, "not_judged": small}
    best = max(judged, key=lambda k: (judged[k]["accuracy"], k))
    worst = min(judged, key=lambda k: (judged[k]["accuracy"], k))

    def row(k: str) -> dict[str, Any]:
        return {"name": k, "accuracy": float(judged[k]["accuracy"]), "n": int(judged[k]["n"])}

    return {
        "gap": float(judged[best]["accuracy"] - judged[worst]["accuracy"]),
        "best": row(best),
        "worst": row(worst),
        "not_judged": small,
    }


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str  #: one line: the figures and the limit
    judged: bool = True  #: False when there was nothing to judge (too few images, no current model)


@dataclass(frozen=True)
class Decision:
    promote: bool  #: every check passed
    reasons: list[str]  #: why not, one sentence per failed check
    checks: list[Check]
    baseline: Baseline
    settings: GateSettings
    candidate: dict[str, Any] = field(default_factory=dict)  #: accuracy, n, class/group gaps

    def to_json(self) -> dict[str, Any]:
        """The ``gate`` section of report.json."""
        base = asdict(self.baseline)
        if base["report"] is not None:
            base["report"] = {k: base["report"][k] for k in ("n", "accuracy", "per_class", "per_group")}
        return {
            "promote": self.promote,
            "reasons": self.reasons,
            "checks": [asdict(c) for c in self.checks],
            "comparison": self.baseline.mode,
            "baseline": base,
            "candidate": self.candidate,
            "settings": asdict(self.settings),
        }

    def lines(self, candidate: str, made_current: bool, override_hint: str) -> list[str]:
        """The block a command prints: verdict, comparison, each check, and what to do."""
        current = self.baseline.name or "none"
        if self.promote:
            head = (
                f"quality gate: passed; {candidate} {'is now current' if made_current else 'may be promoted'}"
            )
        elif made_current:
            head = f"WARNING: quality gate refused {candidate}, made current anyway (--ignore-gate)"
        else:
            head = f"WARNING: quality gate refused {candidate}: published, NOT made current (current stays {current})"
        out = [head, f"  compared with: {current} ({self.baseline.mode}: {self.baseline.note})"]
        out += [
            f"  [{'FAIL' if not c.passed else 'ok' if c.judged else 'n/a'}] {c.name}: {c.detail}"
            for c in self.checks
        ]
        if not self.promote:
            out += [f"  why: {reason}" for reason in self.reasons]
            if not made_current:
                out.append(f"  to make it current anyway: {override_hint}")
        return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _gap_detail(g: dict[str, Any], limit: float, min_n: int, what: str) -> tuple[bool, str]:
    if g["gap"] is None:
        sizes = ", ".join(f"{k} n={n}" for k, n in g["not_judged"].items()) or "none"
        return True, f"not judged: fewer than two {what} with n >= {min_n} ({sizes})"
    best, worst = g["best"], g["worst"]
    text = (
        f"{100 * g['gap']:.2f} points ({best['name']} {_pct(best['accuracy'])} n={best['n']} vs "
        f"{worst['name']} {_pct(worst['accuracy'])} n={worst['n']}), limit {100 * limit:.2f}"
    )
    if g["not_judged"]:
        text += f"; not judged (n < {min_n}): {', '.join(sorted(g['not_judged']))}"
    return g["gap"] <= limit + 1e-12, text


def decide(candidate: dict[str, Any], baseline: Baseline, settings: GateSettings) -> Decision:
    """Judge a candidate from its validation report (accuracy, n, per_class and per_group rows of
    n and accuracy, as the trainer's classification report writes them)."""
    checks: list[Check] = []
    reasons: list[str] = []
    acc = float(candidate["accuracy"])
    if baseline.accuracy is None:
        checks.append(Check("validation accuracy", True, f"{_pct(acc)}; {baseline.note}", judged=False))
    else:
        floor = baseline.accuracy - settings.tolerance
        ok = acc >= floor - 1e-12
        checks.append(
            Check(
                "validation accuracy",
                ok,
                f"{_pct(acc)} vs current {_pct(baseline.accuracy)} "
                f"(allowed drop {100 * settings.tolerance:.2f} points; {baseline.mode})",
            )
        )
        if not ok:
            reasons.append(
                f"validation accuracy {_pct(acc)} is below the current model's {_pct(baseline.accuracy)} "
                f"({baseline.mode}), by more than the allowed {100 * settings.tolerance:.2f} points"
            )
    class_gap = gap(candidate.get("per_class", {}), settings.min_n)
    group_gap = gap(candidate.get("per_group", {}), settings.min_n)
    for name, g, limit, what in (
        ("per-class recall gap", class_gap, settings.max_class_gap, "classes"),
        ("group accuracy gap", group_gap, settings.max_group_gap, "groups"),
    ):
        ok, detail = _gap_detail(g, limit, settings.min_n, what)
        checks.append(Check(name, ok, detail, judged=g["gap"] is not None))
        if not ok:
            reasons.append(
                f"{name} {100 * g['gap']:.2f} points ({g['best']['name']} {_pct(g['best']['accuracy'])} vs "
                f"{g['worst']['name']} {_pct(g['worst']['accuracy'])}) exceeds the limit of "
                f"{100 * limit:.2f} points"
            )
    summary = {
        "accuracy": acc,
        "n": int(candidate.get("n", 0)),
        "class_gap": class_gap,
        "group_gap": group_gap,
    }
    if baseline.report is not None:
        summary["current_class_gap"] = gap(baseline.report.get("per_class", {}), settings.min_n)
        summary["current_group_gap"] = gap(baseline.report.get("per_group", {}), settings.min_n)
    return Decision(not reasons, reasons, checks, baseline, settings, summary)


# ------------------------------------------------------------------------------------------ baselines
def _load_report(artifact: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((artifact / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def recorded_baseline(artifact: Path, meta: ModelMeta, why: str) -> Baseline:
    """The current model's validation figures as its training run recorded them (its own split)."""
    report = (_load_report(artifact) or {}).get("validation")
    accuracy = meta.metrics.get("val_accuracy")
    if not isinstance(accuracy, int | float) and isinstance(report, dict):
        accuracy = report.get("accuracy")
    if not isinstance(accuracy, int | float):
        return Baseline(
            NO_BASELINE, meta.dirname, None, None, f"{why}, and it recorded no validation accuracy"
        )
    n = report.get("n") if isinstance(report, dict) else None
    return Baseline(
        RECORDED,
        meta.dirname,
        float(accuracy),
        report if isinstance(report, dict) else None,
        f"{why}; its own validation split{f' ({n} images)' if n else ''}, not this one: NOT like with like",
    )


def baseline_for_promote(
    models_dir: Path, candidate_report: dict[str, Any], current: Path | None
) -> Baseline:
    """For ``models promote``: reuse the like-with-like figures the candidate's training run measured
    for the model that is current now, if it was the one; otherwise the recorded metrics."""
    from shared.models.artifact import ArtifactError, read_meta

    if current is None or not current.is_dir():
        return Baseline(NO_BASELINE, None, None, None, "there is no current model: nothing to compare with")
    try:
        meta = read_meta(current)
    except ArtifactError as exc:
        return Baseline(
            NO_BASELINE, current.name, None, None, f"the current model does not load ({exc}): nothing to beat"
        )
    gate = candidate_report.get("gate")
    base = gate.get("baseline") if isinstance(gate, dict) else None
    if (
        isinstance(base, dict)
        and base.get("mode") == SAME_SPLIT
        and base.get("name") == current.name
        and isinstance(base.get("accuracy"), int | float)
    ):
        return Baseline(
            SAME_SPLIT,
            current.name,
            float(base["accuracy"]),
            base.get("report") if isinstance(base.get("report"), dict) else None,
            f"as measured when the candidate was trained: {base.get('note', '')}",
        )
    return recorded_baseline(
        current, meta, "the candidate's training run did not evaluate this current model on its images"
    )
