"""Data-parallel private training over ``torch.distributed`` (one process per device, e.g. ``torchrun``).

How one private step is split across ``W`` ranks (the rules of :mod:`adaclip.methods.base` hold for the global batch):

* Poisson sampling is sharded: rank ``r`` owns the examples ``r, r + W, r + 2W, ...`` and puts each
  into each step's batch independently with probability ``q`` (:class:`adaclip.engine.sampling.PoissonBatchSampler`,
  one generator per rank), so the union over ranks is one Poisson batch of the whole dataset at rate ``q``.
* Each rank clips its own examples with the *same* rule state (:meth:`adaclip.methods.base.ClipRule.clipped_sum`);
  the clipped sums and counts are additive, so one ``all_reduce(SUM)`` (:func:`all_reduce_clipped_sum`)
  gives every rank the global sum.
* Every rank then draws the *same* standard-normal noise (one generator, seeded identically on every
  rank: :func:`shared_seed`) and runs the rule's ``release``: the noise enters the global sum exactly
  once, with the single-process variance, the normaliser is the global expected batch size ``B``,
  and the adaptive state (AdaCliP's ``a, v, b``; the quantile rule's ``C`` from its noisy count;
  GeoClip's ``a, Sigma``) is computed from identical released values, so it is identical on every rank.
  :func:`check_replicas` asserts this in debug mode.

The privacy accounting is the single-process one for the same global ``(sigma, q, T)``: the released
values are exactly those of one process sampling at rate ``q`` from all ``N`` examples.

Opacus's own ``DistributedDPOptimizer`` adds noise on rank 0 and all-reduces each parameter's
gradient; it has no place for the counts and state of adaptive rules, and Opacus's
``DistributedUniformWithReplacementSampler`` skips empty local batches (the ranks would then take
different numbers of steps), hence this module.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from adaclip.methods.base import ClippedSum


class ReplicaDivergence(RuntimeError):
    """Ranks that should hold identical values (adaptive state, update, parameters) do not."""


def is_initialized() -> bool:
    """Whether this process is in an initialised default ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default process group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if is_initialized() else 0


def launched_with_several_processes() -> bool:
    """Whether a launcher such as ``torchrun`` started this process as one of several (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_from_environment() -> int:
    """The rank a launcher such as ``torchrun`` gave this process (``RANK``; 0 when not launched by one)."""
    return int(os.environ.get("RANK", "0"))


def init_from_environment(device: str) -> None:
    """Join the process group that ``torchrun`` describes in the environment.

    The backend is NCCL for CUDA and gloo for CPU.  With ``device="cuda"`` each rank makes
    ``cuda:LOCAL_RANK`` its current device (the trainer then runs there; it refuses ``cuda:i``).
    """
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")


def destroy() -> None:
    """Leave the default process group (after :func:`init_from_environment`)."""
    dist.destroy_process_group()


def all_reduce_clipped_sum(clipped: ClippedSum) -> ClippedSum:
    """The global :class:`~adaclip.methods.base.ClippedSum`.

    ``all_reduce(SUM)`` of the vector and of the (float64) counts.
    """
    vector, counts = clipped.vector.clone(), clipped.counts.clone()
    dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return ClippedSum(vector=vector, counts=counts)


def check_same_noise(generator: torch.Generator, size: int, dtype: torch.dtype, device: torch.device | str) -> None:
    """Raise ``ValueError`` on every rank unless every rank's ``generator`` draws the same ``size`` normals next.

    The noise must enter the all-reduced sum once, which needs identical draws on every rank: ranks
    given different seeds, or GPUs of different models (CUDA's ``randn`` depends on the device's
    multiprocessor count), would each add their own.  Draws one probe and restores the generator.
    """
    state = generator.get_state()
    probe = torch.randn(size, generator=generator, dtype=dtype, device=device).double()
    generator.set_state(state)
    checksum = torch.stack([probe.sum(), probe.square().sum()])
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise ValueError(
            "the ranks' noise generators draw different noise: pass the same seed on every rank (or none, and rank 0's "
            "is broadcast) and run every rank on the same kind of device (CUDA's randn differs between GPU models)"
        )


def all_reduce_sums(values: list[float], device: torch.device | str) -> list[float]:
    """Sum a few Python numbers over ranks (evaluation totals, loss sums); float64 on ``device``."""
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals.tolist()


def shared_seed(seed: int | None, device: torch.device | str) -> int:
    """The seed every rank uses: ``seed`` if every rank passed the same one; a fresh random seed from rank 0,
    broadcast, if none did; ``ValueError`` on every rank otherwise."""
    local = -1 if seed is None else seed
    low = torch.tensor([local], dtype=torch.int64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if int(low.item()) != int(high.item()):
        raise ValueError(
            f"seed differs across ranks (here rank {rank()}: {seed}); pass the same seed on every rank, or none"
        )
    if seed is not None:
        return seed
    drawn = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    value = torch.tensor([drawn if rank() == 0 else 0], dtype=torch.int64, device=device)
    dist.broadcast(value, src=0)
    return int(value.item())


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank, so that all replicas start identical."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


def state_tensors(state: Any) -> dict[str, Tensor]:
    """The tensors (and numbers, as float64 tensors) of a rule state dataclass, by field name."""
    if state is None:
        return {}
    tensors = {}
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        tensors[field.name] = value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
    return tensors


def assert_replicas_equal(named: dict[str, Tensor], device: torch.device | str) -> None:
    """Raise :class:`ReplicaDivergence` on every rank unless every tensor equals rank 0's bit for bit (a collective).

    Costs one broadcast per tensor: for debugging (``make_private(..., check_replicas=True)``).
    """
    differing = []
    for name, tensor in named.items():
        local = tensor.detach().to(device)
        reference = local.clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(reference, local):
            differing.append(name)
    flags = torch.zeros(world_size(), dtype=torch.int64, device=device)
    flags[rank()] = len(differing)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    if int(flags.sum()):
        ranks = [r for r, count in enumerate(flags.tolist()) if count]
        mine = f"; here (rank {rank()}): {differing}" if differing else ""
        raise ReplicaDivergence(
            f"replicas diverged from rank 0 on rank(s) {ranks}{mine}. Every rank must use the same seed, rule "
            "parameters and model, and draw its noise from the optimizer's own generator."
        )
