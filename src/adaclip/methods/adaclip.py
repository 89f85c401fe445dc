"""AdaCliP: coordinate-wise adaptive clipping (Pichapati, Suresh, Yu, Reddi, Kumar 2019, arXiv 1908.07643).

All parameters are flattened into one vector; operations are coordinate-wise.  Each step subtracts a
running mean estimate ``a``, divides by a per-coordinate scale ``b``, clips to norm 1, adds noise
once and maps back (Algorithm 1); ``a`` and ``b`` are computed from already released noisy values
only, so the privacy cost is DP-SGD's with the same (sigma, q, T).

The scale minimises the injected noise power ``sum_j b_j^2`` subject to
``E||(g - a) / b||^2 = sum_j (s_j^2 + (mu_j - a_j)^2) / b_j^2 <= 1`` (Thm. 2): ``a = mu`` and
``b_j = sqrt(s_j) sqrt(sum_k s_k)``, with noise power ``(sum_j s_j)^2`` against DP-SGD's
``d sum_j (s_j^2 + mu_j^2)`` at matched clipping (:func:`optimal_scale`).  How the rule estimates
``s`` (and so ``b``) from released values is the ``estimator`` option of :class:`AdaCliP`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from adaclip._validate import require_in_range, require_one_of, require_positive
from adaclip.methods.base import ClippedSum, ClipRule, Stats, check_dim, clip_factors
from adaclip.methods.canary import DTYPE, CoordinatewiseAdapter
from adaclip.methods.quantile import (
    default_count_noise_std,
    geometric_update,
    noisy_unclipped_fraction,
    split_noise_multiplier,
)

Estimator = Literal["paper", "per_example", "bias_free", "quantile_scale"]
ESTIMATORS: tuple[Estimator, ...] = ("paper", "per_example", "bias_free", "quantile_scale")

# Parameters that only some estimators read; the others refuse them (None = the estimator's default).
_USED_BY: dict[str, tuple[Estimator, ...]] = {
    "beta2": ("paper", "per_example", "quantile_scale"),
    "kappa": ("paper", "per_example", "bias_free"),
    "target_quantile": ("quantile_scale",),
    "clip_lr": ("quantile_scale",),
    "count_noise_std": ("quantile_scale",),
}


@dataclass(frozen=True)
class AdaCliPState:
    """AdaCliP's running statistics (vectors of length ``d``) and its step count.

    ``mean`` is the shift ``a_t`` and ``scale`` the coordinate scale ``b_t`` used at the next step;
    ``variance`` is the moving average the scale is computed from (``v_t`` for ``"paper"``,
    ``"per_example"`` and ``"quantile_scale"``; the un-normalised ``s_t`` for ``"bias_free"``);
    ``steps`` counts the releases so far (``t``, for the start-up corrections of ``"bias_free"``).
    """

    mean: Tensor
    variance: Tensor
    scale: Tensor
    steps: int = 0


@dataclass(frozen=True, kw_only=True)
class QuantileScaleState(AdaCliPState):
    """``estimator="quantile_scale"``: the state plus the global scale ``C_t`` (``b_t = C_t`` times the shape)."""

    clip_norm: float


@dataclass(frozen=True)
class QuantileScale:
    """The private quantile that sets the global scale (Andrew et al. 2021, Alg. 1): target, step size, count noise."""

    target_quantile: float
    clip_lr: float
    count_noise_std: float


def _check_state_dim(state: AdaCliPState, dim: int) -> None:
    if state.scale.shape != (dim,):
        raise ValueError(f"state was made for {state.scale.shape[0]} parameters, but the gradients have {dim}")


def optimal_scale(std: Tensor, kappa: float = 1.0) -> Tensor:
    """AdaCliP's noise-minimising scale ``b_j = kappa sqrt(s_j) sqrt(sum_k s_k)`` (Pichapati et al. 2019, Thm. 2).

    For per-coordinate deviations ``s_j`` this minimises the noise power ``sum_j b_j^2`` subject to
    ``sum_j s_j^2 / b_j^2 <= 1``; the minimum is ``(sum_j s_j)^2``.
    """
    return kappa * std.sqrt() * std.sum().sqrt()


def unit_rms(shape: Tensor) -> Tensor:
    """``shape`` rescaled to ``sum_j shape_j^2 = d`` (root mean square 1): ``quantile_scale``'s normalised shape."""
    return shape * (shape.numel() / torch.dot(shape, shape)).sqrt()


def startup_weight(beta: float, steps: int) -> float:
    """``w_t = (1 - beta) / (1 - beta^t)``: the weight of the newest value in the bias-corrected average ``m^_t``."""
    return (1 - beta) / (1 - beta**steps)


def variance_correction(beta: float, steps: int) -> float:
    """DP-MacAdam's ``kappa_t = 2 (beta - beta^t) / (1 + beta)``: ``E[s_t] = kappa_t Var(g~)`` (:class:`AdaCliP`)."""
    return 2 * (beta - beta**steps) / (1 + beta)


class AdaCliP(ClipRule):
    """Coordinate-wise adaptive clipping, AdaCliP (Pichapati et al. 2019, arXiv 1908.07643, Alg. 1).

    Per step, all operations coordinate-wise over the flattened parameter vector::

        w_i = (g_i - a_t) / b_t,  w_i <- w_i min(1, 1/||w_i||)               (clip to norm 1)
        g~  = b_t (sum_i w_i + sigma_g z) / B + a_t,  z ~ N(0, I)             (noise once, map back)

    with ``sigma_g = sigma`` except for ``"quantile_scale"``.  ``a_0 = 0`` and ``b_0 = initial_clip``, so
    the first step is DP-SGD with clip ``initial_clip``.  ``a`` and ``b`` are functions of released
    values only (:meth:`next_state`), so every estimator costs DP-SGD's (sigma, q, T), the quantile
    one included (its count is released with noise inside the same sigma, below).

    **Estimators** (``estimator=``) of ``s`` and ``b``; ``N_t = b_t^2 sigma_g^2 / B^2`` is the noise variance in ``g~``:

    * ``"paper"`` — the published update, literally (Alg. 1): ``a_t+1 = beta1 a_t + (1 - beta1) g~``,
      ``r_t = (g~ - a_t)^2 - N_t``, ``v_t+1 = beta2 v_t + (1 - beta2) clamp(r_t, h1, h2)``,
      ``b_t+1 = kappa sqrt(sqrt(v_t+1)) sqrt(sum_j sqrt(v_t+1,j))``.  ``r_t`` estimates the variance
      of the *batch mean*, ``B`` times smaller than the per-example variance Thm. 2 needs, so ``b`` comes
      out about ``sqrt(B)`` too small (the learning rate must grow to match).
    * ``"per_example"`` — the same with ``r_t`` multiplied by ``B``: ``v`` estimates the per-example
      variance.  ``B r_t`` estimates ``s^2 + B (mu - a_t)^2``, so a lag of ``a`` behind the mean is
      amplified ``B``-fold, and clamping ``r_t`` (negative in most coordinates: the noise dominates)
      *before* averaging biases ``v`` upward; ``h2`` then caps it and acts as a hand-set scale of ``b``.
    * ``"bias_free"`` — DP-MacAdam's estimator (Tasnim, Sankar, Kosut 2026, arXiv 2606.05435, Alg. 1):
      the noise variance is subtracted *after* the moving average, which is corrected for its start-up::

          m^_t = m^_t-1 + w_t (g~ - m^_t-1),  w_t = (1 - beta1) / (1 - beta1^t)      (a_t+1 = m^_t, m^_0 = 0)
          u_t  = (g~ - m^_t-1)(g~ - m^_t) = (1 - w_t)(g~ - m^_t-1)^2
          s_t  = beta1 s_t-1 + (1 - beta1) u_t,  kappa_t = 2 (beta1 - beta1^t) / (1 + beta1)
          s^_t = clamp(s_t / kappa_t - N_t, h1, h2),  b_t+1 = kappa sqrt(sqrt(s^_t)) sqrt(sum_j sqrt(s^_t,j))

      For releases with a common mean and variance ``V``, ``E[s_t] = kappa_t V`` exactly for every
      ``t >= 1`` (:func:`variance_correction`; tested), so ``s_t / kappa_t - N_t`` is unbiased for the
      variance of the clipped batch mean.  The offline transcription of the paper's Alg. 1 reads
      ``u_t = (g~ - m^_t)^2``, which is ``(1 - w_t)`` times the product above; with it
      ``E[s_t] / kappa_t`` tends to ``beta1 V`` (and is lower early on), so we implement the one for which
      the paper's own ``kappa_t`` makes the estimate bias-free, the property the paper states.  At
      ``t = 1`` both ``s_1`` and ``kappa_1`` are 0 and ``b`` stays ``b_0``.  As in the paper, ``s``
      averages with ``beta1`` (``kappa_t`` assumes it) and there is no factor ``B``.  Without upward bias
      the estimate cannot grow ``b``: clipped contributions have ``sum_j Var(w_j) <= 1``, so the
      estimate sits at or below what the current ``b`` allows and ``b`` shrinks until ``h1`` stops it.
    * ``"quantile_scale"`` — the per-coordinate *shape* from the ``"per_example"`` estimate, normalised to
      root mean square 1 (:func:`unit_rms`), and the global *scale* ``C_t`` from a private quantile of
      the transformed norms ``||(g_i - a_t) / shape_t||`` (Andrew, Thakkar, McMahan, Ramaswamy 2021,
      Alg. 1), so that no hand-set cap sets the scale::

          b_t = C_t unit_rms(kappa-free optimal_scale(sqrt(v_t)))
          u_i = 1[||(g_i - a_t) / b_t|| <= 1] - 1/2,   b~_t = (sum_i u_i + N(0, sigma_b^2)) / B + 1/2
          C_t+1 = C_t exp(-clip_lr (b~_t - target_quantile)),   C_0 = initial_clip

      The count is a second Gaussian mechanism (sensitivity 1/2), accounted exactly as
      :class:`~adaclip.methods.quantile.QuantileClip` does: ``noise_multiplier`` is the total sigma the
      accountant sees, the gradient gets ``sigma_g = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)`` (Thm. 1;
      infeasible, and refused at construction, unless ``sigma < 2 sigma_b``), ``count_noise_std=None``
      takes ``max(B / 20, sigma)``, and the last of the ``d + 1`` noise draws is the count's.  With a
      unit-RMS shape the noise power ``sum_j b_j^2 sigma_g^2 / B^2`` is DP-SGD's at clip ``C_t``; only
      the shape of the clip region differs.

    The parameters a given estimator does not read default to ``None`` and are refused if set:
    ``beta2`` (not ``"bias_free"``, whose average uses ``beta1``), ``kappa`` (not ``"quantile_scale"``,
    whose scale is the quantile's) and ``target_quantile``, ``clip_lr``, ``count_noise_std``
    (``"quantile_scale"`` only).

    **Default** ``estimator="quantile_scale"``: the one estimator whose scale no hand-set constant sets
    (``"paper"``'s ``b`` is about ``sqrt(B)`` too small, ``h2`` caps ``"per_example"``'s ``v``, and
    ``"bias_free"``'s ``b`` shrinks until ``h1`` stops it, as described above).  How AdaCliP with it compares
    with tuned DP-SGD is measured in the report (report: 3. Better accuracy at the same (ε, δ)?).

    The learning rate is in gradient units, not scaled by ``1 / initial_clip`` as DP-SGD's is.
    Every estimator has the norm interface (:meth:`example_weights`), so all run on the fast path.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        expected_batch_size: float,
        initial_clip: float = 1.0,
        beta1: float = 0.99,
        beta2: float | None = None,
        h1: float = 1e-12,
        h2: float = 0.1,
        kappa: float | None = None,
        estimator: Estimator = "quantile_scale",
        target_quantile: float | None = None,
        clip_lr: float | None = None,
        count_noise_std: float | None = None,
    ) -> None:
        self.noise_multiplier = require_in_range("noise_multiplier", noise_multiplier, 0.0, math.inf)
        self.expected_batch_size = require_positive("expected_batch_size", expected_batch_size)
        self.initial_clip = require_positive("initial_clip", initial_clip)
        self.estimator: Estimator = require_one_of("estimator", estimator, ESTIMATORS)
        self.beta1 = require_in_range("beta1", beta1, 0.0, 1.0)
        if estimator == "bias_free" and self.beta1 == 0.0:
            raise ValueError("beta1 must be > 0 with estimator='bias_free': its start-up correction kappa_t is 0 else")
        self.h1 = require_positive("h1", h1)
        self.h2 = require_positive("h2", h2)
        if self.h1 > self.h2:
            raise ValueError(f"h1 must be <= h2 (clamp range for the variance), got h1={h1}, h2={h2}")
        given = {
            "beta2": beta2,
            "kappa": kappa,
            "target_quantile": target_quantile,
            "clip_lr": clip_lr,
            "count_noise_std": count_noise_std,
        }
        for name, value in given.items():
            if value is not None and estimator not in _USED_BY[name]:
                raise ValueError(
                    f"{name} has no effect with estimator={estimator!r} (it applies to estimator in "
                    f"{list(_USED_BY[name])}); leave it unset"
                )
        uses_beta2 = estimator in _USED_BY["beta2"]
        self.beta2 = require_in_range("beta2", 0.9 if beta2 is None else beta2, 0.0, 1.0) if uses_beta2 else None
        uses_kappa = estimator in _USED_BY["kappa"]
        self.kappa = require_positive("kappa", 1.0 if kappa is None else kappa) if uses_kappa else None
        self.quantile_scale: QuantileScale | None = None
        self.grad_noise_multiplier = self.noise_multiplier
        if estimator == "quantile_scale":
            sigma_b = default_count_noise_std(self.expected_batch_size, self.noise_multiplier)
            self.quantile_scale = QuantileScale(
                target_quantile=require_in_range(
                    "target_quantile", 0.5 if target_quantile is None else target_quantile, 0.0, 1.0, closed_high=True
                ),
                clip_lr=require_positive("clip_lr", 0.2 if clip_lr is None else clip_lr),
                count_noise_std=require_positive(
                    "count_noise_std", sigma_b if count_noise_std is None else count_noise_std
                ),
            )
            self.grad_noise_multiplier = split_noise_multiplier(
                self.noise_multiplier, self.quantile_scale.count_noise_std, "AdaCliP(estimator='quantile_scale')"
            )
        # the resolved factors the update uses (the public attributes say None where an estimator has none)
        self._variance_beta = self.beta1 if self.beta2 is None else self.beta2
        self._kappa = 1.0 if self.kappa is None else self.kappa

    @property
    def target_quantile(self) -> float | None:
        """``quantile_scale``'s target quantile of the transformed norms (``None`` for the other estimators)."""
        return None if self.quantile_scale is None else self.quantile_scale.target_quantile

    @property
    def clip_lr(self) -> float | None:
        """``quantile_scale``'s geometric step size (``None`` for the other estimators)."""
        return None if self.quantile_scale is None else self.quantile_scale.clip_lr

    @property
    def count_noise_std(self) -> float | None:
        """``quantile_scale``'s count noise ``sigma_b`` (``None`` for the other estimators)."""
        return None if self.quantile_scale is None else self.quantile_scale.count_noise_std

    def init_state(
        self, dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> AdaCliPState:
        """``a_0 = 0`` and ``b_0 = C0`` in every coordinate.

        ``v_0 = (C0 / (kappa sqrt(d)))^2``, so that ``optimal_scale`` gives ``b_0``; ``bias_free`` starts
        from ``s_0 = 0`` (its start-up correction expects it); ``quantile_scale`` from ``C_0 = C0``.
        """
        check_dim(dim)
        mean = torch.zeros(dim, device=device, dtype=dtype)
        scale = torch.full((dim,), self.initial_clip, device=device, dtype=dtype)
        if self.estimator == "bias_free":
            return AdaCliPState(mean=mean, variance=torch.zeros_like(mean), scale=scale)
        variance = torch.full(
            (dim,), (self.initial_clip / (self._kappa * math.sqrt(dim))) ** 2, device=device, dtype=dtype
        )
        if self.quantile_scale is not None:
            return QuantileScaleState(mean=mean, variance=variance, scale=scale, clip_norm=self.initial_clip)
        return AdaCliPState(mean=mean, variance=variance, scale=scale)

    def noise_size(self, dim: int) -> int:
        """``d`` draws for the gradient, plus one for ``quantile_scale``'s count."""
        return check_dim(dim) + (self.quantile_scale is not None)

    def clipped_sum(self, per_example_grads: Tensor, state: AdaCliPState) -> ClippedSum:
        """``sum_i m_i (g_i - a)`` with ``m_i = min(1, 1 / ||(g_i - a) / b||)`` (the default, after a shape check)."""
        _check_state_dim(state, per_example_grads.shape[1])
        return super().clipped_sum(per_example_grads, state)

    def norm_transform(self, state: AdaCliPState) -> tuple[Tensor, Tensor]:
        """Clipping happens on ``(g_i - a_t) / b_t``: the norms must be ``||(g_i - a_t) / b_t||``."""
        return state.mean, state.scale

    def example_weights(self, norms: Tensor, state: AdaCliPState) -> Tensor:
        """``m_i = min(1, 1 / ||(g_i - a_t) / b_t||)``."""
        return clip_factors(norms, 1.0)

    def release(self, clipped: ClippedSum, state: AdaCliPState, noise: Tensor) -> tuple[Tensor, AdaCliPState, Stats]:
        """Noise, map back, and the next state from the released values only (:meth:`next_state`).

        With ``V = sum_i m_i (g_i - a)`` the clipped transformed vectors sum to ``V / b``, so
        ``g~ = b (V / b + sigma_g z) / B + a = (V + sigma_g b z) / B + a``.  ``quantile_scale`` also
        releases the noisy unclipped fraction (its draw is ``noise[d]``).
        """
        dim = self._check_release_inputs(clipped, noise)
        _check_state_dim(state, dim)
        a, b, B = state.mean, state.scale, self.expected_batch_size
        released = torch.addcmul(clipped.vector, b, noise[:dim], value=self.grad_noise_multiplier).div_(B).add_(a)
        low, high = torch.aminmax(b)
        scalars = [low, high, torch.dot(b, b), b.sum()]
        if self.quantile_scale is not None:
            scalars.append(noise[dim])
        values = clipped.read(*scalars)  # one host synchronisation for the counts, the statistics and the count draw
        unclipped = None
        if self.quantile_scale is not None:
            unclipped = noisy_unclipped_fraction(clipped, self.quantile_scale.count_noise_std * values[4], B)
        stats = {
            "clipped_fraction": clipped.clipped_fraction,
            "noise_power": values[2] * (self.grad_noise_multiplier / B) ** 2,
            "scale_mean": values[3] / dim,
            "scale_min": values[0],
            "scale_max": values[1],
            "batch_size": clipped.examples,
        }
        if isinstance(state, QuantileScaleState) and unclipped is not None:
            stats |= {"clip_norm": state.clip_norm, "unclipped_estimate": unclipped}
        return released, self.next_state(released, state, unclipped), stats

    def next_state(
        self, released: Tensor, state: AdaCliPState, unclipped_fraction: float | None = None
    ) -> AdaCliPState:
        """The state after the release ``g~ = released`` (and, for ``quantile_scale``, the noisy unclipped fraction).

        Only released values enter: this is why the privacy cost is the release's alone.
        """
        steps = state.steps + 1
        if self.estimator == "bias_free":
            return self._bias_free_state(released, state, steps)
        a, b, B = state.mean, state.scale, self.expected_batch_size
        # r_t = (g~ - a)^2 - b^2 sigma_g^2 / B^2, times B for the per-example variance
        factor = 1.0 if self.estimator == "paper" else B
        second_moment = (released - a).square_().mul_(factor)
        second_moment.addcmul_(b, b, value=-factor * (self.grad_noise_multiplier / B) ** 2)
        # beta2 v + (1 - beta2) clamp(r)  ==  lerp(clamp(r), v, beta2)
        variance = torch.lerp(second_moment.clamp_(self.h1, self.h2), state.variance, self._variance_beta)
        mean = torch.lerp(released, a, self.beta1)
        shape = optimal_scale(variance.sqrt(), self._kappa)
        if self.quantile_scale is None:
            return AdaCliPState(mean=mean, variance=variance, scale=shape, steps=steps)
        if not isinstance(state, QuantileScaleState) or unclipped_fraction is None:
            raise ValueError(
                "estimator='quantile_scale' needs its own state (from init_state) and the noisy unclipped fraction"
            )
        quantile = self.quantile_scale
        clip_norm = geometric_update(state.clip_norm, unclipped_fraction, quantile.target_quantile, quantile.clip_lr)
        return QuantileScaleState(
            mean=mean, variance=variance, scale=unit_rms(shape).mul_(clip_norm), steps=steps, clip_norm=clip_norm
        )

    def _bias_free_state(self, released: Tensor, state: AdaCliPState, steps: int) -> AdaCliPState:
        """DP-MacAdam's update of ``m^``, ``s`` and ``b`` (see the class docstring)."""
        beta, weight = self.beta1, startup_weight(self.beta1, steps)
        deviation = released - state.mean  # g~ - m^_t-1
        mean = torch.add(state.mean, deviation, alpha=weight)
        variance = torch.lerp(deviation.square_().mul_(1 - weight), state.variance, beta)  # s_t
        if steps == 1:  # s_1 = kappa_1 = 0: nothing is known about the variance yet
            return AdaCliPState(mean=mean, variance=variance, scale=state.scale, steps=steps)
        noise_variance = state.scale.square().mul_((self.grad_noise_multiplier / self.expected_batch_size) ** 2)
        estimate = (variance / variance_correction(beta, steps)).sub_(noise_variance).clamp_(self.h1, self.h2)
        return AdaCliPState(
            mean=mean, variance=variance, scale=optimal_scale(estimate.sqrt(), self._kappa), steps=steps
        )


class AdaCliPAdapter(CoordinatewiseAdapter[AdaCliP]):
    """Audit view: ``w = (g - a) / b`` clipped to norm 1, noise ``sigma_g`` in ``w`` space.

    For ``quantile_scale`` the adversary also sees the noisy count, read off the public next global
    scale (``b~_t = target - log(C_t+1 / C_t) / clip_lr``), exactly as for
    :class:`~adaclip.methods.quantile.QuantileClipAdapter`: the clipped canary's centred bit ``-1/2``
    shifts the implied count noise by ``-1 / (2 sigma_b)``, and the whole shift has norm
    ``sqrt(sigma_g^-2 + (2 sigma_b)^-2) = 1 / sigma``.
    """

    @staticmethod
    def variant_params(estimator: Estimator, noise_multiplier: float) -> dict[str, object]:
        """The parameters the audit gives ``estimator``: for ``quantile_scale`` the count gets most of the budget.

        ``sigma_b = 0.6 sigma`` (as the quantile rule's audit), so a count released without noise moves the
        statistic far above its band.
        """
        if estimator == "quantile_scale":
            return {"estimator": estimator, "count_noise_std": 0.6 * noise_multiplier}
        return {"estimator": estimator}

    def centre(self, rule: AdaCliP, state: AdaCliPState, dim: int) -> Tensor:
        return state.mean

    def scale(self, rule: AdaCliP, state: AdaCliPState, dim: int) -> Tensor:
        return state.scale

    def gradient_noise_multiplier(self, rule: AdaCliP) -> float:
        return rule.grad_noise_multiplier

    def observe(self, rule: AdaCliP, state: Any, release: Tensor, next_state: Any) -> Tensor:
        if rule.quantile_scale is None:
            return release
        growth = math.log(next_state.clip_norm / state.clip_norm)
        noisy_fraction = rule.quantile_scale.target_quantile - growth / rule.quantile_scale.clip_lr
        return torch.cat([release, torch.tensor([noisy_fraction], dtype=release.dtype)])

    def implied_noise(self, rule: AdaCliP, state: Any, difference: Tensor) -> Tensor:
        if rule.quantile_scale is None:
            return self.gradient_noise(rule, state, difference)
        gradient = self.gradient_noise(rule, state, difference[:-1])
        count = rule.expected_batch_size * difference[-1:] / rule.quantile_scale.count_noise_std
        return torch.cat([gradient, count])

    def canary_shift(self, rule: AdaCliP, state: Any, dim: int) -> Tensor:
        shift = super().canary_shift(rule, state, dim)
        if rule.quantile_scale is None:
            return shift
        count = torch.tensor([-0.5 / rule.quantile_scale.count_noise_std], dtype=DTYPE)
        return torch.cat([shift, count])
