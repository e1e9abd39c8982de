"""Small real datasets for training and evaluation runs: deterministic subsets of the face photos in
../shared, copied into a test's folder (folder per class, with their manifest rows where they have one)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

MANIFEST_FIELDS = ["relpath", "gender", "age", "group"]


def class_subset(source: Path, dest: Path, per_class: int, step: int) -> Path:
    """``dest/female`` and ``dest/male``: every ``step``-th photo of each class of ``source``, at most
    ``per_class`` of them."""
    for label in ("female", "male"):
        (dest / label).mkdir(parents=True)
        for src in sorted((source / label).glob("*.jpg"))[::step][:per_class]:
            shutil.copy(src, dest / label / src.name)
    return dest


def manifest_rows(source: Path) -> list[dict[str, str]]:
    """The rows of ``source/manifest.csv``, in relpath order."""
    with (source / "manifest.csv").open(newline="") as fh:
        return sorted(csv.DictReader(fh), key=lambda r: r["relpath"])


def spread(rows: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """``n`` rows spread evenly over ``rows``."""
    return rows[:: max(1, len(rows) // n)][:n]


def copy_rows(source: Path, dest: Path, rows: list[dict[str, str]]) -> Path:
    """Copy the photos of ``rows`` from ``source`` to ``dest``, with a manifest of just those rows."""
    for r in rows:
        (dest / r["relpath"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / r["relpath"], dest / r["relpath"])
    with (dest / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return dest
