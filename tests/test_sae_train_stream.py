"""Streaming mode (``activations.cache: false``): harvest -> shuffle buffer -> trainer, nothing on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from test_sae_train_models import optim, train_sae
from tiny_models import BOS_ID, tiny_model
from torch import Tensor

from sae_train.activations import harvest
from sae_train.config import OptimConfig, RunConfig
from sae_train.stream import StreamBatches
from sae_train.trainer import Trainer

SITE = "blocks.1.hook_resid_post"


def _ids(n: int = 6, t: int = 10) -> Tensor:
    ids = torch.randint(2, 120, (n, t), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = BOS_ID
    return ids


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _sorted_rows(x: Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(r) for r in x.tolist())


def test_each_epoch_is_the_whole_harvest_shuffled_and_any_batch_can_be_asked_for_again() -> None:
    model, ids = tiny_model("llama"), _ids()
    all_rows = torch.cat([c[SITE] for c in harvest(model, ids, [SITE], batch_size=2)])  # 6 x 9 = 54 rows
    hooks = _hooks(model)

    def make() -> StreamBatches:
        return StreamBatches(lambda: harvest(model, ids, [SITE], batch_size=2), SITE, SITE, batch_size=18,
                             buffer_rows=36, seed=5)  # fmt: skip

    stream = make()
    got = [stream.batch(i) for i in range(4)]
    assert _hooks(model) > hooks  # the second epoch's harvest is under way between batches
    got += [stream.batch(i) for i in range(4, 6)]  # two epochs of 3 batches
    assert all(x_in.shape == (18, 64) and torch.equal(x_in, x_out) for x_in, x_out in got)
    for epoch in (got[:3], got[3:]):
        assert _sorted_rows(torch.cat([b[0] for b in epoch])) == _sorted_rows(all_rows)
    assert not torch.equal(torch.cat([b[0] for b in got[:3]]), all_rows)  # mixed, not in harvest order
    assert not torch.equal(got[0][0], got[3][0])  # each epoch is shuffled anew
    again = make()
    assert torch.equal(again.batch(4)[0], got[4][0])  # a resumed run re-harvests and skips to its step
    assert torch.equal(again.batch(1)[0], got[1][0])  # going back restarts the stream
    assert _hooks(model) > hooks
    stream.close()
    again.close()
    assert _hooks(model) == hooks  # closing removes the recording hooks


def test_massive_activation_tokens_never_reach_training() -> None:
    x = torch.randn(402, 8, generator=torch.Generator().manual_seed(1))
    x[[17, 333]] *= 1000.0

    def chunks() -> Iterator[dict[str, Tensor]]:
        return iter([{"s": x[i : i + 67]} for i in range(0, 402, 67)])

    stream = StreamBatches(chunks, "s", "s", batch_size=50, buffer_rows=100, max_norm_factor=10.0, norm_sample=100)
    seen = torch.cat([stream.batch(i)[0] for i in range(8)])  # one epoch: the 400 typical rows
    assert _sorted_rows(seen) == _sorted_rows(x[[i for i in range(402) if i not in (17, 333)]])
    sample, _ = stream.sample(100)  # the first 100 rows less the massive one
    assert torch.equal(sample, torch.cat([x[:17], x[18:100]]))
    assert stream.dims() == (8, 8)


def _optim() -> OptimConfig:
    return optim(steps=12, batch_size=18, dead_tokens=40, init_sample=30)


def test_a_streamed_run_resumes_on_the_same_loss_curve(tmp_path: Path) -> None:
    model, ids = tiny_model("llama"), _ids()

    def stream() -> StreamBatches:
        return StreamBatches(lambda: harvest(model, ids, [SITE], batch_size=2), SITE, SITE, batch_size=18,
                             buffer_rows=36, seed=1, max_norm_factor=10.0)  # fmt: skip

    s_full = stream()
    full = Trainer(train_sae(d_in=64, d_out=64, d_sae=128), _optim(), s_full).fit()
    s_full.close()
    assert full[-1].fvu < full[0].fvu
    out = tmp_path / "run"
    s1 = stream()
    every_5 = RunConfig(checkpoint_every=5)
    Trainer(train_sae(d_in=64, d_out=64, d_sae=128), _optim(), s1, out, run=every_5).fit(stop_after=8)
    s1.close()
    s2 = stream()
    resumed = Trainer(train_sae(d_in=64, d_out=64, d_sae=128), _optim(), s2, out, run=every_5)
    assert resumed.step == 5
    rest = resumed.fit()
    s2.close()
    assert [m.loss for m in rest] == [m.loss for m in full[5:]]
