"""Models the caller wrapped for data parallelism: ``DistributedDataParallel``, Opacus's ``DPDDP``, FSDP.

Opacus infers distributed training from the model's wrapper: ``PrivacyEngine.make_private`` on a model
wrapped in ``torch.nn.parallel.DistributedDataParallel`` or ``opacus.distributed.DPDDP`` all-reduces
the clipped, noised gradients.  :func:`adaclip.make_private` does the same with its own data-parallel
mode (``distributed=True``, :mod:`adaclip.engine.distributed`): a model in either wrapper is unwrapped
and made private in that mode, so that no rank trains on its own.  The wrapper itself takes no part:
its forward pass is never called, so DDP's gradient all-reduce (which the clipped sums replace) does
not run; rank 0's parameters are broadcast to every rank, as both wrappers do.

Refused with the fix, in one line each: a sharded model (FSDP; every rank needs a full replica to
clip whole per-example gradients), a wrapper nested inside the model (it would all-reduce
unclipped gradients), and, in data-parallel mode, a loader with a ``DistributedSampler``: adaclip's
``batch_size`` is the *global* expected batch size and each rank Poisson-samples its own share of the
whole dataset, whereas a ``DistributedSampler`` would make it a per-rank size (Opacus's sampling rate
``1 / len(data_loader)`` then grows with the number of ranks).
"""

from __future__ import annotations

from typing import Any

from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from adaclip.engine import distributed as dist_utils

REPLICATING_WRAPPERS: tuple[type[nn.Module], ...] = (DistributedDataParallel, DPDDP)
"""Wrappers that keep a full replica of the model on every rank: unwrapped, and data-parallel mode used."""
SHARDING_WRAPPERS: tuple[type[Any], ...] = (FullyShardedDataParallel, FSDPModule)
"""Wrappers that shard the parameters over the ranks: refused."""


def resolve_data_parallel(module: nn.Module, data_loader: DataLoader[Any], distributed: bool) -> tuple[nn.Module, bool]:
    """The module to make private and whether to use data-parallel mode (see the module docstring).

    A model in a :data:`REPLICATING_WRAPPERS` wrapper gives its inner module and ``True``; any other
    model is returned as it is with ``distributed``.  Raises ``ValueError`` for what cannot be trained
    privately across ranks.
    """
    sharded = [name or "module" for name, layer in module.named_modules() if isinstance(layer, SHARDING_WRAPPERS)]
    if sharded:
        raise ValueError(
            f"module is sharded with FSDP ({sharded[0]}): per-example clipping needs the whole model on every rank; "
            "pass the unwrapped model with distributed=True (adaclip's data-parallel mode keeps a replica per rank)"
        )
    wrapped = isinstance(module, REPLICATING_WRAPPERS)
    inner = module.get_submodule("module") if wrapped else module
    nested = [name for name, layer in inner.named_modules() if isinstance(layer, REPLICATING_WRAPPERS)]
    if nested:
        raise ValueError(
            f"module holds a {type(inner.get_submodule(nested[0])).__name__} at {nested[0]!r}, which would all-reduce "
            "unclipped gradients: wrap the whole model instead, or pass it unwrapped with distributed=True"
        )
    if wrapped and not dist_utils.is_initialized():
        raise ValueError(
            f"module is wrapped in {type(module).__name__} but no torch.distributed process group is initialised: "
            "call torch.distributed.init_process_group first"
        )
    distributed = distributed or wrapped
    if distributed and isinstance(data_loader.sampler, DistributedSampler):
        raise ValueError(
            "data_loader samples with a DistributedSampler, which makes batch_size a per-rank size: in data-parallel "
            "mode give a DataLoader over the whole dataset whose batch_size is the global expected batch size "
            "(each rank Poisson-samples its own share)"
        )
    return inner, distributed
