"""Model artifacts for tests: small, untrained but complete, published for real; and broken ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.models.artifact import META_FILE, WEIGHTS_FILE, ModelMeta, publish_untrained, set_current


def make_artifact(
    models_dir: Path,
    version: str = "1",
    created_at: str | None = None,
    make_current: bool = True,
    name: str = "gendernet",
) -> ModelMeta:
    """A small, untrained but complete ``gendernet`` (width 8) artifact, published for real; it labels
    every face with a class (no uncertainty threshold)."""
    when: dict[str, Any] = {"created_at": created_at} if created_at else {}  # default: now
    return publish_untrained(
        models_dir,
        name=name,
        version=version,
        width=8,
        seed=sum(version.encode()),
        make_current=make_current,
        std=[0.25, 0.25, 0.25],
        uncertain_threshold=0.0,
        **when,
    )


CORRUPTIONS = ("truncated_weights", "wrong_shapes", "bad_json", "missing_weights")


def make_corrupt_artifact(models_dir: Path, version: str, created_at: str, how: str) -> Any:
    """A published artifact broken in one of ``CORRUPTIONS`` ways, then made current."""
    meta = make_artifact(models_dir, version, created_at, make_current=False)
    folder = models_dir / meta.dirname
    weights, meta_file = folder / WEIGHTS_FILE, folder / META_FILE
    if how == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    elif how == "wrong_shapes":  # metadata says width 16, the weights are width 8
        data = json.loads(meta_file.read_text())
        data["arch_config"] = {"width": 16}
        meta_file.write_text(json.dumps(data))
    elif how == "bad_json":
        meta_file.write_text(meta_file.read_text()[:-40] + "}{")
    elif how == "missing_weights":
        weights.unlink()
    else:
        raise ValueError(how)
    set_current(models_dir, meta.dirname)
    return meta
