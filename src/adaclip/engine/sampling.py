"""Poisson sampling of in-memory tensors, without per-example ``Dataset.__getitem__`` calls.

Poisson sampling puts every example into every step's batch independently with
probability ``q``.  Over one epoch of ``T`` steps that is a Bernoulli(``q``) process over the
``T * N`` cells ``(step, example)``, and a Bernoulli process is equivalently described by its gaps,
which are i.i.d. Geometric(``q``) (trials up to and including the next success).  So one epoch
needs only about ``T * N * q = T * B`` geometric draws (one vectorised call), a cumulative sum and a
split by step, instead of ``T * N`` uniforms or ``N`` ``__getitem__`` calls per step; each batch
is then one ``index_select`` per tensor.

For data-parallel training each of ``W`` ranks samples only the examples it owns (``r, r + W, ...``)
at the same rate ``q`` with its own generator: the ranks' batches together are one Poisson batch
of all ``N`` examples.  Every rank takes every step, empty local batches included, so the ranks'
collectives stay in step (Opacus's distributed sampler skips empty batches).

Both loaders are ``torch.utils.data.DataLoader`` s with a :class:`PoissonBatchSampler` as their
``batch_sampler``: :class:`PoissonDataLoader` for any map-style dataset, :class:`TensorPoissonLoader`
for a ``TensorDataset``, whose batches are gathered in one call per tensor (``__getitems__``).

Checkpoints: an epoch's batches are drawn when its iteration starts, so the sampling generator's
state between epochs fixes every later batch.  :func:`loader_state_dict` and
:func:`load_loader_state_dict` save and restore it for every loader ``make_private`` returns; save at
the end of an epoch.  Without a seed (``generator=None``) batches come from torch's global generator,
which these do not restore.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from adaclip._validate import require_int, require_rate


def poisson_epoch(
    num_examples: int, sample_rate: float, steps: int, generator: torch.Generator | None = None
) -> list[Tensor]:
    """Indices of each of ``steps`` Poisson batches over ``num_examples`` examples at rate ``sample_rate``.

    Every example is in every batch independently with probability ``sample_rate``; indices within
    a batch are increasing.  Deterministic for a seeded (CPU) ``generator``.
    """
    num_examples = require_int("num_examples", num_examples)
    steps = require_int("steps", steps)
    sample_rate = require_rate("sample_rate", sample_rate)
    if sample_rate == 1:
        return [torch.arange(num_examples) for _ in range(steps)]
    cells = steps * num_examples
    expected = cells * sample_rate
    chunk = int(expected + 6 * math.sqrt(expected) + 16)  # almost always enough in one draw
    found, last = [], -1
    while last < cells - 1:  # positions past the last cell are dropped below
        gaps = torch.empty(chunk, dtype=torch.float64).geometric_(sample_rate, generator=generator)
        positions = last + gaps.to(torch.int64).cumsum(0)
        found.append(positions)
        last = int(positions[-1])
    positions = torch.cat(found)
    positions = positions[positions < cells]
    step_of = torch.div(positions, num_examples, rounding_mode="floor")
    bounds = torch.searchsorted(step_of, torch.arange(steps + 1)).tolist()
    examples = positions - step_of * num_examples
    return [examples[bounds[s] : bounds[s + 1]] for s in range(steps)]


class PoissonBatchSampler(Sampler[list[int]]):
    """Batch sampler: ``int(1 / q)`` Poisson batches per epoch of one rank's share of ``num_examples`` examples.

    Rank ``rank`` of ``world_size`` owns the examples ``rank, rank + world_size, ...``; each is in each
    step's batch independently with probability ``sample_rate``.  With ``world_size=1`` it is plain
    Poisson sampling of all examples.  Empty batches are yielded (every rank takes every step).

    Args:
        num_examples: the size ``N`` of the whole dataset.
        sample_rate: the Poisson rate ``q = B / N`` (``B`` the global expected batch size).
        generator: a CPU ``torch.Generator``, independent per rank (``None``: torch's global RNG).
        rank, world_size: this rank and the number of ranks.
    """

    def __init__(
        self,
        num_examples: int,
        sample_rate: float,
        *,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        world_size = require_int("world_size", world_size)
        rank = require_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank must be below world_size={world_size}, got {rank!r}")
        num_examples = require_int(
            f"num_examples (at least world_size={world_size}: every rank needs an example)",
            num_examples,
            minimum=world_size,
        )
        self.num_examples, self.sample_rate, self.generator = (
            num_examples,
            require_rate("sample_rate", sample_rate),
            generator,
        )
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = int(1 / self.sample_rate)
        self.before_batch: Callable[[], None] | None = None
        """Called before each batch is handed out (``make_private`` sets the optimizer's
        :meth:`~adaclip.engine.optimizer.AdaptiveClipDPOptimizer.begin_logical_batch`)."""

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self) -> list[Tensor]:
        """One epoch's batches, as index tensors into the whole dataset."""
        owned = len(range(self.rank, self.num_examples, self.world_size))
        local = poisson_epoch(owned, self.sample_rate, self.steps_per_epoch, self.generator)
        if self.world_size == 1:
            return local
        return [indices.mul_(self.world_size).add_(self.rank) for indices in local]

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.epoch():
            if self.before_batch is not None:
                self.before_batch()
            yield indices.tolist()

    def state_dict(self) -> dict[str, Any]:
        """The sampling generator's state and the setting it samples (restore it between epochs)."""
        return _sampler_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the setting must match)."""
        _load_sampler_state(self, state)


class PoissonDataLoader(DataLoader[Any]):
    """A ``torch.utils.data.DataLoader`` whose ``batch_sampler`` is a :class:`PoissonBatchSampler`.

    ``int(1 / q)`` Poisson batches per epoch, empty ones included.  Being a real ``DataLoader``, it works
    with every tool that takes one; those that build their own loader from its ``dataset``,
    ``batch_sampler`` and ``collate_fn`` (``opacus.utils.batch_memory_manager.BatchMemoryManager``)
    keep its sampling, and its batch sampler's ``generator`` is the sampling's whole state.

    Args:
        dataset: a map-style dataset of all ``N`` examples.
        sample_rate: the Poisson rate ``q = B / N``.
        generator: a CPU ``torch.Generator`` for the sampling (``None``: torch's global RNG).
        rank, world_size: for data-parallel training, this rank samples only its share (see
            :class:`PoissonBatchSampler`).
        collate_fn: as for ``DataLoader``; it must accept an empty list (``make_private`` wraps the
            user's with Opacus's ``wrap_collate_with_empty``).
        **options: further ``DataLoader`` arguments (``num_workers``, ``pin_memory``, ...).
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        sample_rate: float,
        *,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(dataset, Sized):
            raise ValueError(
                "dataset must have a length (a map-style Dataset): Poisson sampling draws from all N examples"
            )
        self.poisson_sampler = PoissonBatchSampler(
            len(dataset), sample_rate, generator=generator, rank=rank, world_size=world_size
        )
        super().__init__(dataset, batch_sampler=self.poisson_sampler, collate_fn=collate_fn, **options)

    @property
    def sample_rate(self) -> float:
        """The Poisson rate ``q`` (as Opacus's ``DPDataLoader.sample_rate``)."""
        return self.poisson_sampler.sample_rate


class BatchedTensorDataset(TensorDataset):
    """A ``TensorDataset`` that hands out a whole batch in one ``__getitems__`` call (one gather per tensor).

    A ``DataLoader`` calls ``dataset.__getitems__(indices)`` when the dataset has it, instead of one
    ``__getitem__`` per example; with :func:`collate_gathered` the gathered rows are the batch.
    """

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        """The rows ``indices`` of every tensor (:func:`gather_rows`); empty tensors for no indices."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return [gather_rows(t, index) for t in self.tensors]


def collate_gathered(batch: list[Tensor]) -> list[Tensor]:
    """The collate function for :class:`BatchedTensorDataset`: its gathered tensors are already the batch."""
    return batch


class TensorPoissonLoader(PoissonDataLoader):
    """Poisson-sampled batches of a ``TensorDataset`` gathered in memory, ``int(1 / q)`` steps per epoch.

    A :class:`PoissonDataLoader` over a :class:`BatchedTensorDataset` sharing the dataset's tensors: each
    batch is one gather per tensor, never a ``Dataset.__getitem__`` call per example.  Iterating gives,
    per step, a list with one tensor per dataset tensor (empty tensors, with the right trailing shape,
    for an empty batch), like a ``DataLoader`` with the default collate.

    Args:
        dataset: the in-memory data.
        sample_rate: the Poisson rate ``q = B / N``.
        generator: a CPU ``torch.Generator`` for the sampling (``None``: torch's global RNG).
        rank, world_size: for data-parallel training, this rank samples only its share (see
            :class:`PoissonBatchSampler`).
    """

    def __init__(
        self,
        dataset: TensorDataset,
        sample_rate: float,
        *,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(dataset, TensorDataset):
            raise TypeError(f"dataset must be a torch TensorDataset, got {type(dataset).__name__}")
        super().__init__(
            BatchedTensorDataset(*dataset.tensors),
            sample_rate,
            generator=generator,
            rank=rank,
            world_size=world_size,
            collate_fn=collate_gathered,
        )


def _sampler_state(sampler: PoissonBatchSampler) -> dict[str, Any]:
    generator = sampler.generator
    return {
        "num_examples": sampler.num_examples,
        "sample_rate": float(sampler.sample_rate),
        "generator": None if generator is None else generator.get_state(),
    }


def _load_sampler_state(sampler: PoissonBatchSampler, state: dict[str, Any]) -> None:
    own = _sampler_state(sampler)
    for key in ("num_examples", "sample_rate"):
        if state.get(key) != own[key]:
            raise ValueError(f"the saved sampling state has {key}={state.get(key)!r}, this loader {own[key]!r}")
    if (state["generator"] is None) != (sampler.generator is None):
        raise ValueError("the saved sampling state and this loader disagree on a seeded generator: seed both")
    if sampler.generator is not None:
        sampler.generator.set_state(state["generator"])


def _sampler_of(loader: DataLoader[Any]) -> PoissonBatchSampler:
    """The Poisson batch sampler of a loader ``make_private`` returns."""
    sampler = loader.batch_sampler
    if isinstance(sampler, PoissonBatchSampler):
        return sampler
    raise ValueError(
        f"loader must be a Poisson-sampling loader returned by make_private, got {type(loader).__name__} with batch "
        f"sampler {type(sampler).__name__}"
    )


def loader_state_dict(loader: DataLoader[Any]) -> dict[str, Any]:
    """The sampling state of a loader returned by ``make_private``, for a checkpoint between epochs."""
    return _sampler_state(_sampler_of(loader))


def load_loader_state_dict(loader: DataLoader[Any], state: dict[str, Any]) -> None:
    """Restore :func:`loader_state_dict`'s output into a loader for the same dataset and rate."""
    _load_sampler_state(_sampler_of(loader), state)


_NUMPY_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)


def gather_rows(tensor: Tensor, indices: Tensor) -> Tensor:
    """``tensor[indices]`` along dimension 0, as a new tensor.

    On the CPU this goes through ``numpy.take``: NumPy backs large new arrays with huge pages, so the
    gather does not stall on a page fault per 4 KiB of a freshly allocated batch (a 130 MB batch of
    ScatterNet features gathers several times faster than with ``index_select``).  Elsewhere, and for
    dtypes NumPy lacks (bfloat16), ``index_select``.
    """
    if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_DTYPES and not tensor.requires_grad:
        return torch.from_numpy(np.take(tensor.numpy(), indices.numpy(), axis=0))
    return tensor.index_select(0, indices.to(tensor.device))
