"""The detector recipe's probe maths on planted data: exact ROC facts, the probes of ``steerlib.extract.probes``
finding planted structure, the recipe's choice and its nested cross-validation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from evals.recipes.probe import rate_above, roc_auc, threshold_at_fpr
from steerlib.extract.probes import fit_logistic_probe


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
    probe = fit_logistic_probe(pos[:200], neg[:200])
    w = probe.weight_D / probe.weight_D.norm()
    assert float(w[5]) > 0.9
    assert roc_auc(probe.scores(pos[200:]), probe.scores(neg[200:])) > 0.99
    # the bias is folded into raw activations: the midpoint between the classes scores about 0
    assert abs(float(probe.scores(offset[None])[0])) < 0.5


def test_negative_weights_move_the_boundary_towards_the_upweighted_negatives() -> None:
    g = torch.Generator().manual_seed(2)
    pos = torch.randn(200, 4, generator=g) + torch.tensor([2.0, 0, 0, 0])
    easy = torch.randn(200, 4, generator=g) - torch.tensor([2.0, 0, 0, 0])
    hard = torch.randn(20, 4, generator=g) + torch.tensor([1.0, 0, 0, 0])  # negatives that look positive
    neg = torch.cat([easy, hard])
    plain = fit_logistic_probe(pos, neg)
    up = fit_logistic_probe(pos, neg, neg_weight_N=torch.cat([torch.ones(200), 20 * torch.ones(20)]))
    assert rate_above(up.scores(hard), 0.0) < rate_above(plain.scores(hard), 0.0)
    same = fit_logistic_probe(pos, neg, neg_weight_N=torch.full((220,), 3.0))  # only relative weights matter
    torch.testing.assert_close(same.weight_D, plain.weight_D, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="neg_weight_N must be 220 non-negative"):
        fit_logistic_probe(pos, neg, neg_weight_N=-torch.ones(220))


def test_detector_choice_picks_the_informative_layer_and_an_honest_threshold() -> None:
    from evals.datasets import Prompt
    from evals.recipes.detector_select import NEG_WEIGHTS, Sets, choose, fold_of
    from evals.recipes.probe import out_of_fold_scores

    g = torch.Generator().manual_seed(1)
    n = 120
    harmful = [Prompt(f"h/{i}", f"harmful request {i}", "h") for i in range(n)]
    harmless = [Prompt(f"b/{i}", f"benign request {i}", "b") for i in range(n)]
    sets = Sets({"h": harmful}, {"b": harmless})
    d = torch.randn(16, generator=g)
    noise = {layer: (torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)) for layer in (3, 7)}
    acts_pos = {"last": {3: noise[3][0], 7: noise[7][0] + 1.5 * d}}  # only layer 7 carries the signal
    acts_neg = {"last": {3: noise[3][1], 7: noise[7][1] - 1.5 * d}}
    choice, grid = choose(acts_pos, acts_neg, sets, max_fpr=0.05)
    assert choice.layer == 7 and choice.pool == "last" and choice.auc > 0.95
    assert max(v["auc"] for k, v in grid.items() if ", layer 3," in k) < 0.75
    # the choice is the best true-positive rate in the grid, and its facts are the ones recorded there
    assert choice.tpr == max(v["tpr"]["all"] for v in grid.values()) == grid[choice.key]["tpr"]["all"]
    fp = torch.tensor([fold_of(p.text, 5) for p in harmful])
    fn = torch.tensor([fold_of(p.text, 5) for p in harmless])
    weights = NEG_WEIGHTS[choice.weights](sets.names("harmless"))
    s_pos, s_neg = out_of_fold_scores(acts_pos["last"][7], acts_neg["last"][7], fp, fn, fit=choice.fitter(), folds=5,
                                      neg_weight_N=weights)  # fmt: skip
    assert rate_above(s_neg, choice.threshold) <= 0.05
    assert rate_above(s_pos, choice.threshold) == choice.tpr


def _xor(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives where the first two coordinates share a sign, negatives where they differ: no line separates them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, 6, generator=g)
    same = (x[:, 0] > 0) == (x[:, 1] > 0)
    return x[same][:n] * 3, x[~same][:n] * 3


def test_mlp_probe_separates_what_a_linear_probe_cannot_and_is_reproducible() -> None:
    from steerlib.extract.probes import fit_mlp_probe

    pos, neg = _xor(150, seed=2)
    linear = fit_logistic_probe(pos, neg)
    mlp = fit_mlp_probe(pos, neg, hidden=16, epochs=400, lr=1e-2)
    assert roc_auc(linear.scores(pos), linear.scores(neg)) < 0.7
    assert roc_auc(mlp.scores(pos), mlp.scores(neg)) > 0.97
    again = fit_mlp_probe(pos, neg, hidden=16, epochs=400, lr=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(mlp.tensors(), again.tensors(), strict=True))
    # the standardisation is folded into the first layer: the probe scores raw activations
    test_pos, test_neg = _xor(100, seed=9)
    assert roc_auc(mlp.scores(test_pos), mlp.scores(test_neg)) > 0.95


def test_choose_takes_the_mlp_candidate_where_only_it_separates() -> None:
    from evals.datasets import Prompt
    from evals.recipes.detector_select import Sets, choose

    pos, neg = _xor(120, seed=5)
    sets = Sets({"h": [Prompt(f"h/{i}", f"h {i}", "h") for i in range(120)]},
                {"b": [Prompt(f"b/{i}", f"b {i}", "b") for i in range(120)]})  # fmt: skip
    choice, grid = choose({"mean": {4: pos}}, {"mean": {4: neg}}, sets, max_fpr=0.05, l2_grid=(1e-2,),
                          mlp_hidden=(16,))  # fmt: skip
    assert choice.probe == "mlp16" and choice.key == "mlp16, pool mean, layer 4, l2 0.01, weights per_set"
    linear = [v for k, v in grid.items() if not k.startswith("mlp")]
    assert choice.auc > 0.75 > max(v["auc"] for v in linear) and choice.tpr > max(v["tpr"]["all"] for v in linear)


def _sets_and_noise(n: int, dim: int, seed: int) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from evals.datasets import Prompt
    from evals.recipes.detector_select import Sets

    g = torch.Generator().manual_seed(seed)
    sets = Sets(
        {"h": [Prompt(f"h/{i}", f"harmful request {i}", "h") for i in range(n)]},
        {
            "b": [Prompt(f"b/{i}", f"benign request {i}", "b") for i in range(n)],
            "mmlu_questions": [Prompt(f"q/{i}", f"question {i}", "mmlu") for i in range(n // 2)],
        },
    )
    pos = {"last": {2: torch.randn(n, dim, generator=g)}}
    neg = {"last": {2: torch.randn(n + n // 2, dim, generator=g)}}
    return sets, pos, neg


def test_nested_cv_scores_each_fold_with_the_recipe_run_without_it() -> None:
    from evals.recipes.detector_select import choose, fit_choice, fold_of, nested_cv, rows

    sets, pos, neg = _sets_and_noise(60, 8, seed=3)
    pos["last"][2][:, 0] += 2.0  # a real but imperfect signal
    cv = nested_cv(pos, neg, sets, max_fpr=0.05, folds=3)
    assert set(cv.harmful) == {"h"} and set(cv.harmless) == {"b"}  # the extra training questions are never scored
    assert (len(cv.harmful["h"]), len(cv.harmless["b"])) == (60, 60) and len(cv.choices) == 3
    assert bool(torch.isfinite(cv.harmful["h"]).all() and torch.isfinite(cv.harmless["b"]).all())
    # fold 1 by hand: choose and fit on everything else (the extra questions included), score fold 1
    fold = [fold_of(p.text, 3, salt="detector-outer") for p in sets.harmful["h"] + sets.harmless["b"]]

    def keep(n: str, p: Any) -> bool:
        return n == "mmlu_questions" or fold_of(p.text, 3, salt="detector-outer") != 1

    m_pos, m_neg = sets.mask("harmful", keep), sets.mask("harmless", keep)
    inner_pos, inner_neg = rows(pos, m_pos), rows(neg, m_neg)
    choice, _ = choose(inner_pos, inner_neg, sets.where(keep), max_fpr=0.05)
    assert choice == cv.choices[1]
    probe = fit_choice(inner_pos, inner_neg, sets.where(keep), choice)
    want = probe.scores(pos["last"][2][~m_pos]) - choice.threshold
    torch.testing.assert_close(cv.harmful["h"][torch.tensor(fold[:60]) == 1], want)
    assert int((~m_neg).sum()) == fold[60:].count(1)  # the held-out fold of the benign set, no extra question


def test_nested_cv_is_honest_where_the_in_sample_fit_is_not() -> None:
    """On pure noise a probe separates its own training prompts; the nested estimate stays near chance."""
    from evals.recipes.detector_select import Choice, fit_choice, nested_cv

    sets, pos, neg = _sets_and_noise(40, 48, seed=4)
    cv = nested_cv(pos, neg, sets, max_fpr=0.05, folds=4)
    fitted = fit_choice(pos, neg, sets, Choice("last", 2, 1e-3, "uniform", 0.0, 0.0, 0.0))
    in_sample = roc_auc(fitted.scores(pos["last"][2]), fitted.scores(neg["last"][2][:40]))
    assert in_sample > 0.95
    assert roc_auc(cv.harmful["h"], cv.harmless["b"]) < 0.7


def test_rates_report_counts_margins_above_zero_and_takes_an_empty_side() -> None:
    from evals.recipes.detector import rates_report

    r = rates_report({}, {"m": torch.tensor([1.0, -1.0, 0.0, 2.0])})
    assert r["roc_auc"] is None and r["true_positive_rate"] == {"all": {"k": 0, "n": 0}}
    assert (r["false_positive_rate"]["m"]["k"], r["false_positive_rate"]["m"]["n"]) == (2, 4)
    r = rates_report({"h": torch.tensor([0.5, 3.0])}, {"m": torch.tensor([-1.0, 1.0])})
    assert r["roc_auc"] == 0.75 and r["true_positive_rate"]["all"]["rate"] == 1.0


@pytest.mark.parametrize(("args", "message"), [(["--max-fpr", "1.5"], "--max-fpr must be in [0, 1)"),
                                                (["--folds", "1"], "--folds must be at least 2")])  # fmt: skip
def test_detector_command_rejects_bad_settings_before_any_work(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from evals.recipes.detector import main

    with pytest.raises(SystemExit):
        main(["--out", "unused", *args])
    assert message in capsys.readouterr().err
