"""Head settings for a frozen backbone, compared on the validation split only: a dev tool.

Reuses what a ``genderlens train --arch dlib_resnet`` run cached (aligned chips, embedding views) and
adds the validation proxies as views (``gray``, ``dark``: ``trainer.proxies``). For every variant
(training views, head width, weight decay, age-band weighting) it fits the head exactly as the trainer
does (``trainer.features.fit_head``) and prints validation accuracy, NLL, the proxies, women vs men,
the worst race group and children 0-9. The evaluation photos are never read.

    python -m tools.head_sweep --data ../shared/data/faces/train --json sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.models.archs import build_model
from trainer.cache import build_or_load
from trainer.data import read_dataset
from trainer.faces import make_detector
from trainer.features import extract_view, fit_head, weights_digest
from trainer.pretrained import BACKBONES, backbone_state
from trainer.report import classification_report
from trainer.split import DUP_GROUPS_FILE, make_split, read_duplicate_groups

CHILD_BANDS = ("0-2", "3-9")


@dataclass
class Features:
    """Embeddings of the training views and the validation proxies, with what the rows report on."""

    classes: list[str]
    train_views: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]  #: color, gray, dark
    y_train: torch.Tensor
    y_val: torch.Tensor
    ages: list[str | None]  #: of the training images
    val_groups: list[str | None]
    val_ages: list[str | None]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.head_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--arch", default="dlib_resnet")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/trainer"))
    p.add_argument("--feature-views", type=int, default=2)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    return p


def features(args: argparse.Namespace) -> Features:
    """The trainer's cache and split for ``args.data``, and every view embedded once (cached)."""
    spec = BACKBONES[args.arch]
    catalog = read_dataset(args.data, None)
    cache = build_or_load(
        catalog, args.cache_dir, make_detector(), spec.input_size, 1.0, "skip", spec.template
    )
    split = make_split(
        catalog.samples,
        np.nonzero(cache.usable)[0].astype(np.int64),
        read_duplicate_groups(args.data / DUP_GROUPS_FILE),
        0.1,
        0.1,
        0,
    )
    model = build_model(args.arch, len(catalog.classes))
    model.backbone.load_state_dict(backbone_state(args.arch))  # type: ignore[union-attr]
    model.eval()
    crops = torch.from_numpy(cache.crops)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    root = args.cache_dir / "features" / f"{cache.path.name}-{weights_digest(model.backbone)}"  # type: ignore[arg-type]
    both = np.concatenate([split.train, split.val])
    dev = torch.device("cpu")

    def view(name: str, idx: np.ndarray) -> torch.Tensor:
        return extract_view(model.embed, crops, idx, name, root / name, mean, std, dev).values  # type: ignore[arg-type]

    n_train = len(split.train)
    plain = view("plain", both)
    train_views = {"plain": plain[:n_train], "flip": view("flip", split.train)}
    for k in range(args.feature_views):
        train_views[f"aug{k + 1}"] = view(f"aug{k + 1}", split.train)
    labels = torch.tensor([catalog.classes.index(s.label) for s in catalog.samples])
    return Features(
        classes=catalog.classes,
        train_views=train_views,
        val={"color": plain[n_train:], "gray": view("gray", split.val), "dark": view("dark", split.val)},
        y_train=labels[torch.from_numpy(split.train)],
        y_val=labels[torch.from_numpy(split.val)],
        ages=[catalog.samples[i].age for i in split.train.tolist()],
        val_groups=[catalog.samples[i].group for i in split.val.tolist()],
        val_ages=[catalog.samples[i].age for i in split.val.tolist()],
    )


def variants(train_views: dict[str, torch.Tensor]) -> Iterator[tuple[str, list[str], int, float, str]]:
    """(views name, views, head width, weight decay, weighting): the view comparison at the default
    head, every head setting on all views."""
    view_sets = {"plain": ["plain"], "plain+flip": ["plain", "flip"], "all views": list(train_views)}
    for (vs_name, vs), hidden, wd, weighting in itertools.product(
        view_sets.items(), (0, 256), (1e-4, 0.05), ("none", "age-balanced")
    ):
        if vs_name == "all views" or not (hidden or weighting != "none" or wd != 0.05):
            yield vs_name, vs, hidden, wd, weighting


def fit_variant(
    f: Features, arch: str, epochs: int, views: list[str], hidden: int, wd: float, weighting: str
) -> dict[str, Any]:
    """Fit one head exactly as the trainer does and measure it on the validation split."""
    x = torch.cat([f.train_views[v] for v in views])
    y = f.y_train.repeat(len(views))
    w = None
    if weighting == "age-balanced":  # every age band weighs as much in total (capped at 4x)
        band_counts: dict[str | None, int] = {}
        for a in f.ages:
            band_counts[a] = band_counts.get(a, 0) + 1
        per = torch.tensor([min(4.0, max(band_counts.values()) / band_counts[a]) for a in f.ages])
        w = (per / per.mean()).repeat(len(views))
    torch.manual_seed(0)
    head = build_model(arch, 2, hidden=hidden).head
    assert isinstance(head, nn.Module)
    fit = fit_head(head, x, y, f.val["color"], f.y_val, epochs=epochs, weight_decay=wd, sample_weight=w)
    head.load_state_dict(fit.state)
    head.eval()
    with torch.no_grad():
        logits = {k: head(v) for k, v in f.val.items()}
    probs = torch.softmax(logits["color"], 1).numpy()
    rep = classification_report(probs, f.y_val.numpy(), f.classes, f.val_groups, f.val_ages)
    child = [
        c
        for c, a in zip((logits["color"].argmax(1) == f.y_val).tolist(), f.val_ages, strict=True)
        if a in CHILD_BANDS
    ]
    return {
        "val_acc": rep["accuracy"],
        "val_nll": float(F.cross_entropy(logits["color"], f.y_val)),
        "gray_acc": float((logits["gray"].argmax(1) == f.y_val).float().mean()),
        "dark_acc": float((logits["dark"].argmax(1) == f.y_val).float().mean()),
        "female": rep["per_class"]["female"]["accuracy"],
        "male": rep["per_class"]["male"]["accuracy"],
        "worst_group": min(v["accuracy"] for v in rep["per_group"].values()),
        "children_0_9": sum(child) / len(child),
        "per_age": {k: round(v["accuracy"], 4) for k, v in rep["per_age"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    f = features(args)
    rows: list[dict[str, Any]] = []
    for vs_name, vs, hidden, wd, weighting in variants(f.train_views):
        row: dict[str, Any] = {"views": vs_name, "hidden": hidden, "weight_decay": wd, "weighting": weighting}
        row |= fit_variant(f, args.arch, args.epochs, vs, hidden, wd, weighting)
        rows.append(row)
        sys.stdout.write(
            f"{vs_name:<11} hidden {hidden:<4} wd {wd:<6} {weighting:<13} val {100 * row['val_acc']:.2f} "
            f"nll {row['val_nll']:.4f} gray {100 * row['gray_acc']:.2f} dark {100 * row['dark_acc']:.2f} "
            f"F {100 * row['female']:.1f} M {100 * row['male']:.1f} worst group {100 * row['worst_group']:.1f} "
            f"children 0-9 {100 * row['children_0_9']:.1f}\n"
        )
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
