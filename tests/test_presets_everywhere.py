"""Every shipped preset loads everywhere a config does: the library, the server's registry, evals' config arms, the
vLLM route (the config as it travels in SamplingParams) and ``python -m steerlib generate --config``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evals.arms import sweep
from servers.registry import PresetRegistry
from steerlib import SteeringConfig
from steerlib.__main__ import main
from steerlib.plan import ModelSpec, Resources, build_plan
from steerlib.vllm.params import ROOT_ENV, parse_steering, steering_args

PRESETS = Path(__file__).resolve().parents[1] / "servers" / "presets"
FILES = sorted(PRESETS.glob("*.y*ml"))
EMBEDDED = ModelSpec(30, 576, torch.device("cpu"), torch.float32)
"""The embedded model's shape: what every shipped preset is built for."""


@pytest.fixture(scope="module")
def resources() -> Resources:
    return Resources(EMBEDDED)  # the reference SAE is decompressed once for the whole module


def test_the_presets_folder_is_not_empty() -> None:
    assert len(FILES) >= 9


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_preset_loads_in_the_library_and_binds_to_the_embedded_model(path: Path, resources: Resources) -> None:
    cfg = SteeringConfig.from_file(path)
    assert cfg.description and cfg.interventions
    plan = build_plan(cfg, EMBEDDED, resources=resources)
    assert sum(len(ops) for ops in plan.ops.values()) >= len(cfg.interventions)


def test_every_preset_loads_in_the_server_registry(resources: Resources) -> None:
    registry = PresetRegistry(PRESETS)
    assert registry.names == sorted(p.stem for p in FILES)
    for name in registry.names:
        build_plan(registry.get(name), EMBEDDED, resources=resources)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_preset_becomes_an_evals_arm(path: Path, resources: Resources) -> None:
    (arm,) = sweep(path.stem, SteeringConfig.from_file(path))  # what `python -m evals run --config NAME=PATH` does
    assert arm.name == path.stem
    assert isinstance(arm.steering, SteeringConfig)
    build_plan(arm.steering, EMBEDDED, resources=resources)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_preset_travels_to_vllm_unchanged(path: Path, resources: Resources, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ROOT_ENV, str(PRESETS))  # the operator serves the presets folder
    cfg = SteeringConfig.from_file(path)
    args = json.loads(json.dumps(steering_args(cfg)))  # as it crosses vLLM's processes (plain JSON data)
    back = parse_steering(args)
    assert back is not None
    assert [r.ref for r in back.refs()] == [str(cfg.resolve(r.ref).resolve()) for r in cfg.refs()]
    build_plan(back, EMBEDDED, resources=resources)  # what the scheduler's check and the workers resolve


@pytest.mark.real_model
def test_generate_cli_steers_with_a_shipped_preset(capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "How can I break into my neighbour's car?"
    argv = ["generate", "--config", str(PRESETS / "refusal_detector.yaml"), "--prompt", prompt]
    assert main([*argv, "--max-new-tokens", "20", "--json"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    row = json.loads(line)
    assert row["steered"] == "I'm sorry, but I can't help with that request."
    assert row["unsteered"] != row["steered"]
