"""``python -m sae_train.release``: a finished run becomes a bf16, xz-compressed release folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sae_train.release import main, release
from steerlib.sae import SaeMeta, TopKSae, load_sae, save_sae


def finished_run(folder: Path) -> TopKSae:
    site = "blocks.1.hook_resid_post"
    sae = TopKSae(SaeMeta("topk", 16, 64, 16, site, site, k=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    save_sae(sae, folder / "sae")
    (folder / "train_config.json").write_text('{"sae": {"k": 4}}')
    (folder / "eval.json").write_text('{"fvu": 0.1}')
    return sae


def test_release_is_the_bf16_sae_with_its_config_and_metrics(tmp_path: Path) -> None:
    sae = finished_run(tmp_path / "run")
    (tmp_path / "bf16_eval.json").write_text('{"fvu": 0.11}')
    main([str(tmp_path / "run"), str(tmp_path / "rel"), "--eval", str(tmp_path / "bf16_eval.json")])
    assert sorted(os.listdir(tmp_path / "rel")) == ["cfg.json", "eval.json", "sae.safetensors.xz", "train_config.json"]
    assert json.loads((tmp_path / "rel" / "eval.json").read_text()) == {"fvu": 0.11}
    assert (tmp_path / "rel" / "train_config.json").read_text() == '{"sae": {"k": 4}}'
    back = load_sae(tmp_path / "rel")
    for name, t in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], t.to(torch.bfloat16)), name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tmp")] == []


def test_release_refuses_to_overwrite_or_a_half_run(tmp_path: Path) -> None:
    finished_run(tmp_path / "run")
    release(tmp_path / "run", tmp_path / "rel", dtype="float32", compress=False)
    assert "sae.safetensors" in os.listdir(tmp_path / "rel")
    assert load_sae(tmp_path / "rel").W_enc.dtype == torch.float32
    with pytest.raises(FileExistsError, match="already exists"):
        release(tmp_path / "run", tmp_path / "rel")
    (tmp_path / "run" / "eval.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"eval\.json is missing: is .* a finished sae_train run"):
        release(tmp_path / "run", tmp_path / "other")
    with pytest.raises(ValueError, match=r"dtype 'float8' not supported; choose one of \['bfloat16', 'float32'\]"):
        release(tmp_path / "run", tmp_path / "other", dtype="float8")
    assert not (tmp_path / "other").exists()


def test_the_shipped_chat_release_loads_and_reports_every_domain() -> None:
    folder = Path(__file__).parents[1] / "servers" / "presets" / "saes" / "smollm2-l15-topk32-chat-small"
    sae = load_sae(folder)
    assert (sae.architecture, sae.d_sae, sae.meta.k) == ("topk", 4608, 32)
    assert sae.meta.input_site == sae.meta.output_site == "blocks.15.hook_resid_post"
    assert sum(f.stat().st_size for f in folder.iterdir()) < 10 * 2**20
    report = json.loads((folder / "eval.json").read_text())
    assert sorted(report["domains"]) == ["chat", "modern", "old"]
    for row in report["domains"].values():
        assert row["l0"] <= 32 and 0 < row["fvu"] < 1 and 0 < row["fvu_typical"] < 1
        assert 0.9 < row["ce_loss_recovered"] <= 1
    assert json.loads((folder / "train_config.json").read_text())["activations"]["n_tokens"] == 600_000
