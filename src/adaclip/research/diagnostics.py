"""Per-step diagnostics of a private release, in units that mean the same for every method (claim 1).

A researcher's instrument, not a release: it reads the true per-example gradients of the batch, so
its numbers are not private and never feed back into training.  For each step, with ``g_i`` the
per-example gradients of the ``n`` sampled examples, ``g = sum_i g_i / n`` the clean mean gradient,
``r`` the released gradient and ``r0`` the release the rule would have made with zero noise (the same
clipped sum and state; ``r - r0`` is the injected noise):

* ``snr = ||r0||^2 / E||r - r0||^2``: the release's signal-to-noise ratio, a ratio of two quantities in
  the same units, so comparable across methods whose scales differ (AdaCliP's ``b`` against DP-SGD's
  ``C``); ``E||r - r0||^2`` is the rule's ``noise_power``;
* ``cosine_release`` and ``cosine_noise_free``: cosines of ``r`` and of ``r0`` with ``g`` (noise against
  clipping bias);
* ``parameter_noise = lr^2 E||r - r0||^2``: the noise each step adds to the parameters;
* ``heterogeneity = (sum_j s_j)^2 / (d sum_j s_j^2)`` with ``s_j`` the standard deviation over the batch of
  coordinate ``j`` of the per-example gradients: the noise power of the optimal coordinate-wise transform
  relative to an isotropic one at matched clipping (Pichapati et al. 2019, Thm. 2); ``1 - heterogeneity``
  is the best saving coordinate-wise clipping can give;
* for rules with a coordinate scale ``b`` (AdaCliP): ``shape_saving = 1 - (sum_j b_j^2)(sum_j s_j^2 / b_j^2)
  / (d sum_j s_j^2)``, the saving that ``b``'s shape achieves against the isotropic transform at matched
  clipping of the true per-example deviations (at most ``1 - heterogeneity``, reached by
  ``b_j ∝ sqrt(s_j)``; negative when ``b``'s shape is worse than a constant).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from adaclip.engine import AdaptiveClipDPOptimizer
from adaclip.engine.per_example import collect_parts, weighted_sum


def _cosine(a: Tensor, b: Tensor) -> float | None:
    norms = float(a.norm()) * float(b.norm())
    return float(torch.dot(a, b)) / norms if norms > 0 else None


def heterogeneity(std: Tensor) -> float | None:
    """``(sum_j s_j)^2 / (d sum_j s_j^2)`` (``None`` when every ``s_j`` is 0)."""
    squares = float(std.square().sum())
    return float(std.sum()) ** 2 / (std.numel() * squares) if squares > 0 else None


def shape_saving(scale: Tensor, std: Tensor) -> float | None:
    """``1 - (sum_j b_j^2)(sum_j s_j^2 / b_j^2) / (d sum_j s_j^2)`` (see the module docstring)."""
    squares = float(std.square().sum())
    if squares == 0:
        return None
    ratio = float(scale.square().sum()) * float((std / scale).square().sum()) / (std.numel() * squares)
    return 1.0 - ratio


class ReleaseProbe:
    """Measures one private step: :meth:`before_step` after ``backward()``, :meth:`after_step` after ``step()``."""

    def __init__(self, optimizer: AdaptiveClipDPOptimizer, lr: float) -> None:
        self.optimizer, self.lr = optimizer, lr
        self._clean: Tensor | None = None
        self._std: Tensor | None = None
        self._state: Any = None

    def before_step(self) -> None:
        """Read the clean mean gradient and the per-coordinate deviations of the batch, and the rule state."""
        optimizer, params = self.optimizer, self.optimizer.params
        parts = collect_parts(params)
        dim = sum(p.numel() for p in params)
        n = parts[0].num_examples if parts else 0
        reference = params[0]
        total = weighted_sum(parts, torch.ones(n, dtype=reference.dtype, device=reference.device), dim)
        squares = torch.cat([part.coordinate_square_sums() for part in parts]) if n else torch.zeros_like(total)
        self._clean = total / max(n, 1)
        self._std = (squares / max(n, 1) - self._clean.square()).clamp_min_(0).sqrt_()
        state = optimizer.rule_state
        self._state = (
            state
            if state is not None
            else optimizer.rule.init_state(dim, device=reference.device, dtype=reference.dtype)
        )

    def after_step(self) -> dict[str, float | None]:
        """The step's diagnostics (see the module docstring)."""
        optimizer, clean, std = self.optimizer, self._clean, self._std
        if clean is None or std is None or optimizer.last_clipped is None:
            raise RuntimeError("ReleaseProbe.after_step needs before_step() and an optimizer step in between")
        released = torch.cat([p.grad.reshape(-1) for p in optimizer.params])
        if optimizer.loss_reduction == "sum":
            released = released / optimizer.expected_batch_size
        zeros = torch.zeros(optimizer.rule.noise_size(released.numel()), dtype=released.dtype, device=released.device)
        noise_free, _, _ = optimizer.rule.release(optimizer.last_clipped, self._state, zeros)
        noise_power = float(optimizer.last_stats["noise_power"])
        result: dict[str, float | None] = {
            "snr": float(noise_free.square().sum()) / noise_power if noise_power > 0 else None,
            "cosine_release": _cosine(released, clean),
            "cosine_noise_free": _cosine(noise_free, clean),
            "parameter_noise": self.lr**2 * noise_power,
            "clean_norm": float(clean.norm()),
            "heterogeneity": heterogeneity(std),
        }
        scale = getattr(self._state, "scale", None)
        if isinstance(scale, Tensor) and scale.shape == std.shape:
            result["shape_saving"] = shape_saving(scale, std)
        self._clean = self._std = None
        return {key: (value if value is None or math.isfinite(value) else None) for key, value in result.items()}
