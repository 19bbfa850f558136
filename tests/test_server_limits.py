"""Bounded per-request cost: batches packed by steering cost, jobs (inspection, alignment) in the same bounded
queue and stopped when their client leaves or times out, tokenization off the event loop, bounded caches, and one
set of loaded resources for validation and the engine."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from test_server_support import MODEL_NAME, make_app, make_presets, serving, words
from tiny_models import tiny_model, word_tokenizer

from servers.app import create_app
from servers.engine import Engine, EngineLimits
from servers.errors import ApiError
from servers.jobs import Finished, GenRequest, Job, JobCancelled
from servers.limits import RequestLimits, cost
from servers.metrics import Metrics
from servers.resources import MATCH_CACHE, ServerResources
from servers.sampling import SamplingParams
from servers.settings import ServerSettings
from servers.steering import VALIDATED_CACHE
from steerlib.config import SteeringConfig
from steerlib.plan import Resources, spec_of

EOS = frozenset({127})


@pytest.fixture(scope="module")
def presets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_presets(tmp_path_factory.mktemp("presets"))


def engine(model: torch.nn.Module, **limits: Any) -> Engine:
    return Engine(model, word_tokenizer(), EOS, 0, EngineLimits(**limits), Metrics())


def test_cost_counts_op_layer_pairs_weighted_by_positions() -> None:
    cfg = SteeringConfig.model_validate(
        {
            "interventions": [
                {"op": "add", "layer": "all", "vector": [1.0] * 4},
                {"op": "ablate", "layer": [0, 2], "vector": [1.0] * 4, "apply": {"positions": [0, 1, -1]}},
                {"op": "add", "layer": 1, "vector": [1.0] * 4, "apply": {"exclude": {"positions": [3]}}},
            ]
        }
    )
    assert cost(cfg, n_layers=3) == 3 + 2 * 4 + 2
    assert cost(None, n_layers=3) == 0
    assert RequestLimits().max_position == 2048 + 512


def test_batches_are_packed_up_to_the_steering_budget() -> None:
    model = tiny_model("llama", 2)

    async def run(costs: list[int]) -> list[float]:
        e = engine(model, max_batch=8, batch_wait_s=0.2, max_batch_cost=4096)
        loop = asyncio.get_running_loop()
        reqs = [
            GenRequest([1, 2, 10 + i, 3], None, SamplingParams(0.0, 1.0, None, 2), loop, c) for i, c in enumerate(costs)
        ]
        for r in reqs:
            e.submit(r)  # all queued before the worker starts: it packs what is waiting
        e.start()
        for r in reqs:
            while not isinstance(await r.queue.get(), Finished):
                pass
        await e.shutdown(grace_s=5)
        samples = {s.name: s.value for s in e.metrics.batch_size.collect()[0].samples}
        return [samples["steerlib_batch_size_count"], samples["steerlib_batch_size_sum"]]

    assert asyncio.run(run([3000, 3000, 3000])) == [3, 3]  # two never fit together
    assert asyncio.run(run([1000, 1000, 1000, 2000])) == [2, 4]  # 1000+1000+1000 then 2000 (order kept)
    assert asyncio.run(run([0, 0, 0, 0])) == [1, 4]


def test_jobs_wait_in_the_bounded_queue_and_stop_when_cancelled() -> None:
    model = tiny_model("llama", 2)
    ids = torch.tensor([[1, 2, 10, 3]])
    calls: list[int] = []

    async def run() -> None:
        e = engine(model, max_queue=2)
        forever = Job(lambda: [model(ids) for _ in range(10_000)])
        e.submit(forever)
        e.submit(Job(lambda: None))
        with pytest.raises(ApiError) as full:
            e.submit(Job(lambda: None))
        assert full.value.status == 429

        def count(*_: Any) -> None:  # the client leaves after the third forward
            calls.append(1)
            if len(calls) == 3:
                forever.cancelled.set()

        handle = model.register_forward_pre_hook(count)
        e.start()
        try:
            with pytest.raises(JobCancelled):
                await asyncio.wrap_future(forever.future)
        finally:
            await e.shutdown(grace_s=5)
            handle.remove()

    asyncio.run(run())
    assert len(calls) == 3  # the third forward found the job cancelled (its check runs after ours) and stopped it


def test_an_inspection_times_out_and_stops(presets: Path) -> None:
    model = tiny_model("llama", 2)
    forwards: list[int] = []

    def slow(*_: Any) -> None:
        forwards.append(1)
        time.sleep(0.02)

    handle = model.register_forward_pre_hook(slow)
    try:
        app = make_app(presets, model, request_timeout_s=0.3, max_tokens_limit=400)
        with TestClient(app) as c:
            body = {"sae": "probe", "prompt": "w10 w11", "generate_tokens": 400}
            r = c.post("/v1/features/inspect", json=body)
            assert r.status_code == 408, r.text
            assert c.get("/health").json()["status"] == "ok"
            n = len(forwards)
            assert c.post("/v1/features/inspect", json=body | {"generate_tokens": 0}).status_code == 200
    finally:
        handle.remove()
    assert n < 400  # it stopped at a forward after its client's time ran out, far from its 400 tokens


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": words(*range(10, 40))}, "prompt has 33 tokens; this server's limit is 20"),
        ({"prompt": "w10", "response": words(*range(10, 50))}, "response has 40 tokens; this server's limit is 32"),
        ({"prompt": "w10 " * 500_000}, "prompt has more than 20 tokens"),  # refused after 320 characters
        ({"prompt": "w10", "response": "w11 " * 500_000}, "response has more than 32 tokens"),
    ],
)
def test_inspection_counts_prompt_and_response_tokens(presets: Path, body: dict[str, Any], message: str) -> None:
    with TestClient(make_app(presets, max_prompt_tokens=20, max_tokens_limit=32)) as c:
        r = c.post("/v1/features/inspect", json={"sae": "probe"} | body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


class GatedTokenizer:
    """The word tokenizer, except that tokenizing a text with ``w99`` in it waits for ``release``."""

    def __init__(self) -> None:
        self._tok = word_tokenizer()
        self.waiting, self.release = threading.Event(), threading.Event()

    def __call__(self, text: str, *args: Any, **kwargs: Any) -> Any:
        if "w99" in text:
            self.waiting.set()
            assert self.release.wait(60)
        return self._tok(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def __len__(self) -> int:
        return len(self._tok)


def test_tokenizing_leaves_the_server_responsive(presets: Path) -> None:
    """While a prompt is being tokenized (held there by the tokenizer), /health answers: tokenization runs in a
    worker thread, not on the event loop (were it on the loop, /health would time out)."""
    tok = GatedTokenizer()
    settings = ServerSettings(presets=presets, batch_wait_ms=5)
    app = create_app(settings, tiny_model("llama", 2), tok, MODEL_NAME)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "w99 w10"}], "max_tokens": 2}

    async def run(url: str) -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            task = asyncio.create_task(c.post("/v1/chat/completions", json=body))
            try:
                assert await asyncio.to_thread(tok.waiting.wait, 60)
                health = await c.get("/health", timeout=10)
            finally:
                tok.release.set()
            return health.status_code, (await task).status_code

    with serving(app) as url:
        assert asyncio.run(run(url)) == (200, 200)


def test_a_huge_prompt_costs_only_what_the_limit_allows(presets: Path) -> None:
    """Two million words (8 MB) are refused after tokenizing 16 characters per allowed token, not all of them."""
    app = make_app(presets, max_prompt_tokens=50)
    huge = "w10 " * 2_000_000
    with TestClient(app) as c:
        chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": huge}], "max_tokens": 2}
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 400 and "prompt has more than 50 tokens" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": huge, "max_tokens": 2})
        assert r.status_code == 400 and "prompt has more than 50 tokens" in r.json()["error"]["message"]
        exact = " ".join(["w10"] * 49)  # with <s>: 50 tokens, at the limit
        assert (
            c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": exact, "max_tokens": 2}).status_code == 200
        )


def test_validation_and_the_engine_share_loaded_files(presets: Path) -> None:
    app = make_app(presets)
    st = app.state.steerlib
    assert st.resolver.resources is st.engine.resources
    edit = {"op": "sae", "sae": "probe", "edits": [{"feature": 1, "mode": "set", "value": 2.0}]}
    with TestClient(app) as c:
        for value in (2.0, 3.0, 4.0):
            iv = edit | {"edits": [{"feature": 1, "mode": "set", "value": value}]}
            body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "w10"}], "max_tokens": 2}
            assert c.post("/v1/chat/completions", json=body | {"steering": {"interventions": [iv]}}).status_code == 200
        loaded = dict(st.engine.resources._saes)
        assert list(loaded) == [presets.resolve() / "saes" / "probe"]  # loaded once, by the first validation
        assert st.sae("probe") is next(iter(loaded.values()))  # inspection reads the same copy


def test_match_lookups_equal_steerlibs_and_their_cache_is_bounded() -> None:
    model, tok = tiny_model("llama", 2), word_tokenizer()
    spec = spec_of(model, 2, 64)
    ours, theirs = ServerResources(spec), Resources(spec)
    for strings in (["w10"], ["w10", "w11", "nope"], ["<s>", "w126"]):
        assert torch.equal(ours.match_lookup(strings, tok), theirs.match_lookup(strings, tok))
    for i in range(MATCH_CACHE + 50):
        ours.match_lookup([f"w{5 + i % 100}", str(i)], tok)
    assert len(ours._lookups) == MATCH_CACHE


def test_the_validation_cache_is_bounded_by_count_not_config_size(presets: Path) -> None:
    st = make_app(presets).state.steerlib
    big = [1.0] * 64
    for i in range(VALIDATED_CACHE + 10):
        cfg = SteeringConfig.model_validate(
            {"interventions": [{"op": "add", "layer": 1, "vector": big, "coefficient": float(i)}]}
        )
        st.resolver._validate(cfg)
    assert len(st.resolver._validated) == VALIDATED_CACHE
    assert {len(k) for k in st.resolver._validated} == {32}
