"""The viewer's one background task: follow every camera's frames and results streams (plain XREAD, so
every viewer sees everything and no viewer takes work from the inference group), plus the events and
model-events streams; refresh the camera list, heartbeats and live workers once a second.

Every Redis call is bounded (socket timeout; XREAD blocks for ``block_ms`` only). A lost Redis sets
``state.redis_ok = False`` (the page shows "reconnecting") and the loop retries with capped backoff;
after a reconnect every stream position is re-seeded, because a restarted Redis may hold fewer
entries than we had already read. A malformed message is counted and skipped, never fatal; frames are
checked by the schema (JPEG frame header within the pixel bound and equal to the declared size) before
they reach the ring buffer, so nothing the viewer decodes later can be a decompression bomb.

One camera's bad state stays that camera's problem: a stream that fails with an error of its own
(a key of the wrong type where the camera's stream belongs) is set aside with its own backoff
(``shared.streams.Quarantine``) while every other camera keeps flowing. A stream that was deleted and
re-created below our cursor (after an entry with the largest possible id, say: XREAD past the new
stream's last id would return nothing forever) is noticed when it stays silent for ``STUCK_CHECK_S``
and its newest id is below the cursor, and re-seeded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from services.viewer import metrics as M
from services.viewer.appearance import signatures_from_jpeg
from services.viewer.state import ViewerState, model_name
from shared import constants as C
from shared.schema import CameraInfo, CameraRequest, Event, Frame, ModelEvent, Result, SchemaError
from shared.streams import (
    REDIS_DOWN_ERRORS,
    Quarantine,
    RedisBackoff,
    event_fields,
    eviction_warning,
    is_key_error,
    parse_stream_id,
)

log = logging.getLogger(__name__)

CameraMessage = TypeVar("CameraMessage", Frame, Result)

#: How long XREAD blocks when nothing arrives; well under the socket timeout.
BLOCK_MS = 500
#: How often the camera list, heartbeats and workers are refreshed.
REFRESH_S = 1.0
#: Most entries per stream per XREAD (a burst after a stall is bounded, the ring buffer keeps the newest).
READ_COUNT = 64
#: The reader hands the event loop back at least this often while it works through a reply, so
#: requests (/healthz, streams, the WebSocket) and signals are served during a burst.
YIELD_EVERY_S = 0.02
#: A followed stream silent this long is checked for a reset below our cursor (one XREVRANGE COUNT 1,
#: at most this often per silent stream; frames streams only while their camera's heartbeat is alive).
STUCK_CHECK_S = 2.0
#: Streams not tied to one camera, followed from their newest entries (with how many to read back).
#: Camera requests: all of them (every removal decides which registry entries are stale).
GLOBAL_STREAMS = (
    (C.EVENTS_STREAM, 20),
    (C.MODEL_EVENTS_STREAM, 1),
    (C.CAMERA_REQUESTS_STREAM, C.CAMERA_REQUESTS_MAXLEN),
)

DOWN_ERRORS: tuple[type[BaseException], ...] = (*REDIS_DOWN_ERRORS, OSError)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Reader:
    def __init__(self, client: aioredis.Redis, state: ViewerState) -> None:
        # Typed loosely: redis.asyncio's stubs return `Awaitable[T] | T` unions mypy cannot await.
        self.client: Any = client
        self.state = state
        self._positions: dict[str, str] = {}  # stream -> last id read
        self._last_seen: dict[str, float] = {}  # stream -> monotonic time of its last entry or check
        # Cameras (or global streams) set aside after an error of their own, each on its own backoff.
        self._quarantine = Quarantine(base_s=1.0, cap_s=60.0)
        self._policy_checked = False
        self._next_refresh = 0.0
        self._stopping = False

    async def stop(self, task: asyncio.Task[None], timeout_s: float = 5.0) -> None:
        """Cancel the reader task and wait for it. Cancelling once is not enough: redis-py can turn a
        cancellation that lands while a connection is being opened into a ConnectionError, which the
        loop would treat as an outage, so the flag ends the loop and the cancel is repeated."""
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        while not task.done() and time.monotonic() < deadline:
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if not task.done():
            log.warning("viewer reader did not stop within %.0fs", timeout_s)

    async def run(self) -> None:
        backoff = RedisBackoff(base_s=0.2, cap_s=5.0)
        while not self._stopping:
            try:
                await self.step()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except DOWN_ERRORS as exc:
                await self._down(backoff, exc)
            except Exception:  # the reader must outlive any one bad surprise; the page depends on it
                log.exception("viewer reader error; continuing")
                await asyncio.sleep(1.0)

    def _up(self) -> None:
        """Called after every successful round trip (not only after a whole step: a step ends with a
        blocking XREAD, and the page must not say "reconnecting" for its duration)."""
        if not self.state.redis_ok:
            log.info("redis reachable")
            self.state.redis_ok, self.state.redis_error, self.state.ever_connected = True, None, True
            M.REDIS_UP.set(1)
            for view in self.state.cameras.values():
                view.notify()

    async def _down(self, backoff: RedisBackoff, exc: BaseException) -> None:
        if self.state.redis_ok or backoff.attempt == 0:
            log.warning("redis unavailable (%s: %s); reconnecting", type(exc).__name__, exc)
        self.state.redis_ok, self.state.redis_error = False, type(exc).__name__
        M.REDIS_UP.set(0)
        # Re-seed every position after the outage: a restarted Redis may have restarted its ids.
        self._positions.clear()
        self._next_refresh = 0.0
        self._policy_checked = False
        for view in self.state.cameras.values():
            view.notify()  # streams redraw with "reconnecting"
        await asyncio.sleep(backoff.next_delay())

    async def step(self) -> None:
        if time.monotonic() >= self._next_refresh:
            await self.refresh()  # it calls _up() once Redis has answered
            self._next_refresh = time.monotonic() + REFRESH_S
        streams = {s: pos for s, pos in self._positions.items()}
        if not streams:
            await asyncio.sleep(0.2)
            return
        try:
            reply: Any = await self.client.xread(streams, count=READ_COUNT, block=BLOCK_MS)
        except ResponseError as exc:
            # One stream's error fails the read of all: find it and set its camera aside.
            if not is_key_error(exc):
                raise
            await self._set_aside_bad_streams(exc)
            return
        self._up()
        received_at = time.time()
        seen_at = time.monotonic()
        # Frames first, so a result read in the same reply finds its frame in the ring buffer.
        batches = sorted(
            reply or [], key=lambda item: 0 if _s(item[0]).startswith(C.frames_stream("")) else 1
        )
        tick = time.perf_counter()
        for stream_raw, entries in batches:
            stream = _s(stream_raw)
            if not entries:
                continue
            self._positions[stream] = _s(entries[-1][0])
            self._last_seen[stream] = seen_at
            for entry_id, fields in entries:
                await self.handle(stream, _s(entry_id), fields or {}, received_at)
                if time.perf_counter() - tick > YIELD_EVERY_S:
                    await asyncio.sleep(0)
                    tick = time.perf_counter()

    # -- one entry ---------------------------------------------------------------------------------
    async def handle(
        self, stream: str, entry_id: str, fields: dict[bytes, bytes], received_at: float
    ) -> None:
        try:
            if stream.startswith(C.frames_stream("")):
                self._frame(stream, entry_id, fields, received_at)
            elif stream.startswith(C.results_stream("")):
                await self._result(stream, entry_id, fields, received_at)
            elif stream == C.EVENTS_STREAM:
                self.state.events.append((entry_id, Event.from_fields(fields)))
                self.state.subscribers.publish({"type": "events", "events": self.state.refused_events()})
            elif stream == C.CAMERA_REQUESTS_STREAM:
                request = CameraRequest.from_fields(fields)
                if request.action == "remove":
                    previous = self.state.removed_at.get(request.camera_id, 0.0)
                    self.state.removed_at[request.camera_id] = max(previous, request.at)
            elif stream == C.MODEL_EVENTS_STREAM:
                event = ModelEvent.from_fields(fields)
                self.state.model_event = {"name": event.name, "version": event.version, "at": event.at}
        except SchemaError as exc:
            M.BAD_MESSAGES.labels(stream.rsplit(":", 2)[-2] if ":" in stream else stream).inc()
            log.warning("skipping malformed entry %s on %s: %s", entry_id, stream, exc.reason)

    def _message(
        self, stream: str, prefix: str, fields: dict[bytes, bytes], kind: type[CameraMessage]
    ) -> tuple[str, CameraMessage] | None:
        """The frame or result on a camera's stream, checked to be that camera's; None for a camera
        the viewer does not follow."""
        camera_id = stream[len(prefix) :]
        if camera_id not in self.state.cameras:
            return None
        message = kind.from_fields(fields)
        if message.camera_id != camera_id:
            raise SchemaError(f"{kind.KIND} of {message.camera_id!r} on {camera_id}'s stream")
        return camera_id, message

    def _frame(self, stream: str, entry_id: str, fields: dict[bytes, bytes], received_at: float) -> None:
        found = self._message(stream, C.frames_stream(""), fields, Frame)
        if found is None:
            return
        camera_id, frame = found
        self.state.cameras[camera_id].add_frame(entry_id, frame, received_at)
        M.FRAMES.labels(camera_id).inc()

    async def _result(
        self, stream: str, entry_id: str, fields: dict[bytes, bytes], received_at: float
    ) -> None:
        found = self._message(stream, C.results_stream(""), fields, Result)
        if found is None:
            return
        camera_id, result = found
        view = self.state.cameras[camera_id]
        result = view.trim(result)
        # The faces' appearance, so the tracker notices one face replacing another in the same place;
        # decoded in a worker thread (the event loop stays free). No frame at hand: probabilities only.
        frame = view.find_frame(result.frame_id, result.seq) if result.faces else None
        signatures = None
        if frame is not None:
            signatures = await asyncio.to_thread(
                signatures_from_jpeg, frame.frame.jpeg, [f.box for f in result.faces], frame.frame.width
            )
            if camera_id not in self.state.cameras:
                return  # removed while we were away
        faces = view.add_result(result, received_at, signatures)
        latency_s = received_at - result.timestamps.captured
        M.RESULTS.labels(camera_id).inc()
        M.LATENCY.observe(max(0.0, latency_s))
        self.state.note_model(result)
        if len(self.state.subscribers):
            self.state.subscribers.publish(
                {
                    "type": "result",
                    "camera": camera_id,
                    "seq": result.seq,
                    "frame_id": result.frame_id,
                    "worker": result.worker,
                    "model": model_name(result.model) if result.model else None,
                    "width": result.width,
                    "height": result.height,
                    "latency_ms": round(latency_s * 1000, 1),
                    "stages_ms": {k: round(v, 1) for k, v in result.timestamps.stages_ms().items()},
                    "faces": [f.to_dict() for f in faces],
                    "counts": view.counts(),
                }
            )

    # -- one camera's errors, and streams reset under our cursor -------------------------------------
    @staticmethod
    def _owner(stream: str) -> str:
        """The quarantine key of a stream: its camera id, or the stream itself for a global one."""
        for prefix in (C.frames_stream(""), C.results_stream("")):
            if stream.startswith(prefix):
                return stream[len(prefix) :]
        return stream

    def _set_aside(self, owner: str, exc: BaseException) -> None:
        """Stop following ``owner`` (a camera's two streams, or one global stream) until its backoff
        expires; say so once."""
        for stream in (C.frames_stream(owner), C.results_stream(owner), owner):
            self._positions.pop(stream, None)
        M.BAD_MESSAGES.labels("unusable_stream").inc()
        if self._quarantine.add(owner):
            log.error("%s: stream unusable (%s); set aside, other cameras carry on", owner, str(exc)[:200])

    async def _set_aside_bad_streams(self, exc: ResponseError) -> None:
        streams = list(self._positions)
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            pipe.type(stream)
        types: list[Any] = await pipe.execute(raise_on_error=False)
        bad = [s for s, t in zip(streams, types, strict=True) if _s(t) not in ("stream", "none")]
        for stream in bad:
            self._set_aside(self._owner(stream), exc)
        if not bad:
            raise exc  # not one stream's problem after all

    async def _check_policy(self) -> None:
        """Warn loudly (log and event) when Redis may evict our keys (``shared.streams``)."""
        self._policy_checked = True
        try:
            info: Any = await self.client.info("memory")
        except ResponseError as exc:
            log.warning("viewer: could not check the Redis eviction policy: %s", exc)
            return
        warning = eviction_warning(info)
        if warning is not None:
            log.warning("viewer: %s", warning)
            await self.client.xadd(
                C.EVENTS_STREAM,
                event_fields("error", "viewer", warning),
                maxlen=C.EVENTS_MAXLEN,
                approximate=True,
            )

    async def _check_silent_streams(self, alive: set[str]) -> None:
        """Re-seed streams deleted and re-created below our cursor: XREAD past a stream's last id
        returns nothing, forever, so a stream that has been silent a while is compared with its newest
        entry. Frames streams of cameras without a heartbeat are skipped (silence is expected there,
        and their newest entry is a whole frame)."""
        now = time.monotonic()
        candidates = [
            (stream, pos)
            for stream, pos in self._positions.items()
            if now - self._last_seen.get(stream, now) >= STUCK_CHECK_S
            and not (stream.startswith(C.frames_stream("")) and self._owner(stream) not in alive)
        ]
        if not candidates:
            return
        pipe = self.client.pipeline(transaction=False)
        for stream, _ in candidates:
            pipe.xrevrange(stream, count=1)
            self._last_seen[stream] = now
        newest: list[Any] = await pipe.execute(raise_on_error=False)
        for (stream, pos), entries in zip(candidates, newest, strict=True):
            if isinstance(entries, Exception):
                continue  # the next XREAD finds and sets aside a broken key
            top = _s(entries[0][0]) if entries else None
            if (top is None and pos != "0-0") or (
                top is not None and parse_stream_id(top) < parse_stream_id(pos)
            ):
                log.warning(
                    "%s was reset below our cursor %s (newest: %s); following it afresh", stream, pos, top
                )
                owner = self._owner(stream)
                if owner in self.state.cameras:
                    await self._seed(owner)
                else:
                    self._positions[stream] = top or "0-0"

    # -- periodic refresh --------------------------------------------------------------------------
    async def refresh(self) -> None:
        if not self._policy_checked:
            await self._check_policy()
        # First (camera requests included: removals decide which registry entries are stale).
        await self._seed_events()
        raw: Any = await self.client.hgetall(C.CAMERAS_KEY)
        # Redis answers: say so before the cameras appear (the rest of the refresh awaits more round
        # trips, and a page or /ws client must not see a camera while Redis still reads "reconnecting").
        self._up()
        infos: dict[str, CameraInfo] = {}
        stale: list[str] = []
        for key, value in (raw or {}).items():
            camera_id = _s(key)
            if not C.is_valid_camera_id(camera_id):
                continue  # never let a bad id reach a key name or the page
            try:
                info = CameraInfo.unpack(value)
            except SchemaError as exc:
                log.warning("camera %s: bad registry entry: %s", camera_id, exc.reason)
                continue
            if self.state.is_removed(info):
                stale.append(camera_id)
                continue
            infos[camera_id] = info
        if stale:
            # Left behind by a capture process stopped after its camera was removed: drop it, so
            # workers and other viewers stop following it too.
            await self.client.hdel(C.CAMERAS_KEY, *stale)
        for camera_id in list(self.state.cameras):
            if camera_id not in infos:
                self.state.remove_camera(camera_id)
                self._positions.pop(C.frames_stream(camera_id), None)
                self._positions.pop(C.results_stream(camera_id), None)
        ids = sorted(infos)
        pipe = self.client.pipeline(transaction=False)
        for camera_id in ids:
            pipe.exists(C.camera_heartbeat_key(camera_id))
        alive: list[Any] = await pipe.execute() if ids else []
        for camera_id, is_alive in zip(ids, alive, strict=True):
            view = self.state.camera(camera_id)
            previous = (view.info.status if view.info else None, view.alive)
            view.info, view.alive = infos[camera_id], bool(is_alive)
            if previous != (view.info.status, view.alive):
                view.notify()
            if C.frames_stream(camera_id) not in self._positions and not self._quarantine.blocked(camera_id):
                try:
                    await self._seed(camera_id)
                except ResponseError as exc:
                    if not is_key_error(exc):
                        raise
                    self._set_aside(camera_id, exc)
                    continue
                if self._quarantine.clear(camera_id):
                    log.info("camera %s: its streams are usable again", camera_id)
        await self._check_silent_streams({c for c, a in zip(ids, alive, strict=True) if a})
        self.state.workers = await self.read_workers()
        M.CAMERAS.set(len(self.state.cameras))
        M.WORKERS.set(len(self.state.workers))

    async def _seed(self, camera_id: str) -> None:
        """Start each stream at its newest entry (and show that frame at once) rather than replaying
        history; results: the few newest, so the newest frame can be paired if its result is there."""
        view = self.state.cameras[camera_id]
        view.clear_frames()
        frames_key, results_key = C.frames_stream(camera_id), C.results_stream(camera_id)
        frames: Any = await self.client.xrevrange(frames_key, count=4)
        results: Any = await self.client.xrevrange(results_key, count=4)
        for entry_id, fields in reversed(frames or []):
            try:
                frame = Frame.from_fields(fields)
            except SchemaError:
                continue
            # Seeded frames count by their capture time: an old frame must not look live.
            view.add_frame(_s(entry_id), frame, min(time.time(), frame.captured_at), live=False)
        for entry_id, fields in reversed(results or []):
            await self.handle(results_key, _s(entry_id), fields, time.time())
        self._positions[frames_key] = _s(frames[0][0]) if frames else "0-0"
        self._positions[results_key] = _s(results[0][0]) if results else "0-0"
        self._last_seen[frames_key] = self._last_seen[results_key] = time.monotonic()

    async def _seed_events(self) -> None:
        """Follow each global stream from its newest entries (once, or again after a reset)."""
        for stream, count in GLOBAL_STREAMS:
            if stream in self._positions or self._quarantine.blocked(stream):
                continue
            try:
                entries: Any = await self.client.xrevrange(stream, count=count)
            except ResponseError as exc:
                if not is_key_error(exc):
                    raise
                self._set_aside(stream, exc)
                continue
            self._quarantine.clear(stream)
            if stream == C.EVENTS_STREAM:
                self.state.events.clear()
            for entry_id, fields in reversed(entries or []):
                await self.handle(stream, _s(entry_id), fields, time.time())
            self._positions[stream] = _s(entries[0][0]) if entries else "0-0"
            self._last_seen[stream] = time.monotonic()

    async def read_workers(self) -> list[dict[str, Any]]:
        names: list[Any] = []
        async for key in self.client.scan_iter(match=C.WORKER_KEY_PATTERN, count=100):
            names.append(key)
        if not names:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in names:
            pipe.hgetall(key)
        rows: list[Any] = await pipe.execute()
        workers = []
        for row in rows:
            if not row:
                continue  # expired between SCAN and HGETALL
            data = {_s(k): _s(v) for k, v in row.items()}
            try:
                workers.append(
                    {
                        "name": data.get("name", "?"),
                        "model": data.get("model") or None,
                        "processed": int(data.get("processed", 0) or 0),
                        "heartbeat_age_s": round(max(0.0, time.time() - float(data.get("at", 0) or 0)), 2),
                    }
                )
            except ValueError:
                log.warning("malformed worker heartbeat %r", data)
        return sorted(workers, key=lambda w: str(w["name"]))
