"""How steering stays right under vLLM's CUDA graphs: the site op runs between captured pieces, never inside one.

vLLM captures the model's forward in CUDA graphs on a GPU: piecewise graphs (the compiled model split at its
"splitting ops", attention by default, each piece captured and the splitting ops run eagerly between them) and, by
default, full graphs of whole decode steps. A captured kernel sequence is replayed without running Python, so an op
whose work depends on the step (which requests are steered, with what, which tokens are prompt) would be frozen at
whatever the capture saw. steerlib's site op (``steerlib::site``) is such an op, so:

- it is a splitting op (:func:`compilation_config` adds it to vLLM's own list): it runs eagerly each step between
  the captured pieces, and writes its result into an output buffer allocated inside the preceding piece (as vLLM's
  ``unified_attention_with_output`` does), so the next piece finds it at the address it was captured with;
- full graphs are turned off (``cudagraph_mode: PIECEWISE``): a full graph would capture the eager op too, and the
  outer ``forward`` that describes each step to the op.

The cost: each site of each layer ends a captured piece, so a step launches more graphs and runs the site op's
Python (a copy when no request is steered). :func:`unsafe_reason` tells a running engine whether its compilation
config is graph-safe for steering; steered requests are refused on an engine where it is not, never served
unsteered.
"""

from __future__ import annotations

from typing import Any

SITE_OP = "steerlib::site"
"""The custom op every steerable decoder layer calls at each of its sites (``steerlib.vllm.layers``)."""

_KV_UPDATE_OPS = ("vllm::unified_kv_cache_update", "vllm::unified_mla_kv_cache_update")
"""Splitting ops vLLM adds to its default list (when none is given) besides its attention ops."""


def default_splitting_ops() -> list[str]:
    """vLLM's own splitting ops (its attention ops and KV-cache updates), as it would choose them."""
    from vllm.config import CompilationConfig

    return [*getattr(CompilationConfig, "_attention_ops", []), *_KV_UPDATE_OPS]


def compilation_config(base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``compilation_config`` for ``vllm.LLM`` / ``--compilation-config`` under which steering is graph-safe:
    ``base`` (the user's own settings) with the site op among the splitting ops and piecewise CUDA graphs only."""
    cfg = dict(base or {})
    ops = list(cfg.get("splitting_ops") or default_splitting_ops())
    if SITE_OP not in ops:
        ops.append(SITE_OP)
    mode = str(cfg.get("cudagraph_mode", "PIECEWISE")).upper()
    cfg.update(splitting_ops=ops, cudagraph_mode="NONE" if mode == "NONE" else "PIECEWISE")
    return cfg


def unsafe_reason(compilation: Any) -> str | None:
    """Why steering would be frozen by CUDA graphs under vLLM's resolved ``CompilationConfig``, or None if it is
    graph-safe (no CUDA graphs at all, or piecewise graphs split at the site op)."""
    mode = getattr(compilation, "cudagraph_mode", None)
    if mode is None or not bool(mode):  # CUDAGraphMode.NONE is falsy; CPU engines capture nothing
        return None
    if mode.has_full_cudagraphs():
        return (
            f"this engine captures full CUDA graphs (cudagraph_mode {mode.name}), which would replay steering frozen; "
            "start it with steerlib.vllm.engine_kwargs() (or serve_args()), which sets cudagraph_mode PIECEWISE"
        )
    if SITE_OP not in (getattr(compilation, "splitting_ops", None) or []):
        return (
            f"this engine captures piecewise CUDA graphs without splitting at {SITE_OP}, which would replay steering "
            "frozen; start it with steerlib.vllm.engine_kwargs() (or serve_args())"
        )
    return None
