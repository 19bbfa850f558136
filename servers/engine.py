"""The batching engine: one worker thread owns the model; requests wait in a bounded queue and run in batches.

Dynamic batching: when the worker is free it takes every waiting request (up to ``max_batch``, after waiting
``batch_wait_ms`` for more to arrive) and decodes them together (``servers.decode``). Requests that arrive while a
batch runs wait for the next one: steerlib binds per-row steering to a batch's rows for the batch's lifetime, so rows
cannot join a running batch. Other work on the model (feature inspection) runs on the same thread between batches,
so no two forwards, and no two sets of steering hooks, ever overlap.

The queue is a deque under a ``threading.Condition`` rather than an ``asyncio.Queue`` because its consumer is a
thread; results go back to each request's event loop (``servers.jobs``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from servers.decode import run_batch
from servers.errors import ApiError
from servers.jobs import Failed, GenRequest
from servers.metrics import Metrics
from steerlib.hf.layout import get_layout
from steerlib.plan import Resources, TokenizerLike, spec_of

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineLimits:
    max_batch: int = 16
    max_queue: int = 64
    batch_wait_s: float = 0.005


class Engine:
    """Owns the model on one worker thread; ``submit`` generation, ``run_exclusive`` anything else."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: TokenizerLike,
        eos_ids: frozenset[int],
        pad_id: int,
        limits: EngineLimits,
        metrics: Metrics,
    ) -> None:
        self.model, self.tokenizer, self.eos_ids, self.pad_id = model, tokenizer, eos_ids, pad_id
        self.limits, self.metrics = limits, metrics
        layout = get_layout(model)
        # Vectors and SAEs loaded once for the engine's life; only the worker thread touches it.
        self.resources = Resources(spec_of(model, layout.n_layers, layout.d_model))
        self._waiting: deque[GenRequest | tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._running: list[GenRequest] = []
        self._thread = threading.Thread(target=self._work, name="steerlib-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    # -- client side -----------------------------------------------------------------------------------------

    def submit(self, req: GenRequest) -> None:
        """Queue a request; ApiError 429 when the queue is full, 503 when shutting down."""
        with self._cv:
            if self._closed:
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._waiting) >= self.limits.max_queue:
                self.metrics.rejected.labels(reason="queue_full").inc()
                raise ApiError(
                    429,
                    f"queue full ({self.limits.max_queue} requests waiting); retry later",
                    type="rate_limit_error",
                    code="queue_full",
                )
            self._waiting.append(req)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cv.notify()

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread between batches and await its result."""
        fut: Future[T] = Future()
        with self._cv:
            if self._closed:
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            self._waiting.append((fn, fut))
            self._cv.notify()
        return await asyncio.wrap_future(fut)

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new work, let queued and running requests finish for ``grace_s``, then cancel the rest."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread.ident is None:  # never started
            self._cancel_all()
            return
        deadline = time.monotonic() + grace_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._thread.is_alive():
            log.warning(
                "shutdown: cancelling %d running and %d queued requests", len(self._running), len(self._waiting)
            )
            self._cancel_all()
        await asyncio.to_thread(self._thread.join, 30.0)

    def _cancel_all(self) -> None:
        with self._cv:
            for req in list(self._running):
                req.cancelled.set()
            while self._waiting:
                self._fail(self._waiting.popleft(), "the server shut down before this request ran")

    # -- worker side -----------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            if isinstance(item, list):
                self._run_batch(item)
            else:
                fn, fut = item
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:
                        fut.set_exception(e)

    def _next(self) -> list[GenRequest] | tuple[Callable[[], Any], Future[Any]] | None:
        """A batch of requests, one exclusive job, or None when closed and drained."""
        with self._cv:
            while not self._waiting:
                if self._closed:
                    return None
                self._cv.wait()
            head = self._waiting[0]
            if isinstance(head, tuple):
                self._waiting.popleft()
                return head
            self._gather_more()
            batch: list[GenRequest] = []
            while self._waiting and isinstance(self._waiting[0], GenRequest) and len(batch) < self.limits.max_batch:
                req = self._waiting.popleft()
                assert isinstance(req, GenRequest)
                if not req.cancelled.is_set():
                    batch.append(req)
            self.metrics.queue_depth.set(len(self._waiting))
            self._running = batch
            return batch

    def _gather_more(self) -> None:
        """Hold the batch open for ``batch_wait_s`` (or until it is full): requests that arrive together, or whose
        clients resubmit right after the previous batch, then share one batch. Call with the lock held."""
        deadline = time.monotonic() + self.limits.batch_wait_s
        while len(self._waiting) < self.limits.max_batch and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cv.wait(remaining)  # a new arrival wakes us early; keep waiting until the deadline

    def _run_batch(self, batch: list[GenRequest]) -> None:
        if not batch:
            return
        self.metrics.batch_size.observe(len(batch))
        start = time.perf_counter()
        try:
            self._decode(batch)
        except Exception:
            log.exception("batch of %d failed; retrying its untouched requests one by one", len(batch))
            self._retry_alone(batch)
        finally:
            self._running = []
            log.debug("batch of %d done in %.2f s", len(batch), time.perf_counter() - start)

    def _decode(self, batch: list[GenRequest]) -> None:
        steps = run_batch(self.model, self.tokenizer, batch, self.eos_ids, self.pad_id, self.resources)
        self.metrics.decode_steps.inc(steps)

    def _retry_alone(self, batch: list[GenRequest]) -> None:
        """One failing request must not take its batch neighbours down: rerun alone those that had not streamed
        anything yet; a request that fails alone (or had already streamed) gets a 500."""
        for req in batch:
            if req.n_events > 0 or len(batch) == 1:
                req.emit(Failed(500, "generation failed (server error)"))
                continue
            try:
                self._decode([req])
            except Exception:
                log.exception("request failed when run alone")
                req.emit(Failed(500, "generation failed (server error)"))

    @staticmethod
    def _fail(item: GenRequest | tuple[Callable[[], Any], Future[Any]], message: str) -> None:
        if isinstance(item, GenRequest):
            item.emit(Failed(503, message))
        else:
            item[1].set_exception(ApiError(503, message, type="server_error", code="shutting_down"))
