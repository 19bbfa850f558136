"""steerlib under vLLM tensor parallelism on CPU: three ranks (the embedded model's 9 heads and 3 KV heads split by 3).

Every rank builds the steerable layers, tracks the batch and applies the same ops to its (replicated) residual
stream; the answers must equal steerlib-on-HF's, steered per request, with a ``refuse`` detector among them (a rank
that skipped an op would compute its shard from another residual, and the all-reduced answer would differ). On this
2-core machine the three worker processes share the cores (``VLLM_CPU_OMP_THREADS_BIND=nobind``: vLLM's automatic
binding wants one NUMA node per rank).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: see steerlib/vllm/install.sh")

from test_vllm_steering import (
    PROMPTS,
    _fires_on_first_prompt,
    _unit,
    hf_greedy,
    prompt_ids,
    start_engine,
    stop_engine,
    vllm_greedy,
)

import steerlib

pytestmark = pytest.mark.real_model

TP = 3


def test_every_tensor_parallel_rank_steers_like_hf() -> None:
    hf: tuple[Any, Any] = steerlib.load_model()
    add = {"op": "add", "layer": 10, "vector": _unit(0, 24.0)}
    refuse = {"op": "refuse", "layer": 12, "message": "Sorry, no.", "apply": {"when": _fires_on_first_prompt(hf)}}
    cfgs: list[dict[str, Any] | None] = [
        {"interventions": [add]},
        {"interventions": [{"op": "ablate", "layer": "all", "vector": _unit(3, 1.0)}, {**add, "coefficient": 0.5}]},
        {"interventions": [refuse]},
        None,
    ]
    ids = [prompt_ids(hf[1], p) for p in PROMPTS]
    cases = [(i, c) for c in cfgs for i in ids]
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    try:
        llm = start_engine(tensor_parallel_size=TP)
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
    try:
        assert llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == TP
        got = [list(o.token_ids) for o in vllm_greedy(llm, [i for i, _ in cases], [c for _, c in cases])]
        refused = vllm_greedy(llm, ids[:1], [cfgs[2]])[0].text
    finally:
        stop_engine(llm)
    want = [hf_greedy(hf, i, c) for i, c in cases]
    assert got == want
    assert len({tuple(w) for w in want}) >= 5  # the configs answer differently, so parity says something
    assert refused == "Sorry, no."
