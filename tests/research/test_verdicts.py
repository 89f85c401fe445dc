"""Verdict statistics against textbook values, scipy and data whose answer is known by construction."""

import math

import numpy as np
import pytest
from scipy import stats

from adaclip.research.verdicts import (
    VERDICTS,
    BoundedInterval,
    PairedComparison,
    bootstrap_mean_interval,
    claim_verdicts,
    difference_p_value,
    equivalence_p_value,
    holm_adjust,
    paired_bootstrap_interval,
    paired_comparison,
    verdict,
    wilson_interval,
)

ACCURACY = (0.0, 100.0)


@pytest.mark.parametrize(
    "correct, n, low, high",
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table II, method 3 (score)
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_newcombe_1998(correct, n, low, high):
    interval = wilson_interval(correct, n)
    assert interval.estimate == correct / n
    assert (round(interval.low, 4), round(interval.high, 4)) == (low, high)


def test_wilson_stays_in_the_unit_interval_where_a_wald_interval_does_not():
    interval = wilson_interval(56, 57)  # a Breast Cancer sized test set, one error
    wald_high = 56 / 57 + 1.96 * math.sqrt(56 / 57 * (1 / 57) / 57)
    assert wald_high > 1 >= interval.high > interval.low >= 0
    assert wilson_interval(57, 57).high == pytest.approx(1.0, abs=1e-15)
    assert wilson_interval(0, 57).low == pytest.approx(0.0, abs=1e-15)
    assert wilson_interval(40, 57, confidence=0.99).low < wilson_interval(40, 57).low


def test_holm_on_the_textbook_example():
    # four hypotheses at alpha = 0.05: Holm rejects the two smallest, Bonferroni only the smallest
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [p <= 0.05 for p in adjusted] == [True, False, False, True]
    assert holm_adjust([0.2]) == [0.2]
    assert holm_adjust([0.5, 0.6]) == [1.0, 1.0]


def test_holm_lies_between_the_raw_and_the_bonferroni_values():
    raw = np.random.default_rng(3).uniform(0, 0.2, size=12)
    adjusted = np.array(holm_adjust(raw))
    assert (adjusted >= raw).all()
    assert (adjusted <= np.minimum(1, 12 * raw) + 1e-15).all()


def test_difference_and_equivalence_p_values_match_scipy():
    differences = np.random.default_rng(0).normal(0.2, 0.4, size=9)
    assert difference_p_value(differences) == pytest.approx(stats.ttest_1samp(differences, 0.0).pvalue, rel=1e-10)
    lower = stats.ttest_1samp(differences, -0.5, alternative="greater").pvalue
    upper = stats.ttest_1samp(differences, 0.5, alternative="less").pvalue
    assert equivalence_p_value(differences, 0.5) == pytest.approx(max(lower, upper), rel=1e-10)


def test_tost_on_data_whose_answer_is_known():
    noise = np.random.default_rng(1).normal(0, 1, size=20)
    noise = (noise - noise.mean()) / noise.std(ddof=1)  # mean 0, sd 1 exactly
    assert equivalence_p_value(0.1 + 0.05 * noise, margin=0.5) < 1e-10  # far inside the margin
    assert equivalence_p_value(0.6 + 0.05 * noise, margin=0.5) > 0.99  # outside: certainly not equivalent
    # the mean sits 1.729 standard errors inside the margin: t_{0.95, 19} = 1.729, so p = 0.05
    standard_error = 0.2 / math.sqrt(20)
    inside = 0.5 - stats.t.ppf(0.95, 19) * standard_error
    assert equivalence_p_value(inside + 0.2 * noise, margin=0.5) == pytest.approx(0.05, rel=1e-9)


def test_constant_differences_are_decided_without_a_variance():
    assert difference_p_value([0.0, 0.0, 0.0]) == 1.0
    assert difference_p_value([0.3, 0.3, 0.3]) == 0.0
    assert equivalence_p_value([0.3, 0.3], 0.5) == 0.0
    assert equivalence_p_value([0.5, 0.5], 0.5) == 0.5  # on the margin: t = 0, as for any spread
    assert equivalence_p_value([0.6, 0.6], 0.5) == 1.0


def test_bootstrap_intervals_match_scipy_and_stay_in_range():
    values = np.random.default_rng(2).uniform(80, 95, size=15)
    ours = bootstrap_mean_interval(values, metric_range=ACCURACY, resamples=40_000, seed=4)
    theirs = stats.bootstrap((values,), np.mean, method="percentile", n_resamples=40_000, rng=5).confidence_interval
    assert ours.estimate == pytest.approx(values.mean())
    assert ours.low == pytest.approx(theirs.low, abs=0.05)
    assert ours.high == pytest.approx(theirs.high, abs=0.05)
    near_the_top = [100.0, 100.0, 100.0, 60.0]
    t_high = np.mean(near_the_top) + stats.t.ppf(0.975, 3) * np.std(near_the_top, ddof=1) / 2
    assert t_high > 100 >= bootstrap_mean_interval(near_the_top, metric_range=ACCURACY).high
    assert bootstrap_mean_interval(near_the_top, metric_range=ACCURACY, seed=9) == bootstrap_mean_interval(
        near_the_top, metric_range=ACCURACY, seed=9
    )


def test_paired_bootstrap_resamples_pairs():
    baseline = np.random.default_rng(5).uniform(70, 90, size=10)
    interval = paired_bootstrap_interval(baseline + 1.0, baseline, metric_range=ACCURACY)
    # the differences are all 1: pairing removes the between-seed spread entirely
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((1.0, 1.0, 1.0))
    unpaired_spread = paired_bootstrap_interval(baseline + 1.0, baseline[::-1], metric_range=ACCURACY)
    assert unpaired_spread.high - unpaired_spread.low > 5


def _comparison(p_difference: float, p_equivalence: float, estimate: float) -> PairedComparison:
    return PairedComparison(
        BoundedInterval(estimate, estimate - 1, estimate + 1, 5), p_difference, p_equivalence, 0.5, True
    )


def test_a_tie_is_never_a_win():
    baseline = [88.1, 89.0, 88.7, 89.4, 88.9]
    tie = paired_comparison(baseline, baseline, margin=0.5, metric_range=ACCURACY)
    assert claim_verdicts([tie]) == ["equivalent"]
    noisy_tie = paired_comparison(
        [88.1, 89.9, 87.7, 90.4, 88.0], baseline, margin=0.1, metric_range=ACCURACY
    )  # differences 0, 0.9, -1, 1, -0.9: mean 0 with a wide spread
    assert claim_verdicts([noisy_tie]) == ["inconclusive"]


def test_clear_differences_are_better_or_worse_in_the_metric_direction():
    baseline = np.array([88.1, 89.0, 88.7, 89.4, 88.9, 88.5])
    shift = np.array([2.0, 2.1, 1.9, 2.05, 1.95, 2.0])
    better = paired_comparison(baseline + shift, baseline, margin=0.5, metric_range=ACCURACY)
    worse = paired_comparison(baseline - shift, baseline, margin=0.5, metric_range=ACCURACY)
    assert claim_verdicts([better, worse]) == ["better", "worse"]
    mse = np.array([0.45, 0.44, 0.46, 0.47, 0.43, 0.45])
    lower_mse = paired_comparison(
        mse - 0.1 * shift, mse, margin=0.05, metric_range=(0.0, math.inf), higher_is_better=False
    )
    assert claim_verdicts([lower_mse]) == ["better"]


def test_holm_turns_marginal_wins_into_inconclusive():
    comparisons = [_comparison(0.03, 0.9, 0.8) for _ in range(3)]
    assert [verdict(c, p_difference=0.03, p_equivalence=0.9) for c in comparisons] == ["better"] * 3
    assert claim_verdicts(comparisons) == ["inconclusive"] * 3  # 3 x 0.03 = 0.09 > 0.05
    assert claim_verdicts([_comparison(0.01, 0.9, 0.8), *comparisons[:2]]) == ["better", "inconclusive", "inconclusive"]


def test_a_significant_difference_inside_the_margin_is_equivalent():
    assert claim_verdicts([_comparison(0.001, 0.001, 0.1)]) == ["equivalent"]
    assert set(claim_verdicts([_comparison(0.2, 0.2, 0.1), _comparison(0.001, 0.3, -2.0)])) <= set(VERDICTS)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: wilson_interval(58, 57), "correct must be an int in"),
        (lambda: wilson_interval(-1, 57), "correct must be an int in"),
        (lambda: wilson_interval(3.0, 57), "correct must be an int in"),
        (lambda: wilson_interval(0, 0), "n must be an int >= 1"),
        (lambda: wilson_interval(3, 10, confidence=1.0), "confidence must lie in"),
        (lambda: bootstrap_mean_interval([99.0, 101.0], metric_range=ACCURACY), "metric's range"),
        (lambda: bootstrap_mean_interval([99.0, math.nan], metric_range=ACCURACY), "metric's range"),
        (lambda: bootstrap_mean_interval([99.0], metric_range=ACCURACY), "at least 2 scores"),
        (lambda: bootstrap_mean_interval([1.0, 2.0], metric_range=(5.0, 5.0)), "metric_range must be"),
        (lambda: bootstrap_mean_interval([1.0, 2.0], metric_range=ACCURACY, resamples=10), "resamples must be"),
        (lambda: paired_bootstrap_interval([1.0, 2.0], [1.0, 2.0, 3.0], metric_range=ACCURACY), "equal length"),
        (lambda: holm_adjust([]), "p_values must be"),
        (lambda: holm_adjust([0.2, 1.2]), "p_values must be"),
        (lambda: holm_adjust([0.2, math.nan]), "p_values must be"),
        (lambda: difference_p_value([0.1, math.inf]), "differences must be"),
        (lambda: equivalence_p_value([0.1, 0.2], 0.0), "margin must be"),
        (lambda: verdict(_comparison(0.1, 0.1, 1.0), p_difference=math.nan, p_equivalence=0.1), "p_difference"),
        (lambda: verdict(_comparison(0.1, 0.1, 1.0), p_difference=0.1, p_equivalence=0.1, level=0), "level"),
        (lambda: claim_verdicts([]), "at least one"),
    ],
)
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
