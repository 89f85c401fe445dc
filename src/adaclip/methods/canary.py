"""What a white-box auditor knows about a rule: its canary, its background and the inverse of its noise map.

The privacy audit (:mod:`adaclip.audit`) runs a rule many times on two neighbouring batches
and inverts each release into the standard-normal draws that would explain it; it needs, per rule,
where to put a canary on the clip boundary and how the analysis says that canary shifts the draws.
That knowledge is part of a method's definition, so each method module defines its adapter (usually
a few lines on top of :class:`CoordinatewiseAdapter`) and the registry (:mod:`adaclip.methods`)
names it next to the rule.  The audit works in ``float64``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from adaclip.methods.base import ClipRule

#: How far outside the clip region the canary and the background gradients lie (in clip units).
CANARY_SCALE = 1e3
DTYPE = torch.float64

R = TypeVar("R", bound=ClipRule)


class CanaryAdapter(ABC, Generic[R]):
    """What the white-box adversary knows about one rule: its canary, its inverse and its analysis.

    ``state`` is the adversary's view of the rule's public state.  The rule audit works in ``float64``.
    To audit a new method, subclass this (or :class:`CoordinatewiseAdapter` for a rule that clips
    coordinate-wise) in the method's module and name it in the method's registry entry (:mod:`adaclip.methods`).
    """

    def rule_params(self, noise_multiplier: float, expected_batch_size: float) -> dict[str, object]:
        """Rule parameters the audit sets (beyond the rule's defaults)."""
        return {}

    @abstractmethod
    def canary(self, rule: R, state: Any, dim: int) -> Tensor:
        """The canary's gradient ``[dim]``.

        Far outside the clip region along coordinate 0, after the rule's transform.
        """

    @abstractmethod
    def background(self, rule: R, state: Any, dim: int, size: int) -> Tensor:
        """The other examples' gradients ``[size, dim]``, chosen by the adversary."""

    def observe(self, rule: R, state: Any, release: Tensor, next_state: Any) -> Tensor:
        """Everything one step releases, one entry per noise draw (default: the noisy mean gradient)."""
        return release

    @abstractmethod
    def gradient_noise(self, rule: R, state: Any, difference: Tensor) -> Tensor:
        """The gradient's standard-normal draws that explain ``release - release without noise``.

        The gradient's noise map, inverted.
        """

    def implied_noise(self, rule: R, state: Any, difference: Tensor) -> Tensor:
        """All draws that explain ``observe(...) - observe(...) without noise`` (default: the gradient's)."""
        return self.gradient_noise(rule, state, difference)

    @abstractmethod
    def canary_shift(self, rule: R, state: Any, dim: int) -> Tensor:
        """Shift of the implied noise that a canary on the clip boundary causes, as the analysis says.

        The shift is sensitivity / std.
        """


class CoordinatewiseAdapter(CanaryAdapter[R]):
    """Rules that clip ``w = (g - centre) / scale`` and release ``centre + scale * (sum w + sigma_g z) / B``.

    The canary is ``centre + CANARY_SCALE * scale_0 * e_0`` (transformed: ``CANARY_SCALE e_0``, clipped to
    ``e_0``); the background is its mirror image, one copy per expected batch member, so that the
    realised batch is ``B`` without the canary.  The implied noise is
    ``B * difference / (sigma_g * scale)`` and the canary shifts coordinate 0 by ``1 / sigma_g``.
    """

    def centre(self, rule: R, state: Any, dim: int) -> Tensor:
        return torch.zeros(dim, dtype=DTYPE)

    @abstractmethod
    def scale(self, rule: R, state: Any, dim: int) -> Tensor:
        """Per-coordinate clip scale (the sensitivity of the sum in each coordinate)."""

    def gradient_noise_multiplier(self, rule: R) -> float:
        return rule.noise_multiplier

    def _extreme(self, rule: R, state: Any, dim: int, sign: float) -> Tensor:
        point = self.centre(rule, state, dim).clone()
        point[0] += sign * CANARY_SCALE * self.scale(rule, state, dim)[0]
        return point

    def canary(self, rule: R, state: Any, dim: int) -> Tensor:
        return self._extreme(rule, state, dim, 1.0)

    def background(self, rule: R, state: Any, dim: int, size: int) -> Tensor:
        return self._extreme(rule, state, dim, -1.0).expand(size, dim)

    def gradient_noise(self, rule: R, state: Any, difference: Tensor) -> Tensor:
        dim = difference.shape[0]
        return (
            rule.expected_batch_size
            * difference
            / (self.gradient_noise_multiplier(rule) * self.scale(rule, state, dim))
        )

    def canary_shift(self, rule: R, state: Any, dim: int) -> Tensor:
        shift = torch.zeros(dim, dtype=DTYPE)
        shift[0] = 1 / self.gradient_noise_multiplier(rule)
        return shift
