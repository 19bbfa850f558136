"""The batching engine: one worker thread owns the model; requests wait in a bounded queue and run in batches.

Dynamic batching: when the worker is free it takes the waiting requests (up to ``max_batch`` and ``max_batch_cost``,
after waiting ``batch_wait_ms`` for more to arrive) and decodes them together (``servers.decode``). Requests that
arrive while a batch runs wait for the next one: steerlib binds per-row steering to a batch's rows for the batch's
lifetime, so rows cannot join a running batch. Other work on the model (feature inspection, alignment: a
:class:`~servers.jobs.Job`) waits in the same queue, counts against ``max_queue`` and runs on the same thread between
batches, so no two forwards, and no two sets of steering hooks, ever overlap. A batch that fails is re-run in
halves until the request that broke it is alone (``servers.recovery``): one bad request never fails another.

The queue is a deque under a ``threading.Condition`` rather than an ``asyncio.Queue`` because its consumer is a
thread; results go back to each request's event loop (``servers.jobs``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from servers.decode import run_batch
from servers.errors import ApiError, queue_full, shutting_down
from servers.jobs import Failed, GenRequest, Job, JobCancelled
from servers.metrics import Metrics
from servers.recovery import isolate
from servers.resources import ServerResources
from steerlib.hf.layout import get_layout
from steerlib.plan import TokenizerLike, spec_of

log = logging.getLogger(__name__)

EngineStatus = Literal["ok", "not started", "shutting down", "stopped", "dead"]


@dataclass(frozen=True)
class EngineLimits:
    max_batch: int = 16
    max_queue: int = 64
    batch_wait_s: float = 0.005
    max_batch_cost: int = 4096
    """Most steering cost (``servers.limits.cost``) one batch holds; a request beyond it waits for the next."""


class Engine:
    """Owns the model on one worker thread; ``submit`` generation, ``submit_job`` anything else."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: TokenizerLike,
        eos_ids: frozenset[int],
        pad_id: int,
        limits: EngineLimits,
        metrics: Metrics,
        resources: ServerResources | None = None,
    ) -> None:
        self.model, self.tokenizer, self.eos_ids, self.pad_id = model, tokenizer, eos_ids, pad_id
        self.limits, self.metrics = limits, metrics
        layout = get_layout(model)
        # Vectors and SAEs loaded once for the engine's life, shared with validation (thread-safe).
        self.resources = resources or ServerResources(spec_of(model, layout.n_layers, layout.d_model))
        self._waiting: deque[GenRequest | Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._running: list[GenRequest] = []
        self._job: Job | None = None
        self._thread = threading.Thread(target=self._work, name="steerlib-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def status(self) -> EngineStatus:
        """ok while the worker thread runs and takes work; "dead" if it stopped without being told to."""
        if self._thread.ident is None:
            return "not started"
        if self._thread.is_alive():
            return "shutting down" if self._closed else "ok"
        return "stopped" if self._closed else "dead"

    # -- client side -----------------------------------------------------------------------------------------

    def submit(self, item: GenRequest | Job) -> None:
        """Queue a request or a job; ApiError 429 when the queue is full, 503 when shutting down."""
        with self._cv:
            if self._closed or self.status == "dead":
                raise shutting_down()
            if len(self._waiting) >= self.limits.max_queue:
                self.metrics.rejected.labels(reason="queue_full").inc()
                raise queue_full(self.limits.max_queue)
            self._waiting.append(item)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cv.notify()

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
            if self._job is not None:
                self._job.cancelled.set()
            while self._waiting:
                self._fail(self._waiting.popleft(), "the server shut down before this request ran")

    # -- worker side -----------------------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                item = self._next()
                if item is None:
                    return
                if isinstance(item, Job):
                    self._run_job(item)
                else:
                    self._run_batch(item)
        except BaseException:
            log.critical("the engine thread died; /health reports it and new requests get 503", exc_info=True)
            with self._cv:
                for req in self._running:
                    req.emit(Failed(503, "the engine stopped while running this request"))
                if self._job is not None and self._job.future.running():
                    self._job.future.set_exception(ApiError(503, "the engine stopped", type="server_error"))
            self._cancel_all()  # then the thread ends: status "dead" (logged above, not re-raised)

    def _next(self) -> list[GenRequest] | Job | None:
        """A batch of requests, one job, or None when closed and drained."""
        with self._cv:
            while not self._waiting:
                if self._closed:
                    return None
                self._cv.wait()
            head = self._waiting[0]
            if isinstance(head, Job):
                self._waiting.popleft()
                self.metrics.queue_depth.set(len(self._waiting))
                self._job = head
                return head
            self._gather_more()
            batch = self._take_batch()
            self.metrics.queue_depth.set(len(self._waiting))
            self._running = batch
            return batch

    def _take_batch(self) -> list[GenRequest]:
        """Requests from the head of the queue, in order, while the batch has room and budget. Lock held."""
        batch: list[GenRequest] = []
        cost = 0
        while self._waiting and isinstance(self._waiting[0], GenRequest) and len(batch) < self.limits.max_batch:
            head = self._waiting[0]
            assert isinstance(head, GenRequest)
            if batch and cost + head.cost > self.limits.max_batch_cost:
                break
            self._waiting.popleft()
            if not head.cancelled.is_set():
                batch.append(head)
                cost += head.cost
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
            log.exception("batch of %d failed; re-running it in halves to find the request that broke it", len(batch))
            culprits = isolate(batch, self._decode)
            self.metrics.rejected.labels(reason="failed_alone").inc(len(culprits))
        self._running = []  # not on BaseException: the dying thread still answers these (see _work)
        log.debug("batch of %d done in %.2f s", len(batch), time.perf_counter() - start)

    def _decode(self, batch: list[GenRequest]) -> None:
        steps = run_batch(self.model, self.tokenizer, batch, self.eos_ids, self.pad_id, self.resources)
        self.metrics.decode_steps.inc(steps)

    def _run_job(self, job: Job) -> None:
        try:
            if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
                return
            try:
                with _stops_on(self.model, job.cancelled):
                    job.future.set_result(job.fn())
            except Exception as e:
                job.future.set_exception(e)
        finally:
            self._job = None

    @staticmethod
    def _fail(item: GenRequest | Job, message: str) -> None:
        if isinstance(item, GenRequest):
            item.emit(Failed(503, message))
        elif item.future.set_running_or_notify_cancel():
            item.future.set_exception(ApiError(503, message, type="server_error", code="shutting_down"))


@contextmanager
def _stops_on(model: nn.Module, cancelled: threading.Event) -> Iterator[None]:
    """Every forward of ``model`` inside the block first checks ``cancelled``: a job whose client left (or whose time
    ran out) stops at its next token instead of running to the end."""

    def check(module: nn.Module, args: Any) -> None:
        if cancelled.is_set():
            raise JobCancelled("the job was cancelled (client gone, timed out or shutting down)")

    handle = model.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()
