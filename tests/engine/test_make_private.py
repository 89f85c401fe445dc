"""``make_private`` end to end: training, accounting, determinism, Opacus parity and errors."""

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import epsilon, make_private, noise_multiplier_for
from adaclip.methods import METHODS


def toy_problem(n: int = 1000, dim: int = 10, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=gen)
    labels = (features @ torch.randn(dim, generator=gen) > 0).long()
    return TensorDataset(features, labels)


def private_setup(method: str, *, seed: int = 0, batch_size: int = 50, lr: float = 0.5, **kwargs):
    torch.manual_seed(seed)
    dataset = toy_problem()
    model = nn.Linear(10, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(dataset, batch_size=batch_size)
    kwargs = {"noise_multiplier": 1.0, **kwargs}
    return (
        *make_private(
            module=model, optimizer=optimizer, data_loader=loader, method=method, delta=1e-5, seed=seed, **kwargs
        ),
        dataset,
    )


def train(model, optimizer, loader, epochs: int = 1) -> None:
    for _ in range(epochs):
        for features, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(features), labels).backward()
            optimizer.step()


def full_loss(model, dataset: TensorDataset) -> float:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(dataset.tensors[0]), dataset.tensors[1]).item()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_reduces_loss_and_reports_the_accountants_epsilon(method):
    # DP-MacAdam and DP-AdamBC release Adam steps (about 1 per coordinate, or more), not gradients
    model, optimizer, loader, dataset = private_setup(
        method, lr={"auto": 2.0, "macadam": 0.01, "adambc": 0.01}.get(method, 0.5)
    )
    before = full_loss(model, dataset)
    train(model, optimizer, loader, epochs=2)
    assert full_loss(model, dataset) < 0.7 * before
    assert len(loader) == 20 and optimizer.steps_taken == 40
    expected = epsilon(noise_multiplier=1.0, sample_rate=50 / 1000, steps=40, delta=1e-5, accountant="prv")
    assert optimizer.get_epsilon() == pytest.approx(expected, rel=1e-12)
    assert {"clipped_fraction", "noise_power", "batch_size"} <= set(optimizer.last_stats)


def test_default_call_from_the_issue_runs_as_is():
    torch.manual_seed(0)
    model = nn.Linear(10, 2)
    m, o, dl = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(toy_problem(), batch_size=50),
        method="adaclip",
        noise_multiplier=1.0,
        delta=1e-5,
        epochs=1,
    )
    train(m, o, dl)
    assert o.steps_taken == len(dl)


def test_target_epsilon_calibrates_sigma_for_the_planned_steps():
    model, optimizer, loader, _ = private_setup("fixed", noise_multiplier=None, target_epsilon=2.0, epochs=3)
    expected_sigma = noise_multiplier_for(
        target_epsilon=2.0, sample_rate=0.05, steps=3 * 20, delta=1e-5, accountant="prv"
    )
    assert optimizer.noise_multiplier == pytest.approx(expected_sigma)
    train(model, optimizer, loader, epochs=3)
    assert optimizer.get_epsilon() <= 2.0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_seed_gives_identical_training(method):
    results = []
    for global_seed in (1, 2):
        model, optimizer, loader, _ = private_setup(method, seed=7)
        torch.manual_seed(global_seed)  # the run must depend on make_private's seed only, not the global RNG
        train(model, optimizer, loader)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])
    model, optimizer, loader, _ = private_setup(method, seed=8)
    train(model, optimizer, loader)
    assert not torch.equal(results[0], torch.cat([p.detach().flatten() for p in model.parameters()]))


def test_fixed_clip_matches_opacus_dp_optimizer_without_noise():
    """Flat clipping over all parameters, summed and divided by B: Opacus's own DPOptimizer is the reference."""
    torch.manual_seed(0)
    dataset = toy_problem(n=64)
    features, labels = dataset.tensors
    features = features * 5  # so that some examples get clipped
    grads = []
    for use_adaclip in (True, False):
        torch.manual_seed(1)
        model = GradSampleModule(nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 2)))
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        if use_adaclip:
            _, optimizer, _ = make_private(
                module=model,
                optimizer=base,
                data_loader=DataLoader(dataset, batch_size=16),
                method="fixed",
                noise_multiplier=1e-12,
                delta=1e-5,
                clip_norm=0.5,
            )
        else:
            optimizer = DPOptimizer(base, noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=16)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(features[:20]), labels[:20]).backward()
        optimizer.pre_step()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_empty_poisson_batches_still_step_with_noise():
    torch.manual_seed(0)
    dataset = toy_problem(n=40)
    model = nn.Linear(10, 2)
    model, optimizer, loader = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset, batch_size=1),
        method="adaclip",
        noise_multiplier=1.0,
        delta=1e-5,
        seed=3,
    )
    sizes, moved = [], []
    for features, labels in loader:
        before = model._module.weight.detach().clone()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()
        sizes.append(len(features))
        moved.append(not torch.equal(before, model._module.weight.detach()))
    assert 0 in sizes  # rate 1/40 over 40 steps: some batches are empty (seeded)
    assert all(moved)
    assert optimizer.steps_taken == len(sizes)


def test_batchnorm_is_rejected_with_the_fix():
    model = nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="GroupNorm"):
        make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(toy_problem(), batch_size=50),
            noise_multiplier=1.0,
            delta=1e-5,
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="adaclipp"), "method"),
        (dict(method="adaclip", clip_norm=1.0), "clip_norm"),
        (dict(noise_multiplier=None), "exactly one"),
        (dict(noise_multiplier=1.0, target_epsilon=1.0, epochs=1), "exactly one"),
        (dict(noise_multiplier=None, target_epsilon=1.0), "epochs"),
        (dict(delta=1.5), "delta"),
        (dict(delta=0.002), "1/N"),
        (dict(accountant="gdp"), "accountant"),
        (dict(method="quantile", noise_multiplier=10.0, count_noise_std=1.0), "count_noise_std"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    model = nn.Linear(10, 2)
    args = (
        dict(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(toy_problem(), batch_size=50),
            noise_multiplier=1.0,
            delta=1e-5,
        )
        | kwargs
    )
    with pytest.raises(ValueError, match=match):
        make_private(**args)


def test_noise_is_fresh_every_step_with_the_calibrated_scale():
    """Zero per-example gradients: p.grad is pure noise, N(0, (sigma C / B)^2) per coordinate, new each step."""
    dataset = TensorDataset(torch.zeros(200, 50), torch.zeros(200, dtype=torch.long))
    model = nn.Linear(50, 2, bias=False)
    model, optimizer, loader = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(dataset, batch_size=20),
        method="fixed",
        noise_multiplier=2.0,
        clip_norm=0.5,
        delta=1e-5,
        seed=0,
    )
    noises = []
    for _ in range(10):
        for features, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(features), labels).backward()
            optimizer.step()
            noises.append(model._module.weight.grad.flatten().clone())
    noises = torch.stack(noises)  # [100 steps, 100 coordinates]
    expected_std = 2.0 * 0.5 / 20
    # sample std of 10^4 normals: relative standard error about 0.7 %
    assert noises.std().item() == pytest.approx(expected_std, rel=0.03)
    correlation = torch.corrcoef(torch.stack([noises[:-1].flatten(), noises[1:].flatten()]))[0, 1]
    assert abs(correlation) < 0.05  # 9900 pairs: standard error 0.01
    assert len({tuple(n.tolist()) for n in noises}) == len(noises)


def test_get_epsilon_uses_the_given_delta():
    model, optimizer, loader, _ = private_setup("fixed")
    train(model, optimizer, loader)
    expected = epsilon(noise_multiplier=1.0, sample_rate=0.05, steps=20, delta=1e-6, accountant="prv")
    assert optimizer.get_epsilon(delta=1e-6) == pytest.approx(expected, rel=1e-12)
    assert optimizer.get_epsilon(delta=1e-6) > optimizer.get_epsilon()


def test_sum_reduction_gives_b_times_the_mean_gradient():
    grads = []
    for reduction in ("mean", "sum"):
        torch.manual_seed(0)
        model = nn.Linear(10, 2)
        model, optimizer, _ = make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(toy_problem(), batch_size=50),
            method="fixed",
            noise_multiplier=1.0,
            delta=1e-5,
            seed=0,
            loss_reduction=reduction,
        )
        features, labels = toy_problem().tensors
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(features[:30]), labels[:30], reduction=reduction).backward()
        optimizer.pre_step()
        grads.append(model._module.weight.grad.clone())
    torch.testing.assert_close(grads[1], 50 * grads[0])


def test_optimizer_over_foreign_parameters_is_rejected():
    model = nn.Linear(10, 2)
    with pytest.raises(ValueError, match=r"module\.parameters"):
        make_private(
            module=model,
            optimizer=torch.optim.SGD(nn.Linear(10, 2).parameters(), lr=0.1),
            data_loader=DataLoader(toy_problem(), batch_size=50),
            noise_multiplier=1.0,
            delta=1e-5,
        )


def test_step_without_backward_names_the_problem():
    _model, optimizer, _, _ = private_setup("adaclip")
    with pytest.raises(RuntimeError, match="no per-example gradient"):
        optimizer.step()


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].releases_step])
@pytest.mark.parametrize(
    "optimizer",
    [
        lambda params: torch.optim.Adam(params, lr=0.01),
        lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
        lambda params: torch.optim.SGD(params, lr=0.01, weight_decay=1e-4),
    ],
)
def test_a_rule_releasing_an_adam_step_needs_plain_sgd(method, optimizer):
    model = nn.Linear(10, 2)
    loader = DataLoader(toy_problem(), batch_size=50)
    with pytest.raises(ValueError, match=rf"method '{method}' releases an Adam step .* plain torch.optim.SGD"):
        make_private(
            module=model,
            optimizer=optimizer(model.parameters()),
            data_loader=loader,
            method=method,
            noise_multiplier=1.0,
            delta=1e-5,
        )
    plain = torch.optim.SGD(model.parameters(), lr=0.01)
    make_private(module=model, optimizer=plain, data_loader=loader, method=method, noise_multiplier=1.0, delta=1e-5)
