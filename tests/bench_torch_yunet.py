"""CPU speed of cv2-yunet vs torch-yunet on the same 640x480 frames (not collected by pytest).

    .venv/bin/python tests/bench_torch_yunet.py [--threads 1] [--frames 64] [--repeats 5]

Frames are eval photos stretched to 640x480 (no downscale needed, so both backends time detection only).
Rounds alternate between backends and the best round is reported, since the CPU is shared.
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
    print(f"{len(data)} frames 640x480, {args.threads} thread(s), best of {args.repeats} rounds")
    for batch in (1, 8):
        best = dict.fromkeys(dets, 0.0)
        for det in dets.values():
            det.detect(data[:batch])  # warm up (allocations, cv2 input size)
        for _ in range(args.repeats):
            for name, det in dets.items():
                best[name] = max(best[name], one_round(det, data, batch))
        print(f"batch {batch}: " + ", ".join(f"{n} {fps:.1f} frames/s" for n, fps in best.items()))


if __name__ == "__main__":
    main()
