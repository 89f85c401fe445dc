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

Checkpoints: an epoch's batches are drawn when its iteration starts, so the sampling generator's
state between epochs fixes every later batch.  :func:`loader_state_dict` and
:func:`load_loader_state_dict` save and restore it for every loader ``make_private`` returns
(:class:`TensorPoissonLoader`, a ``DataLoader`` over a :class:`PoissonBatchSampler`, Opacus's
``DPDataLoader``); save at the end of an epoch.  Without a seed (``generator=None``) batches come from
torch's global generator, which these do not restore.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset


def poisson_epoch(
    num_examples: int, sample_rate: float, steps: int, generator: torch.Generator | None = None
) -> list[Tensor]:
    """Indices of each of ``steps`` Poisson batches over ``num_examples`` examples at rate ``sample_rate``.

    Every example is in every batch independently with probability ``sample_rate``; indices within
    a batch are increasing.  Deterministic for a seeded (CPU) ``generator``.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be an int >= 1, got {num_examples!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
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
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < world_size:
            raise ValueError(
                f"num_examples must be an int >= world_size={world_size} (every rank needs an example), "
                f"got {num_examples!r}"
            )
        if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
        self.num_examples, self.sample_rate, self.generator = num_examples, float(sample_rate), generator
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = int(1 / self.sample_rate)

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
            yield indices.tolist()

    def state_dict(self) -> dict[str, Any]:
        """The sampling generator's state and the setting it samples (restore it between epochs)."""
        return _sampler_state(self, self.num_examples)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the setting must match)."""
        _load_sampler_state(self, state, self.num_examples)


class TensorPoissonLoader:
    """Poisson-sampled batches of a ``TensorDataset``, ``int(1 / q)`` steps per epoch (as Opacus's ``DPDataLoader``).

    Iterating gives, per step, a list with one tensor per dataset tensor (empty tensors, with the
    right trailing shape, for an empty batch), like a ``DataLoader`` with the default collate.

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
        self.dataset = dataset
        self.batch_sampler = PoissonBatchSampler(
            len(dataset), sample_rate, generator=generator, rank=rank, world_size=world_size
        )

    @property
    def sample_rate(self) -> float:
        """The Poisson rate ``q`` (as Opacus's ``DPDataLoader.sample_rate``)."""
        return self.batch_sampler.sample_rate

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[Tensor]]:
        tensors = self.dataset.tensors
        for indices in self.batch_sampler.epoch():
            yield [gather_rows(t, indices) for t in tensors]

    def state_dict(self) -> dict[str, Any]:
        """The sampling state (see :meth:`PoissonBatchSampler.state_dict`)."""
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)


def _sampler_state(sampler: Any, num_examples: int) -> dict[str, Any]:
    generator = sampler.generator
    return {
        "num_examples": num_examples,
        "sample_rate": float(sampler.sample_rate),
        "generator": None if generator is None else generator.get_state(),
    }


def _load_sampler_state(sampler: Any, state: dict[str, Any], num_examples: int) -> None:
    own = _sampler_state(sampler, num_examples)
    for key in ("num_examples", "sample_rate"):
        if state.get(key) != own[key]:
            raise ValueError(f"the saved sampling state has {key}={state.get(key)!r}, this loader {own[key]!r}")
    if (state["generator"] is None) != (sampler.generator is None):
        raise ValueError("the saved sampling state and this loader disagree on a seeded generator: seed both")
    if sampler.generator is not None:
        sampler.generator.set_state(state["generator"])


def _sampler_of(loader: TensorPoissonLoader | DataLoader[Any]) -> tuple[Any, int]:
    """The Poisson batch sampler of a loader ``make_private`` returns, and the dataset size it samples."""
    if isinstance(loader, TensorPoissonLoader):
        return loader.batch_sampler, loader.batch_sampler.num_examples
    sampler = loader.batch_sampler
    if isinstance(sampler, PoissonBatchSampler):
        return sampler, sampler.num_examples
    num_samples = getattr(sampler, "num_samples", None)  # Opacus's UniformWithReplacementSampler (DPDataLoader)
    if hasattr(sampler, "generator") and hasattr(sampler, "sample_rate") and isinstance(num_samples, int):
        return sampler, num_samples
    raise ValueError(
        f"loader must be a Poisson-sampling loader returned by make_private, got {type(loader).__name__} with batch "
        f"sampler {type(sampler).__name__}"
    )


def loader_state_dict(loader: TensorPoissonLoader | DataLoader[Any]) -> dict[str, Any]:
    """The sampling state of a loader returned by ``make_private``, for a checkpoint between epochs."""
    sampler, num_examples = _sampler_of(loader)
    return _sampler_state(sampler, num_examples)


def load_loader_state_dict(loader: TensorPoissonLoader | DataLoader[Any], state: dict[str, Any]) -> None:
    """Restore :func:`loader_state_dict`'s output into a loader for the same dataset and rate."""
    sampler, num_examples = _sampler_of(loader)
    _load_sampler_state(sampler, state, num_examples)


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
