"""The WebSocket ``/ws``: per-frame results (``type: result``, at most ``stream_fps`` per camera per
client), the camera list when it changes (``type: cameras``), refused-model events (``type:
events``) and, once a second, the stats (``type: stats``, see ``summary.stats_message``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from services.viewer import metrics as M
from services.viewer.deps import SettingsDep, StateDep
from services.viewer.settings import ViewerSettings
from services.viewer.state import ViewerState
from services.viewer.summary import stats_message

router = APIRouter()

#: Seconds between two stats messages.
STATS_EVERY_S = 1.0


async def _drain_incoming(ws: WebSocket) -> None:
    # We never expect messages; reading is how a closed socket is noticed.
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return


async def _push(
    ws: WebSocket, queue: asyncio.Queue[dict[str, Any]], state: ViewerState, settings: ViewerSettings
) -> None:
    min_gap = 1.0 / settings.stream_fps
    last_sent: dict[str, float] = {}
    await ws.send_text(json.dumps(stats_message(state, settings)))
    next_stats = time.monotonic() + STATS_EVERY_S
    while not state.stopping:
        timeout = max(0.0, next_stats - time.monotonic())
        try:
            message = await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            await ws.send_text(json.dumps(stats_message(state, settings)))
            next_stats = time.monotonic() + STATS_EVERY_S
            continue
        if message.get("type") == "result":
            # At most stream_fps result messages per camera per client.
            now = time.monotonic()
            camera = str(message.get("camera"))
            if now - last_sent.get(camera, 0.0) < min_gap:
                continue
            last_sent[camera] = now
        await ws.send_text(json.dumps(message))


@router.websocket("/ws")
async def websocket(ws: WebSocket, state: StateDep, settings: SettingsDep) -> None:
    """Per-frame results (``type: result``) and once a second the stats (``type: stats``)."""
    await ws.accept()
    queue = state.subscribers.subscribe()
    M.WS_CLIENTS.inc()
    tasks = [asyncio.create_task(_drain_incoming(ws)), asyncio.create_task(_push(ws, queue, state, settings))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError, Exception):
                await task
        state.subscribers.unsubscribe(queue)
        M.WS_CLIENTS.dec()
