"""The batching engine on its own: queue limit (429), request timeout (408), graceful shutdown that finishes or
cancels in-flight requests, and refusal of new work after shutdown (503)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from test_server_support import MODEL_NAME, D, make_app, make_presets, serving, word_tokenizer
from tiny_models import tiny_model

from servers.engine import Engine, EngineLimits
from servers.errors import ApiError
from servers.jobs import Failed, Finished, GenRequest
from servers.metrics import Metrics
from servers.sampling import SamplingParams
from steerlib.config import AddOp, ApplyPolicy, SteeringConfig

EOS = frozenset({127})
LONG_GREEDY = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "w10"}],
    "max_tokens": 200,
    "temperature": 0,
}
"""Greedy on the slow model this runs all 200 tokens (no early EOS), about 4 s or more."""


@pytest.fixture(scope="module")
def slow_model() -> Iterator[torch.nn.Module]:
    """A tiny model whose every forward takes at least 20 ms, so requests are reliably still running."""
    model = tiny_model("llama", 2)
    handle = model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    yield model
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


def test_a_full_queue_refuses_with_429(slow_model: torch.nn.Module) -> None:
    async def run() -> None:
        e = engine(slow_model, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
        e.submit(request(4))
        e.submit(request(4))
        with pytest.raises(ApiError) as info:
            e.submit(request(4))
        assert info.value.status == 429 and info.value.code == "queue_full"

    asyncio.run(run())


def test_shutdown_cancels_running_and_queued_requests_after_the_grace_period(slow_model: torch.nn.Module) -> None:
    async def run() -> None:
        e = engine(slow_model, max_batch=1)
        e.start()
        running, queued = request(500), request(500)
        e.submit(running)
        e.submit(queued)
        first = await running.queue.get()
        assert isinstance(first, str)  # it is generating
        start = time.monotonic()
        await e.shutdown(grace_s=0.1)
        assert time.monotonic() - start < 5
        done = await last_event(running)
        assert isinstance(done, Finished) and done.finish_reason == "cancelled" and done.completion_tokens < 500
        failed = await last_event(queued)
        assert isinstance(failed, Failed) and failed.status == 503
        with pytest.raises(ApiError) as info:
            e.submit(request(1))
        assert info.value.status == 503

    asyncio.run(run())


def test_shutdown_lets_in_flight_requests_finish_within_the_grace_period(slow_model: torch.nn.Module) -> None:
    async def run() -> None:
        e = engine(slow_model, max_batch=4)
        e.start()
        reqs = [request(5), request(3)]
        for r in reqs:
            e.submit(r)
        await asyncio.sleep(0.05)
        await e.shutdown(grace_s=30)
        ends = [await last_event(r) for r in reqs]
        assert [(x.finish_reason, x.completion_tokens) for x in ends if isinstance(x, Finished)] == [
            ("length", 5),
            ("length", 3),
        ]

    asyncio.run(run())


def test_a_slow_request_times_out_with_408_and_stops_decoding(
    slow_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory
) -> None:
    app = make_app(make_presets(tmp_path_factory.mktemp("p")), slow_model, request_timeout_s=0.3, batch_wait_ms=0)
    body = dict(LONG_GREEDY)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 408 and r.json()["error"]["type"] == "timeout", r.text
        ok = c.post("/v1/chat/completions", json=body | {"max_tokens": 2})
        assert ok.status_code == 200, ok.text
    steps = app.state.steerlib.metrics.decode_steps.collect()[0].samples[0].value
    assert steps < 60, steps  # the timed-out row was cancelled long before its 200 tokens


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_stops_its_generation(
    slow_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory, stream: bool
) -> None:
    app = make_app(make_presets(tmp_path_factory.mktemp("p")), slow_model, batch_wait_ms=0, shutdown_grace_s=30)
    body = dict(LONG_GREEDY)
    with serving(app) as url:
        if stream:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body | {"stream": True}) as r:
                next(r.iter_lines())  # the first chunk arrived; now hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.0)
        time.sleep(0.5)
    # Shutdown would have let the row run all 200 steps (grace 30 s); the hang-up cancelled it long before.
    steps = app.state.steerlib.metrics.decode_steps.collect()[0].samples[0].value
    assert 0 < steps < 150, steps


def test_requests_arriving_within_the_batch_wait_share_one_batch(slow_model: torch.nn.Module) -> None:
    async def run() -> tuple[float, float]:
        e = engine(slow_model, max_batch=8, batch_wait_s=0.3)
        e.start()
        reqs = [request(2) for _ in range(4)]
        for r in reqs:
            e.submit(r)
            await asyncio.sleep(0.02)  # each arrival wakes the worker; it must keep the batch open anyway
        for r in reqs:
            assert isinstance(await last_event(r), Finished)
        await e.shutdown(grace_s=5)
        samples = {s.name: s.value for s in next(iter(e.metrics.batch_size.collect())).samples}
        return samples["steerlib_batch_size_count"], samples["steerlib_batch_size_sum"]

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
        e = engine(model, max_batch=8, batch_wait_s=0.2)
        e.start()
        loop = asyncio.get_running_loop()
        solo = []
        for r in requests(loop, poison=False):
            e.submit(r)
            solo.append(await events_of(r))
        together = requests(loop, poison=True)
        for r in together:
            e.submit(r)
        ends = [await events_of(r) for r in together]
        await e.shutdown(grace_s=5)
        return solo, ends, e

    solo, ends, e = asyncio.run(run())
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
