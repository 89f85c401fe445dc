"""make_private's loaders are torch DataLoaders: tools that take one work, sampling and empty batches stay."""

import pytest
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from adaclip import make_private
from adaclip.engine.sampling import (
    BatchedTensorDataset,
    PoissonBatchSampler,
    PoissonDataLoader,
    TensorPoissonLoader,
)

N = 100


class Items(Dataset):
    """A map-style dataset that is not a TensorDataset: examples come one ``__getitem__`` at a time."""

    def __init__(self, n: int = N) -> None:
        self.x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row i is (i, i, i)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index], int(index) % 2


def indexed_tensors(n: int = N) -> TensorDataset:
    return TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3), torch.arange(n) % 2)


def private_loader(dataset, batch_size: int = 10, seed: int = 0, **loader_options):
    model = nn.Linear(3, 2)
    return make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset, batch_size=batch_size, **loader_options),
        method="fixed",
        noise_multiplier=1.0,
        delta=1e-3,
        seed=seed,
    )


@pytest.mark.parametrize("dataset, kind", [(indexed_tensors(), TensorPoissonLoader), (Items(), PoissonDataLoader)])
def test_make_private_returns_a_dataloader_with_a_poisson_batch_sampler(dataset, kind):
    _, optimizer, loader = private_loader(dataset)
    assert type(loader) is kind and isinstance(loader, DataLoader)
    assert isinstance(loader.batch_sampler, PoissonBatchSampler) and loader.batch_size is None
    assert loader.num_workers == 0 and len(loader) == 10 and loader.sample_rate == 0.1
    assert loader.batch_sampler.generator is not None  # the sampling's whole state, e.g. for a checkpoint
    rows = [x[:, 0].long() for x, _ in loader]
    assert len(rows) == 10 and all(torch.all(r[1:] > r[:-1]) for r in rows)  # Poisson batches: distinct examples
    assert optimizer.steps_taken == 0


def test_the_tensor_loader_gathers_batches_without_getitem():
    class NoItemAccess(TensorDataset):
        def __getitem__(self, index):
            raise AssertionError("the in-memory loader must gather whole batches")

    x, y = indexed_tensors().tensors
    loader = TensorPoissonLoader(NoItemAccess(x, y), 0.2, generator=torch.Generator().manual_seed(0))
    assert isinstance(loader.dataset, BatchedTensorDataset) and loader.dataset.tensors[0] is x  # shared, not copied
    for features, labels in loader:
        torch.testing.assert_close(labels, features[:, 0].long() % 2)


@pytest.mark.parametrize("dataset", [indexed_tensors(), Items()], ids=["tensors", "items"])
def test_batch_memory_manager_splits_each_logical_batch_into_physical_ones(dataset):
    """The physical batches of one logical batch are exactly that batch (same seed, same sampling)."""
    _, _, loader = private_loader(dataset, batch_size=30)
    logical = [x[:, 0].long() for x, _ in loader]
    _, optimizer, loader = private_loader(dataset, batch_size=30)
    physical, current = [], []
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=8, optimizer=optimizer) as split:
        assert isinstance(split, DataLoader)
        for x, _ in split:
            assert len(x) <= 8
            current.append(x[:, 0].long())
            if not optimizer._check_skip_next_step(pop_next=False):  # the logical batch ends here
                physical.append(torch.cat(current))
                current = []
            optimizer._check_skip_next_step()  # consume the signal (no step in this test)
    assert len(physical) == len(logical) == 3
    assert all(torch.equal(p, q) for p, q in zip(physical, logical, strict=True))


def test_empty_batches_are_empty_tensors_of_the_right_shape():
    for dataset in (indexed_tensors(), Items()):
        _, _, loader = private_loader(dataset, batch_size=1, seed=2)  # rate 1/100: most batches are empty
        shapes = {(tuple(x.shape), tuple(y.shape)) for x, y in loader}
        assert ((0, 3), (0,)) in shapes and all(x[1:] == (3,) and y == x[:1] for x, y in shapes)


def test_worker_processes_give_the_same_batches():
    batches = []
    for workers in (0, 2):
        _, _, loader = private_loader(Items(), batch_size=20, seed=3, num_workers=workers)
        assert loader.num_workers == workers
        batches.append([x[:, 0].long() for x, _ in loader])
    assert all(torch.equal(a, b) for a, b in zip(*batches, strict=True))


def test_restoring_the_generator_replays_the_sampling():
    _, _, loader = private_loader(indexed_tensors())
    generator = loader.batch_sampler.generator
    state = generator.get_state()
    first = [x[:, 0].long() for x, _ in loader]
    generator.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(first, [x[:, 0].long() for x, _ in loader], strict=True))


def test_ranks_sample_their_own_shares():
    for rank in range(3):
        loader = PoissonDataLoader(
            Items(), 0.3, generator=torch.Generator().manual_seed(rank), rank=rank, world_size=3, collate_fn=None
        )
        rows = torch.cat([x[:, 0] for x, _ in loader]).long()  # the default collate (no batch is empty here)
        assert len(loader) == 3 and torch.all(rows % 3 == rank)


def test_a_dataset_without_a_length_is_refused():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(3)

    with pytest.raises(ValueError, match="must have a length"):
        PoissonDataLoader(Stream(), 0.1)
