"""Every training architecture: trains, its export is a steerlib SAE, and the saved folders load back the same."""

from __future__ import annotations

import pytest
import torch

from sae_train.batches import TensorRows
from sae_train.config import OptimConfig, SaeConfig
from sae_train.export import export_saelens
from sae_train.models import TRAIN_ARCHITECTURES, TrainSae, build_train_sae, get_train_architecture
from sae_train.trainer import Trainer
from steerlib.sae import load_sae, save_sae

D, F, N = 16, 64, 2048


def synthetic(n: int = N, d: int = D, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of 48 random unit directions plus an offset: data an SAE can learn."""
    g = torch.Generator().manual_seed(seed)
    dic = torch.randn(48, d, generator=g)
    dic /= dic.norm(dim=1, keepdim=True)
    codes = (torch.rand(n, 48, generator=g) < 0.06).float() * torch.rand(n, 48, generator=g) * 3
    return codes @ dic + 0.3


def sae_cfg(arch: str = "topk", **kw: object) -> SaeConfig:
    """The SAE config of these tests: F latents, k = 4, four Matryoshka prefixes."""
    base: dict[str, object] = {"architecture": arch, "d_sae": F, "k": 4, "matryoshka_prefixes": [8, 16, 32, 64]}
    base.update(kw)
    return SaeConfig.model_validate(base)


def train_sae(arch: str = "topk", d_in: int = D, d_out: int = D, **kw: object) -> TrainSae:
    return build_train_sae(sae_cfg(arch, **kw), d_in, d_out)


def optim(**kw: object) -> OptimConfig:
    """A resolved optimiser config: 20 steps of 128 rows at lr 3e-3, no warmup, decay or sparsity penalty."""
    base: dict[str, object] = {"steps": 20, "batch_size": 128, "lr": 3e-3, "dead_tokens": 256, "warmup_steps": 0,
                               "decay_fraction": 0.0, "sparsity_coefficient": 0.0}  # fmt: skip
    base.update(kw)
    return OptimConfig.model_validate(base)


def plan(arch: str, steps: int = 20) -> OptimConfig:
    return optim(steps=steps, sparsity_coefficient=0.01 if arch == "jumprelu" else 0.3)


@pytest.mark.parametrize("arch", sorted(TRAIN_ARCHITECTURES))
def test_loss_falls_in_20_steps(arch: str) -> None:
    x = synthetic()
    # unit encoder columns for every architecture: a start far enough from the data that 20 steps must cut the loss
    # by a fifth (topk's smaller default starts lower: see the test below)
    trainer = Trainer(train_sae(arch, encoder_init_norm=1.0), plan(arch), TensorRows(x, x))
    hist = trainer.fit()
    assert len(hist) == 20
    first, last = sum(m.loss for m in hist[:3]) / 3, sum(m.loss for m in hist[-3:]) / 3
    assert last < 0.8 * first, [round(m.loss, 4) for m in hist]


@pytest.mark.parametrize("arch", sorted(TRAIN_ARCHITECTURES))
def test_export_forward_is_decode_of_encode_and_saves(arch: str, tmp_path: object) -> None:
    x = synthetic()
    trainer = Trainer(train_sae(arch), plan(arch, steps=5), TensorRows(x, x))
    trainer.fit()
    sae = trainer.export()
    assert sae.architecture == get_train_architecture(arch).inference_architecture
    with torch.no_grad():
        torch.testing.assert_close(sae(x[:64]), sae.decode(sae.encode(x[:64]), x[:64]), rtol=1e-5, atol=1e-5)
        folder = save_sae(sae, f"{tmp_path}/sae")
        loaded = load_sae(folder)
        assert torch.equal(loaded(x[:64]), sae(x[:64]))
        lens = load_sae(export_saelens(sae, f"{tmp_path}/saelens"))
        torch.testing.assert_close(lens(x[:64]), sae(x[:64]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_learns_a_map_between_sites(skip: bool, tmp_path: object) -> None:
    x = synthetic()
    W = torch.randn(D, D, generator=torch.Generator().manual_seed(1)) / D**0.5
    y = torch.relu(x @ W)
    ts = train_sae(skip=skip, input_site="blocks.1.hook_mlp_in", output_site="blocks.1.hook_mlp_out")
    assert ts.cfg.transcoder
    trainer = Trainer(ts, plan("topk", steps=30), TensorRows(x, y))
    hist = trainer.fit()
    assert hist[-1].loss < 0.7 * hist[0].loss
    sae = trainer.export()
    assert sae.is_transcoder and (sae.W_skip is not None) == skip and not sae.subtract_b_dec
    loaded = load_sae(save_sae(sae, f"{tmp_path}/tc"))
    with torch.no_grad():
        assert torch.equal(loaded(x[:32]), sae(x[:32]))
        assert loaded.meta.input_site == "blocks.1.hook_mlp_in"


def test_unknown_architecture_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid: batchtopk, gated, jumprelu, matryoshka, relu, topk"):
        get_train_architecture("nope")


def test_a_config_for_another_architecture_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"sae\.architecture is 'relu'; this training architecture is 'topk'"):
        get_train_architecture("topk")(sae_cfg("relu"), D, D)


def test_matryoshka_prefixes_must_end_at_d_sae() -> None:
    with pytest.raises(ValueError, match="end at d_sae=64"):
        train_sae("matryoshka", matryoshka_prefixes=[8, 16])


@pytest.mark.parametrize(("arch", "norm", "want"), [("topk", None, 3**-0.5), ("relu", None, 1.0), ("topk", 0.25, 0.25)])
def test_encoder_starts_as_the_decoder_transpose_at_the_encoder_init_norm(
    arch: str, norm: float | None, want: float
) -> None:
    model = train_sae(arch, encoder_init_norm=norm)
    b_dec = torch.arange(D, dtype=torch.float32)
    model.initialize(b_dec, torch.Generator().manual_seed(0))
    sae = model.sae
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T * want)
    assert torch.equal(sae.b_dec, b_dec)


def test_topk_default_encoder_init_trains_to_a_lower_fvu_than_unit_columns() -> None:
    x = synthetic()
    fvu = {}
    for norm in (None, 1.0):
        torch.manual_seed(0)
        trainer = Trainer(train_sae(encoder_init_norm=norm), plan("topk"), TensorRows(x, x))
        hist = trainer.fit()
        fvu[norm] = [m.fvu for m in hist]
    assert fvu[None][0] < fvu[1.0][0] and fvu[None][-1] < fvu[1.0][-1], fvu
