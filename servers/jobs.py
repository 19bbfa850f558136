"""What passes between the HTTP side (asyncio) and the engine's worker thread: requests and their events.

The worker thread never touches asyncio objects directly: it hands each event to the request's event loop with
``call_soon_threadsafe``, and reads cancellation from a ``threading.Event`` (set on client disconnect, timeout
or shutdown).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from servers.logprobs import TokenLogprob
from servers.sampling import SamplingParams
from steerlib.config import SteeringConfig


@dataclass(frozen=True)
class Finished:
    """The last event of a request."""

    text: str
    finish_reason: str
    """stop | length | cancelled | error"""
    prompt_tokens: int
    completion_tokens: int
    refused_by: str | None = None
    """Name of the steering ``refuse`` detector that answered instead of the model, if one fired."""
    error: str | None = None
    """With ``finish_reason == "error"``: what went wrong with this row (its neighbours finished normally)."""
    audit: list[dict[str, Any]] | None = None
    """With ``GenRequest.audit``: per intervention, what it touched and how its gates decided (``servers.audit``)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """With ``params.logprobs``: one entry per generated token (an end-of-sequence token included)."""
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    """With ``params.echo_logprobs``: one entry per prompt token (the first one's log-probability is None)."""
    activations: Mapping[str, tuple[Tensor, Tensor]] | None = None
    """With ``GenRequest.capture``: per site, the positions and activations of every token the model read
    (``servers.activations.Captured``)."""


@dataclass(frozen=True)
class Failed:
    """The request could not be run (the engine shut down, or a server error)."""

    status: int
    message: str


Event = str | TokenLogprob | Finished | Failed
"""Text deltas (each generated token's log-probability before its text, with ``params.logprobs``), then one Finished
or Failed."""


@dataclass
class GenRequest:
    """One generation request as the engine sees it.

    A request can be run again from the start after its batch failed (:mod:`servers.recovery`): its sampling seed is
    fixed when it is made, so a re-run draws the same tokens, and the text already sent is not sent twice (a re-run
    that would say something else fails instead)."""

    prompt_ids: list[int]
    steering: SteeringConfig | None
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    cost: int = 0
    """What a batch pays per step for its steering (:func:`servers.limits.cost`)."""
    sources: tuple[str, ...] = ()
    """Per intervention of ``steering``: ``preset:NAME`` or ``inline``."""
    audit: bool = False
    """Build the audit record of this row when it finishes (``Finished.audit``)."""
    capture: tuple[tuple[int, str], ...] = ()
    """``(layer, site)`` pairs to record this row's activations at (``Finished.activations``)."""
    stream: bool = True
    """Its client reads the text as it comes; False: only the final event matters (an engine may skip the deltas)."""
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)
    n_events: int = 0
    """Events emitted so far."""
    finished: bool = False
    """Its final event (Finished or Failed) was emitted; nothing is emitted after it."""
    sent: str = ""
    """Text sent so far."""
    logprobs_sent: int = 0
    """Token log-probabilities sent so far."""
    _rerun: str | None = None
    """During a re-run: the text the re-run has produced so far (until it passes ``sent``)."""
    _run_logprobs: int = 0
    """Token log-probabilities this run (the first or a re-run) has produced: a re-run's first ``logprobs_sent``
    were sent already."""

    def __post_init__(self) -> None:
        if self.params.seed is None and self.params.temperature > 0:
            self.params = replace(self.params, seed=random.getrandbits(63))

    def rerun(self) -> None:
        """The request runs again from the start: deltas up to the text already sent are swallowed."""
        self._rerun = ""
        self._run_logprobs = 0

    def emit(self, event: Event) -> None:
        """Called from the worker thread."""
        if self.finished:
            return
        if isinstance(event, TokenLogprob):
            self._run_logprobs += 1
            if self._run_logprobs <= self.logprobs_sent:
                return
            self.logprobs_sent += 1
        elif isinstance(event, str):
            event = self._unsent(event)
            if not event:
                return
            self.sent += event
        else:
            if isinstance(event, Finished) and self._rerun is not None and event.text != self.sent:
                self.cancelled.set()
                event = Failed(500, "generation failed (server error): its batch failed and a re-run diverged")
            self.finished = True
        self._put(event)

    def _unsent(self, delta: str) -> str:
        if self._rerun is None:
            return delta
        self._rerun += delta
        done, now = self.sent, self._rerun
        if not (done.startswith(now) or now.startswith(done)):
            self.cancelled.set()
            self.emit(Failed(500, "generation failed (server error): its batch failed and a re-run diverged"))
            return ""
        if len(now) <= len(done):
            return ""
        self._rerun = None
        return now[len(done) :]

    def _put(self, event: Event) -> None:
        self.n_events += 1
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        """Deltas then the final event; cancels the request if the consumer stops early."""
        try:
            while True:
                event = await self.queue.get()
                yield event
                if isinstance(event, Finished | Failed):
                    return
        finally:
            self.cancelled.set()


class JobCancelled(Exception):
    """An exclusive job stopped because its client left or its time ran out."""


@dataclass
class Job:
    """Work other than generation that needs the model (feature inspection, alignment), run between batches.

    It counts against the queue like a request; ``cancelled`` (client gone, timed out, shutdown) skips it while it
    waits and stops it at its next forward pass once it runs."""

    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
