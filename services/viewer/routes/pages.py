"""Pages for people: the wall (``/``), the login form, and the API documentation served from local
files (Swagger UI and ReDoc from the ``fastapi-offline`` package, so ``/docs`` works offline). None of
these is part of the API, so none is in the OpenAPI document."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from services.viewer import metrics as M
from services.viewer.auth import (
    COOKIE_NAME,
    client_key,
    login_page,
    safe_next,
    session_value,
    token_ok,
    too_many,
)
from services.viewer.deps import LimiterDep, SettingsDep

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
#: Swagger UI and ReDoc files, served by the viewer itself so /docs works offline (no CDN). They come
#: from the fastapi-offline package (MIT; Swagger UI Apache-2.0, ReDoc MIT).
DOCS_ASSETS = Path(fastapi_offline.__file__).with_name("static")
#: How long a login lasts (the session cookie's max-age).
SESSION_S = 7 * 24 * 3600

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def index() -> HTMLResponse:
    return HTMLResponse(
        (STATIC_DIR / "index.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"}
    )


@router.get("/favicon.ico")
async def favicon() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "favicon.ico", media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"}
    )


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url or "/openapi.json",
        title=f"{request.app.title} - API",
        swagger_js_url="/static/docs/swagger-ui-bundle.js",
        swagger_css_url="/static/docs/swagger-ui.css",
        swagger_favicon_url="/favicon.ico",
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=request.app.openapi_url or "/openapi.json",
        title=f"{request.app.title} - API",
        redoc_js_url="/static/docs/redoc.standalone.js",
        redoc_favicon_url="/favicon.ico",
        with_google_fonts=False,
    )


@router.get("/login")
async def login_form(settings: SettingsDep, next: str = "/") -> Response:
    if settings.viewer_token is None:
        return RedirectResponse(safe_next(next), status_code=303)  # nothing to log in to
    return HTMLResponse(login_page(next_path=safe_next(next)).decode())


@router.post("/login")
async def login(request: Request, settings: SettingsDep, limiter: LimiterDep) -> Response:
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
        max_age=SESSION_S,
    )
    return response


@router.post("/logout")
async def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE_NAME)
    return response
