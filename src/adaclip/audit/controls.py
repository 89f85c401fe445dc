"""DELIBERATELY BROKEN clipping rules: the negative controls of :mod:`adaclip.audit`.  Never train with them.

Each class breaks exactly one privacy rule that every correct rule obeys (see
:mod:`adaclip.methods.base`), the way DP-SGD implementations are known to break it silently, and
otherwise behaves like the correct rule it subclasses.  Most break one of the two halves of a step
(:mod:`adaclip.methods.base`): ``example_weights`` (the clipping) or ``release`` (noise, normaliser,
state update), which both the rule audit's ``step`` and the optimizer use.  The exception is
:class:`AdaCliPWithRawStatistics`: it needs the raw gradients, which ``release`` never sees, so it
breaks ``step`` alone and is broken for the rule audit only, not on the optimizer path.  They exist so
that the audit can be shown to catch each bug: ``tests/test_audit.py`` requires every one to be flagged,
and the audit notebook reports them next to the correct methods.  None is registered in
``adaclip.methods.METHODS`` or exported from ``adaclip`` (a test checks this), so ``make_private``
cannot build them.

Why they live in the package and not only in the tests: the audit report (``notebooks/audit.ipynb``,
a DVC stage) must show the controls being caught, and a notebook must not import test files.  One
definition serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adaclip.audit.config import AuditConfig, AuditResult
from adaclip.audit.rule import audit_rule
from adaclip.methods import METHODS, ClippedSum, ClipRule, Stats
from adaclip.methods.adaclip import AdaCliP, AdaCliPAdapter, AdaCliPState
from adaclip.methods.fixed import FixedClip
from adaclip.methods.quantile import QuantileClip, QuantileClipState


class FixedClipWithoutClipping(FixedClip):
    """BROKEN: DP-SGD that forgets to clip; the sum's sensitivity is unbounded, noise still ``sigma C``.

    Unit weights break both ways of aggregating: ``clipped_sum`` on the per-example matrix and the
    optimizer's per-example norm path.
    """

    def example_weights(self, norms: Tensor, state: None) -> Tensor:
        """Weight 1 for every example: no clipping on the norm path either."""
        return torch.ones_like(norms)


class FixedClipWithHalfNoise(FixedClip):
    """BROKEN: DP-SGD whose noise standard deviation is ``sigma C / 2`` (a wrong constant)."""

    def release(self, clipped: ClippedSum, state: None, noise: Tensor) -> tuple[Tensor, None, Stats]:
        return super().release(clipped, state, noise / 2)


class FixedClipWithRealisedBatchSize(FixedClip):
    """BROKEN: DP-SGD that divides the noisy sum by the realised batch size ``n`` instead of the public ``B``.

    Adding an example then also rescales everyone else's contribution: the mean's sensitivity is
    ``2 C / n``, twice what the accountant assumes when the other examples oppose the new one.
    """

    def release(self, clipped: ClippedSum, state: None, noise: Tensor) -> tuple[Tensor, None, Stats]:
        released, state, stats = super().release(clipped, state, noise)
        realised = max(clipped.examples, 1.0)
        return released * self.expected_batch_size / realised, state, stats


class AdaCliPWithRawStatistics(AdaCliP):
    """BROKEN: AdaCliP that updates ``a`` and ``b`` from the raw mean gradient (unclipped, un-noised).

    The released gradient of this step is still correct; the leak reaches the *next* release,
    whose shift ``a`` and scale ``b`` now depend on private data.
    """

    def step(self, per_example_grads: Tensor, state: AdaCliPState, noise: Tensor) -> tuple[Tensor, AdaCliPState, Stats]:
        released, _, stats = super().step(per_example_grads, state, noise)
        raw_mean = per_example_grads.sum(0) / self.expected_batch_size
        return released, self.next_state(raw_mean, state, stats.get("unclipped_estimate")), stats


class AdaCliPWithNoiselessCount(AdaCliP):
    """BROKEN: AdaCliP(estimator="quantile_scale") whose count (and so the next global scale) gets no noise.

    Built with the parameters the audit gives the correct ``quantile_scale`` estimator
    (:meth:`AdaCliPAdapter.variant_params`), whatever the registered default estimator is.
    """

    def __init__(self, *, noise_multiplier: float, expected_batch_size: float, **params: Any) -> None:
        params |= AdaCliPAdapter.variant_params("quantile_scale", noise_multiplier)
        super().__init__(noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size, **params)

    def release(self, clipped: ClippedSum, state: AdaCliPState, noise: Tensor) -> tuple[Tensor, AdaCliPState, Stats]:
        without_count_noise = noise.clone()
        without_count_noise[-1] = 0.0
        return super().release(clipped, state, without_count_noise)


class QuantileClipWithNoiselessCount(QuantileClip):
    """BROKEN: quantile clipping whose unclipped count (and so the next clip norm) gets no noise."""

    def release(
        self, clipped: ClippedSum, state: QuantileClipState, noise: Tensor
    ) -> tuple[Tensor, QuantileClipState, Stats]:
        without_count_noise = noise.clone()
        without_count_noise[-1] = 0.0
        return super().release(clipped, state, without_count_noise)


#: Control name -> (the correct method it breaks, the broken rule class).
CONTROLS: dict[str, tuple[str, type[ClipRule]]] = {
    "no clipping": ("fixed", FixedClipWithoutClipping),
    "noise halved": ("fixed", FixedClipWithHalfNoise),
    "normaliser = realised batch size": ("fixed", FixedClipWithRealisedBatchSize),
    "AdaCliP statistics from raw gradients": ("adaclip", AdaCliPWithRawStatistics),
    "quantile count without noise": ("quantile", QuantileClipWithNoiselessCount),
    "AdaCliP quantile-scale count without noise": ("adaclip", AdaCliPWithNoiselessCount),
}


def build_control(name: str, *, noise_multiplier: float, expected_batch_size: float) -> ClipRule:
    """The broken rule ``name`` with the same parameters the audit gives its correct method."""
    if name not in CONTROLS:
        raise ValueError(f"unknown control {name!r}; known: {sorted(CONTROLS)}")
    method, broken_rule = CONTROLS[name]
    broken: Callable[..., ClipRule] = broken_rule
    params = METHODS[method].canary().rule_params(noise_multiplier, expected_batch_size)
    return broken(noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size, **params)


def audit_control(name: str, config: AuditConfig) -> AuditResult:
    """Audit the broken rule ``name`` exactly as its correct method is audited; a working audit flags it."""
    rule = build_control(name, noise_multiplier=config.noise_multiplier, expected_batch_size=config.expected_batch_size)
    method = CONTROLS[name][0]
    return audit_rule(rule, METHODS[method].canary(), config, name=f"control: {name} ({method})", kind="control")
