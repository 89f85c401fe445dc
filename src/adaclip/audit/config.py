"""The audit's knobs (:class:`AuditConfig`, the ``audit`` block of ``params.yaml``) and its results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from adaclip._validate import require_bool, require_int, require_open_unit, require_positive
from adaclip.audit.statistics import EpsilonLowerBound, GaussianLowerBound, MeanShift
from adaclip.methods import METHODS

PASS_MEANING = (
    "pass = no violation found by this adversary: the audited lower bounds do not exceed the theoretical "
    "epsilon and mu_hat's band contains the expected mu; it is not a proof of privacy"
)
"""What a passing verdict means, stated wherever verdicts are reported."""


@dataclass(frozen=True)
class AuditConfig:
    """Every knob of the audit (the ``audit`` block of ``params.yaml``).

    ``trials`` per world; ``steps`` rule steps per trial after ``warmup_steps``; ``expected_batch_size``
    examples besides the canary; ``dim`` gradient coordinates; ``methods`` a list or ``"all"``;
    ``controls`` whether to run the deliberately broken rules of :mod:`adaclip.audit.controls`;
    ``optimizer_*`` the optimizer-path audit (``optimizer_trials = 0`` skips it), on a data set of
    ``optimizer_dataset_size`` examples including the canary, with its own noise multiplier (its
    subsampled, few-step signal is weak at the rule audit's sigma).

    ``trials = 500`` is sized for the Gaussian trade-off bound: at the default setting (``mu = sqrt(2) / 2``,
    theory 2.94) the standard error of ``mu_hat`` is ``sqrt(2 / n + mu^2 / (4 n)) = 0.065``, so even an
    audit whose ``mu_hat`` falls 2.33 standard errors short (1 % of audits) keeps a lower bound of 60 %
    of the theoretical epsilon (300 trials: 49 %); a correct rule's typical bound is 83 %.
    """

    trials: int = 500
    noise_multiplier: float = 2.0
    expected_batch_size: int = 16
    dim: int = 16
    steps: int = 2
    warmup_steps: int = 10
    delta: float = 1e-5
    confidence: float = 0.95
    seed: int = 0
    methods: tuple[str, ...] | str = "all"
    controls: bool = True
    optimizer_trials: int = 200
    optimizer_noise_multiplier: float = 1.0
    optimizer_steps: int = 4
    optimizer_dataset_size: int = 32

    def __post_init__(self) -> None:
        for name, low in (
            ("trials", 8),
            ("expected_batch_size", 1),
            ("dim", 2),
            ("steps", 1),
            ("warmup_steps", 0),
            ("seed", 0),
            ("optimizer_trials", 0),
            ("optimizer_steps", 1),
            ("optimizer_dataset_size", 2),
        ):
            require_int(f"audit.{name}", getattr(self, name), minimum=low)
        if self.optimizer_trials and self.optimizer_trials < 8:
            raise ValueError(f"audit.optimizer_trials must be 0 (skip) or >= 8, got {self.optimizer_trials}")
        for name in ("noise_multiplier", "optimizer_noise_multiplier"):
            require_positive(f"audit.{name}", getattr(self, name))
        for name in ("delta", "confidence"):
            require_open_unit(f"audit.{name}", getattr(self, name))
        require_bool("audit.controls", self.controls)
        if self.optimizer_dataset_size <= self.expected_batch_size:
            raise ValueError(
                f"audit.optimizer_dataset_size ({self.optimizer_dataset_size}) must exceed audit.expected_batch_size "
                f"({self.expected_batch_size}) so that the sampling rate B / N is below 1"
            )
        if self.methods != "all":
            if isinstance(self.methods, str) or not isinstance(self.methods, Sequence) or not self.methods:
                raise ValueError(
                    f"audit.methods must be 'all' or a non-empty list of method names, got {self.methods!r}"
                )
            unknown = sorted(set(self.methods) - set(METHODS))
            if unknown:
                raise ValueError(f"audit.methods has unknown method(s) {unknown}; known: {sorted(METHODS)}")
            object.__setattr__(self, "methods", tuple(self.methods))

    @property
    def method_names(self) -> list[str]:
        """The methods to audit, in a stable order."""
        return list(METHODS) if self.methods == "all" else list(self.methods)


def audit_config(settings: Mapping[str, Any] | None = None, *, complete: bool = False) -> AuditConfig:
    """Validate ``settings`` (e.g. the notebook's ``audit`` dict); missing keys take the defaults.

    ``complete=True`` also requires every key (for a params file that must spell out every knob).
    """
    settings = dict(settings or {})
    accepted = [f.name for f in fields(AuditConfig)]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"unknown audit key(s) {unknown}; accepted keys: {accepted}")
    missing = [name for name in accepted if name not in settings]
    if complete and missing:
        raise ValueError(f"missing audit key(s) {missing}; every one of {accepted} must be given")
    return AuditConfig(**settings)


@dataclass(frozen=True)
class AuditResult:
    """One audit: the theory it is held against, the measured bounds and shift, and the verdict.

    ``lower_bound`` is the headline epsilon lower bound: through the Gaussian trade-off curve
    (:class:`~adaclip.audit.statistics.GaussianLowerBound`) for the rule audits, whose statistic is
    exactly Gaussian for a correct rule; the Clopper–Pearson threshold bound for the optimizer path,
    whose statistic is a mixture under Poisson sampling.  ``threshold_bound`` is always the
    Clopper–Pearson one (valid whatever the mechanism, but capped by the number of trials).
    """

    name: str
    kind: str  # "rule", "control" (a deliberately broken rule) or "optimizer"
    noise_multiplier: float
    sample_rate: float
    steps: int
    trials: int
    delta: float
    confidence: float
    theoretical_epsilon: float
    accountant: str
    expected_mu: float
    lower_bound: GaussianLowerBound | EpsilonLowerBound
    threshold_bound: EpsilonLowerBound
    mean_shift: MeanShift
    null_scores: np.ndarray = field(repr=False, compare=False)
    canary_scores: np.ndarray = field(repr=False, compare=False)

    @property
    def violation(self) -> bool:
        """More leakage than the analysis allows: an epsilon bound above theory or ``mu_hat``'s band above ``mu``."""
        return self._bound_above_theory or self.mean_shift.low > self.expected_mu

    @property
    def _bound_above_theory(self) -> bool:
        return max(self.lower_bound.epsilon, self.threshold_bound.epsilon) > self.theoretical_epsilon

    @property
    def verdict(self) -> str:
        """``"pass"`` (see :data:`PASS_MEANING`: no violation found by this adversary) or ``"FAIL: <why>"``."""
        if self._bound_above_theory:
            return "FAIL: epsilon lower bound above theory"
        if self.mean_shift.low > self.expected_mu:
            return "FAIL: mu_hat above its band"
        if self.mean_shift.high < self.expected_mu:
            return "FAIL: mu_hat below its band"
        return "pass"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary (without the raw scores)."""
        summary = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("null_scores", "canary_scores")
        }
        summary["lower_bound"] = asdict(self.lower_bound)
        summary["lower_bound_method"] = (
            "gaussian trade-off" if isinstance(self.lower_bound, GaussianLowerBound) else "clopper-pearson threshold"
        )
        summary["threshold_bound"] = asdict(self.threshold_bound)
        summary["mean_shift"] = asdict(self.mean_shift)
        summary["verdict"] = self.verdict
        summary["verdict_meaning"] = PASS_MEANING
        return summary


def table_header(confidence: float) -> list[str]:
    """Columns of the audit table; the bounds' confidence is in their headings, and what ``pass`` means in the last."""
    return [
        "method",
        "theoretical eps",
        f"audited eps lower bound ({100 * confidence:g} %; Gaussian for rules, CP for the optimizer)",
        f"CP threshold bound ({100 * confidence:g} %)",
        "mu_hat [band]",
        "expected mu",
        "verdict (pass = no violation found by this adversary)",
    ]


def table_row(result: AuditResult) -> list[object]:
    """One row of the audit table (columns :func:`table_header`)."""
    shift = result.mean_shift
    return [
        result.name,
        result.theoretical_epsilon,
        result.lower_bound.epsilon,
        result.threshold_bound.epsilon,
        f"{shift.estimate:.3f} [{shift.low:.3f}, {shift.high:.3f}]",
        result.expected_mu,
        result.verdict,
    ]
