"""``genderlens bench``: the naive loop vs the batched pipeline vs the full system, on the same frames.

A clip is composed from real face photos (1-4 portraits pasted into each 640x480 frame, JPEG-encoded as
capture does), then measured three ways in one run:

1. ``naive``: the loop a tutorial writes, in this process, no Redis: per frame ``cv2.imdecode``,
   ``cv2.FaceDetectorYN.detect`` (same ONNX, same thresholds as cv2-yunet), then for each face one at a
   time: crop, to tensor, normalise, forward pass with a batch of one. Its crop is the shared
   landmark alignment applied to that one face, so that its detections and labels must be identical to
   the pipeline's (checked, and reported under ``identical``). ``naive_bbox`` is the same loop with the
   literal tutorial crop (box slice + ``cv2.resize``), reported for its speed and how often its labels
   agree; it is not the baseline, because its outputs differ.
2. ``pipeline``: :class:`services.inference.pipeline.Pipeline` (the worker's own code) on batches of
   ``--batch-size`` frames, in this process, no Redis: the compute ceiling.
3. ``system``: a throw-away Redis, a publisher process per run (capture's wire format and accounting)
   and ``--workers`` real worker processes (``build_worker``, the code ``genderlens infer`` runs), at
   maximum rate (closed loop: the publisher keeps ``2 x batch x workers`` frames in flight, so workers
   never starve and queues stay bounded) and at a fixed ``--rate-fps`` per camera. Latency is the
   Result's ``published - captured``. ``scaling`` repeats the max-rate run with one and with two
   workers of one thread each.

Figures: frames/s, faces/s, latency p50/p95/p99 (in-process modes: from the moment the frame's batch is
handed over to the moment its output is back, i.e. what the frame waits for its batch), mean ms per
frame per stage, CPU% (100 = one core) and resident memory of the processes doing the work.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import multiprocessing as mp
import os
import random
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event as MpEvent

    from shared.models.artifact import Classifier

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "faces" / "eval"
DEFAULT_WEIGHTS = REPO.parent / "shared" / "weights" / "yunet"
FRAME_SIZE = (640, 480)
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
#: Per camera, the fixed-rate run's frame rate (the issue's live-video target).
DEFAULT_RATE_FPS = 15.0


# ------------------------------------------------------------------------------------------------ clip


@dataclass
class Clip:
    jpegs: list[bytes]
    pasted: list[int]  #: portraits pasted per frame (1-4; a photo may show more than one person)


def _layout(n: int, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Cells (x, y, w, h) for n portraits: side by side for 1-3, a 2x2 grid for 4."""
    if n == 4:
        w, h = width // 2, height // 2
        return [(0, 0, w, h), (w, 0, width - w, h), (0, h, w, height - h), (w, h, width - w, height - h)]
    edges = [round(i * width / n) for i in range(n + 1)]
    return [(edges[i], 0, edges[i + 1] - edges[i], height) for i in range(n)]


def build_clip(
    photos_dir: Path, frames: int, seed: int = 0, size: tuple[int, int] = FRAME_SIZE, quality: int = 85
) -> Clip:
    """``frames`` JPEG frames of ``size``, each with 1-4 real portraits pasted (deterministic per seed)."""
    if not photos_dir.is_dir():
        raise FileNotFoundError(
            f"no face photos at {photos_dir}: pass --photos DIR (a folder of face photos, searched "
            "recursively; the project uses ../shared/data/faces/eval)"
        )
    paths = sorted(p for p in photos_dir.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no .jpg/.png photos under {photos_dir}")
    rng = random.Random(seed)
    pool = rng.sample(paths, min(len(paths), 160))
    cache: dict[Path, npt.NDArray[np.uint8]] = {}
    width, height = size
    jpegs: list[bytes] = []
    pasted: list[int] = []
    for _ in range(frames):
        n = rng.randint(1, 4)
        canvas = np.empty((height, width, 3), np.uint8)
        canvas[:] = rng.randrange(40, 200)  # plain background of a random grey
        for x, y, w, h in _layout(n, width, height):
            path = rng.choice(pool)
            if path not in cache:
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if image is None:
                    raise FileNotFoundError(f"unreadable photo {path}")
                cache[path] = np.asarray(image, np.uint8)
            photo = cache[path]
            scale = min(w / photo.shape[1], h / photo.shape[0])
            pw, ph = max(1, int(photo.shape[1] * scale)), max(1, int(photo.shape[0] * scale))
            small = cv2.resize(photo, (pw, ph), interpolation=cv2.INTER_AREA)
            ox, oy = x + (w - pw) // 2, y + (h - ph) // 2
            canvas[oy : oy + ph, ox : ox + pw] = small
        ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("cv2.imencode failed")
        jpegs.append(buf.tobytes())
        pasted.append(n)
    return Clip(jpegs, pasted)


# ------------------------------------------------------------------------------------------- measuring


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in (50, 95, 99)}


@dataclass
class Usage:
    """CPU and memory of a set of processes between ``start()`` and ``stop()``."""

    pids: list[int]
    _cpu0: float = 0.0
    _t0: float = 0.0
    cpu_percent: float = 0.0
    rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    _sampler: threading.Thread | None = field(default=None, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def _cpu(self) -> float:
        import psutil

        total = 0.0
        for pid in self.pids:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def _rss(self) -> float:
        import psutil

        total = 0
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(pid).memory_info().rss
        return total / 2**20

    def start(self) -> Usage:
        self._cpu0, self._t0 = self._cpu(), time.perf_counter()
        self._done.clear()

        def sample() -> None:
            while not self._done.wait(0.25):
                self.peak_rss_mb = max(self.peak_rss_mb, self._rss())

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()
        return self

    def stop(self) -> Usage:
        self._done.set()
        if self._sampler is not None:
            self._sampler.join()
        elapsed = time.perf_counter() - self._t0
        self.cpu_percent = round(100 * (self._cpu() - self._cpu0) / max(elapsed, 1e-9), 1)
        self.rss_mb = round(self._rss(), 1)
        self.peak_rss_mb = round(max(self.peak_rss_mb, self.rss_mb), 1)
        return self


def _figures(
    frames: int,
    faces: int,
    seconds: float,
    latencies_ms: Sequence[float],
    stage_seconds: dict[str, float],
    usage: Usage,
) -> dict[str, Any]:
    return {
        "frames": frames,
        "faces": faces,
        "seconds": round(seconds, 3),
        "fps": round(frames / seconds, 2) if seconds > 0 else 0.0,
        "faces_per_s": round(faces / seconds, 2) if seconds > 0 else 0.0,
        "latency_ms": percentiles(latencies_ms),
        "stages_ms": {k: round(1000 * v / max(frames, 1), 3) for k, v in stage_seconds.items()},
        "cpu_percent": usage.cpu_percent,
        "rss_mb": usage.rss_mb,
    }


# ----------------------------------------------------------------------------------- naive and pipeline


@dataclass
class FaceOut:
    box: tuple[float, ...]
    label: str
    probs: tuple[float, ...]


def run_naive(
    jpegs: Sequence[bytes],
    classifier: Classifier,
    weights_dir: Path,
    score_threshold: float,
    bbox_crop: bool = False,
) -> tuple[dict[str, Any], list[list[FaceOut]]]:
    """The tutorial loop (see the module doc). ``bbox_crop``: crop the box instead of aligning."""
    import torch

    from shared.detectors import DetectorConfig, resize_for_detection
    from shared.detectors.cv2_yunet import ONNX_NAME
    from shared.models.artifact import label_for
    from shared.preprocess import crop_faces_bgr

    cfg = DetectorConfig(score_threshold=score_threshold)
    net = cv2.FaceDetectorYN.create(
        str(weights_dir / ONNX_NAME), "", (320, 320), cfg.score_threshold, cfg.nms_threshold, cfg.top_k
    )
    meta = classifier.meta
    size = meta.input_size
    stages = {"decode": 0.0, "detect": 0.0, "crop": 0.0, "classify": 0.0}
    outputs: list[list[FaceOut]] = []
    latencies: list[float] = []
    input_size: tuple[int, int] | None = None

    def one(jpeg: bytes) -> list[FaceOut]:
        nonlocal input_size
        t0 = time.perf_counter()
        image = np.asarray(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), np.uint8)
        t1 = time.perf_counter()
        stages["decode"] += t1 - t0
        small, scale = resize_for_detection(image, cfg.max_side)  # a no-op for 640x480 frames
        if input_size != (small.shape[1], small.shape[0]):
            input_size = (small.shape[1], small.shape[0])
            net.setInputSize(input_size)
        _, found = net.detect(small)
        found = np.zeros((0, 15), np.float32) if found is None else np.asarray(found, np.float32)
        boxes = found[:, :4] / np.float32(scale)
        landmarks = found[:, 4:14].reshape(-1, 5, 2) / np.float32(scale)
        t2 = time.perf_counter()
        stages["detect"] += t2 - t1
        faces = []
        for box, lms in zip(boxes, landmarks, strict=True):  # one face at a time: what we measure
            t3 = time.perf_counter()
            if bbox_crop:
                x, y, w, h = (int(v) for v in box)
                patch = image[max(y, 0) : max(y + h, 1), max(x, 0) : max(x + w, 1)]
                crop = cv2.resize(patch, (size, size))[None, :, :, ::-1]  # BGR -> RGB
            else:
                crop = crop_faces_bgr(image, lms[None], size, meta.margin, meta.template)
            tensor = torch.from_numpy(np.ascontiguousarray(crop)).permute(0, 3, 1, 2)
            t4 = time.perf_counter()
            probs = classifier.predict(tensor)  # normalise + forward (batch of one) + softmax
            label = label_for(probs, meta.classes, meta.uncertain_threshold)[0]
            t5 = time.perf_counter()
            stages["crop"] += t4 - t3
            stages["classify"] += t5 - t4
            faces.append(FaceOut(tuple(box.tolist()), label, tuple(probs[0].tolist())))
        latencies.append(1000 * (time.perf_counter() - t0))
        return faces

    one(jpegs[0])  # warm-up (first-call allocations), not counted
    for key in stages:
        stages[key] = 0.0
    latencies.clear()
    usage = Usage([os.getpid()]).start()
    started = time.perf_counter()
    with torch.inference_mode():
        for jpeg in jpegs:
            outputs.append(one(jpeg))
    seconds = time.perf_counter() - started
    usage.stop()
    faces = sum(len(o) for o in outputs)
    return _figures(len(jpegs), faces, seconds, latencies, stages, usage), outputs


def run_pipeline(
    jpegs: Sequence[bytes],
    classifier: Classifier,
    detector_name: str,
    weights_dir: Path,
    score_threshold: float,
    device: str,
    batch_size: int,
    device_route: bool | None = None,
) -> tuple[dict[str, Any], list[list[FaceOut]]]:
    """The worker's Pipeline on consecutive batches of ``batch_size`` frames, in this process."""
    from services.inference.pipeline import FrameError, Pipeline
    from shared.detectors import DetectorConfig, create

    detector = create(
        detector_name, DetectorConfig(score_threshold=score_threshold, weights_dir=weights_dir, device=device)
    )
    pipeline = Pipeline(detector, device, device_route=device_route)
    pipeline.process(list(jpegs[:batch_size]), classifier, None)  # warm-up, not counted
    pipeline.stats.reset()
    outputs: list[list[FaceOut]] = []
    latencies: list[float] = []
    usage = Usage([os.getpid()]).start()
    started = time.perf_counter()
    for i in range(0, len(jpegs), batch_size):
        t0 = time.perf_counter()
        batch = pipeline.process(list(jpegs[i : i + batch_size]), classifier, None)
        done = 1000 * (time.perf_counter() - t0)
        for out in batch:
            latencies.append(done)
            if isinstance(out, FrameError):
                outputs.append([])
                continue
            outputs.append(
                [
                    FaceOut(f.box, f.label, tuple(f.probs[c] for c in classifier.meta.classes))
                    for f in out.faces
                ]
            )
    seconds = time.perf_counter() - started
    usage.stop()
    stats = pipeline.stats
    figures = _figures(len(jpegs), stats.faces, seconds, latencies, stats.seconds, usage)
    figures["detector"] = detector.name if detector_name != "auto" else f"auto ({type(detector).__name__})"
    figures["batch_size"] = batch_size
    return figures, outputs


def compare(a: list[list[FaceOut]], b: list[list[FaceOut]]) -> dict[str, Any]:
    """How far two runs' outputs on the same frames are apart."""
    same_count = sum(len(x) == len(y) for x, y in zip(a, b, strict=True))
    boxes_equal = labels_equal = 0
    max_box = max_prob = 0.0
    faces = 0
    for x, y in zip(a, b, strict=True):
        if len(x) != len(y):
            continue
        for fx, fy in zip(x, y, strict=True):
            faces += 1
            box_diff = max(abs(p - q) for p, q in zip(fx.box, fy.box, strict=True))
            max_box = max(max_box, box_diff)
            boxes_equal += box_diff <= 1e-3
            labels_equal += fx.label == fy.label
            max_prob = max(max_prob, *(abs(p - q) for p, q in zip(fx.probs, fy.probs, strict=True)))
    return {
        "frames": len(a),
        "frames_same_face_count": same_count,
        "faces_compared": faces,
        "boxes_equal": boxes_equal,
        "labels_equal": labels_equal,
        "max_box_diff_px": round(max_box, 4),
        "max_prob_diff": float(f"{max_prob:.3g}"),
        "identical": same_count == len(a) and boxes_equal == faces and labels_equal == faces,
    }


# --------------------------------------------------------------------------------------------- system


@dataclass(frozen=True)
class WorkerSpec:
    redis_url: str
    models_dir: str
    weights_dir: str
    detector: str
    device: str
    threads: int
    batch_size: int
    max_wait_ms: int
    results_maxlen: int
    name: str
    warmup_jpeg: bytes


def _worker_main(spec: WorkerSpec, stop_evt: MpEvent, ready_evt: MpEvent, out: Any) -> None:
    """One worker process: ``build_worker`` (what ``genderlens infer`` runs) plus timing hooks."""
    import torch

    from services.inference.main import build_worker
    from services.inference.settings import InferenceSettings
    from shared.runtime import setup_logging
    from shared.streams import parse_stream_id

    setup_logging("WARNING")
    if spec.threads:
        torch.set_num_threads(spec.threads)
        cv2.setNumThreads(spec.threads)
    settings = InferenceSettings(
        redis_url=spec.redis_url,
        models_dir=Path(spec.models_dir),
        weights_dir=Path(spec.weights_dir),
        detector=spec.detector,
        device=spec.device,
        torch_threads=spec.threads,
        batch_size=spec.batch_size,
        max_wait_ms=spec.max_wait_ms,
        results_maxlen=spec.results_maxlen,
        worker_name=spec.name,
        log_level="WARNING",
    )
    stop = threading.Event()
    worker, models = build_worker(settings, stop)
    models.check()
    pipeline = worker.pipeline
    pipeline.process([spec.warmup_jpeg] * spec.batch_size, models.current, None)  # warm-up
    pipeline.stats.reset()

    # Redis I/O = time in reads that returned frames (minus any wait for the first of them to be
    # published, told by its stream id) + time in handle() outside the pipeline (unpack, pack, settle).
    io = {"read": 0.0, "handle": 0.0, "process": 0.0}
    orig_read, orig_handle, orig_process = worker._read, worker.handle, pipeline.process

    def timed_read(count: int, block_ms: int) -> Any:
        t0 = time.time()
        entries = orig_read(count, block_ms)
        if entries:
            t1 = time.time()
            newest = max(parse_stream_id(e.entry_id)[0] for e in entries) / 1000
            io["read"] += t1 - max(t0, min(newest, t1))
        return entries

    def timed_handle(entries: Any) -> None:
        t0 = time.perf_counter()
        orig_handle(entries)
        io["handle"] += time.perf_counter() - t0

    def timed_process(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig_process(*args, **kwargs)
        finally:
            io["process"] += time.perf_counter() - t0

    worker._read = timed_read  # type: ignore[method-assign]
    worker.handle = timed_handle  # type: ignore[method-assign]
    pipeline.process = timed_process  # type: ignore[method-assign]

    def watch() -> None:
        stop_evt.wait()
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    ready_evt.set()
    worker.run()
    out.put(
        {
            "name": spec.name,
            "detector": pipeline.detector.name,
            "stats": pipeline.stats.snapshot(),
            "redis_io_s": io["read"] + max(0.0, io["handle"] - io["process"]),
        }
    )


def _publisher_main(
    redis_url: str,
    jpegs: Sequence[bytes],
    cameras: Sequence[str],
    rate_fps: float | None,
    seconds: float,
    in_flight: int,
    frames_maxlen: int,
    go_evt: MpEvent,
    out: Any,
) -> None:
    """Publish the clip as capture does (same Frame schema, same accounting), round robin over the
    cameras: closed loop at most ``in_flight`` frames unanswered (max rate), or ``rate_fps`` per camera
    for ``seconds``."""
    from shared import constants as C
    from shared.schema import Frame
    from shared.streams import connect

    client = connect(redis_url, 5.0, "bench-publisher")
    try:
        from shared.accounting import Accounting

        accounting: Any = Accounting(client)
    except ImportError:  # an older tree without exact accounting
        accounting = None
    size = np.asarray(cv2.imdecode(np.frombuffer(jpegs[0], np.uint8), cv2.IMREAD_COLOR)).shape
    height, width = int(size[0]), int(size[1])
    seqs = dict.fromkeys(cameras, 0)
    total = len(jpegs) if rate_fps is None else max(1, round(seconds * rate_fps * len(cameras)))
    go_evt.wait()
    started = time.perf_counter()
    sent = 0

    def answered() -> int:
        pipe = client.pipeline(transaction=False)
        for cam in cameras:
            pipe.hmget(C.stats_key(cam), [C.STAT_PROCESSED, C.STAT_DROPPED_STALE, C.STAT_DEAD_LETTERED])
        return sum(int(v or 0) for row in pipe.execute() for v in row)

    while sent < total:
        if rate_fps is None:
            while sent - answered() >= in_flight:
                # Workers hold up to two batches each, so a few ms here never starves them, while
                # polling faster would take CPU from them on a small machine.
                time.sleep(0.003)
        else:
            delay = started + sent / (rate_fps * len(cameras)) - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        cam = cameras[sent % len(cameras)]
        frame = Frame(cam, seqs[cam], time.time(), width, height, jpegs[sent % len(jpegs)])
        seqs[cam] += 1
        if accounting is not None:
            accounting.publish(cam, frame.to_fields(), frames_maxlen)
        else:
            pipe = client.pipeline(transaction=False)
            pipe.xadd(C.frames_stream(cam), frame.to_fields(), maxlen=frames_maxlen, approximate=True)
            pipe.hincrby(C.stats_key(cam), C.STAT_PUBLISHED, 1)
            pipe.execute()
        sent += 1
    out.put({"sent": sent, "seconds": time.perf_counter() - started})


@dataclass
class SystemConfig:
    models_dir: Path
    weights_dir: Path
    detector: str
    device: str
    batch_size: int
    max_wait_ms: int
    cameras: int
    staleness_ms: int = 500
    frames_maxlen: int = 120


def run_system(
    cfg: SystemConfig,
    jpegs: Sequence[bytes],
    workers: int,
    threads: int,
    rate_fps: float | None = None,
    seconds: float = 10.0,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """One run of publisher -> ``workers`` worker processes -> results, on a fresh throw-away Redis."""
    from shared import constants as C
    from shared.redis_server import RedisServer
    from shared.schema import CameraInfo, Result
    from shared.streams import connect, ensure_group

    ctx = mp.get_context("spawn")  # fresh interpreters: no inherited torch thread pools or locks
    cameras = [f"bench{i}" for i in range(cfg.cameras)]
    n_frames = len(jpegs) if rate_fps is None else max(1, round(seconds * rate_fps * len(cameras)))
    with RedisServer() as server:
        client = connect(server.url, 10.0, "bench")
        now = time.time()
        for cam in cameras:  # register the cameras as capture does, before the workers look
            info = CameraInfo(cam, "bench clip", rate_fps or 0.0, "live", now, now)
            client.hset(C.CAMERAS_KEY, cam, info.pack())  # type: ignore[arg-type]
            ensure_group(client, C.frames_stream(cam), C.INFERENCE_GROUP)
        stop_evt, go_evt = ctx.Event(), ctx.Event()
        out = ctx.Queue()
        procs = []
        readies = []
        for i in range(workers):
            ready = ctx.Event()
            spec = WorkerSpec(
                server.url,
                str(cfg.models_dir),
                str(cfg.weights_dir),
                cfg.detector,
                cfg.device,
                threads,
                cfg.batch_size,
                cfg.max_wait_ms,
                n_frames + 64,  # keep every result: they are read back after the run
                f"bench-worker-{i}",
                jpegs[0],
            )
            proc = ctx.Process(target=_worker_main, args=(spec, stop_evt, ready, out), daemon=True)
            proc.start()
            procs.append(proc)
            readies.append(ready)
        publisher = ctx.Process(
            target=_publisher_main,
            args=(
                server.url,
                list(jpegs),
                cameras,
                rate_fps,
                seconds,
                2 * cfg.batch_size * workers,
                cfg.frames_maxlen,
                go_evt,
                out,
            ),
            daemon=True,
        )
        publisher.start()
        try:
            deadline = time.monotonic() + timeout_s
            for ready, proc in zip(readies, procs, strict=True):
                while not ready.wait(0.2):
                    if not proc.is_alive() or time.monotonic() > deadline:
                        raise RuntimeError(f"bench worker failed to start (exit code {proc.exitcode})")
            time.sleep(0.3)  # let every worker reach its blocking read
            assert server.process is not None
            pids = [p.pid for p in procs if p.pid is not None]
            usage = Usage(pids).start()
            side = Usage([publisher.pid or 0, server.process.pid]).start()
            go_evt.set()
            t_start = time.time()
            while True:  # until every frame is accounted for
                pipe = client.pipeline(transaction=False)
                for cam in cameras:
                    pipe.hmget(
                        C.stats_key(cam), [C.STAT_PROCESSED, C.STAT_DROPPED_STALE, C.STAT_DEAD_LETTERED]
                    )
                done = sum(int(v or 0) for row in pipe.execute() for v in row)
                if done >= n_frames:
                    break
                if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                    raise RuntimeError(f"system run stalled: {done}/{n_frames} frames answered")
                time.sleep(0.02)
            usage.stop()
            side.stop()
            wall = time.time() - t_start
        finally:
            stop_evt.set()
            go_evt.set()
        reports = [out.get(timeout=60) for _ in range(workers + 1)]
        for proc in [*procs, publisher]:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        results: list[Any] = []
        for cam in cameras:
            for _, fields in client.xrange(C.results_stream(cam)):  # type: ignore[union-attr]
                results.append(Result.from_fields(fields))
        stats: dict[str, Any] = {cam: client.hgetall(C.stats_key(cam)) for cam in cameras}
        client.close()

    worker_reports = [r for r in reports if "stats" in r]
    latencies = [(r.timestamps.published - r.timestamps.captured) * 1000 for r in results]
    first = min(r.timestamps.captured for r in results) if results else t_start
    last = max(r.timestamps.published for r in results) if results else t_start + wall
    span = max(last - first, 1e-9)
    stage_s: dict[str, float] = {}
    for rep in worker_reports:
        for k, v in rep["stats"]["seconds"].items():
            stage_s[k] = stage_s.get(k, 0.0) + v
    stage_s["redis_io"] = sum(r["redis_io_s"] for r in worker_reports)
    faces = sum(len(r.faces) for r in results)
    figures = _figures(len(results), faces, span, latencies, stage_s, usage)
    figures["stages_ms"]["queue_p50"] = percentiles(
        [(r.timestamps.read - r.timestamps.captured) * 1000 for r in results]
    )["p50"]
    counters: dict[str, int] = {}
    for per_cam in stats.values():
        for k, v in per_cam.items():
            key = k.decode() if isinstance(k, bytes) else str(k)
            counters[key] = counters.get(key, 0) + int(v)
    # Results in order per camera: the worker must route every frame to its own camera and seq.
    seqs = {cam: [r.seq for r in results if r.camera_id == cam] for cam in cameras}
    seq_ok = all(len(v) == len(set(v)) for v in seqs.values())
    figures.update(
        {
            "workers": workers,
            "detector": ",".join(sorted({r["detector"] for r in worker_reports})),
            "threads_per_worker": threads or "default",
            "cameras": len(cameras),
            "mode": "max rate (closed loop)" if rate_fps is None else f"{rate_fps:g} fps per camera",
            "published": n_frames,
            "counters": counters,
            "stale_results": sum(lat > cfg.staleness_ms for lat in latencies),
            "staleness_ms": cfg.staleness_ms,
            "max_latency_ms": round(max(latencies), 2) if latencies else None,
            "results_per_camera": {cam: len(v) for cam, v in seqs.items()},
            "no_duplicate_results": seq_ok,
            "cpu_percent_publisher_and_redis": side.cpu_percent,
            "rss_mb_peak": usage.peak_rss_mb,
        }
    )
    return figures


# -------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=300, help="frames in the clip")
    parser.add_argument("--cameras", type=int, default=1, help="cameras the system run publishes as")
    parser.add_argument("--workers", type=int, default=1, help="worker processes in the system run")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the pipeline runs")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of face photos")
    parser.add_argument(
        "--weights-dir",
        type=Path,
        help="YuNet weights folder; unset = the setting, else ../shared/weights/yunet",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        help="model artifacts folder whose current model is used; unset = the setting (models/). "
        "Without a current model an untrained gendernet is used (same speed, meaningless labels)",
    )
    parser.add_argument("--detector", help="detector for the pipeline and system; unset = the setting (auto)")
    parser.add_argument("--batch-size", type=int, help="frames per batch; unset = the setting")
    parser.add_argument("--max-wait-ms", type=int, help="micro-batch wait; unset = the setting")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch and OpenCV threads in this process and in the system run's workers; 0 = the libraries' default here and cores/W per worker",
    )
    parser.add_argument("--rate-fps", type=float, default=DEFAULT_RATE_FPS, help="fixed-rate run, per camera")
    parser.add_argument("--rate-seconds", type=float, default=20.0, help="length of the fixed-rate run")
    parser.add_argument(
        "--modes", default="naive,pipeline,system", help="comma list of naive, pipeline, system"
    )
    parser.add_argument(
        "--no-scaling", action="store_true", help="skip the one- vs two-worker (one thread each) runs"
    )
    parser.add_argument(
        "--compare-detectors", action="store_true", help="also time the pipeline with every detector"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="in-process modes: rounds (interleaved), best one reported"
    )
    parser.add_argument("--seed", type=int, default=0)


def _load_classifier(models_dir: Path | None, device: str, tmp: Path) -> tuple[Classifier, Path, str]:
    """The current model of ``models_dir``, else a throw-away untrained gendernet in ``tmp``."""
    from shared.models.artifact import current_dir, load_artifact, publish_untrained

    if models_dir is not None:
        target = current_dir(models_dir)
        if target is not None:
            return load_artifact(target, device), models_dir, target.name
    meta = publish_untrained(tmp / "models", name="bench", version="untrained")
    path = tmp / "models" / meta.dirname
    return load_artifact(path, device), tmp / "models", f"{path.name} (untrained: speed only)"


def _host() -> dict[str, Any]:
    """What else the machine is doing (the figures depend on it): load and the busiest processes."""
    import psutil

    procs = [p for p in psutil.process_iter() if p.pid != os.getpid()]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)  # the first call only starts the measurement
    time.sleep(1.0)
    busy: list[tuple[float, psutil.Process]] = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            busy.append((p.cpu_percent(None), p))
    busy.sort(key=lambda item: item[0], reverse=True)
    top = []
    for pct, p in busy[:4]:
        if pct < 5:
            break
        with contextlib.suppress(psutil.Error):
            top.append({"pid": p.pid, "cpu_percent": pct, "cmd": " ".join(p.cmdline())[:120]})
    return {"cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()], "busy_processes": top}


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b or not b.get("fps"):
        return None
    return round(a["fps"] / b["fps"], 2)


def _table(report: dict[str, Any]) -> str:
    rows = [("naive", report.get("naive")), ("naive_bbox", report.get("naive_bbox"))]
    rows.append(("pipeline", report.get("pipeline")))
    for name, fig in (report.get("detectors") or {}).items():
        rows.append((f"pipeline[{name}]", fig))
    system = report.get("system") or {}
    rows.append((f"system max W={system.get('workers', '?')}", system or None))
    for w, fig in (system.get("scaling") or {}).items():
        rows.append((f"system max W={w} 1thr", fig))
    rows.append(("system fixed rate", system.get("fixed_rate")))
    header = f"{'mode':<24}{'fps':>8}{'faces/s':>9}{'p50':>8}{'p95':>8}{'p99':>8}{'cpu%':>7}{'rss MB':>8}  stages ms/frame"
    lines = [header, "-" * len(header)]
    for name, fig in rows:
        if not fig:
            continue
        lat = fig["latency_ms"]
        stages = " ".join(f"{k}={v:g}" for k, v in fig["stages_ms"].items())
        lines.append(
            f"{name:<24}{fig['fps']:>8.1f}{fig['faces_per_s']:>9.1f}{lat['p50']:>8.1f}{lat['p95']:>8.1f}"
            f"{lat['p99']:>8.1f}{fig['cpu_percent']:>7.0f}{fig['rss_mb']:>8.0f}  {stages}"
        )
    ratios = report.get("ratios", {})
    lines.append(
        "ratios: pipeline/naive={} system/pipeline={} two_workers/one={}".format(
            ratios.get("pipeline_vs_naive"),
            ratios.get("system_vs_pipeline"),
            ratios.get("two_workers_vs_one"),
        )
    )
    for when in ("host_before", "host_after"):
        host = report.get(when)
        if host:
            busy = "; ".join(f"{p['cpu_percent']:.0f}% {p['cmd'][:60]}" for p in host["busy_processes"])
            lines.append(f"{when}: load {host['load_avg']} on {host['cpus']} cpus; busy: {busy or 'none'}")
    ident = report.get("identical")
    if ident:
        lines.append(
            f"naive vs pipeline outputs: identical={ident['identical']} "
            f"({ident['boxes_equal']}/{ident['faces_compared']} boxes, {ident['labels_equal']} labels, "
            f"max prob diff {ident['max_prob_diff']})"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from services.inference.pipeline import default_detector
    from services.inference.settings import InferenceSettings
    from shared.runtime import setup_logging

    setup_logging("WARNING")
    modes = {m.strip() for m in args.modes.split(",") if m.strip()}
    unknown = modes - {"naive", "pipeline", "system"}
    if unknown:
        print(f"genderlens bench: unknown mode(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("genderlens bench: --device cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    settings = InferenceSettings()
    weights_dir = args.weights_dir or settings.weights_dir or DEFAULT_WEIGHTS
    if not (weights_dir / "face_detection_yunet_2023mar.onnx").is_file():
        print(f"genderlens bench: no YuNet weights in {weights_dir}: pass --weights-dir", file=sys.stderr)
        return 2
    detector_setting = args.detector or settings.detector
    # In-process modes resolve "auto" for this process's threads; each system worker resolves it for
    # its own (as `genderlens infer` does), and reports what it chose.
    detector = (
        default_detector(args.device, args.threads or torch.get_num_threads())
        if detector_setting == "auto"
        else detector_setting
    )
    batch_size = args.batch_size or settings.batch_size
    max_wait_ms = settings.max_wait_ms if args.max_wait_ms is None else args.max_wait_ms
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    try:
        clip = build_clip(args.photos, args.frames, args.seed)
    except FileNotFoundError as exc:
        print(f"genderlens bench: {exc}", file=sys.stderr)
        return 2
    jpegs = clip.jpegs
    report: dict[str, Any] = {
        "command": "genderlens bench "
        + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "host_before": _host(),
        "config": {
            "frames": len(jpegs),
            "frame_size": list(FRAME_SIZE),
            "portraits_pasted": sum(clip.pasted),
            "device": args.device,
            "detector": detector,
            "detector_setting": detector_setting,
            "batch_size": batch_size,
            "max_wait_ms": max_wait_ms,
            "threads": args.threads or torch.get_num_threads(),
            "rounds": args.rounds,
            "torch": torch.__version__,
            "opencv": cv2.__version__,
        },
    }
    score = settings.detector_score_threshold

    def progress(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="genderlens-bench-") as tmp:
        classifier, models_dir, model_name = _load_classifier(
            args.models_dir or settings.models_dir, args.device, Path(tmp)
        )
        report["config"]["model"] = model_name
        # In-process cases; every round runs each of them once, in turn, so that a burst of load from
        # elsewhere hits all of them alike; each keeps its best round (the least disturbed).
        cases: dict[str, Callable[[], tuple[dict[str, Any], list[list[FaceOut]]]]] = {}
        if "naive" in modes:
            cases["naive"] = lambda: run_naive(jpegs, classifier, weights_dir, score)
            cases["naive_bbox"] = lambda: run_naive(jpegs, classifier, weights_dir, score, bbox_crop=True)
        names: list[str] = []
        if "pipeline" in modes:
            names = [detector]
            if "naive" in modes and detector != "cv2-yunet":
                names.append("cv2-yunet")  # the detector the naive loop uses: for the identity check
            if args.compare_detectors:
                names += [n for n in ("cv2-yunet", "torch-yunet") if n not in names]
            for name in names:
                cases[f"pipeline[{name}]"] = functools.partial(
                    run_pipeline, jpegs, classifier, name, weights_dir, score, args.device, batch_size
                )
        best: dict[str, tuple[dict[str, Any], list[list[FaceOut]]]] = {}
        for round_ in range(1, args.rounds + 1):
            for case, fn in cases.items():
                progress(f"round {round_}/{args.rounds}: {case} on {len(jpegs)} frames")
                fig, outs = fn()
                if case not in best or fig["fps"] > best[case][0]["fps"]:
                    best[case] = (fig, outs)
        for fig, _ in best.values():
            fig["best_of_rounds"] = args.rounds
        if "naive" in modes:
            report["naive"], naive_out = best["naive"]
            report["naive_bbox"], bbox_out = best["naive_bbox"]
            report["naive_bbox"]["labels_agreeing_with_aligned"] = compare(naive_out, bbox_out)[
                "labels_equal"
            ]
        if names:
            report["pipeline"], pipe_out = best[f"pipeline[{detector}]"]
            if len(names) > 1:
                report["detectors"] = {name: best[f"pipeline[{name}]"][0] for name in names}
            if "naive" in modes:
                report["identical"] = {
                    "pipeline_detector": "cv2-yunet",
                    **compare(naive_out, best["pipeline[cv2-yunet]"][1]),
                }
                if detector != "cv2-yunet":
                    report["agreement_default_detector"] = {
                        "pipeline_detector": detector,
                        **compare(naive_out, pipe_out),
                    }
        if "system" in modes:
            cfg = SystemConfig(
                models_dir, weights_dir, detector_setting, args.device, batch_size, max_wait_ms, args.cameras
            )
            cores = os.cpu_count() or 1
            threads = args.threads or (0 if args.workers == 1 else max(1, cores // args.workers))
            progress(f"system, max rate, {args.workers} worker(s)")
            system = run_system(cfg, jpegs, args.workers, threads)
            if not args.no_scaling:
                system["scaling"] = {}
                for w in (1, 2):
                    progress(f"system, max rate, {w} worker(s) of one thread")
                    system["scaling"][str(w)] = run_system(cfg, jpegs, w, 1)
            progress(f"system, {args.rate_fps:g} fps per camera for {args.rate_seconds:g}s")
            system["fixed_rate"] = run_system(
                cfg, jpegs, args.workers, threads, rate_fps=args.rate_fps, seconds=args.rate_seconds
            )
            report["system"] = system
    scaling = (report.get("system") or {}).get("scaling") or {}
    report["ratios"] = {
        "pipeline_vs_naive": _ratio(report.get("pipeline"), report.get("naive")),
        "system_vs_pipeline": _ratio(report.get("system"), report.get("pipeline")),
        "two_workers_vs_one": _ratio(scaling.get("2"), scaling.get("1")),
    }
    report["host_after"] = _host()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(report))
    return 0
