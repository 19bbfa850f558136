"""Steerable vLLM decoder layers: every site of every layer passes through ``torch.ops.steerlib.site``.

The op is a registered torch custom op with a fake (shape-only) implementation, so ``torch.compile`` (vLLM's
compiled mode) keeps it in the graph as an opaque call instead of tracing into it: the compiled graph calls back
into Python each step and reads that step's per-token jobs from :mod:`steerlib.vllm.state`. (A forward hook added
after loading would be dropped by compilation; a layer built with the op from the start is not.) With no steered
request in the step the op is a copy. The op writes into an output buffer the layer allocates just before it, so
that under piecewise CUDA graphs, where the op is a splitting op run eagerly between captured pieces, its result
sits where the next piece was captured to read it (see :mod:`steerlib.vllm.compilation`).

The model class subclasses vLLM's own and passes a layer type, so parameter names and weight loading are vLLM's.
The step layout is read in the (uncompiled) outer ``forward`` from the forward context's attention metadata.
"""

from typing import Any, Optional

import torch
from torch import Tensor
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from steerlib.sites import SITES
from steerlib.vllm import state as steering_state
from steerlib.vllm.state import SteeringState, model_spec, tokenizer_loader

_SITE_ID = {name: i for i, name in enumerate(SITES)}


@torch.library.custom_op("steerlib::site", mutates_args=("out",))
def site_op(
    x: Tensor,
    other: Optional[Tensor],  # noqa: UP045 (custom_op reads the annotation)
    out: Tensor,
    layer: int,
    site: int,
) -> None:
    """Write the steered ``x`` at ``(layer, SITES[site])`` for the current step into ``out`` (``x`` unsteered)."""
    st = steering_state.current()
    out.copy_(x if st is None else st.run(layer, SITES[site], x, other))


@site_op.register_fake
def _site_fake(
    x: Tensor,
    other: Optional[Tensor],  # noqa: UP045
    out: Tensor,
    layer: int,
    site: int,
) -> None:
    return None


def _site(x: Tensor, other: Tensor | None, layer: int, site: str) -> Tensor:
    out = torch.empty_like(x)  # allocated inside the compiled piece before the op: a stable address under graphs
    torch.ops.steerlib.site(x, other, out, layer, _SITE_ID[site])
    return out


class SteerableLlamaDecoderLayer(LlamaDecoderLayer):
    """``LlamaDecoderLayer`` with the five sites (resid_pre, attn_out, mlp_in, mlp_out, resid_post)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steer_layer = extract_layer_index(kwargs.get("prefix", args[1] if len(args) > 1 else ""))

    def forward(self, positions: Tensor, hidden_states: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        L = self.steer_layer
        hidden_states = _site(hidden_states, residual, L, "resid_pre")
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states = _site(hidden_states, None, L, "attn_out")
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        mlp_in = _site(hidden_states, None, L, "mlp_in")
        hidden_states = _site(self.mlp(mlp_in), mlp_in, L, "mlp_out")
        return _site(hidden_states, residual, L, "resid_post"), residual


class SteerableLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's ``LlamaForCausalLM`` built from steerable layers; describes each step before running it."""

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        kwargs.setdefault("layer_type", SteerableLlamaDecoderLayer)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        spec = model_spec(vllm_config, torch.device(vllm_config.device_config.device))
        capacity = vllm_config.scheduler_config.max_num_seqs
        steering_state.install(SteeringState(spec, capacity, load_tokenizer=tokenizer_loader(vllm_config)))

    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        st = steering_state.current()
        if st is not None and st.rows:
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
