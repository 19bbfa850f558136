"""The ROC facts a detector is judged by, and out-of-fold probe scores to choose it on.

The probes themselves (logistic and MLP) are steerlib's: :mod:`steerlib.extract.probes`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from steerlib.extract.probes import Probe

ProbeFit = Callable[[Tensor, Tensor, Tensor | None], Probe]
"""Fits a probe on ``(positives, negatives, negative weights)``."""


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
    fit: ProbeFit,
    folds: int,
    neg_weight_N: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Every example scored by a probe fitted without its fold: honest scores to pick settings and thresholds on."""
    s_pos, s_neg = torch.empty(len(pos_ND), device=pos_ND.device), torch.empty(len(neg_ND), device=neg_ND.device)
    for k in range(folds):
        w = None if neg_weight_N is None else neg_weight_N[fold_neg != k]
        probe = fit(pos_ND[fold_pos != k], neg_ND[fold_neg != k], w)
        s_pos[fold_pos == k] = probe.scores(pos_ND[fold_pos == k])
        s_neg[fold_neg == k] = probe.scores(neg_ND[fold_neg == k])
    return s_pos, s_neg
