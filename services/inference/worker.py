"""The inference worker: one member of the consumer group over every camera's frames stream.

Loop: read up to ``batch_size`` entries per camera (XREADGROUP COUNT/BLOCK across all frames streams),
sort out what cannot or need not be processed (malformed -> dead letter, too old -> dropped as stale),
run the pipeline on the rest in passes of at most ``batch_size`` frames, and settle every entry in one
round trip: ``shared.accounting.SETTLE_LUA`` acks it and, only if that ack settled it, counts the
outcome and publishes its result or dead-letter record, so a frame is counted once even when a slow
worker and a claimer race for it. Entries a dead worker left pending are claimed after
``claim_idle_ms`` and get the same treatment; after ``max_deliveries`` they are dead-lettered; claimed
entries whose frame was trimmed meanwhile are counted evicted. Redis outages are ridden out with capped
backoff (one log line per attempt); afterwards cameras are re-discovered and groups re-created.
SIGTERM stops reading, finishes the batch in hand, acks it, leaves the group and exits 0.

Validation is cheap and comes first: a message that is not a well-formed frame (not msgpack, wrong
schema version, too big, absurd or inconsistent dimensions, a truncated or corrupt JPEG, more pixels than
``shared.schema.MAX_PIXELS``) is dead-lettered with the reason, its size and a hash (never its pixels)
before anything decodes it, whatever its age. A result that is ready but already older than the
staleness budget is dropped too (counted ``dropped_stale``, and ``dropped_stale_publish`` beside it):
nobody would see it in time.

Under overload the compute goes to frames that can still make the budget (live video degrades to fewer,
fresh results, not to none): the worker reads past a camera's backlog (``_catch_up``), expects a batch
to take what recent ones took per frame (:class:`BatchTime`), and chooses each camera's newest frames
first, the cameras in turn (``_choose``); a frame whose age plus that expected time is over the budget
is dropped at read (``dropped_stale``, with ``dropped_stale_predicted`` beside it). The publish-time
check stays as the last guard.

One camera's bad state stays that camera's problem: an error that belongs to one stream (a key of the
wrong type where its frames stream belongs, say) sets that stream aside (``shared.streams.Quarantine``,
retried on its own backoff, reported once as an event and on ``genderlens_worker_camera_isolated``)
while every other camera keeps flowing.

A :class:`WorkerObserver` given to the worker sees every read and every handled batch with their
timings (``tools/bench`` measures the worker's Redis I/O with it); the worker behaves the same with or
without one.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import ResponseError

from services.inference.models import ModelManager
from services.inference.pipeline import FrameError, FrameOutput, Pipeline, applied_threshold
from services.inference.settings import InferenceSettings
from shared import constants as C
from shared.accounting import Accounting
from shared.schema import FIELD, MAX_FACES, Face, Frame, ModelRef, Result, SchemaError, Timestamps
from shared.streams import (
    REDIS_DOWN_ERRORS,
    Quarantine,
    RedisBackoff,
    autoclaim,
    connect,
    ensure_group,
    is_key_error,
    publish_event,
    stream_id_age_ms,
    warn_if_evicting,
)

log = logging.getLogger(__name__)

FRAMES = Counter("genderlens_worker_frames_total", "Frames handled by outcome", ["camera", "outcome"])
FACES = Counter("genderlens_worker_faces_total", "Faces found", ["camera"])
BATCH = Histogram(
    "genderlens_worker_batch_size", "Frames per processed batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
LATENCY = Histogram(
    "genderlens_worker_latency_seconds",
    "Capture to result published",
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5),
)
STAGE = Histogram("genderlens_worker_stage_seconds", "Time per pipeline stage per batch", ["stage"])
MODEL_INFO = Gauge("genderlens_worker_model_loaded", "1 when a classifier is loaded")
CLAIMED = Counter(
    "genderlens_worker_claimed_total", "Pending entries claimed from other consumers", ["camera"]
)
PENDING = Gauge("genderlens_worker_group_pending", "Entries delivered but not yet acked (group)", ["camera"])
STREAM_LENGTH = Gauge("genderlens_worker_stream_length", "Entries in the camera's frames stream", ["camera"])
REDIS_RETRIES = Counter("genderlens_worker_redis_retries_total", "Backoff waits for an unreachable Redis")
LOST_RACES = Counter(
    "genderlens_worker_already_settled_total", "Entries another worker settled first (not counted again)"
)
STALE_AT_PUBLISH = Counter(
    "genderlens_worker_dropped_stale_publish_total",
    "Results ready but older than the staleness budget, dropped (a part of outcome=dropped_stale)",
    ["camera"],
)
STALE_PREDICTED = Counter(
    "genderlens_worker_dropped_stale_predicted_total",
    "Frames dropped at read because their age plus the batch's expected processing time was over the "
    "staleness budget (a part of outcome=dropped_stale)",
    ["camera"],
)
EXPECTED_FRAME = Gauge(
    "genderlens_worker_expected_frame_seconds",
    "Processing time per frame the worker plans its batches with (moving average plus deviation)",
)
#: At most this many extra reads per batch to get past a camera's backlog (``Worker._catch_up``): with
#: ``batch_size`` 8 that is 128 frames per camera, more than a capped frames stream holds by default.
MAX_CATCH_UP_READS = 16
CAMERA_ERRORS = Counter(
    "genderlens_worker_camera_errors_total", "Errors of one camera's own keys (wrong type...)", ["camera"]
)
ISOLATED = Gauge(
    "genderlens_worker_camera_isolated",
    "1 while a camera's stream is set aside after such an error",
    ["camera"],
)


def validate(fields: dict[bytes, bytes], camera_id: str) -> Frame | str:
    """The frame in a stream entry, or the reason it must be dead-lettered. Never raises.

    ``Frame.from_fields`` checks the JPEG's markers and frame header (``shared.schema.check_jpeg``:
    within the pixel bound, equal to the declared size) without decoding it."""
    try:
        frame = Frame.from_fields(fields)
    except SchemaError as exc:
        return exc.reason
    except Exception as exc:  # a validator bug must not kill the worker: dead-letter and go on
        return f"frame: unreadable ({type(exc).__name__})"
    if frame.camera_id != camera_id:
        return f"camera_id {frame.camera_id!r} on {camera_id}'s stream"
    return frame


def strongest_faces(faces: tuple[Face, ...]) -> tuple[Face, ...]:
    """At most ``MAX_FACES`` faces (the highest scores, in their original order): a result must pass
    the schema that its readers apply."""
    if len(faces) <= MAX_FACES:
        return faces
    keep = set(sorted(range(len(faces)), key=lambda i: faces[i].score, reverse=True)[:MAX_FACES])
    return tuple(f for i, f in enumerate(faces) if i in keep)


@dataclass
class Entry:
    stream: str
    camera_id: str
    entry_id: bytes
    fields: dict[bytes, bytes]
    deliveries: int = 1


class BatchTime:
    """How long the pipeline is expected to take on a batch: the number of frames times a per-frame
    estimate kept as TCP keeps its round-trip estimate (RFC 6298): a moving average of the measured
    time per frame plus the moving average of its deviation, so that a jittery (contended) machine is
    planned for its slower batches rather than its average one.

    Bounded both ways. Before the first batch it assumes ``START_MS`` per frame, a fast CPU
    pipeline: optimistic on purpose, since a guess too low costs no more than the publish-time check
    already catches, while one too high would drop frames a fast worker could have shown; still, a
    worker that starts into a backlog does not take all of it into its first batch. And it never
    expects more than half the budget per frame, so that a fresh frame is always tried: the worker
    keeps measuring, and one slow batch (a stall, a swap) can never make it drop everything for good."""

    START_MS = 20.0  #: per frame, until the first batch is measured
    ALPHA = 0.25  #: weight of a new sample in the mean (RFC 6298's 1/8 is slower than a load changes)
    BETA = 0.25  #: weight of a new sample in the deviation

    def __init__(self, budget_ms: float) -> None:
        self.cap_ms = budget_ms / 2
        self.start_ms = min(self.START_MS, self.cap_ms)
        self.mean_ms: float | None = None
        self.dev_ms = 0.0

    def per_frame_ms(self) -> float:
        if self.mean_ms is None:
            return self.start_ms
        return min(self.mean_ms + self.dev_ms, self.cap_ms)

    def observe(self, frames: int, seconds: float) -> None:
        """A batch of ``frames`` frames took ``seconds`` in the pipeline."""
        sample = min(1000 * seconds / max(frames, 1), self.cap_ms)
        if self.mean_ms is None:
            self.mean_ms, self.dev_ms = sample, sample / 2
        else:
            self.dev_ms += self.BETA * (abs(sample - self.mean_ms) - self.dev_ms)
            self.mean_ms += self.ALPHA * (sample - self.mean_ms)
        EXPECTED_FRAME.set(self.per_frame_ms() / 1000)


class WorkerObserver(Protocol):
    """Hooks that let a caller measure a running worker (the benchmark's Redis I/O figure) without
    patching its methods. They are called on the worker's own thread, so they must be quick; an
    exception from one is handled like any other error of the loop (logged, the loop goes on)."""

    def on_read(self, entries: Sequence[Entry], started: float, finished: float) -> None:
        """A read (XREADGROUP over the frames streams) returned ``entries``; ``started`` and
        ``finished`` are ``time.time()`` around it (comparable with the entries' stream ids)."""

    def on_handled(self, entries: int, seconds: float, pipeline_seconds: float) -> None:
        """``handle`` settled ``entries`` entries in ``seconds`` (perf_counter), ``pipeline_seconds``
        of which were spent in the pipeline (``Pipeline.process``, retries included)."""


class Worker:
    def __init__(
        self,
        settings: InferenceSettings,
        pipeline: Pipeline,
        models: ModelManager,
        stop: threading.Event,
        name: str,
        client: redis.Redis | None = None,
        observer: WorkerObserver | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.models = models
        self.stop = stop
        self.name = name
        # Blocking reads need a socket timeout longer than their BLOCK time (checked in main).
        self.client = client or connect(settings.redis_url.get_secret_value(), settings.redis_timeout_s, name)
        self.accounting = Accounting(self.client)
        self._streams: dict[str, str] = {}  # frames stream -> camera id
        self._next_cameras = 0.0
        self._next_claim = 0.0
        self._next_model_events = 0.0
        # Model events after our first look wake the model manager (older ones are already in the
        # pointer file read at start-up). Taken from Redis, not our clock, which may differ from its.
        self._model_events_id: bytes | None = None
        self._claim_cursor: dict[str, bytes] = {}
        # Streams set aside after an error of their own (see the module doc), each on its own backoff.
        self._quarantine = Quarantine(base_s=1.0, cap_s=60.0)
        self._policy_checked = False
        self.counts: dict[str, int] = defaultdict(int)
        self._health = Path(settings.health_file) if settings.health_file else None
        #: Optional timing hooks (see :class:`WorkerObserver`); None = nothing is reported.
        self.observer = observer
        #: What a batch is expected to take: frames that could not make the budget are not processed.
        self.expected = BatchTime(settings.staleness_ms)
        self._served: dict[str, float] = {}  # camera -> when a frame of it was last chosen (monotonic)

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Consume until ``stop`` is set (SIGTERM), riding out Redis outages. Returns the exit code."""
        backoff = RedisBackoff(cap_s=5.0)
        log.info("worker %s consuming group %s", self.name, C.INFERENCE_GROUP)
        while not self.stop.is_set():
            try:
                self._step()
                backoff.reset()
            except REDIS_DOWN_ERRORS as exc:
                self._forget_streams()  # Redis may come back empty: re-discover and re-create groups
                REDIS_RETRIES.inc()
                backoff.wait(self.stop, f"worker {self.name}", exc)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.warning("consumer group missing (Redis restarted?); re-discovering cameras")
                    self._forget_streams()
                    continue
                log.exception("redis error")
                self.stop.wait(1.0)
            except Exception:
                # A bug must not stop the consumer: entries in hand stay pending, get claimed again
                # and end dead-lettered after max_deliveries (or dropped as stale), never lost.
                log.exception("unexpected error in the worker loop; continuing")
                self.stop.wait(1.0)
            self._touch_health()
        self._leave()
        log.info("worker %s stopped: %s", self.name, dict(self.counts))
        return 0

    def _forget_streams(self) -> None:
        self._streams.clear()
        self._claim_cursor.clear()
        self._next_cameras = 0.0
        self._policy_checked = False  # a restarted Redis may run with another configuration

    def _step(self) -> None:
        now = time.monotonic()
        if not self._policy_checked:
            self._policy_checked = True
            warn_if_evicting(self.client, f"worker {self.name}")
        if now >= self._next_cameras or not self._streams:
            self._refresh_cameras()
            self._heartbeat()
            self._next_cameras = now + self.settings.cameras_refresh_s
        if now >= self._next_model_events:
            self._poll_model_events()
            self._next_model_events = now + 0.5
        if not self._streams:
            self.stop.wait(min(0.2, self.settings.cameras_refresh_s))
            return
        if now >= self._next_claim and not self.stop.is_set():
            # A quarter of the idle time: a dead worker's entries are claimed within 1.25x of it
            # (plus one batch), well inside the 2x promised.
            self._next_claim = now + self.settings.claim_idle_ms / 4000
            claimed = self._claim()
            if claimed:
                self.handle(claimed)
        if self.stop.is_set():  # SIGTERM: take no new work
            return
        entries = self._read(self.settings.batch_size, self.settings.block_ms)
        if entries and len(entries) < self.settings.batch_size and self.settings.max_wait_ms > 0:
            # Micro-batching: give other frames up to max_wait_ms to join the batch.
            deadline = time.monotonic() + self.settings.max_wait_ms / 1000
            while (
                len(entries) < self.settings.batch_size
                and time.monotonic() < deadline
                and not self.stop.is_set()
            ):
                more = self._read(self.settings.batch_size - len(entries), 1)
                if not more:
                    break
                entries.extend(more)
        if entries and not self.stop.is_set():
            self._catch_up(entries)
        if entries:
            # Even if stop was set meanwhile: these are delivered to us, so finish and ack them.
            self.handle(entries)

    def _poll_model_events(self) -> None:
        """A non-blocking XREAD of the model-events stream: a promote/rollback wakes the model
        manager at once instead of at its next poll."""
        if self._model_events_id is None:
            last: Any = self.client.xrevrange(C.MODEL_EVENTS_STREAM, count=1)
            self._model_events_id = bytes(last[0][0]) if last else b"0-0"
            return
        reply: Any = self.client.xread({C.MODEL_EVENTS_STREAM: self._model_events_id}, count=16)
        if not reply:
            return
        items = reply[0][1]
        self._model_events_id = bytes(items[-1][0])
        log.info("model event received: checking the current model now")
        self.models.wake()

    def _refresh_cameras(self) -> None:
        keys: Any = self.client.hkeys(C.CAMERAS_KEY)
        ids = [k.decode() for k in keys]
        for camera_id in ids:
            if not C.is_valid_camera_id(camera_id):
                continue
            stream = C.frames_stream(camera_id)
            if stream in self._streams or self._quarantine.blocked(stream):
                continue
            try:
                ensure_group(self.client, stream, C.INFERENCE_GROUP)
            except ResponseError as exc:
                self._stream_error(stream, camera_id, exc)
                continue
            self._streams[stream] = camera_id
            log.info("consuming %s", stream)
            if self._quarantine.clear(stream):
                ISOLATED.labels(camera_id).set(0)
                self._report("info", f"camera {camera_id}: {stream} is usable again; consuming it")

    # -- one camera's errors -----------------------------------------------------------------------
    def _stream_error(self, stream: str, camera_id: str, exc: ResponseError) -> None:
        """An error from a command on one stream: a missing group is re-created; an error of the key
        itself (``is_key_error``) sets the stream aside; anything else is not this camera's alone."""
        if "NOGROUP" in str(exc):
            try:
                ensure_group(self.client, stream, C.INFERENCE_GROUP)
                log.warning("consumer group missing on %s (Redis restarted?); re-created", stream)
                return
            except ResponseError as again:
                exc = again
        if not is_key_error(exc):
            raise exc
        self._isolate(stream, camera_id, exc)

    def _isolate(self, stream: str, camera_id: str, exc: BaseException) -> None:
        """Stop reading ``stream`` until its backoff expires; report it once."""
        self._streams.pop(stream, None)
        self._claim_cursor.pop(stream, None)
        CAMERA_ERRORS.labels(camera_id).inc()
        ISOLATED.labels(camera_id).set(1)
        first = self._quarantine.add(stream)
        retry_s = self._quarantine.retry_in(stream)
        if first:
            self._report(
                "error",
                f"camera {camera_id}: {stream} is unusable ({str(exc)[:200]}); set aside, other cameras "
                f"carry on; retrying with backoff (next in {retry_s:.0f}s)",
            )
        else:
            log.warning(
                "camera %s: %s still unusable (%s); next retry in %.0fs", camera_id, stream, exc, retry_s
            )

    def _report(self, level: str, message: str) -> None:
        log.log(logging.ERROR if level == "error" else logging.INFO, "%s", message)
        self.publish_event(level, message)

    def _check_streams(self) -> None:
        """After a multi-stream command failed: find the stream(s) to blame, one command each."""
        for stream, camera_id in list(self._streams.items()):
            try:
                ensure_group(self.client, stream, C.INFERENCE_GROUP)
            except ResponseError as exc:
                self._stream_error(stream, camera_id, exc)

    def _read(self, count: int, block_ms: int | None, streams: Sequence[str] | None = None) -> list[Entry]:
        """XREADGROUP of up to ``count`` new entries per stream (all ours, or ``streams``); ``block_ms``
        None: do not wait."""
        if not self._streams:
            return []
        started = time.time()
        try:
            reply: Any = self.client.xreadgroup(
                C.INFERENCE_GROUP,
                self.name,
                dict.fromkeys(self._streams if streams is None else streams, ">"),
                count=count,
                block=block_ms,
            )
        except ResponseError as exc:
            # One stream's problem (a wrong type, a lost group) fails the read of all: find it, set
            # it aside or repair it, and read the others at the next step.
            if not (is_key_error(exc) or "NOGROUP" in str(exc)):
                raise
            self._check_streams()
            return []
        entries: list[Entry] = []
        for stream_raw, items in reply or []:
            stream = stream_raw.decode() if isinstance(stream_raw, bytes) else stream_raw
            for entry_id, fields in items:
                entries.append(Entry(stream, self._streams[stream], bytes(entry_id), dict(fields or {})))
        if entries and self.observer is not None:
            self.observer.on_read(entries, started, time.time())
        return entries

    def _catch_up(self, entries: list[Entry]) -> None:
        """Read past a backlog, into ``entries``. XREADGROUP hands out each stream's oldest entries
        first, at most ``batch_size`` per stream, so after a slow batch a camera's read can hold only
        its oldest frames (those least likely to make the budget) while its fresh ones wait behind.
        While a camera's read came back full, read it on, without waiting: the batch is then chosen
        (``_choose``) from every camera's newest frames, and the older ones are dropped in ``handle``
        without being decoded. Each frame is delivered once either way, so this costs round trips
        rather than transfers (beyond frames the stream's cap would have trimmed unread); a worker
        that keeps up has no backlog, so it rarely has a full read to follow."""
        count = self.settings.batch_size
        in_hand: dict[str, int] = defaultdict(int)
        for entry in entries:
            in_hand[entry.stream] += 1
        behind = [stream for stream, n in in_hand.items() if n >= count]
        for _ in range(MAX_CATCH_UP_READS):
            behind = [stream for stream in behind if stream in self._streams]
            if not behind or self.stop.is_set():
                return
            more = self._read(count, None, behind)
            got: dict[str, int] = defaultdict(int)
            for entry in more:
                got[entry.stream] += 1
            entries.extend(more)
            behind = [stream for stream in behind if got[stream] >= count]

    def _claim(self) -> list[Entry]:
        """Take over entries idle longer than claim_idle_ms (their worker died or hung)."""
        claimed: list[Entry] = []
        for stream, camera_id in list(self._streams.items()):
            try:
                claimed.extend(self._claim_stream(stream, camera_id))
            except ResponseError as exc:
                self._stream_error(stream, camera_id, exc)
        if claimed:
            log.info("claimed %d pending entries from dead or slow workers", len(claimed))
        return claimed

    def _claim_stream(self, stream: str, camera_id: str) -> list[Entry]:
        start = self._claim_cursor.get(stream, b"0-0")
        result = autoclaim(
            self.client,
            stream,
            C.INFERENCE_GROUP,
            self.name,
            self.settings.claim_idle_ms,
            start,
            count=64,
        )
        self._claim_cursor[stream] = result.next_id
        if result.deleted or result.deleted_pending:
            self._evict_trimmed(stream, camera_id, result.deleted, result.deleted_pending)
        if not result.entries:
            return []
        CLAIMED.labels(camera_id).inc(len(result.entries))
        deliveries = self._delivery_counts(stream, [e[0] for e in result.entries])
        return [
            Entry(stream, camera_id, entry_id, fields, deliveries.get(entry_id, 1))
            for entry_id, fields in result.entries
        ]

    def _evict_trimmed(
        self, stream: str, camera_id: str, deleted: list[bytes], deleted_pending: list[bytes]
    ) -> None:
        """Pending entries whose frame was trimmed from the stream before anyone finished it: evicted.

        Redis 7 already dropped ``deleted`` from the pending list (only this claimer saw them), so they
        are counted directly; Redis 6.2 left ``deleted_pending`` pending, so they are settled (acked,
        and counted only if the ack removed them)."""
        pipe = self.client.pipeline(transaction=False)
        if deleted:
            pipe.hincrby(C.stats_key(camera_id), C.STAT_EVICTED, len(deleted))
        for entry_id in deleted_pending:
            self.accounting.settle(pipe, stream, camera_id, entry_id, C.STAT_EVICTED)
        replies = pipe.execute()
        settled = len(deleted) + sum(int(r) for r in replies[1 if deleted else 0 :])
        if settled:
            log.info("%d pending entries of %s were trimmed before processing: evicted", settled, stream)
            FRAMES.labels(camera_id, C.STAT_EVICTED).inc(settled)
            self.counts[C.STAT_EVICTED] += settled

    def _delivery_counts(self, stream: str, ids: list[bytes]) -> dict[bytes, int]:
        # Just claimed, so they are all ours: filtering on our name keeps the range small.
        rows: Any = self.client.xpending_range(
            stream, C.INFERENCE_GROUP, min(ids), max(ids), len(ids) + 64, consumername=self.name
        )
        return {bytes(r["message_id"]): int(r["times_delivered"]) for r in rows}

    # -- handling ----------------------------------------------------------------------------------
    def handle(self, entries: list[Entry]) -> None:
        """Sort, process and settle one batch; every entry ends acked with exactly one outcome."""
        started = time.perf_counter()
        pipeline_s = 0.0
        read_at = time.time()
        pipe = self.client.pipeline(transaction=False)
        settles: list[tuple[Entry, str]] = []  # in the pipeline's order, to read its replies back
        good = self._sort_out(entries, pipe, settles, read_at)
        classifier = self.models.current  # read once: a swap takes effect between batches
        MODEL_INFO.set(1 if classifier else 0)
        if good:
            BATCH.observe(len(good))
            before = time.perf_counter()
            outputs = self._process(good, classifier)
            pipeline_s = time.perf_counter() - before
            self.expected.observe(len(good), pipeline_s)
            model = (
                ModelRef(
                    classifier.meta.name,
                    classifier.meta.version,
                    applied_threshold(classifier, self.settings.uncertain_threshold),
                    tuple(classifier.meta.classes),
                )
                if classifier
                else None
            )
            done_at = time.time()
            for (entry, frame), out in zip(good, outputs, strict=True):
                if isinstance(out, FrameError):
                    settles.append((entry, self._dead_letter(pipe, entry, out.reason or "unprocessable")))
                elif stream_id_age_ms(entry.entry_id, done_at) > self.settings.staleness_ms:
                    # Ready, but too late to be shown as live: the budget holds at publish too, so a
                    # slow batch never puts an old picture on the wall.
                    settles.append((entry, self._drop_stale(pipe, entry, C.STAT_DROPPED_STALE_PUBLISH)))
                else:
                    settles.append((entry, self._publish_result(pipe, entry, frame, out, model, read_at)))
        self._count_settled(settles, pipe.execute(raise_on_error=False))
        if self.observer is not None:
            self.observer.on_handled(len(entries), time.perf_counter() - started, pipeline_s)

    def _sort_out(
        self, entries: list[Entry], pipe: Any, settles: list[tuple[Entry, str]], read_at: float
    ) -> list[tuple[Entry, Frame]]:
        """The frames to process; the others are settled on ``pipe`` (and noted in ``settles``):
        malformed or given up on -> dead letter; older than the budget -> ``dropped_stale``; within
        it, but not expected to make it in this batch (``_choose``) -> ``dropped_stale`` with
        ``dropped_stale_predicted``. No frame dropped here is decoded."""
        fresh: list[tuple[Entry, Frame]] = []
        for entry in entries:
            if entry.deliveries > self.settings.max_deliveries:
                reason = f"gave up after {entry.deliveries - 1} deliveries"
                settles.append((entry, self._dead_letter(pipe, entry, reason)))
                continue
            checked = validate(entry.fields, entry.camera_id)
            if isinstance(checked, str):
                settles.append((entry, self._dead_letter(pipe, entry, checked)))
                continue
            if stream_id_age_ms(entry.entry_id, read_at) > self.settings.staleness_ms:
                # Nobody will see a result this late: do not spend compute on it.
                settles.append((entry, self._drop_stale(pipe, entry)))
                continue
            fresh.append((entry, checked))
        good = self._choose(fresh, read_at)
        chosen = {id(entry) for entry, _ in good}
        for entry, _ in fresh:
            if id(entry) not in chosen:
                # Fresh now, stale by the time its batch would be done: its compute goes to newer frames.
                settles.append((entry, self._drop_stale(pipe, entry, C.STAT_DROPPED_STALE_PREDICTED)))
        return good

    def _drop_stale(self, pipe: Any, entry: Entry, part: str = "") -> str:
        """Queue the settle that drops ``entry`` as ``dropped_stale`` (counting ``part``, the
        breakdown saying why, beside it); returns what ``_count_settled`` expects."""
        self.accounting.settle(
            pipe, entry.stream, entry.camera_id, entry.entry_id, C.STAT_DROPPED_STALE, also=part
        )
        return part or C.STAT_DROPPED_STALE

    def _choose(self, fresh: list[tuple[Entry, Frame]], now: float) -> list[tuple[Entry, Frame]]:
        """The frames of ``fresh`` expected to make the budget when processed together, in their
        read order. Taken greedily: each camera's newest frame, the cameras in turn (the one this
        worker served least recently first, so that when not all fit the same ones do not always
        win), then each camera's second newest, and so on; a frame goes in if, with it, the oldest
        frame chosen plus the expected time of the larger batch is still within the budget. So under
        overload the older frames of a camera's backlog go first, and when the worker keeps up (every
        frame fits) nothing is dropped."""
        per_frame = self.expected.per_frame_ms()
        queues: dict[str, list[tuple[float, int]]] = defaultdict(list)  # camera -> (age, index)
        for i, (entry, _) in enumerate(fresh):
            queues[entry.camera_id].append((stream_id_age_ms(entry.entry_id, now), i))
        for queue in queues.values():
            queue.sort()  # newest first
        cameras = sorted(queues, key=lambda cam: (self._served.get(cam, 0.0), queues[cam][0][0]))
        chosen: list[int] = []
        oldest = float("-inf")
        for rank in range(max((len(q) for q in queues.values()), default=0)):
            for cam in cameras:
                if rank < len(queues[cam]):
                    age, i = queues[cam][rank]
                    if max(oldest, age) + (len(chosen) + 1) * per_frame <= self.settings.staleness_ms:
                        chosen.append(i)
                        oldest = max(oldest, age)
        served = time.monotonic()
        for i in chosen:
            self._served[fresh[i][0].camera_id] = served
        return [fresh[i] for i in sorted(chosen)]

    def _publish_result(
        self, pipe: Any, entry: Entry, frame: Frame, out: FrameOutput, model: ModelRef | None, read_at: float
    ) -> str:
        """Queue the settle that publishes ``out`` as the frame's result; returns the outcome."""
        STAGE.labels("detect").observe(out.detected_at - read_at)
        STAGE.labels("classify").observe(out.classified_at - out.detected_at)
        published = time.time()
        result = Result(
            camera_id=frame.camera_id,
            seq=frame.seq,
            frame_id=entry.entry_id.decode(),
            width=out.width,
            height=out.height,
            timestamps=Timestamps(frame.captured_at, read_at, out.detected_at, out.classified_at, published),
            model=model,
            worker=self.name,
            faces=strongest_faces(out.faces),
        )
        fields = result.to_fields()
        try:
            # What readers will apply: never publish a result they must refuse (a NaN from a model).
            Result.from_fields(fields)
        except SchemaError as exc:
            return self._dead_letter(pipe, entry, f"result refused by the schema: {exc.reason}")
        self.accounting.settle(
            pipe,
            entry.stream,
            entry.camera_id,
            entry.entry_id,
            C.STAT_PROCESSED,
            output=C.results_stream(frame.camera_id),
            output_fields=fields,
            output_maxlen=self.settings.results_maxlen,
        )
        FACES.labels(frame.camera_id).inc(len(result.faces))
        LATENCY.observe(published - frame.captured_at)
        return C.STAT_PROCESSED

    def _count_settled(self, settles: list[tuple[Entry, str]], replies: list[Any]) -> None:
        """Local counters and metrics from the settle replies: 1 settled here, 0 settled by another
        worker first, an error for an entry whose keys are broken (its camera is set aside)."""
        for (entry, stat), settled in zip(settles, replies, strict=True):
            if isinstance(settled, Exception):
                log.warning("could not settle %s %s: %s", entry.stream, entry.entry_id.decode(), settled)
                if is_key_error(settled) and entry.stream in self._streams:
                    self._isolate(entry.stream, entry.camera_id, settled)
            elif settled:
                if stat in (C.STAT_DROPPED_STALE_PUBLISH, C.STAT_DROPPED_STALE_PREDICTED):
                    part = STALE_AT_PUBLISH if stat == C.STAT_DROPPED_STALE_PUBLISH else STALE_PREDICTED
                    part.labels(entry.camera_id).inc()
                    self.counts[stat] += 1
                    stat = C.STAT_DROPPED_STALE
                FRAMES.labels(entry.camera_id, stat).inc()
                self.counts[stat] += 1
            else:
                # Another worker claimed and settled it while we worked (we were slow, not dead).
                LOST_RACES.inc()
                log.info("%s %s was already settled by another worker", entry.stream, entry.entry_id.decode())

    def _process(self, good: list[tuple[Entry, Frame]], classifier: Any) -> list[FrameOutput | FrameError]:
        """Run the pipeline on the frames, at most ``batch_size`` at a time (a read takes up to that
        many per camera, so with several cameras, or a backlog read past, more can be chosen; the
        cap bounds the memory of one pass, on a GPU above all)."""
        size = self.settings.batch_size
        outputs: list[FrameOutput | FrameError] = []
        for start in range(0, len(good), size):
            outputs.extend(self._process_batch([f.jpeg for _, f in good[start : start + size]], classifier))
        return outputs

    def _process_batch(self, jpegs: list[bytes], classifier: Any) -> list[FrameOutput | FrameError]:
        """One pass of the pipeline; if it raises, run the frames one by one so that a single poisonous
        frame is dead-lettered alone instead of taking the batch (or the worker) down."""
        try:
            return self.pipeline.process(jpegs, classifier, self.settings.uncertain_threshold)
        except Exception:
            log.exception("pipeline failed on a batch of %d; retrying frame by frame", len(jpegs))
        outputs: list[FrameOutput | FrameError] = []
        for jpeg in jpegs:
            try:
                outputs.extend(self.pipeline.process([jpeg], classifier, self.settings.uncertain_threshold))
            except Exception as exc:
                outputs.append(FrameError(f"processing failed: {type(exc).__name__}: {exc}"[:300]))
        return outputs

    def _dead_letter(self, pipe: Any, entry: Entry, reason: str) -> str:
        """Queue the settle that dead-letters ``entry``. The record says why, how big the entry was and
        the SHA-256 of its message, never the message itself: dead letters of multi-megabyte frames
        would otherwise fill Redis (60 bad 4 MB frames held 252 MB; the cap of 10,000 allowed 80 GiB),
        and a hash is enough to match a record with what a producer sent."""
        log.warning("dead-lettering %s %s: %s", entry.stream, entry.entry_id.decode(), reason)
        raw = entry.fields.get(FIELD, b"")
        message = raw if isinstance(raw, bytes) else b""
        record = {
            "stream": entry.stream,
            "camera": entry.camera_id,
            "id": entry.entry_id,
            "reason": reason[:500],
            "deliveries": entry.deliveries,
            "worker": self.name,
            "at": str(time.time()),
            "size": sum(len(k) + len(v) for k, v in entry.fields.items()),
            "sha256": hashlib.sha256(message).hexdigest(),
        }
        self.accounting.settle(
            pipe,
            entry.stream,
            entry.camera_id,
            entry.entry_id,
            C.STAT_DEAD_LETTERED,
            output=C.DEADLETTER_STREAM,
            output_fields=record,
            output_maxlen=C.DEADLETTER_MAXLEN,
        )
        return C.STAT_DEAD_LETTERED

    # -- liveness ----------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        """Refresh the worker's key and the queue gauges (stream length, group pending)."""
        key = C.worker_key(self.name)
        model = self.models.current
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(
            key,
            mapping={
                "name": self.name,
                "model": model.meta.dirname if model else "",
                "processed": self.counts[C.STAT_PROCESSED],
                "at": time.time(),
            },
        )
        pipe.expire(key, C.WORKER_HEARTBEAT_TTL_S)
        cameras = list(self._streams.items())
        for stream, _ in cameras:
            pipe.xlen(stream)
            pipe.xpending(stream, C.INFERENCE_GROUP)
        replies = pipe.execute(raise_on_error=False)
        for i, (_, camera_id) in enumerate(cameras):
            length, pending = replies[2 + 2 * i], replies[3 + 2 * i]
            if isinstance(length, int):
                STREAM_LENGTH.labels(camera_id).set(length)
            if isinstance(pending, dict):
                PENDING.labels(camera_id).set(int(pending.get("pending") or 0))

    def _leave(self) -> None:
        """On a clean exit: drop the heartbeat key, leave the group if we hold nothing, close."""
        try:
            self.client.delete(C.worker_key(self.name))
            for stream in self._streams:
                try:
                    rows: Any = self.client.xpending_range(
                        stream, C.INFERENCE_GROUP, "-", "+", 1, consumername=self.name
                    )
                    # DELCONSUMER would silently drop our pending entries; with some left (a failed
                    # ack during an outage), stay a member so that another worker claims them.
                    if not rows:
                        self.client.xgroup_delconsumer(stream, C.INFERENCE_GROUP, self.name)
                    else:
                        log.warning("leaving %s with pending entries: another worker will claim them", stream)
                except ResponseError as exc:  # this stream's own problem: leave the others cleanly
                    log.warning("could not leave the group on %s: %s", stream, exc)
        except redis.RedisError as exc:
            log.warning("could not leave the consumer group cleanly: %s", exc)
        finally:
            self.client.close()

    def _touch_health(self) -> None:
        if self._health is not None:
            try:
                self._health.touch()
            except OSError as exc:
                log.warning("cannot touch health file %s: %s", self._health, exc)

    def publish_event(self, level: str, message: str) -> None:
        publish_event(self.client, level, self.name, message)
