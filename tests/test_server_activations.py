"""``return_activations`` on the hf engine: what the server reads equals ``steerlib.hf.recording.record`` on the same
tokens, under the same steering, in a batch or alone; projections and probe scores are those of the raw
activations; bad requests are 400s naming the field. (The vLLM engine: ``tests/test_vllm_serving.py``.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from test_server_support import MODEL_NAME, D, make_app, make_presets, word_tokenizer
from tiny_models import tiny_model

import steerlib
from servers.activations import merge_captures
from servers.engine import Engine, EngineLimits
from servers.jobs import Finished, GenRequest
from servers.metrics import Metrics
from servers.sampling import SamplingParams
from steerlib.hf.recording import record
from steerlib.mlp_probe import load_mlp_probe
from steerlib.vectors import load_vector

PROMPT = [1, 2, 10, 11, 12, 3]  # <s> <user> w10 w11 w12 <assistant>: the chat template of "w10 w11 w12"
SITES = [(0, "resid_post"), (2, "mlp_out")]
PUSH = {"op": "add", "layer": 1, "vector": "push", "coefficient": 2.0}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", 3)


@pytest.fixture(scope="module")
def presets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_presets(tmp_path_factory.mktemp("presets"))


def recorded(model: torch.nn.Module, ids: list[int], steering: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """``record`` over one teacher-forced forward of ``ids``, under ``steering`` (a config dict) if given."""
    x = torch.tensor([ids])
    with torch.no_grad(), record(model, SITES) as rec:
        if steering is None:
            model(input_ids=x)
        else:
            with steerlib.steer(model, steerlib.SteeringConfig.from_dict(steering)):
                model(input_ids=x)
    return {f"{layer}.{site}": rec[(layer, site)] for layer, site in SITES}


def ask(client: TestClient, **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "w10 w11 w12"}], "max_tokens": 5}
    body |= {"temperature": 0} | extra
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def generated_ids(model: torch.nn.Module, n: int, steering: dict[str, Any] | None) -> list[int]:
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        if steering is None:
            out = model.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=0)
        else:
            with steerlib.steer(model, steerlib.SteeringConfig.from_dict(steering)):
                out = model.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return [int(t) for t in out[0, len(PROMPT) :]]


@pytest.mark.parametrize("steered", [False, True])
def test_raw_activations_equal_record_on_the_same_tokens(model: torch.nn.Module, presets: Path, steered: bool) -> None:
    """Every token the model read (the prompt, then each generated token but the last) at two sites."""
    steering = {"interventions": [PUSH]} if steered else None
    want_cfg = None
    if steered:
        want_cfg = {"interventions": [PUSH | {"vector": str(presets / "vectors" / "push.safetensors")}]}
    read = {"layers": [0, 2], "sites": ["resid_post", "mlp_out"], "tokens": "all", "raw": True}
    with TestClient(make_app(presets, model)) as client:
        out = ask(client, return_activations=read, **({"steering": steering} if steered else {}))
    gen = generated_ids(model, 5, want_cfg)
    assert out["usage"]["completion_tokens"] == len(gen) == 5  # the tiny model never says EOS in 5 greedy steps
    want = recorded(model, PROMPT + gen[:-1], want_cfg)
    acts = out["steering_activations"]
    assert acts["positions"] == list(range(len(PROMPT) + 4))
    got = {(s["layer"], s["site"]): torch.tensor(s["raw"]) for s in acts["sites"]}
    assert set(got) == {(0, "resid_post"), (0, "mlp_out"), (2, "resid_post"), (2, "mlp_out")}
    for layer, site in SITES:
        torch.testing.assert_close(got[(layer, site)], want[f"{layer}.{site}"], rtol=1e-4, atol=1e-5)
    if steered:  # and the steering is in them: the unsteered stream differs after layer 1
        plain = recorded(model, PROMPT + gen[:-1], None)["2.mlp_out"]
        assert not torch.allclose(got[(2, "mlp_out")], plain, atol=1e-3)


def test_token_choices_projections_and_probes_read_the_same_activations(model: torch.nn.Module, presets: Path) -> None:
    inline = torch.randn(D, generator=torch.Generator().manual_seed(3))
    base = {"layers": [1], "raw": True, "project": {"push": "push", "mine": inline.tolist()}, "probes": ["gate"]}
    with TestClient(make_app(presets, model)) as client:
        every = {t: ask(client, return_activations=base | {"tokens": t})["steering_activations"] for t in
                 ("all", "prompt", "generated", "last")}  # fmt: skip
    n = len(PROMPT)
    assert every["prompt"]["positions"] == list(range(n))
    assert every["generated"]["positions"] == list(range(n, n + 4))
    assert every["last"]["positions"] == [n - 1]
    x_all = torch.tensor(every["all"]["sites"][0]["raw"])
    for t, keep in (("prompt", slice(0, n)), ("generated", slice(n, None)), ("last", slice(n - 1, n))):
        torch.testing.assert_close(torch.tensor(every[t]["sites"][0]["raw"]), x_all[keep])
    site = every["all"]["sites"][0]
    push = load_vector(presets / "vectors" / "push.safetensors").for_layer(1)
    torch.testing.assert_close(torch.tensor(site["projections"]["push"]), x_all @ (push / push.norm()))
    torch.testing.assert_close(torch.tensor(site["projections"]["mine"]), x_all @ (inline / inline.norm()))
    probe = load_mlp_probe(presets / "probes" / "gate.safetensors")
    torch.testing.assert_close(torch.tensor(site["probes"]["gate"]), probe.scores(x_all))


def test_a_row_in_a_batch_reads_what_it_reads_alone(model: torch.nn.Module) -> None:
    """Two requests of different lengths in one left-padded batch, only one of them reading: its prompt's
    activations are those of ``record`` on its prompt alone."""
    other = [1, 2, 40, 41, 42, 43, 44, 45, 3]

    async def run() -> Finished:
        e = Engine(model, word_tokenizer(), frozenset({127}), 0, EngineLimits(max_batch=2, batch_wait_s=30), Metrics())
        loop = asyncio.get_running_loop()
        reader = GenRequest(PROMPT, None, SamplingParams(0.0, 1.0, None, 3), loop, capture=((0, "resid_post"),))
        e.submit(GenRequest(other, None, SamplingParams(0.0, 1.0, None, 3), loop))
        e.submit(reader)
        e.start()  # both wait in the queue: one full batch of two
        async for event in reader.events():
            if isinstance(event, Finished):
                await e.shutdown(grace_s=30)
                samples = {s.name: s.value for s in next(iter(e.metrics.batch_size.collect())).samples}
                assert (samples["steerlib_batch_size_count"], samples["steerlib_batch_size_sum"]) == (1, 2)
                return event
        raise AssertionError("no final event")

    fin = asyncio.run(run())
    assert fin.activations is not None
    pos, acts = fin.activations["blocks.0.hook_resid_post"]
    assert pos.tolist() == list(range(len(PROMPT) + 2))
    want = recorded(model, PROMPT, None)["0.resid_post"]
    torch.testing.assert_close(acts[: len(PROMPT)], want, rtol=1e-4, atol=1e-5)


def test_a_stream_carries_the_same_activations_in_its_last_chunk(model: torch.nn.Module, presets: Path) -> None:
    read = {"layers": [2], "tokens": "last", "raw": True, "project": {"push": "push"}}
    with TestClient(make_app(presets, model)) as client:
        plain = ask(client, return_activations=read)["steering_activations"]
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "w10 w11 w12"}], "max_tokens": 5}
        body |= {"temperature": 0, "stream": True, "return_activations": read}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["steering_activations"] == plain
    assert all("steering_activations" not in c for c in chunks if c is not final[0])


@pytest.mark.parametrize(
    ("read", "param", "words"),
    [
        ({"layers": [3]}, "layers", "layer 3 out of range"),
        ({"layers": [0], "sites": ["resid_middle"]}, None, "unknown site 'resid_middle'"),
        ({"layers": [0, 1, 2], "sites": ["resid_pre", "resid_post"], "tokens": "all", "raw": True}, "raw", "exceeds"),
        ({"layers": [0], "probes": ["nope"]}, "probes", "nope"),
        ({"layers": [0], "project": {"v": "nope"}}, "return_activations", "project.v"),
        ({"layers": [0], "project": {"v": [1.0, 2.0]}}, "return_activations", f"needs {D} finite floats"),
        ({"layers": [0], "rwa": True}, None, "rwa"),
    ],
)
def test_bad_readouts_are_400s_naming_the_field(
    model: torch.nn.Module, presets: Path, read: dict[str, Any], param: str | None, words: str
) -> None:
    with TestClient(make_app(presets, model, max_activation_floats=D * 40)) as client:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "w10"}], "max_tokens": 5}
        r = client.post("/v1/chat/completions", json=body | {"return_activations": read})
        assert r.status_code == 400 and words in r.text, r.text
        if param is not None:
            assert r.json()["error"]["param"] == param
        assert ask(client)["choices"][0]["finish_reason"] == "length"  # and it goes on serving


def test_chunks_from_an_engine_merge_in_position_order_keeping_the_last_of_a_repeat() -> None:
    """vLLM may compute a preempted request's prompt again: its chunks then repeat positions."""
    x = torch.arange(12.0).reshape(6, 2)
    chunks = [(torch.tensor([0, 1, 2]), x[:3]), (torch.tensor([3]), x[3:4]), (torch.tensor([1, 2]), x[4:6])]
    pos, acts = merge_captures(chunks)
    assert pos.tolist() == [0, 1, 2, 3]
    assert acts.tolist() == [x[0].tolist(), x[4].tolist(), x[5].tolist(), x[3].tolist()]
    empty_pos, empty_acts = merge_captures([])
    assert empty_pos.shape == (0,) and empty_acts.shape[0] == 0
