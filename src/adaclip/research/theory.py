"""Closed-form noise power of AdaCliP's optimal transform against DP-SGD, and a check by simulation.

Pichapati et al. 2019 (arXiv 1908.07643), Thm. 2: for per-example gradients with per-coordinate
mean ``mu_j`` and standard deviation ``s_j``, the transform ``w = (g - a) / b`` with
``E||w||^2 = sum_j (s_j^2 + (mu_j - a_j)^2) / b_j^2 <= 1`` that minimises the injected noise power
``sum_j b_j^2`` (times ``sigma^2 / B^2`` for the mean gradient) is ``a = mu``,
``b_j = sqrt(s_j) sqrt(sum_k s_k)``, with noise power ``(sum_j s_j)^2``.  DP-SGD clipping at the
same level (``C^2 = E||g||^2 = sum_j (s_j^2 + mu_j^2)``) injects ``d sum_j (s_j^2 + mu_j^2)``.  By
Cauchy–Schwarz the ratio ``(sum s)^2 / (d sum s^2)`` is at most 1, with equality only when every
``s_j`` is the same: AdaCliP's gain grows as the gradient spread becomes uneven.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from adaclip.methods import AdaCliP


def log_spaced_std(dim: int, spread: float) -> Tensor:
    """Per-coordinate standard deviations log-spaced from 1 down to ``1 / spread`` (float64)."""
    if spread < 1:
        raise ValueError(f"spread must be >= 1 (largest / smallest std), got {spread}")
    return torch.logspace(0, -math.log10(spread), dim, dtype=torch.float64)


def optimal_noise_power(std: Tensor) -> float:
    """``(sum_j s_j)^2``: AdaCliP's noise power with the optimal ``a = mu`` and ``b`` (Thm. 2)."""
    return float(std.sum() ** 2)


def dpsgd_noise_power(std: Tensor, mean: Tensor | None = None) -> float:
    """``d sum_j (s_j^2 + mu_j^2)``: DP-SGD's noise power when it clips at the RMS gradient norm."""
    second_moment = std.square() if mean is None else std.square() + mean.square()
    return float(std.numel() * second_moment.sum())


def learned_noise_power(
    std: Tensor,
    *,
    batch_size: int,
    steps: int,
    noise_multiplier: float,
    seed: int,
    kappa: float = 4.0,
    h2: float = 100.0,
) -> float:
    """``sum_j (b_j / kappa)^2`` that :class:`~adaclip.methods.base.AdaCliP` learns on zero-mean Gaussian gradients.

    Runs the rule for ``steps`` steps on per-example gradients ``N(0, diag(std^2))`` with its
    noise at ``noise_multiplier`` and averages ``b / kappa`` over the last half.  ``kappa > 1``
    keeps clipping rare so that the variance estimate is not shrunk by clipping, and ``h2`` is
    set high so that the cap does not bind; then ``b / kappa`` should approach the optimal
    ``sqrt(s_j) sqrt(sum s)`` (with ``noise_multiplier = 0`` exactly in expectation).
    """
    generator = torch.Generator().manual_seed(seed)
    rule = AdaCliP(
        noise_multiplier=noise_multiplier,
        expected_batch_size=batch_size,
        kappa=kappa,
        h2=h2,
        beta1=0.9,
        beta2=0.995,
        estimator="per_example",
    )
    state = rule.init_state(std.numel(), dtype=torch.float64)
    scales = []
    for step in range(steps):
        grads = std * torch.randn(batch_size, std.numel(), generator=generator, dtype=torch.float64)
        noise = torch.randn(rule.noise_size(std.numel()), generator=generator, dtype=torch.float64)
        _, state, _ = rule.step(grads, state, noise)
        if step >= steps // 2:
            scales.append(state.scale)
    mean_scale = torch.stack(scales).mean(0) / kappa
    return float(mean_scale.square().sum())
