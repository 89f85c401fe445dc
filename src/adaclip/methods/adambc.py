"""DP-AdamBC: DP-Adam with a bias-corrected second moment (Tang, Shpilevskiy, Lécuyer, AAAI 2024, arXiv 2312.14334).

DP-SGD's release followed by Adam, whose second moment has the known noise variance removed (Alg. 1)::

    g~    = (sum_i g_i min(1, C / ||g_i||) + N(0, sigma^2 C^2 I)) / B            (DP-SGD, Abadi et al. 2016)
    m_t   = beta1 m_t-1 + (1 - beta1) g~,     m^_t = m_t / (1 - beta1^t)
    v_t   = beta2 v_t-1 + (1 - beta2) g~^2,   v^_t = v_t / (1 - beta2^t)
    step  = m^_t / sqrt(max(v^_t - Phi, gamma')),   Phi = (sigma C / B)^2
    theta_t = theta_t-1 - lr * step

Plain DP-Adam divides by ``sqrt(v^_t)``, whose expectation carries the noise variance ``Phi`` in every
coordinate; where the gradient's own second moment is far below ``Phi`` (most coordinates at small
batch sizes) the denominator is about ``sqrt(Phi)``, a constant, and DP-Adam is DP-SGD with momentum
and a rescaled learning rate (the paper's title).  Subtracting ``Phi`` restores Adam's per-coordinate
scaling; ``gamma'`` (``gamma``) floors the corrected second moment.  Where the gradient's second moment
is below ``Phi`` the corrected estimate sits at the floor, and the step there is ``m^ / sqrt(gamma')``: a
floor far below ``Phi`` blows up the noise-dominated coordinates.  The default ``1e-6`` is about ``Phi / 10``
at B = 256, C = 1, sigma near 1 (the authors' scripts use ``1e-9`` and ``7e-9``); tune it with the learning
rate when ``Phi`` is far from that.

**How it meets the optimizer.**  The rule's release *is* the Adam step ``m^_t / sqrt(max(v^_t - Phi,
gamma'))``, and the moments live in the rule's state: wrap a plain ``torch.optim.SGD(lr=...)``
(no momentum, no weight decay) and its step ``theta -= lr * p.grad`` is DP-AdamBC.  Wrapping
``torch.optim.Adam`` would apply Adam twice.  ``stats["noise_power"]`` is ``E||noise||^2`` of ``g~``,
the privatised gradient, not of the step.

**Privacy.**  ``g~`` is DP-SGD's release; ``m``, ``v`` and the step are functions of the released
``g~`` sequence and public constants only (post-processing), so the cost is DP-SGD's with the same
(sigma, q, T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adaclip._validate import require_in_range, require_positive
from adaclip.methods.base import ClippedSum, ClipRule, Stats, check_dim, clip_factors
from adaclip.methods.canary import DTYPE, CoordinatewiseAdapter


@dataclass(frozen=True)
class AdamState:
    """Adam's raw (not bias-corrected) moments ``m_t``, ``v_t`` of the released gradients and the step count ``t``."""

    first_moment: Tensor
    second_moment: Tensor
    steps: int = 0


def released_gradient(previous_first_moment: Tensor, first_moment: Tensor, beta1: float) -> Tensor:
    """``g~ = (m_t - beta1 m_t-1) / (1 - beta1)``: the released gradient, read back from two public states."""
    return (first_moment - beta1 * previous_first_moment) / (1 - beta1)


class AdamBC(ClipRule):
    """DP-AdamBC (see the module docstring): DP-SGD's release, then Adam with the noise variance taken out of ``v``.

    ``clip_norm`` is DP-SGD's ``C``; ``gamma`` is the paper's ``gamma'``.  The release is the Adam step;
    wrap plain SGD.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        expected_batch_size: float,
        clip_norm: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        gamma: float = 1e-6,
    ) -> None:
        self.noise_multiplier = require_in_range("noise_multiplier", noise_multiplier, 0.0, math.inf)
        self.expected_batch_size = require_positive("expected_batch_size", expected_batch_size)
        self.clip_norm = require_positive("clip_norm", clip_norm)
        self.beta1 = require_in_range("beta1", beta1, 0.0, 1.0)
        self.beta2 = require_in_range("beta2", beta2, 0.0, 1.0)
        self.gamma = require_positive("gamma", gamma)

    def init_state(
        self, dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> AdamState:
        """``m_0 = v_0 = 0``, ``t = 0``."""
        check_dim(dim)
        zeros = torch.zeros(dim, device=device, dtype=dtype)
        return AdamState(first_moment=zeros, second_moment=torch.zeros_like(zeros))

    def example_weights(self, norms: Tensor, state: AdamState) -> Tensor:
        """``min(1, C / ||g_i||)``: DP-SGD's clipping."""
        return clip_factors(norms, self.clip_norm)

    def noise_variance(self) -> float:
        """``Phi = (sigma C / B)^2``, the variance of the noise in each coordinate of ``g~``."""
        return (self.noise_multiplier * self.clip_norm / self.expected_batch_size) ** 2

    def release(self, clipped: ClippedSum, state: AdamState, noise: Tensor) -> tuple[Tensor, AdamState, Stats]:
        """DP-SGD's ``g~``, then the Adam moments and the bias-corrected step (the returned vector)."""
        dim = self._check_release_inputs(clipped, noise)
        if state.first_moment.shape != (dim,):
            raise ValueError(
                f"state was made for {state.first_moment.shape[0]} parameters, but the gradients have {dim}"
            )
        noise_std = self.noise_multiplier * self.clip_norm
        released = torch.add(clipped.vector, noise, alpha=noise_std).div_(self.expected_batch_size)
        next_state = self.next_state(released, state)
        corrected = self.corrected_second_moment(next_state)
        (above_floor,) = clipped.read((corrected > self.gamma).sum())  # one host synchronisation, with the counts
        stats = {
            "clipped_fraction": clipped.clipped_fraction,
            "noise_power": dim * (noise_std / self.expected_batch_size) ** 2,
            "clip_norm": self.clip_norm,
            "corrected_fraction": above_floor / dim,  # coordinates above the floor gamma'
            "batch_size": clipped.examples,
        }
        step = next_state.first_moment.div(1 - self.beta1**next_state.steps).div_(corrected.sqrt_())
        return step, next_state, stats

    def next_state(self, released: Tensor, state: AdamState) -> AdamState:
        """Adam's moment update from the released gradient ``g~`` alone."""
        return AdamState(
            first_moment=torch.lerp(released, state.first_moment, self.beta1),
            second_moment=torch.lerp(released.square(), state.second_moment, self.beta2),
            steps=state.steps + 1,
        )

    def corrected_second_moment(self, state: AdamState) -> Tensor:
        """``max(v^_t - Phi, gamma')`` with ``v^_t = v_t / (1 - beta2^t)``."""
        return state.second_moment.div(1 - self.beta2**state.steps).sub_(self.noise_variance()).clamp_(min=self.gamma)


class AdamBCAdapter(CoordinatewiseAdapter[AdamBC]):
    """Audit view: DP-SGD with clip ``C``, noise ``sigma C``; the adversary reads ``g~`` off the public moments.

    The step is a deterministic function of ``g~`` and the previous state, so observing ``g~`` itself
    (``(m_t - beta1 m_t-1) / (1 - beta1)``, :func:`released_gradient`) is at least as strong.
    """

    def scale(self, rule: AdamBC, state: Any, dim: int) -> Tensor:
        return torch.full((dim,), rule.clip_norm, dtype=DTYPE)

    def observe(self, rule: AdamBC, state: Any, release: Tensor, next_state: Any) -> Tensor:
        return released_gradient(state.first_moment, next_state.first_moment, rule.beta1)
