"""Files named by vLLM requests stay inside the operator's steering root (steerlib.vllm.params.confine)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from steerlib import SteeringConfig
from steerlib.vllm.params import BASE_DIR_KEY, ROOT_ENV, confine, parse_steering


def _args(vector: Any, base: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"steering": {"interventions": [{"layer": 1, "op": "add", "vector": vector}]}}
    if base is not None:
        out[BASE_DIR_KEY] = base
    return out


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "root" / "vectors").mkdir(parents=True)
    (tmp_path / "root" / "vectors" / "v.safetensors").write_bytes(b"")
    (tmp_path / "secret.safetensors").write_bytes(b"")
    os.symlink(tmp_path / "secret.safetensors", tmp_path / "root" / "vectors" / "link.safetensors")
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "root"))
    return (tmp_path / "root").resolve()


def test_inline_vectors_need_no_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROOT_ENV, raising=False)
    cfg = parse_steering(_args([1.0, 2.0]))
    assert cfg is not None and cfg.refs() == []


def test_without_a_root_no_request_names_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROOT_ENV, raising=False)
    with pytest.raises(ValueError, match=r"interventions\[0\]\.vector: .*steering root.*send vectors inline"):
        parse_steering(_args("/etc/hosts"))


def test_references_resolve_inside_the_root(root: Path) -> None:
    cfg = parse_steering(_args("vectors/v.safetensors"))
    assert cfg is not None and [r.ref for r in cfg.refs()] == [str(root / "vectors" / "v.safetensors")]
    inner = parse_steering(_args("v.safetensors", base=str(root / "vectors")))
    assert inner is not None and inner.refs()[0].ref == str(root / "vectors" / "v.safetensors")


@pytest.mark.parametrize(
    ("vector", "base", "where"),
    [
        ("/etc/hosts", None, r"interventions\[0\]\.vector"),
        ("../secret.safetensors", None, r"interventions\[0\]\.vector"),
        ("vectors/link.safetensors", None, r"interventions\[0\]\.vector"),  # a symlink out of the root
        ("~/x.safetensors", None, r"interventions\[0\]\.vector: '~'"),
        ("v.safetensors", "/tmp", "steering_base_dir"),
    ],
)
def test_escapes_are_refused_naming_the_field_not_the_root(
    root: Path, vector: str, base: str | None, where: str
) -> None:
    with pytest.raises(ValueError, match=where) as info:
        parse_steering(_args(vector, base))
    assert str(root) not in str(info.value)


def test_every_kind_of_reference_is_confined(root: Path) -> None:
    cfg = SteeringConfig.from_dict(
        {"interventions": [{"op": "sae", "sae": "/opt/x", "layer": 1}]},
    )
    with pytest.raises(ValueError, match=r"interventions\[0\]\.sae: outside"):
        confine(cfg, None, root)
    probe = SteeringConfig.from_dict({"interventions": [{"layer": 1, "op": "refuse", "apply": {"when": {
        "probe": "/opt/p.safetensors", "above": 0, "scope": "prompt"}}}]})  # fmt: skip
    with pytest.raises(ValueError, match=r"interventions\[0\]\.apply\.when\.probe: outside"):
        confine(probe, None, root)
