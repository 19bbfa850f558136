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


def test_detector_choice_picks_the_informative_layer_and_an_honest_threshold() -> None:
    from evals.datasets import Prompt
    from evals.recipes.detector import Sets, choose
    from evals.recipes.probe import out_of_fold_scores

    g = torch.Generator().manual_seed(1)
    n = 120
    harmful = [Prompt(f"h/{i}", f"harmful request {i}", "h") for i in range(n)]
    harmless = [Prompt(f"b/{i}", f"benign request {i}", "b") for i in range(n)]
    sets = Sets({"h": harmful}, {"b": harmless})
    d = torch.randn(16, generator=g)
    noise = {layer: (torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)) for layer in (3, 7)}
    acts_pos = {3: noise[3][0], 7: noise[7][0] + 1.5 * d}  # only layer 7 carries the signal
    acts_neg = {3: noise[3][1], 7: noise[7][1] - 1.5 * d}
    choice, grid = choose(acts_pos, acts_neg, sets, max_fpr=0.05)
    assert choice.layer == 7 and choice.auc > 0.95
    assert max(v for k, v in grid.items() if k.startswith("layer 3")) < 0.75
    from evals.recipes.detector import fold_of

    fp = torch.tensor([fold_of(p.text, 5) for p in harmful])
    fn = torch.tensor([fold_of(p.text, 5) for p in harmless])
    _, s_neg = out_of_fold_scores(acts_pos[7], acts_neg[7], fp, fn, l2=choice.l2, folds=5)
    assert rate_above(s_neg, choice.threshold) <= 0.05
