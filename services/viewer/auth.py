"""Access control for the whole viewer (pages, streams, API, WebSocket, docs, metrics).

Three layers, all pure ASGI middleware (so they cover HTTP and WebSocket scopes alike, and never
buffer a streaming response), outermost first:

1. **Host** (Starlette's ``TrustedHostMiddleware``, set up in ``app.py``): a request for a host name
   the viewer is not known by gets 400. A web page whose own name was re-pointed at 127.0.0.1 (DNS
   rebinding) therefore reads nothing.
2. **Origin** (:class:`OriginGuard`): a browser says which page opened a WebSocket or sent a form; only
   the viewer's own origin and the configured ``allowed_origins`` may open ``/ws`` or send a
   POST/PUT/PATCH/DELETE. Any other web page the local user visits is refused (403), so it cannot read
   camera ids, sources, counts and boxes over the WebSocket.
3. **Token** (:class:`TokenAuth`, when ``GENDERLENS_VIEWER_TOKEN`` is set): every request must carry
   either ``Authorization: Bearer <token>`` (API clients, Prometheus, VLC via a proxy) or the session
   cookie the login form sets. The cookie holds an HMAC derived from the token, not the token itself,
   so a leaked cookie does not reveal the token, and changing the token invalidates every session. It
   is HttpOnly and SameSite=Strict. Failed attempts are limited per client address
   (:class:`FailureLimiter`): after ``auth_fail_burst`` failures a client gets one more attempt per
   ``auth_fail_refill_s`` seconds, and 429 with ``Retry-After`` meanwhile, whatever it presents.

Only ``/healthz``, ``/readyz``, the login form, ``/favicon.ico`` and the static assets (no data in
them) stay open.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable
from html import escape
from http.cookies import SimpleCookie
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from services.viewer import metrics as M

log = logging.getLogger(__name__)

COOKIE_NAME = "genderlens_session"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/login", "/logout", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
LOGIN_PAGE = Path(__file__).with_name("static") / "login.html"
#: Methods that change something: a cross-site page must not be able to send them.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def session_value(token: str) -> str:
    return hmac.new(token.encode(), b"genderlens-viewer-session-v1", hashlib.sha256).hexdigest()


def token_ok(token: str, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), token.encode())


def login_page(error: str = "", next_path: str = "/") -> bytes:
    html = LOGIN_PAGE.read_text(encoding="utf-8")
    # Both values are ours (fixed message, a path we validated), but escape anyway.
    return (
        html.replace("{{error}}", escape(error)).replace("{{next}}", escape(next_path, quote=True)).encode()
    )


def safe_next(path: str | None) -> str:
    """Only local absolute paths, so the login form cannot be used as an open redirect."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes, extra: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# -- guessing ------------------------------------------------------------------------------------------
def client_key(scope: Scope) -> str:
    """Who is guessing: the peer address (an IPv6 client by its /64, which one host usually holds
    whole). Forwarded-for headers are not trusted: uvicorn runs without proxy headers, so a client
    cannot pose as many."""
    client = scope.get("client")
    host = str(client[0]) if client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6 and not address.is_loopback:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class FailureLimiter:
    """A token bucket of failed authentication attempts per client: ``burst`` failures at once, then
    one per ``refill_s`` seconds. Memory is bounded: at most ``max_clients`` buckets, the least recently
    used go first (a full bucket is no different from none)."""

    def __init__(
        self,
        burst: int,
        refill_s: float,
        *,
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.refill_s = refill_s
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) / self.refill_s)

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again (0: now)."""
        tokens = self._tokens(key, self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) * self.refill_s

    def failed(self, key: str) -> None:
        now = self._clock()
        self._buckets[key] = (max(0.0, self._tokens(key, now) - 1.0), now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        M.AUTH_FAILURES.inc()


def too_many(retry_after: float) -> tuple[str, list[tuple[bytes, bytes]]]:
    seconds = max(1, math.ceil(retry_after))
    return (
        f"too many failed attempts; try again in {seconds} s",
        [(b"retry-after", str(seconds).encode())],
    )


# -- origin --------------------------------------------------------------------------------------------
def _netloc(scheme: str, netloc: str) -> str:
    """host[:port] in lower case, without the scheme's default port."""
    netloc = netloc.lower()
    for default_scheme, port in (("http", ":80"), ("ws", ":80"), ("https", ":443"), ("wss", ":443")):
        if scheme == default_scheme and netloc.endswith(port):
            return netloc[: -len(port)]
    return netloc


class OriginGuard:
    """Refuses WebSocket handshakes and state-changing requests sent by another web site.

    Browsers always send ``Origin`` with a WebSocket handshake and with cross-site POSTs; a request
    without one comes from a program (curl, an API client), which no web page can make the user's
    browser send. Same origin = the origin's host:port is the request's own ``Host``."""

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}

    def allowed_origin(self, scope: Scope) -> bool:
        headers = _headers(scope)
        origin = headers.get("origin")
        if origin is None:
            return True
        origin = origin.strip().rstrip("/").lower()
        if origin in self.allowed:
            return True
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (sandboxed frames, files) and anything odd
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        host = headers.get("host", "")
        return _netloc(parts.scheme, parts.netloc) == _netloc(scheme, host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        guarded = kind == "websocket" or (kind == "http" and scope.get("method") in UNSAFE_METHODS)
        if not guarded or self.allowed_origin(scope):
            await self.app(scope, receive, send)
            return
        M.REFUSED.labels("origin").inc()
        log.warning(
            "refused a %s from origin %r (not this viewer's; add it to GENDERLENS_ALLOWED_ORIGINS "
            "if it should be allowed)",
            "WebSocket" if kind == "websocket" else scope.get("method"),
            _headers(scope).get("origin", "")[:100],
        )
        if kind == "websocket":
            # Closing before accept makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": "cross-origin request refused"}).encode()
        await _respond(send, 403, body, b"application/json")


# -- token ---------------------------------------------------------------------------------------------
class TokenAuth:
    """Requires the token (bearer or session cookie) everywhere but the open paths, and throttles
    clients that keep presenting wrong ones."""

    def __init__(self, app: ASGIApp, token: str, limiter: FailureLimiter) -> None:
        self.app = app
        self.token = token
        self.session = session_value(token)
        self.limiter = limiter

    def check(self, scope: Scope) -> bool | None:
        """True: valid credentials; False: wrong ones presented; None: none presented."""
        headers = _headers(scope)
        presented = False
        auth = headers.get("authorization", "")
        if auth:
            presented = True
            if auth[:7].lower() == "bearer " and token_ok(self.token, auth[7:].strip()):
                return True
        cookie_header = headers.get("cookie")
        if cookie_header:
            cookies: SimpleCookie = SimpleCookie()
            try:
                cookies.load(cookie_header)
            except Exception:  # a malformed Cookie header is simply "not logged in"
                return False if presented else None
            morsel = cookies.get(COOKIE_NAME)
            if morsel is not None:
                presented = True
                if hmac.compare_digest(morsel.value.encode(), self.session.encode()):
                    return True
        return False if presented else None

    def authorised(self, scope: Scope) -> bool:
        return self.check(scope) is True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        key = client_key(scope)
        verdict = self.check(scope)
        if verdict is not None:
            # Credentials presented: a throttled client is refused whatever it presents, so that
            # guessing on is pointless (a right guess would not even be told apart).
            wait = self.limiter.retry_after(key)
            if wait > 0:
                await self._throttled(scope, send, wait)
                return
            if verdict:
                await self.app(scope, receive, send)
                return
            self.limiter.failed(key)
        await self._refuse(scope, send, wrong=verdict is False)

    async def _throttled(self, scope: Scope, send: Send, wait: float) -> None:
        M.AUTH_THROTTLED.inc()
        message, extra = too_many(wait)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": message}).encode()
        await _respond(send, 429, body, b"application/json", extra)

    async def _refuse(self, scope: Scope, send: Send, wrong: bool) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        path: str = scope.get("path", "")
        accept = _headers(scope).get("accept", "")
        if scope.get("method") == "GET" and "text/html" in accept and not path.startswith("/api/"):
            body = login_page(next_path=safe_next(path))
            content_type = b"text/html; charset=utf-8"
        else:
            body = json.dumps({"detail": "authentication required"}).encode()
            content_type = b"application/json"
        extra = [(b"www-authenticate", b'Bearer realm="genderlens"')]
        if wrong:
            # E.g. a session from an older token: drop it, so the browser stops presenting it (and
            # spending its owner's failed attempts) until they log in again.
            extra.append(
                (b"set-cookie", f"{COOKIE_NAME}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict".encode())
            )
        await _respond(send, 401, body, content_type, extra)
