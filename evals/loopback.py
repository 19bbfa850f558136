"""A minimal OpenAI-compatible chat-completions server on loopback, for tests and offline demos.

It answers ``POST /v1/chat/completions`` (and ``GET /v1/models``) by calling a Python ``responder`` with the parsed
request body, so a test can serve canned judge verdicts, or wrap a steered in-process model
(:func:`evals.targets.serve_target`) to check that an eval through an endpoint matches the eval in process.
It is not the project's server (``servers/``); it binds 127.0.0.1 only and handles one request at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

logger = logging.getLogger(__name__)

Responder = Callable[[dict[str, Any]], str]
"""Request body in, assistant message content out. Raising ``ValueError`` answers 400 with its message."""


def _handler(responder: Responder, model_name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("loopback: " + format, *args)

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            try:
                content = responder(body)
            except ValueError as e:
                self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
                return
            self._send(200, _completion(content, body.get("model", model_name)))

    return Handler


def _completion(content: str, model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-loopback-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


@contextmanager
def serve(responder: Responder, *, model_name: str = "loopback") -> Iterator[str]:
    """Serve on a free loopback port while the block runs; yields the base URL (``http://127.0.0.1:PORT/v1``)."""
    server = HTTPServer(("127.0.0.1", 0), _handler(responder, model_name))
    thread = threading.Thread(target=server.serve_forever, name="evals-loopback", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
