"""``genderlens models list|promote VERSION|rollback``: manage the ``current`` model pointer.

- ``list``: every version in the models folder, oldest first, the current one marked ``*``: what it is
  (architecture and its config, training mode, input size, size on disk), its validation and test
  accuracy with the split named, when it was made, and what the promotion gate said when it was trained.
  ``--json`` prints the same as JSON.
- ``promote VERSION``: point ``current`` at VERSION (its directory name, or just its version string),
  after loading it exactly as a worker would (metadata contract, weights, probe forward pass), so a
  broken artifact is refused here rather than by every worker; then the promotion gate of
  ``genderlens train`` (``shared.models.promotion``: quality against the current model, fairness
  gaps), with the same override, ``--ignore-gate``.
- ``rollback``: point ``current`` at the newest version created before the current one that loads;
  broken versions in between are skipped with a note (a refused artifact was never served, so
  "previous" means the previous *servable* version). No gate: going back is always allowed.

promote and rollback then announce the change on ``MODEL_EVENTS_STREAM`` (best effort: Redis may be
down, the pointer file is the source of truth and workers poll it anyway) so that workers reload at once.

``--models-dir``, ``--redis-url`` and ``--no-event`` may be given before or after the action.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from shared.models import promotion
from shared.models.artifact import (
    META_FILE,
    ArtifactError,
    ModelMeta,
    current_dir,
    list_versions,
    load_artifact,
    set_current,
)
from shared.runtime import setup_logging
from shared.settings import CommonSettings, ModelPathsMixin

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"


class ModelsCliSettings(ModelPathsMixin, CommonSettings):
    """``GENDERLENS_MODELS_DIR`` and ``GENDERLENS_REDIS_URL`` (for the model event), like the worker."""


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every action takes. On the actions' parsers they default to SUPPRESS, so that a value
    given before the action is not overwritten by the action's default (argparse copies a sub-parser's
    namespace over the parent's)."""
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument(
        "--models-dir", type=Path, help="model artifacts folder (env GENDERLENS_MODELS_DIR)", **default
    )
    parser.add_argument(
        "--redis-url", help="Redis URL for the model event (env GENDERLENS_REDIS_URL)", **default
    )
    parser.add_argument(
        "--no-event",
        action="store_true",
        help="do not announce the change on Redis (workers still poll)",
        **default,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    listing = sub.add_parser(
        "list", help="list model versions, the current one marked *", formatter_class=fmt
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    promote = sub.add_parser(
        "promote",
        help="make VERSION the current model (after loading it and passing the promotion gate)",
        formatter_class=fmt,
    )
    promote.add_argument("version", help="a version's directory name (name-version) or version string")
    promote.add_argument(
        "--force", action="store_true", help="promote even if the artifact fails to load (not advised)"
    )
    promotion.add_arguments(promote)
    rollback = sub.add_parser(
        "rollback", help="point current at the previous servable version (no gate)", formatter_class=fmt
    )
    for action_parser in (listing, promote, rollback):
        _common_options(action_parser, suppress=True)


def run(args: argparse.Namespace) -> int:
    settings = ModelsCliSettings.load("models", models_dir=args.models_dir, redis_url=args.redis_url)
    setup_logging(settings.log_level)
    models_dir = settings.models_dir
    if args.action == "list":
        return _list(models_dir, args.json)
    if args.action == "promote":
        return _promote(settings, args)
    return _rollback(settings, not args.no_event)


def ordered_versions(models_dir: Path) -> list[ModelMeta]:
    """Versions oldest first; created_at has one-second resolution, so the name breaks ties."""
    return sorted(list_versions(models_dir), key=lambda m: (m.created_at, m.dirname))


def _current_name(models_dir: Path) -> str | None:
    try:
        target = current_dir(models_dir)
    except ArtifactError as exc:
        log.warning("%s", exc)
        return None
    return target.name if target else None


# -- list ----------------------------------------------------------------------------------------------
def _read_report(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _disk_size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def _scalar_config(config: dict[str, Any]) -> str:
    """An arch_config as ``k=v`` pairs (nested values summarised), whatever the architecture."""
    parts = []
    for key, value in sorted(config.items()):
        if isinstance(value, dict):
            value = f"{{{len(value)} keys}}"
        elif isinstance(value, list | tuple):
            value = f"[{len(value)}]"
        parts.append(f"{key}={value}")
    text = ",".join(parts)
    return text if len(text) <= 60 else text[:57] + "..."


def _mode(meta: ModelMeta) -> str | None:
    """The training mode (e.g. frozen features vs fine-tuning), wherever a trainer recorded it."""
    training = meta.training if isinstance(meta.training, dict) else {}
    for source in (training, _section(training, "config"), meta.arch_config):
        value = source.get("mode")
        if isinstance(value, str) and value:
            return value
    return None


def describe(meta: ModelMeta, folder: Path, current: str | None) -> dict[str, Any]:
    """What ``models list`` shows about one version, read generically from its metadata (any arch)."""
    metrics = meta.metrics
    report = _read_report(folder)
    splits: dict[str, Any] = {}
    for split, acc_key, n_key, ece_key, report_key in (
        ("validation", "val_accuracy", "val_n", "val_ece", "validation"),
        ("test", "test_accuracy", "test_n", "test_ece", "test"),
    ):
        section = _section(report, report_key)
        acc = metrics.get(acc_key, section.get("accuracy"))
        if isinstance(acc, int | float):
            n = metrics.get(n_key, section.get("n"))
            ece = metrics.get(ece_key, section.get("ece"))
            splits[split] = {
                "accuracy": float(acc),
                "n": n if isinstance(n, int) else None,
                "ece": float(ece) if isinstance(ece, int | float) else None,
            }
    legacy = metrics.get("accuracy")
    if not splits and isinstance(legacy, int | float):
        splits["unknown split"] = {"accuracy": float(legacy), "n": None, "ece": None}
    gate = _section(report, "gate") or None
    backbone = meta.arch_config.get("backbone")
    return {
        "version": meta.dirname,
        "current": meta.dirname == current,
        "created_at": meta.created_at,
        "arch": meta.arch,
        "backbone": backbone if isinstance(backbone, str) else None,
        "arch_config": meta.arch_config,
        "mode": _mode(meta),
        "classes": meta.classes,
        "input_size": meta.input_size,
        "size_bytes": _disk_size(folder),
        "uncertain_threshold": meta.uncertain_threshold,
        "metrics": splits,
        "gate": None if gate is None else ("passed" if gate.get("promote") else "refused"),
    }


def _acc_text(row: dict[str, Any] | None) -> str:
    if not row:
        return "-"
    n = f" n={row['n']}" if row.get("n") else ""
    return f"{100 * row['accuracy']:.2f}%{n}"


def _list(models_dir: Path, as_json: bool) -> int:
    versions = ordered_versions(models_dir)
    current = _current_name(models_dir)
    rows = [describe(meta, models_dir / meta.dirname, current) for meta in versions]
    if as_json:
        sys.stdout.write(
            json.dumps({"models_dir": str(models_dir), "current": current, "versions": rows}, indent=2)
        )
        sys.stdout.write("\n")
        return 0
    if not versions:
        sys.stdout.write(f"no model versions in {models_dir}\n")
        return 0
    table = [["", "VERSION", "CREATED", "ARCH", "MODE", "INPUT", "SIZE", "VAL ACC", "TEST ACC", "GATE"]]
    for row in rows:
        config = _scalar_config(row["arch_config"])
        other = row["metrics"].get("unknown split")
        table.append(
            [
                "*" if row["current"] else "",
                row["version"],
                row["created_at"],
                f"{row['arch']}({config})" if config else row["arch"],
                row["mode"] or "-",
                f"{row['input_size']}px",
                f"{row['size_bytes'] / 1e6:.1f}MB",
                _acc_text(row["metrics"].get("validation")),
                _acc_text(row["metrics"].get("test")) if not other else f"{_acc_text(other)} (split?)",
                row["gate"] or "-",
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:  # "* " or "  " marks the current version, then the aligned columns
        cells = "  ".join(cell.ljust(w) for cell, w in zip(r[1:], widths[1:], strict=True))
        sys.stdout.write(f"{r[0] or ' '} {cells}".rstrip() + "\n")
    sys.stdout.write(
        "VAL ACC: accuracy on the model's own validation split (what the promotion gate compares); "
        "TEST ACC: on its held-out test split; n = images\n"
    )
    if current and current not in {m.dirname for m in versions}:
        sys.stdout.write(f"! current points at {current}, which is not a readable artifact\n")
    return 0


# -- promote ---------------------------------------------------------------------------------------------
def _find(models_dir: Path, wanted: str) -> ModelMeta | None:
    matches = [m for m in ordered_versions(models_dir) if wanted in (m.dirname, m.version)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        log.error("no model version %r in %s (see `genderlens models list`)", wanted, models_dir)
    else:
        log.error("%r is ambiguous: %s", wanted, ", ".join(m.dirname for m in matches))
    return None


def _loads(models_dir: Path, meta: ModelMeta) -> bool:
    """Load the artifact as a worker would (on the CPU); log why when it does not."""
    try:
        load_artifact(models_dir / meta.dirname, "cpu")
    except ArtifactError as exc:
        log.error("refusing %s: %s", meta.dirname, exc)
        return False
    return True


def _candidate_figures(meta: ModelMeta, report: dict[str, Any]) -> dict[str, Any] | None:
    """The candidate's validation figures: its report's validation section, else its recorded
    validation accuracy (no breakdown, so no fairness figures), else None."""
    section = report.get("validation")
    if isinstance(section, dict) and isinstance(section.get("accuracy"), int | float):
        return section
    acc = meta.metrics.get("val_accuracy")
    if isinstance(acc, int | float):
        return {"accuracy": float(acc), "n": 0, "per_class": {}, "per_group": {}}
    return None


def _promote(settings: ModelsCliSettings, args: argparse.Namespace) -> int:
    models_dir = settings.models_dir
    gate_settings = promotion.settings_from_args(args)
    meta = _find(models_dir, args.version)
    if meta is None:
        return 1
    if not args.force and not _loads(models_dir, meta):
        return 1
    try:
        current = current_dir(models_dir)
    except ArtifactError as exc:
        log.warning("%s", exc)
        current = None
    if current is not None and current.name == meta.dirname:
        sys.stdout.write(f"{meta.dirname} is already current\n")
        return 0
    if current is not None and not (current / META_FILE).is_file():
        current = None
    hint = f"genderlens models promote {meta.dirname} --ignore-gate"
    figures = _candidate_figures(meta, _read_report(models_dir / meta.dirname))
    if figures is None:
        sys.stdout.write(
            f"{'WARNING' if args.ignore_gate else 'refused'}: {meta.dirname} has no recorded validation "
            "figures (report.json or metrics.val_accuracy), so the promotion gate cannot judge it\n"
        )
        if not args.ignore_gate:
            sys.stdout.write(f"  to make it current anyway: {hint}\n")
            return 1
        return _point(settings, meta, "promoted (gate ignored)", not args.no_event)
    baseline = promotion.baseline_for_promote(models_dir, _read_report(models_dir / meta.dirname), current)
    decision = promotion.decide(figures, baseline, gate_settings)
    made_current = decision.promote or args.ignore_gate
    sys.stdout.write("\n".join(decision.lines(meta.dirname, made_current, hint)) + "\n")
    if not made_current:
        return 1
    verb = "promoted" if decision.promote else "promoted (gate ignored)"
    return _point(settings, meta, verb, not args.no_event)


# -- rollback ----------------------------------------------------------------------------------------
def _rollback(settings: ModelsCliSettings, announce: bool) -> int:
    models_dir = settings.models_dir
    versions = ordered_versions(models_dir)
    current = _current_name(models_dir)
    names = [m.dirname for m in versions]
    if current in names:
        older = versions[: names.index(current)]
    else:
        # The pointer is missing or names an unreadable artifact: any readable version is older news.
        log.warning(
            "current (%s) is not a readable artifact; rolling back to the newest one that loads", current
        )
        older = versions
    for meta in reversed(older):
        if _loads(models_dir, meta):
            return _point(settings, meta, f"rolled back from {current} to", announce)
        log.warning("skipping %s on rollback: it does not load", meta.dirname)
    log.error("nothing to roll back to: no servable version older than %s", current)
    return 1


def _point(settings: ModelsCliSettings, meta: ModelMeta, verb: str, announce: bool) -> int:
    set_current(settings.models_dir, meta.dirname)
    log.info("%s %s", verb, meta.dirname)
    sys.stdout.write(f"current -> {meta.dirname}\n")
    if announce:
        from shared.events import announce_model

        url = settings.redis_url.get_secret_value()
        announce_model(url, meta, timeout_s=2.0, client_name="models-cli")
    return 0
