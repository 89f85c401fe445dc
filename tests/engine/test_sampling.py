"""In-memory Poisson sampling: the distribution of batches, determinism, and the loader make_private picks."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from adaclip.engine import make_private
from adaclip.engine.sampling import (
    PoissonBatchSampler,
    PoissonDataLoader,
    TensorPoissonLoader,
    gather_rows,
    poisson_epoch,
)

N, Q, STEPS = 200, 0.1, 3000


@pytest.fixture(scope="module")
def batches():
    return poisson_epoch(N, Q, STEPS, torch.Generator().manual_seed(0))


def test_batch_sizes_are_binomial(batches):
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    mean, variance = N * Q, N * Q * (1 - Q)  # Binomial(200, 0.1): 20 and 18
    # standard error of the mean over 3000 steps: sqrt(18 / 3000) = 0.077;
    # of the variance about 18 sqrt(2 / 3000) = 0.46
    assert abs(sizes.mean().item() - mean) < 5 * (variance / STEPS) ** 0.5
    assert abs(sizes.var().item() - variance) < 5 * variance * (2 / STEPS) ** 0.5


def test_every_example_is_included_at_rate_q(batches):
    counts = torch.zeros(N)
    for b in batches:
        counts[b] += 1
    expected, variance = STEPS * Q, STEPS * Q * (1 - Q)
    chi_square = ((counts - expected).square() / variance).sum().item()
    # chi-square with about N = 200 degrees of freedom: mean 200, standard deviation 20
    assert abs(chi_square - N) < 5 * (2 * N) ** 0.5


def test_inclusions_are_independent_across_examples_and_steps(batches):
    member = torch.zeros(STEPS, N)
    for step, b in enumerate(batches):
        member[step, b] = 1
    # P(example 0 and example 1 together) = q^2 = 0.01; standard error sqrt(0.01 * 0.99 / 3000) = 0.0018
    assert abs((member[:, 0] * member[:, 1]).mean().item() - Q**2) < 5 * (Q**2 * (1 - Q**2) / STEPS) ** 0.5
    # consecutive steps: correlation of membership over all 599,800 pairs, standard error about 0.0013
    correlation = torch.corrcoef(torch.stack([member[:-1].flatten(), member[1:].flatten()]))[0, 1].item()
    assert abs(correlation) < 5 / (N * (STEPS - 1)) ** 0.5


def test_batches_are_sorted_unique_and_in_range(batches):
    for b in batches:
        assert b.dtype == torch.int64
        assert torch.all(b[1:] > b[:-1]) and (len(b) == 0 or (b[0] >= 0 and b[-1] < N))


def test_seeded_and_rate_one_edge_case():
    first = poisson_epoch(50, 0.2, 10, torch.Generator().manual_seed(5))
    again = poisson_epoch(50, 0.2, 10, torch.Generator().manual_seed(5))
    other = poisson_epoch(50, 0.2, 10, torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert all(torch.equal(b, torch.arange(7)) for b in poisson_epoch(7, 1.0, 3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_examples=0, sample_rate=0.1, steps=1), "num_examples"),
        (dict(num_examples=10, sample_rate=0.0, steps=1), "sample_rate"),
        (dict(num_examples=10, sample_rate=1.5, steps=1), "sample_rate"),
        (dict(num_examples=10, sample_rate=0.1, steps=0), "steps"),
        (dict(num_examples=10, sample_rate=True, steps=1), "sample_rate"),
        (dict(num_examples=True, sample_rate=0.1, steps=1), "num_examples"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        poisson_epoch(**kwargs)


def test_numpy_scalars_are_numbers_like_everywhere_else():
    """``_validate``'s rule: NumPy scalars are numbers (a rate of ``B / N`` computed in NumPy is a ``float32``)."""
    expected = poisson_epoch(50, 0.25, 4, torch.Generator().manual_seed(3))
    got = poisson_epoch(np.int64(50), np.float32(0.25), np.int32(4), torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    sampler = PoissonBatchSampler(np.int64(50), np.float32(0.25), rank=np.int64(1), world_size=2)
    assert sampler.sample_rate == 0.25 and type(sampler.num_examples) is int and len(sampler) == 4
    with pytest.raises(ValueError, match="rank must be below world_size=2"):
        PoissonBatchSampler(50, 0.25, rank=2, world_size=2)


class NoItemAccess(TensorDataset):
    def __getitem__(self, index):
        raise AssertionError("the in-memory sampler must not call __getitem__")


def test_loader_yields_matching_rows_without_getitem():
    features = torch.arange(40.0).view(20, 2)
    labels = torch.arange(20)
    loader = TensorPoissonLoader(NoItemAccess(features, labels), 0.05, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 20
    batches = list(loader)
    assert len(batches) == 20
    for x, y in batches:
        torch.testing.assert_close(x, features[y])
        assert x.shape[1:] == (2,)
    assert any(
        len(y) == 0 for _, y in batches
    )  # seeded: at rate 0.05 a batch of 20 examples is empty with probability 0.36
    with pytest.raises(TypeError, match="TensorDataset"):
        TensorPoissonLoader(features, 0.1)


class ListDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.items = [(torch.randn(3), 0) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


@pytest.mark.parametrize(
    "dataset, expected",
    [
        (TensorDataset(torch.randn(100, 3), torch.zeros(100, dtype=torch.long)), TensorPoissonLoader),
        (ListDataset(100), PoissonDataLoader),
    ],
)
def test_make_private_samples_tensors_in_memory(dataset, expected):
    model = nn.Linear(3, 2)
    _, _, loader = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset, batch_size=10),
        method="fixed",
        noise_multiplier=1.0,
        delta=1e-3,
        seed=0,
    )
    assert type(loader) is expected and isinstance(loader, DataLoader) and len(loader) == 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.bfloat16, torch.bool])
def test_gather_rows_equals_index_select(dtype):
    tensor = (torch.randn(50, 3, 4) * 10).to(dtype)
    for indices in (torch.tensor([0, 3, 3, 49]), torch.tensor([], dtype=torch.int64)):
        gathered = gather_rows(tensor, indices)
        assert gathered.dtype == dtype and gathered.shape == (len(indices), 3, 4)
        assert torch.equal(gathered, tensor.index_select(0, indices))
    before = tensor.clone()
    gather_rows(tensor, torch.tensor([1])).fill_(1)  # a copy: writing to it leaves the dataset untouched
    assert torch.equal(tensor, before)
