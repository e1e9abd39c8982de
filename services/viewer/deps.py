"""What routes use, as FastAPI dependencies: the objects ``create_app`` and its lifespan keep on
``app.state`` (settings, the in-memory state, the renderer, the failed-login limiter, the Redis client
and the reader), a checked camera id, and the camera it names.

They take an ``HTTPConnection``, so HTTP routes and the WebSocket use the same ones. A Redis error
in any route becomes one 503 reply (:func:`redis_unavailable`, registered by ``create_app``) instead
of a try/except in each route.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from services.viewer.auth import FailureLimiter
from services.viewer.reader import Reader
from services.viewer.renderer import Renderer
from services.viewer.settings import ViewerSettings
from services.viewer.state import CameraView, ViewerState
from shared import constants as C
from shared.streams import REDIS_DOWN_ERRORS


def get_settings(conn: HTTPConnection) -> ViewerSettings:
    settings: ViewerSettings = conn.app.state.settings
    return settings


def get_state(conn: HTTPConnection) -> ViewerState:
    state: ViewerState = conn.app.state.viewer
    return state


def get_renderer(conn: HTTPConnection) -> Renderer:
    renderer: Renderer = conn.app.state.renderer
    return renderer


def get_limiter(conn: HTTPConnection) -> FailureLimiter:
    limiter: FailureLimiter = conn.app.state.limiter
    return limiter


def get_redis(conn: HTTPConnection) -> Any:
    """The one ``redis.asyncio`` client (the lifespan's). Typed loosely: redis.asyncio's stubs return
    ``Awaitable[T] | T`` unions mypy cannot await."""
    client = getattr(conn.app.state, "redis", None)
    if client is None:
        raise HTTPException(503, "viewer not started")
    return client


def get_reader(conn: HTTPConnection) -> Reader:
    reader: Reader | None = getattr(conn.app.state, "reader", None)
    if reader is None:
        raise HTTPException(503, "viewer not started")
    return reader


SettingsDep = Annotated[ViewerSettings, Depends(get_settings)]
StateDep = Annotated[ViewerState, Depends(get_state)]
RendererDep = Annotated[Renderer, Depends(get_renderer)]
LimiterDep = Annotated[FailureLimiter, Depends(get_limiter)]
RedisDep = Annotated[Any, Depends(get_redis)]
ReaderDep = Annotated[Reader, Depends(get_reader)]


def valid_camera_id(
    camera_id: Annotated[str, PathParam(description="Camera id (a-z, 0-9, '-', '_')", max_length=200)],
) -> str:
    # Checked before the id goes anywhere near a Redis key: no key or path injection.
    if not C.is_valid_camera_id(camera_id):
        raise HTTPException(422, f"invalid camera id (must match {C.CAMERA_ID_RE.pattern})")
    return camera_id


CameraId = Annotated[str, Depends(valid_camera_id)]


def camera_view(camera_id: CameraId, state: StateDep) -> CameraView:
    view = state.cameras.get(camera_id)
    if view is None:
        raise HTTPException(404, f"no camera {camera_id!r}")
    return view


#: The camera a path names (422 for a malformed id, 404 for an unknown one).
ViewDep = Annotated[CameraView, Depends(camera_view)]


async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Redis went away during a request: 503, and the client retries (the reader reconnects)."""
    return JSONResponse({"detail": f"redis unavailable ({type(exc).__name__})"}, status_code=503)


#: The errors :func:`redis_unavailable` answers: those of a Redis that is down or unreachable (not
#: every OSError, which the reader also retries: a route's own OSError is not Redis being down).
REDIS_DOWN: tuple[type[Exception], ...] = tuple(e for e in REDIS_DOWN_ERRORS if issubclass(e, Exception))
