"""``make_private``: the Opacus-style entry point that turns a model, optimizer and loader private."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.validators import ModuleValidator
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset, default_collate

from adaclip._validate import (
    require_at_most,
    require_delta_below_inverse_n,
    require_int,
    require_one_of,
    require_open_unit,
)
from adaclip.engine import distributed as dist_utils
from adaclip.engine.bookkeeping import BookkeepingGradSampleModule, LayoutGradSampleModule, name_parameters
from adaclip.engine.ddp import resolve_data_parallel
from adaclip.engine.opacus_arguments import Translated, translate
from adaclip.engine.optimizer import (
    AdaptiveClipDPOptimizer,
    NonFinite,
    PerExample,
    check_step_options,
)
from adaclip.engine.sampling import PoissonDataLoader, TensorPoissonLoader
from adaclip.methods import METHODS, ClipRule, PerLayerClip, build_rule, check_method, supports_norm_path
from adaclip.privacy.accounting import ACCOUNTANTS, MAX_NOISE_MULTIPLIER, Accountant, noise_multiplier_for


def _seeds(seed: int | None, rank: int = 0, world_size: int = 1) -> tuple[int | None, int | None]:
    """Independent seeds for Poisson sampling and for noise, both fixed by ``seed``.

    With several ranks the noise seed is the same on every rank (the noise enters the all-reduced
    sum once) and each rank's sampling seed is its own (independent shares of the Poisson batch).
    """
    if seed is None:
        return None, None
    sampling, noise = (int(s >> np.uint64(1)) for s in np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64))
    if world_size > 1:
        sampling = int(
            np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)
        )
    return sampling, noise


_DP_LAYERS: dict[type[nn.Module], str] = {
    nn.LSTM: "opacus.layers.DPLSTM",
    nn.GRU: "opacus.layers.DPGRU",
    nn.RNN: "opacus.layers.DPRNN",
    nn.MultiheadAttention: "opacus.layers.DPMultiheadAttention",
}
"""torch layers that compute their gradients in fused kernels, with the Opacus layer to use instead."""


def module_problems(module: nn.Module) -> list[str]:
    """Why ``module`` cannot give true per-example gradients, layer by layer, with the fix for each (empty: it can).

    A ``BatchNorm`` in training mode mixes the examples of a batch (replace it with ``GroupNorm`` or
    ``LayerNorm``); an ``InstanceNorm`` tracking running statistics stores data without noise in its
    buffers; ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and ``nn.MultiheadAttention`` have no per-example
    gradients (use Opacus's DP layers).  Checked whether or not the layer is trainable: a frozen
    ``BatchNorm`` in training mode mixes examples too.  Then Opacus's own ``ModuleValidator`` (e.g. a
    module in eval mode).
    """
    problems = []
    for name, layer in module.named_modules():
        label = f"{name or 'module'} ({type(layer).__name__})"
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and (layer.training or not layer.track_running_stats):
            problems.append(
                f"{label} normalises each example with statistics of the whole batch: replace it with GroupNorm or "
                "LayerNorm (opacus.validators.ModuleValidator.fix(module) puts GroupNorm in its place)"
            )
        elif isinstance(layer, nn.modules.instancenorm._InstanceNorm) and layer.track_running_stats and layer.training:
            problems.append(
                f"{label} tracks running statistics of the data without noise: set track_running_stats=False "
                "(ModuleValidator.fix(module) does)"
            )
        elif type(layer) in _DP_LAYERS and any(p.requires_grad for p in layer.parameters()):
            fixed = "" if type(layer) is nn.RNN else " (ModuleValidator.fix(module) swaps it in)"
            problems.append(
                f"{label} computes its gradient in one fused kernel, without per-example gradients: use "
                f"{_DP_LAYERS[type(layer)]}, the same interface{fixed}"
            )
    if not problems:
        problems = [str(error) for error in ModuleValidator.validate(module, strict=False)]
    return problems


def _check_module(module: nn.Module) -> None:
    problems = module_problems(module)
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(f"module cannot give true per-example gradients: {'; '.join(problems[:3])}{more}")


def make_private(
    *,
    module: nn.Module,
    optimizer: Optimizer,
    data_loader: DataLoader[Any],
    method: str = "fixed",
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float | None = None,
    epochs: int | None = None,
    accountant: Accountant = "prv",
    seed: int | None = None,
    loss_reduction: str = "mean",
    per_example: PerExample = "fast",
    distributed: bool = False,
    check_replicas: bool = False,
    nonfinite: NonFinite = "drop",
    **method_params: object,
) -> tuple[GradSampleModule, AdaptiveClipDPOptimizer, PoissonDataLoader]:
    """Make training private with clipping rule ``method`` (default ``"fixed"``: Opacus's DP-SGD), like Opacus.

    Returns a ``GradSampleModule``, an :class:`AdaptiveClipDPOptimizer` and a Poisson-sampling
    ``DataLoader`` with rate ``q = batch_size / len(dataset)``; one epoch is ``int(1 / q)`` steps.
    Give either ``noise_multiplier`` or ``target_epsilon`` (then ``epochs`` and ``delta`` too; sigma is
    calibrated with ``accountant`` for ``epochs * int(1 / q)`` steps).  ``delta`` is also the default
    of ``optimizer.get_epsilon()``.  ``seed`` fixes the sampling and the noise.
    ``method_params`` go to the rule (e.g. ``initial_clip=0.5`` for AdaCliP, ``clip_norm=1.0`` for fixed).
    ``clipping="per_layer"`` (Opacus's name) clips each trainable parameter to its own bound
    (:func:`per_layer_rule`; ``max_grad_norm`` a list of bounds, or one split equally) for ``"fixed"``,
    ``"quantile"``, ``"auto"`` and ``"psac"``; the other methods refuse it with the reason.
    Opacus's argument names (``max_grad_norm``, ``target_delta``, ``grad_sample_mode``, ``batch_first``,
    ``poisson_sampling``, ``clipping``, ...) are read with their Opacus meaning or refused with the name
    to use (:mod:`adaclip.engine.opacus_arguments`); :class:`~adaclip.engine.privacy_engine.PrivacyEngine`
    has Opacus's whole interface.

    ``per_example="fast"`` (default) wraps the module in a
    :class:`~adaclip.engine.bookkeeping.BookkeepingGradSampleModule` when the rule has the norm interface:
    ``nn.Linear`` and ``nn.Embedding`` layers never form per-example gradients and the optimizer works
    from norms and weighted sums; other layers materialise theirs one layer at a time.  ``"materialise"``
    (and any rule without the norm interface) uses Opacus's ``GradSampleModule`` hooks
    (:class:`~adaclip.engine.bookkeeping.LayoutGradSampleModule`) and the ``[n, d]`` matrix.
    Both give the same result up to float rounding.  A module that is already a ``GradSampleModule``
    is used as it is.  A ``TensorDataset`` with the default collate is gathered in memory
    (:class:`~adaclip.engine.sampling.TensorPoissonLoader`), any other dataset item by item
    (:class:`~adaclip.engine.sampling.PoissonDataLoader`); both are ``torch.utils.data.DataLoader`` s
    with a Poisson batch sampler, and empty batches are kept (the step still releases noise).

    A step releases one Poisson batch, which may arrive in pieces: physical batches of Opacus's
    ``BatchMemoryManager`` (virtual steps), or several forward and backward passes on parts of the
    batch before one ``optimizer.step()``.  Clipped sums are added up over the pieces and released
    once, so the result equals that of one big batch while memory is bounded by a piece (see
    :class:`AdaptiveClipDPOptimizer`).  Drawing a new batch from the loader while an earlier one is
    pending raises (with ``num_workers=0``).

    ``distributed=True`` (inside an initialised ``torch.distributed`` process group, e.g. under
    ``torchrun``; call it on every rank with the same arguments): ``data_loader.batch_size`` stays the
    *global* expected batch size ``B``; rank 0's parameters and buffers are copied to every rank; each
    rank Poisson-samples its own share of the dataset; each step's clipped sums are all-reduced and the
    noise, drawn identically on every rank, enters the sum once (:mod:`adaclip.engine.distributed`).  The
    accounting is the single-process one for the same ``(sigma, q, T)``.  ``check_replicas=True``
    asserts after every step that rule state, update and parameters agree on every rank (debugging).

    ``nonfinite``: an example whose per-example gradient is not finite (NaN or inf) is dropped from
    the step with weight 0 and counted in ``optimizer.last_stats["nonfinite_dropped"]`` (``"drop"``,
    the default; the sensitivity and the accounting are unchanged, see :mod:`adaclip.methods.base`), or
    stops training with :class:`~adaclip.methods.base.NonFiniteGradientError` (``"raise"``).
    """
    opacus, expected_batch_size, dataset_size, module, distributed = _check_arguments(
        module=module,
        optimizer=optimizer,
        data_loader=data_loader,
        method=method,
        method_params=method_params,
        delta=delta,
        accountant=accountant,
        per_example=per_example,
        loss_reduction=loss_reduction,
        nonfinite=nonfinite,
        distributed=distributed,
        check_replicas=check_replicas,
    )
    method_params, delta, per_example = opacus.method_params, opacus.delta, opacus.per_example
    sample_rate = expected_batch_size / dataset_size
    noise_multiplier = calibrate_noise(
        noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon,
        epochs=epochs,
        sample_rate=sample_rate,
        delta=delta,
        accountant=accountant,
    )
    rule = build_rule(
        method, noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size, **method_params
    )
    if opacus.clipping == "per_layer":
        rule = per_layer_rule(rule, module, optimizer, opacus.layer_bounds)
    module = prepare_module(
        module, rule, per_example=per_example, loss_reduction=loss_reduction, batch_first=opacus.batch_first
    )

    rank, world_size, sampling_generator, noise_generator = _generators(module, seed, distributed)
    private_loader = prepare_loader(
        data_loader, sample_rate, sampling_generator, rank=rank, world_size=world_size, batch_first=opacus.batch_first
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
        nonfinite=nonfinite,
    )
    # pieces of one logical batch: earlier backward passes are clipped when the next forward starts;
    # a new loader batch while one is pending is refused (with worker processes the sampler runs ahead)
    private_optimizer.attach_module(module)
    if private_loader.num_workers == 0:
        private_loader.poisson_sampler.before_batch = private_optimizer.begin_logical_batch
    return module, private_optimizer, private_loader


def _generators(
    module: nn.Module, seed: int | None, distributed: bool
) -> tuple[int, int, torch.Generator | None, torch.Generator | None]:
    """This rank, the number of ranks, and the sampling and noise generators seeded from ``seed`` (``None``: torch's
    global generator).  Under ``distributed`` rank 0's module and seed are copied to every rank first."""
    device = next(module.parameters()).device
    rank, world_size = (dist_utils.rank(), dist_utils.world_size()) if distributed else (0, 1)
    if distributed:
        dist_utils.broadcast_module(module)
        seed = dist_utils.shared_seed(seed, device)
    sampling_seed, noise_seed = _seeds(seed, rank, world_size)
    sampling_generator = None if sampling_seed is None else torch.Generator().manual_seed(sampling_seed)
    noise_generator = None if noise_seed is None else torch.Generator(device=device).manual_seed(noise_seed)
    return rank, world_size, sampling_generator, noise_generator


def _check_arguments(
    *,
    module: object,
    optimizer: object,
    data_loader: object,
    method: str,
    method_params: dict[str, object],
    delta: float | None,
    accountant: object,
    per_example: PerExample,
    loss_reduction: object,
    nonfinite: object,
    distributed: bool,
    check_replicas: bool,
) -> tuple[Translated, int, int, nn.Module, bool]:
    """Every argument of :func:`make_private`, checked before anything is built: Opacus's names translated, the
    expected batch size ``B``, the dataset size ``N``, and the module to make private with whether to run in
    data-parallel mode (a DDP- or DPDDP-wrapped model is unwrapped and runs distributed,
    :func:`~adaclip.engine.ddp.resolve_data_parallel`)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer over module.parameters() (e.g. torch.optim.SGD), "
            f"got {type(optimizer).__name__}"
        )
    if not isinstance(data_loader, DataLoader) or data_loader.batch_size is None:
        raise ValueError(
            "data_loader must be a torch DataLoader with an integer batch_size (the expected batch size B)"
        )
    module, distributed = resolve_data_parallel(module, data_loader, distributed)
    opacus = translate(method, method_params, delta=delta, per_example=per_example)
    check_method(method, opacus.method_params)
    module_params = {id(p) for p in module.parameters()}
    if any(id(p) not in module_params for group in optimizer.param_groups for p in group["params"]):
        raise ValueError(
            "optimizer holds parameters that are not the module's: build the optimizer over module.parameters()"
        )
    _check_step_optimizer(method, optimizer)
    require_one_of("accountant", accountant, ACCOUNTANTS)
    require_one_of("loss_reduction", loss_reduction, ("mean", "sum"))
    check_step_options(
        per_example=opacus.per_example, nonfinite=nonfinite, distributed=distributed, check_replicas=check_replicas
    )
    if not isinstance(data_loader.dataset, Sized):
        raise ValueError(
            "data_loader.dataset must have a length (a map-style Dataset): Poisson sampling draws from all N examples"
        )
    dataset_size = len(data_loader.dataset)
    if data_loader.batch_size > dataset_size:
        raise ValueError(
            f"data_loader.batch_size={data_loader.batch_size} exceeds the dataset size {dataset_size}; "
            "lower the batch size"
        )
    if opacus.delta is not None:
        require_open_unit("delta", opacus.delta, " (use < 1/N for N examples)")
        require_delta_below_inverse_n(opacus.delta, dataset_size)
    return opacus, data_loader.batch_size, dataset_size, module, distributed


def _check_step_optimizer(method: str, optimizer: Optimizer) -> None:
    """A rule that releases an optimiser step (DP-MacAdam, DP-AdamBC) needs plain SGD to apply it as it is."""
    if not METHODS[method].releases_step:
        return
    plain = type(optimizer) is torch.optim.SGD and all(
        not group.get("momentum") and not group.get("weight_decay") and not group.get("nesterov")
        for group in optimizer.param_groups
    )
    if not plain:
        raise ValueError(
            f"method {method!r} releases an Adam step built from the noisy gradient: wrap plain torch.optim.SGD "
            f"(no momentum, no weight decay) to apply it, not {type(optimizer).__name__} with its own update"
        )


def per_layer_rule(
    rule: ClipRule, module: nn.Module, optimizer: Optimizer, layer_bounds: tuple[float, ...] | None
) -> PerLayerClip:
    """``rule`` clipped per layer, one layer per trainable parameter of ``optimizer`` in its order (as Opacus).

    ``layer_bounds`` (Opacus's ``max_grad_norm`` list) must have one bound per such parameter; ``None``
    splits the rule's bound equally (:class:`~adaclip.methods.per_layer.PerLayerClip`).
    """
    trainable = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if layer_bounds is not None and len(layer_bounds) != len(trainable):
        names = {id(p): name for name, p in module.named_parameters()}
        listed = ", ".join(names.get(id(p), "?") for p in trainable)
        raise ValueError(
            f"max_grad_norm lists {len(layer_bounds)} per-layer bounds but the optimizer trains {len(trainable)} "
            f"parameters; give one bound per parameter, in this order: {listed}"
        )
    return PerLayerClip(base=rule, layer_sizes=[p.numel() for p in trainable], layer_bounds=layer_bounds)


def calibrate_noise(
    *,
    noise_multiplier: float | None,
    target_epsilon: float | None,
    epochs: int | None,
    sample_rate: float,
    delta: float | None,
    accountant: Accountant,
) -> float:
    """The noise multiplier: ``noise_multiplier`` as given, or calibrated for ``target_epsilon`` over ``epochs``.

    One epoch is ``int(1 / sample_rate)`` steps (as the Poisson loaders count them); the calibrated
    sigma is the smallest whose epsilon with ``accountant`` is at most ``target_epsilon``.  A given
    sigma must lie in ``(0, MAX_NOISE_MULTIPLIER]`` (:mod:`adaclip.privacy.accounting`).
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier and target_epsilon")
    if target_epsilon is None:
        return require_at_most("noise_multiplier", noise_multiplier, MAX_NOISE_MULTIPLIER)
    epochs = require_int("epochs (needed with target_epsilon)", epochs)
    if delta is None:
        raise ValueError("target_epsilon needs delta (Opacus's target_delta): epsilon is spent at a given delta")
    return noise_multiplier_for(
        target_epsilon=target_epsilon,
        sample_rate=sample_rate,
        steps=epochs * int(1 / sample_rate),
        delta=delta,
        accountant=accountant,
    )


def prepare_module(
    module: nn.Module, rule: ClipRule, *, per_example: PerExample, loss_reduction: str, batch_first: bool = True
) -> GradSampleModule:
    """``module`` wrapped to leave per-example gradient information for ``rule`` after backward.

    The book-keeping module (:mod:`adaclip.engine.bookkeeping`) when ``per_example="fast"`` and the
    rule has the norm interface; Opacus's ``GradSampleModule`` otherwise; a ``GradSampleModule`` as
    it is.  Checks first that the module can give true per-example gradients (no BatchNorm) and that
    the rule's state fits the number of trainable parameters (e.g. GeoClip's full matrix).
    ``batch_first=False`` (inputs ``[K, B, ...]``) is Opacus's, for its ``GradSampleModule``.
    """
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("module has no trainable parameters (requires_grad=True): nothing to train privately")
    rule.init_state(trainable, device="meta")
    if isinstance(module, GradSampleModule):
        name_parameters(module._module)
        return module
    _check_module(module)
    name_parameters(module)
    if per_example == "fast" and supports_norm_path(rule):
        return BookkeepingGradSampleModule(module, batch_first=batch_first, loss_reduction=loss_reduction)
    return LayoutGradSampleModule(module, batch_first=batch_first, loss_reduction=loss_reduction)


def prepare_loader(
    data_loader: DataLoader[Any],
    sample_rate: float,
    generator: torch.Generator | None,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_first: bool = True,
) -> PoissonDataLoader:
    """A Poisson-sampling ``DataLoader`` over ``data_loader``'s dataset at rate ``sample_rate``.

    A ``TensorDataset`` with the default collate is gathered in memory (:class:`TensorPoissonLoader`);
    any other dataset gets a :class:`PoissonDataLoader` with the loader's collate function wrapped by
    Opacus's ``wrap_collate_with_empty`` (empty batches become empty tensors; ``batch_first`` says
    which dimension is the batch's) and the loader's worker settings.  Under several ranks each
    samples its own share (:class:`~adaclip.engine.sampling.PoissonBatchSampler`).
    """
    dataset = data_loader.dataset
    if not isinstance(dataset, Sized):
        raise ValueError("data_loader.dataset must have a length (a map-style Dataset) for Poisson sampling")
    if isinstance(dataset, TensorDataset) and data_loader.collate_fn is default_collate:
        return TensorPoissonLoader(dataset, sample_rate, generator=generator, rank=rank, world_size=world_size)
    first = dataset[0]
    return PoissonDataLoader(
        dataset,
        sample_rate,
        generator=generator,
        rank=rank,
        world_size=world_size,
        collate_fn=wrap_collate_with_empty(
            collate_fn=data_loader.collate_fn,
            batch_first=batch_first,
            sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
            dtypes=[dtype_safe(x) for x in first],
        ),
        num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory,
        timeout=data_loader.timeout,
        worker_init_fn=data_loader.worker_init_fn,
        multiprocessing_context=data_loader.multiprocessing_context,
        prefetch_factor=data_loader.prefetch_factor,
        persistent_workers=data_loader.persistent_workers,
    )
