"""The inference worker: one member of the consumer group over every camera's frames stream.

Loop: read up to ``batch_size`` entries (XREADGROUP COUNT/BLOCK across all frames streams), sort out
what cannot or need not be processed (malformed -> dead letter, too old -> dropped as stale), run the
pipeline on the rest, publish one result per frame, count, and XACK, all in one round trip. Entries a
dead worker left pending are claimed after ``claim_idle_ms`` and get the same treatment; after
``max_deliveries`` they are dead-lettered. Redis outages are ridden out with capped backoff; SIGTERM
stops reading, finishes the batch in hand, acks it and exits 0.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import ResponseError

from services.inference.models import ModelManager
from services.inference.pipeline import FrameError, Pipeline
from services.inference.settings import InferenceSettings
from shared import constants as C
from shared.schema import MAX_MESSAGE_BYTES, Event, Frame, ModelRef, Result, SchemaError, Timestamps
from shared.streams import REDIS_DOWN_ERRORS, Backoff, autoclaim, connect, ensure_group, stream_id_age_ms

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


@dataclass
class Entry:
    stream: str
    camera_id: str
    entry_id: bytes
    fields: dict[bytes, bytes]
    deliveries: int = 1


class Worker:
    def __init__(
        self,
        settings: InferenceSettings,
        pipeline: Pipeline,
        models: ModelManager,
        stop: threading.Event,
        name: str,
        client: redis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.models = models
        self.stop = stop
        self.name = name
        self.client = client or connect(settings.redis_url.get_secret_value(), settings.redis_timeout_s, name)
        # Blocking reads need a socket timeout longer than their BLOCK time.
        self._streams: dict[str, str] = {}  # frames stream -> camera id
        self._next_cameras = 0.0
        self._next_claim = 0.0
        self._claim_cursor: dict[str, bytes] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self._health = Path(settings.health_file) if settings.health_file else None

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        backoff = Backoff(cap_s=5.0)
        log.info("worker %s consuming group %s", self.name, C.INFERENCE_GROUP)
        while not self.stop.is_set():
            try:
                self._step()
                backoff.reset()
            except REDIS_DOWN_ERRORS as exc:
                self._streams.clear()  # Redis may come back empty: re-discover and re-create groups
                backoff.wait(self.stop, f"worker {self.name}", exc)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.warning("consumer group missing (Redis restarted?); recreating")
                    self._streams.clear()
                    continue
                log.exception("redis error")
                self.stop.wait(1.0)
            self._touch_health()
        self._heartbeat(final=True)
        log.info("worker %s stopped: %s", self.name, dict(self.counts))
        return 0

    def _step(self) -> None:
        now = time.monotonic()
        if now >= self._next_cameras or not self._streams:
            self._refresh_cameras()
            self._heartbeat()
            self._next_cameras = now + self.settings.cameras_refresh_s
        if not self._streams:
            self.stop.wait(min(0.2, self.settings.cameras_refresh_s))
            return
        if now >= self._next_claim:
            self._next_claim = now + self.settings.claim_idle_ms / 2000
            claimed = self._claim()
            if claimed:
                self.handle(claimed)
        entries = self._read(self.settings.batch_size, self.settings.block_ms)
        if entries and len(entries) < self.settings.batch_size and self.settings.max_wait_ms > 0:
            # Micro-batching: give other frames up to max_wait_ms to join the batch.
            deadline = time.monotonic() + self.settings.max_wait_ms / 1000
            while len(entries) < self.settings.batch_size and time.monotonic() < deadline:
                more = self._read(self.settings.batch_size - len(entries), 1)
                if not more:
                    break
                entries.extend(more)
        if entries:
            self.handle(entries)

    def _refresh_cameras(self) -> None:
        keys: Any = self.client.hkeys(C.CAMERAS_KEY)
        ids = [k.decode() for k in keys]
        for camera_id in ids:
            if not C.is_valid_camera_id(camera_id):
                continue
            stream = C.frames_stream(camera_id)
            if stream not in self._streams:
                ensure_group(self.client, stream, C.INFERENCE_GROUP)
                self._streams[stream] = camera_id
                log.info("consuming %s", stream)

    def _read(self, count: int, block_ms: int) -> list[Entry]:
        reply: Any = self.client.xreadgroup(
            C.INFERENCE_GROUP,
            self.name,
            dict.fromkeys(self._streams, ">"),
            count=count,
            block=block_ms,
        )
        entries: list[Entry] = []
        for stream_raw, items in reply or []:
            stream = stream_raw.decode() if isinstance(stream_raw, bytes) else stream_raw
            for entry_id, fields in items:
                entries.append(Entry(stream, self._streams[stream], bytes(entry_id), dict(fields or {})))
        return entries

    def _claim(self) -> list[Entry]:
        """Take over entries idle longer than claim_idle_ms (their worker died or hung)."""
        claimed: list[Entry] = []
        for stream, camera_id in list(self._streams.items()):
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
            if result.deleted:
                # Pending entries trimmed from the stream before anyone processed them: evicted.
                pipe = self.client.pipeline(transaction=False)
                pipe.xack(stream, C.INFERENCE_GROUP, *result.deleted)
                pipe.hincrby(C.stats_key(camera_id), C.STAT_EVICTED, len(result.deleted))
                pipe.execute()
                self.counts["evicted"] += len(result.deleted)
            if not result.entries:
                continue
            deliveries = self._delivery_counts(stream, [e[0] for e in result.entries])
            for entry_id, fields in result.entries:
                claimed.append(Entry(stream, camera_id, entry_id, fields, deliveries.get(entry_id, 1)))
        if claimed:
            log.info("claimed %d pending entries from dead or slow workers", len(claimed))
        return claimed

    def _delivery_counts(self, stream: str, ids: list[bytes]) -> dict[bytes, int]:
        first, last = min(ids), max(ids)
        rows: Any = self.client.xpending_range(stream, C.INFERENCE_GROUP, first, last, len(ids) + 16)
        return {bytes(r["message_id"]): int(r["times_delivered"]) for r in rows}

    # -- handling ----------------------------------------------------------------------------------
    def handle(self, entries: list[Entry]) -> None:
        read_at = time.time()
        pipe = self.client.pipeline(transaction=False)
        good: list[tuple[Entry, Frame]] = []
        for entry in entries:
            if entry.deliveries > self.settings.max_deliveries:
                self._dead_letter(pipe, entry, f"gave up after {entry.deliveries - 1} deliveries")
                continue
            try:
                frame = Frame.from_fields(entry.fields)
            except SchemaError as exc:
                self._dead_letter(pipe, entry, exc.reason)
                continue
            if frame.camera_id != entry.camera_id:
                self._dead_letter(pipe, entry, f"camera_id {frame.camera_id!r} on {entry.camera_id}'s stream")
                continue
            if stream_id_age_ms(entry.entry_id, read_at) > self.settings.staleness_ms:
                self._count(pipe, entry, C.STAT_DROPPED_STALE)
                continue
            good.append((entry, frame))
        classifier = self.models.current  # read once: a swap takes effect between batches
        MODEL_INFO.set(1 if classifier else 0)
        if good:
            BATCH.observe(len(good))
            outputs = self.pipeline.process(
                [f.jpeg for _, f in good], classifier, self.settings.uncertain_threshold
            )
            model = ModelRef(classifier.meta.name, classifier.meta.version) if classifier else None
            for (entry, frame), out in zip(good, outputs, strict=True):
                if isinstance(out, FrameError):
                    self._dead_letter(pipe, entry, out.reason)
                    continue
                STAGE.labels("detect").observe(out.detected_at - read_at)
                STAGE.labels("classify").observe(out.classified_at - out.detected_at)
                published = time.time()
                result = Result(
                    camera_id=frame.camera_id,
                    seq=frame.seq,
                    frame_id=entry.entry_id.decode(),
                    width=out.width,
                    height=out.height,
                    timestamps=Timestamps(
                        frame.captured_at, read_at, out.detected_at, out.classified_at, published
                    ),
                    model=model,
                    worker=self.name,
                    faces=out.faces,
                )
                pipe.xadd(
                    C.results_stream(frame.camera_id),
                    result.to_fields(),
                    maxlen=self.settings.results_maxlen,
                    approximate=True,
                )
                self._count(pipe, entry, C.STAT_PROCESSED)
                FACES.labels(frame.camera_id).inc(len(out.faces))
                LATENCY.observe(published - frame.captured_at)
        pipe.execute()

    def _count(self, pipe: Any, entry: Entry, stat: str) -> None:
        pipe.hincrby(C.stats_key(entry.camera_id), stat, 1)
        pipe.xack(entry.stream, C.INFERENCE_GROUP, entry.entry_id)
        FRAMES.labels(entry.camera_id, stat).inc()
        self.counts[stat] += 1

    def _dead_letter(self, pipe: Any, entry: Entry, reason: str) -> None:
        log.warning("dead-lettering %s %s: %s", entry.stream, entry.entry_id.decode(), reason)
        raw = entry.fields.get(b"m", b"")
        pipe.xadd(
            C.DEADLETTER_STREAM,
            {
                "stream": entry.stream,
                "id": entry.entry_id,
                "reason": reason[:500],
                "worker": self.name,
                "at": str(time.time()),
                # keep the payload for inspection unless it is itself the problem (too big)
                "payload": raw if isinstance(raw, bytes) and len(raw) <= MAX_MESSAGE_BYTES else b"",
            },
            maxlen=C.DEADLETTER_MAXLEN,
            approximate=True,
        )
        self._count(pipe, entry, C.STAT_DEAD_LETTERED)

    # -- liveness ----------------------------------------------------------------------------------
    def _heartbeat(self, final: bool = False) -> None:
        key = C.worker_key(self.name)
        try:
            if final:
                self.client.delete(key)
                return
            model = self.models.current
            self.client.hset(
                key,
                mapping={
                    "name": self.name,
                    "model": model.meta.dirname if model else "",
                    "processed": self.counts[C.STAT_PROCESSED],
                    "at": time.time(),
                },
            )
            self.client.expire(key, C.WORKER_HEARTBEAT_TTL_S)
        except REDIS_DOWN_ERRORS:
            if not final:
                raise

    def _touch_health(self) -> None:
        if self._health is not None:
            try:
                self._health.touch()
            except OSError as exc:
                log.warning("cannot touch health file %s: %s", self._health, exc)

    def publish_event(self, level: str, message: str) -> None:
        try:
            self.client.xadd(
                C.EVENTS_STREAM,
                Event(level=level, source=self.name, message=message, at=time.time()).to_fields(),
                maxlen=C.EVENTS_MAXLEN,
                approximate=True,
            )
        except redis.RedisError as exc:
            log.warning("could not publish event: %s", exc)
