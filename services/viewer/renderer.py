"""What each camera's stream shows now, rendered once for all its clients.

``Renderer.current`` decides what a camera shows (a placeholder for a lost camera or Redis, the newest
frame paired with its result, or raw frames with a "no inference" note when results stopped coming),
and renders it in a worker thread (``asyncio.to_thread``: decode, draw, encode) once per new picture
and per camera, whatever the number of clients: the newest rendering is cached under a key that
changes only when the picture does. The drawing itself is ``render.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from services.viewer import metrics as M
from services.viewer.render import Hud, annotate, placeholder
from services.viewer.settings import ViewerSettings
from services.viewer.state import (
    NO_INFERENCE_AFTER_S,
    NO_SIGNAL,
    RECONNECTING,
    CameraView,
    ViewerState,
    classes_of,
)

log = logging.getLogger(__name__)

#: What a rendering is cached under: same key, same picture (not rendered or sent twice).
Key = tuple[Any, ...]
#: (camera id, blur): one cached picture per camera and blur setting.
Slot = tuple[str, bool]


class Renderer:
    """Decides what a camera's stream shows now and renders it once for all clients."""

    def __init__(self, settings: ViewerSettings, state: ViewerState) -> None:
        self.settings = settings
        self.state = state
        self._cache: dict[Slot, tuple[Key, bytes]] = {}
        self._locks: dict[Slot, asyncio.Lock] = {}
        #: slot -> key whose rendering failed (its cache entry holds the previous picture)
        self._skipped: dict[Slot, Key] = {}

    def choose(self, view: CameraView, blur: bool) -> tuple[Key, Callable[[], bytes]]:
        """(key, how to render). Same key = same picture, so it is not rendered or sent twice."""
        status = view.status(self.state.redis_ok, self.settings.no_signal_after_s)
        cid = view.camera_id
        if status == RECONNECTING:
            return ("reconnecting",), lambda: placeholder(
                "RECONNECTING", f"{cid}: Redis unavailable, retrying"
            )
        if status == NO_SIGNAL:
            why = "source stopped" if view.info is not None and view.info.status == "stopped" else "no frames"
            return ("no_signal", why), lambda: placeholder("NO SIGNAL", f"{cid}: {why}")
        latest, shown = view.latest_frame, view.shown
        if latest is None:
            return ("waiting",), lambda: placeholder("WAITING", f"{cid}: no frame yet")
        fps = view.frame_rate.rate()
        quality = self.settings.jpeg_quality
        if (
            shown is not None
            and latest.frame.captured_at - shown.frame.frame.captured_at <= NO_INFERENCE_AFTER_S
        ):
            hud = Hud(cid, fps, shown.latency_ms)
            jpeg, faces, classes = shown.frame.frame.jpeg, shown.faces, classes_of(shown.result)
            return ("shown", shown.frame.entry_id, shown.result.seq), lambda: annotate(
                jpeg, faces, hud, blur=blur, blur_all=False, quality=quality, classes=classes
            )
        # No result for recent frames: keep the picture moving rather than freezing on the last
        # annotated frame; with blur on and no detections to go by, the whole picture is blurred.
        hud = Hud(cid, fps, None, note="no inference: waiting for workers")
        jpeg = latest.frame.jpeg
        return ("raw", latest.entry_id), lambda: annotate(
            jpeg, (), hud, blur=blur, blur_all=blur, quality=quality
        )

    def _hit(self, slot: Slot, key: Key) -> tuple[Key, bytes] | None:
        cached = self._cache.get(slot)
        if cached is None or cached[0] != key:
            return None
        # A frame that failed to render is reported as skipped (its picture is the previous one).
        return (("skipped", *key), cached[1]) if self._skipped.get(slot) == key else cached

    async def current(self, view: CameraView, blur: bool) -> tuple[Key, bytes]:
        """The camera's picture now, as (key, JPEG); the key's first item says what it is (shown,
        raw, no_signal, reconnecting, waiting, or skipped: the newest frame could not be drawn)."""
        key, render = self.choose(view, blur)
        slot = (view.camera_id, blur)
        hit = self._hit(slot, key)
        if hit is not None:
            return hit
        lock = self._locks.setdefault(slot, asyncio.Lock())
        async with lock:
            hit = self._hit(slot, key)
            if hit is not None:
                return hit
            started = time.perf_counter()
            jpeg = await self._render(slot, key, render)
            M.RENDER.observe(time.perf_counter() - started)
            self._cache[slot] = (key, jpeg)
            # Cameras that left the registry (not through DELETE) must not pin their last picture.
            for gone in [c for c, _ in self._cache if c not in self.state.cameras]:
                self.forget(gone)
            return self._hit(slot, key) or (key, jpeg)

    async def _render(self, slot: Slot, key: Key, render: Callable[[], bytes]) -> bytes:
        camera_id = slot[0]
        try:
            jpeg = await asyncio.to_thread(render)
        except Exception as exc:
            # Whatever one frame does to the decoder or the drawing code (an undecodable JPEG, a
            # number C cannot take), it is skipped and counted: the previous picture stays, the
            # stream goes on and a snapshot still answers.
            M.RENDER_ERRORS.labels(camera_id).inc()
            log.warning(
                "camera %s: frame skipped, cannot render it: %s: %s", camera_id, type(exc).__name__, exc
            )
            previous = self._cache.get(slot)
            self._skipped[slot] = key
            return previous[1] if previous else placeholder("BAD FRAME", f"{camera_id}: frame skipped")
        self._skipped.pop(slot, None)
        return jpeg

    def forget(self, camera_id: str) -> None:
        for blur in (False, True):
            self._cache.pop((camera_id, blur), None)
            self._locks.pop((camera_id, blur), None)
            self._skipped.pop((camera_id, blur), None)
