"""The interface every clipping rule implements: :class:`ClipRule`, :class:`ClippedSum` and their helpers.

Every rule maps a batch of per-example gradients ``[n, d]`` (flattened over all parameters),
its explicit state, and a vector of standard-normal draws to a noisy *mean* gradient, the
next state and a dict of statistics::

    noisy_mean_grad, new_state, stats = rule.step(per_example_grads, state, noise)

Common rules, which every rule in :mod:`adaclip.methods` obeys:

* The normaliser is the public expected batch size ``B`` (Poisson rate ``q = B / N``), never the
  realised ``n``; an empty batch (``n = 0``) still returns pure noise.
* Noise ``N(0, sigma^2 s^2 I)`` is added once, to the *sum* of clipped vectors, where ``s`` is the
  sensitivity of that sum in the space where clipping happens.  The rule scales the
  standard-normal ``noise`` itself, so passing zeros gives a deterministic, hand-checkable result.
* Statistics that steer clipping (AdaCliP's ``a`` and ``b``, the quantile rule's ``C``) are
  computed only from values that were released with noise.

**Two halves.**  ``step`` is ``release(clipped_sum(per_example_grads, state), state, noise)``:

* :meth:`ClipRule.clipped_sum` is the only part that reads the examples.  It returns a
  :class:`ClippedSum`: ``sum_i c_i (g_i - a)`` (each example's clipped contribution, mapped back to
  gradient space; ``a = 0`` for rules without a shift) and the counts ``[n, n_clipped, n_dropped]``.  Every
  field is a sum over examples, so data-parallel workers each sum their own examples and
  all-reduce (:mod:`adaclip.engine.distributed`).
* :meth:`ClipRule.release` adds the noise once, divides by ``B``, and updates the state from the
  released values only; given the same summed input and noise it is the same on every worker.

``stats`` always holds ``clipped_fraction`` (share of the batch whose vector was shrunk; 0 for an
empty batch), ``noise_power`` (``E||noise||^2`` of the returned mean gradient), ``batch_size``
(the realised ``n``, dropped examples not counted), ``nonfinite_dropped`` (see below) and, for rules
with a scalar bound, ``clip_norm``.

**Non-finite per-example gradients are dropped.**  An example whose per-example gradient has a NaN or
an infinite entry (or whose norm or weight is not finite, e.g. by overflow) gets weight ``c_i = 0``:
it contributes nothing to the clipped sum, is not counted in ``n`` or ``n_clipped``, and is counted
in ``nonfinite_dropped``.  Dropping an example is the same as removing it from the batch, which is
always within the add/remove-one neighbouring relation, so the sum's sensitivity and the accounting
are unchanged; and since the release and every state update read only the clipped sum, the noise
and already released values, neither can become non-finite.  Without the policy one NaN example
would make the whole release NaN (``0 * NaN`` is NaN) and an adaptive rule's state NaN for good.
:func:`drop_nonfinite` implements it for both paths (the materialised ``clipped_sum`` and the fast
path's weights); ``make_private(..., nonfinite="raise")`` stops at such an example instead
(:class:`NonFiniteGradientError`).

**Norm interface (the fast path).**  Every rule here but GeoClip scales each example's vector by one
number ``c_i`` that depends only on a norm of the example (for AdaCliP: of its transformed vector),
so the rule needs the per-example norms and the weighted sum ``sum_i c_i g_i``, never the ``[n, d]``
matrix.  :mod:`adaclip.engine.per_example` computes both from layer inputs and output gradients; a rule
opts in by overriding :meth:`ClipRule.example_weights` (see :func:`supports_norm_path`)::

    shift_scale = rule.norm_transform(state)             # None, or (a, b) for ||(g_i - a) / b||
    weights, dropped = drop_nonfinite(norms, rule.example_weights(norms, state))  # c_i, shape [n]
    clipped     = rule.clipped_sum_from_weights(weighted_sum, weights, state, dropped)
    noisy_mean, new_state, stats = rule.release(clipped, state, noise)

The same ``example_weights`` give the materialised :meth:`ClipRule.clipped_sum`, so both paths
compute one thing (up to float rounding).  A rule whose norm is a rank-``k`` projection plus an isotropic
rest (GeoClip) gives :meth:`ClipRule.subspace_norm` instead of ``norm_transform`` (:class:`SubspaceNorm`).  A rule
without ``example_weights`` overrides ``clipped_sum`` and always gets the materialised path.

**Host synchronisations.**  A release reads what it needs on the host (the counts, a quantile rule's count
noise, the statistics) in one transfer: :meth:`ClippedSum.read`.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC
from dataclasses import dataclass, fields, is_dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from adaclip._validate import require_int

Stats = dict[str, float]


class NonFiniteGradientError(ValueError):
    """A per-example gradient was not finite and the optimizer was asked to stop (``nonfinite="raise"``)."""


@dataclass(frozen=True)
class ClippedSum:
    """The data-dependent input of one release: a sum over the batch's examples.

    ``vector`` is ``sum_i c_i (g_i - a)``, the clipped contributions in gradient space (``a`` is the
    rule's shift, 0 for rules without one); ``counts`` is ``[n, n_clipped, n_dropped]``: the realised
    batch size, how many examples were shrunk (weight ``c_i < 1``) and how many were dropped as
    non-finite (not counted in the first two; see the module docstring), in float64 on ``vector``'s
    device whatever the parameters' dtype (in bfloat16, counts above 256 would round to even numbers
    and the quantile rule's count would move by 0 or 1 per example instead of 1/2).  All are sums over
    examples: the ``ClippedSum`` of a batch is the field-wise sum of those of any split of it, which is
    what a data-parallel all-reduce relies on.
    """

    vector: Tensor
    counts: Tensor

    @classmethod
    def of(cls, vector: Tensor, weights: Tensor, dropped: Tensor | None = None) -> ClippedSum:
        """From the summed vector and the per-example weights ``c_i`` (which give the counts).

        ``dropped`` marks the examples dropped as non-finite (:func:`drop_nonfinite`); they are counted
        apart, not as part of the batch.
        """
        if dropped is None:  # the usual case, in few operations: [n, 0, 0], then n_clipped written in
            counts = torch.tensor((float(weights.numel()), 0.0, 0.0), dtype=torch.float64, device=vector.device)
            counts[1] = (weights < 1).sum()
            return cls(vector=vector, counts=counts)
        kept = weights[~dropped]
        parts = [torch.tensor(kept.numel(), device=weights.device), (kept < 1).sum(), dropped.sum()]
        return cls(vector=vector, counts=torch.stack([c.to(vector.device, torch.float64) for c in parts]))

    def read(self, *scalars: Tensor) -> list[float]:
        """The counts and ``scalars`` (0-dim tensors on ``vector``'s device) on the host, in one synchronisation.

        Returns the scalars' values; the counts are kept for :attr:`examples` and the other properties.
        """
        values: list[float] = torch.cat(
            [self.counts, *(s.reshape(1).to(self.counts.device, torch.float64) for s in scalars)]
        ).tolist()
        self.__dict__["count_values"] = values[:3]
        return values[3:]

    @cached_property
    def count_values(self) -> list[float]:
        """``counts`` on the host (read once)."""
        values: list[float] = self.counts.tolist()
        return values

    @property
    def examples(self) -> float:
        """The realised batch size ``n`` (examples dropped as non-finite not counted)."""
        return self.count_values[0]

    @property
    def nonfinite_dropped(self) -> float:
        """How many examples were dropped because their gradient, norm or weight was not finite."""
        return self.count_values[2]

    @property
    def clipped_fraction(self) -> float:
        """Share of the batch whose vector was shrunk (0 for an empty batch)."""
        examples, clipped = self.count_values[:2]
        return clipped / examples if examples else 0.0


@dataclass(frozen=True)
class SubspaceNorm:
    """A norm ``||x||_M^2 = r ||x||^2 + sum_j w_j (u_j . x)^2`` of the deviation ``x = g - a`` (GeoClip's).

    ``shift`` is ``a`` ``[d]``, ``basis`` holds orthonormal columns ``u_j`` ``[d, k]``, ``basis_weights`` the
    ``w_j`` ``[k]`` (negative where ``M`` shrinks ``u_j`` below the rest), ``rest_weight`` the 0-dim ``r``
    (``None`` when the basis spans everything).  :func:`adaclip.engine.per_example.subspace_norms` computes it
    from layer factors: a rank-``k`` projection plus an isotropic rest.
    """

    shift: Tensor
    basis: Tensor
    basis_weights: Tensor
    rest_weight: Tensor | None


def drop_nonfinite(norms: Tensor, weights: Tensor) -> tuple[Tensor, Tensor | None]:
    """The non-finite policy (see the module docstring): weight 0 for every example whose norm or weight is not
    finite.

    Returns the weights and the boolean mask of the dropped examples, ``None`` when there are none
    (the usual case; deciding it costs one host synchronisation).  A NaN or infinite entry of ``g_i``
    makes its norm NaN or infinite, so the norms see every non-finite example.  A sum with a NaN or infinite
    term is not finite, so one sum clears a finite batch (three operations); only a sum that is not finite
    (a non-finite example, or an overflow) is checked example by example.
    """
    if math.isfinite(float((norms + weights).sum())):
        return weights, None
    dropped = ~(torch.isfinite(norms) & torch.isfinite(weights))
    if not bool(dropped.any()):
        return weights, None
    return weights.masked_fill(dropped, 0.0), dropped


def zero_rows(rows: Tensor, dropped: Tensor | None) -> Tensor:
    """``rows`` with the dropped examples' rows set to 0 (``0 * NaN`` is NaN, so a weight of 0 alone is not enough)."""
    return rows if dropped is None else rows.masked_fill(dropped.unsqueeze(1), 0.0)


class ClipRule(ABC):
    """Interface shared by every clipping rule (see the module docstring).

    A subclass gives either the norm interface (:meth:`example_weights`, plus :meth:`norm_transform`
    if it clips shifted and scaled vectors) or its own :meth:`clipped_sum`; and :meth:`release`
    unless the default (noise ``sigma * weight_bound``, stateless) is right for it.
    """

    noise_multiplier: float
    expected_batch_size: float

    def hyperparameters(self) -> dict[str, object]:
        """The rule's keyword parameters beyond sigma and ``B``, as resolved (defaults filled in).

        Every rule stores each constructor parameter under its own name, so a run record can say
        exactly which rule ran.
        """
        names = inspect.signature(type(self)).parameters
        return {name: getattr(self, name) for name in names if name not in ("noise_multiplier", "expected_batch_size")}

    def init_state(
        self, dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Any:
        """The state before the first step for a model with ``dim`` parameters (``None`` if stateless)."""
        check_dim(dim)
        return None

    def noise_size(self, dim: int) -> int:
        """How many standard-normal draws one step consumes."""
        return check_dim(dim)

    def step(self, per_example_grads: Tensor, state: Any, noise: Tensor) -> tuple[Tensor, Any, Stats]:
        """One private aggregation step, ``release(clipped_sum(...))``; pure (inputs are not modified).

        The state must be in the gradients' dtype and on their device (``init_state(d, dtype=..., device=...)``).
        """
        self._check_step_inputs(per_example_grads, noise)
        check_state_matches(state, per_example_grads)
        return release_counted(self, self.clipped_sum(per_example_grads, state), state, noise)

    def clipped_sum(self, per_example_grads: Tensor, state: Any) -> ClippedSum:
        """``sum_i c_i (g_i - a)`` and the counts, from the ``[n, d]`` per-example gradients.

        The default uses the norm interface: ``c_i = example_weights(||(g_i - a) / b||)`` with
        ``(a, b) = norm_transform(state)`` (plain ``||g_i||`` when that is ``None``); non-finite examples
        are dropped (:func:`drop_nonfinite`).
        """
        shift_scale = self.norm_transform(state)
        if shift_scale is None:
            deviations = per_example_grads
            norms = torch.linalg.vector_norm(per_example_grads, dim=1)
        else:
            shift, scale = shift_scale
            deviations = per_example_grads - shift
            norms = torch.linalg.vector_norm(deviations / scale, dim=1)
        weights, dropped = drop_nonfinite(norms, self.example_weights(norms, state))
        return ClippedSum.of(weights @ zero_rows(deviations, dropped), weights, dropped)

    def release(self, clipped: ClippedSum, state: Any, noise: Tensor) -> tuple[Tensor, Any, Stats]:
        """``(sum_i c_i g_i + N(0, sigma^2 s^2 I)) / B`` with ``s = weight_bound(state)``; the state is unchanged.

        For stateless rules whose weighted vectors have norm at most ``s`` (DP-SGD, AUTO-S, DP-PSAC).
        """
        dim = self._check_release_inputs(clipped, noise)
        noise_std = self.noise_multiplier * self.weight_bound(state)
        noisy_mean = torch.add(clipped.vector, noise, alpha=noise_std).div_(self.expected_batch_size)
        stats = {
            "clipped_fraction": clipped.clipped_fraction,
            "noise_power": dim * (noise_std / self.expected_batch_size) ** 2,
            "batch_size": clipped.examples,
        }
        if hasattr(self, "clip_norm"):
            stats["clip_norm"] = float(self.clip_norm)
        return noisy_mean, state, stats

    # --- norm interface (optional; see the module docstring) ------------------------------------

    def norm_transform(self, state: Any) -> tuple[Tensor, Tensor] | None:
        """``(a, b)`` if :meth:`example_weights` wants the norms ``||(g_i - a) / b||``; ``None`` for ``||g_i||``."""
        return None

    def subspace_norm(self, state: Any) -> SubspaceNorm | None:
        """The :class:`SubspaceNorm` if :meth:`example_weights` wants it (then ``norm_transform`` is ``None``)."""
        return None

    def norm_shift(self, state: Any) -> Tensor | None:
        """The shift ``a`` of the clipped vectors ``g_i - a``: ``norm_transform``'s or ``subspace_norm``'s."""
        shift_scale = self.norm_transform(state)
        if shift_scale is not None:
            return shift_scale[0]
        subspace = self.subspace_norm(state)
        return None if subspace is None else subspace.shift

    def example_weights(self, norms: Tensor, state: Any) -> Tensor:
        """The per-example weights ``c_i`` (shape ``[n]``) that this rule applies to ``g_i - a``, from the norms.

        Overriding this enables the fast path for the rule (:func:`supports_norm_path`).
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no norm interface; use clipped_sum() or step() on per-example gradients"
        )

    def weight_bound(self, state: Any) -> float:
        """The largest norm of any weighted vector ``c_i g_i`` (the sensitivity of their sum); default ``clip_norm``."""
        bound = getattr(self, "clip_norm", None)
        if bound is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no clip_norm: override weight_bound(state) to give its sensitivity"
            )
        return float(bound)

    def clipped_sum_from_weights(
        self, weighted_sum: Tensor, weights: Tensor, state: Any, dropped: Tensor | None = None
    ) -> ClippedSum:
        """:meth:`clipped_sum` from ``S = sum_i c_i g_i`` and the weights ``c_i`` (the fast path).

        With a shift ``a``, ``sum_i c_i (g_i - a) = S - a sum_i c_i``: one pass over ``d``.  ``dropped``
        marks the examples :func:`drop_nonfinite` dropped (their weights are 0 and ``S`` must not hold them).
        """
        if not isinstance(weighted_sum, Tensor) or weighted_sum.dim() != 1:
            raise ValueError(
                "weighted_sum must be a 1-D tensor [n_params], "
                f"got {getattr(weighted_sum, 'shape', type(weighted_sum))}"
            )
        if not isinstance(weights, Tensor) or weights.dim() != 1:
            raise ValueError(
                f"weights must be a 1-D tensor [n_examples], got {getattr(weights, 'shape', type(weights))}"
            )
        shift = self.norm_shift(state)
        vector = (
            weighted_sum if shift is None else torch.addcmul(weighted_sum, shift, weights.sum(), value=-1)
        )  # no sync
        return ClippedSum.of(vector, weights, dropped)

    def _check_release_inputs(self, clipped: ClippedSum, noise: Tensor) -> int:
        if not isinstance(clipped, ClippedSum) or clipped.vector.dim() != 1 or clipped.counts.shape != (3,):
            got = (
                f"vector {tuple(clipped.vector.shape)}, counts {tuple(clipped.counts.shape)}"
                if isinstance(clipped, ClippedSum)
                else type(clipped).__name__
            )
            raise ValueError(
                "clipped must be a ClippedSum with a 1-D vector [n_params] and counts [n, n_clipped, n_dropped] "
                f"(from clipped_sum); got {got}"
            )
        dim = clipped.vector.shape[0]
        if not isinstance(noise, Tensor) or noise.shape != (self.noise_size(dim),):
            raise ValueError(
                f"noise must be a 1-D tensor of {self.noise_size(dim)} standard-normal draws "
                f"(noise_size({dim})); got {getattr(noise, 'shape', type(noise))}"
            )
        return dim

    def _check_step_inputs(self, per_example_grads: Tensor, noise: Tensor) -> int:
        if not isinstance(per_example_grads, Tensor) or per_example_grads.dim() != 2:
            raise ValueError(
                "per_example_grads must be a 2-D tensor [n_examples, n_params]; "
                f"got {getattr(per_example_grads, 'shape', type(per_example_grads))}"
            )
        dim = per_example_grads.shape[1]
        expected = self.noise_size(dim)
        if not isinstance(noise, Tensor) or noise.shape != (expected,):
            raise ValueError(
                f"noise must be a 1-D tensor of {expected} standard-normal draws "
                f"(noise_size({dim})); got {getattr(noise, 'shape', type(noise))}"
            )
        return dim


def release_counted(rule: ClipRule, clipped: ClippedSum, state: Any, noise: Tensor) -> tuple[Tensor, Any, Stats]:
    """``rule.release(clipped, state, noise)`` with ``nonfinite_dropped`` added to its statistics (read with the
    counts: no synchronisation of its own)."""
    released, new_state, stats = rule.release(clipped, state, noise)
    return released, new_state, {**stats, "nonfinite_dropped": clipped.nonfinite_dropped}


def check_state_matches(state: Any, reference: Tensor) -> None:
    """Refuse a state whose tensors differ in dtype or device from ``reference`` (the gradients), naming the field.

    Mixing them would fail deep inside torch (e.g. ``expected dtype double for 'end' but got dtype float``
    from ``torch.lerp``) or silently compute in the wrong precision.
    """
    if not is_dataclass(state):
        return
    for item in fields(state):
        value = getattr(state, item.name)
        if isinstance(value, Tensor) and (value.dtype != reference.dtype or value.device != reference.device):
            raise ValueError(
                f"state.{item.name} is {value.dtype} on {value.device} but the gradients are {reference.dtype} on "
                f"{reference.device}: build the state with rule.init_state(dim, dtype={reference.dtype}, "
                f"device='{reference.device}')"
            )


def supports_norm_path(rule: ClipRule) -> bool:
    """Whether ``rule`` implements the norm interface (it overrides :meth:`ClipRule.example_weights`)."""
    return type(rule).example_weights is not ClipRule.example_weights


def clip_factors(norms: Tensor, bound: float = 1.0) -> Tensor:
    """``min(1, bound / ||x||)`` for each norm ``||x||`` (Abadi et al. 2016, Alg. 1); a zero norm gives 1."""
    factors = norms.reciprocal()
    if bound != 1.0:
        factors.mul_(bound)
    return factors.clamp_(max=1.0)


def check_dim(dim: int) -> int:
    """``dim``, the number of parameters, checked to be an int >= 1."""
    return require_int("dim (the number of parameters)", dim)
