"""Data-parallel training (2 processes, gloo) matches single-process training on the same data."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_sae_train_models import optim, synthetic, train_sae

from sae_train.batches import TensorRows
from sae_train.dist import DistInfo
from sae_train.trainer import Trainer

OPTIM = optim(steps=12, dead_tokens=300, warmup_steps=2, decay_fraction=0.3)


def _train(info: DistInfo) -> tuple[dict[str, torch.Tensor], list[float]]:
    torch.manual_seed(0)
    x = synthetic()
    trainer = Trainer(train_sae(), OPTIM, TensorRows(x, x), info=info)
    hist = trainer.fit()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, [m.loss for m in hist]


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    # A file store, not a TCP one: no store server lives in rank 0, so rank 0 finishing first cannot pull it from
    # under rank 1's teardown (seen in CI: rank 1 aborting with "terminate called without an active exception").
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        state, losses = _train(DistInfo(rank, world))
        if rank == 0:
            torch.save({"state": state, "losses": losses}, out)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it (seen: SIGABRT in CI)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path: Path) -> None:
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    state, losses = _train(DistInfo())
    assert ddp["losses"] == __import__("pytest").approx(losses, rel=1e-5)
    for name, value in state.items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
