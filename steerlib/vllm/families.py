"""The vLLM model families steerlib steers, and the sites each one has.

A family is a vLLM model class (``LlamaForCausalLM`` in ``vllm/model_executor/models/llama.py``, ...) or, for
architectures vLLM runs through its Transformers backend, a transformers architecture whose own decoder layers
vLLM keeps (``Olmo2ForCausalLM``). Every architecture vLLM maps to a covered class is steerable: Mistral,
InternLM3 and TeleChat3 run vLLM's Llama class, so they are the Llama family here.

Sites are placed from the decoder layer's inputs and outputs and from its attention and MLP modules (see
``steerlib.vllm.layers``), so they mean what they mean on HF (``steerlib.hf.targets``): ``attn_out`` is the attention
module's output (before Gemma 2/3's and OLMo-2's post-attention norm), ``mlp_in``/``mlp_out`` the MLP module's
input and output (after the pre-MLP norm where there is one; OLMo-2 has none). A family lists only the sites whose
parity with steerlib-on-HF ``tests/test_vllm_families.py`` checks; a config that uses another is refused (by the
scheduler, naming the family and the site) instead of running without it.

Nothing here imports vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from steerlib.sites import SITES

RESIDUAL_SITES: tuple[str, ...] = ("resid_pre", "resid_post")
STEERABLE_PREFIX = "Steerable"
"""Name prefix of every steerable model class (vLLM reports the built class's name in ``_model_info``)."""


@dataclass(frozen=True)
class Family:
    """A model family: its name in errors, its sites, and where its decoder layer keeps attention and MLP."""

    name: str
    """Shown in errors and logs, e.g. ``"Gemma 3"``."""
    sites: tuple[str, ...] = SITES
    """The sites a steering config may use on this family."""
    attention: str = "self_attn"
    """Attribute of a decoder layer holding its attention module (``attn_out`` is that module's output)."""
    mlp: str = "mlp"
    """Attribute of a decoder layer holding its MLP (``mlp_in``/``mlp_out`` are its input and output)."""

    def missing(self, sites: Iterable[str]) -> list[str]:
        """The given sites this family does not have, in the order of ``steerlib.sites.SITES``."""
        wanted = set(sites)
        return [s for s in SITES if s in wanted and s not in self.sites]

    def check(self, sites: Iterable[str]) -> None:
        """Raise ``ValueError`` naming the family and the site if any of ``sites`` is not one of its sites."""
        missing = self.missing(sites)
        if missing:
            what = f"site {missing[0]} is" if len(missing) == 1 else f"sites {', '.join(missing)} are"
            raise ValueError(f"{what} not available on {self.name} models in vLLM; it has {', '.join(self.sites)}")


NATIVE: dict[tuple[str, str], Family] = {
    ("llama", "LlamaForCausalLM"): Family("Llama"),
    ("mistral", "MistralForCausalLM"): Family("Mistral"),
    ("phi3", "Phi3ForCausalLM"): Family("Phi-3"),
    ("qwen2", "Qwen2ForCausalLM"): Family("Qwen2"),
    ("qwen3", "Qwen3ForCausalLM"): Family("Qwen3"),
    ("gemma2", "Gemma2ForCausalLM"): Family("Gemma 2"),
    ("gemma3", "Gemma3ForCausalLM"): Family("Gemma 3"),
    ("granite", "GraniteForCausalLM"): Family("Granite"),
    # Mixture of experts: the residual stream only (the expert block is fused differently on each backend).
    ("qwen2_moe", "Qwen2MoeForCausalLM"): Family("Qwen2-MoE", RESIDUAL_SITES),
    ("mixtral", "MixtralForCausalLM"): Family("Mixtral", RESIDUAL_SITES, mlp="block_sparse_moe"),
}
"""vLLM's own model classes, by (module under ``vllm.model_executor.models``, class name)."""

TRANSFORMERS_BACKEND: dict[str, Family] = {
    "Olmo2ForCausalLM": Family("OLMo-2"),
}
"""Architectures vLLM runs through its Transformers backend, whose decoder layers are transformers' own."""


def steerable_architectures(vllm_models: Mapping[str, tuple[str, str]]) -> dict[str, tuple[tuple[str, str], Family]]:
    """Architecture -> (its vLLM (module, class), family), from vLLM's table of text-generation models
    (``vllm.model_executor.models.registry._TEXT_GENERATION_MODELS``) and the Transformers-backend families."""
    out = {arch: (where, NATIVE[where]) for arch, where in vllm_models.items() if where in NATIVE}
    out |= {arch: (("transformers", "TransformersForCausalLM"), fam) for arch, fam in TRANSFORMERS_BACKEND.items()}
    return out
