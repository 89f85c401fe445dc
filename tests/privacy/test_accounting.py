"""Accounting against closed forms, published test vectors and an independent accountant."""

import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from adaclip.privacy.accounting import epsilon, noise_multiplier_for


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
