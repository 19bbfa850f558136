"""Held-out metrics of a trained SAE, the reconstruction spliced in with steerlib's own ``replace`` op.

- reconstruction: L0, FVU (fraction of variance unexplained), dead and dense latent fractions, on activations
  recorded at the SAE's sites;
- downstream: next-token cross-entropy with the SAE's reconstruction in place of the activation, relative to the
  clean model and to zero-ablation (an SAE whose weights are all zero reconstructs exactly 0, so a ``replace`` with it
  *is* zero-ablation): ``CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)``; and the KL divergence from the
  clean model's next-token distribution (Gao et al., arXiv 2406.04093 §4.1; SAELens' evals).

The SAE is spliced in through a steering config, exactly as a user would run it, so the metric covers steerlib's
hook too. Each context's first token (BOS) is left untouched when the SAE was trained without it.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from steerlib.config import SteeringConfig
from steerlib.hf.hooks import steer
from steerlib.hf.layout import get_layout
from steerlib.hf.recording import record
from steerlib.plan import Resources, spec_of
from steerlib.sae import Sae, save_sae
from steerlib.sites import parse_site


class SaeMetrics(NamedTuple):
    l0: float
    fvu: float
    """Over every held-out token (BOS excepted); a few massive-activation tokens can dominate it."""
    fvu_typical: float
    """Over the tokens whose input norm is at most ``max_norm_factor`` x the median (= ``fvu`` when None)."""
    outlier_fraction: float
    """Fraction of held-out tokens left out of ``fvu_typical``."""
    dead_fraction: float
    """Latents that never fired on the held-out tokens."""
    dense_fraction: float
    """Latents firing on more than 10% of held-out tokens."""
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_loss_recovered: float
    kl_to_clean: float
    n_tokens: int


def _logprobs(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].float().log_softmax(-1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _nll_sum(logp: Tensor, ids: Tensor) -> float:
    return float(-logp.gather(-1, ids[:, 1:, None]).sum())


def _downstream(
    model: nn.Module, ids_NT: Tensor, batch: int, sae_cfg: SteeringConfig, zero_cfg: SteeringConfig
) -> tuple[float, float, float, float]:
    """Mean next-token CE clean, with the SAE, zero-ablated, and the mean KL(clean || SAE), batch by batch.

    Each batch's three runs are compared and dropped at once: keeping every token's log-probabilities (vocabulary
    49k on the embedded model) would take gigabytes for a few hundred contexts.
    """
    layout = get_layout(model)
    res = Resources(spec_of(model, layout.n_layers, layout.d_model))
    ce = torch.zeros(3, dtype=torch.float64, device="cpu")
    kl = 0.0
    with torch.inference_mode():
        for s in range(0, ids_NT.shape[0], batch):
            ids = ids_NT[s : s + batch].to(res.spec.device)
            clean = _logprobs(model, ids)
            with steer(model, sae_cfg, resources=res):
                spliced = _logprobs(model, ids)
            with steer(model, zero_cfg, resources=res):
                zeroed = _logprobs(model, ids)
            ce += torch.tensor(
                [_nll_sum(lp, ids) for lp in (clean, spliced, zeroed)], dtype=torch.float64, device="cpu"
            )
            kl += float((clean.exp() * (clean - spliced)).sum())
    n = ids_NT[:, 1:].numel()
    return float(ce[0]) / n, float(ce[1]) / n, float(ce[2]) / n, kl / n


def _zero_like(sae: Sae) -> Sae:
    zero = copy.deepcopy(sae)
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    return zero


def _replace_config(folder: Path, sae: Sae, skip_bos: bool) -> SteeringConfig:
    site = sae.meta.output_site or sae.meta.input_site
    if site is None:
        raise ValueError("the SAE's meta names no site: cannot splice it into the model")
    layer, name = parse_site(site)
    iv: dict[str, object] = {"layer": layer, "site": name, "op": "replace", "sae": str(folder)}
    if skip_bos:
        iv["apply"] = {"window": [1, None]}
    return SteeringConfig.from_dict({"interventions": [iv]})


def _fvu(x_hat: Tensor, x_out: Tensor) -> float:
    return float((x_hat - x_out).pow(2).sum() / (x_out - x_out.mean(0)).pow(2).sum())


def _reconstruction(
    model: nn.Module, sae: Sae, ids_NT: Tensor, skip_bos: bool, batch: int, max_norm_factor: float | None
) -> tuple[float, ...]:
    sites = [s for s in dict.fromkeys([sae.meta.input_site, sae.meta.output_site]) if s is not None]
    select = {"window": [1, None]} if skip_bos else None
    dev = _device(model)
    sae = sae.to(dev)
    with torch.inference_mode(), record(model, sites, select=select, device=dev) as rec:
        for s in range(0, ids_NT.shape[0], batch):
            ids = ids_NT[s : s + batch].to(dev)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    x_in = rec[sites[0]].float()
    x_out = rec[sites[-1]].float()
    with torch.inference_mode():
        z = sae.encode(x_in)
        x_hat = sae.decode(z, x_in)
    norms = x_in.norm(dim=1)
    typical = norms <= (max_norm_factor or float("inf")) * norms.median()
    freq = (z > 0).float().mean(0)
    l0 = float((z > 0).sum(-1).float().mean())
    dead, dense = float((freq == 0).float().mean()), float((freq > 0.1).float().mean())
    return l0, _fvu(x_hat, x_out), _fvu(x_hat[typical], x_out[typical]), 1 - float(typical.float().mean()), dead, dense


def evaluate(
    model: nn.Module,
    sae: Sae,
    ids_NT: Tensor,
    *,
    skip_bos: bool = True,
    batch: int = 8,
    max_norm_factor: float | None = None,
) -> SaeMetrics:
    """Metrics of ``sae`` on held-out contexts ``ids_NT`` (N, T) of ``model``."""
    l0, fvu, fvu_typical, outliers, dead, dense = _reconstruction(model, sae, ids_NT, skip_bos, batch, max_norm_factor)
    with tempfile.TemporaryDirectory() as tmp:
        sae_dir, zero_dir = save_sae(sae, Path(tmp) / "sae"), save_sae(_zero_like(sae), Path(tmp) / "zero")
        ce_clean, ce_sae, ce_zero, kl = _downstream(
            model, ids_NT, batch, _replace_config(sae_dir, sae, skip_bos), _replace_config(zero_dir, sae, skip_bos)
        )
    gap = ce_zero - ce_clean
    recovered = (ce_zero - ce_sae) / gap if gap > 0 else float("nan")
    return SaeMetrics(
        l0,
        fvu,
        fvu_typical,
        outliers,
        dead,
        dense,
        ce_clean,
        ce_sae,
        ce_zero,
        recovered,
        kl,
        int(ids_NT[:, 1:].numel()),
    )
