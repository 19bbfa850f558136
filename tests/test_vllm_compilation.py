"""Steering under vLLM's CUDA graphs (run in the vLLM venv): the compilation config steerlib asks for, the check that
refuses steering on an engine that would replay it frozen, and the site op's output-buffer form under compilation."""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.config import CompilationConfig  # noqa: E402
from vllm.config.compilation import CUDAGraphMode  # noqa: E402

from steerlib.vllm import engine_kwargs, serve_args  # noqa: E402
from steerlib.vllm.compilation import SITE_OP, compilation_config, unsafe_reason  # noqa: E402


def test_engine_kwargs_split_at_the_site_op_and_capture_no_full_graphs() -> None:
    cfg = engine_kwargs()["compilation_config"]
    assert isinstance(cfg, dict)
    assert cfg["cudagraph_mode"] == "PIECEWISE"
    assert SITE_OP in cfg["splitting_ops"]
    assert set(CompilationConfig._attention_ops) <= set(cfg["splitting_ops"])  # vLLM's own splits are kept
    flags = serve_args()
    assert flags[flags.index("--compilation-config") + 1].startswith("{")


def test_a_users_compilation_settings_are_kept() -> None:
    cfg = compilation_config({"splitting_ops": ["vllm::unified_attention_with_output"], "cudagraph_mode": "NONE",
                              "compile_sizes": [1, 8]})  # fmt: skip
    assert cfg == {"splitting_ops": ["vllm::unified_attention_with_output", SITE_OP], "cudagraph_mode": "NONE",
                   "compile_sizes": [1, 8]}  # fmt: skip


@pytest.mark.parametrize(
    ("settings", "unsafe"),
    [
        ({"cudagraph_mode": "FULL_AND_PIECEWISE"}, "full CUDA graphs"),  # vLLM's default on a GPU
        ({"cudagraph_mode": "FULL_DECODE_ONLY"}, "full CUDA graphs"),
        ({"cudagraph_mode": "PIECEWISE"}, "without splitting at steerlib::site"),
        ({"cudagraph_mode": "PIECEWISE", "splitting_ops": [SITE_OP]}, None),
        ({"cudagraph_mode": "NONE"}, None),
    ],
)
def test_engines_that_would_freeze_steering_are_named(settings: dict[str, object], unsafe: str | None) -> None:
    reason = unsafe_reason(CompilationConfig(**settings))  # type: ignore[arg-type]
    if unsafe is None:
        assert reason is None
    else:
        assert reason is not None and unsafe in reason and "engine_kwargs" in reason


def test_graph_safe_config_passes_the_check_once_vllm_resolves_it() -> None:
    cfg = CompilationConfig(**compilation_config())  # type: ignore[arg-type]
    assert cfg.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert unsafe_reason(cfg) is None


def test_site_op_writes_its_buffer_and_follows_the_step_state_when_compiled() -> None:
    """Compiled (as vLLM compiles the model), the op still runs its Python body on every call."""
    from steerlib.vllm import layers
    from steerlib.vllm import state as steering_state

    class FakeState:
        shift = 0.0

        def run(self, layer: int, site: str, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            return x + self.shift

    def block(x: torch.Tensor) -> torch.Tensor:
        return layers._site(x * 2, None, 3, "resid_post") + 1

    fake = FakeState()
    steering_state._STATE[:] = [fake]  # type: ignore[list-item]
    try:
        compiled = torch.compile(block, fullgraph=True)
        x = torch.ones(4, 8)
        for shift in (0.0, 5.0, -2.0):
            fake.shift = shift
            torch.testing.assert_close(compiled(x), x * 2 + shift + 1)
    finally:
        steering_state._STATE[:] = []
