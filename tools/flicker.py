"""Measure label flicker on a real clip: raw per-frame labels vs the viewer's tracked, smoothed labels.

    python -m tools.flicker --models-dir models --weights-dir ../shared/weights/yunet
    python -m tools.flicker --cuts     # every person replaced by the next in the same place

1. A clip is made from real photos (``../shared/data/faces/eval``): each photo is filmed for a few
   seconds with a slow zoom and pan plus sensor noise and MJPG compression, so every frame differs a
   little, as on a live camera; faces are found and classified per frame by the same pipeline the
   workers run (YuNet + the current model).
2. The results are replayed through two :class:`FaceTracker` instances: ``smooth=False`` shows what a
   per-frame label display would do, ``smooth=True`` what the wall shows. A third replay delivers the
   results out of order, as several workers would.
3. Flicker = changes of the shown label per track per minute of track time.

With ``--cuts`` each photo is filmed in the same place as the one before (a cut in a video; a person
leaving and another sitting down; genders alternate), and the replay also measures how long the
previous person's label stays on the new one (``wrong_after_cut_s``), with the tracker's identity
checks (appearance signatures of the face crops, class probabilities) on and off (``*_before``).

A development tool (in ``tools/``, in no image): it runs the inference pipeline (torch) and replays
its results through the viewer's tracker; no service imports it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from services.viewer.appearance import Signature, signatures_from_jpeg
from services.viewer.tracker import FaceTracker, threshold_of
from shared.constants import NO_MODEL, UNCERTAIN
from shared.runtime import setup_logging
from shared.schema import ModelRef, Result, Timestamps

log = logging.getLogger(__name__)

DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared"


def pick_photos(eval_dir: Path, n: int, seed: int = 0) -> list[Path]:
    """n portraits, alternating female/male, chosen reproducibly."""
    rng = random.Random(seed)
    per: list[list[Path]] = []
    for gender in ("female", "male"):
        paths = sorted((eval_dir / gender / "pixabay").glob("*.jpg"))
        rng.shuffle(paths)
        per.append(paths)
    photos = [p for pair in zip(*per, strict=False) for p in pair]
    return photos[:n]


def make_clip(
    photos: list[Path],
    out: Path,
    *,
    fps: float = 15.0,
    seconds_per_photo: float = 4.0,
    size: tuple[int, int] = (640, 480),
    scale: float = 0.75,
    seed: int = 0,
    same_place: bool = False,
) -> Path:
    """Write an MJPG .avi that films each photo with a slow zoom/pan and noise (see module doc);
    ``same_place``: every photo in the middle, so each person replaces the one before (cuts)."""
    rng = np.random.default_rng(seed)
    width, height = size
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write {out}")
    frames = round(fps * seconds_per_photo)
    try:
        for index, path in enumerate(photos):
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                continue
            # Fit the photo at ``scale`` of the frame (at 0.75 a zoom up to 1.15 still shows the whole
            # face); alternate it left and right, so the next person is a new track (as someone else
            # walking in would be) rather than inheriting the previous person's track at the cut.
            base = scale * min(width / image.shape[1], height / image.shape[0])
            centre_x = width * (0.5 if same_place else 0.32 if index % 2 == 0 else 0.68)
            direction = rng.choice([-1.0, 1.0], size=2)
            for i in range(frames):
                t = i / max(1, frames - 1)
                zoom = base * (1.0 + 0.15 * t)
                dx, dy = direction * 20 * (t - 0.5)
                matrix = np.array(
                    [
                        [zoom, 0, centre_x - image.shape[1] * zoom / 2 + dx],
                        [0, zoom, (height - image.shape[0] * zoom) / 2 + dy],
                    ],
                    dtype=np.float64,
                )
                frame = cv2.warpAffine(image, matrix, (width, height), borderValue=(40, 40, 40))
                noise = rng.normal(0, 4, frame.shape)
                writer.write(np.clip(frame + noise, 0, 255).astype(np.uint8))
    finally:
        writer.release()
    return out


Signatures = list[list[Signature | None]]


def results_from_clip(
    clip: Path, models_dir: Path, weights_dir: Path | None, fps: float, threshold: float | None = None
) -> tuple[list[Result], Signatures]:
    """Run the workers' pipeline (YuNet + current model) on every frame of the clip; sign every face
    as the viewer does (from the frame as capture publishes it: a JPEG). ``threshold``: the worker's
    uncertainty override (None = the model's own), carried by each result as a worker does."""
    from services.inference.pipeline import Pipeline, applied_threshold
    from shared.detectors import DetectorConfig, create
    from shared.models.artifact import current_dir, load_artifact

    target = current_dir(models_dir)
    if target is None:
        raise SystemExit(f"no current model in {models_dir}: flicker needs a classifier")
    classifier = load_artifact(target, "cpu")
    pipeline = Pipeline(create("cv2-yunet", DetectorConfig(weights_dir=weights_dir)), "cpu")
    model = ModelRef(classifier.meta.name, classifier.meta.version, applied_threshold(classifier, threshold))
    capture = cv2.VideoCapture(str(clip))
    results: list[Result] = []
    signatures: Signatures = []
    seq = 0
    batch: list[np.ndarray] = []

    def flush() -> None:
        nonlocal seq
        outputs = pipeline.run(batch, classifier, threshold)
        for image, out in zip(batch, outputs, strict=True):
            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
            signatures.append(
                signatures_from_jpeg(jpeg.tobytes(), [f.box for f in out.faces], image.shape[1]) if ok else []
            )
            t = seq / fps
            results.append(
                Result(
                    camera_id="clip",
                    seq=seq,
                    frame_id=f"{seq}-0",
                    width=out.width,
                    height=out.height,
                    timestamps=Timestamps(t, t, t, t, t),
                    model=model,
                    worker="flicker",
                    faces=out.faces,
                )
            )
            seq += 1
        batch.clear()

    while True:
        ok, frame = capture.read()
        if not ok:
            break
        batch.append(np.asarray(frame, dtype=np.uint8))
        if len(batch) == 16:
            flush()
    if batch:
        flush()
    capture.release()
    log.info("%d frames, %d faces, model %s", len(results), sum(len(r.faces) for r in results), target.name)
    return results, signatures


@dataclass
class Flicker:
    tracks: int = 0
    track_minutes: float = 0.0
    changes: int = 0
    #: shown labels over all frames of the kept tracks: how many were a class (not "uncertain"), and
    #: how many of those matched the photo's own label
    shown: int = 0
    labelled: int = 0
    correct: int = 0
    #: cuts (a photo replaced by the next) and the seconds after each during which the face in view
    #: showed a class other than its own, until it first showed its own (the model's own errors on the
    #: new face count too) ...
    cuts: int = 0
    wrong_after_cut_s: float = 0.0
    wrong_after_cut_max_s: float = 0.0
    #: ... and the seconds it showed the previous person's label from the previous person's track
    carried_over_s: float = 0.0
    carried_over_max_s: float = 0.0

    @property
    def per_track_minute(self) -> float:
        return self.changes / self.track_minutes if self.track_minutes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "track_minutes": round(self.track_minutes, 3),
            "per_track_minute": round(self.per_track_minute, 2),
            "labelled_share": round(self.labelled / self.shown, 3) if self.shown else None,
            "labelled_accuracy": round(self.correct / self.labelled, 3) if self.labelled else None,
            "wrong_after_cut_s": round(self.wrong_after_cut_s, 3),
            "wrong_after_cut_mean_s": round(self.wrong_after_cut_s / self.cuts, 3) if self.cuts else None,
            "wrong_after_cut_max_s": round(self.wrong_after_cut_max_s, 3),
            "carried_over_s": round(self.carried_over_s, 3),
            "carried_over_mean_s": round(self.carried_over_s / self.cuts, 3) if self.cuts else None,
            "carried_over_max_s": round(self.carried_over_max_s, 3),
        }


def replay(
    results: list[Result],
    tracker: FaceTracker,
    fps: float,
    *,
    signatures: Signatures | None = None,
    min_frames: int = 5,
    truth: list[str] | None = None,
    frames_per_photo: int = 0,
) -> Flicker:
    """Feed results (in the given order, with their faces' signatures when given) and count changes
    of the shown label per track.

    Changes are counted in seq order per track (what a viewer watching the tile sees); tracks shorter
    than ``min_frames`` (spurious detections) are left out. With ``truth`` (the label of each photo
    of the clip, ``frames_per_photo`` frames each) the shown labels are also scored, and the label of
    the largest face after each cut is followed until it first shows the new photo's own label."""
    shown: dict[int, dict[int, str]] = {}
    main: dict[int, tuple[float, str, int]] = {}  # seq -> (area, label, track) of the largest face
    for index, result in enumerate(results):
        sigs = signatures[index] if signatures is not None else None
        for face in tracker.update(result, sigs):
            shown.setdefault(face.track_id, {})[result.seq] = face.label
            area = face.box[2] * face.box[3]
            if area > main.get(result.seq, (-1.0, "", 0))[0]:
                main[result.seq] = (area, face.label, face.track_id)
    out = Flicker()
    if truth and frames_per_photo:
        for photo in range(1, len(truth)):
            out.cuts += 1
            before = main.get(photo * frames_per_photo - 1)
            wrong = carried = 0
            settled = False
            for seq in range(photo * frames_per_photo, (photo + 1) * frames_per_photo):
                _, label, track_id = main.get(seq, (0.0, "", 0))
                is_class = label not in ("", UNCERTAIN, NO_MODEL)
                # The previous person's label on the new face, from the previous person's track.
                carried += bool(
                    before and track_id == before[2] and label == truth[photo - 1] != truth[photo]
                )
                settled = settled or label == truth[photo]
                wrong += is_class and label != truth[photo] and not settled
            out.wrong_after_cut_s += wrong / fps
            out.wrong_after_cut_max_s = max(out.wrong_after_cut_max_s, wrong / fps)
            out.carried_over_s += carried / fps
            out.carried_over_max_s = max(out.carried_over_max_s, carried / fps)
    for by_seq in shown.values():
        if len(by_seq) < min_frames:
            continue
        labels = [by_seq[s] for s in sorted(by_seq)]
        out.tracks += 1
        out.changes += sum(a != b for a, b in itertools.pairwise(labels))
        out.track_minutes += (max(by_seq) - min(by_seq) + 1) / fps / 60
        if truth and frames_per_photo:
            for seq, label in by_seq.items():
                out.shown += 1
                if label not in (UNCERTAIN, NO_MODEL):
                    out.labelled += 1
                    out.correct += label == truth[min(seq // frames_per_photo, len(truth) - 1)]
    return out


def out_of_order(
    results: list[Result], signatures: Signatures, workers: int = 3, seed: int = 0
) -> tuple[list[Result], Signatures]:
    """Arrival order of results from several workers: each frame's result is late by up to
    ``workers - 1`` frames."""
    rng = random.Random(seed)
    keyed = sorted(
        ((r.seq + rng.uniform(0, workers - 1), i) for i, r in enumerate(results)), key=lambda kv: kv[0]
    )
    return [results[i] for _, i in keyed], [signatures[i] for _, i in keyed]


def measure(
    results: list[Result],
    fps: float,
    window: int,
    truth: list[str] | None = None,
    frames_per_photo: int = 0,
    signatures: Signatures | None = None,
) -> dict[str, Any]:
    sigs: Signatures = signatures if signatures is not None else [[] for _ in results]
    kw: dict[str, Any] = {"truth": truth, "frames_per_photo": frames_per_photo, "signatures": sigs}
    # Before smoothing, two baselines: the worker's own per-frame label, and the viewer's rule applied to
    # each frame alone (window of 1, no hysteresis). Every replay uses the threshold the results carry
    # (one policy: the model's, or the worker's override).
    threshold = threshold_of(results[0]) if results else None
    worker = replay(results, FaceTracker(smooth=False), fps, **kw)
    raw = replay(results, FaceTracker(window=1, hysteresis=0.0), fps, **kw)
    smooth = replay(results, FaceTracker(window=window), fps, **kw)
    late, late_sigs = out_of_order(results, sigs)
    shuffled = replay(late, FaceTracker(window=window), fps, **{**kw, "signatures": late_sigs})
    # The same without the identity checks (a track keeps whatever face takes its place), as before.
    before = replay(results, FaceTracker(window=window, new_identity=False), fps, **kw)
    shuffled_before = replay(
        late,
        FaceTracker(window=window, new_identity=False),
        fps,
        **{**kw, "signatures": late_sigs},
    )
    # Identity checks from the class probabilities alone (no frame at hand for the signatures).
    probs_only = replay(results, FaceTracker(window=window), fps, **{**kw, "signatures": None})
    return {
        "frames": len(results),
        "faces": sum(len(r.faces) for r in results),
        "fps": fps,
        "uncertain_threshold": threshold,
        "window": window,
        "worker_labels": worker.to_dict(),
        "raw": raw.to_dict(),
        "smoothed": smooth.to_dict(),
        "smoothed_out_of_order": shuffled.to_dict(),
        "smoothed_before": before.to_dict(),
        "smoothed_out_of_order_before": shuffled_before.to_dict(),
        "smoothed_probabilities_only": probs_only.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--weights-dir", type=Path, default=DEFAULT_SHARED / "weights" / "yunet")
    parser.add_argument("--eval-dir", type=Path, default=DEFAULT_SHARED / "data" / "faces" / "eval")
    parser.add_argument("--photos", type=int, default=16, help="photos in the clip")
    parser.add_argument("--seconds-per-photo", type=float, default=4.0)
    parser.add_argument("--fps", type=float, default=15.0)
    parser.add_argument(
        "--scale", type=float, default=0.75, help="photo size in the frame (smaller = farther)"
    )
    parser.add_argument(
        "--cuts",
        action="store_true",
        help="film every photo in the same place (each person replaces the last)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="override the model's uncertainty threshold, as the worker's GENDERLENS_UNCERTAIN_THRESHOLD "
        "does (default: the model's own)",
    )
    parser.add_argument("--window", type=int, default=15, help="smoothing window (frames)")
    parser.add_argument("--clip", type=Path, default=Path("test-artifacts/flicker-clip.avi"))
    parser.add_argument("--json-out", type=Path, default=Path("test-artifacts/flicker.json"))
    args = parser.parse_args(argv)
    setup_logging("INFO")
    args.clip.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    photos = pick_photos(args.eval_dir, args.photos)
    make_clip(
        photos,
        args.clip,
        fps=args.fps,
        seconds_per_photo=args.seconds_per_photo,
        scale=args.scale,
        same_place=args.cuts,
    )
    results, signatures = results_from_clip(
        args.clip, args.models_dir, args.weights_dir, args.fps, args.threshold
    )
    truth = [p.relative_to(args.eval_dir).parts[0] for p in photos]  # eval/<gender>/...
    per_photo = round(args.fps * args.seconds_per_photo)
    report = measure(results, args.fps, args.window, truth, per_photo, signatures)
    report["scale"] = args.scale
    report["cuts_in_place"] = args.cuts
    report["photos"] = [str(p.relative_to(args.eval_dir)) for p in photos]
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2))
    for name in (
        "worker_labels",
        "raw",
        "smoothed",
        "smoothed_out_of_order",
        "smoothed_before",
        "smoothed_out_of_order_before",
        "smoothed_probabilities_only",
    ):
        row = report[name]
        sys.stdout.write(
            f"{name:29s} tracks {row['tracks']:3d}  track-min {row['track_minutes']:.2f}  "
            f"changes {row['changes']:4d}  per track-min {row['per_track_minute']:6.2f}  "
            f"labelled {row['labelled_share']}  accuracy {row['labelled_accuracy']}  "
            f"wrong after cut {row['wrong_after_cut_mean_s']} s (max {row['wrong_after_cut_max_s']})  "
            f"carried over {row['carried_over_mean_s']} s (max {row['carried_over_max_s']})\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
