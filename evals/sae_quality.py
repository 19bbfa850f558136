"""Quality of any SAE or transcoder steerlib loads: L0, FVU, dead latents, and CE loss recovered.

- L0: mean number of non-zero latents per token.
- FVU: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the tokens.
- dead latents: fraction of latents that never fire on the eval tokens (a lower bound on the truly dead ones for a
  small eval set).
- CE loss recovered (Bricken et al., "Towards Monosemanticity", 2023; Gao et al., arXiv 2406.04093):
  ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``, with CE_sae from steerlib's ``replace`` op and CE_zero from the same
  op with an SAE whose weights and biases are all zero, so its reconstruction is exactly 0 (zero ablation).

The position-0 token (BOS, or the first token) is left out of L0 / FVU / dead: its activation norm is far larger than
any other's on most models and it is not what SAEs are trained to reconstruct.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evals.lm import batches, device_of, logprobs, make_batch, target_logprobs
from steerlib.config import SteeringConfig
from steerlib.extract.activations import left_pad, pad_id_of, run_stack
from steerlib.hf.recording import record
from steerlib.sae import ReluSae, Sae, SaeMeta, load_sae, save_sae
from steerlib.sites import parse_site, tl_name


@dataclass(frozen=True)
class SaeQuality:
    l0: float
    fvu: float
    dead_fraction: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_recovered: float
    n_tokens: int


def _input_site(sae: Sae, layer: int, site: str) -> str:
    """Where the SAE reads: its declared input site's kind at ``layer`` (a transcoder reads mlp_in), else ``site``."""
    if sae.meta.input_site is not None:
        _, kind = parse_site(sae.meta.input_site)
        return tl_name(layer, kind)
    return tl_name(layer, site)


def zero_sae(sae: Sae, folder: Path) -> Path:
    """Save an all-zero ReLU SAE of the same widths: its reconstruction is exactly 0."""
    meta = SaeMeta("relu", sae.d_in, 1, sae.d_out)
    save_sae(ReluSae(meta), folder)
    return folder


def _replace(layer: int, site: str, path: Path) -> SteeringConfig:
    return SteeringConfig.model_validate(
        {"interventions": [{"op": "replace", "layer": layer, "site": site, "sae": str(path)}]}
    )


def _ce(model: nn.Module, tokenizer: Any, seqs: list[list[int]], config: SteeringConfig | None, bs: int) -> float:
    total, n = 0.0, 0
    for sl in batches(len(seqs), bs):
        batch = make_batch(tokenizer, seqs[sl], [0] * len(seqs[sl]), device_of(model))
        total -= float(target_logprobs(logprobs(model, batch, config), batch).sum())
        n += int(batch.score_BT.sum())
    return total / n


def sae_quality(
    model: nn.Module,
    tokenizer: Any,
    sae_path: str | Path,
    *,
    layer: int,
    site: str = "resid_post",
    texts: Sequence[str],
    max_tokens: int = 128,
    batch_size: int = 8,
) -> SaeQuality:
    """Measure the SAE at ``sae_path`` as it would be used by ``{op: replace, layer, site, sae}``."""
    sae = load_sae(sae_path, device=device_of(model))
    seqs = [list(tokenizer(t)["input_ids"])[:max_tokens] for t in texts]
    in_name, out_name = _input_site(sae, layer, site), tl_name(layer, site)
    active_F = torch.zeros(sae.d_sae, dtype=torch.bool, device="cpu")  # the recordings are on the CPU
    l0_sum, err, n = 0.0, 0.0, 0
    xs: list[torch.Tensor] = []
    for sl in batches(len(seqs), batch_size):
        ids, mask = left_pad(seqs[sl], pad_id_of(tokenizer), device_of(model))
        with torch.no_grad(), record(model, [in_name, out_name], select={"window": (1, None)}) as rec:
            run_stack(model, ids, mask)
        x_in, x_out = rec[in_name].float(), rec[out_name].float()
        with torch.no_grad():
            x_in_sae = x_in.to(sae.W_enc.device)
            z = sae.encode(x_in_sae)
            x_hat = sae.decode(z, x_in_sae).float().cpu()
        active_F |= (z != 0).any(0).cpu()
        l0_sum += float((z != 0).sum())
        err += float(((x_out - x_hat) ** 2).sum())
        xs.append(x_out)
        n += x_out.shape[0]
    x_all = torch.cat(xs)
    fvu = err / float(((x_all - x_all.mean(0)) ** 2).sum())
    with tempfile.TemporaryDirectory() as tmp:
        zero = zero_sae(sae, Path(tmp) / "zero")
        ce_clean = _ce(model, tokenizer, seqs, None, batch_size)
        ce_sae = _ce(model, tokenizer, seqs, _replace(layer, site, Path(sae_path)), batch_size)
        ce_zero = _ce(model, tokenizer, seqs, _replace(layer, site, zero), batch_size)
    recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan")
    return SaeQuality(l0_sum / n, fvu, 1.0 - float(active_F.float().mean()), ce_clean, ce_sae, ce_zero, recovered, n)
