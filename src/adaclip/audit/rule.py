"""The rule-level audit: ``steps`` white-box calls of ``rule.step`` with the canary in every batch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adaclip.audit.config import AuditConfig, AuditResult
from adaclip.audit.statistics import (
    epsilon_lower_bound,
    gaussian_epsilon_lower_bound,
    standardised_mean_shift,
)
from adaclip.methods import METHODS, ClipRule, build_rule
from adaclip.methods.canary import DTYPE, CanaryAdapter
from adaclip.privacy.accounting import epsilon


def seeds(seed: int, count: int) -> list[int]:
    """``count`` independent 63-bit seeds derived from ``seed``."""
    return [int(s >> np.uint64(1)) for s in np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64)]


def warm_state(rule: ClipRule, dim: int, *, steps: int, batch_size: int, generator: torch.Generator) -> Any:
    """The rule's state after ``steps`` steps on random gradients with unequal, off-centre coordinates.

    Per-coordinate standard deviations fall from 1 to 1/16 and means are half of them, so AdaCliP
    ends with ``a != 0`` and a non-uniform ``b``, and the quantile rule's clip norm has moved.
    """
    state = rule.init_state(dim, dtype=DTYPE)
    spread = 2.0 ** -torch.linspace(0, 4, dim, dtype=DTYPE)
    for _ in range(steps):
        gradients = 0.5 * spread + spread * torch.randn(batch_size, dim, generator=generator, dtype=DTYPE)
        noise = torch.randn(rule.noise_size(dim), generator=generator, dtype=DTYPE)
        _, state, _ = rule.step(gradients, state, noise)
    return state


@dataclass(frozen=True)
class _NullWorld:
    """What the adversary derives from its view of the state alone: the inputs and the noiseless null release."""

    background: Tensor
    canary: Tensor
    direction: Tensor  # unit vector along the canary's shift of the implied noise
    observation: Tensor  # what the null world releases with zero noise

    @classmethod
    def at(cls, rule: ClipRule, adapter: CanaryAdapter[Any], view: Any, dim: int, batch_size: int) -> _NullWorld:
        background = adapter.background(rule, view, dim, batch_size)
        release, next_state, _ = rule.step(background, view, torch.zeros(rule.noise_size(dim), dtype=DTYPE))
        shift = adapter.canary_shift(rule, view, dim)
        return cls(
            background=background,
            canary=adapter.canary(rule, view, dim),
            direction=shift / torch.linalg.vector_norm(shift),
            observation=adapter.observe(rule, view, release, next_state),
        )


def _rule_trial(
    rule: ClipRule,
    adapter: CanaryAdapter[Any],
    state: Any,
    start: _NullWorld,
    *,
    dim: int,
    steps: int,
    batch_size: int,
    with_canary: bool,
    generator: torch.Generator,
) -> float:
    """One trial of ``steps`` private steps from ``state``; the standardised statistic (N(0, 1) in the null world).

    ``start`` is the adversary's null world at ``state`` (the same for every trial).  The adversary's
    view of the state is re-derived from each release with the rule on the background alone.
    """
    view, null = state, start
    score = 0.0
    for step in range(steps):
        if step > 0 and view is not None:
            null = _NullWorld.at(rule, adapter, view, dim, batch_size)
        gradients = torch.cat([null.background, null.canary.unsqueeze(0)]) if with_canary else null.background
        noise = torch.randn(
            rule.noise_size(dim), generator=generator, dtype=DTYPE
        )  # as AdaptiveClipDPOptimizer.pre_step
        release, next_state, _ = rule.step(gradients, state, noise)
        implied = adapter.implied_noise(rule, view, adapter.observe(rule, view, release, next_state) - null.observation)
        score += float(implied @ null.direction)
        if view is not None and step < steps - 1:  # the null world's state after the same release
            _, view, _ = rule.step(null.background, view, implied)
        state = next_state
    return score / math.sqrt(steps)


def audit_rule(
    rule: ClipRule, adapter: CanaryAdapter[Any], config: AuditConfig, *, name: str, kind: str = "rule"
) -> AuditResult:
    """White-box audit of ``config.steps`` steps of ``rule`` with the canary in every batch (see the module docstring).

    Theory: ``config.steps`` Gaussian mechanisms with the rule's total noise multiplier, no subsampling
    (dp-accounting's PLD, within 1e-4 of the exact Gaussian value).  Expected shift
    ``mu = sqrt(steps) / sigma``.  The headline lower bound is the Gaussian trade-off bound of ``mu_hat``'s
    lower confidence limit (exact for a correct rule: the statistic is ``N(0, 1)`` against ``N(mu, 1)``).
    ``rule`` may be any :class:`ClipRule`, including a broken one (``kind="control"``, see
    :mod:`adaclip.audit.controls`).
    """
    warm_seed, trial_seed = seeds(config.seed, 2)
    dim, batch_size = config.dim, config.expected_batch_size
    state = warm_state(
        rule, dim, steps=config.warmup_steps, batch_size=batch_size, generator=torch.Generator().manual_seed(warm_seed)
    )
    generator = torch.Generator().manual_seed(trial_seed)
    start = _NullWorld.at(rule, adapter, state, dim, batch_size)
    scores = {
        with_canary: np.array(
            [
                _rule_trial(
                    rule,
                    adapter,
                    state,
                    start,
                    dim=dim,
                    steps=config.steps,
                    batch_size=batch_size,
                    with_canary=with_canary,
                    generator=generator,
                )
                for _ in range(config.trials)
            ]
        )
        for with_canary in (False, True)
    }
    sigma = rule.noise_multiplier
    return AuditResult(
        name=name,
        kind=kind,
        noise_multiplier=sigma,
        sample_rate=1.0,
        steps=config.steps,
        trials=config.trials,
        delta=config.delta,
        confidence=config.confidence,
        theoretical_epsilon=epsilon(
            noise_multiplier=sigma, sample_rate=1.0, steps=config.steps, delta=config.delta, accountant="pld"
        ),
        accountant="pld",
        expected_mu=math.sqrt(config.steps) / sigma,
        lower_bound=gaussian_epsilon_lower_bound(
            scores[False], scores[True], delta=config.delta, confidence=config.confidence
        ),
        threshold_bound=epsilon_lower_bound(
            scores[False], scores[True], delta=config.delta, confidence=config.confidence
        ),
        mean_shift=standardised_mean_shift(scores[False], scores[True], confidence=config.confidence),
        null_scores=scores[False],
        canary_scores=scores[True],
    )


def audit_method(method: str, config: AuditConfig) -> AuditResult:
    """:func:`audit_rule` for a registered method, built with ``build_rule`` and its adapter's parameters."""
    adapter = METHODS[method].canary()
    sigma, batch = config.noise_multiplier, config.expected_batch_size
    rule = build_rule(method, noise_multiplier=sigma, expected_batch_size=batch, **adapter.rule_params(sigma, batch))
    return audit_rule(rule, adapter, config, name=method)
