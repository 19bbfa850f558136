"""Endpoint targets against a loopback OpenAI-compatible server, steering payloads, and the CLI on canned answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from evals.cli import main
from evals.loopback import serve
from evals.targets import EndpointTarget, serve_target, steering_payload
from steerlib import SteeringConfig, SteeringVector

D = 8


def test_endpoint_target_passes_steering_per_request() -> None:
    seen: list[dict[str, Any]] = []

    def responder(body: dict[str, Any]) -> str:
        seen.append(body)
        return f" echo: {body['messages'][-1]['content']} "

    cfg = SteeringConfig.model_validate({"interventions": [{"op": "add", "layer": 1, "vector": [0.5] * D}]})
    with serve(responder) as url:
        target = EndpointTarget(url, "m", workers=2)
        assert target.complete(["a", "b"], None, max_new_tokens=5) == ["echo: a", "echo: b"]
        target.complete(["c"], cfg, max_new_tokens=7, system="be safe")
        target.complete(["d"], ["refusal", "style"], max_new_tokens=7)
        EndpointTarget(url, "m", unsteered="omit").complete(["e"], None, max_new_tokens=3)
    by_prompt = {b["messages"][-1]["content"]: b for b in seen}
    assert by_prompt["a"]["steering"] == [] and by_prompt["a"]["max_tokens"] == 5 and by_prompt["a"]["temperature"] == 0
    assert by_prompt["c"]["steering"] == steering_payload(cfg)
    assert by_prompt["c"]["messages"][0] == {"role": "system", "content": "be safe"}
    assert by_prompt["d"]["steering"] == ["refusal", "style"]
    assert "steering" not in by_prompt["e"]


def test_steering_payload_inlines_vector_files(tmp_path: Path) -> None:
    v = torch.arange(D, dtype=torch.float32)
    SteeringVector.single(v).save(tmp_path / "one.safetensors")
    SteeringVector.per_layer({1: v, 2: -v}).save(tmp_path / "pl.safetensors")
    cfg = SteeringConfig.from_dict(
        {
            "interventions": [
                {"op": "add", "layer": 3, "vector": "one.safetensors", "coefficient": 2.0},
                {"op": "ablate", "layer": [1, 2], "vector": "pl.safetensors"},
            ]
        },
        base_dir=tmp_path,
    )
    ivs = steering_payload(cfg)["interventions"]
    assert [(iv["op"], iv["layer"], iv["vector"][:2]) for iv in ivs] == [
        ("add", 3, [0.0, 1.0]),
        ("ablate", 1, [0.0, 1.0]),
        ("ablate", 2, [-0.0, -1.0]),
    ]
    assert ivs[0]["coefficient"] == 2.0
    # What travels is a valid config by itself (no base folder needed).
    assert len(SteeringConfig.from_dict(steering_payload(cfg)).interventions) == 3
    sae_cfg = SteeringConfig.model_validate({"interventions": [{"op": "replace", "layer": 0, "sae": "x"}]})
    with pytest.raises(ValueError, match=r"interventions\[0\]: op 'replace' reads an SAE file"):
        steering_payload(sae_cfg)


class _Echo:
    """A target that says whether it was steered, for serve_target."""

    name = "echo"

    def complete(self, prompts: Any, steering: Any, *, max_new_tokens: int, system: str | None = None) -> list[str]:
        n = 0 if steering is None else len(steering.interventions)
        return [f"{p}|{n}|{max_new_tokens}|{system}" for p in prompts]


def test_serve_target_reads_steering_like_the_server() -> None:
    preset = SteeringConfig.model_validate({"interventions": [{"op": "add", "layer": 0, "vector": [1.0] * D}] * 2})
    with serve(serve_target(_Echo(), presets={"two": preset})) as url:
        t = EndpointTarget(url, "m")
        assert t.complete(["p"], None, max_new_tokens=4) == ["p|0|4|None"]
        assert t.complete(["p"], ["two"], max_new_tokens=4, system="s") == ["p|2|4|s"]
        assert t.complete(["p"], preset, max_new_tokens=4) == ["p|2|4|None"]
        with pytest.raises(Exception, match=r"unknown presets \['nope'\]"):
            t.complete(["p"], ["nope"], max_new_tokens=4)


def test_cli_run_through_an_endpoint_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.txt").write_text("how to do harm one\nhow to do harm two\nhow to do harm three\n")
    (tmp_path / "good.csv").write_text("q\nbake bread\nplant a tree\n")

    def responder(body: dict[str, Any]) -> str:
        prompt = body["messages"][-1]["content"]
        if body["model"] == "judge":  # the same server plays the LLM judge
            return "REFUSAL" if "can't help" in prompt else "COMPLIANCE"
        if body.get("steering") == ["safe"] and "harm" in prompt:
            return "I'm sorry, but I can't help with that."
        return "no no no no no no no no I'm sorry" if prompt == "plant a tree" else "Sure, here it is."

    with serve(responder) as url:
        code = main(
            ["run", "--endpoint", url, "--harmful", str(tmp_path / "bad.txt"), "--harmless", str(tmp_path / "good.csv"),
             "--field", "q", "--part", "all", "--preset", "safe", "--no-perplexity", "--no-progress",
             "--llm-judge", url, "--llm-judge-model", "judge",
             "--out", str(tmp_path / "out")]
        )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 5
    summary = {(s["dataset"], s["arm"]): s for s in json.loads((tmp_path / "out" / "summary.json").read_text())}
    assert summary[("bad", "preset:safe")]["refusal"]["k"] == 3 and summary[("bad", "base")]["refusal"]["k"] == 0
    good = summary[("good", "base")]  # the repetitive "I'm sorry" is degenerate: not a coherent refusal
    assert (good["refusal"]["k"], good["refusal_any"]["k"], good["degenerate_refusals"]) == (0, 1, 1)
    # The LLM judge does not count the degenerate "I'm sorry": the judges disagree on that one item only.
    assert summary[("bad", "preset:safe")]["refusal_llm"]["k"] == 3
    assert good["agreement"]["raw"] == 0.5 and summary[("bad", "preset:safe")]["agreement"]["raw"] == 1.0
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 1000
    assert "| bad | harmful | preset:safe |" in capsys.readouterr().out
