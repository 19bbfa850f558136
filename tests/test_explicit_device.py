"""Every torch tensor factory in the library packages names its device: ``torch.zeros(..., device=...)``.

A factory without ``device=`` makes a CPU tensor; next to a model on a GPU that is either a device-mismatch error or
a silent host copy in a hot loop. The rule is checked on the source (``ast``), so a code path no test runs is held
to it too. Host-side helpers say ``device="cpu"``; a call that forwards ``**kwargs`` is accepted (the caller names it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("steerlib", "servers", "sae_train", "evals")
FACTORIES = frozenset(
    {"zeros", "ones", "full", "empty", "tensor", "arange", "randn", "rand", "randint", "randperm", "linspace", "eye",
     "as_tensor", "Generator"}
)  # fmt: skip


def calls_without_device(source: str, filename: str) -> list[str]:
    """``file:line torch.X`` for each ``torch.X(...)`` factory call in ``source`` with no ``device=`` keyword."""
    found: list[tuple[int, int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func = node.func
        if not (isinstance(func.value, ast.Name) and func.value.id == "torch" and func.attr in FACTORIES):
            continue
        # kw.arg is None for **kwargs: the device may be in there
        if not any(kw.arg in ("device", None) for kw in node.keywords):
            found.append((node.lineno, node.col_offset, f"{filename}:{node.lineno} torch.{func.attr}"))
    return [hit for _, _, hit in sorted(found)]


def test_the_check_finds_exactly_the_calls_without_a_device() -> None:
    source = (
        "import torch\n"
        "a = torch.zeros(3)\n"
        "b = torch.zeros(3, device='cpu')\n"
        "c = torch.Generator().manual_seed(0)\n"
        "d = torch.tensor(\n    [1, 2],\n    dtype=torch.long,\n)\n"
        "e = torch.full((2,), 1, **kw)\n"
        "f = torch.cat([a, b])\n"
        "g = x.new_zeros(3)\n"
        "h = torch.randn(2, generator=torch.Generator(device=dev), device=dev)\n"
    )
    assert calls_without_device(source, "m.py") == [
        "m.py:2 torch.zeros",
        "m.py:4 torch.Generator",
        "m.py:5 torch.tensor",
    ]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_tensor_factory_names_its_device(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no .py files under {package}/"
    missing = [hit for path in files for hit in calls_without_device(path.read_text(), str(path.relative_to(ROOT)))]
    assert not missing, "tensor factories without device= (say device='cpu' for host-side data):\n" + "\n".join(missing)
