"""The fast path's clipped sum in fewer torch operations, for linear layers and rules that clip the plain norm.

At small batches a private step is bound by how many torch operations it dispatches (5-7 us each on a
CPU), not by arithmetic.  :func:`fused_clipped_sum` computes the same :class:`~adaclip.methods.base.ClippedSum`
as the part-by-part path (:func:`adaclip.engine.per_example.per_example_norms`,
:func:`~adaclip.methods.base.drop_nonfinite`, :func:`~adaclip.engine.per_example.weighted_sum`,
:meth:`~adaclip.methods.base.ClipRule.clipped_sum_from_weights`) layer by layer over the book-keeping
factors, with the same floating-point operations in the same order, so the result is bitwise equal.  It
saves operations where the general path pays for generality:

* the non-finite policy is decided by one test, ``isfinite(||g_i|| + c_i)`` for all ``i`` (a sum with a
  NaN or infinite term is not finite; a finite sum that overflows only sends the step to the exact
  check), instead of two tests, their conjunction and a reduction; the rare non-finite step takes the
  general path's :func:`~adaclip.methods.base.drop_nonfinite` and zeroing, unchanged;
* the counts ``[n, n_clipped, 0]`` are written into one float64 vector instead of three stacked
  conversions;
* the Python work of the parts (one object per parameter, cached per-layer products) is done once per
  layer.

It applies (returns a ``ClippedSum``) when every part is the weight or the bias of a book-keeping
``nn.Linear`` layer with one position per example (MLPs, logistic regression, a linear head on fixed
features) and the rule clips the plain norm ``||g_i||`` with the base class's
``clipped_sum_from_weights``: DP-SGD, quantile clipping, AUTO-S, DP-PSAC and DP-AdamBC.  Otherwise it
returns ``None`` and the optimizer takes the general path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adaclip.engine.per_example import LinearBiasPart, LinearFactors, LinearWeightPart, Part, zero_examples
from adaclip.methods import PerLayerClip
from adaclip.methods.base import ClippedSum, ClipRule, drop_nonfinite


def fused_clipped_sum(rule: ClipRule, parts: list[Part], state: Any, dim: int) -> ClippedSum | None:
    """The rule's clipped sum of the linear ``parts`` (see the module docstring), or ``None`` where it does not apply.

    Equals ``rule.clipped_sum_from_weights(weighted_sum(parts, c, dim), c, state, dropped)`` with ``c`` the
    rule's weights of ``per_example_norms(parts)`` after the non-finite policy, bit for bit.
    """
    if not applies(rule, parts, state):
        return None
    squared = []
    for part in parts:
        factors = part.factors  # type: ignore[attr-defined]
        if isinstance(part, LinearWeightPart):
            squared.append(torch.linalg.vector_norm(factors.x, dim=1).square_().mul_(factors.delta_squared_norms()))
        else:
            squared.append(factors.delta_squared_norms())
    norms = squared[0].sqrt() if len(squared) == 1 else _summed(squared).sqrt_()
    weights, dropped = drop_nonfinite(norms, rule.example_weights(norms, state))
    if dropped is not None:
        zero_examples(parts, dropped)
    return ClippedSum.of(_weighted_sum(parts, weights, dim), weights, dropped)


def applies(rule: ClipRule, parts: list[Part], state: Any) -> bool:
    """Whether :func:`fused_clipped_sum` computes ``rule``'s clipped sum of ``parts`` (else the general path does)."""
    if not parts or isinstance(rule, PerLayerClip):
        return False
    if type(rule).clipped_sum_from_weights is not ClipRule.clipped_sum_from_weights:
        return False
    if rule.norm_transform(state) is not None or rule.subspace_norm(state) is not None:
        return False
    return all(
        type(part) in (LinearWeightPart, LinearBiasPart) and part.factors.single  # type: ignore[attr-defined]
        for part in parts
    )


def _summed(squared: list[Tensor]) -> Tensor:
    """``squared[0] + squared[1] + ...`` in that order, into a new tensor (the parts' own values stay intact)."""
    total = squared[0] + squared[1]
    for more in squared[2:]:
        total.add_(more)
    return total


def _weighted_sum(parts: list[Part], weights: Tensor, dim: int) -> Tensor:
    """``sum_i c_i g_i`` as one flat vector: per layer, ``c_i delta_i`` once, its product with ``x`` and its sum."""
    flat = torch.empty(dim, dtype=weights.dtype, device=weights.device)
    column = weights.unsqueeze(1)
    scaled: dict[int, Tensor] = {}
    for part in parts:
        factors: LinearFactors = part.factors  # type: ignore[attr-defined]
        layer_scaled = scaled.get(id(factors))
        if layer_scaled is None:
            layer_scaled = scaled[id(factors)] = factors.delta * column
        out = flat[part.span]
        if isinstance(part, LinearWeightPart):
            torch.mm(layer_scaled.t(), factors.x, out=out.view(part.param.shape))
        else:
            torch.sum(layer_scaled, 0, out=out)
    return flat
