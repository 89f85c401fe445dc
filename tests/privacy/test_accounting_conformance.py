"""Conformance of ``adaclip.privacy.accounting`` with independent values.

Complements ``tests/privacy/test_accounting.py`` (which holds the reference vectors, four PRV/PLD/RDP
settings at delta = 1e-5 and one calibration setting) without repeating it:

* the Gaussian mechanism at q = 1 against the analytic Gaussian closed form (Balle & Wang 2018,
  Thm. 8), computed here with scipy in log space, over sigma, steps and delta;
* published test vectors of Opacus and of Google's dp-accounting (each cited at its value);
* PRV against PLD within max(1 %, 0.02) in epsilon, and RDP >= PLD, on 31 settings spanning
  epsilon from 5e-4 to 19;
* sigma calibration round trips against the closed form's own inverse and Opacus's vectors.
"""

import itertools
import math

import pytest
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr

from adaclip.privacy.accounting import epsilon, noise_multiplier_for


def gaussian_delta(eps: float, mu: float) -> float:
    """delta(eps) of the Gaussian mechanism with mu = sensitivity / noise std (Balle & Wang 2018, Thm. 8).

    ``Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)``, the second term in log space so that it does not
    overflow for large eps.
    """
    return float(ndtr(mu / 2 - eps / mu) - math.exp(eps + log_ndtr(-mu / 2 - eps / mu)))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest eps with ``gaussian_delta(eps, mu) <= delta`` (0 if delta already covers eps = 0)."""
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    return brentq(lambda eps: gaussian_delta(eps, mu) - delta, 0.0, 500.0, xtol=1e-12)


# --- q = 1: T Gaussian mechanisms compose to one with mu = sqrt(T) / sigma ------------------------------

GAUSSIAN_SETTINGS = list(itertools.product([1.0, 2.0, 5.0], [1, 3], [1e-3, 1e-6]))


@pytest.mark.parametrize("sigma, steps, delta", GAUSSIAN_SETTINGS)
def test_full_batch_gaussian_matches_the_analytic_closed_form(sigma, steps, delta):
    exact = gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    setting = dict(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=delta)
    # dp-accounting's PLD for a Gaussian at q = 1 is its exact privacy loss, discretised at 1e-4
    assert epsilon(accountant="pld", **setting) == pytest.approx(exact, abs=1e-3)
    # PRV is an upper bound within its eps_error = 0.01 (plus its own discretisation)
    assert exact - 1e-6 <= epsilon(accountant="prv", **setting) <= exact + 0.02
    # RDP is an upper bound, never below the exact value
    assert epsilon(accountant="rdp", **setting) >= exact - 1e-9


def test_closed_form_reproduces_dp_accountings_gaussian_vector():
    # dp-accounting, dp_accounting/pld/pld_privacy_accountant_test.py::test_gaussian_basic:
    # three Gaussians with noise multiplier sqrt(3) (mu = sqrt(3) / sqrt(3) = 1) are (1, 0.126936)-DP.
    assert gaussian_delta(1.0, mu=1.0) == pytest.approx(0.126936, abs=1e-6)


# --- published vectors ----------------------------------------------------------------------------


def test_dp_accounting_pld_gaussian_vector():
    # dp-accounting, dp_accounting/pld/pld_privacy_accountant_test.py::test_gaussian_basic (tolerance 1e-3 there)
    setting = dict(noise_multiplier=math.sqrt(3), sample_rate=1.0, steps=3, delta=0.126936)
    assert epsilon(accountant="pld", **setting) == pytest.approx(1.0, abs=1e-3)
    assert 1.0 <= epsilon(accountant="prv", **setting) <= 1.0 + 0.02


def test_dp_accounting_pld_poisson_subsampled_gaussian_vector():
    # dp-accounting, dp_accounting/pld/pld_privacy_accountant_test.py::test_poisson_subsampled_gaussian
    # and ::test_self_composed_subsampled_gaussian: q = 0.2, sigma = 0.5, 3 steps is (1, 0.15594)-DP.
    setting = dict(noise_multiplier=0.5, sample_rate=0.2, steps=3, delta=0.15594)
    assert epsilon(accountant="pld", **setting) == pytest.approx(1.0, abs=1e-3)
    assert 1.0 - 1e-3 <= epsilon(accountant="prv", **setting) <= 1.0 + 0.02
    assert epsilon(accountant="rdp", **setting) >= 1.0


def test_dp_accounting_rdp_gaussian_vector():
    # dp-accounting, dp_accounting/rdp/rdp_privacy_accountant_test.py::test_compute_epsilon_delta_gaussian:
    # sigma = 4.530877117 at q = 1 is exactly (1, 1e-6)-DP by RDP over a fine grid of orders.  Opacus's
    # coarser default grid can only give a larger epsilon; it holds the optimal order almost exactly.
    eps = epsilon(noise_multiplier=4.530877117, sample_rate=1.0, steps=1, delta=1e-6, accountant="rdp")
    assert 1.0 - 1e-9 <= eps <= 1.0 + 1e-4


# opacus/tests/prv_accountant.py, ``msr_values`` ("Computed from https://github.com/microsoft/prv_accountant"),
# epsilon at delta = 1e-6 for (sigma, q, steps); Opacus checks them to 5 decimal places.
MSR_PRV_VALUES = {
    (1.5, 0.001, 100): 0.0393694193095203287535710501288,
    (3.0, 0.001, 100): 0.0215200934390882663016508757892,
    (3.0, 0.05, 100): 0.767933789666825572517439013609,
    (3.0, 0.2, 100): 3.38122051022184422208738396876,
    (2.0, 0.05, 1000): 4.17279986668931890392286732094,
    (3.0, 0.05, 1000): 2.52757432605973830774814814504,
}


@pytest.mark.parametrize("setting, expected", list(MSR_PRV_VALUES.items()))
def test_microsoft_prv_vectors(setting, expected):
    sigma, q, steps = setting
    args = dict(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-6)
    assert epsilon(accountant="prv", **args) == pytest.approx(expected, abs=1e-5)
    # the vectors include PRV's eps_error = 0.01; PLD sits just below them
    assert expected - 0.02 <= epsilon(accountant="pld", **args) <= expected


# opacus/tests/accountants_test.py::test_get_noise_multiplier_rdp_epochs / _steps: Opacus's RDP calibration
# for epsilon = 8, delta = 1e-5, q = 0.04 gives sigma = 1.416 for 90 epochs (int(90 / 0.04) = 2250 steps) and
# sigma = 1.3562 for 2000 steps, both to 4 decimals, with an epsilon tolerance of 0.01.
OPACUS_CALIBRATION_VECTORS = [(2250, 1.416), (2000, 1.3562)]


@pytest.mark.parametrize("steps, published_sigma", OPACUS_CALIBRATION_VECTORS)
def test_opacus_calibration_vectors(steps, published_sigma):
    setting = dict(sample_rate=0.04, steps=steps, delta=1e-5, accountant="rdp")
    # the published sigma spends between 8 - 0.01 and 8 (a 5e-5 rounding of sigma moves epsilon by < 1e-3)
    assert 8.0 - 0.01 - 1e-3 <= epsilon(noise_multiplier=published_sigma, **setting) <= 8.0 + 1e-3
    sigma = noise_multiplier_for(target_epsilon=8.0, epsilon_tolerance=0.01 / 8, **setting)
    # both bisections stop inside the same 0.01-wide epsilon window, a sigma window narrower than 5e-4 here
    assert sigma == pytest.approx(published_sigma, abs=5e-4)


# --- PRV vs PLD, RDP >= PLD -----------------------------------------------------------------------------

# 31 settings, none of them in tests/test_accounting.py, epsilon from 5e-4 to 19; chosen among cheap ones
# (each costs well under a second of CPU for the three accountants)
_GRID = [
    (10.0, 0.001, 10),
    (5.0, 0.001, 30),
    (2.0, 0.001, 30),
    (10.0, 0.003, 100),
    (3.0, 0.001, 100),
    (5.0, 0.003, 300),
    (10.0, 0.01, 100),
    (2.0, 0.003, 100),
    (3.0, 0.003, 300),
    (5.0, 0.01, 100),
    (1.5, 0.001, 1000),
    (10.0, 0.03, 100),
    (3.0, 0.01, 100),
    (10.0, 0.1, 30),
    (2.0, 0.01, 100),
    (5.0, 0.03, 100),
    (10.0, 0.3, 10),
    (3.0, 0.01, 1000),
    (3.0, 0.1, 10),
    (5.0, 0.1, 100),
    (10.0, 0.3, 100),
    (5.0, 0.1, 300),
    (3.0, 0.1, 100),
    (10.0, 0.3, 300),
    (5.0, 0.1, 1000),
    (10.0, 0.3, 1000),
    (3.0, 0.1, 1000),
    (2.0, 0.1, 1000),
    (3.0, 0.3, 300),
    (5.0, 0.3, 1000),
    (3.0, 0.3, 1000),
]
# delta cycles through 1e-3, 1e-5, 1e-7
AGREEMENT_SETTINGS = [(sigma, q, steps, [1e-3, 1e-5, 1e-7][i % 3]) for i, (sigma, q, steps) in enumerate(_GRID)]


def test_agreement_grid_has_at_least_30_distinct_settings():
    assert len(AGREEMENT_SETTINGS) >= 30
    assert len(set(AGREEMENT_SETTINGS)) == len(AGREEMENT_SETTINGS)


@pytest.mark.parametrize("sigma, q, steps, delta", AGREEMENT_SETTINGS)
def test_prv_agrees_with_pld_and_rdp_is_looser(sigma, q, steps, delta):
    args = dict(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    prv, pld, rdp = (epsilon(accountant=a, **args) for a in ("prv", "pld", "rdp"))
    assert abs(prv - pld) <= max(0.01 * pld, 0.02), (prv, pld)
    assert rdp >= pld, (rdp, pld)


def test_agreement_grid_reaches_small_and_large_epsilon():
    smallest = epsilon(noise_multiplier=10.0, sample_rate=0.001, steps=10, delta=1e-3, accountant="pld")
    largest = epsilon(noise_multiplier=3.0, sample_rate=0.3, steps=1000, delta=1e-5, accountant="pld")
    assert smallest < 0.01 and largest > 10


# --- calibration round trips against the closed form ----------------------------------------------------


@pytest.mark.parametrize("target", [0.5, 2.0])
@pytest.mark.parametrize("accountant", ["pld", "prv"])
def test_full_batch_calibration_matches_the_closed_forms_inverse(target, accountant):
    delta = 1e-5
    sigma = noise_multiplier_for(target_epsilon=target, sample_rate=1.0, steps=1, delta=delta, accountant=accountant)
    exact_sigma = 1 / brentq(lambda mu: gaussian_epsilon(mu, delta) - target, 1e-3, 10.0, xtol=1e-12)
    # the calibrated sigma spends within [target (1 - 0.005), target] by its accountant; PLD is exact to
    # 1e-3 and PRV over-estimates by <= 0.02, so the exact epsilon at sigma lies in this window
    slack = 1e-3 if accountant == "pld" else 0.02
    assert target * (1 - 0.005) - slack <= gaussian_epsilon(1 / sigma, delta) <= target + 1e-3
    assert sigma >= exact_sigma * (1 - 1e-3)  # never less noise than the exact requirement (within PLD's 1e-3)
