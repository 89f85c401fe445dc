"""A model wrapped in ``DistributedDataParallel`` or Opacus's ``DPDDP`` trains in adaclip's data-parallel mode.

Two gloo processes (the pattern of ``test_distributed.py``): a wrapped model given to ``PrivacyEngine`` (as an
Opacus user does, without ``distributed=True``) must take exactly the steps of the unwrapped model with
``distributed=True``, with replicas checked equal at every step; what cannot be trained across ranks is refused.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from adaclip import PrivacyEngine, make_private
from adaclip.privacy.accounting import epsilon

WORLD, N, BATCH = 2, 16, 4


def _entry(rank, worker, init_file):
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        worker(rank)
    finally:
        dist.destroy_process_group()


def _data():
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(N, 5, generator=generator), torch.randint(0, 3, (N,), generator=generator))


def _model(rank):
    torch.manual_seed(100 + rank)  # different initial models: rank 0's must reach every rank
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _train(wrap, rank):
    """Two epochs with ``wrap`` applied to the model (``None``: unwrapped, ``distributed=True``)."""
    model = _model(rank)
    given = model if wrap is None else wrap(model)
    engine = PrivacyEngine(method="adaclip", accountant="rdp", seed=3, check_replicas=True)
    options = {"distributed": True} if wrap is None else {}
    module, optimizer, loader = engine.make_private(
        module=given,
        optimizer=torch.optim.SGD(given.parameters(), lr=0.5),
        data_loader=DataLoader(_data(), batch_size=BATCH),
        noise_multiplier=1.0,
        **options,
    )
    assert module._module is model and optimizer.distributed
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            optimizer.step()  # check_replicas: rule state, update and parameters agree on both ranks
    assert optimizer.steps_taken == 2 * len(loader) == 8
    assert engine.get_epsilon(1e-3) == epsilon(
        noise_multiplier=1.0, sample_rate=BATCH / N, steps=8, delta=1e-3, accountant="rdp"
    )
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _wrapped_worker(rank):
    expected = _train(None, rank)
    for wrap in (DistributedDataParallel, DPDDP):
        assert torch.equal(_train(wrap, rank), expected), wrap.__name__

    model = _model(rank)
    for module, loader, match in [
        (nn.Sequential(DistributedDataParallel(model)), DataLoader(_data(), batch_size=BATCH), "at '0'"),
        (
            DistributedDataParallel(model),
            DataLoader(_data(), batch_size=BATCH, sampler=DistributedSampler(_data())),
            "DistributedSampler",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            make_private(
                module=module,
                optimizer=torch.optim.SGD(module.parameters(), lr=0.5),
                data_loader=loader,
                noise_multiplier=1.0,
            )


def test_a_ddp_or_dpddp_model_trains_as_the_unwrapped_one_in_distributed_mode(tmp_path):
    mp.spawn(_entry, args=(_wrapped_worker, str(tmp_path / "process_group")), nprocs=WORLD, join=True)
