"""The evals CLI's in-process paths (``sae-quality`` and ``run --capability``) on a tiny model saved to a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import tiny_model, word_tokenizer

from evals.cli import main
from steerlib.sae import ReluSae, SaeMeta, save_sae


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", n_layers=3).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_sae_quality_of_a_zero_sae(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = "blocks.1.hook_resid_post"
    save_sae(ReluSae(SaeMeta("relu", 64, 32, 64, site, site)), tmp_path / "zero")  # all-zero weights
    assert main(["sae-quality", "--model", str(model_dir), "--sae", str(tmp_path / "zero"), "--layer", "1"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["l0"] == 0.0 and q["dead_fraction"] == 1.0
    assert q["ce_recovered"] == pytest.approx(0.0, abs=1e-6)  # its reconstruction is the zero-ablation
    assert q["ce_sae"] == pytest.approx(q["ce_zero"], abs=1e-6)


def test_run_with_capability_writes_costs(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("w10 w11\nw12 w13\n")
    (tmp_path / "good.txt").write_text("w20 w21\n")
    vec = tmp_path / "push.json"
    vec.write_text(json.dumps({"interventions": [{"op": "add", "layer": 1, "vector": [0.5] * 64}]}))
    args = ["run", "--model", str(model_dir), "--harmful", str(tmp_path / "bad.txt"),
            "--harmless", str(tmp_path / "good.txt"), "--part", "all", "--config", f"push={vec}",
            "--capability", "--mmlu-limit", "0", "--max-new-tokens", "4", "--no-perplexity", "--no-progress",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    costs = {c["arm"]: c for c in json.loads((tmp_path / "out" / "capability.json").read_text())}
    assert costs["base"]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert costs["push"]["kl"] > 1e-4
    rows = (tmp_path / "out" / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 3  # two arms x three prompts


def test_run_loads_the_model_in_the_dtype_asked(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("w10 w11\n")
    (tmp_path / "good.txt").write_text("w20 w21\n")
    base = ["run", "--model", str(model_dir), "--harmful", str(tmp_path / "bad.txt"), "--harmless",
            str(tmp_path / "good.txt"), "--part", "all", "--capability", "--mmlu-limit", "0", "--max-new-tokens", "1",
            "--no-perplexity", "--no-progress", "--device", "cpu"]  # fmt: skip
    ce = {}
    for dtype in ("auto", "float32", "bfloat16"):
        assert main([*base, "--dtype", dtype, "--out", str(tmp_path / dtype)]) == 0
        (cost,) = json.loads((tmp_path / dtype / "capability.json").read_text())
        ce[dtype] = cost["ce_unsteered"]
    assert ce["auto"] == ce["float32"]  # auto keeps the float32 checkpoint's dtype
    assert abs(ce["bfloat16"] - ce["float32"]) > 1e-4  # bf16 rounding moves the loss: the setting reached the model
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--device", "gpu"])
    assert exit_.value.code == 2
