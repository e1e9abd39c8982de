"""The viewer's one background task: follow every camera's frames and results streams (plain XREAD, so
every viewer sees everything and no viewer takes work from the inference group), plus the events and
model-events streams; refresh the camera list, heartbeats and live workers once a second.

Every Redis call is bounded (socket timeout; XREAD blocks for ``block_ms`` only). A lost Redis sets
``state.redis_ok = False`` (the page shows "reconnecting") and the loop retries with capped backoff;
after a reconnect every stream position is re-seeded, because a restarted Redis may hold fewer
entries than we had already read. A malformed message is counted and skipped, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.asyncio as aioredis

from services.viewer import metrics as M
from services.viewer.state import ViewerState
from services.viewer.tracker import threshold_of
from shared import constants as C
from shared.schema import CameraInfo, CameraRequest, Event, Frame, ModelEvent, Result, SchemaError
from shared.streams import REDIS_DOWN_ERRORS, Backoff

log = logging.getLogger(__name__)

#: How long XREAD blocks when nothing arrives; well under the socket timeout.
BLOCK_MS = 500
#: How often the camera list, heartbeats and workers are refreshed.
REFRESH_S = 1.0
#: Most entries per stream per XREAD (a burst after a stall is bounded, the ring buffer keeps the newest).
READ_COUNT = 64

DOWN_ERRORS: tuple[type[BaseException], ...] = (*REDIS_DOWN_ERRORS, OSError)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Reader:
    def __init__(self, client: aioredis.Redis, state: ViewerState) -> None:
        # Typed loosely: redis.asyncio's stubs return `Awaitable[T] | T` unions mypy cannot await.
        self.client: Any = client
        self.state = state
        self._positions: dict[str, str] = {}  # stream -> last id read
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
        backoff = Backoff(base_s=0.2, cap_s=5.0)
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
            log.info("redis reachable; following %d cameras", len(self.state.cameras))
            self.state.redis_ok, self.state.redis_error, self.state.ever_connected = True, None, True
            M.REDIS_UP.set(1)
            for view in self.state.cameras.values():
                view.notify()

    async def _down(self, backoff: Backoff, exc: BaseException) -> None:
        if self.state.redis_ok or backoff.attempt == 0:
            log.warning("redis unavailable (%s: %s); reconnecting", type(exc).__name__, exc)
        self.state.redis_ok, self.state.redis_error = False, type(exc).__name__
        M.REDIS_UP.set(0)
        # Re-seed every position after the outage: a restarted Redis may have restarted its ids.
        self._positions.clear()
        self._next_refresh = 0.0
        for view in self.state.cameras.values():
            view.notify()  # streams redraw with "reconnecting"
        await asyncio.sleep(backoff.next_delay())

    async def step(self) -> None:
        if time.monotonic() >= self._next_refresh:
            await self.refresh()
            self._up()
            self._next_refresh = time.monotonic() + REFRESH_S
        streams = {s: pos for s, pos in self._positions.items()}
        if not streams:
            await asyncio.sleep(0.2)
            return
        reply: Any = await self.client.xread(streams, count=READ_COUNT, block=BLOCK_MS)
        self._up()
        received_at = time.time()
        # Frames first, so a result read in the same reply finds its frame in the ring buffer.
        batches = sorted(
            reply or [], key=lambda item: 0 if _s(item[0]).startswith(C.frames_stream("")) else 1
        )
        for stream_raw, entries in batches:
            stream = _s(stream_raw)
            if not entries:
                continue
            self._positions[stream] = _s(entries[-1][0])
            for entry_id, fields in entries:
                self.handle(stream, _s(entry_id), fields or {}, received_at)

    # -- one entry ---------------------------------------------------------------------------------
    def handle(self, stream: str, entry_id: str, fields: dict[bytes, bytes], received_at: float) -> None:
        try:
            if stream.startswith(C.frames_stream("")):
                self._frame(stream, entry_id, fields, received_at)
            elif stream.startswith(C.results_stream("")):
                self._result(stream, entry_id, fields, received_at)
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

    def _camera_of(self, stream: str, prefix: str) -> str | None:
        camera_id = stream[len(prefix) :]
        return camera_id if camera_id in self.state.cameras else None

    def _frame(self, stream: str, entry_id: str, fields: dict[bytes, bytes], received_at: float) -> None:
        camera_id = self._camera_of(stream, C.frames_stream(""))
        if camera_id is None:
            return
        frame = Frame.from_fields(fields)
        if frame.camera_id != camera_id:
            raise SchemaError(f"frame of {frame.camera_id!r} on {camera_id}'s stream")
        self.state.cameras[camera_id].add_frame(entry_id, frame, received_at)
        M.FRAMES.labels(camera_id).inc()

    def _result(self, stream: str, entry_id: str, fields: dict[bytes, bytes], received_at: float) -> None:
        camera_id = self._camera_of(stream, C.results_stream(""))
        if camera_id is None:
            return
        result = Result.from_fields(fields)
        if result.camera_id != camera_id:
            raise SchemaError(f"result of {result.camera_id!r} on {camera_id}'s stream")
        view = self.state.cameras[camera_id]
        faces = view.add_result(result, received_at)
        latency_s = received_at - result.timestamps.captured
        M.RESULTS.labels(camera_id).inc()
        M.LATENCY.observe(max(0.0, latency_s))
        # The model shown is the one behind the newest result ("none" while workers have no model).
        self.state.model = (
            {"name": result.model.name, "version": result.model.version} if result.model else None
        )
        self.state.uncertain_threshold = threshold_of(result) if result.model else None
        if len(self.state.subscribers):
            self.state.subscribers.publish(
                {
                    "type": "result",
                    "camera": camera_id,
                    "seq": result.seq,
                    "frame_id": result.frame_id,
                    "worker": result.worker,
                    "model": {"name": result.model.name, "version": result.model.version}
                    if result.model
                    else None,
                    "width": result.width,
                    "height": result.height,
                    "latency_ms": round(latency_s * 1000, 1),
                    "stages_ms": {k: round(v, 1) for k, v in result.timestamps.stages_ms().items()},
                    "faces": [f.to_dict() for f in faces],
                    "counts": view.counts(),
                }
            )

    # -- periodic refresh --------------------------------------------------------------------------
    async def refresh(self) -> None:
        if C.EVENTS_STREAM not in self._positions:
            # First (camera requests included: removals decide which registry entries are stale).
            await self._seed_events()
        raw: Any = await self.client.hgetall(C.CAMERAS_KEY)
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
            if C.frames_stream(camera_id) not in self._positions:
                await self._seed(camera_id)
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
            self.handle(results_key, _s(entry_id), fields, time.time())
        self._positions[frames_key] = _s(frames[0][0]) if frames else "0-0"
        self._positions[results_key] = _s(results[0][0]) if results else "0-0"

    async def _seed_events(self) -> None:
        for stream, count in (
            (C.EVENTS_STREAM, 20),
            (C.MODEL_EVENTS_STREAM, 1),
            (C.CAMERA_REQUESTS_STREAM, 1000),
        ):
            entries: Any = await self.client.xrevrange(stream, count=count)
            if stream == C.EVENTS_STREAM:
                self.state.events.clear()
            for entry_id, fields in reversed(entries or []):
                self.handle(stream, _s(entry_id), fields, time.time())
            self._positions[stream] = _s(entries[0][0]) if entries else "0-0"

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
