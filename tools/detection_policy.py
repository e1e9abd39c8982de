"""Measure the detection policy: face-found rate and speed per long side, and what the fallback costs.

Dev-only tool (not part of any service). It reads photos and measures only things that need no label:
whether YuNet finds a face, and how long it takes. Nothing here looks at gender labels, so choosing the
long side from it does not tune anything on the eval set's answers.

    python tools/detection_policy.py --photos ../shared/data/faces/eval --weights-dir ../shared/weights/yunet

Reports, for the photos given:
1. face-found rate and mean detect time at full size, 640, 320 and 200 px on the long side, and for the
   fallback cascades (640 -> 320 -> 200 is the shipped policy);
2. "far faces": each photo shrunk to 160, 96 or 64 px and pasted into a 640x480 grey frame (a person a
   few metres from a live camera), found at 640 vs 320;
3. empty frames (the photos blurred beyond recognition, at 640x480): what a detect costs without and
   with the fallback, for both backends, and with the worker's budget (fallback_every);
4. ``--parts thresholds``: the YuNet score threshold (0.5 to 0.9; 0.9 is OpenCV's default, 0.6 ours):
   face-found rate with the policy, photos with more than one face (portraits: extra faces are mostly
   false ones) and faces found on blurred photos, unchecked (docs/detection.md, "The score threshold").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.detectors import DetectorConfig, create  # noqa: E402
from shared.detectors.fallback import fallback_stats  # noqa: E402

SIDES = (100_000, 640, 320, 200)  # 100000 = full size (no downscale)
CASCADES: dict[str, tuple[int, ...]] = {
    "640": (640,),
    "320": (320,),
    "640 -> 320": (640, 320),
    "640 -> 320 -> 200": (640, 320, 200),
    "320 -> 200": (320, 200),
    "full": (100_000,),
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _photos(root: Path, limit: int) -> list[Path]:
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return paths[:limit] if limit else paths


def _timed(det: Any, image: npt.NDArray[np.uint8], side: int) -> tuple[bool, float]:
    started = time.perf_counter()
    found = det.detect([image], side)[0]
    return len(found) > 0, time.perf_counter() - started


def measure_sides(raw: Any, images: Sequence[npt.NDArray[np.uint8]]) -> dict[str, Any]:
    found = {s: [] for s in SIDES}  # type: dict[int, list[bool]]
    secs = {s: [] for s in SIDES}  # type: dict[int, list[float]]
    for image in images:
        for side in SIDES:
            ok, dt = _timed(raw, image, side)
            found[side].append(ok)
            secs[side].append(dt)
    out: dict[str, Any] = {}
    for name, cascade in CASCADES.items():
        hits, total = 0, 0.0
        for i in range(len(images)):
            for side in cascade:
                total += secs[side][i]
                if found[side][i]:
                    hits += 1
                    break
        out[name] = {"found_rate": hits / len(images), "ms_per_photo": 1000 * total / len(images)}
    out["recovered_by_fallback"] = sum(
        1 for i in range(len(images)) if not found[640][i] and (found[320][i] or found[200][i])
    )
    out["missed_at_640"] = sum(1 for ok in found[640] if not ok)
    return out


def far_faces(raw: Any, images: Sequence[npt.NDArray[np.uint8]], long_side: int = 160) -> dict[str, float]:
    hits = {640: 0, 320: 0}
    for k, image in enumerate(images):
        scale = long_side / max(image.shape[:2])
        small = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)))
        frame = np.full((480, 640, 3), 90, np.uint8)
        y = (k * 37) % (480 - small.shape[0])
        x = (k * 53) % (640 - small.shape[1])
        frame[y : y + small.shape[0], x : x + small.shape[1]] = small
        for side in hits:
            hits[side] += len(raw.detect([frame], side)[0]) > 0
    return {f"found_rate_at_{side}": hits[side] / len(images) for side in hits}


def blurred(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """A photo at 640x480, blurred beyond recognition: a frame that holds no face."""
    small = cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA)
    return np.asarray(cv2.GaussianBlur(small, (0, 0), 40), np.uint8)


def empty_frames(raw: Any, images: Sequence[npt.NDArray[np.uint8]], n: int) -> list[npt.NDArray[np.uint8]]:
    """Blurred photos in which no face is found at any side (checked)."""
    frames: list[npt.NDArray[np.uint8]] = []
    for image in images:
        frame = blurred(image)
        if all(len(raw.detect([frame], s)[0]) == 0 for s in (640, 320, 200)):
            frames.append(frame)
        if len(frames) == n:
            break
    return frames


def empty_cost(
    name: str, weights_dir: Path, frames: Sequence[npt.NDArray[np.uint8]], rounds: int
) -> dict[str, Any]:
    """ms per empty 640x480 frame: no fallback, fallback on every empty frame, and the worker's budget."""
    variants = {
        "no fallback": ((), 1),
        "fallback every frame": ((320, 200), 1),
        "fallback 1 in 8": ((320, 200), 8),
    }
    dets = {
        k: create(name, DetectorConfig(weights_dir=weights_dir, fallback_sides=s, fallback_every=e))
        for k, (s, e) in variants.items()
    }
    for det in dets.values():
        det.detect([frames[0]])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in dets}
    for _ in range(rounds):  # interleaved, so that load on the machine hits every variant alike
        for key, det in dets.items():
            started = time.perf_counter()
            for frame in frames:
                det.detect([frame])
            times[key].append((time.perf_counter() - started) / len(frames))
    # min over rounds: on a machine shared with other jobs the fastest round is the least disturbed one
    out: dict[str, Any] = {
        k: {"ms_per_frame": 1000 * float(np.min(v)), "ms_per_frame_median": 1000 * float(np.median(v))}
        for k, v in times.items()
    }
    base = out["no fallback"]["ms_per_frame"]
    for key in out:
        out[key]["ratio_to_no_fallback"] = out[key]["ms_per_frame"] / base
        stats = fallback_stats(dets[key])
        out[key]["stats"] = stats.snapshot() if stats else None
    return out


THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
POLICY = (640, 320, 200)


def score_thresholds(
    raw: Any, images: Sequence[npt.NDArray[np.uint8]], empty: Sequence[npt.NDArray[np.uint8]]
) -> dict[str, Any]:
    """Per threshold: found rate with the policy, photos with several faces, faces on empty frames.

    Detected once at the lowest threshold; a higher threshold keeps the faces scoring at least that
    (non-maximum suppression only lets a face suppress lower-scoring ones, so this equals detecting
    at that threshold)."""

    def faces(image: npt.NDArray[np.uint8]) -> list[npt.NDArray[np.float32]]:
        return [raw.detect([image], side)[0].scores for side in POLICY]

    def found(scores: list[npt.NDArray[np.float32]], t: float) -> int:
        """Faces found by the policy: at the first side where any scores at least ``t``."""
        return next((n for n in (int((s >= t).sum()) for s in scores) if n), 0)

    photos = [faces(image) for image in images]
    frames = [faces(frame) for frame in empty]
    return {
        str(t): {
            "found_rate": sum(found(p, t) > 0 for p in photos) / len(images),
            "several_faces": sum(found(p, t) > 1 for p in photos),
            "empty_frames_with_a_face": sum(found(f, t) > 0 for f in frames),
            "faces_on_empty_frames": sum(found(f, t) for f in frames),
        }
        for t in THRESHOLDS
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=Path, required=True, help="folder of photos (searched recursively)")
    p.add_argument("--weights-dir", type=Path, required=True)
    p.add_argument("--limit", type=int, default=0, help="first N photos only (0 = all)")
    p.add_argument("--empty", type=int, default=40, help="empty frames for the cost test")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--parts", default="sides,far,empty", help="what to measure (comma-separated)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    paths = _photos(args.photos, args.limit)
    images = [np.asarray(im, np.uint8) for im in (cv2.imread(str(p)) for p in paths) if im is not None]
    raw = create("cv2-yunet", DetectorConfig(weights_dir=args.weights_dir, fallback_sides=()))
    report: dict[str, Any] = {"photos": str(args.photos), "n": len(images), "threads": args.threads}
    parts = set(args.parts.split(","))
    print(f"{report['n']} photos from {args.photos}, {args.threads} thread(s)")
    if "sides" in parts:
        report["sides"] = measure_sides(raw, images)
        print(f"{'policy (long sides tried)':<22} {'faces found':>12} {'ms/photo':>9}")
        for name in CASCADES:
            row = report["sides"][name]
            print(f"{name:<22} {100 * row['found_rate']:11.2f}% {row['ms_per_photo']:9.2f}")
        print(
            f"missed at 640: {report['sides']['missed_at_640']}, "
            f"recovered by 320/200: {report['sides']['recovered_by_fallback']}"
        )
    if "far" in parts:
        report["far_faces_in_640x480"] = {str(side): far_faces(raw, images, side) for side in (160, 96, 64)}
        for side, row in report["far_faces_in_640x480"].items():
            print(f"far faces (photo shrunk to {side} px in a 640x480 frame): {row}")
    if "empty" in parts:
        frames = empty_frames(raw, images, args.empty)
        report["empty_frames_n"] = len(frames)
        report["empty_frames"] = {
            name: empty_cost(name, args.weights_dir, frames, args.rounds)
            for name in ("cv2-yunet", "torch-yunet")
        }
        for name, rows in report["empty_frames"].items():
            print(f"empty 640x480 frames ({len(frames)}), {name}, fastest of {args.rounds} rounds:")
            for key, row in rows.items():
                print(f"  {key:<22} {row['ms_per_frame']:7.2f} ms/frame  x{row['ratio_to_no_fallback']:.2f}")
    if "thresholds" in parts:
        low = create(
            "cv2-yunet",
            DetectorConfig(weights_dir=args.weights_dir, fallback_sides=(), score_threshold=min(THRESHOLDS)),
        )
        report["thresholds"] = score_thresholds(low, images, [blurred(im) for im in images[: args.empty]])
        print(f"score threshold: faces found, photos with several faces, of {args.empty} blurred frames")
        for t, row in report["thresholds"].items():
            print(
                f"{t:<5} {100 * row['found_rate']:6.2f}% {row['several_faces']:4d} photos, "
                f"{row['empty_frames_with_a_face']} frames with {row['faces_on_empty_frames']} faces"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
