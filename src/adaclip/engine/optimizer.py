"""An Opacus ``DPOptimizer`` whose clipping and noise come from a :mod:`adaclip.methods.base` rule.

The module (an Opacus ``GradSampleModule``, or :class:`adaclip.engine.bookkeeping.BookkeepingGradSampleModule`)
leaves per-example gradient information on the parameters after backward: ``p.grad_sample``, or,
for book-keeping linear layers, the layer's inputs and output gradients.  At each ``step`` this
optimizer draws the step's standard-normal noise in one call from its seeded generator and either

* ``per_example="fast"`` (default), for rules with the norm interface
  (:func:`adaclip.methods.base.supports_norm_path`): computes the per-example (transformed) norms and
  the rule's weighted sum ``sum_i c_i g_i`` part by part (:mod:`adaclip.engine.per_example`), never the
  ``[n, d]`` matrix; or
* ``per_example="materialise"`` (and for every rule without the norm interface): flattens the
  per-example gradients into one ``[n, d]`` matrix and hands it to ``rule.clipped_sum``.

Both give the rule's :class:`~adaclip.methods.base.ClippedSum` (the same up to float rounding).  With
``distributed=True`` it is all-reduced over the ranks (:mod:`adaclip.engine.distributed`).  The rule's
``release`` then adds the noise once and updates its state; the optimizer writes the released
noisy mean gradient into ``p.grad`` and lets the wrapped optimizer update the parameters; it counts
the steps it has taken and reports the accountant's epsilon for them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.optim import Optimizer

from adaclip.engine.bookkeeping import layer_capture
from adaclip.engine.distributed import (
    all_reduce_clipped_sum,
    assert_replicas_equal,
    check_same_noise,
    is_initialized,
    state_tensors,
)
from adaclip.engine.per_example import Part, Transform, collect_parts, materialise, per_example_norms, weighted_sum
from adaclip.methods.base import ClippedSum, ClipRule, Stats, supports_norm_path
from adaclip.privacy.accounting import Accountant, epsilon

PerExample = Literal["fast", "materialise"]
PER_EXAMPLE_PATHS: tuple[PerExample, ...] = ("fast", "materialise")


class AdaptiveClipDPOptimizer(DPOptimizer):
    """DP optimizer driven by a :class:`~adaclip.methods.base.ClipRule`.

    Args:
        optimizer: the wrapped optimizer (e.g. ``torch.optim.SGD``) over a ``GradSampleModule``'s parameters.
        rule: the clipping rule; its ``noise_multiplier`` is the total sigma the accountant sees.
        sample_rate: the Poisson sampling rate ``q = B / N`` of the data loader.
        accountant: ``"prv"``, ``"pld"`` or ``"rdp"`` (see :mod:`adaclip.privacy.accounting`).
        delta: default delta for :meth:`get_epsilon`.
        generator: ``torch.Generator`` on the parameters' device for the noise (``None``: torch's global RNG).
        loss_reduction: ``"mean"`` (``p.grad`` is the noisy mean gradient) or ``"sum"`` (``B`` times it).
        per_example: ``"fast"`` (norms and weighted sums, where the rule allows) or ``"materialise"``
            (the ``[n, d]`` matrix and ``rule.clipped_sum``); see the module docstring.
        distributed: all-reduce each step's clipped sum over the default ``torch.distributed`` process
            group before the release; every rank must then pass a ``generator`` seeded identically
            (``make_private(..., distributed=True)`` arranges this and the sharded sampling).
        check_replicas: debug mode for ``distributed``: after every release, assert that the new rule
            state, the released gradient and the parameters the step started from are bitwise equal
            on every rank (:class:`adaclip.engine.distributed.ReplicaDivergence` otherwise); one broadcast
            per tensor.  Whether the ranks draw the same noise is checked once, always, at construction.

    ``noise_multiplier`` and ``max_grad_norm`` are the rule's at construction (for adaptive rules,
    ``max_grad_norm`` is only the initial bound): changing them later (e.g. with an Opacus noise
    scheduler) does not change the rule.  Noise comes from torch's PRNG in floating point; Opacus's
    ``secure_mode`` (defence against floating-point attacks, Mironov 2012) is not offered.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        rule: ClipRule,
        sample_rate: float,
        accountant: Accountant = "prv",
        delta: float | None = None,
        generator: torch.Generator | None = None,
        loss_reduction: str = "mean",
        per_example: PerExample = "fast",
        distributed: bool = False,
        check_replicas: bool = False,
    ) -> None:
        if per_example not in PER_EXAMPLE_PATHS:
            raise ValueError(f"per_example must be one of {PER_EXAMPLE_PATHS}, got {per_example!r}")
        if distributed and generator is None:
            raise ValueError(
                "distributed=True needs a noise generator seeded identically on every rank (generator=...), so that "
                "the noise enters the global sum once; make_private(..., distributed=True) sets one up"
            )
        if distributed and not is_initialized():
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group (torchrun + init_process_group)"
            )
        if check_replicas and not distributed:
            raise ValueError("check_replicas=True compares ranks and needs distributed=True")
        bound = getattr(rule, "clip_norm", getattr(rule, "initial_clip", 1.0))
        super().__init__(
            optimizer,
            noise_multiplier=rule.noise_multiplier,
            max_grad_norm=bound,
            expected_batch_size=rule.expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
        )
        self.rule = rule
        self.per_example: PerExample = per_example
        self.distributed = distributed
        self.check_replicas = check_replicas
        if distributed and self.params:
            reference = self.params[0]
            dim = sum(p.numel() for p in self.params)
            check_same_noise(generator, rule.noise_size(dim), reference.dtype, reference.device)  # type: ignore[arg-type]
        self.uses_norm_path = per_example == "fast" and supports_norm_path(rule)
        self.sample_rate = sample_rate
        self.accountant = accountant
        self.delta = delta
        self.steps_taken = 0
        self.rule_state: Any = None
        self.last_stats: Stats = {}
        self.last_clipped: ClippedSum | None = None
        """The last step's clipped sum (the rule's data-dependent input), for diagnostics such as the
        noise-free release ``rule.release(last_clipped, previous_state, zeros)``; never released itself."""
        self._last_epsilon: tuple[tuple[int, float] | None, float] = (None, 0.0)

    def pre_step(self, closure: Any = None) -> bool:
        """Clip, noise and average the per-example gradients with the rule; write them into ``p.grad``.

        Runs with autocast disabled: called inside a ``torch.autocast`` block, the norms and sums that
        the sensitivity bound rests on would otherwise be computed in reduced precision.
        """
        params = self.params
        if len(params) == 0:
            return True
        if self._check_skip_next_step():
            raise RuntimeError(
                "virtual steps (signal_skip_step / BatchMemoryManager) are not supported by adaclip's optimizer"
            )
        reference = params[0]
        if self.generator is not None and self.generator.device.type != reference.device.type:
            raise ValueError(
                f"the noise generator is on {self.generator.device} but the parameters are on {reference.device}: "
                "move the model to its device before make_private"
            )
        with torch.autocast(reference.device.type, enabled=False):
            self._private_step(params, reference)
        return True

    def _private_step(self, params: list[nn.Parameter], reference: torch.Tensor) -> None:
        parts = collect_parts(params)
        dim = sum(p.numel() for p in params)
        if self.rule_state is None:
            self.rule_state = self.rule.init_state(dim, device=reference.device, dtype=reference.dtype)
        noise = torch.randn(
            self.rule.noise_size(dim), generator=self.generator, device=reference.device, dtype=reference.dtype
        )
        if self.uses_norm_path:
            clipped = self._norm_path_sum(parts, dim)
        else:
            clipped = self.rule.clipped_sum(materialise(parts), self.rule_state)
        if self.distributed:
            clipped = all_reduce_clipped_sum(clipped)
        self.last_clipped = clipped
        noisy_mean, self.rule_state, self.last_stats = self.rule.release(clipped, self.rule_state, noise)
        if self.check_replicas:
            parameters = {f"parameter {i}": p for i, p in enumerate(params)}
            assert_replicas_equal(
                {"released gradient": noisy_mean, **state_tensors(self.rule_state), **parameters}, reference.device
            )
        if self.loss_reduction == "sum":
            noisy_mean = noisy_mean * self.expected_batch_size
        offset = 0
        for p in params:
            p.grad = noisy_mean[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.steps_taken += 1
        if self.step_hook:
            self.step_hook(self)

    def _norm_path_sum(self, parts: list[Part], dim: int) -> ClippedSum:
        """The rule's clipped sum from per-example (transformed) norms and ``sum_i c_i g_i``, without ``[n, d]``."""
        shift_scale = self.rule.norm_transform(self.rule_state)
        transform = None if shift_scale is None else Transform.of(*shift_scale)
        norms = per_example_norms(parts, transform)
        weights = self.rule.example_weights(norms, self.rule_state)
        return self.rule.clipped_sum_from_weights(weighted_sum(parts, weights, dim), weights, self.rule_state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` (to ``None`` by default, as ``torch.optim`` does), ``p.grad_sample``,
        ``p.summed_grad`` (as Opacus does; this optimizer never skips steps) and the book-keeping captures."""
        for p in self.params:
            p.grad_sample = None
            p.summed_grad = None
            capture = layer_capture(p)
            if capture is not None:
                capture.reset()
        self.original_optimizer.zero_grad(set_to_none)

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent by the steps taken so far, at ``delta`` (default: the one given at construction).

        An accountant call costs milliseconds, so call this once per epoch, not per step; repeated
        calls for the same number of steps and delta reuse the last answer.
        """
        delta = self.delta if delta is None else delta
        if delta is None:
            raise ValueError("delta is needed: pass get_epsilon(delta=...) or make_private(..., delta=...)")
        if self.steps_taken == 0:
            return 0.0
        key = (self.steps_taken, delta)
        if self._last_epsilon[0] != key:
            spent = epsilon(
                noise_multiplier=self.rule.noise_multiplier,
                sample_rate=self.sample_rate,
                steps=self.steps_taken,
                delta=delta,
                accountant=self.accountant,
            )
            self._last_epsilon = (key, spent)
        return self._last_epsilon[1]
