"""Token access control for the whole viewer (pages, streams, API, WebSocket, docs, metrics).

When ``GENDERLENS_VIEWER_TOKEN`` is set, every request must carry either ``Authorization: Bearer
<token>`` (API clients, Prometheus, VLC via a proxy) or the session cookie the login form sets. The
cookie holds an HMAC derived from the token, not the token itself, so a leaked cookie does not reveal
the token, and changing the token invalidates every session. It is HttpOnly and SameSite=Strict (no
cross-site request carries it, which is what keeps POST/DELETE safe from CSRF).

Only ``/healthz``, ``/readyz``, the login form and the static assets (no data in them) stay open.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from http.cookies import SimpleCookie
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE_NAME = "genderlens_session"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/login", "/logout", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
LOGIN_PAGE = Path(__file__).with_name("static") / "login.html"


def session_value(token: str) -> str:
    return hmac.new(token.encode(), b"genderlens-viewer-session-v1", hashlib.sha256).hexdigest()


def token_ok(token: str, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), token.encode())


def login_page(error: str = "", next_path: str = "/") -> bytes:
    html = LOGIN_PAGE.read_text(encoding="utf-8")
    # Both values are ours (fixed message, a path we validated), but escape anyway.
    from html import escape

    return (
        html.replace("{{error}}", escape(error)).replace("{{next}}", escape(next_path, quote=True)).encode()
    )


def safe_next(path: str | None) -> str:
    """Only local absolute paths, so the login form cannot be used as an open redirect."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


class TokenAuth:
    """Pure ASGI middleware, so it covers HTTP and WebSocket scopes alike (and streaming responses
    are never buffered by it)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token
        self.session = session_value(token)

    def authorised(self, scope: Scope) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and token_ok(self.token, auth[7:].strip()):
            return True
        cookie_header = headers.get("cookie")
        if cookie_header:
            cookies: SimpleCookie = SimpleCookie()
            try:
                cookies.load(cookie_header)
            except Exception:  # a malformed Cookie header is simply "not logged in"
                return False
            morsel = cookies.get(COOKIE_NAME)
            if morsel is not None and hmac.compare_digest(morsel.value.encode(), self.session.encode()):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or self.authorised(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            # Closing before accept makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        accept = dict(scope.get("headers", [])).get(b"accept", b"").decode("latin-1")
        if scope.get("method") == "GET" and "text/html" in accept and not path.startswith("/api/"):
            body = login_page(next_path=safe_next(path))
            content_type = b"text/html; charset=utf-8"
        else:
            body = json.dumps({"detail": "authentication required"}).encode()
            content_type = b"application/json"
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="genderlens"'),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
