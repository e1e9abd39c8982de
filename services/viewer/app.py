"""The viewer web app: the wall page, annotated MJPEG streams, a WebSocket of per-frame results and
stats, and a small REST API (OpenAPI at ``/docs``).

``create_app(settings)`` puts the shared objects on ``app.state`` (the settings, the in-memory
``ViewerState``, the ``Renderer``, the failed-login limiter; the lifespan adds the one
``redis.asyncio`` client and the reader task, see ``reader.py``), adds the middleware (trusted hosts,
origins, token) and includes the routers of ``routes/``, which reach those objects through the
dependencies of ``deps.py``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from services.viewer.auth import FailureLimiter, OriginGuard, TokenAuth
from services.viewer.deps import REDIS_DOWN, redis_unavailable
from services.viewer.reader import Reader
from services.viewer.renderer import Renderer
from services.viewer.routes import api, ops, pages, streams, ws
from services.viewer.settings import ViewerSettings
from services.viewer.state import ViewerState
from shared.credentials import redact_url

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Live annotated video of every camera, per-frame results and system stats. Labels are *perceived* "
    "gender (or the classes of whichever model the workers serve) from a face classifier, with a "
    "confidence; `uncertain` below the model's threshold. With `GENDERLENS_VIEWER_TOKEN` set, every "
    "page, stream and API call needs it (`Authorization: Bearer …` or the login cookie; `/healthz`, "
    "`/readyz`, the login form and static files stay open): 401 without it, 429 while a client is "
    "throttled after failed attempts. A request for another host name gets 400, a POST/DELETE or "
    "WebSocket handshake from another web origin 403."
)


def package_version() -> str:
    try:
        return importlib.metadata.version("genderlens")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Owns the one Redis client and the reader task for the app's lifetime."""
    settings: ViewerSettings = app.state.settings
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
    reader = Reader(client, app.state.viewer)
    app.state.redis, app.state.reader = client, reader
    task = asyncio.create_task(reader.run(), name="viewer-reader")
    log.info("viewer reading %s", redact_url(url))
    try:
        yield
    finally:
        await reader.stop(task)
        await client.aclose()


def create_app(settings: ViewerSettings) -> FastAPI:
    app = FastAPI(
        title="genderlens viewer",
        version=package_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        # Served by routes/pages.py from local files: the defaults load Swagger UI and ReDoc from a
        # CDN, which an offline viewer (the usual case for a camera network) cannot reach.
        docs_url=None,
        redoc_url=None,
    )
    state = ViewerState(
        frame_buffer=settings.frame_buffer, max_faces=settings.max_faces, max_tracks=settings.max_tracks
    )
    limiter = FailureLimiter(settings.auth_fail_burst, settings.auth_fail_refill_s)
    app.state.settings, app.state.viewer, app.state.limiter = settings, state, limiter
    app.state.renderer = Renderer(settings, state)
    app.state.redis = app.state.reader = None  # set by the lifespan
    app.state.stop_streams = state.stop_streams  # the server calls it on SIGTERM/SIGINT (main.py)
    for error in REDIS_DOWN:
        app.add_exception_handler(error, redis_unavailable)
    # Innermost first: the token is checked only for requests from an allowed origin to a known host.
    if settings.viewer_token is not None:
        app.add_middleware(TokenAuth, token=settings.viewer_token.get_secret_value(), limiter=limiter)
    app.add_middleware(OriginGuard, allowed_origins=settings.extra_origins())
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.trusted_hosts(), www_redirect=False)
    app.mount("/static/docs", StaticFiles(directory=pages.DOCS_ASSETS), name="docs-assets")
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")
    for module in (pages, streams, api, ws, ops):
        app.include_router(module.router)
    return app
