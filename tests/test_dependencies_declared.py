"""Every third-party module that steerlib/, sae_train/, servers/ or evals/ imports is declared in pyproject.toml.

Import names map to distributions through ``importlib.metadata.packages_distributions()`` (``yaml`` is PyYAML); a
module that is not installed here counts as its own distribution name. The few imports that no dependency or extra
declares on purpose are listed in :data:`ALLOWED`, each with the only folder allowed to import it and why.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("steerlib", "sae_train", "servers", "evals")

ALLOWED: dict[str, tuple[str, str]] = {
    # steerlib.interchange reads and writes these libraries' objects, imported only when handed one: a caller who
    # has such an object has the library (their metadata pins numpy<2 / transformers<5, so no extra can list them).
    "repeng": ("steerlib/interchange/", "converts repeng ControlVector objects"),
    "steering_vectors": ("steerlib/interchange/", "converts steering-vectors SteeringVector objects"),
    # Plugins of evaluation tools: imported by that tool's own process, which is where the tool is installed.
    "inspect_ai": ("steerlib/integrations/inspect_ai/", "the Inspect AI model provider"),
    "anyio": ("steerlib/integrations/inspect_ai/", "Inspect AI's async runtime, installed with it"),
    "lm_eval": ("steerlib/integrations/lm_eval/", "the lm-evaluation-harness model"),
}
"""Import name -> (the folder that may import it, why no dependency or extra declares it)."""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions(pyproject: Path) -> set[str]:
    """Normalised names of the dependencies and of every extra's requirements (this project's own name left out)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    names = {_norm(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in reqs}
    return names - {_norm(project["name"])}


def third_party_imports(root: Path, packages: Sequence[str]) -> dict[str, set[str]]:
    """Top-level module -> the files (relative to ``root``) that import it, for every absolute import that is
    neither the standard library nor one of ``packages``; imports inside functions and ``try`` blocks count."""
    found: dict[str, set[str]] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names}:
                    if top not in sys.stdlib_module_names and top not in (*packages, "__future__"):
                        found.setdefault(top, set()).add(path.relative_to(root).as_posix())
    return found


def undeclared(
    imports: Mapping[str, set[str]],
    declared: set[str],
    distributions: Mapping[str, Sequence[str]],
    allowed: Mapping[str, tuple[str, str]],
) -> list[str]:
    """One line per import that no declared distribution provides (or an allowed one imported outside its folder)."""
    problems = []
    for module, files in sorted(imports.items()):
        if module in allowed:
            folder, _ = allowed[module]
            outside = sorted(f for f in files if not f.startswith(folder))
            if outside:
                problems.append(f"{module}: allowed only under {folder}, imported by {outside}")
            continue
        provided_by = {_norm(d) for d in distributions.get(module, [module])}
        if not provided_by & declared:
            problems.append(f"{module} (distribution {sorted(provided_by)}) imported by {sorted(files)}: not declared")
    return problems


def test_every_third_party_import_is_declared() -> None:
    imports = third_party_imports(ROOT, PACKAGES)
    assert {"torch", "pydantic", "yaml", "transformers"} <= set(imports)  # the scan sees the tree's imports
    problems = undeclared(
        imports,
        declared_distributions(ROOT / "pyproject.toml"),
        importlib.metadata.packages_distributions(),
        ALLOWED,
    )
    assert problems == []


def test_the_check_names_an_undeclared_import_and_an_allowed_one_out_of_place() -> None:
    imports = {"yaml": {"evals/a.py"}, "vllm": {"steerlib/vllm/plugin.py"}, "repeng": {"evals/b.py"}}
    problems = undeclared(imports, {"torch", "vllm"}, {"yaml": ["PyYAML"]}, ALLOWED)
    assert problems == [
        "repeng: allowed only under steerlib/interchange/, imported by ['evals/b.py']",
        "yaml (distribution ['pyyaml']) imported by ['evals/a.py']: not declared",
    ]
    assert undeclared(imports, {"pyyaml", "vllm"}, {"yaml": ["PyYAML"]}, {}) == [
        "repeng (distribution ['repeng']) imported by ['evals/b.py']: not declared"
    ]


def test_declared_names_come_from_dependencies_and_every_extra() -> None:
    declared = declared_distributions(ROOT / "pyproject.toml")
    assert {"torch", "pyyaml", "filelock", "huggingface-hub", "vllm", "datasets", "pytest"} <= declared
    assert "steerlib" not in declared
