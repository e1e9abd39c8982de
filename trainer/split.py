"""Train / validation / test split that keeps look-alike groups on one side, stratified by class and group.

Near-duplicates (``near_duplicate_groups_phash.csv``: group_id,relpath) are merged into one *unit* that
goes to one side as a whole. Units are stratified by (class, group) of their first member, shuffled with
the seed, and the first ``val`` and ``test`` fractions of each stratum (counted in images) go to
validation and test.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from trainer.data import Sample

log = logging.getLogger(__name__)

DUP_GROUPS_FILE: Final = "near_duplicate_groups_phash.csv"


@dataclass(frozen=True)
class Split:
    train: npt.NDArray[np.int64]
    val: npt.NDArray[np.int64]
    test: npt.NDArray[np.int64]


def read_duplicate_groups(path: Path) -> dict[str, str]:
    """relpath -> group id from a ``group_id,relpath`` CSV (missing file: no groups)."""
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {row["relpath"]: row["group_id"] for row in csv.DictReader(fh)}


def make_split(
    samples: list[Sample],
    indices: npt.NDArray[np.int64],
    dup_groups: dict[str, str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> Split:
    """Split the samples at ``indices`` (the usable ones)."""
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("need 0 < val < 1, 0 <= test < 1 and val + test < 1")
    units: dict[str, list[int]] = defaultdict(list)
    for i in indices.tolist():
        s = samples[i]
        gid = dup_groups.get(s.relpath)
        units[f"dup:{gid}" if gid is not None else f"img:{i}"].append(i)
    strata: dict[tuple[str, str], list[list[int]]] = defaultdict(list)
    for members in units.values():
        first = samples[members[0]]
        strata[(first.label, first.group or "")].append(members)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for key in sorted(strata):
        group_units = strata[key]
        order = rng.permutation(len(group_units))
        total = sum(len(u) for u in group_units)
        n_val, n_test = round(total * val_fraction), round(total * test_fraction)
        taken_val = taken_test = 0
        for j in order.tolist():
            unit = group_units[j]
            if taken_val < n_val:
                val.extend(unit)
                taken_val += len(unit)
            elif taken_test < n_test:
                test.extend(unit)
                taken_test += len(unit)
            else:
                train.extend(unit)
    split = Split(
        np.array(sorted(train), dtype=np.int64),
        np.array(sorted(val), dtype=np.int64),
        np.array(sorted(test), dtype=np.int64),
    )
    log.info(
        "split: %d train / %d val / %d test (%d look-alike groups kept whole)",
        len(split.train),
        len(split.val),
        len(split.test),
        sum(1 for k in units if k.startswith("dup:")),
    )
    return split
