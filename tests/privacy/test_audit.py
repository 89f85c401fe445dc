"""The privacy audit: its statistics, its adapters, correct methods passing and broken variants caught.

Statistical tolerances come from the audit's own confidence bounds.  Every correct method must pass
all of its checks, so the per-audit confidence is Bonferroni-corrected: with ``CHECKS`` audits of
correct rules, each at ``1 - 0.05 / CHECKS``, the chance that any correct method fails by bad luck is
at most 5 % (for the fixed seeds here it either passes or not, deterministically).  The broken
variants must be caught at that stricter level too.
"""

import dataclasses
import functools
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from scipy.stats import norm as scipy_norm
from test_accounting_conformance import gaussian_delta as closed_form_delta
from test_accounting_conformance import gaussian_epsilon

import adaclip
from adaclip import audit
from adaclip.audit import (
    PASS_MEANING,
    GaussianLowerBound,
    audit_config,
    audit_method,
    audit_optimizer,
    audit_rule,
    clopper_pearson_upper,
    epsilon_lower_bound,
    gaussian_delta,
    gaussian_epsilon_lower_bound,
    optimizer_expected_mu,
    standardised_mean_shift,
    warm_state,
)
from adaclip.audit import gaussian_epsilon as audit_gaussian_epsilon
from adaclip.audit.controls import CONTROLS, FixedClipWithoutClipping, audit_control, build_control
from adaclip.methods import METHODS, AdaCliP, AdaCliPState, CanaryAdapter, build_rule
from adaclip.methods.adaclip import ESTIMATORS, AdaCliPAdapter
from adaclip.privacy.accounting import epsilon

OPTIMIZER_METHODS = ["fixed", "adaclip", "macadam", "adambc"]  # the Adam rules: g~ read back from the state
CHECKS = len(METHODS) + len(OPTIMIZER_METHODS) + len(ESTIMATORS)  # every AdaCliP estimator is audited as well
CONFIDENCE = 1 - 0.05 / CHECKS
CONFIG = audit_config(
    {
        "trials": 500,
        "steps": 2,
        "noise_multiplier": 2.0,
        "expected_batch_size": 16,
        "dim": 12,
        "confidence": CONFIDENCE,
        "seed": 0,
        # the optimizer path at sigma = 1: mu = 0.94 for q = 0.5 and 4 steps; with 100 trials per world
        # mu_hat's standard error is about 0.15, and a missing clip moves mu_hat to about 2.8
        "optimizer_trials": 100,
        "optimizer_noise_multiplier": 1.0,
        "optimizer_steps": 4,
        "optimizer_dataset_size": 32,
    }
)


@functools.cache
def method_audit(method: str):
    return audit_method(method, CONFIG)


@functools.cache
def estimator_audit(estimator: str):
    """AdaCliP with ``estimator``, built with the parameters the audit gives it (AdaCliPAdapter.variant_params)."""
    sigma, batch = CONFIG.noise_multiplier, CONFIG.expected_batch_size
    params = AdaCliPAdapter.variant_params(estimator, sigma)
    rule = AdaCliP(noise_multiplier=sigma, expected_batch_size=batch, **params)
    return audit_rule(rule, METHODS["adaclip"].canary(), CONFIG, name=f"adaclip ({estimator})")


@functools.cache
def control_audit(name: str):
    return audit_control(name, CONFIG)


# --- Clopper–Pearson and the epsilon lower bound --------------------------------------------------------


@pytest.mark.parametrize("k, n", [(0, 50), (3, 50), (25, 50), (49, 50), (50, 50), (0, 1000)])
def test_clopper_pearson_matches_scipys_exact_interval(k, n):
    # a one-sided 97.5 % bound is the upper end of the two-sided 95 % exact interval
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact").high
    assert clopper_pearson_upper(k, n, 0.975) == pytest.approx(expected, rel=1e-9)


def test_clopper_pearson_with_no_successes_is_the_closed_form():
    # P(0 successes) = (1 - p)^n = 1 - confidence at the bound
    assert clopper_pearson_upper(0, 200, 0.95) == pytest.approx(1 - 0.05 ** (1 / 200), rel=1e-12)


def test_perfect_separation_gives_the_largest_bound_the_trials_allow():
    null, canary = np.zeros(200), np.ones(200)
    bound = epsilon_lower_bound(null, canary, delta=1e-5, confidence=0.95)
    upper = 1 - 0.025 ** (1 / 100)  # 100 evaluation trials per world, no errors, each rate at 97.5 %
    assert bound.epsilon == pytest.approx(math.log((1 - 1e-5 - upper) / upper), rel=1e-9)
    assert bound.evaluation_trials == 100 and bound.side == "above"


@pytest.mark.parametrize("seed", range(5))
def test_lower_bound_never_exceeds_the_gaussian_mechanisms_epsilon(seed):
    rng = np.random.default_rng(seed)
    mu, delta = 3.0, 1e-5
    bound = epsilon_lower_bound(rng.normal(0, 1, 2000), rng.normal(mu, 1, 2000), delta=delta, confidence=0.95)
    assert 0 < bound.epsilon <= gaussian_epsilon(mu, delta)


def test_lower_bound_mirrors_when_the_canary_lowers_the_statistic():
    rng = np.random.default_rng(0)
    null, canary = rng.normal(0, 1, 1000), rng.normal(3, 1, 1000)
    up = epsilon_lower_bound(null, canary, delta=1e-5)
    down = epsilon_lower_bound(-null, -canary, delta=1e-5)
    assert down.side == "below" and down.epsilon == pytest.approx(up.epsilon)


def test_without_signal_the_split_keeps_the_bound_at_zero():
    """Choosing the threshold on half the trials and evaluating on the other: no signal, no bound.

    Each bound holds with 95 %, so among 40 no-signal repetitions P(>= 7 positive) < 0.5 %.  (Taking the
    best of the ~800 thresholds on the same trials instead gave a positive bound in 3 of these 40.)
    """
    rng = np.random.default_rng(1)
    positive = sum(
        epsilon_lower_bound(rng.normal(size=400), rng.normal(size=400), delta=1e-5).epsilon > 0 for _ in range(40)
    )
    assert positive <= 6


# --- the Gaussian trade-off bound ---------------------------------------------------------------------------


@pytest.mark.parametrize("mu, delta", [(0.3, 1e-5), (math.sqrt(2) / 2, 1e-5), (1.0, 1e-5), (2.5, 1e-6), (8.0, 1e-3)])
def test_gaussian_epsilon_inverts_the_gdp_curve_like_the_closed_form(mu, delta):
    # Dong, Roth, Su 2019, Cor. 2.13 is Balle & Wang's Gaussian-mechanism curve with mu = 1 / sigma
    assert gaussian_delta(1.3, mu) == pytest.approx(closed_form_delta(1.3, mu), rel=1e-9, abs=1e-15)
    assert audit_gaussian_epsilon(mu, delta) == pytest.approx(gaussian_epsilon(mu, delta), abs=1e-8)


def test_gaussian_epsilon_of_two_gaussian_steps_is_the_accountants():
    # two steps of sigma = 2 at q = 1 compose to sqrt(2) / 2-GDP: PLD is exact to its discretisation
    pld = epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=2, delta=1e-5, accountant="pld")
    assert audit_gaussian_epsilon(math.sqrt(2) / 2, 1e-5) == pytest.approx(pld, abs=1e-4)


def test_gaussian_lower_bound_is_the_curve_at_mu_hats_one_sided_limit():
    null = np.array([-1.0, 1.0] * 50)  # mean 0, sample variance 100 / 99
    canary = null + 0.8
    bound = gaussian_epsilon_lower_bound(null, canary, delta=1e-5, confidence=0.95)
    d = 0.8 / math.sqrt(100 / 99)
    mu_low = d - 1.6448536269514722 * math.sqrt(1 / 100 + 1 / 100 + d**2 / 400)  # z_0.95, written out
    assert bound == GaussianLowerBound(
        epsilon=pytest.approx(gaussian_epsilon(mu_low, 1e-5), abs=1e-8), mu_low=pytest.approx(mu_low), confidence=0.95
    )
    assert gaussian_epsilon_lower_bound(canary, null, delta=1e-5).epsilon == 0.0  # a negative shift bounds nothing


@pytest.mark.parametrize("seed", range(5))
def test_gaussian_lower_bound_stays_below_the_mechanisms_epsilon(seed):
    rng = np.random.default_rng(seed)
    mu, delta = 0.7, 1e-5
    bound = gaussian_epsilon_lower_bound(rng.normal(0, 1, 500), rng.normal(mu, 1, 500), delta=delta, confidence=0.99)
    assert 0 < bound.epsilon <= gaussian_epsilon(mu, delta)


def test_standardised_mean_shift_band_covers_the_truth_at_its_level():
    rng = np.random.default_rng(2)
    mu, covered = 0.8, 0
    for _ in range(400):
        shift = standardised_mean_shift(rng.normal(0, 2, 200), rng.normal(2 * mu, 2, 200), confidence=0.9)
        covered += shift.low <= mu <= shift.high
    # coverage 0.9 over 400 repetitions: standard error 0.015, so +-4 standard errors
    assert 0.84 <= covered / 400 <= 0.96


# --- adapters -------------------------------------------------------------------------------------------


def test_every_registered_method_has_an_audit_adapter():
    wrong = sorted(name for name, entry in METHODS.items() if not issubclass(entry.canary, CanaryAdapter))
    assert not wrong, f"registry entries whose canary is not a CanaryAdapter: {wrong}"


def rule_and_state(method: str):
    adapter = METHODS[method].canary()
    rule = build_rule(method, noise_multiplier=1.5, expected_batch_size=16, **adapter.rule_params(1.5, 16))
    state = warm_state(rule, 12, steps=10, batch_size=16, generator=torch.Generator().manual_seed(0))
    return adapter, rule, state


@pytest.mark.parametrize("method", sorted(METHODS))
def test_canary_shift_is_one_over_sigma_as_the_accountant_assumes(method):
    adapter, rule, state = rule_and_state(method)
    # quantile: sqrt(sigma_delta^-2 + (2 sigma_b)^-2) = 1/sigma is Andrew et al.'s split, checked independently here
    assert torch.linalg.vector_norm(adapter.canary_shift(rule, state, 12)).item() == pytest.approx(1 / 1.5, rel=1e-12)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_implied_noise_recovers_the_draws_and_the_canary_adds_exactly_its_shift(method):
    adapter, rule, state = rule_and_state(method)
    background = adapter.background(rule, state, 12, 16)
    canary = adapter.canary(rule, state, 12)
    noise = torch.randn(rule.noise_size(12), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    null_release, null_next, _ = rule.step(background, state, torch.zeros_like(noise))
    null_observation = adapter.observe(rule, state, null_release, null_next)

    release, next_state, _ = rule.step(background, state, noise)
    implied = adapter.implied_noise(rule, state, adapter.observe(rule, state, release, next_state) - null_observation)
    torch.testing.assert_close(implied, noise, rtol=0, atol=1e-9)

    release, next_state, _ = rule.step(torch.cat([background, canary[None]]), state, noise)
    implied = adapter.implied_noise(rule, state, adapter.observe(rule, state, release, next_state) - null_observation)
    # AUTO-S's canary falls short of the bound by r / CANARY_SCALE = 1e-5 (relative)
    torch.testing.assert_close(implied - noise, adapter.canary_shift(rule, state, 12), rtol=0, atol=1e-5)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_adaclip_estimator_has_an_exact_inverse_and_shift(estimator):
    """The adapter reads each estimator's releases (for quantile_scale also the noisy count off the next scale)."""
    adapter = METHODS["adaclip"].canary()
    rule = AdaCliP(noise_multiplier=1.5, expected_batch_size=16, **AdaCliPAdapter.variant_params(estimator, 1.5))
    state = warm_state(rule, 12, steps=10, batch_size=16, generator=torch.Generator().manual_seed(0))
    shift = adapter.canary_shift(rule, state, 12)
    assert torch.linalg.vector_norm(shift).item() == pytest.approx(1 / 1.5, rel=1e-12)
    assert shift.numel() == rule.noise_size(12)
    background, canary = adapter.background(rule, state, 12, 16), adapter.canary(rule, state, 12)
    noise = torch.randn(rule.noise_size(12), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    null_release, null_next, _ = rule.step(background, state, torch.zeros_like(noise))
    null = adapter.observe(rule, state, null_release, null_next)
    release, next_state, _ = rule.step(background, state, noise)
    implied = adapter.implied_noise(rule, state, adapter.observe(rule, state, release, next_state) - null)
    torch.testing.assert_close(implied, noise, rtol=0, atol=1e-9)
    release, next_state, _ = rule.step(torch.cat([background, canary[None]]), state, noise)
    implied = adapter.implied_noise(rule, state, adapter.observe(rule, state, release, next_state) - null)
    torch.testing.assert_close(implied - noise, shift, rtol=0, atol=1e-9)


def test_warm_state_is_not_the_initial_one():
    _, rule, state = rule_and_state("adaclip")  # the default estimator, quantile_scale
    assert isinstance(state, AdaCliPState)
    assert state.mean.abs().min() > 0  # a != 0
    # b non-uniform: b ~ v^(1/4), so a ratio of 1.15 means per-coordinate variance estimates a factor 1.75 apart
    assert state.scale.max() / state.scale.min() > 1.15
    assert state.clip_norm != rule.initial_clip  # and its global scale has moved
    _, rule, state = rule_and_state("quantile")
    assert state.clip_norm != rule.initial_clip


# --- the rule-level audit: correct methods pass, broken variants are caught -------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_correct_method_passes_the_audit(method):
    result = method_audit(method)
    assert result.theoretical_epsilon == pytest.approx(
        gaussian_epsilon(math.sqrt(CONFIG.steps) / CONFIG.noise_multiplier, CONFIG.delta), abs=1e-3
    )
    assert isinstance(result.lower_bound, GaussianLowerBound)
    assert result.lower_bound.epsilon <= result.theoretical_epsilon
    assert result.threshold_bound.epsilon <= result.theoretical_epsilon
    # the canary saturates the bound: mu_hat matches sqrt(steps) / sigma (and the audit is tight for this adversary)
    assert result.mean_shift.low <= result.expected_mu <= result.mean_shift.high
    assert result.verdict == "pass" and not result.violation


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_adaclip_estimator_passes_the_audit(estimator):
    result = estimator_audit(estimator)
    assert result.lower_bound.epsilon <= result.theoretical_epsilon
    assert result.mean_shift.low <= result.expected_mu <= result.mean_shift.high
    assert result.verdict == "pass" and not result.violation


def test_controls_are_not_registered_methods():
    broken = {cls for _, cls in CONTROLS.values()}
    assert not broken & set(METHODS.values())
    assert not {cls.__name__ for cls in broken} & set(adaclip.__all__)
    assert all(method in METHODS for method, _ in CONTROLS.values())


def test_dp_sgd_audited_bound_reaches_half_its_epsilon():
    """The Gaussian trade-off bound has the power the Clopper–Pearson one lacks (0.46 of 2.94 with 500 trials)."""
    result = method_audit("fixed")
    assert result.lower_bound.epsilon >= 0.5 * result.theoretical_epsilon
    assert result.threshold_bound.epsilon < 0.25 * result.theoretical_epsilon


def test_default_trials_give_dp_sgd_half_its_epsilon_with_99_percent_probability():
    """With the default trials, mu_low falls below mu - (z_conf + z_0.99) se(d) in under 1 % of audits; even there
    the bound keeps half the theoretical epsilon (the sizing of ``AuditConfig.trials``)."""
    config = audit_config()
    mu, n = math.sqrt(config.steps) / config.noise_multiplier, config.trials
    se = math.sqrt(2 / n + mu**2 / (4 * n))
    unlucky = mu - (float(scipy_norm.ppf(config.confidence)) + float(scipy_norm.ppf(0.99))) * se
    assert gaussian_epsilon(unlucky, config.delta) >= 0.5 * gaussian_epsilon(mu, config.delta)


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_broken_variant_is_caught(name):
    result = control_audit(name)
    assert result.violation, result.verdict  # the epsilon bound above theory or mu_hat's whole band above mu


def test_state_leaks_are_seen_where_they_are_released():
    """AdaCliP's raw statistics only steer the *next* release: a one-step audit cannot see them, two can.

    The quantile rule releases its count (the accountant pays for it; the next clip norm is public), so
    a count without noise is caught at the very step.
    """
    one_step = dataclasses.replace(CONFIG, steps=1)
    assert audit_control("AdaCliP statistics from raw gradients", one_step).verdict == "pass"
    assert control_audit("AdaCliP statistics from raw gradients").violation
    assert audit_control("quantile count without noise", one_step).violation
    assert audit_control("AdaCliP quantile-scale count without noise", one_step).violation


def test_results_are_reported_as_json_and_table_rows():
    result = method_audit("fixed")
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["verdict"] == "pass" and summary["lower_bound"]["epsilon"] == result.lower_bound.epsilon
    assert summary["lower_bound_method"] == "gaussian trade-off"
    assert summary["threshold_bound"]["epsilon"] == result.threshold_bound.epsilon
    assert summary["verdict_meaning"] == PASS_MEANING and "no violation found by this adversary" in PASS_MEANING
    row = audit.table_row(result)
    header = audit.table_header(0.95)
    assert len(row) == len(header) and row[0] == "fixed" and header[2].startswith("audited eps lower bound (95 %")
    assert header[-1] == "verdict (pass = no violation found by this adversary)"


# --- the optimizer path -------------------------------------------------------------------------------------


def test_optimizer_expected_mu_matches_a_simulation_of_the_mixture():
    rng = np.random.default_rng(3)
    q, steps, shift, n = 0.5, 4, 1.0, 200_000
    null = rng.normal(size=(n, steps)).sum(1) / math.sqrt(steps)
    canary = (rng.normal(size=(n, steps)) + shift * (rng.random((n, steps)) < q)).sum(1) / math.sqrt(steps)
    simulated = (canary.mean() - null.mean()) / math.sqrt((null.var() + canary.var()) / 2)
    # 2e5 draws per world: standard error about 0.003
    assert optimizer_expected_mu(q, steps, shift) == pytest.approx(simulated, abs=0.015)


@pytest.mark.parametrize("method", OPTIMIZER_METHODS)
def test_optimizer_path_passes_for_correct_methods(method):
    result = audit_optimizer(method, CONFIG)
    assert result.sample_rate == 0.5 and result.accountant == "prv"
    assert result.lower_bound is result.threshold_bound  # a Poisson mixture: only the Clopper–Pearson bound holds
    assert result.lower_bound.epsilon <= result.theoretical_epsilon
    assert result.mean_shift.low <= result.expected_mu <= result.mean_shift.high
    assert result.verdict == "pass"


def test_optimizer_path_catches_missing_clipping(monkeypatch):
    # registered only for this test, so that make_private builds the broken rule by name
    monkeypatch.setitem(
        METHODS, "fixed-without-clipping", dataclasses.replace(METHODS["fixed"], rule=FixedClipWithoutClipping)
    )
    result = audit_optimizer("fixed-without-clipping", CONFIG)
    assert result.violation, result.verdict


# --- configuration ------------------------------------------------------------------------------------------


def test_misspelt_config_key_names_the_accepted_keys():
    with pytest.raises(ValueError, match=r"accepted keys: .*'trials'"):
        audit_config({"trails": 100})


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"trials": 2}, "trials"),
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"delta": 1.0}, "delta"),
        ({"confidence": 1.5}, "confidence"),
        ({"methods": ["fixd"]}, "methods"),
        ({"methods": "fixed"}, "methods"),
        ({"steps": True}, "steps"),
        ({"controls": "yes"}, "controls"),
        ({"optimizer_dataset_size": 16}, "optimizer_dataset_size"),
    ],
)
def test_bad_config_values_are_named(settings, name):
    with pytest.raises(ValueError, match=name):
        audit_config(settings)


def test_complete_config_requires_every_key():
    full = dataclasses.asdict(audit_config())
    assert audit_config(full, complete=True) == audit_config()
    del full["seed"]
    with pytest.raises(ValueError, match=r"missing audit key\(s\) \['seed'\]"):
        audit_config(full, complete=True)


def test_default_config_audits_every_method():
    assert audit_config().method_names == list(METHODS)
    assert audit_config({"methods": ["fixed"]}).method_names == ["fixed"]


def test_unknown_control_is_named():
    with pytest.raises(ValueError, match="known"):
        build_control("no noise", noise_multiplier=1.0, expected_batch_size=16)
