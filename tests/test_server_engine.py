"""The batching engine on its own: queue limit (429), request timeout (408), graceful shutdown that finishes or
cancels in-flight requests, refusal of new work after shutdown (503), a client that hangs up, dynamic batching.

No test here depends on how fast the machine is: the model's forwards wait at a :class:`Gate` the test opens, so
"the request is still running" is a fact the test arranged, and step counts are exact."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from test_server_support import MODEL_NAME, D, make_app, make_presets, serving, word_tokenizer
from tiny_models import tiny_model

from servers.engine import Engine, EngineLimits
from servers.errors import ApiError
from servers.jobs import Failed, Finished, GenRequest, Job
from servers.metrics import Metrics
from servers.sampling import SamplingParams
from steerlib.config import AddOp, ApplyPolicy, SteeringConfig

EOS = frozenset({127})
WAIT_S = 30.0
"""How long a test waits for something it arranged; only a broken engine gets anywhere near it."""
LONG_GREEDY = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "w10"}],
    "max_tokens": 200,
    "temperature": 0,
}
"""Greedy, the tiny model runs all 200 tokens of this (no early EOS)."""


class Gate:
    """A forward pre-hook the test drives. Open, it lets every forward through. Held, each forward counts itself in
    :attr:`entered` and waits for a permit (:meth:`allow`) or for the gate to open (:meth:`open`)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._held = False
        self._permits = 0
        self.entered = 0
        """Forwards begun since :meth:`hold`."""

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        with self._cv:
            if not self._held:
                return
            self.entered += 1
            self._cv.notify_all()
            if not self._cv.wait_for(lambda: not self._held or self._permits > 0, WAIT_S):
                raise RuntimeError("the gate was never opened for this forward")
            if self._held:
                self._permits -= 1

    def hold(self, permits: int = 0) -> None:
        """From now on each forward waits; the first ``permits`` of them pass at once."""
        with self._cv:
            self._held, self._permits, self.entered = True, permits, 0

    def open(self) -> None:
        with self._cv:
            self._held = False
            self._cv.notify_all()

    def wait_entered(self, n: int) -> None:
        """Return once the ``n``-th forward since :meth:`hold` has begun (it is waiting if it had no permit)."""
        with self._cv:
            assert self._cv.wait_for(lambda: self.entered >= n, WAIT_S), f"{self.entered} forwards begun, not {n}"


@pytest.fixture
def gated() -> Iterator[tuple[torch.nn.Module, Gate]]:
    """A tiny model whose forwards wait at a gate the test holds and opens."""
    model, gate = tiny_model("llama", 2), Gate()
    handle = model.register_forward_pre_hook(gate)
    yield model, gate
    gate.open()  # never leave the engine thread waiting, whatever the test did
    handle.remove()


def engine(model: torch.nn.Module, **limits: Any) -> Engine:
    return Engine(model, word_tokenizer(), EOS, 0, EngineLimits(**limits), Metrics())


def request(max_tokens: int) -> GenRequest:
    return GenRequest([1, 2, 10, 11, 3], None, SamplingParams(0.0, 1.0, None, max_tokens), asyncio.get_running_loop())


async def last_event(req: GenRequest) -> Finished | Failed:
    async for event in req.events():
        if isinstance(event, Finished | Failed):
            return event
    raise AssertionError("no final event")


def decode_steps(app: FastAPI) -> float:
    return float(app.state.steerlib.metrics.decode_steps.collect()[0].samples[0].value)


def batch_sizes(e: Engine) -> tuple[float, float]:
    """How many batches ran, and how many rows they held in all."""
    samples = {s.name: s.value for s in next(iter(e.metrics.batch_size.collect())).samples}
    return samples["steerlib_batch_size_count"], samples["steerlib_batch_size_sum"]


def spy_on_submit(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> list[GenRequest | Job]:
    """Everything the app's engine is given from now on, in order (the engine runs it as usual)."""
    e = app.state.steerlib.engine
    seen: list[GenRequest | Job] = []
    submit = e.submit

    def spy(item: GenRequest | Job) -> None:
        seen.append(item)
        submit(item)

    monkeypatch.setattr(e, "submit", spy)
    return seen


def test_a_full_queue_refuses_with_429() -> None:
    async def run() -> None:
        e = engine(tiny_model("llama", 2), max_batch=1, max_queue=2)  # not started: nothing leaves the queue
        e.submit(request(4))
        e.submit(request(4))
        with pytest.raises(ApiError) as info:
            e.submit(request(4))
        assert info.value.status == 429 and info.value.code == "queue_full"

    asyncio.run(run())


def test_shutdown_cancels_running_and_queued_requests_after_the_grace_period(
    gated: tuple[torch.nn.Module, Gate],
) -> None:
    model, gate = gated

    async def run() -> None:
        e = engine(model, max_batch=1)
        e.start()
        gate.hold(permits=1)  # the prefill runs, the first decode forward waits
        running, queued = request(500), request(500)
        e.submit(running)
        e.submit(queued)
        assert isinstance(await running.queue.get(), str)  # its first token was sent
        await asyncio.to_thread(gate.wait_entered, 2)  # and it is held inside its second forward
        stopping = asyncio.create_task(e.shutdown(grace_s=0.1))
        assert await asyncio.to_thread(running.cancelled.wait, WAIT_S)  # the grace ran out while it was held
        gate.open()
        await stopping
        done = await last_event(running)
        assert isinstance(done, Finished) and (done.finish_reason, done.completion_tokens) == ("cancelled", 1)
        failed = await last_event(queued)
        assert isinstance(failed, Failed) and failed.status == 503
        assert e.status == "stopped"
        with pytest.raises(ApiError) as info:
            e.submit(request(1))
        assert info.value.status == 503

    asyncio.run(run())


def test_shutdown_lets_in_flight_requests_finish_within_the_grace_period(gated: tuple[torch.nn.Module, Gate]) -> None:
    model, gate = gated

    async def run() -> None:
        e = engine(model, max_batch=2, batch_wait_s=WAIT_S)  # the batch closes when both are in
        e.start()
        gate.hold()
        reqs = [request(5), request(3)]
        for r in reqs:
            e.submit(r)
        await asyncio.to_thread(gate.wait_entered, 1)  # their batch is held in its prefill
        stopping = asyncio.create_task(e.shutdown(grace_s=WAIT_S))
        await asyncio.sleep(0)  # shutdown has begun: new work is refused, the batch in flight goes on
        assert e.status == "shutting down" and not stopping.done()
        with pytest.raises(ApiError) as info:
            e.submit(request(1))
        assert info.value.status == 503
        gate.open()
        await stopping
        ends = [await last_event(r) for r in reqs]
        assert [(x.finish_reason, x.completion_tokens) for x in ends if isinstance(x, Finished)] == [
            ("length", 5),
            ("length", 3),
        ]
        assert batch_sizes(e) == (1, 2)

    asyncio.run(run())


def test_a_request_held_past_its_timeout_gets_408_and_its_row_stops(
    gated: tuple[torch.nn.Module, Gate], tmp_path_factory: pytest.TempPathFactory
) -> None:
    model, gate = gated
    app = make_app(make_presets(tmp_path_factory.mktemp("p")), model, request_timeout_s=0.5, batch_wait_ms=0)
    with TestClient(app) as c:
        gate.hold()  # the request's prefill waits: it cannot finish before its timeout
        r = c.post("/v1/chat/completions", json=LONG_GREEDY)
        assert r.status_code == 408 and r.json()["error"]["type"] == "timeout", r.text
        assert gate.entered == 1  # it timed out inside its prefill, not in the queue
        gate.open()
        ok = c.post("/v1/chat/completions", json=LONG_GREEDY | {"max_tokens": 2})
        assert ok.status_code == 200, ok.text
    assert decode_steps(app) == 1 + 2  # the timed-out row stopped at its first step, then 2 for the second request


def post_and_keep_open(url: str, body: dict[str, Any]) -> socket.socket:
    """Send a chat completion request on a raw connection and return the connection without reading the reply."""
    u = urlsplit(url)
    assert u.hostname is not None and u.port is not None
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    conn = socket.create_connection((u.hostname, u.port))
    conn.sendall(head.encode() + payload)
    return conn


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_stops_its_generation(
    gated: tuple[torch.nn.Module, Gate],
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    stream: bool,
) -> None:
    """The row is held mid-generation while its client hangs up; once released it stops at its next step, though
    shutdown (grace 30 s) would have let it run all 200."""
    model, gate = gated
    app = make_app(make_presets(tmp_path_factory.mktemp("p")), model, batch_wait_ms=0, shutdown_grace_s=WAIT_S)
    seen = spy_on_submit(app, monkeypatch)
    with serving(app) as url:
        if stream:
            gate.hold(permits=1)  # the prefill runs and the first token is sent; the next forward waits
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=LONG_GREEDY | {"stream": True}) as r:
                lines = (line for line in r.iter_lines() if line)
                first, token = json.loads(next(lines)[6:]), json.loads(next(lines)[6:])
                assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
                assert token["choices"][0]["delta"]["content"]
                gate.wait_entered(2)
        else:
            gate.hold()  # the prefill waits
            conn = post_and_keep_open(url, LONG_GREEDY)
            gate.wait_entered(1)
            conn.close()
        (req,) = seen
        assert isinstance(req, GenRequest) and req.cancelled.wait(WAIT_S)  # the server saw the hang-up
        gate.open()
    # Leaving ``serving`` shut the engine down after its queue drained: every step it ran is counted.
    assert decode_steps(app) == (2 if stream else 1)


def test_a_batch_held_open_closes_as_soon_as_it_is_full() -> None:
    """Arrivals do not close a batch early, and a full batch does not wait out ``batch_wait_s``."""

    async def run() -> tuple[float, float]:
        e = engine(tiny_model("llama", 2), max_batch=4, batch_wait_s=WAIT_S)
        e.start()
        reqs = [request(2) for _ in range(4)]
        for r in reqs:
            e.submit(r)
            await asyncio.sleep(0.01)  # later arrivals find the worker holding the batch open, and wake it
        ends = await asyncio.wait_for(asyncio.gather(*map(last_event, reqs)), WAIT_S / 2)
        assert all(isinstance(x, Finished) and x.completion_tokens == 2 for x in ends)
        await e.shutdown(grace_s=WAIT_S)
        return batch_sizes(e)

    assert asyncio.run(run()) == (1, 4)


def poisoned() -> SteeringConfig:
    """A config that skipped validation (as a gap in it would let one through): position 2**70 is compared with the
    int64 positions of every generated token, so its batch's forward raises at the first decode step, after every
    row has streamed its first token."""
    apply = ApplyPolicy.model_construct(tokens="generated", positions=[2**70])
    iv = AddOp.model_construct(op="add", layer=1, site="resid_post", vector=[1.0] * D, coefficient=1.0, apply=apply)
    return SteeringConfig.model_construct(interventions=[iv])


async def events_of(req: GenRequest) -> tuple[list[str], Finished | Failed]:
    deltas: list[str] = []
    async for event in req.events():
        if isinstance(event, str):
            deltas.append(event)
        else:
            return deltas, event
    raise AssertionError("no final event")


def test_a_failing_request_does_not_take_its_batch_down() -> None:
    """The batch fails mid-stream; it is re-run in halves until the poisoned request fails alone (500). Every other
    request, its stream included, ends exactly as it does alone: no token lost, none sent twice."""
    model = tiny_model("llama", 3)
    prompts = [[1, 2, 10, 11, 3], [1, 2, 40, 3], [1, 2, 50, 51, 52, 3], [1, 2, 60, 61, 3], [1, 2, 70, 3]]
    greedy, seeded, unseeded = (SamplingParams(0.0, 1.0, None, 8), SamplingParams(0.9, 1.0, 5, 8),
                                SamplingParams(0.7, 0.9, None, 8))  # fmt: skip
    params = [greedy, seeded, greedy, unseeded, seeded]

    def requests(loop: asyncio.AbstractEventLoop, poison: bool) -> list[GenRequest]:
        out = [GenRequest(p, None, params[i], loop) for i, p in enumerate(prompts)]
        out[2].steering = poisoned() if poison else None
        return out

    async def run() -> tuple[list[Any], list[Any], Engine]:
        alone = engine(model, max_batch=1)  # each request its own batch
        e = engine(model, max_batch=len(prompts), batch_wait_s=WAIT_S)  # one batch: it closes when all are in
        alone.start()
        e.start()
        loop = asyncio.get_running_loop()
        solo = []
        for r in requests(loop, poison=False):
            alone.submit(r)
            solo.append(await events_of(r))
        together = requests(loop, poison=True)
        for r in together:
            e.submit(r)
        ends = [await events_of(r) for r in together]
        await alone.shutdown(grace_s=WAIT_S)
        await e.shutdown(grace_s=WAIT_S)
        return solo, ends, e

    solo, ends, e = asyncio.run(run())
    assert batch_sizes(e) == (1, len(prompts))  # they ran together (the re-runs in halves are not new batches)
    failed = ends[2][1]
    assert isinstance(failed, Failed) and failed.status == 500 and "other requests were not affected" in failed.message
    assert [ends[i] for i in (0, 1, 4)] == [solo[i] for i in (0, 1, 4)]
    unseeded_deltas, unseeded_end = ends[3]  # its seed was drawn when it was made: its re-run drew the same tokens
    assert isinstance(unseeded_end, Finished) and "".join(unseeded_deltas) == unseeded_end.text
    assert unseeded_end.finish_reason == "length" and unseeded_end.completion_tokens == 8
    for deltas, end in (ends[i] for i in (0, 1, 3, 4)):  # streamed text is the answer: nothing lost or sent twice
        assert isinstance(end, Finished) and "".join(deltas) == end.text and end.completion_tokens == 8
    rejected = [s.value for s in e.metrics.rejected.collect()[0].samples if s.name == "steerlib_rejected_total"]
    assert rejected == [1]  # failed_alone, once
