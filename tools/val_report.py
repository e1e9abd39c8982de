"""Any published model on the training data's validation split, with the proxies: a dev tool.

Rebuilds the trainer's split (same seeds, fractions and look-alike groups), crops only the validation
images with the model's own contract (its input size, margin and template, ``shared.preprocess``) and
reports accuracy, NLL, ECE, the grayscale / dark proxies (``trainer.proxies``) and the breakdowns per
class, group and age band. This is how models of different architectures (different chips) are
compared for choosing a default, without looking at the evaluation photos.

    python -m tools.val_report --data ../shared/data/faces/train --model models/gender-A models/gender-B
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from shared.models.artifact import Classifier, load_artifact
from shared.preprocess import crop_faces_bgr
from trainer.cache import STATUS_OK
from trainer.data import Catalog, load_bgr, read_dataset
from trainer.evaluate import resolve_model
from trainer.faces import central_face, make_detector
from trainer.proxies import darken, grayscale
from trainer.report import classification_report
from trainer.split import DUP_GROUPS_FILE, make_split, read_duplicate_groups

CHILD_BANDS = ("0-2", "3-9")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.val_report", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the training dataset")
    p.add_argument("--model", type=Path, nargs="+", required=True, help="artifact or models folders")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--status-from",
        type=Path,
        default=None,
        help="a trainer crop-cache folder of this dataset (its status.npy: which images have a face); "
        "default: detect every image",
    )
    p.add_argument("--json", type=Path, default=None)
    return p


@dataclass
class Validation:
    """The trainer's validation split of a dataset: images, the landmarks of their face, breakdowns."""

    catalog: Catalog
    val: list[int]
    landmarks: dict[int, np.ndarray]
    labels: torch.Tensor
    groups: list[str | None]
    ages: list[str | None]


def validation(data: Path, status_from: Path | None) -> Validation:
    """Rebuild the trainer's split (same usable images, seeds, fractions, look-alike groups)."""
    catalog = read_dataset(data, None)
    detector = make_detector()
    if status_from is not None:  # a trainer crop cache of this dataset: same detector, same usable set
        status = np.load(status_from / "status.npy")
        if len(status) != len(catalog.samples):
            raise SystemExit(f"{status_from} is the cache of another dataset")
    else:
        status = np.ones(len(catalog.samples), dtype=np.int8)
        for i, s in enumerate(tqdm(catalog.samples, desc="detect", unit="img", mininterval=5)):
            image = load_bgr(s.path)
            if image is not None and len(detector.detect([image])[0]):
                status[i] = STATUS_OK
    split = make_split(
        catalog.samples,
        np.nonzero(status == STATUS_OK)[0].astype(np.int64),
        read_duplicate_groups(data / DUP_GROUPS_FILE),
        0.1,
        0.1,
        0,
    )
    val = split.val.tolist()
    landmarks: dict[int, np.ndarray] = {}
    for i in val:
        image = load_bgr(catalog.samples[i].path)
        assert image is not None
        dets = detector.detect([image])[0]
        pick = central_face(dets, image.shape[1], image.shape[0])
        assert pick is not None
        landmarks[i] = dets.landmarks[pick : pick + 1]
    return Validation(
        catalog=catalog,
        val=val,
        landmarks=landmarks,
        labels=torch.tensor([catalog.classes.index(catalog.samples[i].label) for i in val]),
        groups=[catalog.samples[i].group for i in val],
        ages=[catalog.samples[i].age for i in val],
    )


def report(v: Validation, clf: Classifier) -> dict[str, Any]:
    """One model on the split, its chips cropped with its own contract."""
    meta = clf.meta
    crops = []
    for i in v.val:
        image = load_bgr(v.catalog.samples[i].path)
        assert image is not None
        crops.append(crop_faces_bgr(image, v.landmarks[i], meta.input_size, meta.margin, meta.template)[0])
    chips = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()

    def probs_of(c: torch.Tensor) -> torch.Tensor:
        return torch.cat([clf.predict(c[j : j + 64]) for j in range(0, len(c), 64)])

    probs = probs_of(chips)
    labels = v.labels
    rep = classification_report(probs.numpy(), labels.numpy(), meta.classes, v.groups, v.ages)
    correct = (probs.argmax(1) == labels).tolist()
    child = [c for c, a in zip(correct, v.ages, strict=True) if a in CHILD_BANDS]
    return {
        "accuracy": rep["accuracy"],
        "nll": float(F.nll_loss(torch.log(probs.clamp_min(1e-12)), labels)),
        "ece": rep["ece"],
        "grayscale": float((probs_of(grayscale(chips)).argmax(1) == labels).float().mean()),
        "dark": float((probs_of(darken(chips)).argmax(1) == labels).float().mean()),
        "children_0_9": sum(child) / max(1, len(child)),
        "per_class": {k: r["accuracy"] for k, r in rep["per_class"].items()},
        "per_group": {k: r["accuracy"] for k, r in rep["per_group"].items()},
        "per_age": {k: r["accuracy"] for k, r in rep["per_age"].items()},
        "n": rep["n"],
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    v = validation(args.data, args.status_from)
    results = {}
    for model_path in args.model:
        clf = load_artifact(resolve_model(model_path))
        meta = clf.meta
        row = results[meta.dirname] = report(v, clf)
        sys.stdout.write(
            f"{meta.dirname} ({meta.arch}, {meta.backbone or 'scratch'}): validation n={row['n']} "
            f"accuracy {100 * row['accuracy']:.2f}% NLL {row['nll']:.4f} ECE {row['ece']:.4f} | grayscale "
            f"{100 * row['grayscale']:.2f} dark {100 * row['dark']:.2f} | children 0-9 "
            f"{100 * row['children_0_9']:.1f} | "
            + ", ".join(f"{k} {100 * x:.1f}" for k, x in {**row["per_class"], **row["per_group"]}.items())
            + " | "
            + ", ".join(f"{k} {100 * x:.1f}" for k, x in row["per_age"].items())
            + "\n"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
