"""The training config: unknown fields are errors, defaults resolve into a plan and an architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sae_train.config import TrainConfig
from sae_train.pipeline import make_sae

EXAMPLE = Path(__file__).parent.parent / "sae_train" / "examples" / "reference_l15_topk.yaml"


def test_a_typo_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("sae: {architecure: topk}\n")
    with pytest.raises(ValidationError, match="architecure"):
        TrainConfig.from_file(tmp_path / "c.yaml")
    with pytest.raises(ValidationError, match=r"sae\.k is required"):
        TrainConfig.model_validate({"sae": {"architecture": "batchtopk", "k": None}})


def test_the_reference_config_resolves() -> None:
    cfg = TrainConfig.from_file(EXAMPLE)
    sae = make_sae(cfg, 576, 576)
    assert (sae.d_sae, sae.cfg.k, sae.name) == (4608, 32, "topk")
    assert not sae.cfg.transcoder and sae.sae.subtract_b_dec
    optim = cfg.optim.resolved(sae.d_sae, 400_000)
    assert optim.steps == 1200 and optim.lr == pytest.approx(1e-3)


def test_resolving_fills_every_null_default_and_is_idempotent() -> None:
    sae = TrainConfig().sae.model_copy(update={"architecture": "matryoshka"})
    resolved = sae.resolved(64)
    assert (resolved.d_sae, resolved.output_site, resolved.matryoshka_prefixes) == (
        512,
        "blocks.15.hook_resid_post",
        [64, 128, 256, 512],
    )
    assert resolved.resolved(64) == resolved
    optim = TrainConfig().optim.resolved(16384, 10_000)
    assert (optim.steps, optim.lr) == (2, 2e-4)
    assert optim.resolved(1, 1) == optim


def test_mlp_in_to_mlp_out_is_a_transcoder() -> None:
    cfg = TrainConfig.model_validate(
        {"sae": {"input_site": "blocks.3.hook_mlp_in", "output_site": "blocks.3.hook_mlp_out", "skip": True}}
    )
    sae = make_sae(cfg, 64, 64)
    assert sae.cfg.transcoder and sae.sae.W_skip is not None and not sae.sae.subtract_b_dec
    assert cfg.optim.resolved(512, 10_000).steps == 2  # one pass over the harvested tokens


def test_streaming_settings_are_checked_and_do_not_change_the_cache_fingerprint() -> None:
    from sae_train.pipeline import fingerprint, sites_of

    with pytest.raises(
        ValidationError, match=r"activations\.shuffle_buffer=4096 must be at least 2x optim\.batch_size"
    ):
        TrainConfig.model_validate({"activations": {"cache": False, "shuffle_buffer": 4096}})
    base = TrainConfig()
    streamed = TrainConfig.model_validate({"activations": {"cache": False, "shuffle_buffer": 1 << 20}})
    assert base.activations.cache and not streamed.activations.cache
    assert fingerprint(base, sites_of(base)) == fingerprint(streamed, sites_of(streamed))
