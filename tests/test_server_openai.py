"""The server through the real ``openai`` client (sync, async, streaming) on loopback, with steerlib's own
``generate`` under ``steer`` as the reference for greedy output."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch
from fastapi import FastAPI
from openai.types.chat import ChatCompletionMessageParam
from test_server_support import MODEL_NAME, make_app, make_presets, serving, word_tokenizer, words
from tiny_models import tiny_model

from steerlib import SteeringConfig, steer
from steerlib.inspect_features import features_over_response, top_features

PROMPT = words(10, 11, 12)
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
TEMPLATE_INPUT = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", 3)


@pytest.fixture(scope="module")
def app(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    return make_app(make_presets(tmp_path_factory.mktemp("presets")), model)


@pytest.fixture(scope="module")
def url(app: FastAPI) -> Iterator[str]:
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30, max_retries=0)


def reference(model: torch.nn.Module, cfg: SteeringConfig | None, n: int) -> str:
    """Greedy text from HF ``generate`` with steerlib's hooks: what the server must reproduce."""
    tok = word_tokenizer()
    text = tok.apply_chat_template(TEMPLATE_INPUT, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), steer(model, [cfg]):
        out = model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def chat(client: openai.OpenAI, steering: list[str] | None, n: int = 8) -> openai.types.chat.ChatCompletion:
    extra = {} if steering is None else {"steering": steering}
    return client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=n,
        temperature=0,
        extra_body=extra,
    )


def test_sync_chat_equals_generate_unsteered_and_steered(
    client: openai.OpenAI, model: torch.nn.Module, app: FastAPI
) -> None:
    plain, pushed = chat(client, None), chat(client, ["push"])
    assert plain.choices[0].message.content == reference(model, None, 8)
    assert pushed.choices[0].message.content == reference(model, app.state.steerlib.registry.get("push"), 8)
    assert pushed.choices[0].message.content != plain.choices[0].message.content
    assert plain.usage is not None
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens) == (6, 8, 14)
    assert plain.choices[0].finish_reason == "length"


def test_async_client_concurrent_requests_equal_sync_ones(client: openai.OpenAI, url: str) -> None:
    steerings: list[list[str]] = [[], ["push"], ["erase"], ["sae_edit"]]
    alone = [chat(client, s).choices[0].message.content for s in steerings]

    async def run() -> list[str | None]:
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30, max_retries=0)
        outs = await asyncio.gather(
            *[
                aclient.chat.completions.create(
                    model=MODEL_NAME,
                    messages=MESSAGES,
                    max_tokens=8,
                    temperature=0,
                    extra_body={"steering": s},
                )
                for s in steerings
            ]
        )
        await aclient.close()
        return [o.choices[0].message.content for o in outs]

    assert asyncio.run(run()) == alone
    assert len(set(alone)) == 4  # every steering changes the answer, so the comparison can fail


def test_streaming_chunks_join_to_the_full_answer(client: openai.OpenAI) -> None:
    full = chat(client, ["push"], n=10).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"steering": ["push"]},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices


def test_stream_ends_with_done(url: str) -> None:
    body = {"model": MODEL_NAME, "prompt": words(5, 6), "max_tokens": 3, "temperature": 0, "stream": True}
    lines = [ln for ln in httpx.post(f"{url}/v1/completions", json=body, timeout=30).text.split("\n") if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_completion_stops_before_a_stop_sequence(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL_NAME, prompt=words(20, 21), max_tokens=8, temperature=0)
    words_out = full.choices[0].text.split()
    stop = words_out[3]
    cut = client.completions.create(model=MODEL_NAME, prompt=words(20, 21), max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and full.choices[0].finish_reason == "length"
    streamed = client.completions.create(
        model=MODEL_NAME, prompt=words(20, 21), max_tokens=8, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        return (
            client.chat.completions.create(
                model=MODEL_NAME,
                messages=MESSAGES,
                max_tokens=12,
                temperature=1.5,
                top_p=0.95,
                seed=seed,
            )
            .choices[0]
            .message.content
        )

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), chat(client, None, 12).choices[0].message.content}) == 3


def test_models_and_presets_are_listed(client: openai.OpenAI, url: str) -> None:
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    listing = httpx.get(f"{url}/v1/steering/presets").json()
    assert [p["name"] for p in listing["data"]] == ["erase", "push", "sae_edit"]
    assert all(p["description"] for p in listing["data"])
    assert listing["vectors"] == ["push"] and listing["saes"] == ["probe"] and listing["probes"] == ["gate"]


def features_of(out: openai.types.chat.ChatCompletion) -> dict[str, Any]:
    feats: dict[str, Any] = (out.model_extra or {})["steering_features"]
    return feats


def test_chat_can_return_response_features(client: openai.OpenAI, model: torch.nn.Module, app: FastAPI) -> None:
    def ask(steering: list[str]) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=6,
            temperature=0,
            extra_body={"return_features": {"sae": "probe", "k": 3}, "steering": steering},
        )

    steered, plain = ask(["sae_edit"]), ask([])
    st = app.state.steerlib
    tok = word_tokenizer()
    rendered = str(tok.apply_chat_template(TEMPLATE_INPUT, tokenize=False, add_generation_prompt=True))
    expected = features_over_response(
        model,
        tok,
        st.sae("probe"),
        rendered,
        response=steered.choices[0].message.content,
        k=3,
        steering=st.registry.get("sae_edit"),
        chat=False,
    )
    feats = features_of(steered)
    assert feats["sae"] == "probe" and feats["n_tokens"] == expected.n_tokens == 6
    assert [(f["feature"], f["activation"]) for f in feats["top"]] == [tuple(f) for f in expected.top]
    assert features_of(plain)["top"] != feats["top"]


def test_inspect_lists_features_per_token(url: str, model: torch.nn.Module, app: FastAPI) -> None:
    body = {"sae": "probe", "prompt": words(10, 11), "response": words(30, 31), "k": 2, "steering": ["sae_edit"]}
    out = httpx.post(f"{url}/v1/features/inspect", json=body, timeout=30).json()
    st = app.state.steerlib
    expected = top_features(
        model,
        word_tokenizer(),
        st.sae("probe"),
        words(10, 11),
        response=words(30, 31),
        k=2,
        steering=st.registry.get("sae_edit"),
    )
    assert [t["token"] for t in out["tokens"]] == ["<s>", "<user>", "w10", "w11", "<assistant>", "w30", "w31"]
    assert [t["is_prompt"] for t in out["tokens"]] == [True] * 5 + [False] * 2
    assert [[(f["feature"], f["activation"]) for f in t["top"]] for t in out["tokens"]] == [
        [tuple(f) for f in r.top] for r in expected
    ]
    unsteered = httpx.post(f"{url}/v1/features/inspect", json=body | {"steering": []}, timeout=30).json()
    assert unsteered["tokens"] != out["tokens"]


def test_metrics_and_health(url: str) -> None:
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    text = httpx.get(f"{url}/metrics").text
    assert 'steerlib_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert "steerlib_batch_size_count" in text
