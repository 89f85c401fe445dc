"""An Opacus ``DPOptimizer`` whose clipping and noise come from a :mod:`adaclip.clipping` rule.

Opacus computes per-example gradients (``GradSampleModule``) and draws Poisson batches
(``DPDataLoader``); at each ``step`` this optimizer flattens the per-example gradients of all
parameters into one ``[n, d]`` matrix, hands it to the rule with fresh standard-normal noise from
its seeded generator, writes the released noisy mean gradient into ``p.grad`` and lets the wrapped
optimizer update the parameters.  It counts the steps it has taken and reports the accountant's
epsilon for them.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch.optim import Optimizer

from adaclip.accounting import Accountant, epsilon
from adaclip.clipping import ClipRule, Stats


class AdaptiveClipDPOptimizer(DPOptimizer):
    """DP optimizer driven by a :class:`~adaclip.clipping.ClipRule`.

    Args:
        optimizer: the wrapped optimizer (e.g. ``torch.optim.SGD``) over a ``GradSampleModule``'s parameters.
        rule: the clipping rule; its ``noise_multiplier`` is the total sigma the accountant sees.
        sample_rate: the Poisson sampling rate ``q = B / N`` of the data loader.
        accountant: ``"prv"``, ``"pld"`` or ``"rdp"`` (see :mod:`adaclip.accounting`).
        delta: default delta for :meth:`get_epsilon`.
        generator: ``torch.Generator`` on the parameters' device for the noise (``None``: torch's global RNG).
        loss_reduction: ``"mean"`` (``p.grad`` is the noisy mean gradient) or ``"sum"`` (``B`` times it).

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
    ) -> None:
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
        self.sample_rate = sample_rate
        self.accountant = accountant
        self.delta = delta
        self.steps_taken = 0
        self.rule_state: Any = None
        self.last_stats: Stats = {}

    def _flat_per_example_grads(self) -> torch.Tensor:
        missing = [i for i, p in enumerate(self.params) if getattr(p, "grad_sample", None) is None]
        if missing:
            raise RuntimeError(
                f"parameters {missing} (in optimizer order) got no per-example gradient: every trainable parameter "
                "must be used in forward, and loss.backward() must run before optimizer.step()"
            )
        if self.accumulated_iterations != 1:
            raise RuntimeError(
                "per-example gradients from several backward passes are pending: call optimizer.zero_grad() "
                "after every optimizer.step(); accumulating Poisson batches is not supported"
            )
        grad_samples = self.grad_samples
        n = grad_samples[0].shape[0]
        return torch.cat([g.reshape(n, p.numel()) for g, p in zip(grad_samples, self.params)], dim=1)

    def pre_step(self, closure: Any = None) -> bool:
        """Clip, noise and average the per-example gradients with the rule; write them into ``p.grad``."""
        if len(self.params) == 0:
            return True
        if self._check_skip_next_step():
            raise RuntimeError("virtual steps (signal_skip_step / BatchMemoryManager) are not supported by adaclip's optimizer")
        per_example_grads = self._flat_per_example_grads()
        dim = per_example_grads.shape[1]
        if self.rule_state is None:
            self.rule_state = self.rule.init_state(dim, device=per_example_grads.device, dtype=per_example_grads.dtype)
        noise = torch.randn(
            self.rule.noise_size(dim), generator=self.generator, device=per_example_grads.device, dtype=per_example_grads.dtype
        )
        noisy_mean, self.rule_state, self.last_stats = self.rule.step(per_example_grads, self.rule_state, noise)
        if self.loss_reduction == "sum":
            noisy_mean = noisy_mean * self.expected_batch_size
        offset = 0
        for p in self.params:
            p.grad = noisy_mean[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.steps_taken += 1
        if self.step_hook:
            self.step_hook(self)
        return True

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent by the steps taken so far, at ``delta`` (default: the one given at construction)."""
        delta = self.delta if delta is None else delta
        if delta is None:
            raise ValueError("delta is needed: pass get_epsilon(delta=...) or make_private(..., delta=...)")
        if self.steps_taken == 0:
            return 0.0
        return epsilon(
            noise_multiplier=self.rule.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps_taken,
            delta=delta,
            accountant=self.accountant,
        )
