"""The eval tools against the steered server (``python -m servers``) instead of in-process: lm-eval's
``local-completions`` model and Inspect AI's ``openai`` provider, each pointed at a server on loopback that serves
the tiny Llama under a default preset (neither tool, in the versions CI pins, can add ``steering`` to its requests).

Oracles: the in-process integrations on the same weights and config (lm-eval's ``steerlib`` model, Inspect's
``steerlib/`` provider). lm-eval reads a choice's log-likelihood from ``echo`` + ``logprobs``, which scores context
and continuation together as the prompt, while the in-process model reads the continuation as generated tokens: with
an op that steers every token (``tokens: all``) the two agree up to float rounding (one forward against two).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lm_eval
import pytest
import torch
import yaml
from inspect_ai import Task, eval
from inspect_ai.dataset import Sample
from inspect_ai.log import EvalLog
from inspect_ai.scorer import match
from inspect_ai.solver import generate as generate_solver
from lm_eval.tasks import TaskManager
from test_server_support import MODEL_NAME, make_app, serving
from tiny_models import tiny_model, word_tokenizer

import steerlib.integrations.lm_eval.model  # noqa: F401  (registers lm-eval's "steerlib" model)

DOCS = [
    {"question": "w10 w11 w12", "choices": ["w20 w30", "w21 w31", "w22 w32"], "answer": 1},
    {"question": "w40 w41", "choices": ["w50 w60", "w51 w61"], "answer": 0},
]
TASK = {
    "task": "tiny_mc",
    "dataset_path": "json",
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "{{question}}",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{answer}}",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}
PROMPTS = ["w10 w11 w12", "w40 w41"]
MAX_TOKENS = 6


def _vector(seed: int) -> list[float]:
    return torch.randn(64, generator=torch.Generator().manual_seed(seed)).tolist()


STEER = {"interventions": [{"op": "add", "layer": 1, "vector": _vector(0), "coefficient": 4.0}]}
"""Every token (the default ``tokens: all``): prompt or generated, the op reads the same."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model and tokenizer saved (for the in-process tools), the config as a file and as the server's preset,
    and the local multiple-choice task."""
    root = tmp_path_factory.mktemp("endpoints")
    tiny_model("llama").save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    (root / "steer.yaml").write_text(yaml.safe_dump(STEER))
    (root / "presets").mkdir()
    (root / "presets" / "steer.yaml").write_text(yaml.safe_dump({"description": "add at layer 1"} | STEER))
    (root / "tasks").mkdir()
    (root / "tasks" / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    task = TASK | {"dataset_kwargs": {"data_files": {"test": str(root / "tasks" / "data.jsonl")}}}
    (root / "tasks" / "tiny_mc.yaml").write_text(yaml.safe_dump(task))
    return root


def _server(folder: Path, presets: list[str]) -> Iterator[str]:
    app = make_app(folder / "presets", tiny_model("llama"), default_presets=presets)
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def steered_url(folder: Path) -> Iterator[str]:
    yield from _server(folder, ["steer"])


@pytest.fixture(scope="module")
def plain_url(folder: Path) -> Iterator[str]:
    yield from _server(folder, [])


def _lm_eval(model: str, model_args: dict[str, Any], folder: Path) -> list[list[float]]:
    """Per document, the log-likelihood of each choice, as lm-eval recorded them."""
    tm = TaskManager(include_path=str(folder / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc"], task_manager=tm)
    assert out is not None
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def _endpoint_args(url: str, folder: Path) -> dict[str, Any]:
    return {
        "base_url": f"{url}/v1/completions",
        "model": MODEL_NAME,
        "tokenizer_backend": "huggingface",
        "tokenizer": str(folder / "model"),
        "max_retries": 1,
    }


def test_lm_eval_local_completions_scores_as_the_in_process_model(
    folder: Path, steered_url: str, plain_url: str
) -> None:
    local = {"pretrained": str(folder / "model"), "device": "cpu"}
    for url, in_process in ((steered_url, local | {"steering": str(folder / "steer.yaml")}), (plain_url, local)):
        served = _lm_eval("local-completions", _endpoint_args(url, folder), folder)
        want = _lm_eval("steerlib", in_process, folder)
        assert [len(doc) for doc in served] == [len(doc) for doc in want] == [3, 2]
        flat = [[lp for doc in run for lp in doc] for run in (served, want)]
        torch.testing.assert_close(torch.tensor(flat[0]), torch.tensor(flat[1]), rtol=0, atol=1e-5)
    steered = _lm_eval("local-completions", _endpoint_args(steered_url, folder), folder)
    plain = _lm_eval("local-completions", _endpoint_args(plain_url, folder), folder)
    assert all(abs(s - p) > 1e-3 for ds, dp in zip(steered, plain, strict=True) for s, p in zip(ds, dp, strict=True))


def _inspect(folder: Path, model: str, model_args: dict[str, Any], base_url: str | None = None) -> EvalLog:
    task = Task(
        dataset=[Sample(input=p, target="w5") for p in PROMPTS],
        solver=generate_solver(),
        scorer=match(location="begin"),
    )
    (log,) = eval(
        task,
        model=model,
        model_base_url=base_url,
        model_args=model_args,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        log_dir=str(folder / "logs"),
        display="none",
    )
    assert log.status == "success", log.error
    return log


def _completions(log: EvalLog) -> list[str]:
    samples = sorted(log.samples or [], key=lambda s: PROMPTS.index(str(s.input)))
    return [s.output.completion for s in samples]


def test_inspect_openai_provider_generates_as_the_in_process_provider(
    folder: Path, steered_url: str, plain_url: str
) -> None:
    local = f"steerlib/{folder / 'model'}"
    served = {"api_key": "unused"}
    steered = _completions(_inspect(folder, f"openai/{MODEL_NAME}", served, f"{steered_url}/v1"))
    plain = _completions(_inspect(folder, f"openai/{MODEL_NAME}", served, f"{plain_url}/v1"))
    assert steered == _completions(_inspect(folder, local, {"steering": str(folder / "steer.yaml")}))
    assert plain == _completions(_inspect(folder, local, {}))
    assert steered != plain and all(len(c.split()) == MAX_TOKENS for c in steered + plain)
