"""ASGI guards in front of every route: the body-size cap, and the Origin/Host check against browser attacks.

**Body size.** A body larger than ``max_body_bytes`` is refused with 413 before any of it is parsed (a declared
``Content-Length`` is refused before it is read; a chunked body is counted as it arrives).

**Origin and Host.** A web page the user visits can make their browser send requests to a server on their machine
(CSRF), or rebind its own host name to 127.0.0.1 (DNS rebinding) so the browser treats the server as the page's own
origin. Browsers say where a request comes from (``Origin``, ``Sec-Fetch-Site``) and which host it was sent to
(``Host``); other clients (SDKs, curl) send neither header and are not browsers to defend against. So a request from
a browser must name an allowed host (by default the loopback names when the server binds a loopback address), and a
request carrying an ``Origin`` must come from the server's own origin or one of ``allowed_origins``; a cross-site
top-level navigation (clicking a link to ``/browser``) is still allowed, as it reads nothing. The server sends no
CORS headers, so cross-origin scripts cannot read answers either; JSON bodies need ``Content-Type:
application/json`` (FastAPI >= 0.132), so a form cannot post one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servers.errors import error_body

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


async def _refuse(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a request body over ``max_bytes``, decided before the route parses anything."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(send)
            return
        chunks: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(message)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(chunks, receive), send)

    async def _too_large(self, send: Send) -> None:
        message = f"request body larger than {self.max_bytes} bytes (max_body_bytes)"
        await _refuse(send, 413, message, "body_too_large")


def _replay(chunks: list[Message], receive: Receive) -> Receive:
    """The body already read, then the client's own messages (disconnects)."""
    pending = list(chunks)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


class OriginGuard:
    """403 for browser requests to a host not served here, or from another origin."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str] | None, origins: Iterable[str], strict: bool) -> None:
        """``hosts`` None: any host; ``strict``: check the Host of every request, not only browsers'."""
        self.app, self.strict = app, strict
        self.hosts = None if hosts is None else frozenset(h.lower().strip("[]") for h in hosts)
        self.origins = frozenset(o.rstrip("/").lower() for o in origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self.problem(scope)
        if problem is not None:
            await _refuse(send, 403, problem, "forbidden_origin")
            return
        await self.app(scope, receive, send)

    def problem(self, scope: Scope) -> str | None:
        """Why this request is refused, or None."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        origin, site = headers.get("origin"), headers.get("sec-fetch-site")
        host = headers.get("host", "")
        if (self.strict or origin is not None or site is not None) and not self._host_ok(host):
            allowed = ", ".join(sorted(self.hosts or ())) or "none"
            return f"host {host!r} is not served here (allowed: {allowed}; set allowed_hosts)"
        if origin is not None:
            if origin.rstrip("/").lower() in self.origins:
                return None
            if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
                return f"cross-origin request from {origin!r} refused (set allowed_origins to permit it)"
        elif site == "cross-site" and not _navigation(scope, headers):
            return "cross-site request refused (set allowed_origins to permit the page's origin)"
        return None

    def _host_ok(self, host: str) -> bool:
        if self.hosts is None:
            return True
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.lower().strip("[]") in self.hosts


def _navigation(scope: Scope, headers: dict[str, str]) -> bool:
    return scope["method"] == "GET" and headers.get("sec-fetch-mode") == "navigate"


def default_hosts(bind: str, configured: list[str]) -> frozenset[str] | None:
    """The hosts browsers may address: ``configured``, or the loopback names when the server binds a loopback
    address, or any (None) when it binds a public one (list them in ``allowed_hosts`` to check them)."""
    if configured:
        return frozenset(configured)
    if bind.strip("[]") in LOOPBACK or bind.startswith("127."):
        return LOOPBACK | {bind.strip("[]")}
    return None
