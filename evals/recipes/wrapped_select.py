"""Gates scored offline as the plugin scores them, and the out-of-fold choice of a max-pooled detector with folds
drawn by wrapper family (so a candidate is judged on families its fit did not see).

A gate ``when: {probe | vector, scope: prompt, aggregate}`` at a ``refuse`` op's layer reads the activation after
that layer at every prompt token: ``mean`` with an MLP probe scores the prompt's mean activation; otherwise each
token is scored and the scores are pooled (``max``, ``mean``, or the ``last`` token's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evals.datasets import Prompt
from evals.recipes.mil_probe import MilSettings, fit_mil_probe, make_bags, prompt_max, window_means
from evals.recipes.probe import roc_auc, threshold_at_fpr
from evals.recipes.token_acts import TokenActs
from steerlib.config import SteeringConfig
from steerlib.extract.probes import LinearProbe, Probe, fit_logistic_probe, fit_mlp_probe
from steerlib.mlp_probe import load_mlp_probe
from steerlib.vectors import load_vector


@dataclass(frozen=True)
class OfflineGate:
    layer: int
    probe: Probe
    aggregate: str
    above: float
    pooled_mean: bool
    """An MLP probe under ``aggregate: mean`` scores the mean activation (not the mean of token scores)."""
    window: int = 1
    """With ``aggregate: max``: score the mean of each run of ``window`` tokens (a pooling the plugin does not
    offer yet; see docs/safety.md), 1 for single tokens."""

    def scores(self, acts: TokenActs) -> Tensor:
        x = acts.acts[self.layer]
        off = acts.offsets_P1
        if self.window > 1:
            x = window_means(x, off, self.window)
        if self.pooled_mean:
            return self.probe.scores(mean_pool(x, off))
        if self.aggregate == "max":
            return prompt_max(self.probe, x, off)
        s = torch.cat([self.probe.scores(x[i : i + 65536].float()) for i in range(0, len(x), 65536)])
        if self.aggregate == "last":
            return s[off[1:] - 1]
        return mean_pool(s[:, None], off)[:, 0]

    def fires(self, acts: TokenActs) -> Tensor:
        return self.scores(acts) > self.above


def mean_pool(x_TD: Tensor, offsets_P1: Tensor) -> Tensor:
    """``(P, D)`` each prompt's mean over its tokens, summed in float64."""
    rows = torch.repeat_interleave(torch.arange(len(offsets_P1) - 1, device="cpu"), offsets_P1[1:] - offsets_P1[:-1])
    sums = torch.zeros(len(offsets_P1) - 1, x_TD.shape[1], dtype=torch.float64, device="cpu").index_add_(
        0, rows, x_TD.double()
    )
    return (sums / (offsets_P1[1:] - offsets_P1[:-1]).clamp_min(1)[:, None]).float()


def gate_of_preset(path: Path) -> OfflineGate:
    """The prompt-scoped gate of a preset's first op that has one (a ``refuse`` op, or the ``add`` of a gated
    steering preset), from a file probe or vector (the vector's score is ``x . v``)."""
    cfg = SteeringConfig.from_file(path)
    op = next((iv for iv in cfg.interventions if iv.apply.when is not None and iv.apply.when.scope == "prompt"), None)
    when = None if op is None else op.apply.when
    if op is None or when is None or when.above is None or not isinstance(op.layer, int) or op.site != "resid_post":
        raise ValueError(f"{path}: needs an op at one resid_post layer with a prompt-scoped when and 'above'")
    if when.probe is not None:
        probe: Probe = load_mlp_probe(cfg.resolve(when.probe))
        return OfflineGate(op.layer, probe, when.aggregate, when.above, when.aggregate == "mean")
    if isinstance(when.vector, str) and when.metric == "dot":
        vec = load_vector(cfg.resolve(when.vector))
        v = vec.by_layer.get(op.layer, vec.by_layer.get(None))
        if v is None:
            raise ValueError(f"{path}: vector has no direction for layer {op.layer}")
        return OfflineGate(op.layer, LinearProbe(v.float(), 0.0), when.aggregate, when.above, False)
    raise ValueError(f"{path}: only file probes and file vectors with metric dot are scored offline")


def fold_of(p: Prompt, folds: int) -> int:
    """Wrapped prompts by family (a family's prompts share a fold), plain prompts by text."""
    key = p.meta["family"] if p.meta.get("group", "plain") != "plain" else p.text
    return int.from_bytes(hashlib.sha256(("wrapped-fold\x00" + key).encode()).digest()[:4], "big") % folds


def bag_weights(prompts: Sequence[Prompt]) -> Tensor:
    """Half the loss to each kind; within a kind, half to plain and half to wrapped prompts, equal per prompt."""
    cells = [(p.meta["kind"], p.meta.get("group", "plain") == "plain") for p in prompts]
    size = {c: cells.count(c) for c in set(cells)}
    n_parts = {k: len({c for c in size if c[0] == k}) for k in ("harmful", "harmless")}
    return torch.tensor([0.5 / n_parts[c[0]] / size[c] for c in cells], dtype=torch.float64, device="cpu")


def scored_sets(prompts: Sequence[Prompt]) -> dict[str, list[int]]:
    """The harmless sets each held to the FPR budget: every plain dataset, and wrapped prompts as one set."""
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        if p.meta["kind"] == "harmless":
            out.setdefault(p.meta["family"] if p.meta["group"] == "plain" else "wrapped", []).append(i)
    return out


@dataclass(frozen=True)
class Candidate:
    layer: int
    settings: MilSettings
    pool: str = "max"
    """``max``: a per-token probe fitted by MIL, max over the prompt; ``mean``: a probe on the mean activation
    (the shipped detector's pooling, refitted on the same plain and wrapped prompts, for comparison)."""
    window: int = 1
    """With ``max``: the probe reads the mean of the last ``window`` tokens at each token (1: the token itself)."""
    threshold: float = float("nan")
    tpr_plain: float = float("nan")
    tpr_wrapped: float = float("nan")
    auc: float = float("nan")

    @property
    def key(self) -> str:
        s = self.settings
        probe = f"mlp{s.hidden}" if s.kind == "mlp" else "linear"
        pool = f"max-over-{self.window}-token-windows" if self.window > 1 else f"{self.pool}-pooled"
        return f"{pool} {probe}, layer {self.layer}, weight decay {s.weight_decay:g}"

    @property
    def merit(self) -> tuple[float, float]:
        return (self.tpr_plain + self.tpr_wrapped) / 2, self.auc


Fit = Callable[[Tensor, Sequence[Prompt], TokenActs], Probe]


def mil_fit(settings: MilSettings) -> Fit:
    def fit(x_TD: Tensor, prompts: Sequence[Prompt], acts: TokenActs) -> Probe:
        harmful = torch.tensor([p.meta["kind"] == "harmful" for p in prompts], device="cpu")
        return fit_mil_probe(x_TD, make_bags(acts, harmful, bag_weights(prompts)), settings)

    return fit


def mean_fit(settings: MilSettings) -> Fit:
    """A probe on each prompt's mean activation (harmless prompts weighted as in :func:`bag_weights`)."""

    def fit(x_TD: Tensor, prompts: Sequence[Prompt], acts: TokenActs) -> Probe:
        m = mean_pool(x_TD, acts.offsets_P1)
        harmful = torch.tensor([p.meta["kind"] == "harmful" for p in prompts], device="cpu")
        w = bag_weights(prompts)[~harmful]
        if settings.kind == "mlp":
            return fit_mlp_probe(m[harmful], m[~harmful], hidden=settings.hidden,
                                 weight_decay=settings.weight_decay, neg_weight_N=w)  # fmt: skip
        return fit_logistic_probe(m[harmful], m[~harmful], l2=settings.weight_decay, neg_weight_N=w)

    return fit


def fitter(c: Candidate) -> Fit:
    return mil_fit(c.settings) if c.pool == "max" else mean_fit(c.settings)


def pooled_scores(probe: Probe, acts: TokenActs, layer: int, pool: str) -> Tensor:
    """``(P,)`` the probe pooled over each prompt as the gate pools it."""
    if pool == "max":
        return prompt_max(probe, acts.acts[layer], acts.offsets_P1)
    return probe.scores(mean_pool(acts.acts[layer], acts.offsets_P1))


def out_of_fold(prompts: Sequence[Prompt], acts: TokenActs, c: Candidate, folds: int) -> Tensor:
    """``(P,)`` each prompt's pooled score under a probe fitted without its fold."""
    layer, fit = c.layer, fitter(c)
    fold = torch.tensor([fold_of(p, folds) for p in prompts], device="cpu")
    out = torch.empty(len(prompts), device="cpu")
    for k in range(folds):
        train = [i for i in range(len(prompts)) if int(fold[i]) != k]
        test = [i for i in range(len(prompts)) if int(fold[i]) == k]
        sub = acts.take(train)
        probe = fit(sub.acts[layer].float(), [prompts[i] for i in train], sub)
        out[test] = pooled_scores(probe, acts.take(test), layer, c.pool)
    return out


def judge(c: Candidate, prompts: Sequence[Prompt], s_P: Tensor, max_fpr: float) -> Candidate:
    """The candidate's threshold (the strictest of the scored harmless sets' at ``max_fpr``) and its rates."""
    threshold = max(threshold_at_fpr(s_P[idx], max_fpr) for idx in scored_sets(prompts).values())
    harmful = [p.meta["kind"] == "harmful" for p in prompts]
    plain = [p.meta["group"] == "plain" for p in prompts]
    pos = torch.tensor(harmful, device="cpu")

    def tpr(want_plain: bool) -> float:
        m = pos & (torch.tensor(plain, device="cpu") == want_plain)
        return float((s_P[m] > threshold).float().mean())

    return replace(
        c, threshold=threshold, tpr_plain=tpr(True), tpr_wrapped=tpr(False), auc=roc_auc(s_P[pos], s_P[~pos])
    )


def choose(
    prompts: Sequence[Prompt], acts: TokenActs, candidates: Sequence[Candidate], *, folds: int, max_fpr: float
) -> tuple[Candidate, list[Candidate]]:
    """Every candidate judged out of fold; the best by mean of plain and wrapped TPR (ties: AUC)."""
    judged = []
    for c in candidates:
        s = out_of_fold(prompts, windowed(acts, c), c, folds)
        judged.append(judge(c, prompts, s, max_fpr))
    return max(judged, key=lambda c: c.merit), judged


def windowed(acts: TokenActs, c: Candidate) -> TokenActs:
    """``acts`` as the candidate's probe reads them: window means at its layer when it pools windows."""
    if c.window <= 1:
        return acts
    return TokenActs(
        {c.layer: window_means(acts.acts[c.layer], acts.offsets_P1, c.window)}, acts.offsets_P1, acts.ask_P
    )


def candidate_json(c: Candidate) -> dict[str, Any]:
    return {"threshold": c.threshold, "tpr_plain": c.tpr_plain, "tpr_wrapped": c.tpr_wrapped, "auc": c.auc}
