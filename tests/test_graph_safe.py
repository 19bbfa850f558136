"""CPU stand-ins for what a GPU would catch: the site computation is graph-safe, and steering runs on the meta device.

``torch.compile(fullgraph=True)`` refuses a host sync (``bool(t)``, ``.item()``, ``.tolist()``) and a Python branch
on tensor data, exactly what a captured CUDA graph cannot replay. The compiled site computation is fed new step
tensors on every call, while the gates' per-row buffers are written in place, and must give what eager mode gives.
The ``meta`` device holds no data: a tensor made without ``device=`` lands on the CPU and mixing it with a meta
tensor fails, as a CPU tensor mixed with CUDA ones would on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_sae_ops import make_sae
from tiny_models import tiny_model, word_tokenizer
from torch import Tensor

from steerlib import SteeringConfig, attach, steer
from steerlib.mlp_probe import MlpProbe
from steerlib.plan import ModelSpec, build_plan
from steerlib.run_state import RunState
from steerlib.runner import run_site
from steerlib.tokens import TokenBatch

D = 64
R = 3


def _config(tmp_path: Path) -> SteeringConfig:
    make_sae(tmp_path / "sae", "topk", k=8)
    g = torch.Generator().manual_seed(3)
    MlpProbe(torch.randn(8, D, generator=g), torch.randn(8, generator=g), torch.randn(8, generator=g),
             torch.tensor(0.1)).save(tmp_path / "probe.safetensors")  # fmt: skip
    probe = (torch.randn(D, generator=g) / D**0.5).tolist()
    vec = torch.randn(D, generator=g).tolist()
    ivs: list[dict[str, Any]] = [
        {"layer": 1, "op": "ablate", "vector": vec, "apply": {"window": [1, 5]}},
        {"layer": 1, "op": "add", "vector": vec, "coefficient": 2.0, "relative": True,
         "apply": {"tokens": "generated"}},
        {"layer": 1, "op": "add", "vector": probe, "coefficient": -3.0, "norm_match": True,
         "apply": {"when": {"vector": probe, "above": 0.0, "scope": "prompt", "aggregate": "max"}}},
        {"layer": 1, "op": "sae", "sae": "sae", "edits": [{"feature": 3, "mode": "set", "value": 5.0}],
         "apply": {"positions": [0, -1], "when": {"feature": 7, "above": 0.0}}},
        {"layer": 1, "op": "sae", "sae": "sae", "error_term": "drop", "edits": [{"feature": 2, "mode": "scale",
         "value": 0.0}], "apply": {"last": 2, "exclude": {"positions": [-1]}}},
        {"layer": 1, "op": "refuse", "apply": {"when": {"probe": "probe.safetensors", "above": 0.0,
                                                         "scope": "prompt", "aggregate": "mean"}}},
        {"layer": 1, "op": "refuse", "name": "window", "apply": {"when": {"probe": "probe.safetensors", "above": 0.0,
                                                         "scope": "prompt", "aggregate": "window_max", "window": 3}}},
        {"layer": 1, "op": "refuse", "name": "last",
         "apply": {"when": {"vector": probe, "metric": "cosine", "below": 0.0, "scope": "prompt"}}},
    ]  # fmt: skip
    return SteeringConfig.from_dict({"interventions": ivs}, base_dir=tmp_path)


def _steps() -> list[TokenBatch]:
    """A prompt read in two chunks (rows 0 and 2 start, row 1 idle), then two decode steps of every row."""
    prompt_len = torch.tensor([5, 2, 4])

    def tb(rows: list[int], pos: list[int], new: list[bool], has_prompt: bool) -> TokenBatch:
        row_N, pos_N = torch.tensor(rows), torch.tensor(pos)
        return TokenBatch(row_N, pos_N, pos_N < prompt_len[row_N], prompt_len, None, torch.tensor(new),
                          has_prompt=has_prompt)  # fmt: skip

    return [
        tb([0, 0, 0, 2, 2, 1, 1], [0, 1, 2, 0, 1, 0, 1], [True, True, True], True),
        tb([0, 0, 2, 2, 1, 1, 1], [3, 4, 2, 3, 2, 3, 4], [False, False, False], True),
        tb([0, 1, 2, 0, 1, 2, 2], [5, 5, 4, 6, 6, 5, 6], [False, False, False], False),
        tb([0, 1, 2, 0, 1, 2, 2], [7, 7, 6, 8, 8, 7, 8], [False, False, False], False),
    ]


def test_site_computation_compiles_with_fullgraph_and_follows_its_buffers(tmp_path: Path) -> None:
    plan = build_plan(_config(tmp_path), ModelSpec(3, D, torch.device("cpu"), torch.float32))
    ops = plan.ops[(1, "resid_post")]
    eager_state, compiled_state = RunState(D, torch.device("cpu")), RunState(D, torch.device("cpu"))

    def site(x_ND: Tensor, tb: TokenBatch) -> Tensor:
        return run_site(ops, x_ND, tb, compiled_state)

    compiled = torch.compile(site, fullgraph=True, dynamic=False, backend="eager")
    g = torch.Generator().manual_seed(0)
    outs = []
    for tb in _steps():
        x = torch.randn(7, D, generator=g) * 4
        want = run_site(ops, x, tb, eager_state)
        got = compiled(x, tb)
        torch.testing.assert_close(got, want)
        outs.append(got)
        for order, st in eager_state.gates.items():
            torch.testing.assert_close(compiled_state.gates[order].score_R, st.score_R, equal_nan=True)
            assert torch.equal(compiled_state.gates[order].verdict_R, st.verdict_R)
    # the steps were steered differently (the buffers, not a frozen capture, decided)
    assert not torch.equal(outs[2] - outs[3], torch.zeros_like(outs[2]))
    decided = [compiled_state.decided(d.order) for d in plan.detectors]
    assert all(d is not None and not d[1].isnan().any() for d in decided)  # every row's prompt was read


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_steering_runs_on_the_meta_device(arch: str, tmp_path: Path) -> None:
    """Every tensor steerlib makes at attach time and per step is made on the model's device."""
    cfg = _config(tmp_path)
    model = tiny_model(arch).to("meta")
    tok = word_tokenizer()
    ids = torch.randint(3, 100, (R, 6), generator=torch.Generator().manual_seed(1)).to("meta")
    match = SteeringConfig.from_dict(
        {"interventions": [{"layer": 0, "op": "add", "vector": [1.0] * D, "apply": {"match": ["w5"]}}]}
    )
    with torch.no_grad(), steer(model, [cfg, None, match], tokenizer=tok) as handle:
        out = model(input_ids=ids)  # (transformers itself reads a padding mask's values: none given)
        assert out.logits.device.type == "meta"
        assert all(st.verdict_R.device.type == "meta" for st in handle.state.gates.values())
    handle = attach(model, cfg, tokenizer=tok)
    handle.remove()
