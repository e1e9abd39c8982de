"""Annotated video: an endless MJPEG stream per camera and a snapshot of its current picture.

A stream is an async generator paced to ``stream_fps`` per client that ends when the client goes
away, when the camera is removed, or when the server stops (``ViewerState.stopping``). Pictures come
from the ``Renderer``, which renders each new one once for all clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from services.viewer import metrics as M
from services.viewer.deps import RendererDep, SettingsDep, StateDep, ViewDep
from services.viewer.render import placeholder
from services.viewer.renderer import Renderer
from services.viewer.schemas import responses
from services.viewer.state import ViewerState

BOUNDARY = "genderlensframe"
#: An unchanged picture is re-sent this often, so players keep the stream alive and a gone client is
#: noticed by the failed write.
KEEPALIVE_S = 2.0
#: Most faces listed in a snapshot's X-Genderlens-Faces header.
HEADER_FACES = 20

router = APIRouter(tags=["streams"])

Blur = Annotated[bool, Query(description="Blur faces (can only add blurring, never remove it)")]


def _part(jpeg: bytes) -> bytes:
    """One MJPEG part *followed by* the next boundary: browsers show a part only once they see the
    boundary after it, so sending it with the part (not with the next frame) avoids showing every
    frame one frame late, and a status placeholder a keep-alive late."""
    return (
        f"Content-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
        + jpeg
        + f"\r\n--{BOUNDARY}\r\n".encode()
    )


async def mjpeg(
    state: ViewerState, renderer: Renderer, camera_id: str, blur: bool, fps: float, max_frames: int | None
) -> AsyncIterator[bytes]:
    interval = 1.0 / fps
    last_key: tuple[Any, ...] | None = None
    last_sent = 0.0
    sent = 0
    M.STREAM_CLIENTS.inc()
    try:
        yield f"--{BOUNDARY}\r\n".encode()
        while not state.stopping:
            view = state.cameras.get(camera_id)
            if view is None:
                # Removed while we were streaming: say so once, then end the response.
                yield _part(placeholder("REMOVED", f"{camera_id} was removed"))
                return
            changed = view.changed  # taken before rendering, so no update is missed while we sleep
            started = time.monotonic()
            key, jpeg = await renderer.current(view, blur)
            if key != last_key or started - last_sent >= KEEPALIVE_S:
                yield _part(jpeg)
                M.SERVED.labels(camera_id).inc()
                sent += 1
                last_key, last_sent = key, time.monotonic()
                if max_frames is not None and sent >= max_frames:
                    return
                # Pace each client to stream_fps whatever the camera's frame rate.
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
            # Wake on the next frame/result, or after a while to notice status changes by age.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 0.5)
    finally:
        M.STREAM_CLIENTS.dec()


@router.get(
    "/cameras/{camera_id}/stream.mjpg",
    summary="Annotated MJPEG stream of one camera",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {f"multipart/x-mixed-replace; boundary={BOUNDARY}": {}},
            "description": "JPEG parts, paced to GENDERLENS_STREAM_FPS, until the client goes away.",
        },
        **responses(404, 422),
    },
)
async def stream(
    view: ViewDep,
    state: StateDep,
    renderer: RendererDep,
    settings: SettingsDep,
    blur: Blur = False,
    max_frames: Annotated[int | None, Query(ge=1, le=100_000, description="End after N frames")] = None,
) -> StreamingResponse:
    return StreamingResponse(
        mjpeg(state, renderer, view.camera_id, blur or settings.blur_faces, settings.stream_fps, max_frames),
        media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/cameras/{camera_id}/snapshot.jpg",
    summary="The current annotated picture of one camera",
    response_class=Response,
    responses={
        200: {
            "content": {"image/jpeg": {}},
            "description": "The picture the stream shows now. X-Genderlens-Kind: shown, raw, no_signal, "
            "reconnecting, waiting or skipped; with `shown`, X-Genderlens-Seq and X-Genderlens-Faces "
            "(the boxes and labels drawn, as JSON).",
        },
        **responses(404, 422),
    },
)
async def snapshot(
    view: ViewDep, renderer: RendererDep, settings: SettingsDep, blur: Blur = False
) -> Response:
    key, jpeg = await renderer.current(view, blur or settings.blur_faces)
    headers = {"Cache-Control": "no-store", "X-Genderlens-Kind": str(key[0])}
    shown = view.shown
    if key[0] == "shown" and shown is not None and key[1:] == (shown.frame.entry_id, shown.result.seq):
        # What was drawn, so a client can tell where the boxes are without parsing pixels.
        headers["X-Genderlens-Seq"] = str(shown.result.seq)
        headers["X-Genderlens-Faces"] = json.dumps(
            [
                {"track_id": f.track_id, "box": [round(v, 1) for v in f.box], "label": f.label}
                for f in shown.faces[:HEADER_FACES]
            ]
        )
    return Response(jpeg, media_type="image/jpeg", headers=headers)
