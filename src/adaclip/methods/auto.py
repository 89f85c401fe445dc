"""Automatic clipping, AUTO-S (Bu, Wang, Zha, Karypis 2023, "Automatic clipping: differentially private
deep learning made easier and stronger", NeurIPS 2023, eq. 4).

Per step::

    g_i <- g_i / (||g_i|| + r)
    g~   = (sum_i g_i + N(0, sigma^2 I)) / B

Every normalised vector has norm below 1, so the sum has sensitivity 1.  There is no clip norm to
tune; the stability constant ``r`` (default 0.01, the paper's) bounds the amplification of small
gradients at ``1 / r``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from adaclip._validate import require_in_range, require_positive
from adaclip.methods.base import ClipRule
from adaclip.methods.canary import DTYPE, CoordinatewiseAdapter


class AutoClip(ClipRule):
    """AUTO-S (see the module docstring).

    ``clipped_fraction`` counts examples whose vector got shorter (``||g_i|| + r > 1``).
    """

    def __init__(self, *, noise_multiplier: float, expected_batch_size: float, r: float = 0.01) -> None:
        self.noise_multiplier = require_in_range("noise_multiplier", noise_multiplier, 0.0, math.inf)
        self.expected_batch_size = require_positive("expected_batch_size", expected_batch_size)
        self.r = require_positive("r", r)

    def example_weights(self, norms: Tensor, state: None) -> Tensor:
        """``1 / (||g_i|| + r)``."""
        return 1.0 / (norms + self.r)

    def weight_bound(self, state: None) -> float:
        """Every normalised vector has norm below 1."""
        return 1.0


class AutoClipAdapter(CoordinatewiseAdapter[AutoClip]):
    """Audit view: sensitivity 1, noise ``sigma``.

    The canary's normalised norm is ``L / (L + r)`` with ``L = CANARY_SCALE``,
    a ``r / L`` (1e-5) shortfall from the bound.
    """

    def scale(self, rule: AutoClip, state: Any, dim: int) -> Tensor:
        return torch.ones(dim, dtype=DTYPE)
