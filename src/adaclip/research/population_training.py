"""Train a :class:`~adaclip.research.population.Population` on a dataset's splits: batches, epochs, metrics, records.

The batches are those of a solo run with seed ``sampling_seed``, shared by every member:

* with any private member, Poisson batches at ``q = B / N``, ``int(1 / q)`` per epoch, drawn by
  :class:`~adaclip.engine.sampling.PoissonBatchSampler` from a generator seeded as ``make_private(seed=sampling_seed)``
  seeds its sampling (a member whose ``seed`` is ``sampling_seed`` is exactly its solo run);
* with non-private members only, the research trainer's shuffled batches of ``B`` (``DataLoader(shuffle=True)``
  with ``torch.Generator().manual_seed(sampling_seed)``).

After every epoch each running member is evaluated on the validation and test splits (accuracy, or mean squared
error for regression), all members with one product per chunk of examples.  A member whose training loss or metric
is not finite stops there and its record says ``diverged: true`` with null metrics, as the trainer's
``on_divergence="record"``.  Each record carries the member's own sigma and the epsilon of the steps it took.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from adaclip._validate import require_delta_below_inverse_n, require_int
from adaclip.engine.private import _seeds
from adaclip.engine.sampling import PoissonBatchSampler, gather_rows
from adaclip.methods import NONPRIVATE
from adaclip.privacy.accounting import Accountant
from adaclip.research.data import Splits
from adaclip.research.population import Member, Population, Privacy
from adaclip.research.train import default_delta

EVALUATION_BATCH = 1024
"""Examples per product when the members are evaluated."""


def population_batches(
    num_examples: int, batch_size: int, epochs: int, sampling_seed: int, *, poisson: bool
) -> Iterator[list[Tensor]]:
    """Each epoch's batches (index tensors) of a solo run with seed ``sampling_seed`` (see the module docstring)."""
    require_int("epochs", epochs)
    if poisson:
        seed, _ = _seeds(sampling_seed)
        assert seed is not None
        sampler = PoissonBatchSampler(
            num_examples, batch_size / num_examples, generator=torch.Generator().manual_seed(seed)
        )
        for _ in range(epochs):
            yield sampler.epoch()
        return
    loader: DataLoader[int] = DataLoader(
        range(num_examples),  # type: ignore[arg-type]  # a range is a map-style dataset of its indices
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(sampling_seed),
    )
    for _ in range(epochs):
        yield list(loader)


def evaluate(population: Population, features: Tensor, targets: Tensor) -> list[float]:
    """Every member's accuracy (``logistic``) or mean squared error (``linear``) on ``features`` and ``targets``."""
    total = torch.zeros(len(population.members), dtype=torch.float64)
    for start in range(0, len(targets), EVALUATION_BATCH):
        outputs = population.outputs(features[start : start + EVALUATION_BATCH])  # [n, K, out]
        chunk = targets[start : start + EVALUATION_BATCH].unsqueeze(1)
        if population.model == "logistic":
            total += (outputs.argmax(2) == chunk).sum(0).double().cpu()
        else:
            total += (outputs.squeeze(2) - chunk).square().sum(0).double().cpu()
    values: list[float] = (total / len(targets)).tolist()
    return values


def train_population(
    members: Sequence[Member],
    splits: Splits,
    *,
    model: str,
    batch_size: int,
    epochs: int,
    sampling_seed: int = 0,
    delta: float | None = None,
    accountant: Accountant = "prv",
    on_step: Callable[[Population], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``members`` together on ``splits`` and return one record per member (see the module docstring).

    ``delta`` defaults to the research trainer's (``1e-5``, or ``N^-1.1`` when that is not below ``1 / N``).
    ``on_step`` is called after every step (e.g. to trace the parameters).
    """
    features, labels = (t.reshape(t.shape[0], -1) if i == 0 else t for i, t in enumerate(splits.train.tensors))
    num_examples = features.shape[0]
    require_int("batch_size", batch_size)
    if batch_size > num_examples:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_examples} training examples; lower it")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("the training features hold NaN or infinite entries: a population needs finite features")
    private = any(m.method != NONPRIVATE for m in members)
    sample_rate = batch_size / num_examples
    if delta is None:
        delta = default_delta(num_examples)
    elif private:
        require_delta_below_inverse_n(delta, num_examples)
    privacy = Privacy(sample_rate, epochs * int(1 / sample_rate), delta, accountant) if private else None
    population = Population(
        members,
        model=model,
        num_features=features.shape[1],
        num_outputs=splits.num_classes or 1,
        expected_batch_size=batch_size,
        privacy=privacy,
        dtype=features.dtype,
        device=features.device,
    )
    evaluation = {
        name: (split.tensors[0].reshape(len(split), -1), split.tensors[1])
        for name, split in (("val", splits.validation), ("test", splits.test))
    }
    metric = "accuracy" if model == "logistic" else "mse"
    input_squared = torch.linalg.vector_norm(features, dim=1).square_()  # ||x_i||^2, once for every step
    history: list[list[dict[str, Any]]] = [[] for _ in members]
    stat_sums: list[dict[str, list[float]]] = [{} for _ in members]  # key -> [sum, count] of each release statistic
    for epoch, batches in enumerate(
        population_batches(num_examples, batch_size, epochs, sampling_seed, poisson=private), 1
    ):
        running = population.running()
        if not running:
            break
        loss_sums = torch.zeros(len(members), dtype=torch.float64)
        count = 0
        for indices in batches:
            losses = population.step(
                gather_rows(features, indices), gather_rows(labels, indices), gather_rows(input_squared, indices)
            )
            if len(indices):
                loss_sums += losses.double().cpu() * len(indices)
                count += len(indices)
            for k, state in enumerate(population.states):
                for key, value in state.last_stats.items():
                    if math.isfinite(value):
                        total = stat_sums[k].setdefault(key, [0.0, 0.0])
                        total[0] += value
                        total[1] += 1
            if on_step is not None:
                on_step(population)
        scores = {name: evaluate(population, *tensors) for name, tensors in evaluation.items()}
        for k in running:
            summary: dict[str, float | None] = {
                "epoch": epoch,
                "train_loss": loss_sums[k].item() / max(count, 1),
                f"val_{metric}": scores["val"][k],
                f"test_{metric}": scores["test"][k],
            }
            if population.states[k].diverged or not all(math.isfinite(v or 0.0) for v in summary.values()):
                population.states[k].diverged = True
                summary = {key: (epoch if key == "epoch" else None) for key in summary}
            history[k].append(summary)
    return [
        _record(population, k, history[k], metric, {key: total / steps for key, (total, steps) in stat_sums[k].items()})
        for k in range(len(members))
    ]


def _record(
    population: Population, k: int, history: list[dict[str, Any]], metric: str, stats_mean: dict[str, float]
) -> dict[str, Any]:
    """Member ``k``'s JSON-ready record; ``stats_mean`` holds the means over its steps of its releases' statistics
    (diagnostics computed from the raw batches, not private releases; see :mod:`adaclip.research.train`)."""
    member, state = population.members[k], population.states[k]
    spent = population.spent(k)
    last = history[-1] if history and not state.diverged else {}
    privacy = population.privacy
    return {
        "method": member.method,
        "lr": member.lr,
        "momentum": member.momentum,
        "seed": member.seed,
        "method_params": {} if state.rule is None else state.rule.hyperparameters(),
        "target_epsilon": member.epsilon,
        "noise_multiplier": population.noise_multiplier(k),
        "epsilon": None if spent is None else spent.epsilon,
        "epsilon_accountant": None if spent is None else spent.accountant,
        "delta": None if state.rule is None or privacy is None else privacy.delta,
        "sample_rate": None if state.rule is None or privacy is None else privacy.sample_rate,
        "steps": state.steps_taken,
        "diverged": state.diverged,
        f"val_{metric}": last.get(f"val_{metric}"),
        f"test_{metric}": last.get(f"test_{metric}"),
        "per_epoch": history,
        "step_stats_mean": stats_mean,
    }
