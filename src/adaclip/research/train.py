"""One training run: a validated config in, a JSON-ready metrics record out.

``run(config)`` loads the dataset, builds the model, trains with :func:`adaclip.make_private` (which
calibrates sigma for the target epsilon with the chosen accountant, or takes sigma; for
``method="nonprivate"`` plain SGD), evaluates on the validation and test splits every epoch and
returns a record; with ``out`` set it also writes the record atomically as JSON.  One ``seed``
fixes the split, the initialisation, the Poisson sampling and the noise.

What the record may be shared as: the trained model's test and validation metrics and epsilon.
``step_stats`` (clipped fraction, realised batch size, clip norms, ...) and ``train_loss`` are
computed from the raw training batches without noise: diagnostics for the researcher, not private
releases (the quantile rule's noisy ``unclipped_estimate`` and AdaCliP's scales are derived from
released values and are the exceptions).

Nothing silent: every config value is checked (types included) when the :class:`TrainConfig` is built
(:mod:`adaclip.research.config`), so before data is loaded, and the output destinations before any
training; with a given sigma, epsilon for the planned steps is computed before training (a sigma the
accountants cannot handle fails first; see :mod:`adaclip.privacy.accounting` for the bounded accountants
and their RDP fallback, which the record
names in ``epsilon_accountant`` and ``accounting_fallback``).  A non-finite training loss or metric
means the run diverged: by default a :class:`TrainingDiverged` error; with ``on_divergence="record"``
(for sweeps, whose learning-rate search must go on) the run stops there and its record says
``diverged: true`` with null metrics.  Records are strict JSON (no ``NaN``).

Checkpoints: ``run(config, checkpoint=path)`` writes, atomically at the end of every epoch, the model,
the optimizer with its privacy state (steps taken, rule state, noise generator), the loader's
sampling generator, torch's global generator, the epoch and the history so far; ``resume=True``
continues from it, to the same parameters and the same (total) epsilon as an uninterrupted run.

Inside a ``torch.distributed`` process group of several ranks (``torchrun``; see
:mod:`adaclip.engine.distributed`) the same call trains data-parallel: private methods through
``make_private(..., distributed=True)`` (the batch size stays the global expected batch size),
the non-private baseline with ``DistributedDataParallel`` (each rank a ``1 / W`` share of the batch);
evaluation is sharded and summed over ranks; only rank 0 writes ``out``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset
from tqdm import tqdm

from adaclip._validate import require, require_bool, require_delta_below_inverse_n
from adaclip.engine import AdaptiveClipDPOptimizer, make_private
from adaclip.engine import distributed as dist_utils
from adaclip.engine.sampling import (
    BatchedTensorDataset,
    collate_gathered,
    load_loader_state_dict,
    loader_state_dict,
)
from adaclip.methods import NONPRIVATE
from adaclip.privacy.accounting import Spent, account
from adaclip.research.config import TrainConfig, default_delta, resolve
from adaclip.research.data import Splits
from adaclip.research.datasets import load_dataset
from adaclip.research.diagnostics import ReleaseProbe
from adaclip.research.io import write_bytes_atomic, write_text_atomic
from adaclip.research.models import build_model
from adaclip.research.records import check_destination, to_json


class TrainingDiverged(ValueError):
    """The training loss or a metric became non-finite (``on_divergence="raise"``); the message says where."""


def _check_device_present(device: str) -> None:
    """A CUDA device must exist here (checked when a run starts, not when configs are validated)."""
    parsed = torch.device(device)
    if parsed.type == "cuda":
        require(
            torch.cuda.is_available(),
            f"device={device!r} but torch sees no CUDA device (torch {torch.__version__}); use device 'cpu'",
        )
        count = torch.cuda.device_count()
        require(
            (parsed.index or 0) < count,
            f"device={device!r} but this machine has {count} CUDA device(s): use cuda:0 ... cuda:{count - 1}",
        )


def _check_parallel(config: TrainConfig, world_size: int) -> None:
    """What a run under several ranks cannot do, named before any data is loaded."""
    if world_size == 1:
        require(
            not config.check_replicas,
            "check_replicas compares the ranks of a torchrun launch; with one process set it false",
        )
        return
    require(
        not config.diagnostics,
        "diagnostics read the clean per-rank gradient and run in one process only; drop --diagnostics or torchrun",
    )
    require(
        config.method != NONPRIVATE or config.batch_size % world_size == 0,
        f"the non-private baseline splits batch_size={config.batch_size} evenly over {world_size} ranks: "
        "use a batch size divisible by --nproc_per_node",
    )
    require(
        not config.device.startswith("cuda:"),
        f"device={config.device!r} pins every rank to one GPU; use device 'cuda' (each rank takes cuda:LOCAL_RANK)",
    )


EVALUATION_BATCH = 1024
"""Examples per forward pass when the validation and test metrics are computed."""


def _evaluate(model: nn.Module, dataset: TensorDataset, task: str, device: str) -> float:
    """Accuracy (classification) or mean squared error (regression) on ``dataset`` (each rank a share, summed)."""
    model.eval()
    total, count = 0.0, 0
    world_size = dist_utils.world_size()
    inputs, labels = dataset.tensors
    if world_size > 1:
        shard = torch.arange(dist_utils.rank(), len(dataset), world_size)
        inputs, labels = inputs[shard], labels[shard]
    with torch.no_grad():
        for start in range(0, len(labels), EVALUATION_BATCH):  # slices: no per-example __getitem__ and collate
            outputs = model(inputs[start : start + EVALUATION_BATCH].to(device))
            targets = labels[start : start + EVALUATION_BATCH].to(device)
            if task == "classification":
                total += (outputs.argmax(1) == targets).sum().item()
            else:
                total += (outputs - targets).square().sum().item()
            count += len(targets)
    model.train()
    if world_size > 1:
        total, count = dist_utils.all_reduce_sums([total, count], device)
    return total / count


def _versions() -> dict[str, str]:
    names = ("torch", "opacus", "dp-accounting", "numpy", "adaclip")
    return {"python": platform.python_version(), **{n: metadata.version(n) for n in names}}


@dataclass
class _RunHistory:
    """The history a run accumulates; a checkpoint carries it with the model, optimizer and generators."""

    epoch: int = 0
    steps: int = 0
    per_epoch: list[dict[str, Any]] = field(default_factory=list)
    step_stats: dict[str, list[float | None]] = field(default_factory=dict)
    wall_time_s: float = 0.0
    resumed_at_epoch: int | None = None
    divergence: str | None = None


CHECKPOINT_FORMAT = 1


def _check_outputs(
    out: str | os.PathLike[str] | None, checkpoint: str | os.PathLike[str] | None, resume: bool, world_size: int
) -> None:
    """Where the run writes, checked before any data is loaded or any step taken."""
    require_bool("resume", resume)
    if out is not None:
        check_destination(out, "out")
    if checkpoint is None:
        require(not resume, "resume needs a checkpoint path to resume from (--checkpoint PATH)")
        return
    require(
        world_size == 1,
        "checkpoints are written by a single process: drop --checkpoint under torchrun (one sampling state per rank)",
    )
    path = check_destination(checkpoint, "checkpoint")
    if resume:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist: nothing to resume (drop --resume to start)")
    else:
        require(
            not path.exists(),
            f"checkpoint {path} already exists: pass --resume to continue that run, or remove it to start afresh",
        )


def _loader_state(loader: Any) -> dict[str, Any]:
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, RandomSampler):  # the non-private baseline
        return {"shuffle_generator": loader.generator.get_state()}
    return loader_state_dict(loader)


def _load_loader_state(loader: Any, state: dict[str, Any]) -> None:
    if "shuffle_generator" in state:
        loader.generator.set_state(state["shuffle_generator"])
    else:
        load_loader_state_dict(loader, state)


def _save_checkpoint(
    path: str | os.PathLike[str],
    config: TrainConfig,
    model: nn.Module,
    optimizer: Any,
    loader: Any,
    progress: _RunHistory,
) -> None:
    """Everything :func:`_load_checkpoint` needs to continue exactly, written atomically."""
    buffer = io.BytesIO()
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": dataclasses.asdict(config),
            "progress": dataclasses.asdict(progress),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "loader": _loader_state(loader),
            "torch_rng": torch.get_rng_state(),
        },
        buffer,
    )
    write_bytes_atomic(path, buffer.getvalue())


def _load_checkpoint(
    path: str | os.PathLike[str], config: TrainConfig, model: nn.Module, optimizer: Any, loader: Any, device: str
) -> _RunHistory:
    """Restore a checkpoint of the same config into the freshly built model, optimizer and loader."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises several types for a damaged or foreign file
        detail = " ".join(str(error).split())[:200]
        raise ValueError(f"checkpoint {path} cannot be read ({type(error).__name__}: {detail})") from None
    require(
        isinstance(saved, dict) and saved.get("format") == CHECKPOINT_FORMAT,
        f"checkpoint {path} was not written by this version of adaclip's trainer",
    )
    own = dataclasses.asdict(config)
    differing = sorted(k for k in own if k != "progress" and saved["config"].get(k) != own[k])
    require(
        not differing,
        f"checkpoint {path} belongs to another config: "
        + "; ".join(f"{k}: saved {saved['config'].get(k)!r}, here {own[k]!r}" for k in differing),
    )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    _load_loader_state(loader, saved["loader"])
    torch.set_rng_state(saved["torch_rng"].cpu())
    progress = _RunHistory(**saved["progress"])
    progress.resumed_at_epoch = progress.epoch
    return progress


def _finite_or_none(value: Any) -> Any:
    """``value`` if it is a finite number (or not a number), else ``None``: what strict JSON can hold."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def run(
    config: TrainConfig | dict[str, Any],
    out: str | os.PathLike[str] | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train one model as ``config`` says and return its metrics record (also written to ``out``).

    ``checkpoint``: a file written atomically at the end of every epoch (it must not exist yet unless
    ``resume``); ``resume=True`` continues the run saved there (same config) to the same result as
    an uninterrupted run.  Output paths are checked before anything else happens.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    require(isinstance(config, TrainConfig), f"config must be a TrainConfig or a mapping, got {type(config).__name__}")
    config = resolve(config)
    world_size = dist_utils.world_size()
    _check_parallel(config, world_size)
    _check_device_present(config.device)
    _check_outputs(out, checkpoint, resume, world_size)
    built = _build(config, world_size)
    progress = _RunHistory()
    if resume and checkpoint is not None:
        progress = _load_checkpoint(checkpoint, config, built.model, built.optimizer, built.loader, built.device)
    probe = ReleaseProbe(built.optimizer, config.lr) if config.diagnostics and config.method != NONPRIVATE else None
    start = time.perf_counter()
    show = config.progress and not os.environ.get("TQDM_DISABLE") and dist_utils.rank() == 0
    with warnings.catch_warnings():
        # torch warns about Opacus's hooks when the inputs do not require grad; harmless here
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for epoch in range(progress.epoch + 1, config.epochs + 1):
            loss = _train_epoch(config, built, progress, probe, epoch, show)
            if not _end_epoch(config, built, progress, epoch, loss):
                break
            if checkpoint is not None:
                progress.wall_time_s += time.perf_counter() - start
                start = time.perf_counter()
                _save_checkpoint(checkpoint, config, built.model, built.optimizer, built.loader, progress)
    progress.wall_time_s += time.perf_counter() - start
    record = _record(config, progress, built)
    if out is not None and dist_utils.rank() == 0:
        write_text_atomic(out, to_json(record, indent=1) + "\n")
    return record


@dataclass
class _Built:
    """What :func:`_build` sets up for a run: the data, the model, its optimizer and loader, and the privacy
    setting they use (``None`` for the non-private baseline)."""

    splits: Splits
    device: str
    world_size: int
    model: nn.Module
    optimizer: Any
    loader: Any
    loss_fn: Any
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    method_params: dict[str, Any]

    @property
    def metric(self) -> str:
        return "accuracy" if self.splits.task == "classification" else "mse"


def _build(config: TrainConfig, world_size: int) -> _Built:
    """Load the data (onto the device, once), check the privacy setting against it, then seed torch and build the
    model, the optimizer and the loader: private through :func:`make_private`, or plain for the baseline."""
    device = f"cuda:{torch.cuda.current_device()}" if world_size > 1 and config.device == "cuda" else config.device
    splits: Splits = load_dataset(
        config.dataset,
        seed=config.seed,
        train_size=config.train_size,
        data_dir=config.data_dir,
        **({} if config.feature_spread is None else {"feature_spread": config.feature_spread}),
    ).to(device)
    n_train = len(splits.train)
    require(
        config.batch_size <= n_train,
        f"batch_size={config.batch_size} exceeds the {n_train} training examples; lower it",
    )
    delta = _check_privacy(config, n_train)
    torch.manual_seed(config.seed)
    model = build_model(config.model, splits.input_shape, splits.num_classes or 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    loss_fn = nn.functional.cross_entropy if splits.task == "classification" else nn.functional.mse_loss
    built = _Built(splits, device, world_size, model, optimizer, None, loss_fn, delta, None, None, {})
    if config.method == NONPRIVATE:
        _plain_training(config, built)
        return built
    built.model, built.optimizer, built.loader = make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(splits.train, batch_size=config.batch_size),
        method=config.method,
        noise_multiplier=config.noise_multiplier,
        target_epsilon=config.epsilon,
        epochs=config.epochs,
        delta=delta,
        accountant=config.accountant,
        seed=config.seed,
        per_example="fast",
        distributed=world_size > 1,
        check_replicas=config.check_replicas,
        **config.method_params,
    )
    built.noise_multiplier, built.sample_rate = built.optimizer.noise_multiplier, built.optimizer.sample_rate
    built.method_params = built.optimizer.rule.hyperparameters()
    return built


def _check_privacy(config: TrainConfig, n_train: int) -> float | None:
    """The run's delta (checked below ``1 / N``; ``None`` for the baseline); with a given sigma, epsilon of the
    planned steps is computed now, before any training (a sigma the accountants cannot handle fails first)."""
    if config.method == NONPRIVATE:
        return None
    delta = config.delta if config.delta is not None else default_delta(n_train)
    require_delta_below_inverse_n(delta, n_train, what="training examples")
    if config.noise_multiplier is not None:
        sample_rate = config.batch_size / n_train
        account(
            noise_multiplier=config.noise_multiplier,
            sample_rate=sample_rate,
            steps=config.epochs * int(1 / sample_rate),
            delta=delta,
            accountant=config.accountant,  # checked by TrainConfig
        )
    return delta


def _plain_training(config: TrainConfig, built: _Built) -> None:
    """The non-private baseline's loader: shuffled batches (each rank a ``1 / W`` share under several ranks, with
    ``DistributedDataParallel``)."""
    train = built.splits.train
    if built.world_size > 1:
        sampler = DistributedSampler(train, shuffle=True, seed=config.seed)
        built.loader = DataLoader(train, batch_size=config.batch_size // built.world_size, sampler=sampler)
        device_ids = [built.device] if built.device.startswith("cuda") else None
        built.model = DistributedDataParallel(built.model, device_ids=device_ids)
        return
    built.loader = DataLoader(
        BatchedTensorDataset(*train.tensors),  # one gather per batch, not a __getitem__ per example
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
        collate_fn=collate_gathered,
    )


def _train_epoch(
    config: TrainConfig, built: _Built, progress: _RunHistory, probe: ReleaseProbe | None, epoch: int, show: bool
) -> tuple[float, int]:
    """One epoch of steps; returns the summed training loss and its example count (over all ranks).  A non-finite
    loss stops the epoch and sets ``progress.divergence``."""
    model, optimizer, loader = built.model, built.optimizer, built.loader
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        loader.sampler.set_epoch(epoch)
    loss_sum, loss_count = 0.0, 0
    for features, targets in tqdm(
        loader, desc=f"{config.method} epoch {epoch}/{config.epochs}", disable=not show, leave=False
    ):
        features, targets = features.to(built.device), targets.to(built.device)
        optimizer.zero_grad()
        loss = built.loss_fn(model(features), targets)
        loss.backward()
        if probe is not None:
            probe.before_step()
        optimizer.step()
        progress.steps += 1
        if len(targets):
            loss_value = loss.item()
            loss_sum += loss_value * len(targets)
            loss_count += len(targets)
            if built.world_size == 1 and not math.isfinite(loss_value):
                progress.divergence = f"the training loss is {loss_value} at epoch {epoch}, step {progress.steps}"
                break
        stats: dict[str, Any] = dict(getattr(optimizer, "last_stats", {}))
        if probe is not None:
            stats.update(probe.after_step())
        for key, value in stats.items():
            progress.step_stats.setdefault(key, []).append(_finite_or_none(value))
    if built.world_size > 1:
        loss_sum, loss_count = dist_utils.all_reduce_sums([loss_sum, loss_count], built.device)
    return loss_sum, loss_count


def _end_epoch(config: TrainConfig, built: _Built, progress: _RunHistory, epoch: int, loss: tuple[float, int]) -> bool:
    """Evaluate and record the epoch; ``False`` if the run diverged (a :class:`TrainingDiverged` error with
    ``on_divergence="raise"``, else a record with null metrics)."""
    metric, (loss_sum, loss_count) = built.metric, loss
    if progress.divergence is None:
        summary = {
            "epoch": epoch,
            "train_loss": loss_sum / max(loss_count, 1),
            f"val_{metric}": _evaluate(built.model, built.splits.validation, built.splits.task, built.device),
            f"test_{metric}": _evaluate(built.model, built.splits.test, built.splits.task, built.device),
        }
        bad = [key for key, value in summary.items() if not math.isfinite(value)]
        if bad:
            progress.divergence = f"{', '.join(bad)} not finite at the end of epoch {epoch}"
    if progress.divergence is not None:
        progress.per_epoch.append({"epoch": epoch, "train_loss": None, f"val_{metric}": None, f"test_{metric}": None})
        if config.on_divergence == "raise":
            raise TrainingDiverged(
                f"training diverged: {progress.divergence} (lr={config.lr}); lower lr, or set "
                "on_divergence='record' to keep a record of the diverged run"
            )
        return False
    progress.per_epoch.append(summary)
    progress.epoch = epoch
    return True


def _record(config: TrainConfig, progress: _RunHistory, built: _Built) -> dict[str, Any]:
    """The run's JSON-ready record: strict JSON, with ``None`` for whatever a diverged run could not measure."""
    accounting: Spent | None = None
    optimizer, metric, n_train = built.optimizer, built.metric, len(built.splits.train)
    if isinstance(optimizer, AdaptiveClipDPOptimizer):
        optimizer.get_epsilon()
        accounting = optimizer.accounting
    last = progress.per_epoch[-1] if progress.per_epoch and progress.divergence is None else {}
    step_stats = progress.step_stats
    return {
        "config": dataclasses.asdict(config),
        "seed": config.seed,
        "method": config.method,
        "dataset": config.dataset,
        "model": config.model,
        "epsilon": None if accounting is None else accounting.epsilon,
        "target_epsilon": config.epsilon,
        "delta": built.delta,
        "accountant": config.accountant if config.method != NONPRIVATE else None,
        "epsilon_accountant": None if accounting is None else accounting.accountant,
        "accounting_fallback": None if accounting is None else accounting.fallback,
        "noise_multiplier": built.noise_multiplier,
        "method_params": built.method_params,
        "sample_rate": built.sample_rate,
        "steps": progress.steps,
        "train_size": n_train,
        "world_size": built.world_size,
        "diverged": progress.divergence is not None,
        "divergence": progress.divergence,
        "resumed_at_epoch": progress.resumed_at_epoch,
        f"val_{metric}": last.get(f"val_{metric}"),
        f"test_{metric}": last.get(f"test_{metric}"),
        "per_epoch": progress.per_epoch,
        "step_stats": step_stats,
        "step_stats_mean": {key: _mean(values) for key, values in step_stats.items()},
        "wall_time_s": progress.wall_time_s,
        "examples_per_s": len(progress.per_epoch) * n_train / progress.wall_time_s if progress.wall_time_s else None,
        "versions": _versions(),
    }


def _mean(values: list[Any]) -> float | None:
    """The mean of the defined values (a diagnostic is ``None`` on a step where it is undefined or not finite)."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None
