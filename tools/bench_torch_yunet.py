"""CPU speed of cv2-yunet vs torch-yunet on the same 640x480 frames (a dev tool).

    .venv/bin/python -m tools.bench_torch_yunet [--threads 1] [--frames 64] [--repeats 5]

Frames are eval photos stretched to 640x480 (no downscale needed, so both backends time detection only).
Rounds interleave all cases; best and median rounds are reported, since the CPU is shared.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch

from shared.detectors import DetectorConfig, FaceDetector, create

SHARED = Path(__file__).resolve().parents[2] / "shared"


def frames(count: int) -> list[npt.NDArray[np.uint8]]:
    paths = sorted((SHARED / "data" / "faces" / "eval").rglob("*.jpg"))[::7][:count]
    out = []
    for p in paths:
        image = cv2.imread(str(p))
        if image is None:
            raise FileNotFoundError(f"unreadable photo {p}")
        out.append(np.asarray(cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA), np.uint8))
    return out


def one_round(det: FaceDetector, data: list[npt.NDArray[np.uint8]], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(data) - batch + 1, batch):
        det.detect(data[i : i + batch])
    return (len(data) // batch * batch) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    config = DetectorConfig(weights_dir=SHARED / "weights" / "yunet")
    dets = {name: create(name, config) for name in ("cv2-yunet", "torch-yunet")}
    data = frames(args.frames)
    print(f"{len(data)} frames 640x480, {args.threads} thread(s), best and median of {args.repeats} rounds")
    cases = [(name, batch) for batch in (1, 8) for name in dets]
    for name, batch in cases:
        dets[name].detect(data[:batch])  # warm up (allocations, cv2 input size)
    rates: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        # Every case runs in every round, so a burst of load from elsewhere hits all of them alike.
        for name, batch in cases:
            rates[name, batch].append(one_round(dets[name], data, batch))
    for (name, batch), fps in rates.items():
        print(f"batch {batch} {name}: best {max(fps):.1f}, median {float(np.median(fps)):.1f} frames/s")


if __name__ == "__main__":
    main()
