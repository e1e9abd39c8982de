"""``genderlens models list|promote VERSION|rollback``: manage the ``current`` model pointer.

- ``list``: every version in the models folder, oldest first, the current one marked ``*``.
- ``promote VERSION``: point ``current`` at VERSION (its directory name, or just its version string),
  after loading it exactly as a worker would (metadata contract, weights, probe forward pass), so a
  broken artifact is refused here rather than by every worker.
- ``rollback``: point ``current`` at the newest version created before the current one that loads;
  broken versions in between are skipped with a note (a refused artifact was never served, so
  "previous" means the previous *servable* version).

promote and rollback then announce the change on ``MODEL_EVENTS_STREAM`` (best effort: Redis may be
down, the pointer file is the source of truth and workers poll it anyway) so that workers reload at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from shared import constants as C
from shared.models.artifact import (
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


class ModelsCliSettings(ModelPathsMixin, CommonSettings):
    """``GENDERLENS_MODELS_DIR`` and ``GENDERLENS_REDIS_URL`` (for the model event), like the worker."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", type=Path, help="model artifacts folder (env GENDERLENS_MODELS_DIR)")
    parser.add_argument("--redis-url", help="Redis URL for the model event (env GENDERLENS_REDIS_URL)")
    parser.add_argument(
        "--no-event", action="store_true", help="do not announce the change on Redis (workers still poll)"
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="list model versions, the current one marked *")
    promote = sub.add_parser("promote", help="make VERSION the current model (after loading it)")
    promote.add_argument("version", help="a version's directory name (name-version) or version string")
    promote.add_argument(
        "--force", action="store_true", help="promote even if the artifact fails to load (not advised)"
    )
    sub.add_parser("rollback", help="point current at the previous servable version")


def run(args: argparse.Namespace) -> int:
    settings = ModelsCliSettings.load("models", models_dir=args.models_dir, redis_url=args.redis_url)
    setup_logging(settings.log_level)
    models_dir = settings.models_dir
    if args.action == "list":
        return _list(models_dir)
    if args.action == "promote":
        meta = _find(models_dir, args.version)
        if meta is None:
            return 1
        if not args.force and not _loads(models_dir, meta):
            return 1
        return _point(settings, meta, "promoted", not args.no_event)
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


def _list(models_dir: Path) -> int:
    versions = ordered_versions(models_dir)
    current = _current_name(models_dir)
    if not versions:
        sys.stdout.write(f"no model versions in {models_dir}\n")
        return 0
    for meta in versions:
        mark = "*" if meta.dirname == current else " "
        acc = meta.metrics.get("accuracy", meta.metrics.get("val_accuracy", ""))
        acc_text = f"  acc={acc:.3f}" if isinstance(acc, float) else ""
        sys.stdout.write(
            f"{mark} {meta.dirname}  {meta.created_at}  {meta.arch}  {'/'.join(meta.classes)}{acc_text}\n"
        )
    if current and current not in {m.dirname for m in versions}:
        sys.stdout.write(f"! current points at {current}, which is not a readable artifact\n")
    return 0


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
        _announce(settings, meta)
    return 0


def _announce(settings: ModelsCliSettings, meta: ModelMeta) -> None:
    import redis

    from shared.schema import ModelEvent
    from shared.streams import connect, redact_url

    url = settings.redis_url.get_secret_value()
    event = ModelEvent(name=meta.name, version=meta.version, path=meta.dirname, at=time.time())
    client = connect(url, timeout_s=2.0, name="models-cli")
    try:
        client.xadd(C.MODEL_EVENTS_STREAM, event.to_fields(), maxlen=C.MODEL_EVENTS_MAXLEN, approximate=True)
    except redis.RedisError as exc:
        log.warning(
            "could not announce the change on %s (%s); workers will see it at their next poll",
            redact_url(url),
            exc,
        )
    finally:
        client.close()
