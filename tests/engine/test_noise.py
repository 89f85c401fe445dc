"""Noise drawn one step ahead: exactly the numbers of one ``torch.randn`` call per step from the seeded generator.

The reference is a second generator with the same seed drawing each step's noise when the step asks for it.
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip.engine import make_private
from adaclip.engine.noise import NoiseDraws

CPU = torch.device("cpu")


def reference_draws(seed: int, sizes: list[int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=generator, dtype=torch.float64) for size in sizes]


def test_draws_made_ahead_are_the_draws_of_each_step_in_order():
    generator, draws = torch.Generator().manual_seed(7), NoiseDraws(ahead=True, min_size=1)
    got = []
    for _ in range(5):
        got.append(draws.draw(generator, 50, torch.float64, CPU))
        draws.draw_next(generator, 50, torch.float64, CPU)
    for mine, expected in zip(got, reference_draws(7, [50] * 5), strict=True):
        assert torch.equal(mine, expected)
    assert len({tuple(x.tolist()) for x in got}) == 5  # fresh every step


def test_a_draw_ahead_of_another_size_is_discarded_and_the_generator_rewound():
    generator, draws = torch.Generator().manual_seed(3), NoiseDraws(ahead=True, min_size=1)
    first = draws.draw(generator, 40, torch.float64, CPU)
    draws.draw_next(generator, 40, torch.float64, CPU)
    second = draws.draw(generator, 25, torch.float64, CPU)  # the step asks for another size
    expected = reference_draws(3, [40, 25])
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])


def test_a_draw_ahead_for_a_replaced_generator_is_discarded():
    generator, draws = torch.Generator().manual_seed(3), NoiseDraws(ahead=True, min_size=1)
    draws.draw(generator, 10, torch.float64, CPU)
    draws.draw_next(generator, 10, torch.float64, CPU)
    other = torch.Generator().manual_seed(11)
    assert torch.equal(draws.draw(other, 10, torch.float64, CPU), reference_draws(11, [10])[0])
    assert torch.equal(torch.randn(10, generator=generator, dtype=torch.float64), reference_draws(3, [10, 10])[1])


def test_the_checkpoint_state_is_the_state_before_a_pending_draw():
    generator, draws = torch.Generator().manual_seed(5), NoiseDraws(ahead=True, min_size=1)
    draws.draw(generator, 30, torch.float64, CPU)
    draws.draw_next(generator, 30, torch.float64, CPU)
    draws._pending.draw.result()  # the worker has drawn: the generator itself is past the pending draw
    resumed = torch.Generator()
    resumed.set_state(draws.generator_state(generator))
    assert torch.equal(torch.randn(30, generator=resumed, dtype=torch.float64), reference_draws(5, [30, 30])[1])
    draws.discard()  # and the generator itself is put back there
    assert torch.equal(torch.randn(30, generator=generator, dtype=torch.float64), reference_draws(5, [30, 30])[1])


def test_the_global_generator_is_never_drawn_ahead():
    draws = NoiseDraws(ahead=True, min_size=1)
    torch.manual_seed(2)
    draws.draw(None, 20, torch.float64, CPU)
    draws.draw_next(None, 20, torch.float64, CPU)
    between = torch.randn(20, dtype=torch.float64)  # other code drawing between steps
    torch.manual_seed(2)
    torch.randn(20, dtype=torch.float64)
    assert torch.equal(between, torch.randn(20, dtype=torch.float64))


@pytest.mark.parametrize("method", ["fixed", "quantile", "adaclip"])
def test_training_with_noise_drawn_ahead_equals_drawing_at_each_step(method):
    dataset = TensorDataset(torch.randn(60, 8, generator=torch.Generator().manual_seed(0)), torch.arange(60) % 3)
    trained = []
    for ahead in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
        module, optimizer, loader = make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(dataset, batch_size=12),
            method=method,
            noise_multiplier=1.0,
            delta=1e-5,
            seed=4,
        )
        optimizer.noise_draws = NoiseDraws(ahead=ahead, min_size=1)
        for _ in range(2):
            for features, labels in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(module(features), labels).backward()
                optimizer.step()
        assert (optimizer.noise_draws._pending is not None) is ahead  # the check can fail: a draw is pending
        trained.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(trained[0], trained[1])


def test_a_run_resumed_from_a_checkpoint_taken_with_a_draw_pending_draws_the_same_noise():
    dataset = TensorDataset(torch.randn(40, 5, generator=torch.Generator().manual_seed(1)), torch.arange(40) % 2)

    def setup():
        torch.manual_seed(0)
        model = nn.Linear(5, 2)
        module, optimizer, _ = make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(dataset, batch_size=10),
            method="adaclip",
            noise_multiplier=1.0,
            delta=1e-5,
            seed=9,
        )
        optimizer.noise_draws = NoiseDraws(ahead=True, min_size=1)
        return model, module, optimizer

    def steps(module, optimizer, count):
        features, labels = dataset.tensors
        for step in range(count):
            optimizer.zero_grad()
            rows = slice(10 * step, 10 * step + 10)
            nn.functional.cross_entropy(module(features[rows]), labels[rows]).backward()
            optimizer.step()

    model, module, optimizer = setup()
    steps(module, optimizer, 2)
    assert optimizer.noise_draws._pending is not None  # the checkpoint is taken with the next draw made
    checkpoint = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}
    steps(module, optimizer, 2)
    uninterrupted = torch.cat([p.detach().flatten() for p in model.parameters()])

    model, module, optimizer = setup()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    steps(module, optimizer, 2)
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), uninterrupted)
