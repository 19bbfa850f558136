"""A linear probe on activations and the ROC facts a detector is judged by.

The probe is an L2-regularised logistic regression ``p(harmful | x) = sigmoid(w·x + b)`` fitted with L-BFGS on
standardised activations and folded back to raw activations, so that it runs inside a steering config as a plain
``when: {vector: w, metric: dot, above: -b}`` condition (Alain & Bengio, arXiv 1610.01644, linear probes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LinearProbe:
    weight_D: Tensor
    bias: float

    def scores(self, x_ND: Tensor) -> Tensor:
        return x_ND.float() @ self.weight_D + self.bias


def fit_probe(
    pos_ND: Tensor, neg_ND: Tensor, *, l2: float = 1e-2, steps: int = 200, neg_weight_N: Tensor | None = None
) -> LinearProbe:
    """Logistic regression of positives (label 1) against negatives (label 0), classes weighted equally.

    ``neg_weight_N`` (optional, non-negative) spreads the negative class's half of the loss unevenly over the
    negatives, e.g. to give each harmless dataset the same weight however many prompts it has.
    """
    x = torch.cat([pos_ND, neg_ND]).double()
    y = torch.cat([torch.ones(len(pos_ND)), torch.zeros(len(neg_ND))]).double()
    w_neg = torch.ones(len(neg_ND), dtype=torch.float64) if neg_weight_N is None else neg_weight_N.double()
    if w_neg.shape != (len(neg_ND),) or bool((w_neg < 0).any()) or float(w_neg.sum()) <= 0:
        raise ValueError(f"neg_weight_N must be {len(neg_ND)} non-negative weights with a positive sum")
    weights = torch.cat([torch.full((len(pos_ND),), 0.5 / len(pos_ND), dtype=torch.float64), 0.5 * w_neg / w_neg.sum()])
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        logits = z @ w + b
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * weights).sum()
        loss = loss + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w.detach() / sd).float()
    return LinearProbe(w_raw, float(b.detach() - (w.detach() / sd) @ mu))


def roc_auc(pos_scores: Tensor, neg_scores: Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    p, n = pos_scores.double()[:, None], neg_scores.double()[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def threshold_at_fpr(neg_scores: Tensor, max_fpr: float) -> float:
    """The lowest threshold whose false-positive rate (score > threshold) on ``neg_scores`` is at most ``max_fpr``."""
    if not 0.0 <= max_fpr < 1.0:
        raise ValueError(f"max_fpr must be in [0, 1), got {max_fpr}")
    s = neg_scores.double().sort(descending=True).values
    allowed = int(max_fpr * len(s))  # this many negatives may score above the threshold
    return float(s[allowed])


def rate_above(scores: Tensor, threshold: float) -> float:
    return float((scores > threshold).double().mean()) if len(scores) else float("nan")


def out_of_fold_scores(
    pos_ND: Tensor,
    neg_ND: Tensor,
    fold_pos: Tensor,
    fold_neg: Tensor,
    *,
    l2: float,
    folds: int,
    neg_weight_N: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Every example scored by a probe fitted without its fold: honest scores to pick settings and thresholds on."""
    s_pos, s_neg = torch.empty(len(pos_ND)), torch.empty(len(neg_ND))
    for k in range(folds):
        w = None if neg_weight_N is None else neg_weight_N[fold_neg != k]
        probe = fit_probe(pos_ND[fold_pos != k], neg_ND[fold_neg != k], l2=l2, neg_weight_N=w)
        s_pos[fold_pos == k] = probe.scores(pos_ND[fold_pos == k])
        s_neg[fold_neg == k] = probe.scores(neg_ND[fold_neg == k])
    return s_pos, s_neg
