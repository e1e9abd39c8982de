"""``genderlens eval``: end-to-end evaluation on uncropped photos, exactly as serving sees them.

For each photo: detect faces (the serving detection policy: long side 640, and the no-face fallback at
320 then 200, from ``shared.detectors``), take the face whose box centre is nearest the image centre
(ties: the larger), align and crop it with ``shared.preprocess`` and classify it with the artifact. A
photo with no face found counts as an error. Labels come from ``manifest.csv`` (relpath,gender,age,group)
when the folder has one, otherwise from the class folder names; the *source* of a photo is the first
folder below its class folder.

Proxies for photos the model has never seen: every photo is also run, through the same path, as a
grayscale copy and as a darkened (low-light) copy (:data:`VARIANTS`), and the report gives their gaps
to colour. Breakdowns by source, class, group and age band (in numeric order), and calibration (ECE).
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

import cv2
import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from shared.detectors.fallback import FallbackDetector
from shared.models.artifact import ArtifactError, Classifier, current_dir, load_artifact
from shared.preprocess import crop_faces_bgr
from shared.runtime import say, setup_logging
from trainer.data import MANIFEST, DatasetError, Sample, age_band, load_bgr, read_folder
from trainer.faces import central_face, make_detector
from trainer.report import ece, natural_key
from trainer.settings import VARIANT_NAMES, EvalSettings

log = logging.getLogger("trainer.evaluate")

Image = npt.NDArray[np.uint8]

#: The low-light proxy: two stops under in linear light (x0.25), then sensor noise of this many grey
#: levels (seeded per photo, so runs repeat). A phone or webcam in a dim room gives about this.
DARK_GAIN = 0.25
DARK_NOISE = 3.0


def _dark_lut(gain: float) -> npt.NDArray[np.uint8]:
    v = np.arange(256) / 255.0
    linear = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4) * gain
    srgb = np.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.clip(np.round(srgb * 255), 0, 255).astype(np.uint8)


_DARK = _dark_lut(DARK_GAIN)


def grayscale(image: Image, seed: int = 0) -> Image:
    """The photo in black and white (3 equal channels, as a grayscale camera or news photo gives)."""
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return np.asarray(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), dtype=np.uint8)


def darken(image: Image, seed: int = 0) -> Image:
    """The photo as if taken in low light: 2 stops under exposure plus sensor noise."""
    dark = cv2.LUT(image, _DARK).astype(np.float32)
    noise = np.random.default_rng(seed).normal(0.0, DARK_NOISE, image.shape).astype(np.float32)
    return np.asarray(np.clip(np.round(dark + noise), 0, 255), dtype=np.uint8)


def colour(image: Image, seed: int = 0) -> Image:
    return image


#: name -> transform of a BGR photo; "colour" (the photo as it is) comes first and is the reference.
VARIANTS: dict[str, Any] = dict(zip(VARIANT_NAMES, (colour, grayscale, darken), strict=True))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags (generated from :class:`~trainer.settings.EvalSettings`)."""
    EvalSettings.add_arguments(parser)


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
    return {k: _summary(groups[k]) for k in sorted(groups, key=natural_key)}


def _seed(relpath: str) -> int:
    """A per-photo seed that does not depend on Python's hash randomisation."""
    return int.from_bytes(relpath.encode()[-8:].rjust(8, b"\0"), "little") ^ len(relpath)


def evaluate(
    samples: list[Sample],
    clf: Classifier,
    detector: Any,
    batch: int = 32,
    variants: tuple[str, ...] = ("colour",),
) -> tuple[dict[str, list[Outcome]], float, dict[str, dict[str, int]]]:
    """Run the pipeline over every sample once per variant (each photo is read once).

    Returns the outcomes per variant (in sample order), the wall time in seconds, and per variant how
    often the detector's no-face fallback ran and found a face.
    """
    classes = clf.meta.classes
    unknown = sorted({s.label for s in samples} - set(classes))
    if unknown:
        raise DatasetError(f"labels {unknown} are not classes of the model ({classes})")
    outcomes: dict[str, list[Outcome]] = {v: [] for v in variants}
    fallback = {v: {"retried": 0, "recovered": 0} for v in variants}
    stats = detector.stats if isinstance(detector, FallbackDetector) else None
    started = time.perf_counter()
    pending: dict[str, list[tuple[Sample, np.ndarray]]] = {v: [] for v in variants}

    def flush(variant: str) -> None:
        rows = pending[variant]
        if not rows:
            return
        crops = torch.from_numpy(np.stack([c for _, c in rows])).permute(0, 3, 1, 2).contiguous()
        probs = clf.predict(crops).cpu().numpy()
        for (s, _), p in zip(rows, probs, strict=True):
            outcomes[variant].append(Outcome(s, True, classes[int(p.argmax())] == s.label, p.tolist()))
        rows.clear()

    for s in tqdm(samples, desc="eval", unit="img", mininterval=2):
        photo = load_bgr(s.path)
        if photo is None:
            log.warning("unreadable photo counted as an error: %s", s.relpath)
        for variant in variants:
            if photo is None:
                outcomes[variant].append(Outcome(s, False, False, None))
                continue
            image = VARIANTS[variant](photo, _seed(s.relpath))
            before = (stats.retried, stats.recovered) if stats else (0, 0)
            dets = detector.detect([image])[0]
            if stats:
                fallback[variant]["retried"] += stats.retried - before[0]
                fallback[variant]["recovered"] += stats.recovered - before[1]
            pick = central_face(dets, image.shape[1], image.shape[0])
            if pick is None:
                outcomes[variant].append(Outcome(s, False, False, None))
                continue
            meta = clf.meta
            crop = crop_faces_bgr(
                image, dets.landmarks[pick : pick + 1], meta.input_size, meta.margin, meta.template
            )
            pending[variant].append((s, crop[0]))
            if len(pending[variant]) >= batch:
                flush(variant)
    for variant in variants:
        flush(variant)
    order = {s.relpath: i for i, s in enumerate(samples)}
    for rows in outcomes.values():
        rows.sort(key=lambda o: order[o.sample.relpath])
    return outcomes, time.perf_counter() - started, fallback


def _calibration(outcomes: list[Outcome], clf: Classifier) -> dict[str, float]:
    """ECE and the share below the uncertain threshold, over the faces found."""
    found = [o for o in outcomes if o.probs is not None]
    if not found:
        return {"ece": 0.0, "uncertain_rate": 0.0}
    probs = np.array([o.probs for o in found])
    labels = np.array([clf.meta.classes.index(o.sample.label) for o in found], dtype=np.int64)
    return {
        "ece": ece(probs, labels),
        "uncertain_rate": float((probs.max(axis=1) < clf.meta.uncertain_threshold).mean()),
    }


def _variant_json(outcomes: list[Outcome], clf: Classifier) -> dict[str, Any]:
    overall = _summary(outcomes)
    return {
        "images": overall["n"],
        "face_found_rate": overall["face_found_rate"],
        "accuracy": overall["accuracy"],
        **_calibration(outcomes, clf),
        "per_source": _by(outcomes, "source"),
        "per_class": _by(outcomes, "label"),
        "per_group": _by(outcomes, "group"),
        "per_age": _by(outcomes, "age"),
    }


def results_json(
    results: dict[str, list[Outcome]],
    seconds: float,
    clf: Classifier,
    detection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON report. Top level: the colour photos (the keys earlier versions wrote, plus ece,
    uncertain_rate, detection); ``variants``: every other copy with its gaps to colour (points)."""
    colour_rows = results.get("colour") or next(iter(results.values()))
    main = _variant_json(colour_rows, clf)
    out: dict[str, Any] = {
        **{k: main[k] for k in ("images", "face_found_rate", "accuracy")},
        "per_source": main["per_source"],
        "per_class": main["per_class"],
        "per_group": main["per_group"],
        "per_age": main["per_age"],
        "images_per_second": len(colour_rows) * len(results) / seconds if seconds > 0 else 0.0,
        "model": {"name": clf.meta.name, "version": clf.meta.version},
        "ece": main["ece"],
        "uncertain_rate": main["uncertain_rate"],
        "uncertain_threshold": clf.meta.uncertain_threshold,
        "detection": detection or {},
        "variants": {},
    }
    for variant, rows in results.items():
        if variant == "colour":
            continue
        v = _variant_json(rows, clf)
        v["gap_to_colour"] = {
            "accuracy": v["accuracy"] - main["accuracy"],
            "face_found_rate": v["face_found_rate"] - main["face_found_rate"],
            "ece": v["ece"] - main["ece"],
            "per_class": {
                k: row["accuracy"] - main["per_class"][k]["accuracy"]
                for k, row in v["per_class"].items()
                if k in main["per_class"]
            },
        }
        out["variants"][variant] = v
    return out


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


def _parse_sides(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise SystemExit(f"--fallback-sides: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    settings = EvalSettings.from_args("eval", args)
    setup_logging(settings.log_level, replace=False)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    variants = tuple(v.strip() for v in settings.variants.split(",") if v.strip())
    if not variants or any(v not in VARIANTS for v in variants):
        sys.stderr.write(f"error: --variants takes a list from {', '.join(VARIANTS)}\n")
        return 2
    variants = tuple(v for v in VARIANTS if v in variants)  # colour first: the reference
    try:
        clf = load_artifact(resolve_model(settings.model), settings.device)
        samples = read_eval_samples(settings.data)
    except (ArtifactError, DatasetError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if settings.limit:
        samples = samples[: settings.limit]
    sides = _parse_sides(settings.fallback_sides)
    try:
        detector = make_detector(
            settings.detector, settings.weights_dir, settings.score_threshold, settings.max_side, sides
        )
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    try:
        outcomes, seconds, fallback = evaluate(samples, clf, detector, variants=variants)
    except DatasetError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    detection = {
        "detector": settings.detector,
        "max_side": settings.max_side,
        "fallback_sides": list(sides),
        "fallback": fallback,
    }
    result = results_json(outcomes, seconds, clf, detection)
    say("\n".join(_report_lines(settings, result, clf, variants, fallback)))
    if settings.json_out is not None:
        settings.json_out.parent.mkdir(parents=True, exist_ok=True)
        settings.json_out.write_text(json.dumps(result, indent=2) + "\n")
        say(f"wrote {settings.json_out}")
    return 0


def _report_lines(
    settings: EvalSettings,
    result: dict[str, Any],
    clf: Classifier,
    variants: tuple[str, ...],
    fallback: dict[str, dict[str, int]],
) -> list[str]:
    """What ``genderlens eval`` prints: the colour photos' figures and tables, then the proxies."""
    first, sides = variants[0], "/".join(map(str, result["detection"]["fallback_sides"]))
    fired = fallback[first]
    lines = [
        f"model {clf.meta.dirname} ({clf.meta.arch}), detector {settings.detector} "
        f"(long side {settings.max_side}, fallback {sides or 'off'}), data {settings.data}",
        f"images {result['images']}   faces found {100 * result['face_found_rate']:.2f}%   "
        f"accuracy {100 * result['accuracy']:.2f}%   {result['images_per_second']:.1f} images/s"
        + (f" ({len(variants)} copies each)" if len(variants) > 1 else ""),
        f"calibration on faces found: ECE {result['ece']:.4f}; below the uncertain threshold "
        f"{clf.meta.uncertain_threshold:.2f}: {100 * result['uncertain_rate']:.1f}%",
        f"detection fallback ({first}): ran on {fired['retried']} photos with no face at "
        f"{settings.max_side}, found a face in {fired['recovered']}",
    ]
    for title, key in (
        ("per source", "per_source"),
        ("per class", "per_class"),
        ("per group", "per_group"),
        ("per age band", "per_age"),
    ):
        lines += _table(title, result[key])
    if result["variants"]:
        lines.append("proxies for unseen photos (the same photos, the same path; gap = copy minus colour):")
        for name, v in result["variants"].items():
            g = v["gap_to_colour"]
            per_class = ", ".join(f"{k} {100 * d:+.2f}" for k, d in g["per_class"].items())
            lines.append(
                f"  {name:<10} faces found {100 * v['face_found_rate']:6.2f}%  accuracy "
                f"{100 * v['accuracy']:6.2f}% (gap {100 * g['accuracy']:+.2f} points; {per_class})  "
                f"ECE {v['ece']:.4f}  fallback found {fallback[name]['recovered']}"
            )
    return lines
