"""``genderlens eval``: end-to-end evaluation on uncropped photos, exactly as serving sees them.

For each photo: detect faces, take the face whose box centre is nearest the image centre (ties: the
larger), align and crop it with ``shared.preprocess`` and classify it with the artifact. A photo with no
face found counts as an error. Labels come from ``manifest.csv`` (relpath,gender,age,group) when the
folder has one, otherwise from the class folder names; the *source* of a photo is the first folder below
its class folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from shared.models.artifact import ArtifactError, Classifier, current_dir, load_artifact
from shared.preprocess import crop_faces_bgr
from trainer.data import MANIFEST, DatasetError, Sample, age_band, load_bgr, read_folder
from trainer.faces import central_face, make_detector
from trainer.report import ece

log = logging.getLogger("trainer.evaluate")

#: Long side frames are downscaled to before detection, for this command. Chosen from the face-found
#: rate alone (not a label): YuNet at 0.6 finds a face in 99.6% of ../shared/data/faces/eval photos at
#: 320 px versus 98.8% at full size (large, close-up faces score low at full size). The serving worker
#: has its own setting (``GENDERLENS_DETECTOR_MAX_SIDE``).
DEFAULT_MAX_SIDE = 320


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="folder of photos: CLASS/[SOURCE/...]/image")
    p.add_argument(
        "--model",
        type=Path,
        default=Path("models"),
        help="artifact directory, or a models directory (its current version is used)",
    )
    p.add_argument("--detector", default="cv2-yunet", help="face detector")
    p.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="detector weights folder (default: $GENDERLENS_WEIGHTS_DIR or ../shared/weights/yunet)",
    )
    p.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="detector score threshold (default: the detector's, 0.6)",
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        help="downscale photos to this long side before detection",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="cpu", help="classifier device")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N photos (0 = all)")


def _say(message: str) -> None:
    sys.stdout.write(message + "\n")


def resolve_model(path: Path) -> Path:
    """An artifact directory, or the version a models directory's ``current`` points at."""
    if (path / "model.json").is_file():
        return path
    target = current_dir(path)
    if target is None:
        raise ArtifactError(f"{path}: neither a model artifact nor a models directory with a current pointer")
    return target


def read_eval_samples(root: Path) -> list[Sample]:
    manifest = root / MANIFEST
    if not manifest.is_file():
        return read_folder(root).samples
    samples = []
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "relpath" not in cols or "gender" not in cols:
            raise DatasetError(f"{manifest}: needs columns relpath,gender[,age,group]; got {cols}")
        for row in reader:
            rel = row["relpath"]
            parts = Path(rel).parts
            samples.append(
                Sample(
                    path=root / rel,
                    label=row["gender"].strip(),
                    relpath=rel,
                    group=(row.get("group") or "").strip() or None,
                    age=age_band(row.get("age")),
                    source=parts[1] if len(parts) > 2 else None,
                )
            )
    if not samples:
        raise DatasetError(f"{manifest}: no rows")
    return samples


@dataclass
class Outcome:
    sample: Sample
    found: bool
    correct: bool
    probs: list[float] | None


def _summary(outcomes: list[Outcome]) -> dict[str, float | int]:
    n = len(outcomes)
    return {
        "n": n,
        "accuracy": sum(o.correct for o in outcomes) / n if n else 0.0,
        "face_found_rate": sum(o.found for o in outcomes) / n if n else 0.0,
    }


def _by(outcomes: list[Outcome], key: str) -> dict[str, dict[str, float | int]]:
    groups: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        value = getattr(o.sample, key)
        if value is not None:
            groups[value].append(o)
    return {k: _summary(v) for k, v in sorted(groups.items())}


def evaluate(
    samples: list[Sample], clf: Classifier, detector: Any, batch: int = 32
) -> tuple[list[Outcome], float]:
    """Run the pipeline over the samples; returns the outcomes and the wall time in seconds."""
    classes = clf.meta.classes
    unknown = sorted({s.label for s in samples} - set(classes))
    if unknown:
        raise DatasetError(f"labels {unknown} are not classes of the model ({classes})")
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    pending: list[tuple[Sample, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        crops = torch.from_numpy(np.stack([c for _, c in pending])).permute(0, 3, 1, 2).contiguous()
        probs = clf.predict(crops).cpu().numpy()
        for (s, _), p in zip(pending, probs, strict=True):
            outcomes.append(Outcome(s, True, classes[int(p.argmax())] == s.label, p.tolist()))
        pending.clear()

    for s in tqdm(samples, desc="eval", unit="img", mininterval=2):
        image = load_bgr(s.path)
        if image is None:
            log.warning("unreadable photo counted as an error: %s", s.relpath)
            outcomes.append(Outcome(s, False, False, None))
            continue
        dets = detector.detect([image])[0]
        pick = central_face(dets, image.shape[1], image.shape[0])
        if pick is None:
            outcomes.append(Outcome(s, False, False, None))
            continue
        meta = clf.meta
        crop = crop_faces_bgr(
            image, dets.landmarks[pick : pick + 1], meta.input_size, meta.margin, meta.template
        )[0]
        pending.append((s, crop))
        if len(pending) >= batch:
            flush()
    flush()
    order = {s.relpath: i for i, s in enumerate(samples)}
    outcomes.sort(key=lambda o: order[o.sample.relpath])
    return outcomes, time.perf_counter() - started


def results_json(outcomes: list[Outcome], seconds: float, clf: Classifier) -> dict[str, Any]:
    overall = _summary(outcomes)
    return {
        "images": overall["n"],
        "face_found_rate": overall["face_found_rate"],
        "accuracy": overall["accuracy"],
        "per_source": _by(outcomes, "source"),
        "per_class": _by(outcomes, "label"),
        "per_group": _by(outcomes, "group"),
        "per_age": _by(outcomes, "age"),
        "images_per_second": len(outcomes) / seconds if seconds > 0 else 0.0,
        "model": {"name": clf.meta.name, "version": clf.meta.version},
    }


def _table(title: str, rows: dict[str, dict[str, float | int]]) -> list[str]:
    if not rows:
        return []
    lines = [f"{title}:"]
    for k, v in rows.items():
        lines.append(
            f"  {k:<18} n={v['n']:<5} accuracy {100 * v['accuracy']:6.2f}%   "
            f"faces found {100 * v['face_found_rate']:6.2f}%"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        clf = load_artifact(resolve_model(args.model), args.device)
        samples = read_eval_samples(args.data)
    except (ArtifactError, DatasetError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if args.limit:
        samples = samples[: args.limit]
    from shared.settings import ModelPathsMixin

    weights_dir = args.weights_dir or ModelPathsMixin().weights_dir
    detector = make_detector(args.detector, weights_dir, args.score_threshold, args.max_side)
    try:
        outcomes, seconds = evaluate(samples, clf, detector)
    except DatasetError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    result = results_json(outcomes, seconds, clf)
    found = [o for o in outcomes if o.probs is not None]
    probs = np.array([o.probs for o in found]) if found else np.zeros((0, len(clf.meta.classes)))
    labels = np.array([clf.meta.classes.index(o.sample.label) for o in found], dtype=np.int64)
    calib = ece(probs, labels) if found else 0.0
    uncertain = float((probs.max(axis=1) < clf.meta.uncertain_threshold).mean()) if found else 0.0
    lines = [
        f"model {clf.meta.dirname} ({clf.meta.arch}), detector {args.detector} "
        f"(max side {args.max_side}), data {args.data}",
        f"images {result['images']}   faces found {100 * result['face_found_rate']:.2f}%   "
        f"accuracy {100 * result['accuracy']:.2f}%   {result['images_per_second']:.1f} images/s",
        f"calibration on faces found: ECE {calib:.4f}; below the uncertain threshold "
        f"{clf.meta.uncertain_threshold:.2f}: {100 * uncertain:.1f}%",
    ]
    for title, key in (
        ("per source", "per_source"),
        ("per class", "per_class"),
        ("per group", "per_group"),
        ("per age band", "per_age"),
    ):
        lines += _table(title, result[key])
    _say("\n".join(lines))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        _say(f"wrote {args.json}")
    return 0
