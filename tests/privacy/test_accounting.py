"""Accounting against closed forms, published test vectors and an independent accountant."""

import math
import typing

import numpy as np
import pytest
from dp_accounting.pld.privacy_loss_distribution import from_gaussian_mechanism
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV
from scipy.optimize import brentq
from scipy.stats import norm

from adaclip.privacy.accounting import (
    ACCOUNTANTS,
    BACKENDS,
    Accountant,
    AccountingFallbackWarning,
    account,
    epsilon,
    grid_points,
    noise_multiplier_for,
)


def gaussian_mechanism_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of one Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, Thm. 8)."""
    mu = 1 / sigma

    def delta_at(eps: float) -> float:
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu)

    return brentq(lambda eps: delta_at(eps) - delta, 0, 100, xtol=1e-12)


def test_gaussian_mechanism_closed_form_vector():
    assert gaussian_mechanism_epsilon(1.0, 1e-5) == pytest.approx(4.377178, abs=1e-6)


def test_pld_matches_the_gaussian_mechanism_closed_form():
    exact = gaussian_mechanism_epsilon(1.0, 1e-5)
    assert epsilon(noise_multiplier=1.0, sample_rate=1.0, steps=1, delta=1e-5, accountant="pld") == pytest.approx(
        exact, abs=1e-4
    )
    # PRV is an upper bound within its eps_error of 0.01
    prv = epsilon(noise_multiplier=1.0, sample_rate=1.0, steps=1, delta=1e-5, accountant="prv")
    assert exact <= prv <= exact + 0.02


def test_rdp_vector():
    assert epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5, accountant="rdp") == pytest.approx(
        7.32911117, abs=1e-6
    )


@pytest.mark.parametrize(
    "sigma, q, steps",
    [(4.0, 0.01, 10000), (1.0, 0.004, 2340), (0.8, 0.02, 500), (2.0, 0.1, 100)],
)
def test_prv_and_pld_agree_and_rdp_is_looser(sigma, q, steps):
    values = {
        acc: epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant=acc)
        for acc in ("prv", "pld", "rdp")
    }
    assert abs(values["prv"] - values["pld"]) <= max(0.01 * values["pld"], 0.02)
    assert values["rdp"] > values["pld"]


def test_published_pld_and_rdp_vector():
    assert epsilon(noise_multiplier=4.0, sample_rate=0.01, steps=10000, delta=1e-5, accountant="rdp") == pytest.approx(
        1.0355, abs=1e-4
    )
    assert epsilon(noise_multiplier=4.0, sample_rate=0.01, steps=10000, delta=1e-5, accountant="pld") == pytest.approx(
        0.9470, abs=1e-4
    )


def test_epsilon_falls_with_noise_and_grows_with_steps():
    base = dict(sample_rate=0.01, delta=1e-5, accountant="prv")
    assert epsilon(noise_multiplier=2.0, steps=1000, **base) < epsilon(noise_multiplier=1.0, steps=1000, **base)
    assert epsilon(noise_multiplier=1.0, steps=2000, **base) > epsilon(noise_multiplier=1.0, steps=1000, **base)


@pytest.mark.parametrize("accountant", ["prv", "pld", "rdp"])
def test_calibration_round_trips(accountant):
    setting = dict(sample_rate=0.01, steps=1000, delta=1e-5, accountant=accountant)
    sigma = noise_multiplier_for(target_epsilon=2.0, **setting)
    eps = epsilon(noise_multiplier=sigma, **setting)
    assert 2.0 * (1 - 0.005) <= eps <= 2.0
    # a slightly smaller sigma would overspend
    assert epsilon(noise_multiplier=sigma * 0.98, **setting) > 2.0


def test_negative_epsilon_is_clamped_with_a_warning():
    with pytest.warns(UserWarning, match="reporting 0"):
        assert epsilon(noise_multiplier=100.0, sample_rate=0.01, steps=1, delta=0.99, accountant="rdp") == 0.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(noise_multiplier=0.0), "noise_multiplier"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(delta=1.0), "delta"),
        (dict(delta=0.0), "delta"),
        (dict(accountant="gdp"), "accountant"),
    ],
)
def test_bad_inputs_are_named(kwargs, name):
    args = dict(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=1e-5, accountant="prv") | kwargs
    with pytest.raises(ValueError, match=name):
        epsilon(**args)


def test_calibration_rejects_bad_target():
    with pytest.raises(ValueError, match="target_epsilon"):
        noise_multiplier_for(target_epsilon=-1.0, sample_rate=0.01, steps=10, delta=1e-5)


# --- bounded work: the examples answer at once or refuse in one line -------------------------------------


@pytest.mark.parametrize("accountant", ["prv", "pld"])
def test_a_grid_over_budget_falls_back_to_rdp_and_says_so(accountant):
    """``epsilon(sigma=0.05, q=0.01, T=1000)`` asked PRV for 25.8 GiB and PLD for 300 s."""
    setting = dict(noise_multiplier=0.05, sample_rate=0.01, steps=1000, delta=1e-5)
    rdp = epsilon(accountant="rdp", **setting)
    with pytest.warns(AccountingFallbackWarning, match=rf"the {accountant.upper()} accountant would discretise .* RDP"):
        spent = account(accountant=accountant, **setting)
    assert spent.epsilon == rdp and spent.accountant == "rdp" and spent.requested == accountant
    assert "grid points" in spent.fallback and "budget" in spent.fallback


@pytest.mark.parametrize("accountant", ["prv", "pld"])
def test_calibration_for_a_huge_target_returns_a_safe_sigma_and_says_how(accountant):
    """``noise_multiplier_for(target_epsilon=1e4)`` grew past 12.9 GB."""
    setting = dict(sample_rate=0.01, steps=1000, delta=1e-5)
    with pytest.warns(AccountingFallbackWarning, match="calibration for target_epsilon=10000"):
        sigma = noise_multiplier_for(target_epsilon=1e4, accountant=accountant, **setting)
    rdp = epsilon(noise_multiplier=sigma, accountant="rdp", **setting)
    assert 1e4 * (1 - 0.005) <= rdp <= 1e4  # RDP bounds the true epsilon from above: the sigma is safe


def test_settings_within_budget_use_the_requested_accountant(recwarn):
    spent = account(noise_multiplier=1.0, sample_rate=0.004, steps=2350, delta=1e-5, accountant="prv")
    assert spent.accountant == "prv" and spent.fallback is None
    assert not [w for w in recwarn if issubclass(w.category, AccountingFallbackWarning)]


def test_prv_grid_prediction_is_opacuss_own_domain():
    for sigma, q, steps in [(1.0, 0.004, 2350), (0.5, 0.01, 1000), (2.0, 1.0, 2)]:
        domain = PRVAccountant()._get_domain(
            prvs=[PoissonSubsampledGaussianPRV(q, sigma)],
            num_self_compositions=[steps],
            eps_error=0.01,
            delta_error=1e-5 / 1000,
        )
        assert grid_points(sigma, q, steps, 1e-5, "prv")[1] == pytest.approx(
            domain.size, abs=5
        )  # alignment rounds each end


def test_pld_step_grid_prediction_is_dp_accountings_own_size():
    for sigma, q in [(2.0, 0.1), (0.8, 0.02)]:
        pld = from_gaussian_mechanism(standard_deviation=sigma, value_discretization_interval=1e-4, sampling_prob=q)
        assert grid_points(sigma, q, 10, 1e-5, "pld")[0] == pytest.approx(pld._pmf_remove.size, abs=3)


@pytest.mark.parametrize("sigma", [1e300, 2e6, float("inf"), float("nan")])
def test_noise_multipliers_beyond_the_cap_are_refused_in_one_line(sigma):
    with pytest.raises(ValueError, match=r"noise_multiplier must be a number in \(0, 1e\+06\]"):
        epsilon(noise_multiplier=sigma, sample_rate=0.01, steps=10, delta=1e-5)


def test_an_unreachable_target_names_the_cap():
    with pytest.raises(ValueError, match=r"even noise_multiplier=1e\+06 exceeds it"):
        noise_multiplier_for(target_epsilon=1e-9, sample_rate=0.01, steps=10**6, delta=1e-5, accountant="rdp")


def test_numpy_scalars_are_numbers():
    value = epsilon(
        noise_multiplier=np.float32(1.0), sample_rate=np.float64(0.01), steps=np.int64(100), delta=np.float32(1e-5)
    )
    assert value == pytest.approx(
        epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=float(np.float32(1e-5)))
    )


def test_the_accountants_are_named_once_in_the_table_of_backends():
    assert typing.get_args(Accountant) == tuple(BACKENDS) == ACCOUNTANTS == ("prv", "pld", "rdp")
    assert all(backend.grid is not None or name == "rdp" for name, backend in BACKENDS.items())
    assert all(BACKENDS[name].calibrate_from in (None, *BACKENDS) for name in BACKENDS)
