"""The viewer web app: the wall page, annotated MJPEG streams, a WebSocket of per-frame results and
stats, and a small REST API (OpenAPI at ``/docs``).

``create_app(settings)`` builds everything; the lifespan owns the one ``redis.asyncio`` client and the
reader task (see ``reader.py``). Streams are async generators paced to ``stream_fps`` per client, that
end when the client goes away; JPEG decode/draw/encode runs in a worker thread, once per new frame and
per camera, whatever the number of clients (``Renderer`` caches the newest rendering).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import fastapi_offline
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, HTTPException, Query, Request, WebSocket
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from redis.exceptions import ResponseError
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.websockets import WebSocketDisconnect

from services.viewer import metrics as M
from services.viewer.auth import (
    COOKIE_NAME,
    FailureLimiter,
    OriginGuard,
    TokenAuth,
    client_key,
    login_page,
    safe_next,
    session_value,
    token_ok,
    too_many,
)
from services.viewer.reader import DOWN_ERRORS, Reader
from services.viewer.render import Hud, annotate, placeholder
from services.viewer.settings import ViewerSettings
from services.viewer.state import NO_SIGNAL, RECONNECTING, CameraView, ViewerState
from shared import constants as C
from shared.schema import CameraRequest
from shared.streams import redact_url

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
#: Swagger UI and ReDoc files, served by the viewer itself so /docs works offline (no CDN). They come
#: from the fastapi-offline package (MIT; Swagger UI Apache-2.0, ReDoc MIT).
DOCS_ASSETS = Path(fastapi_offline.__file__).with_name("static")
BOUNDARY = "genderlensframe"
#: Show raw frames with a "no inference" note when the newest annotated frame lags the newest frame
#: by more than this: results are not coming (no worker, or workers far behind).
NO_INFERENCE_AFTER_S = 1.5
#: An unchanged picture is re-sent this often, so players keep the stream alive and a gone client is
#: noticed by the failed write.
KEEPALIVE_S = 2.0
#: Counts of faces in view are those of the newest result while results keep coming (no older than
#: this); after that the page shows none, not the last ones as if they were current.
COUNTS_MAX_AGE_S = NO_INFERENCE_AFTER_S * 2
CAMERA_REQUESTS_MAXLEN = 1000


# -- request / response models -------------------------------------------------------------------
class CameraAdd(BaseModel):
    source: str = Field(
        ..., min_length=1, max_length=1000, description="Capture source spec (file, folder, rtsp://, 0)."
    )
    camera_id: str | None = Field(
        None, description="Camera id (a-z, 0-9, '-', '_'); derived from the source when omitted."
    )


class CameraRequestAccepted(BaseModel):
    camera_id: str
    action: str
    request_id: str
    detail: str


def _validated_camera_id(
    camera_id: Annotated[str, PathParam(description="Camera id (a-z, 0-9, '-', '_')", max_length=200)],
) -> str:
    # Checked before the id goes anywhere near a Redis key: no key or path injection.
    if not C.is_valid_camera_id(camera_id):
        raise HTTPException(422, f"invalid camera id (must match {C.CAMERA_ID_RE.pattern})")
    return camera_id


CameraId = Annotated[str, Depends(_validated_camera_id)]


async def _camera_add_request(body: CameraAdd, settings: ViewerSettings) -> CameraRequest:
    """Check a source sent to the API before anything acts on it, and build the request for `up`.

    A file or folder must lie inside ``source_dirs`` (403 otherwise, the same answer whether or not
    the path exists) and be something capture can play (422 otherwise); a stream needs an allowed
    scheme; a webcam must exist. Credentials in a stream URL never reach Redis in the clear: the
    request carries the URL masked, and the real one sealed for `up` (``camera_request_key``)."""
    from shared.credentials import seal
    from shared.sources import SourceError, SourceNotAllowedError, check_source, parse_source

    try:
        spec = parse_source(body.source, allowed_dirs=settings.source_dirs)
        await asyncio.to_thread(check_source, spec)
    except SourceNotAllowedError as exc:
        raise HTTPException(403, str(exc)) from None
    except SourceError as exc:
        raise HTTPException(422, str(exc)) from None
    camera_id = body.camera_id or spec.default_camera_id
    if not C.is_valid_camera_id(camera_id):
        raise HTTPException(422, f"invalid camera id (must match {C.CAMERA_ID_RE.pattern})")
    sealed = ""
    if spec.has_credentials:
        key = settings.camera_request_key
        if key is None:
            raise HTTPException(
                422,
                "a source with credentials can only be added through a viewer started by `genderlens "
                "up`, which seals them; or give it to `genderlens up` (GENDERLENS_SOURCES) instead",
            )
        sealed = seal(spec.target, key.get_secret_value())
    # Files and folders travel as the resolved path that was checked; URLs masked.
    source = redact_url(spec.target) if spec.kind == "stream" else spec.target
    return CameraRequest(action="add", camera_id=camera_id, source=source, at=time.time(), sealed=sealed)


class Renderer:
    """Decides what a camera's stream shows now and renders it once for all clients."""

    def __init__(self, settings: ViewerSettings, state: ViewerState) -> None:
        self.settings = settings
        self.state = state
        self._cache: dict[tuple[str, bool], tuple[tuple[Any, ...], bytes]] = {}
        self._locks: dict[tuple[str, bool], asyncio.Lock] = {}
        #: slot -> key whose rendering failed (its cache entry holds the previous picture)
        self._skipped: dict[tuple[str, bool], tuple[Any, ...]] = {}

    def choose(self, view: CameraView, blur: bool) -> tuple[tuple[Any, ...], Any]:
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
            jpeg, faces = shown.frame.frame.jpeg, shown.faces
            return ("shown", shown.frame.entry_id, shown.result.seq), lambda: annotate(
                jpeg, faces, hud, blur=blur, blur_all=False, quality=quality
            )
        # No result for recent frames: keep the picture moving rather than freezing on the last
        # annotated frame; with blur on and no detections to go by, the whole picture is blurred.
        hud = Hud(cid, fps, None, note="no inference: waiting for workers")
        jpeg = latest.frame.jpeg
        return ("raw", latest.entry_id), lambda: annotate(
            jpeg, (), hud, blur=blur, blur_all=blur, quality=quality
        )

    def _hit(self, slot: tuple[str, bool], key: tuple[Any, ...]) -> tuple[tuple[Any, ...], bytes] | None:
        cached = self._cache.get(slot)
        if cached is None or cached[0] != key:
            return None
        # A frame that failed to render is reported as skipped (its picture is the previous one).
        return (("skipped", *key), cached[1]) if self._skipped.get(slot) == key else cached

    async def current(self, view: CameraView, blur: bool) -> tuple[tuple[Any, ...], bytes]:
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
            try:
                jpeg = await asyncio.to_thread(render)
                self._skipped.pop(slot, None)
            except Exception as exc:
                # Whatever one frame does to the decoder or the drawing code (an undecodable JPEG, a
                # number C cannot take), it is skipped and counted: the previous picture stays, the
                # stream goes on and a snapshot still answers.
                M.RENDER_ERRORS.labels(view.camera_id).inc()
                log.warning(
                    "camera %s: frame skipped, cannot render it: %s: %s",
                    view.camera_id,
                    type(exc).__name__,
                    exc,
                )
                previous = self._cache.get(slot)
                jpeg = (
                    previous[1] if previous else placeholder("BAD FRAME", f"{view.camera_id}: frame skipped")
                )
                self._skipped[slot] = key
            M.RENDER.observe(time.perf_counter() - started)
            self._cache[slot] = (key, jpeg)
            # Cameras that left the registry (not through DELETE) must not pin their last picture.
            for gone in [c for c, _ in self._cache if c not in self.state.cameras]:
                self.forget(gone)
            return self._hit(slot, key) or (key, jpeg)

    def forget(self, camera_id: str) -> None:
        for blur in (False, True):
            self._cache.pop((camera_id, blur), None)
            self._locks.pop((camera_id, blur), None)
            self._skipped.pop((camera_id, blur), None)


def _part(jpeg: bytes) -> bytes:
    """One MJPEG part *followed by* the next boundary: browsers show a part only once they see the
    boundary after it, so sending it with the part (not with the next frame) avoids showing every
    frame one frame late, and a status placeholder a keep-alive late."""
    return (
        f"Content-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
        + jpeg
        + f"\r\n--{BOUNDARY}\r\n".encode()
    )


def create_app(settings: ViewerSettings) -> FastAPI:
    state = ViewerState(
        frame_buffer=settings.frame_buffer,
        max_faces=settings.max_faces,
        max_tracks=settings.max_tracks,
    )
    limiter = FailureLimiter(settings.auth_fail_burst, settings.auth_fail_refill_s)
    renderer = Renderer(settings, state)
    holder: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = settings.redis_url.get_secret_value()
        client = aioredis.Redis.from_url(
            url,
            # Blocking XREADs add their BLOCK time on top of the ordinary timeout.
            socket_timeout=settings.redis_timeout_s + 1.0,
            socket_connect_timeout=settings.redis_timeout_s,
            health_check_interval=15,
            client_name="viewer",
            decode_responses=False,
        )
        reader = Reader(client, state)
        holder["client"], holder["reader"] = client, reader
        task = asyncio.create_task(reader.run(), name="viewer-reader")
        log.info("viewer reading %s", redact_url(url))
        try:
            yield
        finally:
            await reader.stop(task)
            await client.aclose()

    app = FastAPI(
        title="genderlens viewer",
        version="1.0",
        description="Live annotated video of every camera, per-frame results and system stats. "
        "Labels are *perceived* gender from a face classifier, with a confidence; "
        "`uncertain` below the configured threshold.",
        lifespan=lifespan,
        # Served below from local files: the defaults load Swagger UI and ReDoc from a CDN, which an
        # offline viewer (the usual case for a camera network) cannot reach, leaving /docs blank.
        docs_url=None,
        redoc_url=None,
    )
    app.state.viewer = state
    app.state.settings = settings

    def stop_streams() -> None:
        """Called by the server on SIGTERM/SIGINT: endless MJPEG responses end (within 0.5 s)
        instead of holding graceful shutdown until its timeout."""
        holder["stopping"] = True

    app.state.stop_streams = stop_streams
    # Innermost first: the token is checked only for requests from an allowed origin to a known host.
    if settings.viewer_token is not None:
        app.add_middleware(TokenAuth, token=settings.viewer_token.get_secret_value(), limiter=limiter)
    app.add_middleware(OriginGuard, allowed_origins=settings.extra_origins())
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.trusted_hosts(), www_redirect=False)
    app.mount("/static/docs", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def client() -> Any:
        # Typed loosely: redis.asyncio's stubs return `Awaitable[T] | T` unions mypy cannot await.
        c = holder.get("client")
        if c is None:
            raise HTTPException(503, "viewer not started")
        return c

    def view_or_404(camera_id: str) -> CameraView:
        view = state.cameras.get(camera_id)
        if view is None:
            raise HTTPException(404, f"no camera {camera_id!r}")
        return view

    def camera_json(view: CameraView, now: float) -> dict[str, Any]:
        info = view.info
        age = view.last_frame_age_s(now)
        shown = view.shown
        inference = view.inference_live(COUNTS_MAX_AGE_S, now)
        counts = view.counts(COUNTS_MAX_AGE_S, now)
        fps = view.frame_rate.rate()
        M.CAMERA_FPS.labels(view.camera_id).set(fps)
        return {
            "id": view.camera_id,
            "name": view.camera_id,
            "source": info.source if info else None,
            "status": view.status(state.redis_ok, settings.no_signal_after_s, now),
            "capture_status": info.status if info else None,
            "fps": round(fps, 2),
            "target_fps": info.fps if info else None,
            "results_fps": round(view.result_rate.rate(), 2),
            "last_frame_age_ms": round(age * 1000, 1) if age is not None else None,
            "faces": counts["faces"],
            "counts": counts,
            "latency_ms": round(shown.latency_ms, 1) if shown else None,
            "inference": inference,
            "latest_seq": view.latest_result.seq if view.latest_result else None,
            "stream_url": f"/cameras/{view.camera_id}/stream.mjpg",
        }

    def cameras_json() -> list[dict[str, Any]]:
        now = time.time()
        return [camera_json(v, now) for _, v in sorted(state.cameras.items())]

    # -- pages -----------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(
            (STATIC_DIR / "index.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"}
        )

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "favicon.ico", media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"}
        )

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url="/static/docs/swagger-ui-bundle.js",
            swagger_css_url="/static/docs/swagger-ui.css",
            swagger_favicon_url="/favicon.ico",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            redoc_js_url="/static/docs/redoc.standalone.js",
            redoc_favicon_url="/favicon.ico",
            with_google_fonts=False,
        )

    @app.get("/login", include_in_schema=False)
    async def login_form(next: str = "/") -> Response:
        if settings.viewer_token is None:
            return RedirectResponse(safe_next(next), status_code=303)  # nothing to log in to
        return HTMLResponse(login_page(next_path=safe_next(next)).decode())

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        body = (await request.body())[:4096]
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        presented = (form.get("token") or [""])[0]
        next_path = safe_next((form.get("next") or ["/"])[0])
        token = settings.viewer_token.get_secret_value() if settings.viewer_token else None
        if token is None:
            return RedirectResponse(next_path, status_code=303)
        who = client_key(request.scope)
        wait = limiter.retry_after(who)
        if wait > 0:  # throttled: not even a right token is looked at (see auth.TokenAuth)
            M.AUTH_THROTTLED.inc()
            message, extra = too_many(wait)
            headers = {k.decode(): v.decode() for k, v in extra}
            return HTMLResponse(
                login_page(message[0].upper() + message[1:] + ".", next_path).decode(), 429, headers
            )
        if not token_ok(token, presented):
            limiter.failed(who)
            return HTMLResponse(login_page("Wrong token.", next_path).decode(), status_code=401)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(
            COOKIE_NAME,
            session_value(token),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            max_age=7 * 24 * 3600,
        )
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE_NAME)
        return response

    # -- streams ---------------------------------------------------------------------------------
    async def mjpeg(camera_id: str, blur: bool, max_frames: int | None) -> AsyncIterator[bytes]:
        interval = 1.0 / settings.stream_fps
        last_key: tuple[Any, ...] | None = None
        last_sent = 0.0
        sent = 0
        M.STREAM_CLIENTS.inc()
        try:
            yield f"--{BOUNDARY}\r\n".encode()
            while not holder.get("stopping"):
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

    @app.get(
        "/cameras/{camera_id}/stream.mjpg",
        tags=["streams"],
        summary="Annotated MJPEG stream of one camera",
        response_class=StreamingResponse,
        responses={200: {"content": {f"multipart/x-mixed-replace; boundary={BOUNDARY}": {}}}},
    )
    async def stream(
        camera_id: CameraId,
        blur: Annotated[
            bool, Query(description="Blur faces (can only add blurring, never remove it)")
        ] = False,
        max_frames: Annotated[int | None, Query(ge=1, le=100_000, description="End after N frames")] = None,
    ) -> StreamingResponse:
        view_or_404(camera_id)
        return StreamingResponse(
            mjpeg(camera_id, blur or settings.blur_faces, max_frames),
            media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.get(
        "/cameras/{camera_id}/snapshot.jpg",
        tags=["streams"],
        summary="The current annotated picture of one camera",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    async def snapshot(
        camera_id: CameraId,
        blur: Annotated[bool, Query(description="Blur faces (can only add blurring)")] = False,
    ) -> Response:
        view = view_or_404(camera_id)
        key, jpeg = await renderer.current(view, blur or settings.blur_faces)
        headers = {"Cache-Control": "no-store", "X-Genderlens-Kind": str(key[0])}
        shown = view.shown
        if key[0] == "shown" and shown is not None and key[1:] == (shown.frame.entry_id, shown.result.seq):
            # What was drawn, so a client can tell where the boxes are without parsing pixels.
            headers["X-Genderlens-Seq"] = str(shown.result.seq)
            headers["X-Genderlens-Faces"] = json.dumps(
                [
                    {"track_id": f.track_id, "box": [round(v, 1) for v in f.box], "label": f.label}
                    for f in shown.faces[:20]
                ]
            )
        return Response(jpeg, media_type="image/jpeg", headers=headers)

    # -- API -------------------------------------------------------------------------------------
    @app.get("/api/cameras", tags=["cameras"], summary="Every camera with its status and live figures")
    async def list_cameras() -> list[dict[str, Any]]:
        return cameras_json()

    @app.post(
        "/api/cameras",
        tags=["cameras"],
        status_code=202,
        response_model=CameraRequestAccepted,
        summary="Ask the supervisor (genderlens up) to start capturing a new source",
    )
    async def add_camera(body: CameraAdd) -> CameraRequestAccepted:
        if not settings.allow_camera_control:
            raise HTTPException(403, "camera control is disabled (GENDERLENS_ALLOW_CAMERA_CONTROL)")
        request = await _camera_add_request(body, settings)
        try:
            if await client().hexists(C.CAMERAS_KEY, request.camera_id):
                raise HTTPException(409, f"camera {request.camera_id!r} already exists")
            entry_id = await client().xadd(
                C.CAMERA_REQUESTS_STREAM, request.to_fields(), maxlen=CAMERA_REQUESTS_MAXLEN, approximate=True
            )
        except DOWN_ERRORS as exc:
            raise HTTPException(503, f"redis unavailable ({type(exc).__name__})") from None
        log.info("requested camera %s from %s", request.camera_id, request.source)
        return CameraRequestAccepted(
            camera_id=request.camera_id,
            action="add",
            request_id=entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id),
            detail="requested; the camera appears once its capture process publishes frames",
        )

    @app.delete(
        "/api/cameras/{camera_id}",
        tags=["cameras"],
        status_code=202,
        response_model=CameraRequestAccepted,
        summary="Remove a camera: stop its capture (via the supervisor) and drop it from the wall",
    )
    async def remove_camera(camera_id: CameraId) -> CameraRequestAccepted:
        if not settings.allow_camera_control:
            raise HTTPException(403, "camera control is disabled (GENDERLENS_ALLOW_CAMERA_CONTROL)")
        try:
            known = await client().hexists(C.CAMERAS_KEY, camera_id)
            if not known and camera_id not in state.cameras:
                raise HTTPException(404, f"no camera {camera_id!r}")
            request = CameraRequest(action="remove", camera_id=camera_id, source="", at=time.time())
            pipe = client().pipeline(transaction=True)
            pipe.xadd(
                C.CAMERA_REQUESTS_STREAM, request.to_fields(), maxlen=CAMERA_REQUESTS_MAXLEN, approximate=True
            )
            pipe.hdel(C.CAMERAS_KEY, camera_id)
            pipe.delete(C.camera_heartbeat_key(camera_id))
            entry_id, *_ = await pipe.execute()
        except DOWN_ERRORS as exc:
            raise HTTPException(503, f"redis unavailable ({type(exc).__name__})") from None
        state.removed_at[camera_id] = request.at
        state.remove_camera(camera_id)
        renderer.forget(camera_id)
        state.subscribers.publish({"type": "cameras", "cameras": cameras_json()})
        log.info("removed camera %s", camera_id)
        return CameraRequestAccepted(
            camera_id=camera_id,
            action="remove",
            request_id=entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id),
            detail="removed from the wall; capture stop requested",
        )

    @app.get(
        "/api/cameras/{camera_id}/latest",
        tags=["results"],
        summary="The newest result of a camera, with tracked and smoothed labels",
    )
    async def latest(camera_id: CameraId) -> dict[str, Any]:
        view = view_or_404(camera_id)
        result = view.latest_result
        if result is None:
            raise HTTPException(404, f"no result yet for {camera_id!r}")
        data = result.to_dict()
        data["received_at"] = view.latest_result_at
        data["age_ms"] = round((time.time() - view.latest_result_at) * 1000, 1)
        data["latency_ms"] = round((view.latest_result_at - result.timestamps.captured) * 1000, 1)
        data["stages_ms"] = {k: round(v, 2) for k, v in result.timestamps.stages_ms().items()}
        data["tracks"] = [f.to_dict() for f in view.latest_faces]
        data["counts"] = view.counts()
        return data

    async def stats_json() -> dict[str, Any]:
        ids = sorted(state.cameras)
        pipe = client().pipeline(transaction=False)
        for camera_id in ids:
            pipe.hgetall(C.stats_key(camera_id))
            pipe.xpending(C.frames_stream(camera_id), C.INFERENCE_GROUP)
        replies: list[Any] = await pipe.execute(raise_on_error=False) if ids else []
        cameras: dict[str, dict[str, Any]] = {}
        for i, camera_id in enumerate(ids):
            counters, pending = replies[2 * i], replies[2 * i + 1]
            # dropped_stale_publish: the part of dropped_stale whose result was ready but too old.
            row: dict[str, Any] = {f: 0 for f in (*C.STAT_FIELDS, *C.STAT_EXTRA_FIELDS)}
            if isinstance(counters, ResponseError):  # this camera's key is broken, not the others'
                row["error"] = str(counters)[:200]
                counters = {}
            elif isinstance(counters, Exception):
                raise counters
            for k, v in (counters or {}).items():
                name = k.decode() if isinstance(k, bytes) else str(k)
                if name in row:
                    with contextlib.suppress(ValueError):
                        row[name] = int(v)
            # NOGROUP (no worker has created the group yet) simply means nothing is pending.
            row["pending"] = int(pending.get("pending", 0)) if isinstance(pending, dict) else 0
            if isinstance(pending, Exception) and not isinstance(pending, ResponseError):
                raise pending
            M.PENDING.labels(camera_id).set(row["pending"])
            cameras[camera_id] = row
        reader: Reader = holder["reader"]
        workers = await reader.read_workers()
        refused = state.refused_events()
        return {
            "cameras": cameras,
            "workers": workers,
            "model": {
                "current": state.model,
                "announced": state.model_event,
                "refused": refused[-1] if refused else None,
            },
            "redis": "ok" if state.redis_ok else "reconnecting",
        }

    @app.get("/api/stats", tags=["stats"], summary="Frame accounting per camera, live workers, model")
    async def stats() -> dict[str, Any]:
        try:
            return await stats_json()
        except DOWN_ERRORS as exc:
            raise HTTPException(503, f"redis unavailable ({type(exc).__name__})") from None

    @app.get("/api/model", tags=["stats"], summary="The model behind the newest results, and refusals")
    async def model() -> dict[str, Any]:
        refused = state.refused_events()
        return {
            "current": state.model,
            # one uncertainty policy: the threshold the newest result's worker applied (the model's own
            # unless overridden), which the smoothed labels use too
            "uncertain_threshold": state.uncertain_threshold,
            "announced": state.model_event,
            "refused": refused[-1] if refused else None,
        }

    @app.get("/api/events", tags=["stats"], summary="Recent operational events (refused models, ...)")
    async def events() -> list[dict[str, Any]]:
        return [{"id": eid, **ev.to_dict()} for eid, ev in state.events]

    # -- WebSocket -------------------------------------------------------------------------------
    def summary_json() -> dict[str, Any]:
        cams = cameras_json()
        totals: dict[str, int] = {"faces": 0, "female": 0, "male": 0, "uncertain": 0, "no_model": 0}
        stages: dict[str, list[float]] = {}
        for view in state.cameras.values():
            for name, count in view.counts(COUNTS_MAX_AGE_S).items():
                totals[name] = totals.get(name, 0) + count
            if view.latest_result is not None:
                for stage, ms in view.latest_result.timestamps.stages_ms().items():
                    stages.setdefault(stage, []).append(ms)
        refused = state.refused_events()
        return {
            "type": "stats",
            "at": time.time(),
            "redis": "ok" if state.redis_ok else "reconnecting",
            "cameras": cams,
            "totals": totals,
            "stages_ms": {k: round(sum(v) / len(v), 1) for k, v in stages.items()},
            "model": state.model,
            "workers": len(state.workers),
            "worker_list": state.workers,
            "refused": refused[-5:],
            "blur": settings.blur_faces,
            "uncertain_threshold": state.uncertain_threshold,  # the model's (from the newest result)
        }

    @app.websocket("/ws")
    async def websocket(ws: WebSocket) -> None:
        """Per-frame results (``type: result``) and once a second the stats (``type: stats``)."""
        await ws.accept()
        queue = state.subscribers.subscribe()
        M.WS_CLIENTS.inc()
        min_gap = 1.0 / settings.stream_fps
        last_sent: dict[str, float] = {}

        async def drain_incoming() -> None:
            # We never expect messages; reading is how a closed socket is noticed.
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return

        async def push() -> None:
            await ws.send_text(json.dumps(summary_json()))
            next_stats = time.monotonic() + 1.0
            while not holder.get("stopping"):
                timeout = max(0.0, next_stats - time.monotonic())
                try:
                    message = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    await ws.send_text(json.dumps(summary_json()))
                    next_stats = time.monotonic() + 1.0
                    continue
                if message.get("type") == "result":
                    # At most stream_fps result messages per camera per client.
                    now = time.monotonic()
                    camera = str(message.get("camera"))
                    if now - last_sent.get(camera, 0.0) < min_gap:
                        continue
                    last_sent[camera] = now
                await ws.send_text(json.dumps(message))

        tasks = [asyncio.create_task(drain_incoming()), asyncio.create_task(push())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(
                    asyncio.CancelledError, WebSocketDisconnect, RuntimeError, Exception
                ):
                    await task
            state.subscribers.unsubscribe(queue)
            M.WS_CLIENTS.dec()

    # -- operations ------------------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"], summary="Liveness: the process serves requests")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Readiness: the reader reaches Redis")
    async def readyz() -> JSONResponse:
        ready = state.redis_ok
        body = {"status": "ready" if ready else "not ready", "redis": "ok" if ready else "reconnecting"}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        for view in state.cameras.values():
            M.CAMERA_FPS.labels(view.camera_id).set(view.frame_rate.rate())
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
