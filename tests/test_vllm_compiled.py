"""steerlib in vLLM's compiled mode (torch.compile, the default): the site ops survive compilation.

Starts its own engine without ``enforce_eager`` (compilation takes minutes on 2 cores the first time; vLLM caches
the compiled graph under ~/.cache/vllm afterwards) and checks steered and unsteered greedy answers against HF.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: see steerlib/vllm/install.sh")

from test_vllm_steering import (
    PROMPTS,
    _unit,
    hf_greedy,
    prompt_ids,
    start_engine,
    stop_engine,
    vllm_greedy,
)

import steerlib

pytestmark = pytest.mark.real_model


def test_compiled_mode_steers_like_hf() -> None:
    hf: tuple[Any, Any] = steerlib.load_model()
    cfg = {"interventions": [{"op": "add", "layer": 10, "vector": _unit(0, 24.0), "apply": {"tokens": "generated"}}]}
    ids = [prompt_ids(hf[1], p) for p in PROMPTS]
    llm = start_engine(enforce_eager=False)
    try:
        got = vllm_greedy(llm, ids + ids, [cfg, cfg, None, None])
    finally:
        stop_engine(llm)
    want = [hf_greedy(hf, i, cfg) for i in ids] + [hf_greedy(hf, i, None) for i in ids]
    assert [list(o.token_ids) for o in got] == want
    assert want[:2] != want[2:]
