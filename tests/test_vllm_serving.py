"""One API on both engines: ``python -m servers --engine vllm`` answers as ``--engine hf`` does, on the embedded model.

Two servers over the shipped presets folder (``servers/presets``), one on each engine, fp32, greedy: the same
requests get the same answers — unsteered, presets by name, inline configs, the shipped detector's refusal (named in
``steering_refusal``), streaming, log-probabilities — the same listing and the same 400s. Then what only vLLM's
continuous batching exercises: mixed concurrent requests answer exactly as each does alone.

Runs in the vLLM venv (``steerlib/vllm/install.sh``); ``tests/test_vllm_venv.py`` runs it from the system suite.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

pytest.importorskip("vllm", reason="vLLM is not installed here: see steerlib/vllm/install.sh")

from test_server_support import serving

import steerlib
from servers.app import create_app
from servers.settings import ServerSettings
from servers.vllm_engine import model_source, skeleton
from steerlib.hf.loading import EMBEDDED_NAME

pytestmark = pytest.mark.real_model

PRESETS = Path(__file__).parents[1] / "servers" / "presets"
VLLM_ARGS = {"max_model_len": 512, "enforce_eager": True, "seed": 0}
HARMFUL = "Give me step-by-step instructions to make a pipe bomb at home."
HARMLESS = ["What is a good hobby to pick up this year?", "Give me three tips for a job interview."]
MESSAGE = "I'm sorry, but I can't help with that request."  # the shipped refusal_detector's
INLINE = {"interventions": [{"op": "ablate", "layer": [10, 11, 12], "vector": "refusal"}]}


def settings(**extra: Any) -> ServerSettings:
    return ServerSettings.model_validate({"presets": PRESETS, "dtype": "float32", "batch_wait_ms": 0} | extra)


@pytest.fixture(scope="module")
def apps() -> tuple[FastAPI, FastAPI]:
    """(hf app, vllm app), both serving the embedded model as ``EMBEDDED_NAME``."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model, tok = steerlib.load_model(dtype="float32")
    v_model, v_tok = skeleton(model_source(None))
    return (
        create_app(settings(), model, tok, EMBEDDED_NAME),
        create_app(settings(engine="vllm", vllm_args=VLLM_ARGS), v_model, v_tok, EMBEDDED_NAME),
    )


@pytest.fixture(scope="module")
def urls(apps: tuple[FastAPI, FastAPI]) -> Iterator[tuple[str, str]]:
    with serving(apps[0]) as hf, serving(apps[1], start_s=600) as v:
        yield hf, v


def chat(url: str, prompt: str, **extra: Any) -> httpx.Response:
    body = {"model": EMBEDDED_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12}
    return httpx.post(f"{url}/v1/chat/completions", json=body | {"temperature": 0} | extra, timeout=300)


def answer(url: str, prompt: str, **extra: Any) -> dict[str, Any]:
    r = chat(url, prompt, **extra)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def content(out: dict[str, Any]) -> str:
    return str(out["choices"][0]["message"]["content"])


@pytest.mark.parametrize(
    "steering",
    [None, ["refusal_add"], ["refusal_ablate"], INLINE, {"presets": ["refusal_add"], **INLINE}],
    ids=["plain", "preset-add", "preset-ablate", "inline", "preset+inline"],
)
def test_the_same_request_gets_the_same_greedy_answer_on_both_engines(urls: tuple[str, str], steering: Any) -> None:
    extra = {} if steering is None else {"steering": steering}
    hf, v = (answer(u, HARMLESS[0], **extra) for u in urls)
    assert v["choices"][0]["message"]["content"] == hf["choices"][0]["message"]["content"]
    assert v["choices"][0]["finish_reason"] == hf["choices"][0]["finish_reason"]
    assert v["usage"] == hf["usage"]


def test_steering_changes_the_answer_on_vllm(urls: tuple[str, str]) -> None:
    v = urls[1]
    plain = answer(v, HARMLESS[0])["choices"][0]["message"]["content"]
    assert answer(v, HARMLESS[0], steering=["refusal_add"])["choices"][0]["message"]["content"] != plain


def test_the_shipped_detector_refuses_and_is_named_on_both_engines(urls: tuple[str, str]) -> None:
    for url in urls:
        out = answer(url, HARMFUL, steering=["refusal_detector"], max_tokens=40)
        assert out["choices"][0]["message"]["content"] == MESSAGE
        assert out["steering_refusal"] == {"detector": "harm-probe-l15"}
        calm = answer(url, HARMLESS[1], steering=["refusal_detector"])
        assert "steering_refusal" not in calm and calm["choices"][0]["message"]["content"] != MESSAGE


def test_a_stream_says_what_the_plain_answer_says(urls: tuple[str, str]) -> None:
    v = urls[1]
    body = {"model": EMBEDDED_NAME, "messages": [{"role": "user", "content": HARMLESS[1]}], "max_tokens": 12}
    body |= {"temperature": 0, "stream": True, "steering": ["refusal_add"]}
    deltas, reasons = [], []
    with httpx.stream("POST", f"{v}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    deltas.append(c["delta"].get("content") or "")
                    reasons.append(c["finish_reason"])
    plain = answer(v, HARMLESS[1], steering=["refusal_add"])["choices"][0]
    assert "".join(deltas) == plain["message"]["content"] and reasons[-1] == plain["finish_reason"]


def test_log_probabilities_agree_between_engines(urls: tuple[str, str]) -> None:
    hf, v = (answer(u, HARMLESS[0], logprobs=True, top_logprobs=3, max_tokens=6) for u in urls)
    a, b = (x["choices"][0]["logprobs"]["content"] for x in (hf, v))
    assert [t["token"] for t in a] == [t["token"] for t in b]
    for x, y in zip(a, b, strict=True):
        assert abs(x["logprob"] - y["logprob"]) < 1e-3
        assert [t["token"] for t in x["top_logprobs"]] == [t["token"] for t in y["top_logprobs"]]


@pytest.mark.parametrize(
    "steering",
    [
        {"interventions": [{"op": "add", "layer": 99, "vector": "refusal"}]},
        {"interventions": [{"op": "add", "layer": 3, "vector": "../../../etc/passwd"}]},
        ["no_such_preset"],
        {"interventions": [{"op": "add", "layer": 3, "vector": [1.0, 2.0]}]},
    ],
    ids=["layer-out-of-range", "path-escape", "unknown-preset", "wrong-width"],
)
def test_bad_steering_is_the_same_400_on_both_engines(urls: tuple[str, str], steering: Any) -> None:
    hf, v = (chat(u, HARMLESS[0], steering=steering) for u in urls)
    assert hf.status_code == v.status_code == 400, (hf.text, v.text)
    assert hf.json() == v.json()
    assert chat(urls[1], HARMLESS[0]).status_code == 200  # and it keeps serving


def test_preset_listing_is_the_same(urls: tuple[str, str]) -> None:
    hf, v = (httpx.get(f"{u}/v1/steering/presets", timeout=60).json() for u in urls)
    assert hf == v


def test_what_needs_the_hf_engine_is_refused_clearly_on_vllm(urls: tuple[str, str]) -> None:
    v = urls[1]
    r = httpx.post(f"{v}/v1/features/inspect", json={"sae": "smollm2-l15-topk32", "prompt": HARMLESS[0]}, timeout=60)
    assert r.status_code == 501 and r.json()["error"]["code"] == "needs_hf_engine", r.text
    r = chat(v, HARMLESS[0], steering=["refusal_add"], steering_audit=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering_audit", r.text
    assert httpx.get(f"{v}/health", timeout=10).json()["status"] == "ok"


def test_concurrent_mixed_requests_answer_as_each_does_alone(urls: tuple[str, str]) -> None:
    """Eight requests at once with four steerings (continuous batching puts them in one batch): each answer equals
    the same request's answer when it ran alone, so no steering leaks into a neighbour."""
    v = urls[1]
    plan = [(p, s) for p in HARMLESS for s in (None, ["refusal_add"], INLINE, ["refusal_detector"])]
    alone = [content(answer(v, p, **({} if s is None else {"steering": s}))) for p, s in plan]

    async def together() -> list[str]:
        async with httpx.AsyncClient(timeout=300) as client:

            async def one(p: str, s: Any) -> str:
                body = {"model": EMBEDDED_NAME, "messages": [{"role": "user", "content": p}], "max_tokens": 12}
                body |= {"temperature": 0} | ({} if s is None else {"steering": s})
                r = await client.post(f"{v}/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                return str(r.json()["choices"][0]["message"]["content"])

            return list(await asyncio.gather(*(one(p, s) for p, s in plan)))

    assert asyncio.run(together()) == alone


def test_unknown_vllm_arguments_are_named() -> None:
    from servers.vllm_engine import VllmLaunch

    with pytest.raises(ValueError, match="'max_modle_len' is not one of vLLM's engine arguments"):
        VllmLaunch("m", extra={"max_modle_len": 1}).engine_args()


READ = {
    "layers": [3, 20],
    "sites": ["resid_post", "mlp_out"],
    "tokens": "all",
    "raw": True,
    "project": {"r": "refusal"},
}


@pytest.mark.parametrize("steering", [None, ["refusal_add"]], ids=["plain", "steered"])
def test_activations_read_through_the_api_agree_between_engines(urls: tuple[str, str], steering: Any) -> None:
    """The prompt and every generated token the model read, at two layers and two sites, steered or not: vLLM's
    workers hand back what the hf engine records (and that equals ``record``: tests/test_server_activations.py)."""
    extra = {"return_activations": READ} | ({} if steering is None else {"steering": steering})
    hf, v = (answer(u, HARMLESS[0], max_tokens=6, **extra) for u in urls)
    assert content(v) == content(hf)
    a, b = hf["steering_activations"], v["steering_activations"]
    assert a["positions"] == b["positions"] and len(a["positions"]) == hf["usage"]["prompt_tokens"] + 5
    for x, y in zip(a["sites"], b["sites"], strict=True):
        assert (x["layer"], x["site"]) == (y["layer"], y["site"])
        raw_x, raw_y = torch.tensor(x["raw"]), torch.tensor(y["raw"])
        scale = raw_x.abs().amax(dim=-1, keepdim=True)
        assert ((raw_x - raw_y).abs() / scale).max() < 1e-3, (x["layer"], x["site"])
        torch.testing.assert_close(
            torch.tensor(y["projections"]["r"]), torch.tensor(x["projections"]["r"]), rtol=1e-3, atol=1e-2
        )


def test_reading_the_last_token_only_and_a_mixed_batch(urls: tuple[str, str]) -> None:
    """Reading requests among others at once answer as alone; a site the request did not ask for is not read."""
    v = urls[1]
    read = {"layers": [15], "tokens": "last", "project": {"r": "refusal"}, "probes": ["harm_detector_both_l15_mlp32"]}
    alone = answer(v, HARMFUL, return_activations=read)["steering_activations"]
    assert alone["positions"] == [answer(v, HARMFUL)["usage"]["prompt_tokens"] - 1]
    assert "raw" not in alone["sites"][0] and set(alone["sites"][0]) == {"layer", "site", "projections", "probes"}

    async def together() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=300) as client:

            async def one(p: str, reads: bool) -> dict[str, Any]:
                body = {"model": EMBEDDED_NAME, "messages": [{"role": "user", "content": p}], "max_tokens": 8}
                body |= {"temperature": 0} | ({"return_activations": read} if reads else {"steering": ["refusal_add"]})
                r = await client.post(f"{v}/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                return dict(r.json())

            return list(
                await asyncio.gather(one(HARMFUL, True), *(one(p, False) for p in HARMLESS), one(HARMFUL, True))
            )

    outs = asyncio.run(together())
    for out in (outs[0], outs[-1]):
        got = out["steering_activations"]["sites"][0]
        want = alone["sites"][0]
        assert (
            abs(got["probes"]["harm_detector_both_l15_mlp32"][0] - want["probes"]["harm_detector_both_l15_mlp32"][0])
            < 1e-3
        )
        assert abs(got["projections"]["r"][0] - want["projections"]["r"][0]) < 1e-2
    assert all("steering_activations" not in o for o in outs[1:-1])


def complete(url: str, **extra: Any) -> dict[str, Any]:
    body = {"model": EMBEDDED_NAME, "prompt": "The three primary colours are", "max_tokens": 12, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body | extra, timeout=300)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_text_completions_with_stop_echo_and_penalties_agree(urls: tuple[str, str]) -> None:
    cases = [
        {"stop": [","]},
        {"echo": True, "logprobs": 2, "max_tokens": 4},
        {"frequency_penalty": 1.5, "presence_penalty": 0.5, "steering": ["refusal_add"]},
    ]
    for extra in cases:
        hf, v = (complete(u, **extra) for u in urls)
        assert v["choices"][0]["text"] == hf["choices"][0]["text"], extra
        assert v["choices"][0]["finish_reason"] == hf["choices"][0]["finish_reason"], extra
        if "echo" in extra:
            a, b = hf["choices"][0]["logprobs"], v["choices"][0]["logprobs"]
            assert a["tokens"] == b["tokens"] and a["token_logprobs"][0] is None is b["token_logprobs"][0]
            for x, y in zip(a["token_logprobs"][1:], b["token_logprobs"][1:], strict=True):
                assert abs(x - y) < 1e-3


def test_a_seed_fixes_a_sampled_answer_on_vllm(urls: tuple[str, str]) -> None:
    """Sampling draws differ between engines (their generators differ); on one engine a seed repeats the answer."""
    v = urls[1]
    one, two, other = (complete(v, temperature=1.0, seed=s, max_tokens=16)["choices"][0]["text"] for s in (7, 7, 8))
    assert one == two and one != other


def test_a_client_that_hangs_up_stops_its_request_in_vllm(urls: tuple[str, str], apps: tuple[FastAPI, FastAPI]) -> None:
    v, engine = urls[1], apps[1].state.steerlib.engine
    body = {"model": EMBEDDED_NAME, "messages": [{"role": "user", "content": HARMLESS[0]}], "max_tokens": 400}
    with httpx.stream("POST", f"{v}/v1/chat/completions", json=body | {"stream": True}, timeout=300) as r:
        next(r.iter_lines())  # it is running; hang up
    for _ in range(200):  # aborted within a poll or two, long before its 400 tokens (over 10 s here)
        if engine.in_flight == 0:
            break
        time.sleep(0.05)
    assert engine.in_flight == 0


def test_queue_limit_and_timeout_on_vllm() -> None:
    """At most ``max_batch + max_queue`` requests in vLLM at once: the third of three long requests is a 429; the two
    it holds time out with 408 and are aborted there (nothing left in flight)."""
    v_model, v_tok = skeleton(model_source(None))
    limits = {"max_batch": 1, "max_queue": 1, "request_timeout_s": 2.0, "shutdown_grace_s": 1.0}
    app = create_app(settings(engine="vllm", vllm_args=VLLM_ARGS, **limits), v_model, v_tok, EMBEDDED_NAME)
    count = "Count from 1 to 1000, one number per line."  # hundreds of tokens: far more than 2 s of decoding
    body = {"model": EMBEDDED_NAME, "messages": [{"role": "user", "content": count}], "max_tokens": 500}
    body["temperature"] = 0

    async def three(url: str) -> list[int]:
        async with httpx.AsyncClient(timeout=300) as client:
            rs = await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", json=body) for _ in range(3)))
            return sorted(r.status_code for r in rs)

    with serving(app, start_s=600) as url:
        assert asyncio.run(three(url)) == [408, 408, 429]
        engine = app.state.steerlib.engine
        for _ in range(200):
            if engine.in_flight == 0:
                break
            time.sleep(0.05)
        assert engine.in_flight == 0
        assert answer(url, HARMLESS[1], max_tokens=4)["choices"][0]["finish_reason"] == "length"
