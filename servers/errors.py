"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and the handlers that emit them.

Every failure a client can cause is a 4xx with a message naming what is wrong; a 500 means a server bug.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A client-visible error with an HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_ABSOLUTE = re.compile(r"(?<![\w.:/])/[^\s'\"/:,;()\[\]]+(?:/[^\s'\"/:,;()\[\]]+)*")


def scrub_paths(message: str, roots: Sequence[Path] = ()) -> str:
    """``message`` without the server's absolute paths: a path inside one of ``roots`` (the presets folder, feature
    indexes) shown relative to it, any other path of this machine by its last part."""
    for root in sorted((str(r) for r in roots), key=len, reverse=True):
        message = message.replace(root + "/", "").replace(root, ".")

    def short(m: re.Match[str]) -> str:
        path = m.group()
        return Path(path).name if Path("/" + path.split("/")[1]).exists() else path

    return _ABSOLUTE.sub(short, message)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def queue_full(max_queue: int) -> ApiError:
    return ApiError(
        429, f"queue full ({max_queue} requests waiting); retry later", type="rate_limit_error", code="queue_full"
    )


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts)


def _roots(request: Request) -> Sequence[Path]:
    roots: Sequence[Path] = getattr(request.app.state, "private_roots", ())
    return roots


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    body = error_body(scrub_paths(exc.message, _roots(request)), exc.type, exc.param, exc.code)
    return JSONResponse(body, status_code=exc.status)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc(tuple(first.get("loc", ())))
    msgs = [f"{_loc(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg', '')}" for e in errors[:5]]
    message = scrub_paths("; ".join(msgs), _roots(request))
    return JSONResponse(error_body(message, "invalid_request_error", param or None), status_code=400)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = scrub_paths(str(exc.detail), _roots(request))
    return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
