"""White-box privacy audit: an empirical *lower* bound on epsilon for each clipping rule and the optimizer.

The audit (Nasr, Song, Thakurta, Papernot, Carlini 2021, "Adversary instantiation"; Nasr et al. 2023,
"Tight auditing of differentially private machine learning") runs the same private computation many
times on two neighbouring inputs, the *null* world (the other examples only) and the *canary* world
(the same plus one canary example), and tests on what is released which world it came from.  Any
test with false-positive rate FPR and false-negative rate FNR against an (eps, delta)-DP mechanism
obeys ``FPR + e^eps FNR >= 1 - delta`` and ``FNR + e^eps FPR >= 1 - delta`` (Kairouz, Oh, Viswanath
2015), so Clopper–Pearson upper bounds on the two rates give a lower bound on eps that holds with
the stated confidence.

Two audits:

* :func:`audit_rule` / :func:`audit_method` — *one rule, white-box*.  ``steps`` calls of
  ``rule.step`` through the public API (noise drawn like ``AdaptiveClipDPOptimizer.pre_step``
  draws it), from a non-trivial state reached by ``warmup_steps`` earlier steps, with the canary in
  every batch (no subsampling).  The adversary chooses every other example's gradient and the
  canary's gradient at every step (far outside the clip region along coordinate 0, after the rule's
  own transform), knows the code, the hyperparameters and the initial state, and sees every value
  the analysis calls released: each step's noisy mean gradient and, for the quantile rule, the noisy
  count (read off the public next clip norm).  It never sees the noise.  The analysis says this is
  ``steps`` Gaussian mechanisms with multiplier sigma: theory is ``epsilon(sigma, q = 1, steps)``.
* :func:`audit_optimizer` — *the whole path*: ``make_private`` on a one-layer model, a data set with
  or without a crafted canary example whose gradient is huge along one weight, Opacus's Poisson
  sampling, ``optimizer_steps`` optimizer steps; the adversary sees the released parameters after
  each step (and the rule's public state), not which examples were sampled.  Theory is the
  optimizer's own accountant (PRV) at ``q = B / N``.

The test statistic.  For each step the adversary inverts what was released into the standard-normal
draws the *null* world would have needed to produce it (:meth:`CanaryAdapter.implied_noise`),
re-deriving the public state from the releases with the rule itself, and projects them on the shift
that a canary on the clip boundary causes under the analysis (:meth:`CanaryAdapter.canary_shift`,
``sensitivity / noise std``, norm ``1 / sigma`` for every correct rule).  The per-step projections are
summed and divided by ``sqrt(steps)``.  For a correct rule the statistic is exactly ``N(0, 1)`` in the
null world and ``N(mu, 1)`` in the canary world with ``mu = sqrt(steps) / sigma``; so besides the
epsilon bound the audit reports the standardised mean shift ``mu_hat`` with a confidence band, a far
sharper check that the rule adds the noise, clips and normalises the way the accountant assumes.
Because the state is re-derived from releases, a rule whose statistics (AdaCliP's ``a``, ``b``; the
quantile rule's clip norm) depend on anything but released values shows up as a shift at the *next*
step, so stateful rules need ``steps >= 2``.

What it can prove: that an implementation is *not* as private as claimed, with the stated
confidence: an epsilon lower bound above the accountant's epsilon is a violation whatever the
mechanism; ``mu_hat`` above its band means the release moves further along the canary than
``sensitivity / noise std`` allows, which no correct rule can do (its clipped canary shifts the
implied noise by at most ``1 / sigma`` per step), and ``mu_hat`` below its band means the rule does not
behave like the analysed Gaussian mechanism either.  A matching ``mu_hat`` shows that the canary
saturates the bound, i.e. that the audit is tight for this adversary.
What it cannot prove: that a rule *is* private.  A passing audit bounds epsilon from below only; it
covers this adversary, this canary, these ``steps`` and these hyperparameters; the rule-level audit
has no subsampling, so privacy amplification is not audited there, and the optimizer-path audit
(which has it) sees only a few steps with low power; floating-point attacks on the Gaussian sampler
(Mironov 2012) and the accountant's own arithmetic are out of scope (the accountants are checked
against independent values in ``tests/test_accounting_conformance.py``); so is the one-run audit
of Steinke, Nasr and Jagielski (2023).  With ``n`` evaluation trials per world the epsilon bound
cannot exceed about ``log(n / 3.7)`` (no errors at all), so the ``mu_hat`` check carries most of the
power.

Adding a rule: register a :class:`CanaryAdapter` in :data:`ADAPTERS` under the method's name (the
tests fail for any method in ``adaclip.engine.METHODS`` without one).
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
from scipy.stats import beta, norm
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip.accounting import epsilon
from adaclip.clipping import ClipRule
from adaclip.engine import METHODS, build_rule, make_private

#: How far outside the clip region the canary and the background gradients lie (in clip units).
CANARY_SCALE = 1e3
DTYPE = torch.float64


# --- statistics: Clopper–Pearson epsilon lower bound and the standardised mean shift -----------------


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


def _error_counts(null: np.ndarray, canary: np.ndarray, thresholds: np.ndarray, side: Side) -> tuple[np.ndarray, np.ndarray]:
    """False positives among sorted ``null`` and false negatives among sorted ``canary`` per threshold."""
    if side == "above":
        false_pos = len(null) - np.searchsorted(null, thresholds, side="left")
        false_neg = np.searchsorted(canary, thresholds, side="left")
    else:
        false_pos = np.searchsorted(null, thresholds, side="right")
        false_neg = len(canary) - np.searchsorted(canary, thresholds, side="right")
    return false_pos, false_neg


def _epsilon_bounds(false_pos, n_null, false_neg, n_canary, delta, confidence) -> dict[Form, np.ndarray]:
    """Both epsilon bounds; each rate's upper bound at ``1 - alpha/2`` so that both hold with ``confidence``."""
    level = 1 - (1 - confidence) / 2
    fpr = clopper_pearson_upper(false_pos, n_null, level)
    fnr = clopper_pearson_upper(false_neg, n_canary, level)
    with np.errstate(divide="ignore", invalid="ignore"):
        by_fnr = np.log(np.clip(1 - delta - fnr, 0, None) / fpr)
        by_fpr = np.log(np.clip(1 - delta - fpr, 0, None) / fnr)
    return {"fnr": np.nan_to_num(by_fnr, nan=-np.inf), "fpr": np.nan_to_num(by_fpr, nan=-np.inf)}


def epsilon_lower_bound(null_scores: Sequence[float], canary_scores: Sequence[float], *, delta: float, confidence: float = 0.95) -> EpsilonLowerBound:
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
    if not 0 < delta < 1 or not 0 < confidence < 1:
        raise ValueError(f"delta and confidence must lie in (0, 1), got delta={delta}, confidence={confidence}")
    null_pick, null_eval = np.sort(null[: len(null) // 2]), np.sort(null[len(null) // 2 :])
    canary_pick, canary_eval = np.sort(canary[: len(canary) // 2]), np.sort(canary[len(canary) // 2 :])
    thresholds = np.unique(np.concatenate([null_pick, canary_pick]))
    best: tuple[float, float, Side, Form] = (-np.inf, float(thresholds[0]), "above", "fnr")
    for side in ("above", "below"):
        false_pos, false_neg = _error_counts(null_pick, canary_pick, thresholds, side)
        for form, values in _epsilon_bounds(false_pos, len(null_pick), false_neg, len(canary_pick), delta, confidence).items():
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


def standardised_mean_shift(null_scores: Sequence[float], canary_scores: Sequence[float], *, confidence: float = 0.95) -> MeanShift:
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


# --- per-method adapters -------------------------------------------------------------------------------


class CanaryAdapter(ABC):
    """What the white-box adversary knows about one rule: its canary, its inverse and its analysis.

    ``state`` is the adversary's view of the rule's public state.  The rule audit works in ``float64``.
    To audit a new method, subclass this (or :class:`CoordinatewiseAdapter` for a rule that clips
    coordinate-wise) and register an instance in :data:`ADAPTERS`.
    """

    def rule_params(self, noise_multiplier: float, expected_batch_size: float) -> dict[str, object]:
        """Rule parameters the audit sets (beyond the rule's defaults)."""
        return {}

    @abstractmethod
    def canary(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        """The canary's gradient ``[dim]``: far outside the clip region along coordinate 0, after the rule's transform."""

    @abstractmethod
    def background(self, rule: ClipRule, state: Any, dim: int, size: int) -> Tensor:
        """The other examples' gradients ``[size, dim]``, chosen by the adversary."""

    def observe(self, rule: ClipRule, state: Any, release: Tensor, next_state: Any) -> Tensor:
        """Everything one step releases, one entry per noise draw (default: the noisy mean gradient)."""
        return release

    @abstractmethod
    def gradient_noise(self, rule: ClipRule, state: Any, difference: Tensor) -> Tensor:
        """The gradient's standard-normal draws that explain ``release - release without noise`` (its noise map, inverted)."""

    def implied_noise(self, rule: ClipRule, state: Any, difference: Tensor) -> Tensor:
        """All draws that explain ``observe(...) - observe(...) without noise`` (default: the gradient's)."""
        return self.gradient_noise(rule, state, difference)

    @abstractmethod
    def canary_shift(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        """Shift of the implied noise that a canary on the clip boundary causes, as the analysis says (sensitivity / std)."""


class CoordinatewiseAdapter(CanaryAdapter):
    """Rules that clip ``w = (g - centre) / scale`` and release ``centre + scale * (sum w + sigma_g z) / B``.

    The canary is ``centre + CANARY_SCALE * scale_0 * e_0`` (transformed: ``CANARY_SCALE e_0``, clipped to
    ``e_0``); the background is its mirror image, one copy per expected batch member, so that the
    realised batch is ``B`` without the canary.  The implied noise is
    ``B * difference / (sigma_g * scale)`` and the canary shifts coordinate 0 by ``1 / sigma_g``.
    """

    def centre(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        return torch.zeros(dim, dtype=DTYPE)

    @abstractmethod
    def scale(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        """Per-coordinate clip scale (the sensitivity of the sum in each coordinate)."""

    def gradient_noise_multiplier(self, rule: ClipRule) -> float:
        return rule.noise_multiplier

    def _extreme(self, rule: ClipRule, state: Any, dim: int, sign: float) -> Tensor:
        point = self.centre(rule, state, dim).clone()
        point[0] += sign * CANARY_SCALE * self.scale(rule, state, dim)[0]
        return point

    def canary(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        return self._extreme(rule, state, dim, 1.0)

    def background(self, rule: ClipRule, state: Any, dim: int, size: int) -> Tensor:
        return self._extreme(rule, state, dim, -1.0).expand(size, dim)

    def gradient_noise(self, rule: ClipRule, state: Any, difference: Tensor) -> Tensor:
        dim = difference.shape[0]
        return rule.expected_batch_size * difference / (self.gradient_noise_multiplier(rule) * self.scale(rule, state, dim))

    def canary_shift(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        shift = torch.zeros(dim, dtype=DTYPE)
        shift[0] = 1 / self.gradient_noise_multiplier(rule)
        return shift


class FixedClipAdapter(CoordinatewiseAdapter):
    """DP-SGD (Abadi et al. 2016): clip norm ``C``, noise ``sigma C``."""

    def scale(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        return torch.full((dim,), rule.clip_norm, dtype=DTYPE)  # type: ignore[attr-defined]


class AutoClipAdapter(CoordinatewiseAdapter):
    """AUTO-S (Bu et al. 2023): ``g / (||g|| + r)`` has norm below 1, noise ``sigma``.

    The canary's normalised norm is ``L / (L + r)`` with ``L = CANARY_SCALE``, a ``r / L`` (1e-5) shortfall from the bound.
    """

    def scale(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        return torch.ones(dim, dtype=DTYPE)


class AdaCliPAdapter(CoordinatewiseAdapter):
    """AdaCliP (Pichapati et al. 2019, Alg. 1): ``w = (g - a) / b`` clipped to norm 1, noise ``sigma`` in ``w`` space."""

    def centre(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        return state.mean

    def scale(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        return state.scale


class QuantileClipAdapter(CoordinatewiseAdapter):
    """Quantile clipping (Andrew et al. 2021): gradient noise ``sigma_delta C_t``, centred count noise ``sigma_b``.

    The adversary also sees the noisy count ``b~_t``, recovered from the public next clip norm:
    ``b~_t = gamma - log(C_t+1 / C_t) / eta``.  The canary is clipped, so its centred bit is ``-1/2``:
    the implied count noise ``B (b~ - b~_null) / sigma_b`` shifts by ``-1 / (2 sigma_b)``, and the whole
    shift has norm ``sqrt(sigma_delta^-2 + (2 sigma_b)^-2) = 1 / sigma`` (Andrew et al. 2021, Thm. 1).
    The audit gives the count most of the budget (``sigma_b = 0.6 sigma``, so ``sigma_delta = 1.81 sigma`` and
    the count carries 69 % of ``1 / sigma^2``): a count released without noise then removes the count's
    noise from the statistic and raises ``mu_hat`` by at least 81 % at the very step, more over several
    steps as the noiseless count also moves the next clip norm.
    """

    def rule_params(self, noise_multiplier: float, expected_batch_size: float) -> dict[str, object]:
        return {"count_noise_std": 0.6 * noise_multiplier}

    def scale(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        return torch.full((dim,), state.clip_norm, dtype=DTYPE)

    def gradient_noise_multiplier(self, rule: ClipRule) -> float:
        return rule.grad_noise_multiplier  # type: ignore[attr-defined]

    def observe(self, rule: ClipRule, state: Any, release: Tensor, next_state: Any) -> Tensor:
        growth = math.log(next_state.clip_norm / state.clip_norm)
        noisy_fraction = rule.target_quantile - growth / rule.clip_lr  # type: ignore[attr-defined]
        return torch.cat([release, torch.tensor([noisy_fraction], dtype=release.dtype)])

    def implied_noise(self, rule: ClipRule, state: Any, difference: Tensor) -> Tensor:
        gradient = self.gradient_noise(rule, state, difference[:-1])
        count = rule.expected_batch_size * difference[-1:] / rule.count_noise_std  # type: ignore[attr-defined]
        return torch.cat([gradient, count])

    def canary_shift(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        count = torch.tensor([-0.5 / rule.count_noise_std], dtype=DTYPE)  # type: ignore[attr-defined]
        return torch.cat([super().canary_shift(rule, state, dim), count])


class PerSampleAdaptiveClipAdapter(FixedClipAdapter):
    """DP-PSAC (Xia et al. 2023): weight ``C / (||g|| + r / (||g|| + r))``, sensitivity ``C``, noise ``sigma C``.

    The canary (norm ``L C``, ``L = CANARY_SCALE``) keeps ``C (x^2 + r x) / (x^2 + r x + r)`` of the bound at
    ``x = L C``: a shortfall of about ``r / (L C)^2``.
    """


class GeoClipAdapter(CanaryAdapter):
    """GeoClip (Gilani et al. 2025): ``w = M (g - a)`` clipped to norm 1, ``g~ = a + M^-1 (sum w + sigma z) / B``.

    ``M = c (U Lambda^-1/4 U^T + lambda_rest^-1/4 (I - U U^T))`` with ``c = sqrt(gamma / tr Sigma^1/2)``, from the
    public state (basis ``U``, the clamped eigenvalues the transform uses and the rest eigenvalue).  The
    canary is ``a + M^-1 (L e_0)``, so that ``M (g - a) = L e_0`` is clipped to ``e_0``; the implied noise is
    ``B M (g~ - g~_null) / sigma`` and the canary shifts coordinate 0 by ``1 / sigma``.
    """

    @staticmethod
    def _apply(rule: ClipRule, state: Any, vector: Tensor, power: float) -> Tensor:
        """``M^p v`` for ``p = 1`` or ``-1`` in the eigenbasis of the state's covariance."""
        basis, eigenvalues, rest = state.basis, state.transform_eigenvalues, state.transform_residual
        dim, kept = basis.shape
        trace_sqrt = eigenvalues.sqrt().sum() + (dim - kept) * rest.sqrt()
        scale = (rule.gamma / trace_sqrt) ** (power / 2)  # type: ignore[attr-defined]
        coords = basis.T @ vector
        mapped = basis @ (coords * eigenvalues.pow(-power / 4))
        if kept < dim:
            mapped = mapped + rest.pow(-power / 4) * (vector - basis @ coords)
        return scale * mapped

    def _extreme(self, rule: ClipRule, state: Any, dim: int, sign: float) -> Tensor:
        direction = torch.zeros(dim, dtype=state.mean.dtype)
        direction[0] = sign * CANARY_SCALE
        return state.mean + self._apply(rule, state, direction, -1.0)

    def canary(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        return self._extreme(rule, state, dim, 1.0)

    def background(self, rule: ClipRule, state: Any, dim: int, size: int) -> Tensor:
        return self._extreme(rule, state, dim, -1.0).expand(size, dim)

    def gradient_noise(self, rule: ClipRule, state: Any, difference: Tensor) -> Tensor:
        return rule.expected_batch_size * self._apply(rule, state, difference, 1.0) / rule.noise_multiplier

    def canary_shift(self, rule: ClipRule, state: Any, dim: int) -> Tensor:
        shift = torch.zeros(dim, dtype=DTYPE)
        shift[0] = 1 / rule.noise_multiplier
        return shift


#: One adapter per method of ``adaclip.engine.METHODS`` (a method without one cannot be audited).
#: ``geoclip`` and ``psac`` are registered ahead of their rules (they read only the rule's public
#: attributes and state fields), so that the audit covers them as soon as they join ``METHODS``.
ADAPTERS: dict[str, CanaryAdapter] = {
    "adaclip": AdaCliPAdapter(),
    "auto": AutoClipAdapter(),
    "fixed": FixedClipAdapter(),
    "geoclip": GeoClipAdapter(),
    "psac": PerSampleAdaptiveClipAdapter(),
    "quantile": QuantileClipAdapter(),
}


def adapter_for(method: str) -> CanaryAdapter:
    """The audit adapter of ``method``; a clear error for a method that has none yet."""
    if method not in ADAPTERS:
        raise KeyError(
            f"no audit adapter for method {method!r}: add a CanaryAdapter for it to adaclip.audit.ADAPTERS "
            f"(audited methods: {sorted(ADAPTERS)})"
        )
    return ADAPTERS[method]


# --- configuration -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditConfig:
    """Every knob of the audit (the ``audit`` block of ``params.yaml``).

    ``trials`` per world; ``steps`` rule steps per trial after ``warmup_steps``; ``expected_batch_size``
    examples besides the canary; ``dim`` gradient coordinates; ``methods`` a list or ``"all"``;
    ``controls`` whether to run the deliberately broken rules of :mod:`adaclip.audit_controls`;
    ``optimizer_*`` the optimizer-path audit (``optimizer_trials = 0`` skips it), on a data set of
    ``optimizer_dataset_size`` examples including the canary, with its own noise multiplier (its
    subsampled, few-step signal is weak at the rule audit's sigma).
    """

    trials: int = 500
    noise_multiplier: float = 2.0
    expected_batch_size: int = 16
    dim: int = 16
    steps: int = 2
    warmup_steps: int = 10
    delta: float = 1e-5
    confidence: float = 0.95
    seed: int = 0
    methods: tuple[str, ...] | str = "all"
    controls: bool = True
    optimizer_trials: int = 200
    optimizer_noise_multiplier: float = 1.0
    optimizer_steps: int = 4
    optimizer_dataset_size: int = 32

    def __post_init__(self) -> None:
        for name, low in (("trials", 8), ("expected_batch_size", 1), ("dim", 2), ("steps", 1), ("warmup_steps", 0),
                          ("seed", 0), ("optimizer_trials", 0), ("optimizer_steps", 1), ("optimizer_dataset_size", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"audit.{name} must be an int >= {low}, got {value!r}")
        if self.optimizer_trials and self.optimizer_trials < 8:
            raise ValueError(f"audit.optimizer_trials must be 0 (skip) or >= 8, got {self.optimizer_trials}")
        for name in ("noise_multiplier", "optimizer_noise_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"audit.{name} must be a finite number > 0, got {value!r}")
        for name in ("delta", "confidence"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
                raise ValueError(f"audit.{name} must lie in (0, 1), got {value!r}")
        if not isinstance(self.controls, bool):
            raise ValueError(f"audit.controls must be true or false, got {self.controls!r}")
        if self.optimizer_dataset_size <= self.expected_batch_size:
            raise ValueError(
                f"audit.optimizer_dataset_size ({self.optimizer_dataset_size}) must exceed audit.expected_batch_size "
                f"({self.expected_batch_size}) so that the sampling rate B / N is below 1"
            )
        if self.methods != "all":
            if isinstance(self.methods, str) or not isinstance(self.methods, Sequence) or not self.methods:
                raise ValueError(f"audit.methods must be 'all' or a non-empty list of method names, got {self.methods!r}")
            unknown = sorted(set(self.methods) - set(METHODS))
            if unknown:
                raise ValueError(f"audit.methods has unknown method(s) {unknown}; known: {sorted(METHODS)}")
            object.__setattr__(self, "methods", tuple(self.methods))

    @property
    def method_names(self) -> list[str]:
        """The methods to audit, in a stable order."""
        return sorted(METHODS) if self.methods == "all" else list(self.methods)


def audit_config(settings: Mapping[str, object] | None = None, *, complete: bool = False) -> AuditConfig:
    """Validate ``settings`` (e.g. the notebook's ``audit`` dict); missing keys take the defaults.

    ``complete=True`` also requires every key (for a params file that must spell out every knob).
    """
    settings = dict(settings or {})
    accepted = [f.name for f in fields(AuditConfig)]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"unknown audit key(s) {unknown}; accepted keys: {accepted}")
    missing = [name for name in accepted if name not in settings]
    if complete and missing:
        raise ValueError(f"missing audit key(s) {missing}; every one of {accepted} must be given")
    return AuditConfig(**settings)  # type: ignore[arg-type]


# --- results ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditResult:
    """One audit: the theory it is held against, the measured bound and shift, and the verdict."""

    name: str
    kind: str  # "rule", "control" (a deliberately broken rule) or "optimizer"
    noise_multiplier: float
    sample_rate: float
    steps: int
    trials: int
    delta: float
    confidence: float
    theoretical_epsilon: float
    accountant: str
    expected_mu: float
    lower_bound: EpsilonLowerBound
    mean_shift: MeanShift
    null_scores: np.ndarray = field(repr=False, compare=False)
    canary_scores: np.ndarray = field(repr=False, compare=False)

    @property
    def violation(self) -> bool:
        """More leakage than the analysis allows: the epsilon bound above theory or ``mu_hat``'s band above ``mu``."""
        return self.lower_bound.epsilon > self.theoretical_epsilon or self.mean_shift.low > self.expected_mu

    @property
    def matches_analysis(self) -> bool:
        """``mu`` inside ``mu_hat``'s band: the mechanism shifts the statistic exactly as the analysis says."""
        return self.mean_shift.low <= self.expected_mu <= self.mean_shift.high

    @property
    def verdict(self) -> str:
        if self.lower_bound.epsilon > self.theoretical_epsilon:
            return "FAIL: epsilon lower bound above theory"
        if self.mean_shift.low > self.expected_mu:
            return "FAIL: mu_hat above its band"
        if self.mean_shift.high < self.expected_mu:
            return "FAIL: mu_hat below its band"
        return "pass"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary (without the raw scores)."""
        summary = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("null_scores", "canary_scores")}
        summary["lower_bound"] = asdict(self.lower_bound)
        summary["mean_shift"] = asdict(self.mean_shift)
        summary["verdict"] = self.verdict
        return summary


def table_header(confidence: float) -> list[str]:
    """Columns of the audit table; the bound's Clopper–Pearson confidence is in its heading."""
    return ["method", "theoretical eps", f"audited eps lower bound ({100 * confidence:g} % CP)", "mu_hat [band]", "expected mu", "verdict"]


def table_row(result: AuditResult) -> list[object]:
    """One row of the audit table (columns :func:`table_header`)."""
    shift = result.mean_shift
    return [
        result.name,
        result.theoretical_epsilon,
        result.lower_bound.epsilon,
        f"{shift.estimate:.3f} [{shift.low:.3f}, {shift.high:.3f}]",
        result.expected_mu,
        result.verdict,
    ]


# --- the rule-level audit ----------------------------------------------------------------------------


def _seeds(seed: int, count: int) -> list[int]:
    return [int(s >> np.uint64(1)) for s in np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64)]


def warm_state(rule: ClipRule, dim: int, *, steps: int, batch_size: int, generator: torch.Generator) -> Any:
    """The rule's state after ``steps`` steps on random gradients with unequal, off-centre coordinates.

    Per-coordinate standard deviations fall from 1 to 1/16 and means are half of them, so AdaCliP
    ends with ``a != 0`` and a non-uniform ``b``, and the quantile rule's clip norm has moved.
    """
    state = rule.init_state(dim, dtype=DTYPE)
    spread = 2.0 ** -torch.linspace(0, 4, dim, dtype=DTYPE)
    for _ in range(steps):
        gradients = 0.5 * spread + spread * torch.randn(batch_size, dim, generator=generator, dtype=DTYPE)
        noise = torch.randn(rule.noise_size(dim), generator=generator, dtype=DTYPE)
        _, state, _ = rule.step(gradients, state, noise)
    return state


@dataclass(frozen=True)
class _NullWorld:
    """What the adversary derives from its view of the state alone: the inputs and the noiseless null release."""

    background: Tensor
    canary: Tensor
    direction: Tensor  # unit vector along the canary's shift of the implied noise
    observation: Tensor  # what the null world releases with zero noise

    @classmethod
    def at(cls, rule: ClipRule, adapter: CanaryAdapter, view: Any, dim: int, batch_size: int) -> _NullWorld:
        background = adapter.background(rule, view, dim, batch_size)
        release, next_state, _ = rule.step(background, view, torch.zeros(rule.noise_size(dim), dtype=DTYPE))
        shift = adapter.canary_shift(rule, view, dim)
        return cls(
            background=background,
            canary=adapter.canary(rule, view, dim),
            direction=shift / torch.linalg.vector_norm(shift),
            observation=adapter.observe(rule, view, release, next_state),
        )


def _rule_trial(rule: ClipRule, adapter: CanaryAdapter, state: Any, start: _NullWorld, *, dim: int, steps: int,
                batch_size: int, with_canary: bool, generator: torch.Generator) -> float:
    """One trial of ``steps`` private steps from ``state``; the standardised statistic (N(0, 1) in the null world).

    ``start`` is the adversary's null world at ``state`` (the same for every trial).  The adversary's
    view of the state is re-derived from each release with the rule on the background alone.
    """
    view, null = state, start
    score = 0.0
    for step in range(steps):
        if step > 0 and view is not None:
            null = _NullWorld.at(rule, adapter, view, dim, batch_size)
        gradients = torch.cat([null.background, null.canary.unsqueeze(0)]) if with_canary else null.background
        noise = torch.randn(rule.noise_size(dim), generator=generator, dtype=DTYPE)  # as AdaptiveClipDPOptimizer.pre_step
        release, next_state, _ = rule.step(gradients, state, noise)
        implied = adapter.implied_noise(rule, view, adapter.observe(rule, view, release, next_state) - null.observation)
        score += float(implied @ null.direction)
        if view is not None and step < steps - 1:  # the null world's state after the same release
            _, view, _ = rule.step(null.background, view, implied)
        state = next_state
    return score / math.sqrt(steps)


def audit_rule(rule: ClipRule, adapter: CanaryAdapter, config: AuditConfig, *, name: str, kind: str = "rule") -> AuditResult:
    """White-box audit of ``config.steps`` steps of ``rule`` with the canary in every batch (see the module docstring).

    Theory: ``config.steps`` Gaussian mechanisms with the rule's total noise multiplier, no subsampling
    (dp-accounting's PLD, within 1e-4 of the exact Gaussian value).  Expected shift
    ``mu = sqrt(steps) / sigma``.  ``rule`` may be any :class:`ClipRule`, including a broken one
    (``kind="control"``, see :mod:`adaclip.audit_controls`).
    """
    warm_seed, trial_seed = _seeds(config.seed, 2)
    dim, batch_size = config.dim, config.expected_batch_size
    state = warm_state(rule, dim, steps=config.warmup_steps, batch_size=batch_size, generator=torch.Generator().manual_seed(warm_seed))
    generator = torch.Generator().manual_seed(trial_seed)
    start = _NullWorld.at(rule, adapter, state, dim, batch_size)
    scores = {
        with_canary: np.array([
            _rule_trial(rule, adapter, state, start, dim=dim, steps=config.steps, batch_size=batch_size, with_canary=with_canary, generator=generator)
            for _ in range(config.trials)
        ])
        for with_canary in (False, True)
    }
    sigma = rule.noise_multiplier
    return AuditResult(
        name=name,
        kind=kind,
        noise_multiplier=sigma,
        sample_rate=1.0,
        steps=config.steps,
        trials=config.trials,
        delta=config.delta,
        confidence=config.confidence,
        theoretical_epsilon=epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=config.steps, delta=config.delta, accountant="pld"),
        accountant="pld",
        expected_mu=math.sqrt(config.steps) / sigma,
        lower_bound=epsilon_lower_bound(scores[False], scores[True], delta=config.delta, confidence=config.confidence),
        mean_shift=standardised_mean_shift(scores[False], scores[True], confidence=config.confidence),
        null_scores=scores[False],
        canary_scores=scores[True],
    )


def audit_method(method: str, config: AuditConfig) -> AuditResult:
    """:func:`audit_rule` for a registered method, built with ``build_rule`` and its adapter's parameters."""
    adapter = adapter_for(method)
    sigma, batch = config.noise_multiplier, config.expected_batch_size
    rule = build_rule(method, noise_multiplier=sigma, expected_batch_size=batch, **adapter.rule_params(sigma, batch))
    return audit_rule(rule, adapter, config, name=method)


# --- the optimizer-path audit --------------------------------------------------------------------------

#: The canary example's input along weight 0 and its target; its squared-error gradient is about
#: ``2 * CANARY_INPUT**3`` along weight 0, far outside every rule's clip region.
CANARY_INPUT = 10.0
#: Small enough that weight 0 stays near 0 even without clipping, so the canary's gradient keeps its sign.
OPTIMIZER_LEARNING_RATE = 1e-3


def canary_dataset(size: int, dim: int, *, with_canary: bool, seed: int) -> TensorDataset:
    """``size - 1`` background examples with input 0 at coordinate 0 (no gradient on weight 0), plus the canary.

    The canary's input is ``CANARY_INPUT e_0`` with target ``-CANARY_INPUT**2``, so it alone moves weight 0.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size - 1, dim, generator=generator)
    inputs[:, 0] = 0.0
    targets = torch.randn(size - 1, generator=generator)
    if with_canary:
        canary = torch.zeros(1, dim)
        canary[0, 0] = CANARY_INPUT
        inputs = torch.cat([inputs, canary])
        targets = torch.cat([targets, torch.tensor([-CANARY_INPUT**2])])
    return TensorDataset(inputs, targets)


def _optimizer_trial(method: str, adapter: CanaryAdapter, dataset: TensorDataset, config: AuditConfig, *, seed: int) -> float:
    """One private training run of ``optimizer_steps`` steps; the standardised statistic on weight 0."""
    sigma, batch, dim = config.optimizer_noise_multiplier, config.expected_batch_size, config.dim
    model = nn.Linear(dim, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    module, optimizer, loader = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=OPTIMIZER_LEARNING_RATE),
        data_loader=DataLoader(dataset, batch_size=batch),
        method=method,
        noise_multiplier=sigma,
        delta=config.delta,
        seed=seed,
        **adapter.rule_params(sigma, batch),
    )
    rule, score = optimizer.rule, 0.0
    for inputs, targets in itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), config.optimizer_steps):
        state = optimizer.rule_state if optimizer.rule_state is not None else rule.init_state(dim)
        before = model.weight.detach().flatten().clone()
        optimizer.zero_grad()
        ((module(inputs).squeeze(1) - targets) ** 2).mean().backward()
        optimizer.step()
        release = (before - model.weight.detach().flatten()) / OPTIMIZER_LEARNING_RATE  # the released noisy gradient
        # the sampled batch is hidden: the adversary subtracts the noiseless release of an empty batch and
        # reads weight 0, which only the canary's gradient reaches
        empty_release, _, _ = rule.step(torch.zeros(0, dim), state, torch.zeros(rule.noise_size(dim)))
        score += float(adapter.gradient_noise(rule, state, release - empty_release)[0])
    return score / math.sqrt(config.optimizer_steps)


def optimizer_expected_mu(sample_rate: float, steps: int, shift: float) -> float:
    """Standardised mean shift of the optimizer-path statistic for a correct rule whose canary saturates.

    Per step the statistic is ``z + 1[canary sampled] * shift`` (``z ~ N(0, 1)``), summed over ``steps`` and
    divided by ``sqrt(steps)``: mean ``q sqrt(T) shift``, variance 1 without and ``1 + q (1 - q) shift^2``
    with the canary, so ``mu = q sqrt(T) shift / sqrt(1 + q (1 - q) shift^2 / 2)``.
    """
    q = sample_rate
    return q * math.sqrt(steps) * shift / math.sqrt(1 + q * (1 - q) * shift**2 / 2)


def audit_optimizer(method: str, config: AuditConfig) -> AuditResult:
    """Audit of ``make_private`` end to end with Poisson sampling (see the module docstring).

    Theory: the PRV accountant at ``q = B / N`` (``N`` counts the canary) for ``optimizer_steps`` steps
    with ``optimizer_noise_multiplier``, which is what ``optimizer.get_epsilon`` reports for the canary
    run.  The adversary sees only the released parameters, so the expected shift uses the gradient's
    own noise multiplier (``sigma_delta`` for the quantile rule, ``sigma`` otherwise).
    """
    adapter = adapter_for(method)
    if config.optimizer_trials == 0:
        raise ValueError("audit.optimizer_trials is 0: the optimizer-path audit is switched off")
    trials, steps = config.optimizer_trials, config.optimizer_steps
    seeds = _seeds(config.seed + 1, 2 * trials + 1)
    scores = {}
    with warnings.catch_warnings():
        # Opacus's hooks on a first layer whose input needs no gradient: expected and harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for world, with_canary in enumerate((False, True)):
            dataset = canary_dataset(config.optimizer_dataset_size, config.dim, with_canary=with_canary, seed=seeds[-1])
            scores[with_canary] = np.array([
                _optimizer_trial(method, adapter, dataset, config, seed=seeds[world * trials + i]) for i in range(trials)
            ])
    sigma, batch = config.optimizer_noise_multiplier, config.expected_batch_size
    rule = build_rule(method, noise_multiplier=sigma, expected_batch_size=batch, **adapter.rule_params(sigma, batch))
    shift = float(adapter.canary_shift(rule, rule.init_state(config.dim, dtype=DTYPE), config.dim)[0])
    sample_rate = batch / config.optimizer_dataset_size
    return AuditResult(
        name=f"{method} (optimizer, q = {sample_rate:.3g})",
        kind="optimizer",
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        trials=trials,
        delta=config.delta,
        confidence=config.confidence,
        theoretical_epsilon=epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=config.delta, accountant="prv"),
        accountant="prv",
        expected_mu=optimizer_expected_mu(sample_rate, steps, shift),
        lower_bound=epsilon_lower_bound(scores[False], scores[True], delta=config.delta, confidence=config.confidence),
        mean_shift=standardised_mean_shift(scores[False], scores[True], confidence=config.confidence),
        null_scores=scores[False],
        canary_scores=scores[True],
    )
