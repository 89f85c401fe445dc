"""``make_private``: the Opacus-style entry point that turns a model, optimizer and loader private."""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.validators import ModuleValidator
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset, default_collate

from adaclip.accounting import ACCOUNTANTS, Accountant, noise_multiplier_for
from adaclip import distributed as dist_utils
from adaclip.clipping import AdaCliP, AutoClip, ClipRule, FixedClip, PerSampleAdaptiveClip, QuantileClip, supports_norm_path
from adaclip.fastpath import BookkeepingGradSampleModule
from adaclip.geoclip import GeoClip
from adaclip.optimizer import PER_EXAMPLE_PATHS, AdaptiveClipDPOptimizer, PerExample
from adaclip.sampling import PoissonBatchSampler, TensorPoissonLoader

METHODS: dict[str, type[ClipRule]] = {"adaclip": AdaCliP, "quantile": QuantileClip, "fixed": FixedClip, "auto": AutoClip, "geoclip": GeoClip, "psac": PerSampleAdaptiveClip}
METHOD_DEFAULTS: dict[str, dict[str, float]] = {"fixed": {"clip_norm": 1.0}}
_SET_BY_ENGINE = {"noise_multiplier", "expected_batch_size"}


def method_parameters(method: str) -> list[str]:
    """The keyword parameters ``make_private`` accepts for ``method`` (beyond the privacy ones)."""
    return [name for name in inspect.signature(METHODS[method]).parameters if name not in _SET_BY_ENGINE]


def check_method(method: str, method_params: dict[str, object]) -> None:
    """Reject an unknown method name or parameter, naming what is accepted."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    unknown = sorted(set(method_params) - set(method_parameters(method)))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for method {method!r}; it accepts {method_parameters(method)}")


def build_rule(method: str, *, noise_multiplier: float, expected_batch_size: float, **method_params: object) -> ClipRule:
    """Instantiate the clipping rule ``method`` with its defaults."""
    check_method(method, method_params)
    params = {**METHOD_DEFAULTS.get(method, {}), **method_params}
    return METHODS[method](noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size, **params)


def _seeds(seed: int | None, rank: int = 0, world_size: int = 1) -> tuple[int | None, int | None]:
    """Independent seeds for Poisson sampling and for noise, both fixed by ``seed``.

    With several ranks the noise seed is the same on every rank (the noise enters the all-reduced
    sum once) and each rank's sampling seed is its own (independent shares of the Poisson batch).
    """
    if seed is None:
        return None, None
    sampling, noise = (int(s >> np.uint64(1)) for s in np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64))
    if world_size > 1:
        sampling = int(np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    return sampling, noise


def _check_module(module: nn.Module) -> None:
    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        listed = "; ".join(str(e) for e in errors)
        raise ValueError(
            f"module cannot give true per-example gradients: {listed}. BatchNorm mixes examples: replace it with "
            "GroupNorm or LayerNorm (opacus.validators.ModuleValidator.fix(module) does this)."
        )


def make_private(
    *,
    module: nn.Module,
    optimizer: Optimizer,
    data_loader: DataLoader,
    method: str = "adaclip",
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float,
    epochs: int | None = None,
    accountant: Accountant = "prv",
    seed: int | None = None,
    loss_reduction: str = "mean",
    per_example: PerExample = "fast",
    distributed: bool = False,
    check_replicas: bool = False,
    **method_params: object,
) -> tuple[GradSampleModule, AdaptiveClipDPOptimizer, DataLoader | TensorPoissonLoader]:
    """Make training private with clipping rule ``method``, like ``opacus.PrivacyEngine.make_private``.

    Returns a ``GradSampleModule``, an :class:`AdaptiveClipDPOptimizer` and a Poisson-sampling
    loader with rate ``q = batch_size / len(dataset)``; one epoch is ``int(1 / q)`` steps.
    Give either ``noise_multiplier`` or ``target_epsilon`` (then ``epochs`` too; sigma is calibrated
    with ``accountant`` for ``epochs * int(1 / q)`` steps).  ``seed`` fixes the sampling and the noise.
    ``method_params`` go to the rule (e.g. ``initial_clip=0.5`` for AdaCliP, ``clip_norm=1.0`` for fixed).

    ``per_example="fast"`` (default) wraps the module in a
    :class:`~adaclip.fastpath.BookkeepingGradSampleModule` when the rule has the norm interface:
    ``nn.Linear`` layers never form per-example gradients and the optimizer works from norms and
    weighted sums; other layers materialise theirs one layer at a time.  ``"materialise"`` (and any
    rule without the norm interface) uses Opacus's ``GradSampleModule`` and the ``[n, d]`` matrix.
    Both give the same result up to float rounding.  A module that is already a ``GradSampleModule``
    is used as it is.  A ``TensorDataset`` with the default collate is sampled in memory
    (:class:`~adaclip.sampling.TensorPoissonLoader`); any other dataset by Opacus's ``DPDataLoader``.

    ``distributed=True`` (inside an initialised ``torch.distributed`` process group, e.g. under
    ``torchrun``; call it on every rank with the same arguments): ``data_loader.batch_size`` stays the
    *global* expected batch size ``B``; rank 0's parameters and buffers are copied to every rank; each
    rank Poisson-samples its own share of the dataset; each step's clipped sums are all-reduced and the
    noise, drawn identically on every rank, enters the sum once (:mod:`adaclip.distributed`).  The
    accounting is the single-process one for the same ``(sigma, q, T)``.  ``check_replicas=True``
    asserts after every step that rule state, update and parameters agree on every rank (debugging).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(data_loader, DataLoader) or data_loader.batch_size is None:
        raise ValueError("data_loader must be a torch DataLoader with an integer batch_size (the expected batch size B)")
    check_method(method, method_params)
    module_params = {id(p) for p in module.parameters()}
    if any(id(p) not in module_params for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("optimizer holds parameters that are not the module's: build the optimizer over module.parameters()")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if per_example not in PER_EXAMPLE_PATHS:
        raise ValueError(f"per_example must be one of {PER_EXAMPLE_PATHS}, got {per_example!r}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if distributed and not dist_utils.is_initialized():
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group: launch with torchrun and call "
            "torch.distributed.init_process_group (or adaclip.distributed.init_from_environment) first"
        )
    if check_replicas and not distributed:
        raise ValueError("check_replicas=True compares ranks and needs distributed=True")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must lie in (0, 1) (use < 1/N for N examples), got {delta!r}")
    dataset_size = len(data_loader.dataset)  # type: ignore[arg-type]
    expected_batch_size = data_loader.batch_size
    if expected_batch_size > dataset_size:
        raise ValueError(f"data_loader.batch_size={expected_batch_size} exceeds the dataset size {dataset_size}; lower the batch size")
    if delta >= 1 / dataset_size:
        raise ValueError(f"delta={delta} must be below 1/N = {1 / dataset_size:.3g} for N={dataset_size} examples (1e-5 or N^-1.1 are usual)")
    sample_rate = expected_batch_size / dataset_size
    steps_per_epoch = int(1 / sample_rate)

    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier and target_epsilon")
    if target_epsilon is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1 when target_epsilon is given, got {epochs!r}")
        noise_multiplier = noise_multiplier_for(
            target_epsilon=target_epsilon, sample_rate=sample_rate, steps=epochs * steps_per_epoch, delta=delta, accountant=accountant
        )
    elif not (isinstance(noise_multiplier, (int, float)) and 0 < noise_multiplier < math.inf):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")

    rule = build_rule(method, noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size, **method_params)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("module has no trainable parameters (requires_grad=True): nothing to train privately")
    rule.init_state(trainable, device="meta")  # the rule fits this model (e.g. GeoClip's full matrix), before any step
    if not isinstance(module, GradSampleModule):
        _check_module(module)
        if per_example == "fast" and supports_norm_path(rule):
            module = BookkeepingGradSampleModule(module, loss_reduction=loss_reduction)
        else:
            module = GradSampleModule(module, loss_reduction=loss_reduction)

    device = next(module.parameters()).device
    rank, world_size = (dist_utils.rank(), dist_utils.world_size()) if distributed else (0, 1)
    if distributed:
        dist_utils.broadcast_module(module)
        seed = dist_utils.shared_seed(seed, device)
    sampling_seed, noise_seed = _seeds(seed, rank, world_size)
    sampling_generator = None if sampling_seed is None else torch.Generator().manual_seed(sampling_seed)
    noise_generator = None if noise_seed is None else torch.Generator(device=device).manual_seed(noise_seed)

    private_loader: DataLoader | TensorPoissonLoader
    if isinstance(data_loader.dataset, TensorDataset) and data_loader.collate_fn is default_collate:
        private_loader = TensorPoissonLoader(data_loader.dataset, sample_rate, generator=sampling_generator, rank=rank, world_size=world_size)
    elif distributed:
        first = data_loader.dataset[0]
        private_loader = DataLoader(
            data_loader.dataset,
            batch_sampler=PoissonBatchSampler(dataset_size, sample_rate, generator=sampling_generator, rank=rank, world_size=world_size),
            collate_fn=wrap_collate_with_empty(
                collate_fn=data_loader.collate_fn,
                sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                dtypes=[dtype_safe(x) for x in first],
            ),
            num_workers=data_loader.num_workers,
            pin_memory=data_loader.pin_memory,
        )
    else:
        private_loader = DPDataLoader(
            data_loader.dataset,
            sample_rate=sample_rate,
            collate_fn=data_loader.collate_fn,
            generator=sampling_generator,
            num_workers=data_loader.num_workers,
            pin_memory=data_loader.pin_memory,
        )
    private_optimizer = AdaptiveClipDPOptimizer(
        optimizer,
        rule=rule,
        sample_rate=sample_rate,
        accountant=accountant,
        delta=delta,
        generator=noise_generator,
        loss_reduction=loss_reduction,
        per_example=per_example,
        distributed=distributed,
        check_replicas=check_replicas,
    )
    return module, private_optimizer, private_loader
