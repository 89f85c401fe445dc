"""DP-SGD with a fixed clip norm (Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang 2016, Algorithm 1).

Per step, with clip norm ``C`` and Poisson batch of expected size ``B``::

    g_i <- g_i min(1, C / ||g_i||)
    g~   = (sum_i g_i + N(0, sigma^2 C^2 I)) / B

The sum of clipped vectors has sensitivity ``C``, so the noise is ``sigma C`` per coordinate.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from adaclip._validate import require_in_range, require_positive
from adaclip.methods.base import ClipRule, clip_factors
from adaclip.methods.canary import DTYPE, CoordinatewiseAdapter


class FixedClip(ClipRule):
    """DP-SGD with a fixed clip norm ``C`` (see the module docstring)."""

    def __init__(self, *, noise_multiplier: float, expected_batch_size: float, clip_norm: float = 1.0) -> None:
        self.clip_norm = require_positive("clip_norm", clip_norm)
        self.noise_multiplier = require_in_range("noise_multiplier", noise_multiplier, 0.0, math.inf)
        self.expected_batch_size = require_positive("expected_batch_size", expected_batch_size)

    def example_weights(self, norms: Tensor, state: None) -> Tensor:
        """``min(1, C / ||g_i||)``."""
        return clip_factors(norms, self.clip_norm)


class FixedClipAdapter(CoordinatewiseAdapter[FixedClip]):
    """Audit view: clip norm ``C`` in every coordinate, noise ``sigma C``."""

    def scale(self, rule: FixedClip, state: Any, dim: int) -> Tensor:
        return torch.full((dim,), rule.clip_norm, dtype=DTYPE)
