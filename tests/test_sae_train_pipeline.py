"""``python -m sae_train CONFIG`` end to end on a tiny model: harvest, cache, train, save, evaluate, export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_models import BOS_ID, EOS_ID, tiny_model

import sae_train.evaluate as sae_evaluate
import sae_train.pipeline as pipeline
from sae_train.__main__ import main
from sae_train.config import TrainConfig
from sae_train.dist import DistInfo
from steerlib.sae import load_sae


class TinyTokenizer:
    """Characters to ids 3..122 (inside the tiny models' 128-token vocabulary)."""

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID

    def __call__(self, text: list[str], *, add_special_tokens: bool) -> dict[str, list[list[int]]]:
        return {"input_ids": [[3 + ord(c) % 120 for c in t] for t in text]}


CONFIG = """
model: tiny
data: {{sources: [{docs}], ctx_len: 16, heldout_fraction: 0.2}}
activations: {{n_tokens: 1200, harvest_batch: 8, cache_dir: cache}}
sae: {{architecture: {arch}, input_site: blocks.1.hook_resid_post, expansion: 2, k: 4}}
optim: {{batch_size: 200, steps: 12, lr: 0.003, dead_tokens: 1000}}
run: {{out_dir: out, checkpoint_every: 5, log_every: 4, eval_contexts: 4}}
"""


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    loads: list[Any] = []

    def fake_load(name: str | None, **kwargs: Any) -> tuple[Any, TinyTokenizer]:
        loads.append((name, kwargs))
        return tiny_model("llama").to(kwargs["device"]), TinyTokenizer()

    monkeypatch.setattr(pipeline, "load_model", fake_load)
    return loads


def _docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(60):
        words = torch.randint(0, 26, (80,), generator=g).tolist()
        (folder / f"{i:02d}.txt").write_text(" ".join(chr(97 + w) * (1 + w % 3) for w in words))
    return folder


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_cli_trains_saves_evaluates_and_exports(tmp_path: Path, tiny: list[Any], arch: str) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG.format(docs=_docs(tmp_path), arch=arch))
    assert main([str(cfg)]) == 0
    out = tmp_path / "out"
    sae = load_sae(out / "sae")
    assert sae.architecture == arch and sae.d_sae == 128 and sae.meta.input_site == "blocks.1.hook_resid_post"
    assert load_sae(out / "saelens").meta.source_format == "saelens"
    report = json.loads((out / "eval.json").read_text())
    assert report["n_tokens"] == 4 * 15 and 0 <= report["dead_fraction"] <= 1
    assert json.loads((out / "train_config.json").read_text())["sae"]["architecture"] == arch
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12]
    assert (tmp_path / "cache" / "meta.json").is_file()


def test_a_second_run_reuses_the_activation_cache(tmp_path: Path, tiny: list[Any]) -> None:
    cfg, docs = tmp_path / "cfg.yaml", _docs(tmp_path)
    cfg.write_text(CONFIG.format(docs=docs, arch="topk"))
    assert main([str(cfg)]) == 0
    stamp = (tmp_path / "cache" / "meta.json").stat().st_mtime_ns
    cfg.write_text(CONFIG.format(docs=docs, arch="relu").replace("out_dir: out", "out_dir: out2"))
    assert main([str(cfg)]) == 0
    assert (tmp_path / "cache" / "meta.json").stat().st_mtime_ns == stamp
    assert load_sae(tmp_path / "out2" / "sae").architecture == "relu"


def test_streaming_trains_without_an_activation_cache(
    tmp_path: Path, tiny: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEERLIB_CACHE", str(tmp_path / "steerlib-cache"))  # where a default cache would go
    cfg = tmp_path / "cfg.yaml"
    text = CONFIG.format(docs=_docs(tmp_path), arch="topk")
    cfg.write_text(text.replace("cache_dir: cache}", "cache: false, shuffle_buffer: 400}"))
    assert main([str(cfg)]) == 0
    out = tmp_path / "out"
    assert load_sae(out / "sae").architecture == "topk"
    assert json.loads((out / "eval.json").read_text())["n_tokens"] == 4 * 15
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [4, 8, 12]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "docs", "out"]  # no cache folder at all


def test_device_and_dtype_settings_reach_the_model_and_the_trained_sae(tmp_path: Path, tiny: list[Any]) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("device: cpu\ndtype: fp32\n" + CONFIG.format(docs=_docs(tmp_path), arch="topk"))
    assert main([str(cfg)]) == 0
    assert tiny == [("tiny", {"device": torch.device("cpu"), "dtype": "float32"})]
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["device"] == "cpu"


def test_bad_device_names_the_allowed_forms(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cuda:N"):
        TrainConfig.model_validate({"device": "gpu0"})


def test_streaming_processes_harvest_disjoint_shares_of_the_contexts(tmp_path: Path) -> None:
    cfg = TrainConfig.model_validate(yaml.safe_load(CONFIG.format(docs=_docs(tmp_path), arch="topk")))
    full = pipeline.train_contexts(cfg, TinyTokenizer())
    shares = [pipeline.train_contexts(cfg, TinyTokenizer(), DistInfo(rank, 2)) for rank in (0, 1)]
    assert [s.shape[0] for s in shares] == [(full.shape[0] + 1) // 2, full.shape[0] // 2]
    assert torch.equal(torch.cat(shares), torch.cat([full[0::2], full[1::2]]))


def test_eval_domains_are_reported_one_by_one(tmp_path: Path, tiny: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, docs = tmp_path / "cfg.yaml", _docs(tmp_path)
    text = CONFIG.format(docs=docs, arch="topk").replace(
        "heldout_fraction: 0.2}", f"heldout_fraction: 0.2, eval_domains: {{a: [{docs}], b: [{docs}, {docs}]}}}}"
    )
    cfg.write_text(text)
    assert main([str(cfg)]) == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert sorted(report["domains"]) == ["a", "b"]
    assert report["domains"]["b"]["sources"] == [str(docs), str(docs)]
    assert report["domains"]["a"]["n_tokens"] == 4 * 15 and "fvu_typical" in report["domains"]["a"]
    # python -m sae_train.evaluate measures any SAE on the config's domains the same way
    monkeypatch.setattr(sae_evaluate, "load_model", pipeline.load_model)
    out = tmp_path / "again.json"
    assert sae_evaluate.main([str(cfg), str(tmp_path / "out" / "sae"), "--domains", "b", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert list(again["domains"]) == ["b"]
    assert again["domains"]["b"]["fvu"] == pytest.approx(report["domains"]["b"]["fvu"], rel=1e-5)
