"""Statistics of every SAE latent over a text corpus in one pass, and each latent's vocabulary projection.

- :func:`feature_stats`: activation frequency, mean and max activation, a histogram of non-zero activations over
  fixed log-spaced bins, and the top-k max-activating tokens (document, position) of every latent, as in SAE
  dashboards (Bricken et al., "Towards Monosemanticity", 2023).
- :func:`max_activating_contexts`: the text around a latent's top tokens with the latent's activation on each token.
- :func:`vocab_projection`: the decoder row through the unembedding, the tokens it promotes and suppresses
  ("VocabProj", Gur-Arieh et al., arXiv 2501.08319; the logit lens of nostalgebraist, 2020).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from steerlib.hf.recording import record
from steerlib.inspect_features import sae_site
from steerlib.sae.base import Sae

HIST_EDGES = torch.logspace(-3, 3, 25)
"""Histogram bin edges for non-zero activations: 1e-3 .. 1e3, 24 log-spaced bins (values outside are clamped)."""


@dataclass(frozen=True)
class FeatureStats:
    """Per-latent statistics over ``n_tokens`` tokens of ``docs``."""

    site: str
    n_tokens: int
    frequency_F: Tensor
    """Fraction of tokens on which the latent is active (> 0)."""
    mean_F: Tensor
    """Mean activation over all tokens (zeros included)."""
    max_F: Tensor
    hist_FB: Tensor
    """Counts of non-zero activations per bin of :data:`HIST_EDGES`."""
    top_values_FK: Tensor
    """The k largest activations of each latent (descending); 0 where it fired on fewer tokens."""
    top_doc_FK: Tensor
    """Document index of each top activation (-1 where there is none)."""
    top_pos_FK: Tensor
    """Token position (in the document's token ids) of each top activation."""
    docs: tuple[tuple[int, ...], ...]
    """Token ids of each document, as read."""


class Context(NamedTuple):
    tokens: list[str]
    activations: list[float]
    """The latent's activation on each token of ``tokens``."""
    peak: int
    """Index in ``tokens`` of the max-activating token."""


def feature_stats(
    model: nn.Module,
    tokenizer: Any,
    sae: Sae,
    texts: Sequence[str],
    *,
    site: str | None = None,
    k: int = 10,
    max_tokens: int = 128,
    batch_size: int = 8,
) -> FeatureStats:
    """Read ``texts`` (no chat template, truncated to ``max_tokens``) once and summarise every latent."""
    name = sae_site(model, sae, site=site)
    docs = [tuple(tokenizer(t, add_special_tokens=True)["input_ids"][:max_tokens]) for t in texts]
    F = sae.d_sae
    # The summaries are kept on the host (each batch's latents come back to the CPU): F x k is small.
    count, total, vmax = (torch.zeros(F, device="cpu") for _ in range(3))
    hist = torch.zeros(F, len(HIST_EDGES) - 1, device="cpu")
    top_v = torch.zeros(F, k, device="cpu")
    top_d, top_p = torch.full((F, k), -1, device="cpu"), torch.full((F, k), -1, device="cpu")
    n_tokens = 0
    for start in range(0, len(docs), batch_size):
        z_NF, doc_N, pos_N = _encode_batch(model, sae, name, docs[start : start + batch_size], start)
        n_tokens += z_NF.shape[0]
        active = z_NF > 0
        count += active.sum(0)
        total += z_NF.sum(0)
        vmax = torch.maximum(vmax, z_NF.max(0).values)
        hist += _histogram(z_NF)
        top_v, top_d, top_p = _merge_top(top_v, top_d, top_p, z_NF, doc_N, pos_N, k)
    denom = max(n_tokens, 1)
    return FeatureStats(name, n_tokens, count / denom, total / denom, vmax, hist, top_v, top_d, top_p, tuple(docs))


def _encode_batch(
    model: nn.Module, sae: Sae, site: str, docs: Sequence[tuple[int, ...]], first_doc: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Latents ``(N, F)`` of every real token of a batch, with each token's document index and position (on the
    CPU); the activations are recorded straight onto the SAE's device."""
    width = max(len(d) for d in docs)
    device = next(model.parameters()).device
    # left padding: masked, never recorded
    ids = torch.tensor([[0] * (width - len(d)) + list(d) for d in docs], device=device)
    mask = torch.tensor([[0] * (width - len(d)) + [1] * len(d) for d in docs], device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # a padded row reads as it would alone
    with record(model, [site], device=sae.W_dec.device) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions)
        z = sae.encode(rec[site]).float()
    return z.cpu(), rec.rows.cpu() + first_doc, rec.positions.cpu()


def _histogram(z_NF: Tensor) -> Tensor:
    nz = z_NF > 0
    bins = torch.bucketize(z_NF.clamp(HIST_EDGES[0], HIST_EDGES[-1] * 0.999), HIST_EDGES) - 1
    bins = bins.clamp(0, len(HIST_EDGES) - 2)
    out = torch.zeros(z_NF.shape[1], len(HIST_EDGES) - 1, device=z_NF.device)
    feat = torch.arange(z_NF.shape[1], device=z_NF.device).expand_as(z_NF)
    out.index_put_((feat[nz], bins[nz]), torch.ones(int(nz.sum()), device=z_NF.device), accumulate=True)
    return out


def _merge_top(
    top_v: Tensor, top_d: Tensor, top_p: Tensor, z_NF: Tensor, doc_N: Tensor, pos_N: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    kk = min(k, z_NF.shape[0])
    v_FK, i_FK = z_NF.T.topk(kk, dim=1)
    cand_v = torch.cat([top_v, v_FK], dim=1)
    cand_d = torch.cat([top_d, doc_N[i_FK]], dim=1)
    cand_p = torch.cat([top_p, pos_N[i_FK]], dim=1)
    cand_d = cand_d.where(cand_v > 0, -1)  # inactive tokens are not examples
    best = cand_v.topk(k, dim=1).indices
    return cand_v.gather(1, best), cand_d.gather(1, best), cand_p.gather(1, best)


def max_activating_contexts(
    model: nn.Module, tokenizer: Any, sae: Sae, stats: FeatureStats, feature: int, *, window: int = 8
) -> list[Context]:
    """The text around each of ``feature``'s top tokens, with the latent's activation on every token shown."""
    if not 0 <= feature < sae.d_sae:
        raise ValueError(f"feature {feature} out of range: the SAE has {sae.d_sae} latents (0..{sae.d_sae - 1})")
    out = []
    for d, p in zip(stats.top_doc_FK[feature].tolist(), stats.top_pos_FK[feature].tolist(), strict=True):
        if d < 0:
            continue
        doc = stats.docs[d]
        z_NF, _, _ = _encode_batch(model, sae, stats.site, [doc], 0)
        lo, hi = max(0, p - window), min(len(doc), p + window + 1)
        tokens = [tokenizer.decode([t]) for t in doc[lo:hi]]
        out.append(Context(tokens, z_NF[lo:hi, feature].tolist(), p - lo))
    return out


class VocabProjection(NamedTuple):
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]


def vocab_projection(model: nn.Module, tokenizer: Any, sae: Sae, feature: int, *, k: int = 10) -> VocabProjection:
    """Tokens whose logits the latent's decoder row raises and lowers most (the row times the unembedding)."""
    if not 0 <= feature < sae.d_sae:
        raise ValueError(f"feature {feature} out of range: the SAE has {sae.d_sae} latents (0..{sae.d_sae - 1})")
    unembed = model.get_output_embeddings()  # type: ignore[operator]
    if unembed is None:
        raise ValueError("vocab_projection needs a model with an output embedding (LM head)")
    with torch.no_grad():
        logits_V = unembed.weight.float() @ sae.W_dec[feature].float().to(unembed.weight.device)
    up, down = logits_V.topk(k), (-logits_V).topk(k)
    return VocabProjection(
        [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(up.values, up.indices, strict=True)],
        [(tokenizer.decode([int(i)]), float(-v)) for v, i in zip(down.values, down.indices, strict=True)],
    )
