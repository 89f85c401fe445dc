"""The audit's statistics: epsilon lower bounds, from a threshold test and from the Gaussian trade-off curve,
and the standardised mean shift.

* Threshold test (:func:`epsilon_lower_bound`): any test with false-positive rate FPR and false-negative
  rate FNR against an (eps, delta)-DP mechanism obeys ``FPR + e^eps FNR >= 1 - delta`` and
  ``FNR + e^eps FPR >= 1 - delta`` (Kairouz, Oh, Viswanath 2015), so Clopper–Pearson upper bounds on the
  two rates give a lower bound on eps that holds with the stated confidence, whatever the mechanism.
  It needs rare errors, so with ``n`` trials it cannot exceed about ``log(n / 3.7)``: 0.46 at
  ``delta = 1e-5`` with 500 trials, whatever the rule.
* Gaussian trade-off (:func:`gaussian_epsilon_lower_bound`): when the statistic is ``N(0, 1)`` in one
  world and ``N(mu, 1)`` in the other, the pair is exactly ``mu``-GDP's trade-off, so a mechanism that
  produces it is no better than ``mu``-GDP, which is ``(eps, delta(eps))``-DP with
  ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` and not less (Dong, Roth, Su 2019,
  "Gaussian differential privacy", Cor. 2.13).  A one-sided lower confidence limit ``mu_low`` of the
  standardised mean shift then gives the lower bound ``eps(mu_low)`` at the audit's delta (the approach
  of Nasr et al. 2023, "Tight auditing of differentially private machine learning", which fits a
  Gaussian to the observations).  It rests on the statistic being Gaussian with a common variance,
  which holds exactly for the rule audit of a correct rule (the statistic is a projection of the
  standard-normal draws); it uses every trial, not only the rare errors, so it can reach the
  theoretical epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import brentq
from scipy.stats import beta, norm

from adaclip._validate import require_open_unit


def clopper_pearson_upper(successes: int | np.ndarray, trials: int, confidence: float) -> np.ndarray:
    """One-sided Clopper–Pearson upper bound on a binomial rate (Clopper & Pearson 1934).

    ``P(rate <= bound) >= confidence``: the ``confidence`` quantile of ``Beta(k + 1, n - k)``, and 1 for ``k = n``.
    """
    k = np.asarray(successes, dtype=float)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(confidence, k + 1, trials - k)
    return np.where(k >= trials, 1.0, bound)


Side = Literal["above", "below"]
Form = Literal["fnr", "fpr"]


@dataclass(frozen=True)
class EpsilonLowerBound:
    """An epsilon lower bound at ``delta`` from one threshold test, chosen and evaluated on separate trials.

    The test guesses "canary" when the statistic is on ``side`` of ``threshold``.  ``form`` says which
    inequality gave the bound: ``"fnr"`` is ``log((1 - delta - FNR) / FPR)``, ``"fpr"`` is
    ``log((1 - delta - FPR) / FNR)``, with the Clopper–Pearson upper bounds in place of the rates.
    """

    epsilon: float
    threshold: float
    side: Side
    form: Form
    false_positive_upper: float
    false_negative_upper: float
    evaluation_trials: int


def _error_counts(
    null: np.ndarray, canary: np.ndarray, thresholds: np.ndarray, side: Side
) -> tuple[np.ndarray, np.ndarray]:
    """False positives among sorted ``null`` and false negatives among sorted ``canary`` per threshold."""
    if side == "above":
        false_pos = len(null) - np.searchsorted(null, thresholds, side="left")
        false_neg = np.searchsorted(canary, thresholds, side="left")
    else:
        false_pos = np.searchsorted(null, thresholds, side="right")
        false_neg = len(canary) - np.searchsorted(canary, thresholds, side="right")
    return false_pos, false_neg


def _epsilon_bounds(
    false_pos: np.ndarray, n_null: int, false_neg: np.ndarray, n_canary: int, delta: float, confidence: float
) -> dict[Form, np.ndarray]:
    """Both epsilon bounds; each rate's upper bound at ``1 - alpha/2`` so that both hold with ``confidence``."""
    level = 1 - (1 - confidence) / 2
    fpr = clopper_pearson_upper(false_pos, n_null, level)
    fnr = clopper_pearson_upper(false_neg, n_canary, level)
    with np.errstate(divide="ignore", invalid="ignore"):
        by_fnr = np.log(np.clip(1 - delta - fnr, 0, None) / fpr)
        by_fpr = np.log(np.clip(1 - delta - fpr, 0, None) / fnr)
    return {"fnr": np.nan_to_num(by_fnr, nan=-np.inf), "fpr": np.nan_to_num(by_fpr, nan=-np.inf)}


def epsilon_lower_bound(
    null_scores: ArrayLike, canary_scores: ArrayLike, *, delta: float, confidence: float = 0.95
) -> EpsilonLowerBound:
    """Epsilon lower bound at ``delta`` that holds with probability ``confidence``.

    The maximum over thresholds of a bound evaluated on the same trials is optimistically biased
    (a multiple-comparison problem).  So the first half of each world's trials chooses the test
    (threshold, side and inequality, maximising the Clopper–Pearson bound on that half) and the
    second half, untouched by the choice, evaluates it once.  Trials are i.i.d., so the halves are a
    valid random split.  A bound below 0 is reported as 0.
    """
    null, canary = np.asarray(null_scores, dtype=float), np.asarray(canary_scores, dtype=float)
    if min(len(null), len(canary)) < 4:
        raise ValueError(f"need at least 4 trials per world to split them, got {len(null)} and {len(canary)}")
    require_open_unit("delta", delta)
    require_open_unit("confidence", confidence)
    null_pick, null_eval = np.sort(null[: len(null) // 2]), np.sort(null[len(null) // 2 :])
    canary_pick, canary_eval = np.sort(canary[: len(canary) // 2]), np.sort(canary[len(canary) // 2 :])
    thresholds = np.unique(np.concatenate([null_pick, canary_pick]))
    best: tuple[float, float, Side, Form] = (-np.inf, float(thresholds[0]), "above", "fnr")
    for side in ("above", "below"):
        false_pos, false_neg = _error_counts(null_pick, canary_pick, thresholds, side)
        for form, values in _epsilon_bounds(
            false_pos, len(null_pick), false_neg, len(canary_pick), delta, confidence
        ).items():
            i = int(np.argmax(values))
            if values[i] > best[0]:
                best = (float(values[i]), float(thresholds[i]), side, form)
    _, threshold, side, form = best
    false_pos, false_neg = _error_counts(null_eval, canary_eval, np.array([threshold]), side)
    bound = _epsilon_bounds(false_pos, len(null_eval), false_neg, len(canary_eval), delta, confidence)[form]
    level = 1 - (1 - confidence) / 2
    return EpsilonLowerBound(
        epsilon=max(0.0, float(bound[0])),
        threshold=threshold,
        side=side,
        form=form,
        false_positive_upper=float(clopper_pearson_upper(false_pos, len(null_eval), level)[0]),
        false_negative_upper=float(clopper_pearson_upper(false_neg, len(canary_eval), level)[0]),
        evaluation_trials=min(len(null_eval), len(canary_eval)),
    )


@dataclass(frozen=True)
class MeanShift:
    """Standardised mean shift ``(mean_canary - mean_null) / pooled sd`` with a two-sided confidence band."""

    estimate: float
    low: float
    high: float


def standardised_mean_shift(null_scores: ArrayLike, canary_scores: ArrayLike, *, confidence: float = 0.95) -> MeanShift:
    """Cohen's d and its large-sample normal band, ``var(d) = 1/n0 + 1/n1 + d^2 / (2 (n0 + n1))``.

    Hedges & Olkin (1985), *Statistical Methods for Meta-Analysis*, ch. 5, eq. 14 (two normal
    samples with a common variance, which is what a correct Gaussian mechanism gives here).
    """
    null, canary = np.asarray(null_scores, dtype=float), np.asarray(canary_scores, dtype=float)
    n0, n1 = len(null), len(canary)
    if min(n0, n1) < 2:
        raise ValueError(f"need at least 2 trials per world, got {n0} and {n1}")
    pooled = math.sqrt((null.var(ddof=1) + canary.var(ddof=1)) / 2)
    if pooled == 0:
        raise ValueError("the statistic is constant in both worlds: nothing to standardise")
    d = (canary.mean() - null.mean()) / pooled
    half_width = norm.ppf(1 - (1 - confidence) / 2) * math.sqrt(1 / n0 + 1 / n1 + d**2 / (2 * (n0 + n1)))
    return MeanShift(estimate=float(d), low=float(d - half_width), high=float(d + half_width))


def gaussian_delta(epsilon: float, mu: float) -> float:
    """``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` of ``mu``-GDP (Dong, Roth, Su 2019, Cor. 2.13).

    The second term is evaluated in log space (``e^eps`` overflows long before the product does).
    """
    if mu <= 0:
        return 0.0
    first = float(norm.cdf(-epsilon / mu + mu / 2))
    second = math.exp(epsilon + float(norm.logcdf(-epsilon / mu - mu / 2)))
    return max(first - second, 0.0)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest ``eps >= 0`` with ``delta(eps) <= delta`` for ``mu``-GDP (0 for ``mu <= 0``)."""
    if mu <= 0 or gaussian_delta(0.0, mu) <= delta:
        return 0.0
    high = mu * mu / 2 + mu * math.sqrt(2 * math.log(1 / delta)) + 1.0
    while gaussian_delta(high, mu) > delta:
        high *= 2
    return float(brentq(lambda eps: gaussian_delta(eps, mu) - delta, 0.0, high, xtol=1e-10, rtol=1e-12))


@dataclass(frozen=True)
class GaussianLowerBound:
    """An epsilon lower bound at ``delta`` through the Gaussian trade-off curve of ``mu_low``.

    ``mu_low`` is the one-sided lower confidence limit (at ``confidence``) of the standardised mean shift.
    """

    epsilon: float
    mu_low: float
    confidence: float


def gaussian_epsilon_lower_bound(
    null_scores: ArrayLike, canary_scores: ArrayLike, *, delta: float, confidence: float = 0.95
) -> GaussianLowerBound:
    """``eps(mu_low)`` of ``mu``-GDP at ``delta`` (see the module docstring).

    ``mu_low = d - z_confidence * se(d)`` for Cohen's ``d`` and its large-sample standard error
    (:func:`standardised_mean_shift`), a one-sided limit: ``P(mu_low <= mu) >= confidence``.
    """
    require_open_unit("delta", delta)
    require_open_unit("confidence", confidence)
    null, canary = np.asarray(null_scores, dtype=float), np.asarray(canary_scores, dtype=float)
    shift = standardised_mean_shift(null, canary, confidence=confidence)
    d, n0, n1 = shift.estimate, len(null), len(canary)
    mu_low = d - float(norm.ppf(confidence)) * math.sqrt(1 / n0 + 1 / n1 + d**2 / (2 * (n0 + n1)))
    return GaussianLowerBound(epsilon=gaussian_epsilon(mu_low, delta), mu_low=mu_low, confidence=confidence)
