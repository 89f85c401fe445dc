"""DP-MacAdam: adaptive clipping and adaptive momentum from one set of moments (Tasnim, Sankar, Kosut 2026,
arXiv 2606.05435, Alg. 1).

AdaCliP's shift-scale-clip release whose shift is Adam's bias-corrected first moment and whose scale
comes from DP-MacAdam's bias-free variance estimate, followed by an Adam step on the same moments::

    w_i   = (g_i - m^_t-1) / b_t-1,  w_i <- w_i / max(1, ||w_i||)
    g~    = b_t-1 (sum_i w_i + N(0, sigma^2 I)) / B + m^_t-1
    m^_t, s_t, b_t   as AdaCliP(estimator="bias_free") (:class:`~adaclip.methods.adaclip.AdaCliP`)
    v_t   = beta2 v_t-1 + (1 - beta2) g~^2,   v^_t = v_t / (1 - beta2^t)
    step  = m^_t / (sqrt(v^_t) + gamma),      theta_t = theta_t-1 - lr * step

``b_t = s^_t^(1/4) (sum_j s^_t,j^(1/2))^(1/2)`` with ``s^_t = clamp(s_t / kappa_t - b_t-1^2 sigma^2 / B^2,
h1, h2)``: the noise variance is subtracted after the moving average, which ``kappa_t`` corrects for
its start-up.  The bias-free estimator, its one deviation from the offline transcription of the
paper's equations (``u_t`` as a product, for which ``kappa_t`` is exact) and its behaviour are
documented on :class:`~adaclip.methods.adaclip.AdaCliP`.  Without upward bias the estimate shrinks ``b``
until the floor ``h1`` stops it, so ``h1`` sets the scale in practice (default ``1e-6``; tune it with the
learning rate).  ``h2`` is AdaCliP's default and ``gamma`` Adam's; the report's tuned results are in
(report: 3. Better accuracy at the same (ε, δ)?).

**How it meets the optimizer.**  The release is the Adam step and the moments live in the rule's
state: wrap a plain ``torch.optim.SGD(lr=...)`` (no momentum, no weight decay), whose step
``theta -= lr * p.grad`` is then DP-MacAdam's; wrapping ``torch.optim.Adam`` would apply Adam twice.
``stats["noise_power"]`` is ``E||noise||^2`` of ``g~``, not of the step.

**Privacy.**  ``g~`` is AdaCliP's release (sensitivity 1 in ``w`` space, noise ``sigma``); ``m^``,
``s``, ``b``, ``v`` and the step are functions of released ``g~`` only, so the cost is DP-SGD's with
the same (sigma, q, T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from adaclip._validate import require_in_range, require_positive
from adaclip.methods.adaclip import AdaCliP, AdaCliPState, startup_weight
from adaclip.methods.base import ClippedSum, ClipRule, Stats
from adaclip.methods.canary import CoordinatewiseAdapter


@dataclass(frozen=True, kw_only=True)
class MacAdamState(AdaCliPState):
    """AdaCliP's bias-free state (``mean`` is ``m^_t``, ``variance`` ``s_t``) plus Adam's raw second moment ``v_t``."""

    second_moment: Tensor


class MacAdam(ClipRule):
    """DP-MacAdam (see the module docstring); ``initial_clip`` is ``b_0``; it releases the Adam step: wrap plain SGD."""

    def __init__(
        self,
        *,
        noise_multiplier: float,
        expected_batch_size: float,
        initial_clip: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        h1: float = 1e-6,
        h2: float = 0.1,
        gamma: float = 1e-8,
    ) -> None:
        self.noise_multiplier = require_in_range("noise_multiplier", noise_multiplier, 0.0, math.inf)
        self.expected_batch_size = require_positive("expected_batch_size", expected_batch_size)
        self.beta2 = require_in_range("beta2", beta2, 0.0, 1.0)
        self.gamma = require_positive("gamma", gamma)
        self.clipping = AdaCliP(
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
            initial_clip=initial_clip,
            beta1=beta1,
            h1=h1,
            h2=h2,
            estimator="bias_free",
        )
        clipping = self.clipping
        self.initial_clip, self.beta1, self.h1, self.h2 = (
            clipping.initial_clip,
            clipping.beta1,
            clipping.h1,
            clipping.h2,
        )

    def init_state(
        self, dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MacAdamState:
        """AdaCliP's bias-free start (``m^_0 = s_0 = 0``, ``b_0 = initial_clip``) and ``v_0 = 0``."""
        start = self.clipping.init_state(dim, device=device, dtype=dtype)
        return MacAdamState(
            mean=start.mean, variance=start.variance, scale=start.scale, second_moment=torch.zeros_like(start.mean)
        )

    def clipped_sum(self, per_example_grads: Tensor, state: MacAdamState) -> ClippedSum:
        """AdaCliP's: ``sum_i m_i (g_i - m^)`` with ``m_i = min(1, 1 / ||(g_i - m^) / b||)``."""
        return self.clipping.clipped_sum(per_example_grads, state)

    def norm_transform(self, state: MacAdamState) -> tuple[Tensor, Tensor]:
        """Clipping happens on ``(g_i - m^_t-1) / b_t-1``."""
        return self.clipping.norm_transform(state)

    def example_weights(self, norms: Tensor, state: MacAdamState) -> Tensor:
        """``min(1, 1 / ||(g_i - m^_t-1) / b_t-1||)``."""
        return self.clipping.example_weights(norms, state)

    def release(self, clipped: ClippedSum, state: MacAdamState, noise: Tensor) -> tuple[Tensor, MacAdamState, Stats]:
        """AdaCliP's bias-free release ``g~`` and next state, then Adam's ``v`` and the step (:meth:`adam_step`)."""
        released, clip_state, stats = self.clipping.release(clipped, state, noise)
        next_state = self.next_state(released, state, clip_state)
        return self.adam_step(next_state), next_state, stats

    def next_state(self, released: Tensor, state: MacAdamState, clip_state: AdaCliPState) -> MacAdamState:
        """``clip_state`` (AdaCliP's next state from ``g~``) with Adam's ``v_t = beta2 v_t-1 + (1 - beta2) g~^2``."""
        return MacAdamState(
            mean=clip_state.mean,
            variance=clip_state.variance,
            scale=clip_state.scale,
            steps=clip_state.steps,
            second_moment=torch.lerp(released.square(), state.second_moment, self.beta2),
        )

    def adam_step(self, state: MacAdamState) -> Tensor:
        """``m^_t / (sqrt(v_t / (1 - beta2^t)) + gamma)``; ``state.mean`` is already the bias-corrected ``m^_t``."""
        denominator = state.second_moment.div(1 - self.beta2**state.steps).sqrt_().add_(self.gamma)
        return state.mean / denominator


class MacAdamAdapter(CoordinatewiseAdapter[MacAdam]):
    """Audit view: AdaCliP's (centre ``m^_t-1``, scale ``b_t-1``, noise ``sigma``); ``g~`` read off the public ``m^``.

    ``m^_t = m^_t-1 + w_t (g~ - m^_t-1)`` gives ``g~ = m^_t-1 + (m^_t - m^_t-1) / w_t``; the step is a function
    of ``g~`` and the previous state, so observing ``g~`` is at least as strong as observing the step.
    """

    def centre(self, rule: MacAdam, state: MacAdamState, dim: int) -> Tensor:
        return state.mean

    def scale(self, rule: MacAdam, state: MacAdamState, dim: int) -> Tensor:
        return state.scale

    def observe(self, rule: MacAdam, state: MacAdamState, release: Tensor, next_state: MacAdamState) -> Tensor:
        weight = startup_weight(rule.beta1, next_state.steps)
        return state.mean + (next_state.mean - state.mean) / weight
