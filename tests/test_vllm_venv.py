"""Runs the vLLM tests inside the vLLM venv when this interpreter has no vLLM (the system test run).

The venv (``steerlib/vllm/install.sh``, default /opt/vllm-venv, or $VLLM_VENV) keeps vLLM and the packages it pins
out of the shared environment. Without it this skips; inside it this does nothing (the tests run directly).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

VENV = Path(os.environ.get("VLLM_VENV", "/opt/vllm-venv"))
TESTS = Path(__file__).parent


@pytest.mark.real_model
def test_vllm_suite_in_its_venv() -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is importable here: tests/test_vllm_*.py run directly")
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no vLLM venv at {VENV}: create it with `bash steerlib/vllm/install.sh`")
    files = sorted(str(p) for p in TESTS.glob("test_vllm_*.py") if p.name != Path(__file__).name)
    run = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary, summary  # inside the venv nothing may skip
