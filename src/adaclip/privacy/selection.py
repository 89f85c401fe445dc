"""The privacy of hyperparameter selection: random stopping (Papernot & Steinke 2022) and plain composition.

A tuning protocol runs a private training algorithm ``Q`` several times with different hyperparameters and keeps
the best run.  Every run touched the data, so the selected model's epsilon is *not* that of one run.  Two bounds:

* **plain composition** (:func:`composition_epsilon`): ``K`` runs fixed in advance cost the ``K``-fold
  composition of one run, whatever is released;
* **random stopping** (Papernot & Steinke, "Hyperparameter tuning with Rényi differential privacy", ICLR 2022,
  arXiv 2110.03620): draw the number of runs ``K`` from a truncated negative binomial (their Definition 1; the
  geometric and logarithmic distributions are the shapes ``η = 1`` and ``η = 0``) or a Poisson distribution, run
  ``Q`` ``K`` times and release only the best run; the cost grows with ``log E[K]`` instead of ``K``
  (:func:`selection_rdp`, their Theorems 2 and 6).

Both bounds assume independent runs: each run's noise (and its Poisson sampling) drawn afresh.  Runs that share
their noise draws (the same seed) are not covered: two releases with the same noise give away the difference of
their clipped sums without any noise.

The score that ranks the runs is part of each run's output, so it must be computed inside ``Q``'s guarantee
(on data the guarantee does not cover, or privately): a validation score on private rows computed without noise
is a release that neither bound accounts for.

Both bounds are for ``Q`` = ``steps`` Poisson-subsampled Gaussian steps (DP-SGD and every method of this package,
see :mod:`~adaclip.privacy.accounting`), add/remove-one neighbours.  Random stopping works on Rényi DP: one run's
RDP curve is Opacus's (Mironov, Talwar, Zhang 2019) at :data:`ORDERS`, and the selection's curve is converted to
``(ε, δ)`` with the package's RDP conversion (Opacus's, Balle et al. 2020, Theorem 21): :func:`rdp_epsilon` of
:func:`single_run_rdp` is ``epsilon(..., accountant="rdp")`` of that run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from adaclip._validate import (
    require_above,
    require_at_least,
    require_int,
    require_non_negative,
    require_open_unit,
    require_positive,
    require_rate,
)
from adaclip.privacy import accounting

ORDERS: tuple[float, ...] = tuple(float(order) for order in RDPAccountant.DEFAULT_ALPHAS)
"""The Rényi orders of the package's RDP accountant (Opacus's defaults, 1.1 to 63)."""


@dataclass(frozen=True)
class TruncatedNegativeBinomial:
    """The number of runs ``K ∈ {1, 2, ...}`` with ``P[K = k] ∝ (1 − γ)^k ∏_{l<k} (l + η) / (l + 1)``.

    Papernot & Steinke 2022, Definition 1: ``shape`` is ``η ∈ (−1, ∞)``, ``halting`` is ``γ ∈ (0, 1)``.  ``η = 1``
    is the geometric distribution ``P[K = k] = γ (1 − γ)^{k−1}``, ``η = 0`` the logarithmic distribution
    ``P[K = k] = (1 − γ)^k / (k log(1/γ))``.
    """

    shape: float
    halting: float

    def __post_init__(self) -> None:
        require_above("shape", self.shape, -1.0, " (η of the truncated negative binomial)")
        require_open_unit("halting", self.halting, " (γ of the truncated negative binomial)")

    @property
    def mean(self) -> float:
        """``E[K] = η (1 − γ) / (γ (1 − γ^η))``, and ``(1/γ − 1) / log(1/γ)`` for ``η = 0`` (Definition 1)."""
        shape, halting = float(self.shape), float(self.halting)
        log_halting = math.log(halting)
        ratio = -1 / log_halting if shape == 0 else shape / -math.expm1(shape * log_halting)
        return (1 - halting) / halting * ratio

    def first_probability(self) -> float:
        """``P[K = 1] = (1 − γ) η / (γ^{−η} − 1)``, and ``(1 − γ) / log(1/γ)`` for ``η = 0``."""
        shape, halting = float(self.shape), float(self.halting)
        log_inverse = -math.log(halting)
        ratio = 1 / log_inverse if shape == 0 else shape / math.expm1(shape * log_inverse)
        return (1 - halting) * ratio


@dataclass(frozen=True)
class PoissonRuns:
    """The number of runs ``K ~ Poisson(μ)``, ``mean`` = ``μ >= 1`` (Papernot & Steinke 2022, Theorem 6).

    ``K = 0`` happens (with probability ``e^{−μ}``): the selection then releases nothing.  Means below 1 are
    refused, as dp-accounting does: there the bound's ``log(μ)/(λ − 1)`` falls below 0 near ``λ = 1``, which no
    Rényi divergence does.
    """

    mean: float

    def __post_init__(self) -> None:
        require_at_least("mean", self.mean, 1.0, " (the expected number of runs)")


RunsDistribution = TruncatedNegativeBinomial | PoissonRuns
Curve = Sequence[float] | NDArray[np.float64]
"""Values at the Rényi orders: the orders themselves, or an RDP curve on them."""


def truncated_negative_binomial_with_mean(shape: float, mean: float) -> TruncatedNegativeBinomial:
    """The truncated negative binomial of shape ``η`` whose ``E[K]`` is ``mean`` (to 1e-12 relative).

    ``E[K]`` falls from ``∞`` to 1 as ``γ`` rises from 0 to 1, so ``γ`` is found by bisection (exactly ``1 / mean``
    for the geometric shape ``η = 1``).  The privacy bound uses the distribution's own ``(η, γ)``, so the small
    error in ``mean`` never makes it optimistic.
    """
    TruncatedNegativeBinomial(shape, 0.5)  # validates shape
    target = require_above("mean", mean, 1.0, " (the expected number of runs)")
    if shape == 1:
        return TruncatedNegativeBinomial(1.0, 1 / target)
    low, high = 0.0, 1.0
    while high - low > 1e-12 * high:
        middle = (low + high) / 2
        if TruncatedNegativeBinomial(float(shape), middle).mean > target:
            low = middle
        else:
            high = middle
    return TruncatedNegativeBinomial(float(shape), (low + high) / 2)


def draw_number_of_runs(distribution: RunsDistribution, rng: np.random.Generator | int) -> int:
    """One draw of the number of runs ``K`` from ``distribution`` with a seeded generator (or a seed).

    The truncated negative binomial is drawn by inverting its distribution function, with the ratio of
    consecutive probabilities ``P[K = k + 1] / P[K = k] = (1 − γ)(k + η) / (k + 1)`` (Definition 1).
    """
    generator = (
        rng if isinstance(rng, np.random.Generator) else np.random.default_rng(require_int("rng", rng, minimum=0))
    )
    if isinstance(distribution, PoissonRuns):
        return int(generator.poisson(distribution.mean))
    if not isinstance(distribution, TruncatedNegativeBinomial):
        raise ValueError(f"distribution must be a TruncatedNegativeBinomial or PoissonRuns, got {distribution!r}")
    uniform = float(generator.random())
    runs, probability = 1, distribution.first_probability()
    cumulative = probability
    while cumulative < uniform and probability > 0:
        probability *= (1 - distribution.halting) * (runs + distribution.shape) / (runs + 1)
        cumulative += probability
        runs += 1
    return runs


def single_run_rdp(
    *, noise_multiplier: float, sample_rate: float, steps: int, orders: Curve = ORDERS
) -> NDArray[np.float64]:
    """The RDP curve of one run: ``steps`` Poisson-subsampled Gaussian steps at each order (Mironov, Talwar,
    Zhang 2019, via Opacus, as the package's RDP accountant computes it)."""
    sigma = require_positive("noise_multiplier", noise_multiplier)
    rate = require_rate("sample_rate", sample_rate, " (expected batch size / dataset size)")
    count = require_int("steps", steps)
    grid = _checked_orders(orders)
    curve = compute_rdp(q=rate, noise_multiplier=sigma, steps=count, orders=list(grid))
    return np.asarray(curve, dtype=np.float64)


def _checked_orders(orders: Curve) -> NDArray[np.float64]:
    grid = np.asarray(orders, dtype=np.float64)
    if grid.ndim != 1 or len(grid) == 0 or not np.isfinite(grid).all() or (grid <= 1).any():
        raise ValueError(f"orders must be a non-empty sequence of finite Rényi orders > 1, got {orders!r}")
    if (np.diff(grid) <= 0).any():
        raise ValueError(f"orders must be strictly increasing, got {orders!r}")
    return grid


def _checked_curve(orders: Curve, rdp: Curve) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    grid = _checked_orders(orders)
    curve = np.asarray(rdp, dtype=np.float64)
    if curve.shape != grid.shape or np.isnan(curve).any() or (curve < 0).any():
        raise ValueError(
            f"rdp must hold one non-negative RDP value per order ({len(grid)} values, no NaN), got {len(curve)} values"
        )
    return grid, curve


def _monotone(rdp: NDArray[np.float64]) -> NDArray[np.float64]:
    """A curve on increasing orders tightened by Rényi divergence's monotonicity: ``ε(λ) <= min_{λ' >= λ} ε(λ')``."""
    tightened: NDArray[np.float64] = np.minimum.accumulate(rdp[::-1])[::-1]
    return tightened


def rdp_delta(orders: Curve, rdp: Curve, epsilon: float) -> float:
    """The ``δ`` at which an RDP curve gives ``(ε, δ)``-DP: the package's conversion (Balle et al. 2020, Theorem 21)
    solved for ``δ``, ``δ = min_λ exp((λ − 1)(ε(λ) − ε + log(1 − 1/λ)) − log λ)``, at most 1."""
    grid, curve = _checked_curve(orders, rdp)
    target = require_non_negative("epsilon", epsilon)
    with np.errstate(over="ignore"):
        log_deltas = (grid - 1) * (curve - target + np.log1p(-1 / grid)) - np.log(grid)
    return float(min(1.0, math.exp(min(0.0, float(np.min(log_deltas))))))


def _truncated_negative_binomial_rdp(
    orders: NDArray[np.float64], rdp: NDArray[np.float64], runs: TruncatedNegativeBinomial
) -> NDArray[np.float64]:
    """Papernot & Steinke 2022, Theorem 2: ``ε'(λ) = ε(λ) + (1 + η)(1 − 1/λ̂) ε(λ̂) + (1 + η) log(1/γ)/λ̂
    + log(E[K])/(λ − 1)``, with ``λ̂`` the best order of the grid."""
    shape, halting = float(runs.shape), float(runs.halting)
    overhead = (1 + shape) * float(np.min((1 - 1 / orders) * rdp + math.log(1 / halting) / orders))
    return rdp + overhead + math.log(runs.mean) / (orders - 1)


def _poisson_rdp(orders: NDArray[np.float64], rdp: NDArray[np.float64], runs: PoissonRuns) -> NDArray[np.float64]:
    """Papernot & Steinke 2022, Theorem 6: ``ε'(λ) = ε(λ) + μ δ̂ + log(μ)/(λ − 1)`` where ``Q`` is
    ``(ε̂, δ̂)``-DP with ``e^ε̂ = 1 + 1/(λ − 1)`` (the theorem's condition, at equality); ``δ̂`` comes from the curve."""
    mean = float(runs.mean)
    deltas = np.array([rdp_delta(orders, rdp, math.log1p(1 / (order - 1))) for order in orders])
    return rdp + mean * deltas + math.log(mean) / (orders - 1)


def selection_rdp(rdp: Curve, distribution: RunsDistribution, orders: Curve = ORDERS) -> NDArray[np.float64]:
    """The RDP curve of releasing the best of ``K`` runs, ``K`` drawn from ``distribution``, given one run's curve.

    Papernot & Steinke 2022: Theorem 2 for a truncated negative binomial (geometric and logarithmic included),
    Theorem 6 for a Poisson number of runs; then Rényi divergence's monotonicity in the order.  Orders must exceed
    1 (the theorems' ``λ ∈ (1, ∞)``); an infinite value of the one-run curve stays infinite.
    """
    grid, curve = _checked_curve(orders, rdp)
    if isinstance(distribution, TruncatedNegativeBinomial):
        selected = _truncated_negative_binomial_rdp(grid, curve, distribution)
    elif isinstance(distribution, PoissonRuns):
        selected = _poisson_rdp(grid, curve, distribution)
    else:
        raise ValueError(f"distribution must be a TruncatedNegativeBinomial or PoissonRuns, got {distribution!r}")
    return _monotone(selected)


def rdp_epsilon(rdp: Curve, delta: float, orders: Curve = ORDERS) -> float:
    """The ``ε`` of an RDP curve at ``δ``: the package's conversion (Opacus's, Balle et al. 2020, Theorem 21)."""
    grid, curve = _checked_curve(orders, rdp)
    target = require_open_unit("delta", delta)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, message="Optimal order is the")
        value, _ = get_privacy_spent(orders=list(grid), rdp=list(curve), delta=target)
    if not math.isfinite(value):
        raise ValueError(f"the RDP curve gives no finite epsilon at delta={delta!r}: it is infinite at every order")
    return max(0.0, float(value))


def selection_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, distribution: RunsDistribution
) -> float:
    """``ε`` at ``δ`` of the whole random-stopping selection (Papernot & Steinke 2022, Theorems 2 and 6) whose
    every run is ``steps`` Poisson-subsampled Gaussian steps at ``noise_multiplier`` and ``sample_rate``."""
    curve = single_run_rdp(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return rdp_epsilon(selection_rdp(curve, distribution), delta)


def composition_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    runs: int,
    delta: float,
    accountant: accounting.Accountant = "prv",
) -> float:
    """``ε`` at ``δ`` of ``runs`` runs that all touched the data, each ``steps`` Poisson-subsampled Gaussian steps
    at the same ``noise_multiplier`` and ``sample_rate``: their composition is ``runs × steps`` such steps, which
    the package's ``accountant`` bounds (:func:`~adaclip.privacy.accounting.epsilon`)."""
    count = require_int("runs", runs)
    per_run = require_int("steps", steps)
    return accounting.epsilon(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=count * per_run,
        delta=delta,
        accountant=accountant,
    )
