"""The detector recipe's probe maths on planted data: exact ROC facts and a probe that finds a planted direction."""

from __future__ import annotations

import pytest
import torch

from evals.recipes.probe import fit_probe, rate_above, roc_auc, threshold_at_fpr


def test_roc_auc_counts_pairs_and_ties() -> None:
    assert roc_auc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 0.0])) == 1.0
    assert roc_auc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    assert roc_auc(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0])) == 0.625  # (0.5 + 0 + 1 + 1) / 4


def test_threshold_at_fpr_admits_at_most_the_budget() -> None:
    neg = torch.arange(100, dtype=torch.float32)  # 0..99
    thr = threshold_at_fpr(neg, 0.05)
    assert thr == 94.0 and rate_above(neg, thr) == 0.05
    assert threshold_at_fpr(neg, 0.0) == 99.0 and rate_above(neg, 99.0) == 0.0
    with pytest.raises(ValueError, match="max_fpr must be in"):
        threshold_at_fpr(neg, 1.0)


def test_probe_recovers_a_planted_direction() -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.zeros(32)
    d[5] = 1.0
    offset = torch.randn(32, generator=g) * 10  # a large shared component, as in a residual stream
    pos = torch.randn(400, 32, generator=g) + offset + 2.0 * d
    neg = torch.randn(400, 32, generator=g) + offset - 2.0 * d
    probe = fit_probe(pos[:200], neg[:200])
    w = probe.weight_D / probe.weight_D.norm()
    assert float(w[5]) > 0.9
    assert roc_auc(probe.scores(pos[200:]), probe.scores(neg[200:])) > 0.99
    # the bias is folded into raw activations: the midpoint between the classes scores about 0
    assert abs(float(probe.scores(offset[None])[0])) < 0.5
