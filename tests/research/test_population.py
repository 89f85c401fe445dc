"""A population's members follow their solo runs exactly (float64), given the same batches and noise streams.

The solo run is the research trainer's path: ``torch.manual_seed(seed)``, ``build_model``, ``torch.optim.SGD`` and
``make_private(seed=seed)`` (the noise generator), on a ``TensorDataset``; only its sampling generator is reseeded
to the population's shared stream (common random numbers).  The non-private members are compared with the
trainer's plain SGD on shuffled batches.  Members differ in method, learning rate, momentum, scale and seed, so a
shared noise stream, a swapped clip bound or a shared state would separate a member from its solo run.
"""

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import make_private
from adaclip.engine.private import _seeds
from adaclip.research.data import Splits
from adaclip.research.models import build_model
from adaclip.research.population import Member, Population, Privacy
from adaclip.research.population_training import population_batches, train_population

N, FEATURES, CLASSES, BATCH, EPOCHS, SAMPLING_SEED, DELTA = 96, 6, 3, 24, 2, 11, 1e-3
SIGMA = 0.8

MEMBERS = [
    Member("fixed", lr=0.5, noise_multiplier=SIGMA, method_params={"clip_norm": 0.3}, seed=1),
    Member("fixed", lr=0.2, momentum=0.9, noise_multiplier=SIGMA, method_params={"clip_norm": 3.0}, seed=2),
    Member("fixed", lr=0.5, noise_multiplier=2 * SIGMA, method_params={"clip_norm": 0.3}, seed=SAMPLING_SEED),
    Member("auto", lr=0.3, noise_multiplier=SIGMA, method_params={"r": 0.1}, seed=3),
    Member("psac", lr=0.4, momentum=0.5, noise_multiplier=SIGMA, method_params={"clip_norm": 0.5}, seed=4),
    Member("quantile", lr=0.6, noise_multiplier=SIGMA, method_params={"initial_clip": 0.2}, seed=5),
    Member("adaclip", lr=0.1, noise_multiplier=SIGMA, method_params={"initial_clip": 0.5}, seed=6),
    Member("adaclip", lr=0.05, noise_multiplier=SIGMA, method_params={"estimator": "paper", "h2": 1.0}, seed=7),
    Member("macadam", lr=0.01, noise_multiplier=SIGMA, seed=8),
    Member("adambc", lr=0.02, noise_multiplier=SIGMA, method_params={"clip_norm": 0.5}, seed=10),
]


def dataset(task: str = "classification") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, FEATURES, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3.0, FEATURES)
    if task == "classification":
        return x, torch.randint(0, CLASSES, (N,), generator=generator)
    return x, x @ torch.linspace(-1.0, 1.0, FEATURES, dtype=torch.float64) + 0.1 * torch.randn(N, generator=generator)


def splits(x: torch.Tensor, y: torch.Tensor, task: str = "classification") -> Splits:
    data = TensorDataset(x, y)
    return Splits("toy", task, CLASSES if task == "classification" else None, data, data, data)  # type: ignore[arg-type]


def solo_trajectory(member: Member, x: torch.Tensor, y: torch.Tensor, model_name: str = "logistic"):
    """Parameters after every step, and the trained model, of ``member``'s solo run."""
    torch.manual_seed(member.seed)
    model = build_model(model_name, (FEATURES,), CLASSES if model_name == "logistic" else 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=member.lr, momentum=member.momentum)
    loss_fn = nn.functional.cross_entropy if model_name == "logistic" else nn.functional.mse_loss
    trajectory = []
    if member.method == "nonprivate":
        loader = DataLoader(
            TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(SAMPLING_SEED)
        )
    else:
        model, optimizer, loader = make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
            method=member.method,
            noise_multiplier=member.noise_multiplier,
            delta=DELTA,
            accountant="rdp",
            seed=member.seed,
            **member.method_params,
        )
        loader.poisson_sampler.generator.manual_seed(_seeds(SAMPLING_SEED)[0])  # the population's shared batches
    for _ in range(EPOCHS):
        for features, targets in loader:
            optimizer.zero_grad()
            loss_fn(model(features), targets).backward()
            optimizer.step()
            trajectory.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return torch.stack(trajectory), model, optimizer


def population_trajectory(members, x, y, model_name="logistic", *, poisson=True):
    population = Population(
        members,
        model=model_name,
        num_features=FEATURES,
        num_outputs=CLASSES if model_name == "logistic" else 1,
        expected_batch_size=BATCH,
        privacy=Privacy(BATCH / N, EPOCHS * (N // BATCH), DELTA, "rdp"),
        dtype=torch.float64,
    )
    trajectory = []
    for batches in population_batches(N, BATCH, EPOCHS, SAMPLING_SEED, poisson=poisson):
        for indices in batches:
            population.step(x[indices], y[indices])
            trajectory.append(torch.stack([population.parameters(k) for k in range(len(members))]))
    return torch.stack(trajectory, dim=1), population  # [K, steps, d]


def test_every_member_follows_its_solo_run_step_by_step():
    x, y = dataset()
    stacked, population = population_trajectory(MEMBERS, x, y)
    for k, member in enumerate(MEMBERS):
        solo, _, optimizer = solo_trajectory(member, x, y)
        assert stacked[k].shape == solo.shape
        torch.testing.assert_close(stacked[k], solo, rtol=1e-10, atol=1e-12, msg=f"member {k} ({member.method})")
        assert population.noise_multiplier(k) == optimizer.noise_multiplier
        assert population.spent(k).epsilon == pytest.approx(optimizer.get_epsilon(DELTA), rel=1e-12)


def test_the_comparison_separates_members():
    # the equality above is not vacuous: a member's solo run with another's noise stream, or another's clip bound,
    # ends far from its own trajectory
    x, y = dataset()
    own, _, _ = solo_trajectory(MEMBERS[0], x, y)
    other_noise, _, _ = solo_trajectory(dataclasses.replace(MEMBERS[0], seed=MEMBERS[2].seed), x, y)
    swapped_clip, _, _ = solo_trajectory(dataclasses.replace(MEMBERS[0], method_params={"clip_norm": 3.0}), x, y)
    for changed in (other_noise, swapped_clip):
        assert (changed[-1] - own[-1]).abs().max() > 1e-3


def test_linear_regression_members_follow_their_solo_runs():
    x, y = dataset("regression")
    members = [MEMBERS[0], MEMBERS[3], MEMBERS[6]]
    stacked, _ = population_trajectory(members, x, y, "linear")
    for k, member in enumerate(members):
        solo, _, _ = solo_trajectory(member, x, y, "linear")
        torch.testing.assert_close(stacked[k], solo, rtol=1e-10, atol=1e-12, msg=f"member {k} ({member.method})")


def test_nonprivate_members_follow_the_trainers_shuffled_sgd():
    x, y = dataset()
    members = [Member("nonprivate", lr=0.5, seed=1), Member("nonprivate", lr=0.1, momentum=0.9, seed=2)]
    stacked, _ = population_trajectory(members, x, y, poisson=False)
    for k, member in enumerate(members):
        solo, _, _ = solo_trajectory(member, x, y)
        torch.testing.assert_close(stacked[k], solo, rtol=1e-10, atol=1e-12)


def train_logistic(members, x, y):
    """The population of ``members`` trained as every test here trains it: logistic regression, RDP accounting."""
    return train_population(
        members,
        splits(x, y),
        model="logistic",
        batch_size=BATCH,
        epochs=EPOCHS,
        sampling_seed=SAMPLING_SEED,
        delta=DELTA,
        accountant="rdp",
    )


def test_records_hold_each_members_final_metrics_and_epsilon():
    x, y = dataset()
    records = train_logistic(MEMBERS[:4], x, y)
    for member, record in zip(MEMBERS[:4], records, strict=True):
        _, model, optimizer = solo_trajectory(member, x, y)
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).double().mean().item()
        assert record["test_accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert record["val_accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert record["epsilon"] == pytest.approx(optimizer.get_epsilon(DELTA), rel=1e-12)
        assert record["steps"] == EPOCHS * (N // BATCH)
        assert record["noise_multiplier"] == member.noise_multiplier
        assert [e["epoch"] for e in record["per_epoch"]] == list(range(1, EPOCHS + 1))
        assert 0 <= record["step_stats_mean"]["clipped_fraction"] <= 1
        if "clip_norm" in member.method_params:
            assert record["step_stats_mean"]["clip_norm"] == member.method_params["clip_norm"]


def test_a_target_epsilon_is_calibrated_per_member():
    x, y = dataset()
    members = [
        dataclasses.replace(MEMBERS[0], noise_multiplier=None, epsilon=eps, seed=seed)
        for eps, seed in ((1.0, 11), (4.0, 12))
    ]
    records = train_logistic(members, x, y)
    assert records[0]["noise_multiplier"] > records[1]["noise_multiplier"]
    for member, record in zip(members, records, strict=True):
        assert member.epsilon * 0.99 <= record["epsilon"] <= member.epsilon


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (Member("fixed", lr=0.1), "exactly one of noise_multiplier and epsilon"),
        (Member("nonprivate", lr=0.1, epsilon=1.0), "takes no noise_multiplier"),
        (Member("sgd", lr=0.1), "method must be one of"),
        (Member("fixed", lr=-1.0, noise_multiplier=1.0), "lr"),
        (Member("fixed", lr=0.1, momentum=1.0, noise_multiplier=1.0), "momentum"),
        (Member("macadam", lr=0.1, momentum=0.5, noise_multiplier=1.0), "momentum must be 0"),
        (Member("geoclip", lr=0.1, noise_multiplier=1.0), "subspace norm"),
        (Member("fixed", lr=0.1, noise_multiplier=1.0, method_params={"clip": 1.0}), "unknown parameter"),
    ],
)
def test_bad_members_are_refused(member, message):
    with pytest.raises(ValueError, match=message):
        Population(
            [member],
            model="logistic",
            num_features=FEATURES,
            num_outputs=CLASSES,
            expected_batch_size=BATCH,
            privacy=Privacy(BATCH / N, 8, DELTA, "rdp"),
        )


def test_float32_transformed_norms_are_recomputed_in_float64_where_they_cancel():
    # AdaCliP's shift at example 0's own gradient and a tiny scale: the three-term expansion cancels catastrophically
    # for that example in float32, so the population must recompute it in float64 (as the engine does)
    x, y = dataset()
    x32 = x.float()
    member = Member("adaclip", lr=0.1, noise_multiplier=SIGMA, method_params={"initial_clip": 1e-5}, seed=6)
    population = Population(
        [member],
        model="logistic",
        num_features=FEATURES,
        num_outputs=CLASSES,
        expected_batch_size=BATCH,
        privacy=Privacy(BATCH / N, 8, DELTA, "rdp"),
    )
    _, deltas = population.losses_and_output_grads(population.outputs(x32), y)
    delta = deltas[:, 0].double()
    grads = torch.cat([torch.einsum("no,ni->noi", delta, x32.double()).reshape(N, -1), delta], dim=1)
    state = population.states[0].rule_state
    population.states[0].rule_state = dataclasses.replace(state, mean=grads[0].float())
    scale = state.scale.double()
    expected = ((grads - grads[0].float().double()) / scale).square().sum(1)
    weights, _ = population._example_weights(x32, x32.square().sum(1), deltas)
    norms = population._transformed_squared_norms(x32, deltas)[0].double()
    assert expected[0] < 1e-3 < expected[1:].min()
    torch.testing.assert_close(norms, expected, rtol=1e-3, atol=1e-3)
    assert weights[0, 0] == 1.0  # example 0 sits on the shift: not clipped


def test_a_diverging_member_stops_alone():
    x, y = dataset()
    exploding = Member("fixed", lr=1e308, noise_multiplier=SIGMA, method_params={"clip_norm": 3.0}, seed=9)
    together = train_logistic([MEMBERS[0], exploding], x, y)
    alone = train_logistic([MEMBERS[0]], x, y)
    assert together[1]["diverged"] and together[1]["test_accuracy"] is None
    assert together[1]["per_epoch"][-1]["train_loss"] is None
    assert 0 < together[1]["steps"] < together[0]["steps"]
    assert together[0] == alone[0]


def test_private_members_may_not_share_their_noise():
    """Two releases with the same noise draw give away the difference of their clipped sums without noise."""
    twins = [Member("fixed", lr=lr, noise_multiplier=SIGMA, method_params={"clip_norm": 1.0}, seed=3) for lr in (1, 2)]
    arguments = dict(model="logistic", num_features=FEATURES, num_outputs=CLASSES, expected_batch_size=BATCH)
    with pytest.raises(ValueError, match=r"private members share seed\(s\) \[3\]"):
        Population(twins, privacy=Privacy(BATCH / N, 8, DELTA, "rdp"), **arguments)
    baseline = [Member("nonprivate", lr=0.1, seed=3), twins[0]]  # a non-private member draws no noise
    assert len(Population(baseline, privacy=Privacy(BATCH / N, 8, DELTA, "rdp"), **arguments).members) == 2
