"""Shared test set-up: offline, one torch thread, deterministic."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # lets tests import tiny_models

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# The vLLM suites need vLLM, which lives in its own venv (steerlib/vllm/install.sh); without it here,
# tests/test_vllm_venv.py runs them in that venv instead, so they are not collected (nor reported skipped) here.
def _vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


collect_ignore = (
    []
    if _vllm_importable()
    else [
        "test_vllm_steering.py",
        "test_vllm_compiled.py",
        "test_vllm_server.py",
        "test_vllm_serving.py",
        "test_vllm_tensor_parallel.py",
        "test_vllm_compilation.py",
        "test_vllm_families.py",
    ]
)
