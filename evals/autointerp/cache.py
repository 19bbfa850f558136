"""Chat completions through any OpenAI-compatible endpoint, with a response cache on disk and retries.

Every raw response is appended to ``cache.jsonl`` under a key that hashes (model, messages, sampling params), so a
run that crashes or is stopped re-reads its answers instead of asking again. Failed requests are retried with
exponential backoff; when the retries are spent the call raises :class:`EndpointError` naming the endpoint.
The client follows :class:`evals.judges.LlmJudge`: the ``openai`` package, ``base_url`` ending in ``/v1``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Message = dict[str, str]


class EndpointError(RuntimeError):
    """The endpoint kept failing (or answered with no message)."""


def cache_key(model: str, messages: list[Message], params: dict[str, Any]) -> str:
    """sha256 of the request's content, stable across runs (sorted keys, no whitespace)."""
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """key -> raw response text, kept in memory and appended (one JSON line per entry) to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, str] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s: skipping an unfinished line", path)
                    continue
                self._data[row["key"]] = row["response"]
        self._fh = path.open("a", encoding="utf-8")

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._data.get(key)

    def put(self, key: str, response: str) -> None:
        with self._lock:
            self._data[key] = response
            self._fh.write(json.dumps({"key": key, "response": response}) + "\n")
            self._fh.flush()

    def __len__(self) -> int:
        return len(self._data)

    def close(self) -> None:
        self._fh.close()


@dataclass
class ChatStats:
    requests: int = 0
    """Requests sent to the endpoint (retries included)."""
    cache_hits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class CachedChat:
    """``ask(messages, max_tokens=...)`` -> the assistant's text, from the cache or the endpoint (temperature 0)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        cache: ResponseCache,
        *,
        api_key: str = "not-needed",
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 1.0,
    ) -> None:
        from openai import OpenAI

        self.base_url, self.model, self.cache = base_url, model, cache
        self.retries, self.backoff = retries, backoff
        self.stats = ChatStats()
        # Retries are ours (counted, logged, then a clear error), so the client's own are off.
        self._client: Any = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)

    def ask(self, messages: list[Message], *, max_tokens: int) -> str:
        params = {"temperature": 0.0, "max_tokens": max_tokens}
        key = cache_key(self.model, messages, params)
        hit = self.cache.get(key)
        if hit is not None:
            with self.stats.lock:
                self.stats.cache_hits += 1
            return hit
        text = self._request(messages, params)
        self.cache.put(key, text)
        return text

    def _request(self, messages: list[Message], params: dict[str, Any]) -> str:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            with self.stats.lock:
                self.stats.requests += 1
            try:
                out = self._client.chat.completions.create(model=self.model, messages=messages, **params)
                content = out.choices[0].message.content
                if content is None:
                    raise EndpointError("the response has no message content")
                return str(content)
            except Exception as e:  # openai raises many types (connection, status, timeout); all are retried
                last = e
                if attempt < self.retries:
                    wait = self.backoff * 2**attempt
                    logger.warning(
                        "%s: request failed (%s); retry %d/%d in %.1fs",
                        self.base_url,
                        e,
                        attempt + 1,
                        self.retries,
                        wait,
                    )
                    time.sleep(wait)
        raise EndpointError(
            f"endpoint {self.base_url} (model {self.model!r}) failed {self.retries + 1} times; last error: {last}"
        ) from last
