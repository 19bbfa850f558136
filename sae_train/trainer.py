"""The training loop: one step = a deterministic global batch, loss, (all-reduced) gradients, Adam, unit-norm decoder.

Given a :class:`~sae_train.models.TrainSae` and rows of activations, :class:`Trainer` handles activation scaling,
geometric-median ``b_dec`` init, LR warmup/decay, sparsity warmup, AuxK dead-latent tracking (Gao et al.,
arXiv 2406.04093), fp32 or bf16 mixed precision, atomic checkpoints and resume, data parallelism
(:mod:`sae_train.dist`) and a JSONL log of metrics. Everything a step depends on - parameters, Adam state, the
dead-latent counters, the step number - is in the checkpoint, and batch ``i`` depends only on ``(seed, i)``, so a
resumed run continues the same loss curve.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from sae_train.batches import RowSource, batch_indices, shard
from sae_train.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from sae_train.config import OptimConfig, RunConfig
from sae_train.dist import (
    DistInfo,
    all_reduce_grads,
    any_over_ranks,
    broadcast_parameters,
    broadcast_tensor,
    sum_over_ranks,
)
from sae_train.models import TrainSae
from sae_train.normalize import fold_scales, geometric_median, norm_scale
from sae_train.schedule import lr_factor, sparsity_factor
from sae_train.stream import StreamBatches
from steerlib.devices import mixed_precision
from steerlib.sae import Sae

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class StepMetrics(NamedTuple):
    step: int
    loss: float
    fvu: float
    """Fraction of variance unexplained on this batch (of the normalised targets)."""
    l0: float
    aux: float
    dead_fraction: float
    lr: float


class Trainer:
    """Trains ``model`` on ``source`` per ``optim`` (resolved: :meth:`~sae_train.config.OptimConfig.resolved`) and
    ``run`` (checkpoint and log intervals, resume); checkpoints and logs into ``out_dir`` (None: neither).

    ``source`` is rows in memory or in a cache (batch ``i`` = rows drawn from ``(seed, i)``) or a stream harvested
    on the fly (:class:`~sae_train.stream.StreamBatches`, which makes batch ``i`` itself).
    """

    def __init__(
        self,
        model: TrainSae,
        optim: OptimConfig,
        source: RowSource | StreamBatches,
        out_dir: str | Path | None = None,
        info: DistInfo | None = None,
        device: torch.device | None = None,
        run: RunConfig | None = None,
        progress: bool = False,
    ) -> None:
        self.steps, self.lr = _steps_and_lr(optim)
        self.device = torch.device("cpu") if device is None else device
        self.model, self.optim, self.run, self.source = model.to(self.device), optim, run or RunConfig(), source
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.info, self.progress = info or DistInfo(), progress
        self.autocast = mixed_precision(optim.dtype, self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.lr, betas=(0.9, 0.999))
        self.step = 0
        self.since_fired_F = torch.zeros(model.d_sae, dtype=torch.long, device=self.device)
        self.c_in = self.c_out = 1.0
        if not self._resume():
            self._initialize()
        broadcast_parameters(model, self.info)

    # -- set-up ---------------------------------------------------------------------------------------
    def _resume(self) -> bool:
        if self.out_dir is None or not self.run.resume:
            return False
        state = load_checkpoint(self.out_dir / CHECKPOINT_FILE, self.device)
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.since_fired_F = state["since_fired"].to(self.device)
        self.c_in, self.c_out = float(state["c_in"]), float(state["c_out"])
        logger.info("resumed from %s at step %d", self.out_dir / CHECKPOINT_FILE, self.step)
        self._truncate_log()
        return True

    @torch.no_grad()
    def _initialize(self) -> None:
        """Scales and ``b_dec`` from a sample of rows (on the host; with several processes rank 0's are broadcast),
        weights from a seeded CPU generator: the same initial SAE on every device."""
        gen = torch.Generator(device="cpu").manual_seed(self.optim.seed)
        if isinstance(self.source, StreamBatches):
            x_in, x_out = self.source.sample(self.optim.init_sample)
        else:
            n = min(self.optim.init_sample, len(self.source))
            x_in, x_out = self.source.rows(torch.randperm(len(self.source), generator=gen, device="cpu")[:n])
        scales = torch.tensor([norm_scale(x_in), norm_scale(x_out)], dtype=torch.float64, device=self.device)
        broadcast_tensor(scales, self.info)
        self.c_in, self.c_out = float(scales[0]), float(scales[1])
        y = x_out * self.c_out
        init = self.optim.b_dec_init
        b_dec = geometric_median(y) if init == "geometric_median" else y.mean(0) if init == "mean" else y[0] * 0
        self.model.initialize(b_dec.to(self.device), gen)

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> list[StepMetrics]:
        """Train to ``optim.steps`` (or stop after step ``stop_after`` without a final checkpoint, as a kill would)."""
        history: list[StepMetrics] = []
        end = self.steps if stop_after is None else min(stop_after, self.steps)
        bar = tqdm(total=self.steps, initial=self.step, disable=not (self.progress and self.info.is_main))
        t0, tokens0 = time.perf_counter(), self.step * self.optim.batch_size
        while self.step < end:
            m = self.train_step()
            history.append(m)
            bar.update(1)
            bar.set_postfix(fvu=f"{m.fvu:.3f}", l0=f"{m.l0:.1f}", dead=f"{m.dead_fraction:.3f}")
            if self.step % self.run.log_every == 0 or self.step == self.steps:
                rate = (self.step * self.optim.batch_size - tokens0) / (time.perf_counter() - t0)
                self._log(m, rate)
            if self.step % self.run.checkpoint_every == 0 and self.step < self.steps:
                self.save_checkpoint()
        bar.close()
        if self.step == self.steps and stop_after is None:
            self.save_checkpoint()
        return history

    def train_step(self) -> StepMetrics:
        o, model = self.optim, self.model
        lr = self.lr * lr_factor(self.step, self.steps, o.warmup_steps, o.decay_fraction)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x_in, x_out = self._batch()
        dead_F = self.since_fired_F >= o.dead_tokens if model.uses_auxk else None
        with self._precision():
            out = model(x_in, x_out, dead_F)
        denom = o.batch_size * model.d_out  # global tokens x width: per-element MSE of normalised data
        coef = o.sparsity_coefficient * sparsity_factor(self.step, o.sparsity_warmup_steps)
        aux_w = o.auxk_alpha if model.uses_auxk else 1.0
        loss = (out.recon + coef * out.sparsity + aux_w * out.aux) / denom
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_grads(model, self.info)
        model.remove_parallel_grad()
        self.opt.step()
        model.normalize_decoder()
        fired = any_over_ranks(out.fired_F, self.info)
        self.since_fired_F += o.batch_size
        self.since_fired_F.masked_fill_(fired, 0)
        self.step += 1
        return self._metrics(out.recon, out.l0, out.aux, loss, x_out, lr)

    def _metrics(self, recon: Tensor, l0: Tensor, aux: Tensor, loss: Tensor, x_out: Tensor, lr: float) -> StepMetrics:
        var = (x_out - x_out.mean(0)).pow(2).sum()
        sums = sum_over_ranks(torch.stack([recon.detach(), var, l0.detach(), aux.detach(), loss.detach()]), self.info)
        dead = float((self.since_fired_F >= self.optim.dead_tokens).float().mean())
        b = self.optim.batch_size
        return StepMetrics(step=self.step, loss=float(sums[4]), fvu=float(sums[0] / sums[1]), l0=float(sums[2]) / b,
                           aux=float(sums[3]) / b, dead_fraction=dead, lr=lr)  # fmt: skip

    def _batch(self) -> tuple[Tensor, Tensor]:
        """This process's share of global batch ``step``, on the device (a stream is this process's share already)."""
        if isinstance(self.source, StreamBatches):
            x_in, x_out = self.source.batch(self.step)
        else:
            idx = batch_indices(self.step, self.optim.batch_size, len(self.source), self.optim.seed)
            x_in, x_out = self.source.rows(shard(idx, self.info.rank, self.info.world))
        return self._to_device(x_in) * self.c_in, self._to_device(x_out) * self.c_out

    def _to_device(self, x: Tensor) -> Tensor:
        """Host rows to the device: through pinned memory, without waiting, when the device is a GPU."""
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def _precision(self) -> contextlib.AbstractContextManager[object]:
        if self.autocast is not None:
            return torch.autocast(self.device.type, dtype=self.autocast)
        return contextlib.nullcontext()

    # -- outputs --------------------------------------------------------------------------------------
    def export(self) -> Sae:
        """The trained SAE, scales folded in: reads and writes raw activations."""
        return fold_scales(self.model.export(), self.c_in, self.c_out).eval()

    def save_checkpoint(self) -> None:
        if self.out_dir is None or not self.info.is_main:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "since_fired": self.since_fired_F,
            "c_in": self.c_in,
            "c_out": self.c_out,
            "optim": self.optim.model_dump(),
            "run": self.run.model_dump(),
        }
        save_checkpoint(self.out_dir / CHECKPOINT_FILE, state)

    def _log(self, m: StepMetrics, tokens_per_s: float) -> None:
        if self.out_dir is None or not self.info.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / METRICS_FILE).open("a") as f:
            f.write(json.dumps({**m._asdict(), "tokens_per_s": round(tokens_per_s, 1)}) + "\n")
        logger.info("step %d: loss %.4g fvu %.4f l0 %.1f dead %.3f", m.step, m.loss, m.fvu, m.l0, m.dead_fraction)

    def _truncate_log(self) -> None:
        """Drop log lines past the checkpoint: the resumed run writes them again."""
        assert self.out_dir is not None
        path = self.out_dir / METRICS_FILE
        if path.is_file():
            keep = [ln for ln in _lines(path) if json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in keep))


def _steps_and_lr(optim: OptimConfig) -> tuple[int, float]:
    if optim.steps is None or optim.lr is None:
        raise ValueError(
            f"optim.steps={optim.steps} and optim.lr={optim.lr} must be resolved before training: "
            "OptimConfig.resolved(d_sae, n_rows)"
        )
    return optim.steps, optim.lr


def _lines(path: Path) -> Iterator[str]:
    return (ln for ln in path.read_text().splitlines() if ln.strip())
