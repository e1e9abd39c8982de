"""Speed of several models side by side, in one run, on one clip: a dev tool for choosing a default.

For each models folder (its ``current`` model) or artifact folder, interleaved over ``--rounds``:

* the classifier alone: ``Classifier.predict`` on uint8 chips at batch 32 (faces/s), as the worker
  calls it (``tools.bench_classifier``);
* the worker's whole ``Pipeline`` (decode, detect, align, classify) on the same clip as
  ``genderlens bench`` (``tools.bench.clip.build_clip`` / ``tools.bench.inprocess.run_pipeline``), best round.

The first model is the baseline: every other gets its frames/s as a fraction of the baseline's, which
is the issue's pipeline target (the default model >= 40% of gendernet's frames/s, same run, same clip).

    python -m tools.bench_models --models models/gender-A models/gender-B --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def _resolve(path: Path) -> Path:
    from trainer.evaluate import resolve_model

    return resolve_model(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_models", description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, nargs="+", required=True, help="artifact or models folders")
    p.add_argument(
        "--photos", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/faces/eval"
    )
    p.add_argument(
        "--weights-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared/weights/yunet"
    )
    p.add_argument("--frames", type=int, default=160)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--detector", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=3.0, help="classifier-alone timing per round")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import cv2

    cv2.setNumThreads(args.threads)
    from shared.models.artifact import load_artifact
    from tools.bench.clip import build_clip
    from tools.bench.inprocess import run_pipeline
    from tools.bench_classifier import bench

    clip = build_clip(args.photos, args.frames)
    paths = [_resolve(m) for m in args.models]
    classifiers = [load_artifact(path) for path in paths]
    best: dict[str, dict[str, Any]] = {}
    for r in range(args.rounds):
        for path, clf in zip(paths, classifiers, strict=True):
            alone = bench(path, args.seconds)
            figures, _ = run_pipeline(
                clip.jpegs, clf, args.detector, args.weights_dir, 0.6, "cpu", args.batch_size
            )
            sys.stderr.write(
                f"round {r + 1} {path.name}: classifier {alone['crops_per_s_batch32']:.0f} faces/s, "
                f"pipeline {figures['fps']:.1f} frames/s\n"
            )
            prev = best.get(path.name)
            best[path.name] = {
                "arch": clf.meta.arch,
                "backbone": clf.meta.backbone,
                "input_size": clf.meta.input_size,
                "weights_mb": round((path / "model.safetensors").stat().st_size / 2**20, 2),
                "classifier_faces_per_s_batch32": max(
                    alone["crops_per_s_batch32"], prev["classifier_faces_per_s_batch32"] if prev else 0.0
                ),
                "pipeline": figures
                if prev is None or figures["fps"] > prev["pipeline"]["fps"]
                else prev["pipeline"],
            }
    base = best[paths[0].name]["pipeline"]["fps"]
    for row in best.values():
        row["pipeline_fps_vs_first"] = round(row["pipeline"]["fps"] / base, 3) if base else None
    report = {
        "threads": args.threads,
        "frames": args.frames,
        "rounds": args.rounds,
        "load_average": os.getloadavg(),
        "models": best,
    }
    lines = [f"{'model':<40} {'faces/s b32':>12} {'frames/s':>9} {'vs first':>9} {'classify ms/frame':>18}"]
    for name, row in best.items():
        lines.append(
            f"{name:<40} {row['classifier_faces_per_s_batch32']:>12.0f} {row['pipeline']['fps']:>9.1f} "
            f"{row['pipeline_fps_vs_first']:>9.2f} {row['pipeline']['stages_ms']['classify']:>18.2f}"
        )
    lines.append(f"load average (1/5/15 min) at the end: {report['load_average']}")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
