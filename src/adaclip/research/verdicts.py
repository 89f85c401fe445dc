"""Verdict statistics: intervals inside the metric's range, Holm's correction and equivalence tests.

A method is compared with tuned DP-SGD on paired scores (the same seed, or the same split and seed, for both),
and each comparison of one claim gets one of four verdicts (:data:`VERDICTS`):

* ``"equivalent"``: the two one-sided tests (TOST; Schuirmann 1987) reject ``|mean difference| >= margin``;
* ``"better"`` / ``"worse"``: otherwise, the two-sided paired t-test rejects a zero mean difference, and the
  sign of the difference (oriented so that larger is better) says which;
* ``"inconclusive"``: neither test rejects (a tie in the data is *not* a tie in the population).

Both families of p-values (differences, equivalences) are adjusted with Holm's step-down procedure (Holm 1979)
across the comparisons of one claim, each family at ``level``.  A difference that is significant but smaller than
the margin is "equivalent": the margin states which differences matter (Lakens 2017).  The intervals shown beside
a verdict are percentile bootstrap intervals (Efron & Tibshirani 1993, §13.3) of the mean paired difference,
which lie inside the data's range, or Wilson score intervals (Wilson 1927) for an accuracy from one test set; both
stay inside the metric's range, unlike a t interval (which can pass 100 %).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.stats import norm
from scipy.stats import t as student_t

from adaclip._validate import as_int, require_int, require_open_unit, require_positive

VERDICTS = ("better", "worse", "equivalent", "inconclusive")
CONFIDENCE = 0.95
LEVEL = 0.05
"""The family-wise error rate of one claim's comparisons (each family of tests, after Holm's adjustment)."""
RESAMPLES = 10_000
Scores = Sequence[float] | NDArray[np.float64]
"""Scores, differences or p-values: a sequence or a one-dimensional array."""


@dataclass(frozen=True)
class BoundedInterval:
    """An estimate from ``n`` values (or trials) with an interval ``[low, high]`` inside the metric's range."""

    estimate: float
    low: float
    high: float
    n: int


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> BoundedInterval:
    """The Wilson score interval of a proportion ``correct / n`` (Wilson 1927; Newcombe 1998, method 3):
    ``(p̂ + z²/2n ± z sqrt(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n)`` with ``z`` the ``(1 + confidence)/2`` normal
    quantile; always inside ``[0, 1]``."""
    trials = require_int("n", n)
    successes = as_int(correct)
    if successes is None or not 0 <= successes <= trials:
        raise ValueError(f"correct must be an int in [0, n={trials}], got {correct!r}")
    z = float(norm.ppf((1 + require_open_unit("confidence", confidence)) / 2))
    share, ratio = successes / trials, z * z / trials
    centre = (share + ratio / 2) / (1 + ratio)
    half = z / (1 + ratio) * math.sqrt(share * (1 - share) / trials + ratio / (4 * trials))
    return BoundedInterval(share, max(0.0, centre - half), min(1.0, centre + half), trials)


def _scores(name: str, values: Scores, metric_range: tuple[float, float]) -> NDArray[np.float64]:
    low, high = _checked_range(metric_range)
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or len(data) < 2:
        raise ValueError(f"{name} must be a sequence of at least 2 scores, got {values!r}")
    if np.isnan(data).any() or (data < low).any() or (data > high).any():
        raise ValueError(f"{name} must lie in the metric's range [{low}, {high}] (no NaN), got {values!r}")
    return data


def _checked_range(metric_range: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(bound) for bound in metric_range)
    if math.isnan(low) or math.isnan(high) or not low < high:
        raise ValueError(f"metric_range must be (low, high) with low < high, got {metric_range!r}")
    return low, high


def _percentile_bootstrap(
    values: NDArray[np.float64], confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """The ``(1 ± confidence)/2`` quantiles of the mean over ``resamples`` resamples with replacement."""
    level = require_open_unit("confidence", confidence)
    count = require_int("resamples", resamples, minimum=100)
    rng = np.random.default_rng(require_int("seed", seed, minimum=0))
    means = values[rng.integers(0, len(values), size=(count, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_mean_interval(
    values: Scores,
    *,
    metric_range: tuple[float, float],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> BoundedInterval:
    """The mean of ``values`` (scores inside ``metric_range``) with its seeded percentile bootstrap interval."""
    data = _scores("values", values, metric_range)
    low, high = _percentile_bootstrap(data, confidence, resamples, seed)
    return BoundedInterval(float(data.mean()), low, high, len(data))


def paired_bootstrap_interval(
    method: Scores,
    baseline: Scores,
    *,
    metric_range: tuple[float, float],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> BoundedInterval:
    """The mean paired difference ``method − baseline`` with its seeded percentile bootstrap interval (the pairs
    are resampled together), clipped to the differences' range ``[low − high, high − low]``."""
    differences = _differences(method, baseline, metric_range)
    low, high = _percentile_bootstrap(differences, confidence, resamples, seed)
    bottom, top = _checked_range(metric_range)
    width = top - bottom
    return BoundedInterval(float(differences.mean()), max(low, -width), min(high, width), len(differences))


def _differences(method: Scores, baseline: Scores, metric_range: tuple[float, float]) -> NDArray[np.float64]:
    ours, theirs = _scores("method", method, metric_range), _scores("baseline", baseline, metric_range)
    if len(ours) != len(theirs):
        raise ValueError(
            f"method and baseline must hold paired scores of equal length, got {len(ours)} and {len(theirs)}"
        )
    return ours - theirs


def holm_adjust(p_values: Scores) -> list[float]:
    """Holm's (1979) step-down adjusted p-values: the ``i``-th smallest of ``m`` becomes
    ``max_{j <= i} min(1, (m − j + 1) p_(j))``; rejecting where the adjusted value is ``<= α`` controls the
    family-wise error rate at ``α``."""
    values = np.asarray(p_values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0 or np.isnan(values).any() or (values < 0).any() or (values > 1).any():
        raise ValueError(f"p_values must be a non-empty sequence of numbers in [0, 1], got {p_values!r}")
    order = np.argsort(values, kind="stable")
    factors = len(values) - np.arange(len(values))
    stepped = np.maximum.accumulate(np.minimum(1.0, factors * values[order]))
    adjusted = np.empty_like(values)
    adjusted[order] = stepped
    return [float(value) for value in adjusted]


def _t_statistic(differences: NDArray[np.float64], null: float) -> float:
    """``(mean − null) / (s / sqrt(n))``, ``±inf`` (or 0 at the null) when the differences do not vary."""
    deviation = float(differences.mean()) - null
    spread = float(differences.std(ddof=1))
    if spread == 0:
        return 0.0 if deviation == 0 else math.copysign(math.inf, deviation)
    return deviation / (spread / math.sqrt(len(differences)))


def difference_p_value(differences: Scores) -> float:
    """Two-sided paired t-test of a zero mean difference (Student 1908): ``2 P(T_{n−1} >= |t|)``."""
    data = _finite_differences(differences)
    return float(2 * student_t.sf(abs(_t_statistic(data, 0.0)), len(data) - 1))


def equivalence_p_value(differences: Scores, margin: float) -> float:
    """TOST (Schuirmann 1987): the larger of the one-sided paired t-test p-values of ``mean <= −margin`` and
    ``mean >= margin``; small when the mean difference lies within ``(−margin, margin)``."""
    data = _finite_differences(differences)
    bound = require_positive("margin", margin)
    above_lower = student_t.sf(_t_statistic(data, -bound), len(data) - 1)
    below_upper = student_t.cdf(_t_statistic(data, bound), len(data) - 1)
    return float(max(above_lower, below_upper))


def _finite_differences(differences: Scores) -> NDArray[np.float64]:
    data = np.asarray(differences, dtype=np.float64)
    if data.ndim != 1 or len(data) < 2 or not np.isfinite(data).all():
        raise ValueError(f"differences must be a sequence of at least 2 finite numbers, got {differences!r}")
    return data


@dataclass(frozen=True)
class PairedComparison:
    """A method against the baseline on paired scores: the mean difference (method − baseline, in the metric's
    units) with its bootstrap interval, the unadjusted p-values of the difference test and of TOST at ``margin``,
    and whether larger scores are better."""

    difference: BoundedInterval
    p_difference: float
    p_equivalence: float
    margin: float
    higher_is_better: bool


def paired_comparison(
    method: Scores,
    baseline: Scores,
    *,
    margin: float,
    metric_range: tuple[float, float],
    higher_is_better: bool = True,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> PairedComparison:
    """Compare paired scores (entry ``i`` of both from the same seed or split): interval, difference test, TOST."""
    differences = _differences(method, baseline, metric_range)
    interval = paired_bootstrap_interval(
        method, baseline, metric_range=metric_range, confidence=confidence, resamples=resamples, seed=seed
    )
    return PairedComparison(
        difference=interval,
        p_difference=difference_p_value(differences),
        p_equivalence=equivalence_p_value(differences, margin),
        margin=float(margin),
        higher_is_better=bool(higher_is_better),
    )


def verdict(comparison: PairedComparison, *, p_difference: float, p_equivalence: float, level: float = LEVEL) -> str:
    """``"equivalent"``, ``"better"``, ``"worse"`` or ``"inconclusive"`` from the claim's Holm-adjusted p-values
    of ``comparison`` (see the module docstring for the order of the tests)."""
    alpha = require_open_unit("level", level)
    for name, value in (("p_difference", p_difference), ("p_equivalence", p_equivalence)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be an adjusted p-value in [0, 1], got {value!r}")
    if p_equivalence <= alpha:
        return "equivalent"
    if p_difference <= alpha:
        oriented = comparison.difference.estimate if comparison.higher_is_better else -comparison.difference.estimate
        return "better" if oriented > 0 else "worse"
    return "inconclusive"


def claim_verdicts(comparisons: Sequence[PairedComparison], level: float = LEVEL) -> list[str]:
    """The verdict of each comparison of one claim, its difference and equivalence p-values Holm-adjusted
    across the claim (each family at ``level``)."""
    if len(comparisons) == 0:
        raise ValueError("comparisons must hold at least one PairedComparison, got none")
    differences = holm_adjust([c.p_difference for c in comparisons])
    equivalences = holm_adjust([c.p_equivalence for c in comparisons])
    return [
        verdict(c, p_difference=d, p_equivalence=e, level=level)
        for c, d, e in zip(comparisons, differences, equivalences, strict=True)
    ]
