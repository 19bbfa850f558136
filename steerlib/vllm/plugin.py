"""The ``vllm.general_plugins`` entry point: makes vLLM build steerable Llama-family models.

vLLM calls :func:`register` in every process it starts (front end, engine core, workers) before any model is
built, so the decoder layers exist with their steering sites from the start and are compiled with them
(``torch.compile`` traces ``torch.ops.steerlib.site`` as an opaque op, see ``steerlib.vllm.layers``). Registering
the same architecture again is harmless: vLLM may load plugins more than once.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

STEERABLE = {"LlamaForCausalLM": "steerlib.vllm.layers:SteerableLlamaForCausalLM"}
"""Architectures whose vLLM model class is replaced by a steerable subclass (same weights, same names)."""


def register() -> None:
    """Register the steerable model classes with vLLM's ``ModelRegistry`` (lazily: imported when a model is built)."""
    from vllm import ModelRegistry

    for arch, target in STEERABLE.items():
        ModelRegistry.register_model(arch, target)
    log.debug("steerlib: steerable architectures registered: %s", ", ".join(STEERABLE))
