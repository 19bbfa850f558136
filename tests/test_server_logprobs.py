"""Log-probabilities, echo and penalties on the server (tiny Llama, word tokenizer), through the real ``openai`` client.

Oracles: a direct steered forward pass (the prompt in one step, each generated token fed after it through the KV
cache, as the decode loop reads them), and a reference loop applying OpenAI's penalty formula to the steered logits.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from fastapi import FastAPI
from test_server_engine import engine, poisoned
from test_server_support import MODEL_NAME, make_app, make_presets, serving, serving_guard, word_tokenizer, words
from tiny_models import EOS_ID, tiny_model

from servers.jobs import Failed, Finished, GenRequest
from servers.logprobs import LOGPROB_FLOOR, TokenLogprob
from servers.sampling import SamplingParams
from steerlib import SteeringConfig, steer

PROMPT = words(10, 11, 12)
PROMPT_IDS = [10, 11, 12]


def _vector(seed: int) -> list[float]:
    return torch.randn(64, generator=torch.Generator().manual_seed(seed)).tolist()


def _add(tokens: str, coefficient: float = 4.0) -> dict[str, Any]:
    return {
        "interventions": [
            {"op": "add", "layer": 1, "vector": _vector(0), "coefficient": coefficient, "apply": {"tokens": tokens}}
        ]
    }


GENERATED = _add("generated")
"""Steers generated tokens only: its effect on log-probs shows that they are read as generated tokens."""
PROMPT_ONLY = _add("prompt")
"""Steers prompt tokens only: an echoed prompt is scored as the prompt."""


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", 3)


@pytest.fixture(scope="module")
def app(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    return make_app(make_presets(tmp_path_factory.mktemp("presets")), model, max_top_logprobs=8)


@pytest.fixture(scope="module")
def url(app: FastAPI) -> Iterator[str]:
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30, max_retries=0)


def chat_ids() -> list[int]:
    tok = word_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def steered_logprobs(
    model: torch.nn.Module, cfg: dict[str, Any] | None, prompt: Sequence[int], generated: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs over the vocabulary predicting each generated token, over each prompt position): the prompt read in
    one forward, the generated tokens fed after it through the KV cache."""
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ctx = steer(model, SteeringConfig.from_dict(cfg)) if cfg is not None else nullcontext()
    with torch.no_grad(), ctx:
        first = model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
        logits = [first.logits[0, -1:]]
        if len(generated) > 1:
            rest = model(input_ids=torch.tensor([list(generated[:-1])]), use_cache=True, **{kw: first[kw]})
            logits.append(rest.logits[0])
    gen_TV = torch.log_softmax(torch.cat(logits).float(), dim=-1)
    return gen_TV, torch.log_softmax(first.logits[0].float(), dim=-1)


def reference_greedy(
    model: torch.nn.Module, cfg: dict[str, Any] | None, prompt: Sequence[int], n: int, freq: float, pres: float
) -> list[int]:
    """OpenAI's penalties, written out: before each choice a token generated c times loses c*freq + (c>0)*pres."""
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ctx = steer(model, SteeringConfig.from_dict(cfg)) if cfg is not None else nullcontext()
    chosen: list[int] = []
    with torch.no_grad(), ctx:
        out = model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
        for _ in range(n):
            logits = out.logits[0, -1].float().clone()
            for token, c in Counter(chosen).items():
                logits[token] -= c * freq + (1.0 if c > 0 else 0.0) * pres
            chosen.append(int(logits.argmax()))
            if chosen[-1] == EOS_ID:
                break
            out = model(input_ids=torch.tensor([[chosen[-1]]]), use_cache=True, **{kw: out[kw]})
    return chosen


def token_id(text: str) -> int:
    """The word tokenizer's id of a token's text (``w{i}`` is id i; the text may start with a space)."""
    return int(text.strip().removeprefix("w"))


def close(got: Sequence[float], want: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=1e-5)


def test_chat_logprobs_are_the_steered_forward_of_the_same_tokens(
    client: openai.OpenAI, model: torch.nn.Module
) -> None:
    out = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"steering": GENERATED},
    )
    choice = out.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    ids = [token_id(c.token) for c in content]
    assert "".join(c.token for c in content) == choice.message.content
    assert [c.bytes for c in content] == [list(c.token.encode()) for c in content]
    gen_TV, _ = steered_logprobs(model, GENERATED, chat_ids(), ids)
    assert ids == gen_TV.argmax(-1).tolist()  # greedy: each token is the steered argmax
    close([c.logprob for c in content], gen_TV.gather(-1, torch.tensor(ids)[:, None])[:, 0])
    for c, row_V in zip(content, gen_TV, strict=True):
        top = [t.logprob for t in c.top_logprobs]
        assert top == sorted(top, reverse=True) and len(top) == 5
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob
        close(top, row_V.topk(5).values)
    unsteered, _ = steered_logprobs(model, None, chat_ids(), ids)
    assert (gen_TV[1:] - unsteered[1:]).abs().max() > 1e-2  # the op steers generated tokens: the check can fail
    torch.testing.assert_close(gen_TV[0], unsteered[0], rtol=0, atol=1e-5)  # and never the first prediction


def test_streamed_chat_logprobs_join_to_the_full_answers(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 7,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "extra_body": {"steering": ["push"]},
    }
    full = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, **args))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert full.choices[0].logprobs is not None
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in full.choices[0].logprobs.content or []]
    assert len(streamed) == 7


def test_completion_logprobs_when_sampling_contain_the_chosen_token_in_the_top(
    client: openai.OpenAI, model: torch.nn.Module
) -> None:
    args: dict[str, Any] = {
        "model": MODEL_NAME,
        "prompt": PROMPT_IDS,
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 3,
        "logprobs": 3,
        "extra_body": {"steering": GENERATED},
    }
    full = client.completions.create(**args)
    lp = full.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    ids = [token_id(t) for t in lp.tokens]
    assert "".join(lp.tokens) == full.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    gen_TV, _ = steered_logprobs(model, GENERATED, PROMPT_IDS, ids)
    close([float(x) for x in lp.token_logprobs], gen_TV.gather(-1, torch.tensor(ids)[:, None])[:, 0])
    in_top = 0
    for token, logprob, top, row_V in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, gen_TV, strict=True):
        assert list(top.values()) == sorted(top.values(), reverse=True) and len(top) == 3
        close(list(top.values()), row_V.topk(3).values)
        if logprob >= min(top.values()):
            assert top[token] == logprob
            in_top += 1
    assert 0 < in_top < len(lp.tokens)  # sampled: some tokens were outside the top 3, so both branches ran
    chunks = list(client.completions.create(stream=True, **args))
    joined: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            for key in joined:
                joined[key] += getattr(c.choices[0].logprobs, key)
    assert joined == lp.model_dump()


def test_echo_scores_the_prompt_as_the_prompt(url: str, model: torch.nn.Module) -> None:
    prompt = [1, *PROMPT_IDS, 20, 30]
    body = {"model": MODEL_NAME, "prompt": [prompt], "max_tokens": 0, "echo": True, "logprobs": 2}
    got = httpx.post(f"{url}/v1/completions", json=body | {"steering": PROMPT_ONLY}, timeout=30).json()
    choice = got["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (word_tokenizer().decode(prompt[1:]), "length")
    lp = choice["logprobs"]
    assert lp["tokens"] == ["<s>", "w10", " w11", " w12", " w20", " w30"]
    assert lp["text_offset"] == [0, 0, 3, 7, 11, 15]
    assert (lp["token_logprobs"][0], lp["top_logprobs"][0]) == (None, None)
    _, prompt_TV = steered_logprobs(model, PROMPT_ONLY, prompt, [])
    close(lp["token_logprobs"][1:], prompt_TV[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0])
    for top, row_V in zip(lp["top_logprobs"][1:], prompt_TV, strict=False):
        close(list(top.values()), row_V.topk(2).values)
    assert got["usage"] == {"prompt_tokens": 6, "completion_tokens": 0, "total_tokens": 6}
    plain = httpx.post(f"{url}/v1/completions", json=body | {"steering": []}, timeout=30).json()
    assert plain["choices"][0]["logprobs"]["token_logprobs"][1:] != lp["token_logprobs"][1:]
    # lm-eval's request: echo with one generated token; the prompt's entries are the same, one more at the end
    one = httpx.post(f"{url}/v1/completions", json=body | {"max_tokens": 1, "steering": PROMPT_ONLY}, timeout=30).json()
    lp1 = one["choices"][0]["logprobs"]
    assert lp1["token_logprobs"][:-1] == lp["token_logprobs"] and len(lp1["tokens"]) == len(prompt) + 1
    assert one["choices"][0]["text"] == choice["text"] + lp1["tokens"][-1]


@pytest.mark.parametrize(
    ("freq", "pres", "preset"), [(1.5, 0.0, "push"), (0.0, 2.0, "push"), (0.7, 0.4, None), (-2.0, -1.0, None)]
)
def test_penalties_change_greedy_decoding_as_openais_formula(
    client: openai.OpenAI, model: torch.nn.Module, freq: float, pres: float, preset: str | None
) -> None:
    def run(f: float, p: float) -> str:
        out = client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT_IDS,
            max_tokens=16,
            temperature=0,
            frequency_penalty=f,
            presence_penalty=p,
            extra_body={"steering": [preset] if preset else []},
        )
        return out.choices[0].text

    push = {"interventions": [{"op": "add", "layer": 1, "vector": _push_vector(), "coefficient": 2.0}]}
    want = reference_greedy(model, push if preset else None, PROMPT_IDS, 16, freq, pres)
    assert run(freq, pres) == word_tokenizer().decode(want, skip_special_tokens=True)
    assert run(freq, pres) != run(0.0, 0.0)  # the penalties matter for this prompt: the check can fail


def _push_vector() -> list[float]:
    """The ``push`` preset's vector (``make_presets``: the first draw of a generator seeded 1, times 3)."""
    return (torch.randn(64, generator=torch.Generator().manual_seed(1)) * 3).tolist()


CHAT: dict[str, Any] = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}
TEXT: dict[str, Any] = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 9}, "top_logprobs"),
        ("/v1/chat/completions", CHAT | {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", CHAT | {"frequency_penalty": 2.5}, "frequency_penalty"),
        ("/v1/chat/completions", CHAT | {"presence_penalty": -2.01}, "presence_penalty"),
        ("/v1/chat/completions", CHAT | {"max_tokens": 0, "logprobs": True}, "max_tokens"),
        ("/v1/completions", TEXT | {"logprobs": 9}, "logprobs"),
        ("/v1/completions", TEXT | {"logprobs": -1}, "logprobs"),
        ("/v1/completions", TEXT | {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", TEXT | {"echo": True, "stream": True}, "echo"),
        ("/v1/completions", TEXT | {"presence_penalty": 3}, "presence_penalty"),
        ("/v1/completions", TEXT | {"prompt": [[10, 11], [12]]}, "prompt"),
    ],
)
def test_bad_values_are_400s_naming_the_field(url: str, path: str, body: dict[str, Any], field: str) -> None:
    r = httpx.post(f"{url}{path}", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"], err


def test_echo_in_a_batch_of_different_lengths_is_each_prompts_own_forward(url: str, model: torch.nn.Module) -> None:
    prompts = [[1, 10, 11], [1, *range(20, 32)], [1, 40, 41, 42, 43, 44]]
    steering: list[Any] = [PROMPT_ONLY, [], ["push"]]
    configs = [
        PROMPT_ONLY,
        None,
        {"interventions": [{"op": "add", "layer": 1, "vector": _push_vector(), "coefficient": 2.0}]},
    ]

    async def together() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            bodies = [
                {"model": MODEL_NAME, "prompt": p, "max_tokens": 0, "echo": True, "logprobs": 0, "steering": s}
                for p, s in zip(prompts, steering, strict=True)
            ]
            return [r.json() for r in await asyncio.gather(*[c.post("/v1/completions", json=b) for b in bodies])]

    for out, prompt, cfg in zip(asyncio.run(together()), prompts, configs, strict=True):
        lp = out["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(prompt) and lp["top_logprobs"][1:] == [{}] * (len(prompt) - 1)
        _, prompt_TV = steered_logprobs(model, cfg, prompt, [])
        close(lp["token_logprobs"][1:], prompt_TV[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0])


def test_refused_rows_report_the_forced_distribution(tmp_path: Path) -> None:
    message = "w100 w101 w102"
    with serving_guard(tmp_path, message) as base:
        body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 6, "logprobs": 2, "steering": ["guard"]}
        out = httpx.post(f"{base}/v1/completions", json=body, timeout=30).json()
    lp = out["choices"][0]["logprobs"]
    assert out["choices"][0]["text"] == message
    assert lp["tokens"] == ["w100", " w101", " w102", "</s>"]  # the message, then the end of turn
    assert lp["token_logprobs"] == [0.0] * 4
    assert [list(t.values()) for t in lp["top_logprobs"]] == [[0.0, LOGPROB_FLOOR]] * 4


def test_logprob_events_are_not_sent_twice_when_a_failed_batch_is_rerun() -> None:
    """The batch fails after every row streamed its first token (``poisoned``); the re-run rows send each token's
    log-probability once, as alone."""
    model = tiny_model("llama", 3)
    prompts = [[1, 2, 10, 11, 3], [1, 2, 40, 3], [1, 2, 50, 51, 52, 3]]
    params = [
        SamplingParams(0.0, 1.0, None, 6, logprobs=2, presence_penalty=1.0),
        SamplingParams(0.9, 1.0, 5, 6, logprobs=0, frequency_penalty=0.5),
        SamplingParams(0.0, 1.0, None, 6, logprobs=1),
    ]

    async def events(req: GenRequest) -> list[Any]:
        return [e async for e in req.events()]

    async def run() -> tuple[list[list[Any]], list[list[Any]]]:
        e = engine(model, max_batch=8, batch_wait_s=0.2)
        e.start()
        loop = asyncio.get_running_loop()
        solo = []
        for p, sp in zip(prompts, params, strict=True):
            r = GenRequest(p, None, sp, loop)
            e.submit(r)
            solo.append(await events(r))
        together = [GenRequest(p, None, sp, loop) for p, sp in zip(prompts, params, strict=True)]
        together[2].steering = poisoned()
        for r in together:
            e.submit(r)
        ends = [await events(r) for r in together]
        await e.shutdown(grace_s=5)
        return solo, ends

    solo, ends = asyncio.run(run())
    assert isinstance(ends[2][-1], Failed)
    for alone, rerun in zip(solo[:2], ends[:2], strict=True):
        fin = rerun[-1]
        assert isinstance(fin, Finished) and fin.completion_tokens == 6
        streamed = [e for e in rerun if isinstance(e, TokenLogprob)]
        assert [e.token for e in streamed] == [e.token for e in fin.logprobs] == [e.token for e in alone[-1].logprobs]
        assert [type(e) for e in rerun] == [type(e) for e in alone]  # the same events in the same order
        close([e.logprob or 0.0 for e in streamed], torch.tensor([e.logprob or 0.0 for e in alone[-1].logprobs]))
