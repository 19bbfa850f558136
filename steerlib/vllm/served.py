"""What steering needs to know of the model vLLM serves, read from vLLM's config: its shape and its tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from steerlib.plan import ModelSpec


def model_spec(vllm_config: Any, device: torch.device) -> ModelSpec:
    """What a plan is checked against, from vLLM's config of the served model."""
    hf = vllm_config.model_config.hf_config
    return ModelSpec(
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        device=device,
        dtype=vllm_config.model_config.dtype,
        name=vllm_config.model_config.model,
    )


def tokenizer_loader(vllm_config: Any) -> Callable[[], Any]:
    """Loads the served model's tokenizer (transformers), the first time steering needs it."""
    mc = vllm_config.model_config

    def load() -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            mc.tokenizer, revision=mc.tokenizer_revision, trust_remote_code=mc.trust_remote_code
        )

    return load
