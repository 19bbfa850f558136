"""What passes between the HTTP side (asyncio) and the engine's worker thread: requests and their events.

The worker thread never touches asyncio objects directly: it hands each event to the request's event loop with
``call_soon_threadsafe``, and reads cancellation from a ``threading.Event`` (set on client disconnect, timeout
or shutdown).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from servers.sampling import SamplingParams
from steerlib.config import SteeringConfig


@dataclass(frozen=True)
class Finished:
    """The last event of a request."""

    text: str
    finish_reason: str
    """stop | length | cancelled"""
    prompt_tokens: int
    completion_tokens: int
    refused_by: str | None = None
    """Name of the steering ``refuse`` detector that answered instead of the model, if one fired."""


@dataclass(frozen=True)
class Failed:
    """The request could not be run (the engine shut down, or a server error)."""

    status: int
    message: str


Event = str | Finished | Failed
"""A text delta, then one Finished or Failed."""


@dataclass
class GenRequest:
    """One generation request as the engine sees it."""

    prompt_ids: list[int]
    steering: SteeringConfig | None
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)
    n_events: int = 0
    """Events emitted so far (a request with none can still be retried)."""

    def emit(self, event: Event) -> None:
        """Called from the worker thread."""
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
