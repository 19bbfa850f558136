"""The FastAPI app: routes, auth, metrics, error shape, and the engine's lifespan (start, then graceful stop).

``create_app(settings, model, tokenizer)`` takes an already loaded model so tests can serve a tiny one;
``python -m servers`` loads the configured model and calls it.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import nn

from servers import browser, features, routes_openai, routes_steering
from servers.errors import ApiError, install_error_handlers
from servers.guards import BodyLimit, OriginGuard, default_hosts
from servers.keys import OPEN, KeyRule
from servers.metrics import Metrics
from servers.settings import ServerSettings
from servers.state import ServerState, build_state, state_of

log = logging.getLogger(__name__)


def create_app(settings: ServerSettings, model: nn.Module, tokenizer: Any, model_name: str) -> FastAPI:
    """An app serving ``model``; the engine thread starts and stops with the app's lifespan."""
    registry, browser_state = browser.registry_and_indexes(settings)
    state = build_state(settings, model, tokenizer, model_name, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        log.info("serving %s", model_name)
        try:
            yield
        finally:
            await state.engine.shutdown(settings.shutdown_grace_s)
            log.info("engine stopped")

    app = FastAPI(title="steerlib server", version="0.1.0", lifespan=lifespan)
    app.state.steerlib = state
    app.state.private_roots = _private_roots(settings, registry.root, registry.index_saes.values())
    install_error_handlers(app)
    auth = [Depends(_require_key)]
    for router in (routes_openai.router, routes_steering.router, features.router):
        app.include_router(router, dependencies=auth)
    browser.install(app, browser_state, auth)
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/metrics", _metrics, methods=["GET"])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    hosts = default_hosts(settings.host, settings.allowed_hosts)
    app.add_middleware(OriginGuard, hosts=hosts, origins=settings.allowed_origins, strict=bool(settings.allowed_hosts))
    app.add_middleware(_CountRequests, metrics=state.metrics)
    return app


def _private_roots(settings: ServerSettings, presets: Path | None, saes: Iterable[Path]) -> list[Path]:
    """Folders whose paths client-facing errors show relative (or not at all)."""
    roots = [presets, *saes, *(p.resolve() for p in settings.features)]
    if settings.model is not None and Path(settings.model).exists():
        roots.append(Path(settings.model).resolve())
    return [r for r in roots if r is not None]


async def _require_key(request: Request) -> None:
    """The caller's key rule (:mod:`servers.keys`) in ``request.state.key_rule``; 401 for a missing or wrong key."""
    st = state_of(request)
    key, policy = st.settings.api_key, st.keys
    rule: KeyRule | None = OPEN
    if key is not None or policy is not None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        rule = None
        if scheme.lower() == "bearer" and token:
            if key is not None and secrets.compare_digest(token.encode(), key.encode()):
                rule = OPEN
            elif policy is not None:
                rule = policy.find(token)
        if rule is None:
            raise ApiError(
                401,
                "invalid or missing API key (Authorization: Bearer <key>)",
                type="authentication_error",
                code="invalid_api_key",
            )
    request.state.key_rule = rule


async def _health(request: Request) -> JSONResponse:
    """200 while the engine thread runs and takes work; 503 (with its state) otherwise."""
    st: ServerState = state_of(request)
    status = st.engine.status
    body = {"status": status, "model": st.model_name, "queue_depth": st.engine.queue_depth}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


async def _metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


class _CountRequests:
    """Pure ASGI middleware (unlike ``@app.middleware("http")`` it leaves streaming and disconnects alone):
    requests by route and status, and latency to the start of the response."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                endpoint = getattr(scope.get("route"), "path", "other")
                self.metrics.requests.labels(endpoint=endpoint, status=str(message["status"])).inc()
                self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, send_counted)
