"""White-box privacy audit: an empirical *lower* bound on epsilon for each clipping rule and the optimizer.

The audit (Nasr, Song, Thakurta, Papernot, Carlini 2021, "Adversary instantiation"; Nasr et al. 2023,
"Tight auditing of differentially private machine learning") runs the same private computation many
times on two neighbouring inputs, the *null* world (the other examples only) and the *canary* world
(the same plus one canary example), and tests on what is released which world it came from.  Any
test with false-positive rate FPR and false-negative rate FNR against an (eps, delta)-DP mechanism
obeys ``FPR + e^eps FNR >= 1 - delta`` and ``FNR + e^eps FPR >= 1 - delta`` (Kairouz, Oh, Viswanath
2015), so Clopper–Pearson upper bounds on the two rates give a lower bound on eps that holds with
the stated confidence.

Two audits:

* :func:`audit_rule` / :func:`audit_method` — *one rule, white-box*.  ``steps`` calls of
  ``rule.step`` through the public API (noise drawn like ``AdaptiveClipDPOptimizer.pre_step``
  draws it), from a non-trivial state reached by ``warmup_steps`` earlier steps, with the canary in
  every batch (no subsampling).  The adversary chooses every other example's gradient and the
  canary's gradient at every step (far outside the clip region along coordinate 0, after the rule's
  own transform), knows the code, the hyperparameters and the initial state, and sees every value
  the analysis calls released: each step's noisy mean gradient and, for the quantile rule, the noisy
  count (read off the public next clip norm).  It never sees the noise.  The analysis says this is
  ``steps`` Gaussian mechanisms with multiplier sigma: theory is ``epsilon(sigma, q = 1, steps)``.
* :func:`audit_optimizer` — *the whole path*: ``make_private`` on a one-layer model, a data set with
  or without a crafted canary example whose gradient is huge along one weight, Opacus's Poisson
  sampling, ``optimizer_steps`` optimizer steps; the adversary sees the released parameters after
  each step (and the rule's public state), not which examples were sampled.  Theory is the
  optimizer's own accountant (PRV) at ``q = B / N``.

The test statistic.  For each step the adversary inverts what was released into the standard-normal
draws the *null* world would have needed to produce it (:meth:`CanaryAdapter.implied_noise`),
re-deriving the public state from the releases with the rule itself, and projects them on the shift
that a canary on the clip boundary causes under the analysis (:meth:`CanaryAdapter.canary_shift`,
``sensitivity / noise std``, norm ``1 / sigma`` for every correct rule).  The per-step projections are
summed and divided by ``sqrt(steps)``.  For a correct rule the statistic is exactly ``N(0, 1)`` in the
null world and ``N(mu, 1)`` in the canary world with ``mu = sqrt(steps) / sigma``; so besides the
epsilon bound the audit reports the standardised mean shift ``mu_hat`` with a confidence band, a far
sharper check that the rule adds the noise, clips and normalises the way the accountant assumes.
Because the state is re-derived from releases, a rule whose statistics (AdaCliP's ``a``, ``b``; the
quantile rule's clip norm) depend on anything but released values shows up as a shift at the *next*
step, so stateful rules need ``steps >= 2``.

What it can prove: that an implementation is *not* as private as claimed, with the stated
confidence: an epsilon lower bound above the accountant's epsilon is a violation whatever the
mechanism; ``mu_hat`` above its band means the release moves further along the canary than
``sensitivity / noise std`` allows, which no correct rule can do (its clipped canary shifts the
implied noise by at most ``1 / sigma`` per step), and ``mu_hat`` below its band means the rule does not
behave like the analysed Gaussian mechanism either.  A matching ``mu_hat`` shows that the canary
saturates the bound, i.e. that the audit is tight for this adversary.
What it cannot prove: that a rule *is* private.  A passing audit bounds epsilon from below only; it
covers this adversary, this canary, these ``steps`` and these hyperparameters; the rule-level audit
has no subsampling, so privacy amplification is not audited there, and the optimizer-path audit
(which has it) sees only a few steps with low power; floating-point attacks on the Gaussian sampler
(Mironov 2012) and the accountant's own arithmetic are out of scope (the accountants are checked
against independent values in ``tests/test_accounting_conformance.py``); so is the one-run audit
of Steinke, Nasr and Jagielski (2023).  With ``n`` evaluation trials per world the epsilon bound
cannot exceed about ``log(n / 3.7)`` (no errors at all), so the ``mu_hat`` check carries most of the
power.

Adding a rule: give its registry entry (:data:`adaclip.methods.METHODS`) a
:class:`~adaclip.methods.canary.CanaryAdapter` in the method's own module.
"""

from adaclip.audit.config import PASS_MEANING, AuditConfig, AuditResult, audit_config, table_header, table_row
from adaclip.audit.optimizer import audit_optimizer, canary_dataset, optimizer_expected_mu
from adaclip.audit.rule import audit_method, audit_rule, warm_state
from adaclip.audit.statistics import (
    EpsilonLowerBound,
    GaussianLowerBound,
    MeanShift,
    clopper_pearson_upper,
    epsilon_lower_bound,
    gaussian_delta,
    gaussian_epsilon,
    gaussian_epsilon_lower_bound,
    standardised_mean_shift,
)

__all__ = [
    "PASS_MEANING",
    "AuditConfig",
    "AuditResult",
    "EpsilonLowerBound",
    "GaussianLowerBound",
    "MeanShift",
    "audit_config",
    "audit_method",
    "audit_optimizer",
    "audit_rule",
    "canary_dataset",
    "clopper_pearson_upper",
    "epsilon_lower_bound",
    "gaussian_delta",
    "gaussian_epsilon",
    "gaussian_epsilon_lower_bound",
    "optimizer_expected_mu",
    "standardised_mean_shift",
    "table_header",
    "table_row",
    "warm_state",
]
