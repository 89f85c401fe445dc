"""Private selection against Papernot & Steinke 2022's closed forms (computed by hand here), an independent
implementation (dp-accounting's), the package's RDP accountant, and the distributions' own definitions."""

import math

import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import _compute_rdp_repeat_and_select
from scipy import stats

from adaclip.privacy.accounting import epsilon
from adaclip.privacy.selection import (
    ORDERS,
    PoissonRuns,
    TruncatedNegativeBinomial,
    composition_epsilon,
    draw_number_of_runs,
    rdp_delta,
    rdp_epsilon,
    selection_epsilon,
    selection_rdp,
    single_run_rdp,
    truncated_negative_binomial_with_mean,
)

# the Gaussian mechanism with sensitivity 1 and sigma = 2 has the RDP curve lambda / (2 sigma^2) (Mironov 2017)
SMALL_ORDERS = [2.0, 4.0, 8.0, 16.0]
GAUSSIAN_CURVE = [order / 8 for order in SMALL_ORDERS]
RUN = dict(noise_multiplier=1.0, sample_rate=0.005, steps=2000)


def test_means_match_definition_1():
    assert TruncatedNegativeBinomial(1.0, 0.1).mean == pytest.approx(10.0, rel=1e-12)  # geometric: 1 / gamma
    assert TruncatedNegativeBinomial(0.0, 0.1).mean == pytest.approx(9 / math.log(10), rel=1e-12)  # logarithmic
    assert TruncatedNegativeBinomial(2.0, 0.5).mean == pytest.approx(2 * 0.5 / (0.5 * 0.75), rel=1e-12)
    # the mean is continuous in the shape at 0
    assert TruncatedNegativeBinomial(1e-9, 0.1).mean == pytest.approx(TruncatedNegativeBinomial(0.0, 0.1).mean)


@pytest.mark.parametrize("shape", [-0.5, 0.0, 1.0, 3.0])
def test_the_halting_probability_for_a_mean_gives_that_mean(shape):
    runs = truncated_negative_binomial_with_mean(shape, 10.0)
    assert runs.shape == shape
    assert runs.mean == pytest.approx(10.0, rel=1e-9)
    assert truncated_negative_binomial_with_mean(1.0, 8.0).halting == 1 / 8


def _truncated_pmf(runs: TruncatedNegativeBinomial, k: np.ndarray) -> np.ndarray:
    """Definition 1 through scipy: the negative binomial conditioned on K >= 1, the log-series for shape 0."""
    if runs.shape == 0:
        return stats.logser.pmf(k, 1 - runs.halting)
    return stats.nbinom.pmf(k, runs.shape, runs.halting) / (1 - runs.halting**runs.shape)


@pytest.mark.parametrize("shape", [0.0, 1.0, 2.5])
def test_draws_follow_the_truncated_negative_binomial(shape):
    runs = truncated_negative_binomial_with_mean(shape, 6.0)
    rng = np.random.default_rng(7)
    draws = np.array([draw_number_of_runs(runs, rng) for _ in range(8000)])
    k = np.arange(1, 400)
    empirical = np.searchsorted(np.sort(draws), k, side="right") / len(draws)
    # DKW: the sup distance exceeds 0.025 with probability below 2 exp(-2 n 0.025^2) = 9e-5
    assert np.abs(empirical - np.cumsum(_truncated_pmf(runs, k))).max() < 0.025
    assert draws.min() >= 1


def test_draws_are_reproducible_and_poisson_may_be_zero():
    runs = TruncatedNegativeBinomial(1.0, 0.2)
    assert [draw_number_of_runs(runs, seed) for seed in range(20)] == [
        draw_number_of_runs(runs, seed) for seed in range(20)
    ]
    draws = [draw_number_of_runs(PoissonRuns(2.0), seed) for seed in range(2000)]
    assert 0 in draws
    assert np.mean(draws) == pytest.approx(2.0, abs=0.15)


def test_theorem_2_geometric_by_hand():
    gamma = 0.1  # E[K] = 10, eta = 1
    curve = selection_rdp(GAUSSIAN_CURVE, TruncatedNegativeBinomial(1.0, gamma), SMALL_ORDERS)
    # min over lambda_hat of (1 - 1/l) eps(l) + log(1/gamma) / l: 1.2763 at 2, 0.9506 at 4, 1.1628 at 8, 2.0189 at 16
    overhead = 2 * (0.75 * 0.5 + math.log(10) / 4)
    by_hand = [
        eps + overhead + math.log(10) / (order - 1) for order, eps in zip(SMALL_ORDERS, GAUSSIAN_CURVE, strict=True)
    ]
    assert by_hand[0] > by_hand[1]  # order 2 is improved by monotonicity in the order
    expected = [by_hand[1], by_hand[1], by_hand[2], by_hand[3]]
    np.testing.assert_allclose(curve, expected, rtol=1e-12)
    assert by_hand[1] == pytest.approx(3.168821, abs=1e-6)


def test_theorem_2_logarithmic_by_hand():
    gamma = 0.05
    mean = (1 / gamma - 1) / math.log(1 / gamma)
    curve = selection_rdp(GAUSSIAN_CURVE, TruncatedNegativeBinomial(0.0, gamma), SMALL_ORDERS)
    overhead = min((1 - 1 / o) * e + math.log(1 / gamma) / o for o, e in zip(SMALL_ORDERS, GAUSSIAN_CURVE, strict=True))
    assert overhead == pytest.approx(0.75 * 0.5 + math.log(20) / 4)  # lambda_hat = 4
    by_hand = [e + overhead + math.log(mean) / (o - 1) for o, e in zip(SMALL_ORDERS, GAUSSIAN_CURVE, strict=True)]
    np.testing.assert_allclose(curve, np.minimum.accumulate(by_hand[::-1])[::-1], rtol=1e-12)


def test_theorem_6_poisson_by_hand():
    mu = 10.0
    curve = selection_rdp(GAUSSIAN_CURVE, PoissonRuns(mu), SMALL_ORDERS)
    by_hand = []
    for order, eps in zip(SMALL_ORDERS, GAUSSIAN_CURVE, strict=True):
        eps_hat = math.log(1 + 1 / (order - 1))  # e^eps_hat <= 1 + 1/(lambda - 1), at equality
        delta_hat = min(
            1.0,
            min(
                math.exp((o - 1) * (e - eps_hat + math.log(1 - 1 / o)) - math.log(o))
                for o, e in zip(SMALL_ORDERS, GAUSSIAN_CURVE, strict=True)
            ),
        )
        by_hand.append(eps + mu * delta_hat + math.log(mu) / (order - 1))
    np.testing.assert_allclose(curve, np.minimum.accumulate(by_hand[::-1])[::-1], rtol=1e-12)


@pytest.mark.parametrize("shape", [0.0, 0.5, 1.0, 3.0])
def test_truncated_negative_binomial_matches_dp_accounting(shape):
    one_run = single_run_rdp(**RUN)
    runs = truncated_negative_binomial_with_mean(shape, 10.0)
    theirs = _compute_rdp_repeat_and_select(list(ORDERS), list(one_run), runs.mean, shape)
    np.testing.assert_allclose(selection_rdp(one_run, runs), theirs, rtol=1e-8)


def test_poisson_is_never_below_dp_accounting():
    # dp-accounting also bounds delta_hat through the KL divergence, so its curve may be lower, never higher
    # (once tightened by monotonicity in the order, which it applies to the negative binomial only)
    one_run = single_run_rdp(**RUN)
    mine = selection_rdp(one_run, PoissonRuns(10.0))
    theirs = np.minimum.accumulate(_compute_rdp_repeat_and_select(list(ORDERS), list(one_run), 10.0, np.inf)[::-1])[
        ::-1
    ]
    assert (mine >= theirs * (1 - 1e-12)).all()
    assert rdp_epsilon(mine, 1e-5) == pytest.approx(rdp_epsilon(theirs, 1e-5), rel=1e-3)


def test_one_run_is_the_package_rdp_accountant():
    assert rdp_epsilon(single_run_rdp(**RUN), 1e-5) == pytest.approx(
        epsilon(**RUN, delta=1e-5, accountant="rdp"), rel=1e-12
    )


def test_rdp_delta_inverts_the_conversion_and_bounds_the_exact_gaussian():
    one_run = single_run_rdp(**RUN)
    eps = rdp_epsilon(one_run, 1e-5)
    assert rdp_delta(ORDERS, one_run, eps) == pytest.approx(1e-5, rel=1e-6)
    # sigma = 2, one Gaussian mechanism: exact delta(eps = 1) (Balle & Wang 2018, Thm. 8) is below the RDP bound
    mu = 0.5
    exact = stats.norm.cdf(mu / 2 - 1 / mu) - math.e * stats.norm.cdf(-mu / 2 - 1 / mu)
    orders = np.linspace(1.5, 60, 200)
    assert exact < rdp_delta(orders, orders / 8, 1.0) < 3 * exact


def test_selection_costs_more_than_one_run_and_grows_with_the_mean():
    one = epsilon(**RUN, delta=1e-5, accountant="rdp")
    for shape in (0.0, 1.0):
        values = [
            selection_epsilon(**RUN, delta=1e-5, distribution=truncated_negative_binomial_with_mean(shape, mean))
            for mean in (2.0, 10.0, 100.0)
        ]
        assert one < values[0] < values[1] < values[2]
    poisson = [selection_epsilon(**RUN, delta=1e-5, distribution=PoissonRuns(mu)) for mu in (2.0, 10.0, 100.0)]
    assert poisson[0] < poisson[1] < poisson[2]
    more_noise = dict(RUN, noise_multiplier=1.5)
    geometric = TruncatedNegativeBinomial(1.0, 0.1)
    assert selection_epsilon(**more_noise, delta=1e-5, distribution=geometric) < selection_epsilon(
        **RUN, delta=1e-5, distribution=geometric
    )


def test_selected_curves_never_fall_with_the_order():
    one_run = single_run_rdp(**RUN)
    for runs in (TruncatedNegativeBinomial(0.5, 0.05), PoissonRuns(5.0)):
        assert (np.diff(selection_rdp(one_run, runs)) >= 0).all()


def test_composition_is_the_accountant_over_all_steps():
    assert composition_epsilon(**RUN, runs=1, delta=1e-5) == pytest.approx(epsilon(**RUN, delta=1e-5))
    values = [composition_epsilon(**RUN, runs=k, delta=1e-5, accountant="rdp") for k in (1, 2, 10)]
    assert values[0] < values[1] < values[2]
    assert values[2] == pytest.approx(rdp_epsilon(10 * single_run_rdp(**RUN), 1e-5), rel=1e-12)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TruncatedNegativeBinomial(-1.0, 0.5), "shape must be"),
        (lambda: TruncatedNegativeBinomial(math.nan, 0.5), "shape must be"),
        (lambda: TruncatedNegativeBinomial(True, 0.5), "shape must be"),
        (lambda: TruncatedNegativeBinomial(1.0, 1.0), "halting must lie in"),
        (lambda: TruncatedNegativeBinomial(1.0, 0.0), "halting must lie in"),
        (lambda: PoissonRuns(0.0), "mean must be"),
        (lambda: PoissonRuns(math.inf), "mean must be"),
        (lambda: PoissonRuns(0.5), "mean must be a finite number >= 1"),
        (lambda: truncated_negative_binomial_with_mean(1.0, 1.0), "mean must be a finite number > 1"),
        (lambda: truncated_negative_binomial_with_mean(-2.0, 5.0), "shape must be"),
        (lambda: draw_number_of_runs(TruncatedNegativeBinomial(1.0, 0.5), -1), "rng must be"),
        (lambda: draw_number_of_runs(10, 0), "distribution must be"),
        (lambda: selection_rdp([0.1, 0.2], PoissonRuns(2.0), [1.0, 2.0]), "orders must be"),
        (lambda: selection_rdp([0.1, 0.2], PoissonRuns(2.0), [3.0, 2.0]), "strictly increasing"),
        (lambda: selection_rdp([0.1], PoissonRuns(2.0), [2.0, 3.0]), "one non-negative RDP value per order"),
        (lambda: selection_rdp([0.1, math.nan], PoissonRuns(2.0), [2.0, 3.0]), "one non-negative RDP value"),
        (lambda: selection_rdp([0.1, 0.2], "poisson", [2.0, 3.0]), "distribution must be"),
        (lambda: rdp_epsilon([0.1, 0.2], 0.0, [2.0, 3.0]), "delta must lie in"),
        (lambda: rdp_epsilon([math.inf, math.inf], 1e-5, [2.0, 3.0]), "no finite epsilon"),
        (lambda: rdp_delta([2.0, 3.0], [0.1, 0.2], -1.0), "epsilon must be"),
        (lambda: single_run_rdp(noise_multiplier=1.0, sample_rate=1.5, steps=10), "sample_rate must lie in"),
        (lambda: single_run_rdp(noise_multiplier=0.0, sample_rate=0.1, steps=10), "noise_multiplier must be"),
        (lambda: composition_epsilon(**RUN, runs=0, delta=1e-5), "runs must be an int >= 1"),
    ],
)
def test_bad_inputs_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()
