"""steerlib inside vLLM (CPU): parity with steerlib-on-HF and per-request isolation, on the embedded model.

Runs in the vLLM venv (``steerlib/vllm/install.sh``): ``/opt/vllm-venv/bin/python -m pytest tests/test_vllm_*.py``.
Elsewhere ``tests/test_vllm_venv.py`` runs this file in that venv, or skips when there is none. One eager engine is
shared by the module (prefix caching on, as by default); ``test_vllm_compiled.py`` checks compiled mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here: see steerlib/vllm/install.sh")

import steerlib  # noqa: E402
from steerlib.hf.refusal import ForcedRefusal  # noqa: E402
from steerlib.mlp_probe import MlpProbe  # noqa: E402
from steerlib.sae import ReluSae, SaeMeta, save_sae  # noqa: E402
from steerlib.vectors import SteeringVector  # noqa: E402
from steerlib.vllm import ROOT_ENV, engine_kwargs, steering_args  # noqa: E402

pytestmark = pytest.mark.real_model

N_NEW = 12
PROMPTS = ["What is a good hobby to pick up this year?", "Give me three tips for a job interview."]
D = 576


def _unit(seed: int, norm: float) -> list[float]:
    v = torch.randn(D, generator=torch.Generator().manual_seed(seed))
    return (v / v.norm() * norm).tolist()


def start_engine(**overrides: Any) -> Any:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from steerlib.hf.loading import embedded_model_folder

    kwargs: dict[str, Any] = {
        "dtype": "float32",
        "max_model_len": 512,
        "enforce_eager": True,
        "seed": 0,
        "enable_prefix_caching": True,
        **engine_kwargs(),
    }
    kwargs.update(overrides)
    return vllm.LLM(str(embedded_model_folder()), **kwargs)


def stop_engine(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _steering_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Requests may name the test's files: the operator's steering root is the tests' temporary folder."""
    os.environ[ROOT_ENV] = str(tmp_path_factory.getbasetemp().resolve())
    yield
    os.environ.pop(ROOT_ENV, None)


@pytest.fixture(scope="module")
def hf() -> tuple[Any, Any]:
    return steerlib.load_model()


@pytest.fixture(scope="module")
def llm() -> Iterator[Any]:
    engine = start_engine()
    try:
        yield engine
    finally:
        stop_engine(engine)


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory, hf: tuple[Any, Any]) -> dict[str, dict[str, Any]]:
    """Each config changes the embedded model's greedy answers (checked in the parity test)."""
    sae = ReluSae(SaeMeta("relu", D, 32, D))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, 32, generator=g) / D**0.5)
        sae.W_dec.copy_(torch.randn(32, D, generator=g) * 3.0)
    folder = tmp_path_factory.mktemp("sae") / "relu"
    save_sae(sae, folder)
    mlp_when = _mlp_fires_on_first_prompt(hf, tmp_path_factory.mktemp("probe") / "mlp.safetensors")
    add = {"op": "add", "layer": 10, "vector": _unit(0, 24.0)}
    return {
        "add": {"interventions": [add]},
        "add_prompt": {"interventions": [{**add, "coefficient": 2.0, "apply": {"tokens": "prompt"}}]},
        "add_generated": {"interventions": [{**add, "coefficient": 2.0, "apply": {"tokens": "generated"}}]},
        "ablate": {"interventions": [{"op": "ablate", "layer": "all", "vector": _mean_direction(hf, 6)}]},
        "sae": {
            "interventions": [
                {
                    "op": "sae",
                    "layer": 8,
                    "site": "resid_post",
                    "sae": str(folder),
                    "edits": [{"feature": 5, "mode": "set", "value": 6.0}],
                }
            ]
        },
        "match": {"interventions": [{**add, "coefficient": 2.0, "apply": {"match": ["the", "a", "to", "you"]}}]},
        "refuse": {
            "interventions": [
                {**add, "coefficient": 0.5},
                {"op": "refuse", "layer": 12, "message": "Sorry, no.", "apply": {"when": _fires_on_first_prompt(hf)}},
            ]
        },
        "refuse_mlp": {
            "interventions": [
                {**add, "coefficient": 0.5},
                {"op": "refuse", "layer": 12, "message": "Sorry, no.", "apply": {"when": mlp_when}},
            ]
        },
        "refuse_prefill": {
            "interventions": [
                {**add, "coefficient": 0.5},
                {
                    "op": "refuse",
                    "layer": 12,
                    "message": "Sorry, no.",
                    "mode": "prefill",
                    "apply": {"when": _fires_on_first_prompt(hf)},
                },
            ]
        },
        "sites": {
            "interventions": [
                {"op": "add", "layer": 4, "site": "attn_out", "vector": _unit(1, 12.0)},
                {"op": "add", "layer": 5, "site": "mlp_out", "vector": _unit(2, 12.0), "apply": {"window": [3, 30]}},
                {"op": "add", "layer": 6, "site": "resid_pre", "vector": _unit(4, 12.0)},
            ]
        },
    }


def _fires_on_first_prompt(hf: tuple[Any, Any], layer: int = 12) -> dict[str, Any]:
    """A prompt-scoped condition that fires on the first prompt (chat template) and not on the second."""
    model, tok = hf
    last = []
    for p in PROMPTS:
        with torch.no_grad():
            h = model(torch.tensor([prompt_ids(tok, p)]), output_hidden_states=True).hidden_states[layer + 1]
        last.append(h[0, -1])
    v = last[0] - last[1]
    mid = float((last[0] @ v + last[1] @ v) / 2)
    return {"vector": v.tolist(), "metric": "dot", "above": mid, "scope": "prompt"}


def _mlp_fires_on_first_prompt(hf: tuple[Any, Any], path: Path, layer: int = 12) -> dict[str, Any]:
    """A condition on a one-unit MLP probe of the mean prompt activation that fires on the first prompt only."""
    model, tok = hf
    means = []
    for p in PROMPTS:
        with torch.no_grad():
            h = model(torch.tensor([prompt_ids(tok, p)]), output_hidden_states=True).hidden_states[layer + 1]
        means.append(h[0].mean(0))
    u = (means[0] - means[1]) / (means[0] - means[1]).norm()
    mid = float((means[0] @ u + means[1] @ u) / 2)
    margin = float(means[0] @ u) - mid  # relu(u·x - mid) is this on the first prompt, 0 on the second
    MlpProbe(u[None], torch.tensor([-mid]), torch.ones(1), torch.tensor(0.0)).save(path)
    return {"probe": str(path), "above": margin / 2, "scope": "prompt", "aggregate": "mean"}


def _mean_direction(hf: tuple[Any, Any], layer: int) -> list[float]:
    """The mean residual direction at ``layer``: projecting it out everywhere changes the answers."""
    model, tok = hf
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[layer]
    return h[0].mean(0).tolist()


def prompt_ids(tok: Any, prompt: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False).input_ids)


def hf_greedy(hf: tuple[Any, Any], ids: list[int], cfg: dict[str, Any] | None) -> list[int]:
    model, tok = hf
    x = torch.tensor([ids])
    with torch.no_grad():
        if cfg is None:
            out = model.generate(x, max_new_tokens=N_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
        else:
            with steerlib.steer(model, steerlib.SteeringConfig.from_dict(cfg), tokenizer=tok) as handle:
                forced = [ForcedRefusal(handle, tok)]
                out = model.generate(
                    x, max_new_tokens=N_NEW, do_sample=False, pad_token_id=tok.pad_token_id, logits_processor=forced
                )
    return [int(t) for t in out[0, len(ids) :]]


def vllm_greedy(llm: Any, prompts: list[list[int]], cfgs: list[dict[str, Any] | None]) -> list[Any]:
    """The first completion of each request (``vllm_requests`` for the whole ``RequestOutput``)."""
    return [o.outputs[0] for o in vllm_requests(llm, prompts, cfgs)]


def vllm_requests(llm: Any, prompts: list[list[int]], cfgs: list[dict[str, Any] | None]) -> list[Any]:
    params = [
        vllm.SamplingParams(
            temperature=0.0,
            max_tokens=N_NEW,
            extra_args=None if c is None else steering_args(steerlib.SteeringConfig.from_dict(c)),
        )
        for c in cfgs
    ]
    return list(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))


NAMES = ["add", "add_prompt", "add_generated", "ablate", "sae", "sites", "match"]
NAMES += ["refuse", "refuse_mlp", "refuse_prefill"]


@pytest.mark.parametrize("name", NAMES)
def test_greedy_parity_with_hf(name: str, llm: Any, hf: tuple[Any, Any], configs: dict[str, Any]) -> None:
    cfg = configs[name]
    ids = [prompt_ids(hf[1], p) for p in PROMPTS]
    got = [list(o.token_ids) for o in vllm_greedy(llm, ids, [cfg] * len(ids))]
    want = [hf_greedy(hf, i, cfg) for i in ids]
    plain = [hf_greedy(hf, i, None) for i in ids]
    assert got == want
    assert want != plain, f"config {name} does not change the answers, so parity would prove nothing"


def test_unsteered_parity_with_hf(llm: Any, hf: tuple[Any, Any]) -> None:
    ids = [prompt_ids(hf[1], p) for p in PROMPTS]
    got = [list(o.token_ids) for o in vllm_greedy(llm, ids, [None] * len(ids))]
    assert got == [hf_greedy(hf, i, None) for i in ids]


def test_prompt_and_generated_policies_split_the_steering(llm: Any, hf: tuple[Any, Any], configs: Any) -> None:
    """Generated-only leaves the first new token alone (it is predicted from the prompt); prompt-only does not."""
    ids = [prompt_ids(hf[1], PROMPTS[0])]
    plain = vllm_greedy(llm, ids, [None])[0].token_ids
    gen = vllm_greedy(llm, ids, [configs["add_generated"]])[0].token_ids
    assert gen[0] == plain[0] and list(gen) != list(plain)


SYSTEM = (
    "You are a careful assistant. " * 40
    + "Answer briefly, in plain words, and say so when you do not know. Never invent facts or sources."
)


def test_mixed_batch_isolation_with_prefix_cache(llm: Any, hf: tuple[Any, Any], configs: Any) -> None:
    """Steered, differently steered and unsteered requests in one batch each get what they get alone.

    A long shared system prompt makes the requests share full KV blocks, so a cache keyed only on tokens would
    hand steered requests unsteered KV (and the reverse).
    """
    tok = hf[1]
    ids = [prompt_ids(tok, p, SYSTEM) for p in PROMPTS]
    cases: list[tuple[list[int], dict[str, Any] | None]] = [
        (i, c) for i in ids for c in (None, configs["add"], configs["sae"], configs["add_generated"], None)
    ]
    alone = [vllm_requests(llm, [i], [c])[0] for i, c in cases]  # unsteered first: its blocks get cached
    mixed = vllm_greedy(llm, [i for i, _ in cases], [c for _, c in cases])
    assert [list(o.token_ids) for o in mixed] == [list(o.outputs[0].token_ids) for o in alone]
    assert len({tuple(o.outputs[0].token_ids) for o in alone[:4]}) >= 3  # the settings mostly answer differently
    # The cache is on and used (the repeated unsteered prompt hits it), but never across steerings: the first
    # steered request after the unsteered ones found nothing, a repeat of the same steering does.
    assert alone[4].num_cached_tokens > 0 and alone[1].num_cached_tokens == 0
    assert vllm_requests(llm, [ids[0]], [configs["add"]])[0].num_cached_tokens > 0


def test_bad_config_is_rejected_before_it_runs(llm: Any, hf: tuple[Any, Any]) -> None:
    ids = [prompt_ids(hf[1], PROMPTS[0])]
    bad = vllm.SamplingParams(max_tokens=2, extra_args={"steering": {"interventions": [{"op": "add", "layer": 1}]}})
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="vector"):
        llm.generate([{"prompt_token_ids": ids[0]}], [bad], use_tqdm=False)
    # The engine is still serving.
    assert len(vllm_greedy(llm, ids, [None])[0].token_ids) > 0


def test_config_that_does_not_fit_the_model_fails_alone(
    llm: Any, hf: tuple[Any, Any], configs: dict[str, Any], tmp_path: Path
) -> None:
    """Well-formed configs the model cannot take (layer 99 of 30, a 7-wide vector, a missing file) finish with
    ``finish_reason="error"`` and no tokens; the requests batched with them get their own outputs; the engine lives."""
    ids = [prompt_ids(hf[1], p) for p in PROMPTS]
    narrow = tmp_path / "narrow.safetensors"
    SteeringVector.single(torch.ones(7)).save(narrow)
    bad = [
        {"interventions": [{"op": "add", "layer": 99, "vector": _unit(1, 4.0)}]},
        {"interventions": [{"op": "add", "layer": 3, "vector": str(narrow)}]},
        {"interventions": [{"op": "add", "layer": 3, "vector": str(tmp_path / "missing.safetensors")}]},
    ]
    alone = [vllm_greedy(llm, [ids[0]], [configs["add"]])[0], vllm_greedy(llm, [ids[1]], [None])[0]]
    outs = vllm_greedy(llm, [ids[0], ids[0], ids[1], ids[1], ids[0]], [bad[0], configs["add"], bad[1], None, bad[2]])
    assert [o.finish_reason for o in (outs[0], outs[2], outs[4])] == ["error"] * 3
    assert [len(o.token_ids) for o in (outs[0], outs[2], outs[4])] == [0, 0, 0]
    assert list(outs[1].token_ids) == list(alone[0].token_ids)
    assert list(outs[3].token_ids) == list(alone[1].token_ids)
    # A bad request on its own also finishes (nothing else is scheduled in its step), and the engine goes on.
    assert vllm_greedy(llm, [ids[0]], [bad[0]])[0].finish_reason == "error"
    assert list(vllm_greedy(llm, [ids[0]], [configs["add"]])[0].token_ids) == list(alone[0].token_ids)


def test_import_steerlib_does_not_import_vllm() -> None:
    import subprocess
    import sys

    code = "import sys, steerlib, steerlib.vllm; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_refuse_answers_a_flagged_prompt_with_its_message(llm: Any, hf: tuple[Any, Any], configs: Any) -> None:
    ids = [prompt_ids(hf[1], p) for p in PROMPTS]
    flagged, passed = vllm_greedy(llm, ids, [configs["refuse"]] * 2)
    assert (flagged.text, flagged.finish_reason) == ("Sorry, no.", "stop")
    steered_only = {"interventions": configs["refuse"]["interventions"][:1]}
    assert list(passed.token_ids) == list(vllm_greedy(llm, [ids[1]], [steered_only])[0].token_ids)


def test_refuse_prefill_opens_with_the_message_and_the_steered_model_goes_on(
    llm: Any, hf: tuple[Any, Any], configs: Any
) -> None:
    ids = [prompt_ids(hf[1], p) for p in PROMPTS]
    flagged, passed = vllm_greedy(llm, ids, [configs["refuse_prefill"]] * 2)
    message = hf[1].encode("Sorry, no.", add_special_tokens=False)
    assert list(flagged.token_ids[: len(message)]) == message and len(flagged.token_ids) == N_NEW
    # after the message, the row is the add-steered model continuing prompt + message
    steered_only = {"interventions": configs["refuse_prefill"]["interventions"][:1]}
    rest = vllm_greedy(llm, [ids[0] + message], [steered_only])[0].token_ids
    assert list(flagged.token_ids[len(message) :]) == list(rest[: N_NEW - len(message)])
    assert list(passed.token_ids) == list(vllm_greedy(llm, [ids[1]], [steered_only])[0].token_ids)
