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
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Literal

from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import PRVAccountant, RDPAccountant

Accountant = Literal["prv", "pld", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("prv", "pld", "rdp")


def _validate(noise_multiplier: float | None, sample_rate: float, steps: int, delta: float, accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"accountant must be one of {ACCOUNTANTS}, got {accountant!r} "
            "(GDP is not offered: it underestimates epsilon)"
        )
    if noise_multiplier is not None and not (
        isinstance(noise_multiplier, numbers.Real) and 0 < noise_multiplier < math.inf
    ):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (isinstance(sample_rate, numbers.Real) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must lie in (0, 1] (expected batch size / dataset size), got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not (isinstance(delta, numbers.Real) and 0 < delta < 1):
        raise ValueError(f"delta must lie in (0, 1); use at most 1/N for a dataset of N examples, got {delta!r}")


def _epsilon_unchecked(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    if accountant == "pld":
        gaussian = dp_event.GaussianDpEvent(noise_multiplier)
        step_event = gaussian if sample_rate == 1 else dp_event.PoissonSampledDpEvent(sample_rate, gaussian)
        pld = pld_privacy_accountant.PLDAccountant()
        pld.compose(dp_event.SelfComposedDpEvent(step_event, steps))
        return float(pld.get_epsilon(delta))
    opacus_accountant = PRVAccountant() if accountant == "prv" else RDPAccountant()
    opacus_accountant.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        # Opacus's PRV evaluates log(0) outside its support for q = 1, and bounds its domain with RDP,
        # which warns when the best order is at the end of its grid; neither affects the result.
        warnings.filterwarnings("ignore", category=RuntimeWarning, message="divide by zero")
        warnings.filterwarnings("ignore", category=UserWarning, message="Optimal order is the")
        return float(opacus_accountant.get_epsilon(delta))


def epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: Accountant = "prv"
) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps at the given ``delta``.

    A negative value from a numerical accountant (possible for large ``delta``) is clamped to 0
    with a warning.
    """
    _validate(noise_multiplier, sample_rate, steps, delta, accountant)
    eps = _epsilon_unchecked(float(noise_multiplier), float(sample_rate), int(steps), float(delta), accountant)
    if eps < 0:
        warnings.warn(
            f"the {accountant} accountant returned epsilon={eps:.3g} < 0 at delta={delta}; reporting 0", stacklevel=2
        )
        return 0.0
    return eps


@functools.lru_cache(maxsize=1024)
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

    Bisection on sigma; the returned sigma always satisfies ``epsilon(sigma) <= target_epsilon``
    and ``epsilon(sigma) >= target_epsilon * (1 - epsilon_tolerance)``.  Results are memoised
    (sweeps calibrate the same setting for many methods and seeds).
    """
    _validate(None, sample_rate, steps, delta, accountant)
    if not (isinstance(target_epsilon, numbers.Real) and 0 < target_epsilon < math.inf):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not 0 < epsilon_tolerance < 1:
        raise ValueError(f"epsilon_tolerance must lie in (0, 1), got {epsilon_tolerance!r}")

    def eps_at(sigma: float) -> float:
        return _epsilon_unchecked(sigma, float(sample_rate), int(steps), float(delta), accountant)

    low, high = 0.0, 1.0
    eps_high = eps_at(high)
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(
                f"target_epsilon={target_epsilon} is out of reach for sample_rate={sample_rate}, steps={steps}, "
                f"delta={delta}: even noise_multiplier=1e6 exceeds it. Raise target_epsilon or delta, or lower steps."
            )
        eps_high = eps_at(high)
    while eps_high < target_epsilon * (1 - epsilon_tolerance) and high - low > 1e-9 * high:
        middle = (low + high) / 2
        eps_middle = eps_at(middle)
        if eps_middle > target_epsilon:
            low = middle
        else:
            high, eps_high = middle, eps_middle
    return high
