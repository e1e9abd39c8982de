"""Classifier speed on this machine: ``python -m tools.bench_classifier [--model models] [--threads N]``.

Times ``Classifier.predict`` (normalisation included, as the worker calls it) on uint8 crops at batch 32
(crops/s) and batch 1 (latency, median and p95), after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from shared.models.artifact import load_artifact
from trainer.evaluate import resolve_model


def bench(model: Path, seconds: float = 3.0, device: str = "cpu") -> dict[str, float]:
    clf = load_artifact(resolve_model(model), device)
    s = clf.meta.input_size
    gen = torch.Generator().manual_seed(0)
    b32 = torch.randint(0, 256, (32, 3, s, s), dtype=torch.uint8, generator=gen)
    b1 = b32[:1].clone()
    for _ in range(20):
        clf.predict(b32)
        clf.predict(b1)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        clf.predict(b32)
        n += 32
    crops_per_s = n / (time.perf_counter() - start)
    lat = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        clf.predict(b1)
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    return {
        "crops_per_s_batch32": round(crops_per_s, 1),
        "latency_ms_batch1_median": round(statistics.median(lat), 3),
        "latency_ms_batch1_p95": round(lat[int(0.95 * (len(lat) - 1))], 3),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_classifier", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("models"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.stdout.write(json.dumps(bench(args.model, args.seconds)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
