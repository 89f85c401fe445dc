"""The optimizer-path audit: ``make_private`` end to end, with Poisson sampling, on a crafted canary example."""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip.audit.config import AuditConfig, AuditResult
from adaclip.audit.rule import seeds
from adaclip.audit.statistics import epsilon_lower_bound, standardised_mean_shift
from adaclip.engine import make_private
from adaclip.methods import METHODS, build_rule
from adaclip.methods.canary import DTYPE, CanaryAdapter
from adaclip.privacy.accounting import epsilon

#: The canary example's input along weight 0 and its target; its squared-error gradient is about
#: ``2 * CANARY_INPUT**3`` along weight 0, far outside every rule's clip region.
CANARY_INPUT = 10.0
#: Small enough that weight 0 stays near 0 even without clipping, so the canary's gradient keeps its sign.
OPTIMIZER_LEARNING_RATE = 1e-3


def canary_dataset(size: int, dim: int, *, with_canary: bool, seed: int) -> TensorDataset:
    """``size - 1`` background examples with input 0 at coordinate 0 (no gradient on weight 0), plus the canary.

    The canary's input is ``CANARY_INPUT e_0`` with target ``-CANARY_INPUT**2``, so it alone moves weight 0.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size - 1, dim, generator=generator)
    inputs[:, 0] = 0.0
    targets = torch.randn(size - 1, generator=generator)
    if with_canary:
        canary = torch.zeros(1, dim)
        canary[0, 0] = CANARY_INPUT
        inputs = torch.cat([inputs, canary])
        targets = torch.cat([targets, torch.tensor([-(CANARY_INPUT**2)])])
    return TensorDataset(inputs, targets)


def _optimizer_trial(
    method: str, adapter: CanaryAdapter[Any], dataset: TensorDataset, config: AuditConfig, *, seed: int
) -> float:
    """One private training run of ``optimizer_steps`` steps; the standardised statistic on weight 0."""
    sigma, batch, dim = config.optimizer_noise_multiplier, config.expected_batch_size, config.dim
    model = nn.Linear(dim, 1, bias=False)
    rule_params: dict[str, Any] = adapter.rule_params(sigma, batch)
    with torch.no_grad():
        model.weight.zero_()
    module, optimizer, loader = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=OPTIMIZER_LEARNING_RATE),
        data_loader=DataLoader(dataset, batch_size=batch),
        method=method,
        noise_multiplier=sigma,
        delta=config.delta,
        seed=seed,
        **rule_params,
    )
    rule, score = optimizer.rule, 0.0
    for inputs, targets in itertools.islice(
        itertools.chain.from_iterable(itertools.repeat(loader)), config.optimizer_steps
    ):
        state = optimizer.rule_state if optimizer.rule_state is not None else rule.init_state(dim)
        before = model.weight.detach().flatten().clone()
        optimizer.zero_grad()
        ((module(inputs).squeeze(1) - targets) ** 2).mean().backward()
        optimizer.step()
        step = (before - model.weight.detach().flatten()) / OPTIMIZER_LEARNING_RATE  # what the rule released
        # the noisy gradient, as the adapter reads it from the release and the public state (the Adam rules
        # release a step computed from it); the count of a quantile rule, if any, is dropped
        release = adapter.observe(rule, state, step, optimizer.rule_state)[:dim]
        # the sampled batch is hidden: the adversary subtracts the noiseless release of an empty batch and
        # reads weight 0, which only the canary's gradient reaches
        empty_step, empty_state, _ = rule.step(torch.zeros(0, dim), state, torch.zeros(rule.noise_size(dim)))
        empty_release = adapter.observe(rule, state, empty_step, empty_state)[:dim]
        score += float(adapter.gradient_noise(rule, state, release - empty_release)[0])
    return score / math.sqrt(config.optimizer_steps)


def optimizer_expected_mu(sample_rate: float, steps: int, shift: float) -> float:
    """Standardised mean shift of the optimizer-path statistic for a correct rule whose canary saturates.

    Per step the statistic is ``z + 1[canary sampled] * shift`` (``z ~ N(0, 1)``), summed over ``steps`` and
    divided by ``sqrt(steps)``: mean ``q sqrt(T) shift``, variance 1 without and ``1 + q (1 - q) shift^2``
    with the canary, so ``mu = q sqrt(T) shift / sqrt(1 + q (1 - q) shift^2 / 2)``.
    """
    q = sample_rate
    return q * math.sqrt(steps) * shift / math.sqrt(1 + q * (1 - q) * shift**2 / 2)


def audit_optimizer(method: str, config: AuditConfig) -> AuditResult:
    """Audit of ``make_private`` end to end with Poisson sampling (see the module docstring).

    Theory: the PRV accountant at ``q = B / N`` (``N`` counts the canary) for ``optimizer_steps`` steps
    with ``optimizer_noise_multiplier``, which is what ``optimizer.get_epsilon`` reports for the canary
    run.  The adversary sees only the released parameters, so the expected shift uses the gradient's
    own noise multiplier (``sigma_delta`` for the quantile rule, ``sigma`` otherwise).
    """
    adapter = METHODS[method].canary()
    if config.optimizer_trials == 0:
        raise ValueError("audit.optimizer_trials is 0: the optimizer-path audit is switched off")
    trials, steps = config.optimizer_trials, config.optimizer_steps
    trial_seeds = seeds(config.seed + 1, 2 * trials + 1)
    scores = {}
    with warnings.catch_warnings():
        # Opacus's hooks on a first layer whose input needs no gradient: expected and harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for world, with_canary in enumerate((False, True)):
            dataset = canary_dataset(
                config.optimizer_dataset_size, config.dim, with_canary=with_canary, seed=trial_seeds[-1]
            )
            scores[with_canary] = np.array(
                [
                    _optimizer_trial(method, adapter, dataset, config, seed=trial_seeds[world * trials + i])
                    for i in range(trials)
                ]
            )
    sigma, batch = config.optimizer_noise_multiplier, config.expected_batch_size
    rule = build_rule(method, noise_multiplier=sigma, expected_batch_size=batch, **adapter.rule_params(sigma, batch))
    shift = float(adapter.canary_shift(rule, rule.init_state(config.dim, dtype=DTYPE), config.dim)[0])
    sample_rate = batch / config.optimizer_dataset_size
    # the statistic is a Poisson mixture, not Gaussian, in the canary world: the threshold bound is the one that holds
    threshold = epsilon_lower_bound(scores[False], scores[True], delta=config.delta, confidence=config.confidence)
    return AuditResult(
        name=f"{method} (optimizer, q = {sample_rate:.3g})",
        kind="optimizer",
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        trials=trials,
        delta=config.delta,
        confidence=config.confidence,
        theoretical_epsilon=epsilon(
            noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=config.delta, accountant="prv"
        ),
        accountant="prv",
        expected_mu=optimizer_expected_mu(sample_rate, steps, shift),
        lower_bound=threshold,
        threshold_bound=threshold,
        mean_shift=standardised_mean_shift(scores[False], scores[True], confidence=config.confidence),
        null_scores=scores[False],
        canary_scores=scores[True],
    )
