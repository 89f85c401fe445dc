"""Privacy accounting for the Poisson-subsampled Gaussian mechanism run for ``steps`` steps.

Three accountants, all for add/remove-one neighbours:

* ``"prv"`` – privacy random variables (Gopi, Lee, Wutschitz 2021) via Opacus; an upper bound
  within ``eps_error = 0.01`` of the true curve.  The project default.
* ``"pld"`` – privacy loss distributions (Koskela et al. 2020; Google's dp-accounting), with
  value discretisation ``1e-4``; agrees with PRV to about 0.01.
* ``"rdp"`` – Rényi DP (Mironov 2017; Mironov, Talwar, Zhang 2019) via Opacus with its default
  orders; the classic, looser bound (typically 8–16 % higher).

Opacus's GDP accountant is deliberately absent: it underestimates epsilon under subsampling.
Every method in this package that releases extra statistics (the quantile rule's count) folds
them into one Gaussian with the *total* noise multiplier, so the single event here accounts for it.

**Bounded work.**  PRV and PLD discretise the privacy loss on a grid that grows without bound as the
noise multiplier shrinks (the loss range grows like ``1 / sigma^2``) or, for PRV, as the steps grow
(its mesh shrinks like ``1 / sqrt(T)``): ``sigma = 0.05, q = 0.01, T = 1000`` would need 3.5e9 PRV grid
points (tens of GiB).  Before discretising, :func:`grid_points` predicts the grid from the
accountants' own recipes for the price of two RDP evaluations:

* PRV: Opacus's domain, ``2 L / mesh`` with ``L`` its RDP bound on the loss range (Gopi et al. 2021,
  Remark 5.6) and ``mesh = eps_error / sqrt(T log(12 / delta_error) / 2)``, ``delta_error = delta / 1000``;
* PLD: one step's grid (dp-accounting's connect-the-dots loss range over the interval ``1e-4``) and
  the composed one (the same ``2 L`` over ``1e-4``; for ``q = 1`` the composition is one Gaussian with
  ``sigma / sqrt(T)``, built directly, which is exact).

Above :data:`PRV_MAX_POINTS` or the PLD budgets (:data:`PLD_MAX_STEP_POINTS`, :data:`PLD_MAX_POINTS`;
each grid point costs memory and time in proportion) RDP answers instead: it costs
milliseconds and is an upper bound on epsilon, so the reported value stays safe, only looser.  An
:class:`AccountingFallbackWarning` names the fallback, the reason and the value reported, and
:func:`account` returns which accountant answered.  Such grids arise only where epsilon is in the
tens or more (``sigma`` well below 0.5).  Noise multipliers above :data:`MAX_NOISE_MULTIPLIER` are
refused.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_mechanism
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

from adaclip._validate import (
    require_at_most,
    require_int,
    require_one_of,
    require_open_unit,
    require_positive,
    require_rate,
)

Accountant = Literal["prv", "pld", "rdp"]
"""The accountants' names, for type checkers; a test checks that they are :data:`BACKENDS`' keys."""

MAX_NOISE_MULTIPLIER = 1e6
"""Largest noise multiplier accepted; calibration never goes beyond it either."""
PRV_MAX_POINTS = 2_000_000
"""Largest PRV grid computed; above it RDP answers."""
PLD_MAX_STEP_POINTS = 400_000
"""Largest grid of one subsampled PLD step (the slowest part to build); above it RDP answers."""
PLD_MAX_POINTS = 4_000_000
"""Largest composed PLD grid (the length of its FFTs); above it RDP answers."""
PRV_EPS_ERROR = 0.01
"""Opacus's default ``eps_error`` of the PRV accountant (``delta_error = delta / 1000``)."""
PLD_INTERVAL = 1e-4
"""dp-accounting's default value discretisation interval of the PLD accountant."""


class AccountingFallbackWarning(UserWarning):
    """A numerical accountant's grid would exceed its budget, so RDP answered (the message says why)."""


@dataclass(frozen=True)
class Spent:
    """An epsilon and the accountant that computed it; ``fallback`` says why that is not ``requested``."""

    epsilon: float
    accountant: str
    requested: str
    fallback: str | None = None


def _check_setting(
    noise_multiplier: object, sample_rate: object, steps: object, delta: object, accountant: object
) -> None:
    """The mechanism's setting (``noise_multiplier=None``: calibration, which has none yet)."""
    require_one_of("accountant (GDP is not offered: it underestimates epsilon)", accountant, ACCOUNTANTS)
    if noise_multiplier is not None:
        require_at_most("noise_multiplier", noise_multiplier, MAX_NOISE_MULTIPLIER)
    require_rate("sample_rate", sample_rate, " (expected batch size / dataset size)")
    require_int("steps", steps)
    require_open_unit("delta", delta, "; use at most 1/N for a dataset of N examples")


@contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Opacus's PRV evaluates log(0) outside its support for q = 1, and its RDP warns when the best order is at
    the end of its grid (which happens for the tiny ``delta_error`` of the PRV domain); neither affects a result."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning, message="divide by zero")
        warnings.filterwarnings("ignore", category=UserWarning, message="Optimal order is the")
        yield


def _safe_loss_range(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Opacus's RDP bound ``L`` on the composed privacy loss that PRV discretises on ``[-L, L]``."""
    prv = PoissonSubsampledGaussianPRV(sample_rate, noise_multiplier)
    with _quiet_opacus():
        return float(compute_safe_domain_size([prv], [steps], eps_error=PRV_EPS_ERROR, delta_error=delta / 1000))


def _pld_step_points(noise_multiplier: float, sample_rate: float) -> float:
    """Grid points of one step's PLD: dp-accounting's connect-the-dots loss range over the interval."""
    bounds = privacy_loss_mechanism.GaussianPrivacyLoss(
        noise_multiplier, sampling_prob=sample_rate
    ).connect_dots_bounds()
    return (float(bounds.epsilon_upper) - float(bounds.epsilon_lower)) / PLD_INTERVAL


def _prv_grid(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> tuple[float, float]:
    """PRV discretises once, on the composed domain ``[-L, L]`` with Opacus's mesh (Gopi et al. 2021, Remark 5.6)."""
    loss_range = _safe_loss_range(noise_multiplier, sample_rate, steps, delta)
    mesh = PRV_EPS_ERROR / math.sqrt(steps * math.log(12 / (delta / 1000)) / 2)
    return 2 * loss_range / mesh, 2 * loss_range / mesh


def _pld_grid(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> tuple[float, float]:
    """PLD: one step's grid and the composed ``2 L`` over the interval; at ``q = 1`` the composed Gaussian with
    ``sigma / sqrt(T)`` is built directly (no step grid)."""
    if sample_rate == 1:
        return 0.0, _pld_step_points(noise_multiplier / math.sqrt(steps), 1.0)
    loss_range = _safe_loss_range(noise_multiplier, sample_rate, steps, delta)
    return _pld_step_points(noise_multiplier, sample_rate), 2 * loss_range / PLD_INTERVAL


def _pld_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    gaussian = dp_event.GaussianDpEvent(noise_multiplier)
    step_event = gaussian if sample_rate == 1 else dp_event.PoissonSampledDpEvent(sample_rate, gaussian)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dp_event.SelfComposedDpEvent(step_event, steps))
    return float(pld.get_epsilon(delta))


def _opacus_epsilon(
    make: Callable[[], PRVAccountant | RDPAccountant],
) -> Callable[[float, float, int, float], float]:
    def epsilon_of(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        opacus_accountant = make()
        opacus_accountant.history = [(noise_multiplier, sample_rate, steps)]
        with _quiet_opacus():
            return float(opacus_accountant.get_epsilon(delta))

    return epsilon_of


@dataclass(frozen=True)
class Backend:
    """One accountant: how it computes epsilon, what its grid costs, and where a calibration of sigma starts.

    ``grid`` gives ``(points of one step, points composed)`` (``None``: no grid, as RDP); above
    ``step_budget`` or ``budget`` RDP answers instead.  ``calibrate_from``: the accountant whose sigma
    for the target starts the search (an upper bound on epsilon, so its sigma is safe); ``None``
    starts from doubling.
    """

    epsilon: Callable[[float, float, int, float], float]
    grid: Callable[[float, float, int, float], tuple[float, float]] | None = None
    step_budget: float = math.inf
    budget: float = math.inf
    calibrate_from: str | None = None


BACKENDS: dict[str, Backend] = {
    "prv": Backend(
        epsilon=_opacus_epsilon(PRVAccountant),
        grid=_prv_grid,
        step_budget=PRV_MAX_POINTS,
        budget=PRV_MAX_POINTS,
        calibrate_from="rdp",
    ),
    "pld": Backend(
        epsilon=_pld_epsilon,
        grid=_pld_grid,
        step_budget=PLD_MAX_STEP_POINTS,
        budget=PLD_MAX_POINTS,
        calibrate_from="rdp",
    ),
    "rdp": Backend(epsilon=_opacus_epsilon(RDPAccountant)),
}
"""Every accountant by name (the project default is ``"prv"``); GDP is deliberately absent."""
ACCOUNTANTS: tuple[str, ...] = tuple(BACKENDS)


def grid_points(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str
) -> tuple[float, float]:
    """``(points of one step, points composed)`` that ``accountant`` would discretise; ``(0, 0)`` for RDP, which has
    no grid.  PRV discretises once, on the composed domain; PLD at ``q = 1`` builds the composed Gaussian directly
    (no step grid).  Cheap (two RDP evaluations); see the module docstring."""
    grid = BACKENDS[accountant].grid
    return (0.0, 0.0) if grid is None else grid(noise_multiplier, sample_rate, steps, delta)


def _over_budget(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> str | None:
    """Why ``accountant`` must not run here (its grid is over budget), or ``None``."""
    backend = BACKENDS[accountant]
    if backend.grid is None:
        return None
    step, composed = backend.grid(noise_multiplier, sample_rate, steps, delta)
    step_budget, budget = backend.step_budget, backend.budget
    if math.isfinite(composed) and composed <= budget and step <= step_budget:
        return None
    points, limit = (step, step_budget) if step > step_budget else (composed, budget)
    return (
        f"the {accountant.upper()} accountant would discretise {points:.3g} grid points for noise_multiplier="
        f"{noise_multiplier:.4g}, sample_rate={sample_rate:.4g}, steps={steps} (budget {limit:.0e})"
    )


def _epsilon_unchecked(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    return BACKENDS[accountant].epsilon(noise_multiplier, sample_rate, steps, delta)


def _bounded_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> Spent:
    """Epsilon from ``accountant``, or from RDP when its grid is over budget (no warning here)."""
    reason = _over_budget(noise_multiplier, sample_rate, steps, delta, accountant)
    used = accountant if reason is None else "rdp"
    value = _epsilon_unchecked(noise_multiplier, sample_rate, steps, delta, used)
    if not math.isfinite(value):
        raise ValueError(
            f"the {used} accountant gives no finite epsilon for noise_multiplier={noise_multiplier:g}, "
            f"sample_rate={sample_rate:g}, steps={steps}, delta={delta:g}: raise noise_multiplier or lower steps"
        )
    return Spent(epsilon=value, accountant=used, requested=accountant, fallback=reason)


def _warn_fallback(spent: Spent, what: str) -> None:
    warnings.warn(
        f"{spent.fallback}; {what} uses the RDP accountant instead (an upper bound, looser): "
        f"epsilon={spent.epsilon:.6g}",
        AccountingFallbackWarning,
        stacklevel=3,
    )


def account(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: Accountant = "prv"
) -> Spent:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps at ``delta``, and which accountant computed it.

    ``accountant``'s work is bounded (see the module docstring): over budget, RDP answers with an
    :class:`AccountingFallbackWarning`.  A negative value from a numerical accountant (possible for large
    ``delta``) is clamped to 0 with a warning.
    """
    _check_setting(noise_multiplier, sample_rate, steps, delta, accountant)
    spent = _bounded_epsilon(float(noise_multiplier), float(sample_rate), int(steps), float(delta), accountant)
    if spent.fallback is not None:
        _warn_fallback(spent, "epsilon")
    if spent.epsilon < 0:
        warnings.warn(
            f"the {spent.accountant} accountant returned epsilon={spent.epsilon:.3g} < 0 at delta={delta}; reporting 0",
            stacklevel=2,
        )
        return Spent(epsilon=0.0, accountant=spent.accountant, requested=accountant, fallback=spent.fallback)
    return spent


def epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: Accountant = "prv"
) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps at the given ``delta`` (:func:`account`'s value)."""
    return account(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant
    ).epsilon


def noise_multiplier_for(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "prv",
    epsilon_tolerance: float = 0.005,
) -> float:
    """The smallest noise multiplier (to within ``epsilon_tolerance``, relative) whose epsilon is <= target.

    A bracketed search on sigma (see ``_calibrate``); the returned sigma always satisfies
    ``epsilon(sigma) <= target_epsilon`` and ``epsilon(sigma) >= target_epsilon * (1 - epsilon_tolerance)``.
    Where ``accountant``'s grid is over budget (small sigma: large targets) RDP's epsilon is used, which
    is an upper bound, so the returned sigma is still safe, only larger than needed; an
    :class:`AccountingFallbackWarning` says so when that happened at the returned sigma.  Results are
    memoised (sweeps calibrate the same setting for many methods and seeds).
    """
    _check_setting(None, sample_rate, steps, delta, accountant)
    require_positive("target_epsilon", target_epsilon)
    require_open_unit("epsilon_tolerance", epsilon_tolerance)
    sigma, spent = _calibrate(
        float(target_epsilon), float(sample_rate), int(steps), float(delta), accountant, float(epsilon_tolerance)
    )
    if spent.fallback is not None:
        _warn_fallback(spent, f"calibration for target_epsilon={target_epsilon:g} (noise_multiplier={sigma:.6g})")
    return sigma


@functools.lru_cache(maxsize=1024)
def _calibrate(
    target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str, epsilon_tolerance: float
) -> tuple[float, Spent]:
    """The calibrated sigma and its :class:`Spent`: a bracket ``eps(low) > target >= eps(high)``, then regula falsi
    (Illinois variant: Dahlquist & Björck, *Numerical Methods*, 1974, §6.2) on ``log eps`` against ``log sigma``,
    which is nearly linear, so a handful of accountant calls suffice; ``high`` always satisfies the target.

    The search starts at the sigma of the backend's ``calibrate_from`` accountant (RDP bounds epsilon from above
    and costs milliseconds, so its sigma is safe); where the requested accountant is over budget there, that
    sigma is the answer."""

    def eps_at(sigma: float) -> Spent:
        return _bounded_epsilon(sigma, sample_rate, steps, delta, accountant)

    start = BACKENDS[accountant].calibrate_from
    if start is None:
        high, at_high = _doubling(eps_at, target_epsilon, sample_rate, steps, delta)
    else:
        try:
            high, at_high = _calibrate(target_epsilon, sample_rate, steps, delta, start, epsilon_tolerance)
        except ValueError:  # the start is too loose to reach the target below the cap; the accountant may be tight
            high, at_high = _doubling(eps_at, target_epsilon, sample_rate, steps, delta)
        else:
            reason = _over_budget(high, sample_rate, steps, delta, accountant)
            if reason is not None:
                return high, Spent(epsilon=at_high.epsilon, accountant=start, requested=accountant, fallback=reason)
            at_high = eps_at(high)
    low, at_low = high / 2, eps_at(high / 2)
    while at_low.epsilon <= target_epsilon:
        high, at_high = low, at_low
        low, at_low = low / 2, eps_at(low / 2)
    return _regula_falsi(eps_at, target_epsilon, epsilon_tolerance, (low, at_low), (high, at_high))


def _doubling(
    at: Callable[[float], Spent], target: float, sample_rate: float, steps: int, delta: float
) -> tuple[float, Spent]:
    """The first of 1, 2, 4, ... (capped at the maximum) whose epsilon is <= target; an unreachable target is
    refused after one evaluation at the cap."""
    if at(MAX_NOISE_MULTIPLIER).epsilon > target:
        raise ValueError(
            f"target_epsilon={target} is out of reach for sample_rate={sample_rate}, steps={steps}, "
            f"delta={delta}: even noise_multiplier={MAX_NOISE_MULTIPLIER:g} exceeds it. Raise "
            "target_epsilon or delta, or lower steps."
        )
    high, at_high = 1.0, at(1.0)
    while at_high.epsilon > target:
        high = min(2 * high, MAX_NOISE_MULTIPLIER)
        at_high = at(high)
    return high, at_high


def _regula_falsi(
    eps_at: Callable[[float], Spent],
    target_epsilon: float,
    epsilon_tolerance: float,
    lower: tuple[float, Spent],
    upper: tuple[float, Spent],
) -> tuple[float, Spent]:
    """Shrink the bracket ``eps(low) > target >= eps(high)`` (Illinois regula falsi on ``log eps`` against
    ``log sigma``) until ``eps(high)`` is within ``epsilon_tolerance`` of the target; returns ``high``."""
    (low, at_low), (high, at_high) = lower, upper

    def gap(spent: Spent) -> float:  # log(eps / target), finite
        return math.log(max(spent.epsilon, 1e-300) / target_epsilon)

    x_low, x_high, f_low, f_high, last = math.log(low), math.log(high), gap(at_low), gap(at_high), 0
    while at_high.epsilon < target_epsilon * (1 - epsilon_tolerance) and x_high - x_low > 1e-9:
        width = x_high - x_low
        x = min(max((x_low * f_high - x_high * f_low) / (f_high - f_low), x_low + 0.01 * width), x_high - 0.01 * width)
        sigma = math.exp(x)
        at_x = eps_at(sigma)
        if at_x.epsilon > target_epsilon:
            x_low, f_low = x, gap(at_x)
            f_high, last = (f_high / 2 if last == 1 else f_high), 1
        else:
            x_high, f_high, high, at_high = x, gap(at_x), sigma, at_x
            f_low, last = (f_low / 2 if last == -1 else f_low), -1
    return high, at_high
