"""``python -m trainer.ensemble``: combine published gendernet artifacts into one ensemble artifact.

The members must have been trained on the same dataset with the same split seed (so none of them saw the
validation or test images) and share input size, framing, normalisation and classes. The ensemble
averages the members' logits; it is re-calibrated on the validation split (class-balance bias and
temperature, folded into every member's last layer), reported on the test split and published like a
trained model.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.models.archs import build_model
from shared.models.artifact import ModelMeta, load_artifact, new_version, publish
from shared.preprocess import PREPROCESS_VERSION
from trainer.cache import build_or_load
from trainer.data import FORMATS, read_dataset
from trainer.evaluate import resolve_model
from trainer.faces import make_detector
from trainer.report import classification_report, plots, to_json
from trainer.split import DUP_GROUPS_FILE, make_split, read_duplicate_groups
from trainer.train import (
    _git_commit,
    announce,
    balance_bias,
    fit_temperature,
    fold_calibration,
    predict_logits,
    uncertain_threshold,
)

log = logging.getLogger("trainer.ensemble")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--members", type=Path, nargs="+", required=True, help="artifact directories to combine")
    p.add_argument("--data", type=Path, required=True, help="the dataset the members were trained on")
    p.add_argument("--format", choices=FORMATS, default=None)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/trainer"))
    p.add_argument("--weights-dir", type=Path, default=None)
    p.add_argument("--detector", default="cv2-yunet")
    p.add_argument("--out", type=Path, default=Path("models"))
    p.add_argument("--name", default="gender")
    p.add_argument("--no-current", action="store_true")
    p.add_argument("--no-announce", action="store_true")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--flip-tta",
        action="store_true",
        help="also average each crop with its mirror image "
        "(twice the compute; the members' own setting is ignored)",
    )


def _say(message: str) -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    members = [load_artifact(resolve_model(p)) for p in args.members]
    first = members[0].meta
    keys = ("input_size", "margin", "mean", "std", "classes", "preprocess_version", "data_fingerprint")
    for m in members:
        if m.meta.arch != "gendernet":
            raise SystemExit(f"{m.path}: only gendernet members can be combined, not {m.meta.arch}")
        for k in keys:
            if getattr(m.meta, k) != getattr(first, k):
                raise SystemExit(f"{m.path}: {k} differs from {members[0].path}")
        if m.meta.arch_config.get("width", 32) != first.arch_config.get("width", 32):
            raise SystemExit(f"{m.path}: width differs")
    config: dict[str, Any] = {
        "members": len(members),
        "width": first.arch_config.get("width", 32),
        "flip_tta": bool(args.flip_tta),
    }
    model = build_model("gendernet_ensemble", len(first.classes), **config)
    state = {f"members.{i}.{k}": v for i, m in enumerate(members) for k, v in m.module.state_dict().items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    for m in members:
        setattr(m.module, "flip_tta", bool(args.flip_tta))  # noqa: B010 (members scored as they serve)

    catalog = read_dataset(args.data, args.format)
    if catalog.classes != first.classes:
        raise SystemExit(f"dataset classes {catalog.classes} differ from the members' {first.classes}")
    from shared.settings import CommonSettings, ModelPathsMixin

    class _Settings(CommonSettings, ModelPathsMixin):
        pass

    settings = _Settings()
    detector = make_detector(args.detector, args.weights_dir or settings.weights_dir)
    cache = build_or_load(catalog, args.cache_dir, detector, first.input_size, first.margin)
    if cache.fingerprint != first.data_fingerprint:
        raise SystemExit("the dataset's fingerprint differs from the one the members were trained on")
    usable = np.nonzero(cache.usable)[0].astype(np.int64)
    dup_path = args.data / DUP_GROUPS_FILE if args.data.is_dir() else args.data.parent / DUP_GROUPS_FILE
    split = make_split(
        catalog.samples, usable, read_duplicate_groups(dup_path), args.val_fraction, args.test_fraction,
        args.split_seed,
    )  # fmt: skip
    for m in members:
        trained_split = m.meta.training.get("config", {}).get(
            "split_seed", m.meta.training.get("config", {}).get("seed")
        )
        if trained_split != args.split_seed:
            raise SystemExit(f"{m.path} was trained with split seed {trained_split}, not {args.split_seed}")
    labels_all = torch.tensor([first.classes.index(s.label) for s in catalog.samples], dtype=torch.long)
    crops = torch.from_numpy(cache.crops)
    device = torch.device("cpu")
    mean = torch.tensor(first.mean).view(1, 3, 1, 1)
    std = torch.tensor(first.std).view(1, 3, 1, 1)
    val_labels = labels_all[torch.from_numpy(split.val)]

    val_logits = predict_logits(model, crops, split.val, mean, std, device)
    bias = balance_bias(val_logits, val_labels)
    shift = torch.zeros(len(first.classes))
    if len(first.classes) == 2:
        shift[1] = bias
    temperature = fit_temperature(val_logits + shift, val_labels)
    fold_calibration(model, shift, temperature)
    val_probs = torch.softmax(predict_logits(model, crops, split.val, mean, std, device), dim=1)
    threshold = uncertain_threshold(val_probs, val_labels)
    test_probs = torch.softmax(predict_logits(model, crops, split.test, mean, std, device), dim=1).numpy()
    test_labels = labels_all[torch.from_numpy(split.test)].numpy()
    groups = [catalog.samples[i].group for i in split.test.tolist()]
    ages = [catalog.samples[i].age for i in split.test.tolist()]
    report = classification_report(test_probs, test_labels, first.classes, groups, ages)
    val_report = classification_report(
        val_probs.numpy(), val_labels.numpy(), first.classes,
        [catalog.samples[i].group for i in split.val.tolist()], [catalog.samples[i].age for i in split.val.tolist()],
    )  # fmt: skip
    conf = test_probs.max(axis=1)
    report["uncertain_rate"] = float((conf < threshold).mean())
    for i, m in enumerate(members):
        single = torch.softmax(predict_logits(m.module, crops, split.test, mean, std, device), dim=1).numpy()
        report[f"member_{i}_accuracy"] = float((single.argmax(1) == test_labels).mean())
    _say(
        f"ensemble of {len(members)}: bias {bias:+.3f}, temperature {temperature:.3f}, uncertain below "
        f"{threshold:.2f}; test accuracy {report['accuracy']:.4f} (members: "
        + ", ".join(f"{report[f'member_{i}_accuracy']:.4f}" for i in range(len(members)))
        + f"), ECE {report['ece']:.4f}"
    )
    member_training = [m.meta.training for m in members]
    training = {
        "command": " ".join(["python -m trainer.ensemble", *sys.argv[1:]]),
        "members": [m.meta.dirname for m in members],
        "member_training": member_training,
        "wall_time_s": round(
            sum(t.get("wall_time_s", 0.0) for t in member_training) + time.time() - started, 1
        ),
        "config": {"split_seed": args.split_seed, **config},
        "calibration": {"bias_class1": bias, "temperature": temperature},
    }
    meta = ModelMeta(
        name=args.name, version=new_version(), arch="gendernet_ensemble", arch_config=config,
        classes=first.classes, input_size=first.input_size, margin=first.margin, mean=first.mean, std=first.std,
        preprocess_version=PREPROCESS_VERSION, uncertain_threshold=threshold,
        metrics={
            "test_accuracy": report["accuracy"], "test_ece": report["ece"], "test_n": report["n"],
            "val_accuracy": val_report["accuracy"], "val_ece": val_report["ece"],
            "per_class": {k: v["accuracy"] for k, v in report["per_class"].items()},
            "per_group": {k: v["accuracy"] for k, v in report["per_group"].items()},
            "per_age": {k: v["accuracy"] for k, v in report["per_age"].items()},
        },
        data_fingerprint=cache.fingerprint, git_commit=_git_commit(), training=training,
    )  # fmt: skip
    history: list[dict[str, float]] = []
    full = {"test": report, "validation": val_report, "training": training}
    extra = {"report.json": to_json(full), **plots(report, history)}
    path = publish(args.out, model, meta, make_current=not args.no_current, extra_files=extra)
    _say(f"published {path}{'' if args.no_current else ' (current)'}")
    if not args.no_announce and not args.no_current:
        announce(args.redis_url or settings.redis_url.get_secret_value(), meta, settings.redis_timeout_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.ensemble", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
