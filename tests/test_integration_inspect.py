"""Inspect AI's ``steerlib/<model>`` provider (steerlib.integrations.inspect_ai) on the tiny Llama saved to a folder.

The provider is found the way Inspect finds any extension, through the ``inspect_ai`` entry point (this file never
imports the registry module). Oracle: ``steerlib.hf.generate.generate`` with the same prompts and config.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from inspect_ai import Task, eval
from inspect_ai.dataset import Sample
from inspect_ai.log import EvalLog
from inspect_ai.model import GenerateConfig, get_model
from inspect_ai.scorer import match
from inspect_ai.solver import generate as generate_solver
from tiny_models import tiny_model, word_tokenizer

import steerlib
from steerlib.hf.generate import generate
from steerlib.integrations.inspect_ai.provider import SteerlibAPI, call_steering

PROMPTS = ["w10 w11 w12", "w40 w41"]
MAX_TOKENS = 6


def _vector(seed: int) -> list[float]:
    return torch.randn(64, generator=torch.Generator().manual_seed(seed)).tolist()


STEER = {"interventions": [{"op": "add", "layer": 1, "vector": _vector(0), "coefficient": 2.0}]}
OTHER = {"interventions": [{"op": "add", "layer": 0, "vector": _vector(1), "coefficient": 3.0}]}
REFUSE = {
    "interventions": [
        {
            "op": "refuse",
            "layer": 1,
            "name": "always",
            "message": "w7 w8 w9",
            "apply": {"when": {"vector": _vector(2), "above": -1e9, "scope": "prompt"}},
        }
    ]
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inspect")
    tiny_model("llama").save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    for name, cfg in {"steer": STEER, "other": OTHER, "refuse": REFUSE}.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.fixture(scope="module")
def oracle_model(folder: Path) -> tuple[torch.nn.Module, object]:
    return steerlib.load_model(str(folder / "model"))


def _expected(oracle_model: tuple, folder: Path, name: str | None) -> list:
    model, tok = oracle_model
    cfg = None if name is None else steerlib.SteeringConfig.from_file(folder / f"{name}.yaml")
    return generate(model, tok, PROMPTS, cfg, max_new_tokens=MAX_TOKENS)


def _run(folder: Path, targets: list[str], model_args: dict) -> EvalLog:
    task = Task(
        dataset=[Sample(input=p, target=t) for p, t in zip(PROMPTS, targets, strict=True)],
        solver=generate_solver(),
        scorer=match(location="begin"),
    )
    (log,) = eval(
        task,
        model=f"steerlib/{folder / 'model'}",
        model_args=model_args,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        log_dir=str(folder / "logs"),
        display="none",
    )
    assert log.status == "success", log.error
    assert log.samples is not None
    return log


def test_eval_generates_what_steerlib_generate_gives(folder: Path, oracle_model: tuple) -> None:
    steered, plain = _expected(oracle_model, folder, "steer"), _expected(oracle_model, folder, None)
    assert [g.text for g in steered] != [g.text for g in plain]
    targets = [g.text.split()[0] for g in steered]  # the steered reply's first word
    assert all(not p.text.startswith(t) for p, t in zip(plain, targets, strict=True))
    for args, want, score in (({"steering": str(folder / "steer.yaml")}, steered, "C"), ({}, plain, "I")):
        log = _run(folder, targets, args)
        samples = sorted(log.samples or [], key=lambda s: PROMPTS.index(s.input))
        assert [s.output.completion for s in samples] == [g.text for g in want]
        assert [s.scores["match"].value for s in samples if s.scores] == [score, score]
        assert [s.output.stop_reason for s in samples] == ["max_tokens", "max_tokens"]
        usage = [(u.input_tokens, u.output_tokens) for u in (s.output.usage for s in samples) if u]
        assert usage == [(g.n_prompt_tokens, MAX_TOKENS) for g in want]


def test_refuse_detector_is_reported_in_metadata(folder: Path, oracle_model: tuple) -> None:
    want = _expected(oracle_model, folder, "refuse")
    assert [(g.text, g.refused_by) for g in want] == [("w7 w8 w9", "always")] * 2
    log = _run(folder, ["w7", "w7"], {"steering": str(folder / "refuse.yaml")})
    assert [(s.output.completion, s.output.metadata) for s in log.samples or []] == [
        ("w7 w8 w9", {"refused_by": "always"})
    ] * 2
    assert [s.output.stop_reason for s in log.samples or []] == ["stop", "stop"]


def test_per_call_steering_shares_the_loaded_weights(folder: Path, oracle_model: tuple) -> None:
    name = f"steerlib/{folder / 'model'}"
    base = get_model(name, steering=str(folder / "steer.yaml"))
    other = get_model(name, steering=str(folder / "other.yaml"))
    assert isinstance(base.api, SteerlibAPI) and isinstance(other.api, SteerlibAPI)
    assert base.api.shared is other.api.shared  # one model in memory, two configs
    config = GenerateConfig(max_tokens=MAX_TOKENS, temperature=0.0)
    got = [asyncio.run(m.generate(PROMPTS[0], config=config)).completion for m in (base, other)]
    want = [_expected(oracle_model, folder, n)[0].text for n in ("steer", "other")]
    assert got == want
    assert got[0] != got[1]


def test_call_steering_reads_extra_body(folder: Path) -> None:
    default = steerlib.SteeringConfig.from_file(folder / "steer.yaml")
    assert call_steering(None, default) is default
    assert call_steering({"steering": None}, default) is None
    assert call_steering({"steering": str(folder / "other.yaml")}, default) == steerlib.SteeringConfig.from_file(
        folder / "other.yaml"
    )
    inline = call_steering({"steering": OTHER}, None)
    assert inline is not None and inline.interventions == steerlib.SteeringConfig.from_dict(OTHER).interventions
    with pytest.raises(ValueError, match=r"unknown keys \['temperature'\]"):
        call_steering({"temperature": 1}, default)


def test_bad_model_args_are_errors(folder: Path) -> None:
    name = f"steerlib/{folder / 'model'}"
    with pytest.raises(ValueError, match=r"unknown model args \['steer'\]; valid: steering, device, dtype"):
        get_model(name, steer="x.yaml", memoize=False)
    with pytest.raises(ValueError, match="takes no base_url"):
        get_model(name, base_url="http://localhost:8000/v1", memoize=False)
    with pytest.raises(FileNotFoundError, match="no config file"):
        get_model(name, steering=str(folder / "missing.yaml"), memoize=False)


def test_entry_point_and_import_steerlib_stays_free_of_eval_tools() -> None:
    (ep,) = [e for e in importlib.metadata.entry_points(group="inspect_ai") if e.name == "steerlib"]
    assert ep.value == "steerlib.integrations.inspect_ai.registry"
    code = (
        "import sys, steerlib, steerlib.integrations, steerlib.integrations.models, steerlib.integrations.scoring\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('inspect_ai', 'lm_eval'))\n"
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
