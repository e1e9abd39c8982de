"""The capture service: read one source, pace it to ``fps``, publish JPEG frames to the camera's
frames stream.

Capture never blocks on Redis: frames go through a small bounded queue to a publisher thread; when the
queue is full the oldest frame is dropped and counted (``publish_failed``). Frames are published by the
``shared.accounting`` script, which also counts them ``published`` and measures what the stream cap
evicts before any worker read it. A lost source is reopened with capped backoff while the camera is
marked ``no_signal``.

Through a Redis outage the publisher thread backs off (capped, one log line per attempt) while the
capture thread keeps reading the source; frames that could not be published are counted locally as
``publish_failed`` (never ``published``, so they are outside the accounting equation) and the total is
added to the camera's stats hash once Redis answers again. Every reconnect re-registers the camera and
re-creates the consumer group, which a restarted Redis has lost.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time

import cv2
import redis
from prometheus_client import Counter, Gauge

from services.capture.settings import CaptureSettings
from services.capture.sources import FrameSource, SourceOptions, open_source
from shared import constants as C
from shared.accounting import Accounting
from shared.backoff import Backoff
from shared.schema import MAX_DIMENSION, MAX_PIXELS, CameraInfo, Frame
from shared.sources import SourceError, SourceSpec
from shared.streams import (
    REDIS_DOWN_ERRORS,
    RedisBackoff,
    connect,
    ensure_group,
    publish_event,
    warn_if_evicting,
)

log = logging.getLogger(__name__)

FRAMES_CAPTURED = Counter("genderlens_capture_frames_total", "Frames read from the source", ["camera"])
FRAMES_PUBLISHED = Counter("genderlens_capture_published_total", "Frames published to Redis", ["camera"])
FRAMES_NOT_PUBLISHED = Counter(
    "genderlens_capture_publish_failed_total", "Frames dropped before reaching Redis", ["camera"]
)
FRAMES_EVICTED = Counter(
    "genderlens_capture_evicted_total",
    "Frames trimmed from the capped stream before any worker read them",
    ["camera"],
)
SOURCE_UP = Gauge("genderlens_capture_source_up", "1 while the source delivers frames", ["camera"])
STREAM_LENGTH = Gauge("genderlens_capture_stream_length", "Entries in the camera's frames stream", ["camera"])
REDIS_UP = Gauge("genderlens_capture_redis_up", "1 while Redis answers the publisher", ["camera"])


class CaptureService:
    def __init__(
        self, settings: CaptureSettings, spec: SourceSpec, camera_id: str, stop: threading.Event
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.camera_id = camera_id
        self.stop = stop
        self.stream = C.frames_stream(camera_id)
        self._queue: queue.Queue[Frame] = queue.Queue(maxsize=settings.publish_queue)
        self._client = connect(
            settings.redis_url.get_secret_value(), settings.redis_timeout_s, f"capture:{camera_id}"
        )
        self._accounting = Accounting(self._client)
        self._started_at = time.time()
        self._status = "starting"
        self._status_dirty = threading.Event()
        self.published = 0
        self.dropped = 0
        # publish_failed not yet added to the stats hash (Redis may be the reason they failed)
        self._unreported_drops = 0
        self._drops_lock = threading.Lock()

    # -- source side -------------------------------------------------------------------------------
    def _open(self, first: bool = False) -> FrameSource | None:
        """Open the source, retrying with capped backoff until it answers (or stop is set).

        At start-up a file, folder or webcam that cannot be opened is an error at once (a typo, or no
        camera at all); a network stream is retried, since it may just not be up yet. Once running,
        every kind is retried: an unplugged webcam, a dropped RTSP feed, or a file or folder that went
        away while looping, with the camera shown as ``no_signal`` meanwhile."""
        backoff = Backoff(base_s=0.5, cap_s=self.settings.reconnect_max_s)
        options = SourceOptions(
            fps=self.settings.fps,
            open_timeout_s=self.settings.open_timeout_s,
            slide_seconds=self.settings.slide_seconds,
        )
        while not self.stop.is_set():
            try:
                return open_source(self.spec, options)
            except SourceError as exc:
                if first and self.spec.kind != "stream":
                    raise
                self._set_status("no_signal")
                delay = backoff.next_delay()
                log.warning("%s (retry %d in %.1fs)", exc, backoff.attempt, delay)
                self.stop.wait(delay)
        return None

    def run(self) -> int:
        """Capture until the source ends (file without --loop) or stop is set. Returns an exit code."""
        publisher = threading.Thread(target=self._publish_loop, name="publisher", daemon=True)
        publisher.start()
        source = self._open(first=True)
        interval = 1.0 / self.settings.fps
        next_tick = time.monotonic()
        seq = 0
        try:
            while source is not None and not self.stop.is_set():
                image = source.read()
                if image is None:
                    source.close()
                    SOURCE_UP.labels(self.camera_id).set(0)
                    if self.spec.is_live:
                        log.warning("source %s lost; reconnecting", self.spec.redacted())
                        self._set_status("no_signal")
                        source = self._open()
                        continue
                    if self.settings.loop:
                        source = self._open()
                        if source is not None:
                            self._set_status("live")
                        continue
                    log.info("source %s ended", self.spec.redacted())
                    break
                SOURCE_UP.labels(self.camera_id).set(1)
                self._set_status("live")
                FRAMES_CAPTURED.labels(self.camera_id).inc()
                frame = self._encode(image, seq)
                seq += 1
                if frame is not None:
                    self._enqueue(frame)
                next_tick += interval
                delay = next_tick - time.monotonic()
                if delay > 0:
                    self.stop.wait(delay)
                else:
                    next_tick = time.monotonic()  # running late: do not try to catch up with a burst
        finally:
            if source is not None:
                source.close()
            self._set_status("stopped")
            self.stop.set()
            publisher.join(timeout=self.settings.redis_timeout_s + 2)
            self._client.close()
        log.info("capture %s stopped: %d published, %d dropped", self.camera_id, self.published, self.dropped)
        return 0

    def _encode(self, image: cv2.typing.MatLike, seq: int) -> Frame | None:
        height, width = image.shape[:2]
        # Within max_width, and within what every reader agrees to decode (a frame over the schema's
        # pixel bound would be refused by every worker and viewer).
        scale = min(
            self.settings.max_width / width, MAX_DIMENSION / height, math.sqrt(MAX_PIXELS / (width * height))
        )
        if scale < 1:
            size = (round(width * scale), round(height * scale))
            if size[0] * size[1] > MAX_PIXELS or size[1] > MAX_DIMENSION:  # rounded up past a bound
                size = (math.floor(width * scale), math.floor(height * scale))
            image = cv2.resize(image, (max(1, size[0]), max(1, size[1])), interpolation=cv2.INTER_AREA)
            height, width = image.shape[:2]
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.settings.jpeg_quality])
        if not ok:
            log.warning("could not encode frame %d as JPEG; skipped", seq)
            return None
        return Frame(self.camera_id, seq, time.time(), int(width), int(height), buf.tobytes())

    def _enqueue(self, frame: Frame) -> None:
        while True:
            try:
                self._queue.put_nowait(frame)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()  # drop the oldest: live video prefers the newest frame
                    self._count_drop()
                except queue.Empty:
                    pass

    def _count_drop(self) -> None:
        with self._drops_lock:  # called from both the capture and the publisher thread
            self.dropped += 1
            self._unreported_drops += 1
        FRAMES_NOT_PUBLISHED.labels(self.camera_id).inc()

    def _set_status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self._status_dirty.set()

    # -- Redis side --------------------------------------------------------------------------------
    def _register(self) -> None:
        info = CameraInfo(
            camera_id=self.camera_id,
            source=self.spec.redacted(),
            fps=self.settings.fps,
            status=self._status,
            started_at=self._started_at,
            updated_at=time.time(),
        )
        with self._drops_lock:
            drops, self._unreported_drops = self._unreported_drops, 0
        pipe = self._client.pipeline(transaction=False)
        pipe.hset(C.CAMERAS_KEY, self.camera_id, info.pack())  # type: ignore[arg-type]  # bytes are fine
        pipe.set(C.camera_heartbeat_key(self.camera_id), self._status, ex=C.CAMERA_HEARTBEAT_TTL_S)
        if drops:
            pipe.hincrby(C.stats_key(self.camera_id), C.STAT_PUBLISH_FAILED, drops)
        pipe.xlen(self.stream)
        try:
            replies = pipe.execute()
        except BaseException:
            with self._drops_lock:  # not reported after all: try again next time
                self._unreported_drops += drops
            raise
        STREAM_LENGTH.labels(self.camera_id).set(replies[-1])
        # After a Redis restart the group is gone: re-create it here, before the next frame, so that
        # workers (which re-discover cameras from CAMERAS_KEY) find it.
        if ensure_group(self._client, self.stream, C.INFERENCE_GROUP):
            log.info("created consumer group %s on %s", C.INFERENCE_GROUP, self.stream)

    def _publish_loop(self) -> None:
        backoff = RedisBackoff(cap_s=5.0)
        registered = False
        policy_checked = False
        last_beat = 0.0
        while True:
            try:
                frame = self._queue.get(timeout=0.2)
            except queue.Empty:
                frame = None
                if self.stop.is_set():
                    self._final_register()
                    break
            try:
                now = time.monotonic()
                if (
                    not registered
                    or self._status_dirty.is_set()
                    or now - last_beat > C.CAMERA_HEARTBEAT_TTL_S / 3
                ):
                    self._status_dirty.clear()
                    self._register()
                    registered, last_beat = True, now
                    if not policy_checked:
                        policy_checked = True
                        warn_if_evicting(self._client, f"capture {self.camera_id}")
                if frame is not None:
                    self._publish(frame)
                backoff.reset()
                REDIS_UP.labels(self.camera_id).set(1)
            except REDIS_DOWN_ERRORS as exc:
                registered = False
                REDIS_UP.labels(self.camera_id).set(0)
                if frame is not None:
                    self._count_drop()
                # Sleep on the backoff, but keep draining: frames queued meanwhile are dropped (counted)
                # by _enqueue rather than blocking the capture thread.
                backoff.wait(self.stop, f"capture {self.camera_id}", exc)
            except redis.RedisError as exc:
                # Not an outage (e.g. a script error or a wrong key type): never spin on it.
                log.error("capture %s: redis error %s; frame dropped", self.camera_id, exc)
                registered = False
                if frame is not None:
                    self._count_drop()
                self.stop.wait(0.5)

    def _final_register(self) -> None:
        """Best effort on the way out: show the camera as stopped and report the last drops."""
        try:
            self._register()
        except redis.RedisError as exc:
            log.warning("capture %s: could not record the stopped status: %s", self.camera_id, exc)

    def _publish(self, frame: Frame) -> None:
        # One atomic script: XADD, count published, trim to the cap and count what the trim evicted.
        published = self._accounting.publish(self.camera_id, frame.to_fields(), self.settings.frames_maxlen)
        self.published += 1
        FRAMES_PUBLISHED.labels(self.camera_id).inc()
        if published.evicted:
            FRAMES_EVICTED.labels(self.camera_id).inc(published.evicted)
        if published.reset_lost is not None:
            # Someone wrote an entry with the largest possible id: the publish script re-created the
            # stream and its group, and counted the frames still in flight as evicted.
            FRAMES_EVICTED.labels(self.camera_id).inc(published.reset_lost)
            message = (
                f"camera {self.camera_id}: {self.stream} had exhausted its last possible id; re-created, "
                f"{published.reset_lost} frames in flight counted evicted"
            )
            log.error("%s", message)
            publish_event(self._client, "error", f"capture {self.camera_id}", message)
