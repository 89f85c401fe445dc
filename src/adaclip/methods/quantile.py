"""Quantile-based adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially private learning
with adaptive clipping", NeurIPS 2021, Algorithm 1).

DP-SGD whose clip norm follows a private estimate of a quantile of the per-example gradient norms.
Per step, with clip norm ``C_t``::

    u_i   = 1[||g_i|| <= C_t] - 1/2                  (centred bits, sensitivity 1/2)
    b~_t  = (sum_i u_i + N(0, sigma_b^2)) / B + 1/2  (noisy unclipped fraction)
    C_t+1 = C_t exp(-clip_lr (b~_t - target_quantile))
    grad  = DP-SGD with clip C_t and noise multiplier sigma_delta

The gradient and count releases together are one Gaussian mechanism with multiplier ``sigma`` when
``sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)`` (Thm. 1), which needs ``sigma < 2 sigma_b``.
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


def default_count_noise_std(expected_batch_size: float, noise_multiplier: float) -> float:
    """The count noise ``sigma_b``: the paper's ``B / 20``, raised to ``sigma`` when that is larger.

    For small batches ``B / 20`` would leave the gradient almost none of the budget or make the split infeasible.
    """
    return max(expected_batch_size / 20, noise_multiplier)


def split_noise_multiplier(noise_multiplier: float, count_noise_std: float, rule: str) -> float:
    """``sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)``, the gradient's share of the total ``sigma`` (Thm. 1).

    The gradient (sensitivity 1 in clip units) with ``sigma_delta`` and the count (sensitivity 1/2) with
    ``sigma_b`` compose like one Gaussian mechanism with ``sigma``; infeasible unless ``sigma < 2 sigma_b``
    (``rule`` names the caller in the error).
    """
    sigma, sigma_b = noise_multiplier, count_noise_std
    if sigma == 0.0:
        return 0.0
    if sigma >= 2 * sigma_b:
        raise ValueError(
            f"{rule} needs noise_multiplier < 2 * count_noise_std to split the privacy "
            f"budget, got noise_multiplier={sigma} and count_noise_std={sigma_b}. Increase "
            f"count_noise_std above {sigma / 2:g} (or the expected batch size), or lower noise_multiplier."
        )
    return 1.0 / math.sqrt(sigma**-2 - (2 * sigma_b) ** -2)


def noisy_unclipped_fraction(clipped: ClippedSum, count_noise: float, expected_batch_size: float) -> float:
    """``b~ = (sum_i u_i + count_noise) / B + 1/2`` with ``u_i = 1[example i unclipped] - 1/2``.

    The unclipped count is ``n - n_clipped`` (an example is unclipped exactly when its weight is 1), so
    ``sum_i u_i = n - n_clipped - n / 2``; ``count_noise`` is the draw ``N(0, sigma_b^2)``.
    """
    examples, clipped_count = clipped.count_values[:2]
    return (examples - clipped_count - examples / 2 + count_noise) / expected_batch_size + 0.5


def geometric_update(clip_norm: float, unclipped_fraction: float, target_quantile: float, clip_lr: float) -> float:
    """Andrew et al.'s geometric step ``C_t+1 = C_t exp(-clip_lr (b~_t - target_quantile))``."""
    return clip_norm * math.exp(-clip_lr * (unclipped_fraction - target_quantile))


@dataclass(frozen=True)
class QuantileClipState:
    """The clip norm ``C_t`` to use at the next step."""

    clip_norm: float


class QuantileClip(ClipRule):
    """Quantile-based adaptive clipping (see the module docstring).

    ``noise_multiplier`` is the *total* sigma the accountant sees; the gradient gets
    ``grad_noise_multiplier`` (sigma_delta) and the count ``count_noise_std`` (sigma_b).
    ``count_noise_std=None`` takes the paper's ``B / 20``, raised to ``sigma`` when that is larger
    (small batches, where ``B / 20`` would leave the gradient almost none of the budget or make the
    split infeasible).  The last of the ``d + 1`` noise draws is the count noise.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        expected_batch_size: float,
        initial_clip: float = 0.1,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        count_noise_std: float | None = None,
    ) -> None:
        self.noise_multiplier = require_in_range("noise_multiplier", noise_multiplier, 0.0, math.inf)
        self.expected_batch_size = require_positive("expected_batch_size", expected_batch_size)
        self.initial_clip = require_positive("initial_clip", initial_clip)
        self.target_quantile = require_in_range("target_quantile", target_quantile, 0.0, 1.0, closed_high=True)
        self.clip_lr = require_positive("clip_lr", clip_lr)
        if count_noise_std is None:
            count_noise_std = default_count_noise_std(self.expected_batch_size, self.noise_multiplier)
        self.count_noise_std = require_positive("count_noise_std", count_noise_std)
        self.grad_noise_multiplier = split_noise_multiplier(self.noise_multiplier, self.count_noise_std, "QuantileClip")

    def init_state(
        self, dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> QuantileClipState:
        check_dim(dim)
        return QuantileClipState(clip_norm=self.initial_clip)

    def noise_size(self, dim: int) -> int:
        return check_dim(dim) + 1

    def example_weights(self, norms: Tensor, state: QuantileClipState) -> Tensor:
        """``min(1, C_t / ||g_i||)``."""
        return clip_factors(norms, state.clip_norm)

    def release(
        self, clipped: ClippedSum, state: QuantileClipState, noise: Tensor
    ) -> tuple[Tensor, QuantileClipState, Stats]:
        """DP-SGD with clip ``C_t`` and ``sigma_delta``, and the noisy count that sets ``C_t+1``.

        ``||g_i|| <= C_t`` exactly when ``c_i = 1`` (:func:`noisy_unclipped_fraction`); the last noise
        draw is the count's.
        """
        dim = self._check_release_inputs(clipped, noise)
        clip_norm, B = state.clip_norm, self.expected_batch_size
        grad_noise_std = self.grad_noise_multiplier * clip_norm
        noisy_mean = torch.add(clipped.vector, noise[:dim], alpha=grad_noise_std).div_(B)

        (count_draw,) = clipped.read(noise[dim])  # one host synchronisation: the counts and the count's draw
        examples = clipped.examples
        unclipped_estimate = noisy_unclipped_fraction(clipped, self.count_noise_std * count_draw, B)
        next_clip = geometric_update(clip_norm, unclipped_estimate, self.target_quantile, self.clip_lr)
        stats = {
            "clipped_fraction": clipped.clipped_fraction,
            "noise_power": dim * (grad_noise_std / B) ** 2,
            "clip_norm": clip_norm,
            "unclipped_estimate": unclipped_estimate,
            "batch_size": examples,
        }
        return noisy_mean, QuantileClipState(clip_norm=next_clip), stats


class QuantileClipAdapter(CoordinatewiseAdapter[QuantileClip]):
    """Audit view: gradient noise ``sigma_delta C_t``, centred count noise ``sigma_b``.

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

    def scale(self, rule: QuantileClip, state: Any, dim: int) -> Tensor:
        return torch.full((dim,), state.clip_norm, dtype=DTYPE)

    def gradient_noise_multiplier(self, rule: QuantileClip) -> float:
        return rule.grad_noise_multiplier

    def observe(self, rule: QuantileClip, state: Any, release: Tensor, next_state: Any) -> Tensor:
        growth = math.log(next_state.clip_norm / state.clip_norm)
        noisy_fraction = rule.target_quantile - growth / rule.clip_lr
        return torch.cat([release, torch.tensor([noisy_fraction], dtype=release.dtype)])

    def implied_noise(self, rule: QuantileClip, state: Any, difference: Tensor) -> Tensor:
        gradient = self.gradient_noise(rule, state, difference[:-1])
        count = rule.expected_batch_size * difference[-1:] / rule.count_noise_std
        return torch.cat([gradient, count])

    def canary_shift(self, rule: QuantileClip, state: Any, dim: int) -> Tensor:
        count = torch.tensor([-0.5 / rule.count_noise_std], dtype=DTYPE)
        return torch.cat([super().canary_shift(rule, state, dim), count])
