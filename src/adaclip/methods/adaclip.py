"""AdaCliP: coordinate-wise adaptive clipping (Pichapati, Suresh, Yu, Reddi, Kumar 2019, arXiv 1908.07643).

All parameters are flattened into one vector; operations are coordinate-wise.  Each step subtracts a
running mean estimate ``a``, divides by a per-coordinate scale ``b``, clips to norm 1, adds noise
once and maps back (Algorithm 1); ``a`` and ``b`` are moving averages of already released noisy
gradients, so the privacy cost is DP-SGD's with the same (sigma, q, T).

The scale minimises the injected noise power ``sum_j b_j^2`` subject to
``E||(g - a) / b||^2 = sum_j (s_j^2 + (mu_j - a_j)^2) / b_j^2 <= 1`` (Thm. 2): ``a = mu`` and
``b_j = sqrt(s_j) sqrt(sum_k s_k)``, with noise power ``(sum_j s_j)^2`` against DP-SGD's
``d sum_j (s_j^2 + mu_j^2)`` at matched clipping (:func:`optimal_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from adaclip._validate import require_in_range, require_positive
from adaclip.methods.base import ClippedSum, ClipRule, Stats, check_dim, clip_factors
from adaclip.methods.canary import CoordinatewiseAdapter


@dataclass(frozen=True)
class AdaClipState:
    """AdaCliP's running statistics, all of length ``d``.

    ``mean`` is the shift ``a_t``, ``variance`` the moving average ``v_t`` and ``scale`` the
    coordinate scale ``b_t`` used at the next step (a function of ``variance``, kept so that
    ``b_0`` is exactly ``initial_clip``).
    """

    mean: Tensor
    variance: Tensor
    scale: Tensor


VarianceTarget = Literal["per_example", "batch_mean"]
ClampPosition = Literal["before_average", "after_average"]


def _check_state_dim(state: AdaClipState, dim: int) -> None:
    if state.scale.shape != (dim,):
        raise ValueError(f"state was made for {state.scale.shape[0]} parameters, but the gradients have {dim}")


def optimal_scale(std: Tensor, kappa: float = 1.0) -> Tensor:
    """AdaCliP's noise-minimising scale ``b_j = kappa sqrt(s_j) sqrt(sum_k s_k)`` (Pichapati et al. 2019, Thm. 2).

    For per-coordinate deviations ``s_j`` this minimises the noise power ``sum_j b_j^2`` subject to
    ``sum_j s_j^2 / b_j^2 <= 1``; the minimum is ``(sum_j s_j)^2``.
    """
    return kappa * std.sqrt() * std.sum().sqrt()


class AdaCliP(ClipRule):
    """Coordinate-wise adaptive clipping, AdaCliP (Pichapati et al. 2019, arXiv 1908.07643, Alg. 1).

    Per step, all operations coordinate-wise over the flattened parameter vector::

        w_i = (g_i - a_t) / b_t,  w_i <- w_i min(1, 1/||w_i||)            (clip to norm 1)
        w~  = (sum_i w_i + N(0, sigma^2 I)) / B;   g~ = b_t * w~ + a_t    (noise, map back)
        a_t+1 = beta1 a_t + (1 - beta1) g~
        r_t   = ((g~ - a_t)^2 - b_t^2 sigma^2 / B^2) * (B if per_example else 1)
        v_t+1 = beta2 v_t + (1 - beta2) clamp(r_t, h1, h2)     (or clamp after averaging)
        b_t+1 = kappa sqrt(sqrt(v_t+1)) sqrt(sum_j sqrt(v_t+1,j))

    ``a`` and ``b`` depend on released noisy gradients only, so the privacy cost equals DP-SGD's
    with the same (sigma, q, T).  ``a_0 = 0`` and ``b_0 = initial_clip`` (``v_0`` is set to match),
    so the first step is DP-SGD with clip ``initial_clip``.

    Open choices the paper leaves, all explicit:

    * ``variance_target="per_example"`` multiplies ``r_t`` (which estimates the variance of the
      *batch mean*) by ``B`` so that ``v`` estimates the per-example variance the optimal transform
      needs; ``"batch_mean"`` keeps the paper's literal update (``b`` about ``sqrt(B)`` too small).
      Caveat: ``B r_t`` estimates ``s^2 + B (mu - a_t)^2``, so any lag of ``a`` behind the true mean
      is amplified ``B``-fold in ``v`` (``b`` errs on the large side: less clipping, more noise).
    * ``clamp="before_average"`` clamps ``r_t`` to ``[h1, h2]`` before the moving average (as
      in the paper); ``"after_average"`` clamps ``v_t+1`` instead.
    * ``kappa`` scales ``b`` globally (``kappa > 1`` clips less and adds more noise).

    The defaults (``h2 = 0.1``, per-example variance, clamp before averaging) were chosen on
    Fashion-MNIST logistic regression at epsilon = 1; ``h2`` then acts as a hand-set scale of ``b``
    (``reports/probes/adaclip_defaults.md`` has the measurements).  The learning rate is in gradient units,
    not scaled by ``1 / initial_clip`` as DP-SGD's is.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        expected_batch_size: float,
        initial_clip: float = 1.0,
        beta1: float = 0.99,
        beta2: float = 0.9,
        h1: float = 1e-12,
        h2: float = 0.1,
        kappa: float = 1.0,
        variance_target: VarianceTarget = "per_example",
        clamp: ClampPosition = "before_average",
    ) -> None:
        self.noise_multiplier = require_in_range("noise_multiplier", noise_multiplier, 0.0, math.inf)
        self.expected_batch_size = require_positive("expected_batch_size", expected_batch_size)
        self.initial_clip = require_positive("initial_clip", initial_clip)
        self.beta1 = require_in_range("beta1", beta1, 0.0, 1.0)
        self.beta2 = require_in_range("beta2", beta2, 0.0, 1.0)
        self.h1 = require_positive("h1", h1)
        self.h2 = require_positive("h2", h2)
        if self.h1 > self.h2:
            raise ValueError(f"h1 must be <= h2 (clamp range for the variance), got h1={h1}, h2={h2}")
        self.kappa = require_positive("kappa", kappa)
        if variance_target not in ("per_example", "batch_mean"):
            raise ValueError(f"variance_target must be 'per_example' or 'batch_mean', got {variance_target!r}")
        if clamp not in ("before_average", "after_average"):
            raise ValueError(f"clamp must be 'before_average' or 'after_average', got {clamp!r}")
        self.variance_target: VarianceTarget = variance_target
        self.clamp: ClampPosition = clamp

    def init_state(
        self, dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> AdaClipState:
        """``a_0 = 0``; ``v_0 = (C0 / (kappa sqrt(d)))^2`` so that ``b_0 = C0`` in every coordinate."""
        check_dim(dim)
        std0 = self.initial_clip / (self.kappa * math.sqrt(dim))
        return AdaClipState(
            mean=torch.zeros(dim, device=device, dtype=dtype),
            variance=torch.full((dim,), std0**2, device=device, dtype=dtype),
            scale=torch.full((dim,), self.initial_clip, device=device, dtype=dtype),
        )

    def clipped_sum(self, per_example_grads: Tensor, state: AdaClipState) -> ClippedSum:
        """``sum_i m_i (g_i - a)`` with ``m_i = min(1, 1 / ||(g_i - a) / b||)`` (the default, after a shape check)."""
        _check_state_dim(state, per_example_grads.shape[1])
        return super().clipped_sum(per_example_grads, state)

    def norm_transform(self, state: AdaClipState) -> tuple[Tensor, Tensor]:
        """Clipping happens on ``(g_i - a_t) / b_t``: the norms must be ``||(g_i - a_t) / b_t||``."""
        return state.mean, state.scale

    def example_weights(self, norms: Tensor, state: AdaClipState) -> Tensor:
        """``m_i = min(1, 1 / ||(g_i - a_t) / b_t||)``."""
        return clip_factors(norms, 1.0)

    def release(self, clipped: ClippedSum, state: AdaClipState, noise: Tensor) -> tuple[Tensor, AdaClipState, Stats]:
        """Noise, map back and update ``a``, ``v``, ``b`` from ``V = sum_i m_i (g_i - a)``.

        The clipped transformed vectors are ``w_i = m_i (g_i - a) / b`` with
        ``m_i = min(1, 1 / ||(g_i - a) / b||)``, so ``sum_i w_i = V / b`` and the released gradient is

            g~ = b (V / b + sigma z) / B + a = (V + sigma b z) / B + a.

        The state update is written with fused in-place operations (fewer passes over ``d``).
        """
        dim = self._check_release_inputs(clipped, noise)
        _check_state_dim(state, dim)
        a, b, B = state.mean, state.scale, self.expected_batch_size
        released = torch.addcmul(clipped.vector, b, noise, value=self.noise_multiplier).div_(B).add_(a)

        # r_t = (g~ - a)^2 - b^2 sigma^2 / B^2, times B for the per-example variance
        factor = B if self.variance_target == "per_example" else 1.0
        second_moment = (released - a).square_().mul_(factor)
        second_moment.addcmul_(b, b, value=-factor * (self.noise_multiplier / B) ** 2)
        # beta2 v + (1 - beta2) r  ==  lerp(r, v, beta2)
        if self.clamp == "before_average":
            variance = torch.lerp(second_moment.clamp_(self.h1, self.h2), state.variance, self.beta2)
        else:
            variance = torch.lerp(second_moment, state.variance, self.beta2).clamp_(self.h1, self.h2)
        # b = kappa sqrt(sd) sqrt(sum sd), sd = sqrt(v)  (optimal_scale)
        std = variance.sqrt()
        total = std.sum()
        new_state = AdaClipState(
            mean=torch.lerp(released, a, self.beta1),
            variance=variance,
            scale=std.sqrt_().mul_(total.sqrt_().mul_(self.kappa)),
        )
        low, high = torch.aminmax(b)
        stats = {
            "clipped_fraction": clipped.clipped_fraction,
            "noise_power": float(torch.dot(b, b)) * (self.noise_multiplier / B) ** 2,
            "scale_mean": float(b.sum()) / dim,
            "scale_min": float(low),
            "scale_max": float(high),
            "batch_size": clipped.examples,
        }
        return released, new_state, stats


class AdaCliPAdapter(CoordinatewiseAdapter[AdaCliP]):
    """Audit view: ``w = (g - a) / b`` clipped to norm 1, noise ``sigma`` in ``w`` space."""

    def centre(self, rule: AdaCliP, state: AdaClipState, dim: int) -> Tensor:
        return state.mean

    def scale(self, rule: AdaCliP, state: AdaClipState, dim: int) -> Tensor:
        return state.scale
