"""Per-token probes fitted so that their maximum over a prompt separates harmful from harmless prompts
(multiple-instance learning: a prompt is a bag of tokens, positive when at least one is; Dietterich et al. 1997;
max-pooled MIL as in Maron & Lozano-Pérez 1998).

A harmful prompt's bag is its tokens from the start of the ask on (the template before it is the same text its
harmless twin is wrapped in); a harmless prompt's bag is every token, so every template, system and chat-template
token is a negative. The loss is the weighted logistic loss of each bag's maximum score. Scoring every token every
step would cost a pass over hundreds of thousands of tokens, so every ``refresh`` steps each bag keeps its ``top_k``
highest-scoring tokens and the steps in between take the maximum over those (the true maximum at each refresh).
The fitted probe is what a ``when: {scope: prompt, aggregate: max}`` gate scores on every prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from evals.recipes.token_acts import TokenActs
from steerlib.extract.probes import LinearProbe, Probe
from steerlib.mlp_probe import MlpProbe


@dataclass(frozen=True)
class Bags:
    index_BK: Tensor
    """``(B, K)`` token rows of each bag, padded with -1."""
    label_B: Tensor
    """1.0 harmful, 0.0 harmless."""
    weight_B: Tensor
    """Loss weights (sum to 1)."""


def padded(spans: list[tuple[int, int]]) -> Tensor:
    """``(B, K)`` rows ``start..end-1`` of each span, padded with -1 to the longest."""
    width = max((e - s for s, e in spans), default=0)
    out = torch.full((len(spans), max(1, width)), -1, dtype=torch.long, device="cpu")
    for b, (s, e) in enumerate(spans):
        out[b, : e - s] = torch.arange(s, e, device="cpu")
    return out


def make_bags(acts: TokenActs, harmful_P: Tensor, weight_P: Tensor) -> Bags:
    """One bag per prompt: from the ask on for harmful prompts, every token for harmless ones."""
    starts, ends = acts.offsets_P1[:-1], acts.offsets_P1[1:]
    spans = [
        (int(s) + (int(a) if bool(h) else 0), int(e))
        for s, e, a, h in zip(starts, ends, acts.ask_P, harmful_P, strict=True)
    ]
    return Bags(padded(spans), harmful_P.float(), weight_P.float() / weight_P.sum())


def bag_max(scores_T: Tensor, index_BK: Tensor) -> Tensor:
    """``(B,)`` each bag's highest score."""
    s = scores_T[index_BK.clamp_min(0)]
    return s.masked_fill(index_BK < 0, -torch.inf).max(dim=1).values


def window_means(x_TD: Tensor, offsets_P1: Tensor, w: int) -> Tensor:
    """``(T, D)`` at each token the mean activation of the last ``w`` tokens of its prompt (fewer at the start),
    summed in float64: what a gate pooling "max over windows of w tokens" scores at each token."""
    c = torch.cat([torch.zeros(1, x_TD.shape[1], dtype=torch.float64, device="cpu"), x_TD.double().cumsum(0)])
    t = torch.arange(len(x_TD), device="cpu")
    start = torch.repeat_interleave(offsets_P1[:-1], offsets_P1[1:] - offsets_P1[:-1])
    lo = torch.maximum(start, t - w + 1)
    return ((c[t + 1] - c[lo]) / (t + 1 - lo)[:, None]).float()


def prompt_max(probe: Probe, x_TD: Tensor, offsets_P1: Tensor, chunk: int = 65536) -> Tensor:
    """``(P,)`` the probe's maximum over each prompt's tokens (what ``aggregate: max`` decides on)."""
    scores = torch.cat([probe.scores(x_TD[i : i + chunk].float()) for i in range(0, len(x_TD), chunk)])
    rows = torch.repeat_interleave(torch.arange(len(offsets_P1) - 1, device="cpu"), offsets_P1[1:] - offsets_P1[:-1])
    return torch.full((len(offsets_P1) - 1,), -torch.inf, device="cpu").scatter_reduce(0, rows, scores, reduce="amax")


@dataclass(frozen=True)
class MilSettings:
    kind: Literal["linear", "mlp"] = "mlp"
    hidden: int = 32
    weight_decay: float = 1e-2
    steps: int = 200
    lr: float = 5e-3
    refresh: int = 10
    top_k: int = 4
    seed: int = 0


def fit_mil_probe(x_TD: Tensor, bags: Bags, s: MilSettings = MilSettings()) -> Probe:
    """A linear or one-hidden-layer probe on standardised token activations, trained with AdamW on the loss of
    each bag's maximum (see the module docstring); the standardisation is folded into the returned probe."""
    sample = x_TD[:: max(1, len(x_TD) // 50000)].float()
    mu, sd = sample.mean(0), sample.std(0).clamp_min(1e-6)
    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    D = x_TD.shape[1]
    bound = 1 / D**0.5
    if s.kind == "mlp":
        params = [
            ((torch.rand(s.hidden, D, generator=gen, device="cpu") * 2 - 1) * bound).requires_grad_(),
            ((torch.rand(s.hidden, generator=gen, device="cpu") * 2 - 1) * bound).requires_grad_(),
            ((torch.rand(s.hidden, generator=gen, device="cpu") * 2 - 1) / s.hidden**0.5).requires_grad_(),
            torch.zeros((), requires_grad=True, device="cpu"),
        ]
    else:
        params = [torch.zeros(D, requires_grad=True, device="cpu"), torch.zeros((), requires_grad=True, device="cpu")]

    def score(z: Tensor) -> Tensor:
        if s.kind == "mlp":
            W, b1, w, b = params
            return torch.relu(z @ W.T + b1) @ w + b
        return z @ params[0] + params[1]

    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    cand_BK, z_BKD = bags.index_BK[:, :1], torch.empty(0, device="cpu")
    for step in range(s.steps):
        if step % s.refresh == 0:  # the candidates (and their standardised activations) until the next refresh
            raw = _unstandardised(s.kind, [p.detach() for p in params], mu, sd)
            cand_BK = _top_tokens(x_TD, bags.index_BK, raw, s.top_k)
            z_BKD = (x_TD[cand_BK.clamp_min(0)].float() - mu) / sd
        logits = score(z_BKD).masked_fill(cand_BK < 0, -torch.inf).max(dim=1).values
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, bags.label_B, weight=bags.weight_B, reduction="sum"
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _unstandardised(s.kind, [p.detach() for p in params], mu, sd)


def _top_tokens(x_TD: Tensor, index_BK: Tensor, probe: Probe, k: int) -> Tensor:
    """``(B, k)`` each bag's ``k`` highest-scoring tokens (padding where a bag has fewer)."""
    with torch.no_grad():
        scores_T = torch.cat([probe.scores(x_TD[i : i + 65536]) for i in range(0, len(x_TD), 65536)])
        s_BK = scores_T[index_BK.clamp_min(0)].masked_fill(index_BK < 0, -torch.inf)
        top = s_BK.topk(min(k, s_BK.shape[1]), dim=1).indices
        return index_BK.gather(1, top)


def _unstandardised(kind: str, params: list[Tensor], mu: Tensor, sd: Tensor) -> Probe:
    """Fold ``z = (x - mu) / sd`` into the first layer: ``W z + b1 = (W / sd) x + (b1 - (W / sd) mu)``."""
    if kind == "mlp":
        W, b1, w, b = params
        W_raw = W / sd
        return MlpProbe(W_raw.clone(), (b1 - W_raw @ mu).clone(), w.clone(), b.clone())
    v, b = params
    v_raw = v / sd
    return LinearProbe(v_raw.clone(), float(b - v_raw @ mu))
