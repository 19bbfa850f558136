"""Trainer mechanics: AuxK revives dead latents, resume after a kill continues the same curve, scales fold exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_sae_train_models import D, optim, synthetic, train_sae

from sae_train.batches import TensorRows
from sae_train.config import RunConfig
from sae_train.normalize import fold_scales, geometric_median
from sae_train.trainer import Trainer

EVERY_5 = RunConfig(checkpoint_every=5)


def _plant_dead(trainer: Trainer, x: torch.Tensor, n_dead: int) -> torch.Tensor:
    """Lower the biases of ``n_dead`` latents until they fire on no token; mark them dead."""
    sae = trainer.model.sae
    with torch.no_grad():
        assert sae.b_enc is not None
        pre = sae.pre_acts(x * trainer.c_in)[:, :n_dead]
        sae.b_enc[:n_dead] -= pre.max(0).values + 0.5
    trainer.since_fired_F[:n_dead] = 10**9
    return torch.arange(n_dead)


def _fires(trainer: Trainer, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        z = trainer.export().encode(x)
    return (z[:, idx] > 0).any(0)


def test_auxk_revives_planted_dead_latents() -> None:
    x = synthetic()
    runs = {}
    for alpha in (0.0, 1.0):
        torch.manual_seed(0)
        tr = Trainer(train_sae(), optim(steps=60, auxk_alpha=alpha), TensorRows(x, x))
        dead = _plant_dead(tr, x, 16)
        assert not _fires(tr, x, dead).any()
        tr.fit()
        runs[alpha] = int(_fires(tr, x, dead).sum())
    assert runs[0.0] == 0  # without AuxK nothing pulls them back
    assert runs[1.0] >= 4, runs


def test_resume_after_kill_continues_the_same_loss_curve(tmp_path: Path) -> None:
    x = synthetic()
    full = Trainer(train_sae("batchtopk"), optim(), TensorRows(x, x), run=EVERY_5).fit()

    out = tmp_path / "run"
    first = Trainer(train_sae("batchtopk"), optim(), TensorRows(x, x), out, run=EVERY_5)
    first.fit(stop_after=13)  # "killed" after step 13: the last checkpoint is step 10
    assert first.step == 13
    resumed = Trainer(train_sae("batchtopk"), optim(), TensorRows(x, x), out, run=EVERY_5)
    assert resumed.step == 10
    rest = resumed.fit()
    assert [m.step for m in rest] == list(range(11, 21))
    assert [m.loss for m in rest] == [m.loss for m in full[10:]]
    logged = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged))  # lines past the checkpoint were dropped, not duplicated


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
"""Every device this machine has (CI: the CPU; a GPU machine runs the same tests on CUDA)."""


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_resumes_on_whatever_device_resumes_it(tmp_path: Path, device: str) -> None:
    x = synthetic()
    full = Trainer(train_sae(), optim(), TensorRows(x, x), run=EVERY_5).fit()
    out = tmp_path / "run"
    Trainer(train_sae(), optim(), TensorRows(x, x), out, run=EVERY_5).fit(stop_after=5)  # saved on the CPU
    resumed = Trainer(train_sae(), optim(), TensorRows(x, x), out, device=torch.device(device), run=EVERY_5)
    assert resumed.step == 5
    state = [*resumed.model.parameters(), resumed.since_fired_F]
    state += [v for s in resumed.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    assert {t.device.type for t in state} == {device}
    rest = resumed.fit()
    torch.testing.assert_close([m.loss for m in rest], [m.loss for m in full[5:]], rtol=1e-4, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_mixed_precision_trains_like_fp32(device: str) -> None:
    x, dev = synthetic(), torch.device(device)
    tr = Trainer(train_sae(), optim(dtype="bfloat16"), TensorRows(x, x), device=dev)
    assert tr.autocast == torch.bfloat16
    hist = tr.fit()
    ref = Trainer(train_sae(), optim(), TensorRows(x, x), device=dev).fit()
    assert hist[-1].loss < 0.85 * hist[0].loss  # measured 0.302 from 0.367 in 20 steps
    assert abs(hist[-1].loss - ref[-1].loss) < 0.02 * ref[-1].loss  # fp32 ends at 0.303
    assert tr.model.sae.W_enc.dtype == torch.float32  # autocast: weights and optimizer state stay fp32


def test_an_unresolved_optimiser_config_is_an_error() -> None:
    x = synthetic()
    with pytest.raises(ValueError, match=r"optim\.steps=None and optim\.lr=0\.003 must be resolved"):
        Trainer(train_sae(), optim(steps=None), TensorRows(x, x))


def test_folded_scales_reproduce_the_normalised_sae_on_raw_activations() -> None:
    x = synthetic() * 40.0  # raw scale far from normalised
    tr = Trainer(train_sae(), optim(steps=5), TensorRows(x, x))
    tr.fit()
    raw = tr.export()
    with torch.no_grad():
        inner = tr.model.sae(x[:50] * tr.c_in) / tr.c_out
        torch.testing.assert_close(raw(x[:50]), inner, rtol=1e-4, atol=1e-4)
        skip = fold_scales(tr.model.sae, 2.0, 2.0)
        torch.testing.assert_close(skip(x[:5]), tr.model.sae(x[:5] * 2) / 2, rtol=1e-4, atol=1e-4)


def test_geometric_median_resists_outliers() -> None:
    pts = torch.zeros(101, D)
    pts[:3] = 1000.0
    assert geometric_median(pts).abs().max() < 1e-3


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    from sae_train.checkpoint import atomic_write, load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 10})

    def dies(f: object) -> None:
        raise KeyboardInterrupt  # a kill in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies)
    state = load_checkpoint(path)
    assert state is not None and state["step"] == 10
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
