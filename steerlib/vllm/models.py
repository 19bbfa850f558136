"""Steerable vLLM model classes, made on demand from vLLM's own: ``steerlib.vllm.models:<Architecture>``.

The plugin registers ``steerlib.vllm.models:Qwen2ForCausalLM`` (and so on) with vLLM's ``ModelRegistry``, lazily:
vLLM imports this module and reads the attribute only when it builds (or inspects) such a model, and the module's
``__getattr__`` then derives the class from the class vLLM itself would use for that architecture (read from vLLM's
own table, not from its registry, which by then points here). The derived class:

- builds the model exactly as vLLM's class does, then gives its decoder layers their steerable classes
  (:func:`steerlib.vllm.layers.make_steerable`) and installs the worker's :class:`~steerlib.vllm.state.SteeringState`;
- describes each step to the sites before running it, from the forward context's attention metadata, in its
  (uncompiled) outer ``forward``.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from vllm.forward_context import get_forward_context

from steerlib.vllm import state as steering_state
from steerlib.vllm.families import STEERABLE_PREFIX, Family, steerable_architectures
from steerlib.vllm.layers import make_steerable
from steerlib.vllm.served import model_spec, tokenizer_loader
from steerlib.vllm.state import SteeringState


class _SteerableModel(nn.Module):
    """Mixed in before a vLLM causal-LM class."""

    steer_family: ClassVar[Family]

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        n_layers = vllm_config.model_config.hf_config.get_text_config().num_hidden_layers
        make_steerable(self, self.steer_family, n_layers)
        spec = model_spec(vllm_config, torch.device(vllm_config.device_config.device))
        capacity = vllm_config.scheduler_config.max_num_seqs
        load = tokenizer_loader(vllm_config)
        steering_state.install(SteeringState(spec, capacity, load_tokenizer=load, family=self.steer_family))

    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        st = steering_state.current()
        if st is not None and st.active:
            st.begin_step(input_ids, positions, _query_start_loc())
        elif st is not None:
            st.begin_step(None, positions, positions.new_zeros(1))
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


def _query_start_loc() -> Tensor:
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):
        raise RuntimeError("steerlib: micro-batched (ubatch) steps are not supported")
    for m in (meta or {}).values():
        qsl = getattr(m, "query_start_loc_cpu", None)
        qsl = getattr(m, "query_start_loc", None) if qsl is None else qsl
        if qsl is not None:
            return qsl
    raise RuntimeError("steerlib: the step's attention metadata has no query_start_loc")


@functools.cache
def steerable_model_class(module: str, cls_name: str, family: Family) -> type[nn.Module]:
    """The steerable class derived from ``vllm.model_executor.models.<module>.<cls_name>``."""
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), cls_name)
    name = f"{STEERABLE_PREFIX}{base.__name__}"
    attrs = {"__module__": __name__, "__qualname__": name, "steer_family": family}
    return type(name, (_SteerableModel, base), attrs)


def vllm_architectures() -> dict[str, tuple[tuple[str, str], Family]]:
    """Every steerable architecture: its vLLM (module, class) and family, read from vLLM's own table."""
    from vllm.model_executor.models import registry

    return steerable_architectures(registry._TEXT_GENERATION_MODELS)


def __getattr__(arch: str) -> type[nn.Module]:
    """``steerlib.vllm.models.Qwen2ForCausalLM`` is the steerable class vLLM builds for that architecture."""
    known = vllm_architectures()
    if arch not in known:
        raise AttributeError(f"module {__name__!r} has no attribute {arch!r} (steerable: {', '.join(sorted(known))})")
    (module, cls_name), family = known[arch]
    return steerable_model_class(module, cls_name, family)
