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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

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
def urls() -> Iterator[tuple[str, str]]:
    """(hf server, vllm server), both serving the embedded model as ``EMBEDDED_NAME``."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model, tok = steerlib.load_model(dtype="float32")
    hf_app = create_app(settings(), model, tok, EMBEDDED_NAME)
    v_model, v_tok = skeleton(model_source(None))
    v_app = create_app(settings(engine="vllm", vllm_args=VLLM_ARGS), v_model, v_tok, EMBEDDED_NAME)
    with serving(hf_app) as hf, serving(v_app, start_s=600) as v:
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
