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

Nothing silent: every config value is checked (types included) before data is loaded, and the
output destinations before any training; with a given sigma, epsilon for the planned steps is
computed before training (a sigma the accountants cannot handle fails first; see
:mod:`adaclip.privacy.accounting` for the bounded accountants and their RDP fallback, which the record
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

from adaclip._validate import as_int, as_real
from adaclip.engine import AdaptiveClipDPOptimizer, make_private
from adaclip.engine import distributed as dist_utils
from adaclip.engine.sampling import (
    BatchedTensorDataset,
    collate_gathered,
    load_loader_state_dict,
    loader_state_dict,
)
from adaclip.methods import METHODS, NONPRIVATE, build_rule
from adaclip.privacy.accounting import ACCOUNTANTS, MAX_NOISE_MULTIPLIER, Spent, account
from adaclip.research.data import Splits
from adaclip.research.datasets import dataset_names, dataset_spec, datasets_taking, file_datasets, load_dataset
from adaclip.research.diagnostics import ReleaseProbe
from adaclip.research.io import write_bytes_atomic, write_text_atomic
from adaclip.research.models import MODELS, build_model
from adaclip.research.params import is_device_name
from adaclip.research.records import check_destination, to_json


def default_lr(dataset: str, method: str) -> float:
    """The default learning rate of ``method`` on ``dataset`` (its spec's ``defaults``)."""
    return dataset_spec(dataset).defaults.lr_for(method)


DIVERGENCE_POLICIES = ("raise", "record")


class TrainingDiverged(ValueError):
    """The training loss or a metric became non-finite (``on_divergence="raise"``); the message says where."""


@dataclass
class TrainConfig:
    """Everything one run needs; ``None`` means the dataset's default (its spec's ``defaults``).

    ``task`` is a label only (the pipeline's name for the dataset, model and setting, e.g. ``scatternet``).
    ``diagnostics`` records :mod:`adaclip.research.diagnostics` every step (not private: a research tool).
    For ``method="nonprivate"`` the privacy settings (``epsilon``, ``noise_multiplier``, ``delta``) are
    checked but not used (a sweep may share one setting across methods); the command line refuses them.
    ``on_divergence``: ``"raise"`` (a :class:`TrainingDiverged` error) or ``"record"`` (stop and record
    ``diverged: true``) when the training loss or a metric becomes non-finite.
    """

    dataset: str
    task: str | None = None
    method: str = "adaclip"
    model: str | None = None
    epsilon: float | None = 3.0
    noise_multiplier: float | None = None
    delta: float | None = None
    accountant: str = "prv"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.0
    seed: int = 0
    method_params: dict[str, Any] = field(default_factory=dict)
    train_size: int | None = None
    feature_spread: float | None = None
    data_dir: str | None = None
    device: str = "cpu"
    diagnostics: bool = False
    check_replicas: bool = False
    progress: bool = True
    on_divergence: str = "raise"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a mapping of TrainConfig keys, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(map(str, values)) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        if "dataset" not in values:
            raise ValueError(f"config needs 'dataset', one of {dataset_names()}")
        return cls(**values)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _number(name: str, value: Any, *, low: float = 0.0, low_open: bool = True, high: float = math.inf) -> float:
    """A finite real number (NumPy scalars included) in the range, as a plain float; else a one-line error."""
    number = as_real(value)
    fits = (
        number is not None
        and math.isfinite(number)
        and (number > low if low_open else number >= low)
        and number <= high
    )
    if not fits or number is None:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        limit = "" if high == math.inf else f" and <= {high:g}"
        raise ValueError(f"{name} must be a finite number {bound}{limit}, got {value!r}")
    return number


def _integer(name: str, value: Any, minimum: int) -> int:
    number = as_int(value)
    if number is None or number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return number


def _one_of(name: str, value: Any, options: tuple[str, ...]) -> str:
    _check(isinstance(value, str) and value in options, f"{name} must be one of {list(options)}, got {value!r}")
    return str(value)


def _flag(name: str, value: Any) -> bool:
    _check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
    return bool(value)


def _check_device_present(device: str) -> None:
    """A CUDA device must exist here (checked when a run starts, not when configs are validated)."""
    parsed = torch.device(device)
    if parsed.type == "cuda":
        _check(
            torch.cuda.is_available(),
            f"device={device!r} but torch sees no CUDA device (torch {torch.__version__}); use device 'cpu'",
        )
        count = torch.cuda.device_count()
        _check(
            (parsed.index or 0) < count,
            f"device={device!r} but this machine has {count} CUDA device(s): use cuda:0 ... cuda:{count - 1}",
        )


def _privacy_fields(config: TrainConfig) -> dict[str, Any]:
    """``epsilon``, ``noise_multiplier`` and ``delta``, each checked when given (plain floats)."""
    values: dict[str, Any] = {"epsilon": None, "noise_multiplier": None, "delta": None}
    if config.epsilon is not None:
        values["epsilon"] = _number("epsilon", config.epsilon)
    if config.noise_multiplier is not None:
        values["noise_multiplier"] = _number("noise_multiplier", config.noise_multiplier, high=MAX_NOISE_MULTIPLIER)
    if config.delta is not None:
        values["delta"] = _number("delta", config.delta, high=1.0)
        _check(values["delta"] < 1, f"delta must lie in (0, 1), got {config.delta!r}")
    return values


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill dataset defaults and validate every field (types included) before any data is loaded.

    Numbers are returned as plain Python ``int`` / ``float`` (NumPy scalars are accepted), so a record
    is always JSON.
    """
    _one_of("dataset", config.dataset, dataset_names())
    _one_of("method", config.method, (*METHODS, NONPRIVATE))  # the registry as it is now
    defaults = dataset_spec(config.dataset).defaults
    _check(
        isinstance(config.method_params, dict) and all(isinstance(k, str) for k in config.method_params),
        "method_params must be a mapping of the method's parameters, e.g. {initial_clip: 0.5}, "
        f"got {config.method_params!r}",
    )
    _check(
        config.model is None or isinstance(config.model, str), f"model must be one of {MODELS}, got {config.model!r}"
    )
    resolved = dataclasses.replace(
        config,
        model=config.model or defaults.model,
        epochs=_integer("epochs", config.epochs if config.epochs is not None else defaults.epochs, 1),
        batch_size=_integer(
            "batch_size", config.batch_size if config.batch_size is not None else defaults.batch_size, 1
        ),
        lr=_number("lr", config.lr if config.lr is not None else default_lr(config.dataset, config.method)),
        momentum=_number("momentum", config.momentum, low_open=False),
        seed=_integer("seed", config.seed, 0),
        train_size=None if config.train_size is None else _integer("train_size", config.train_size, 1),
        feature_spread=None if config.feature_spread is None else _number("feature_spread", config.feature_spread),
        method_params=dict(config.method_params),
        **_privacy_fields(config),
    )
    _one_of("model", resolved.model, MODELS)
    _check(
        resolved.feature_spread is None
        or (resolved.dataset in datasets_taking("feature_spread") and resolved.feature_spread >= 1),
        "feature_spread is the synthetic dataset's spread of feature scales, a number >= 1; "
        f"got {config.feature_spread!r} for dataset {resolved.dataset!r}",
    )
    _check(resolved.momentum < 1, f"momentum must lie in [0, 1), got {config.momentum!r}")
    _one_of("accountant", resolved.accountant, ACCOUNTANTS)
    _one_of("on_divergence", resolved.on_divergence, DIVERGENCE_POLICIES)
    _check(
        resolved.data_dir is None or (isinstance(resolved.data_dir, str) and resolved.data_dir != ""),
        f"data_dir must be a folder path, got {resolved.data_dir!r}",
    )
    _check(
        resolved.data_dir is None or resolved.dataset in file_datasets(),
        f"data_dir is for the datasets read from files {list(file_datasets())}; {resolved.dataset!r} needs no files",
    )
    _check(is_device_name(resolved.device), f"device must be 'cpu', 'cuda' or 'cuda:i', got {resolved.device!r}")
    for name in ("diagnostics", "check_replicas", "progress"):
        _flag(name, getattr(resolved, name))
    if resolved.method == NONPRIVATE:
        _check(
            not resolved.method_params,
            f"method 'nonprivate' takes no method_params, got {resolved.method_params!r}",
        )
        return dataclasses.replace(resolved, epsilon=None, noise_multiplier=None, delta=None)
    _check(
        (resolved.epsilon is None) != (resolved.noise_multiplier is None),
        "give exactly one of epsilon (target) and noise_multiplier; set the other to null",
    )
    # every hyperparameter of the rule is checked now, before data loading and sigma calibration
    build_rule(resolved.method, noise_multiplier=0.0, expected_batch_size=resolved.batch_size, **resolved.method_params)
    return resolved


def default_delta(dataset_size: int) -> float:
    """``1e-5`` if that is below ``1 / N``, else ``N^-1.1`` (delta must stay well below ``1 / N``)."""
    return 1e-5 if 1 / dataset_size > 1e-5 else dataset_size**-1.1


def _check_parallel(config: TrainConfig, world_size: int) -> None:
    """What a run under several ranks cannot do, named before any data is loaded."""
    if world_size == 1:
        _check(
            not config.check_replicas,
            "check_replicas compares the ranks of a torchrun launch; with one process set it false",
        )
        return
    _check(
        not config.diagnostics,
        "diagnostics read the clean per-rank gradient and run in one process only; drop --diagnostics or torchrun",
    )
    _check(
        config.method != NONPRIVATE or config.batch_size % world_size == 0,
        f"the non-private baseline splits batch_size={config.batch_size} evenly over {world_size} ranks: "
        "use a batch size divisible by --nproc_per_node",
    )
    _check(
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
    _flag("resume", resume)
    if out is not None:
        check_destination(out, "out")
    if checkpoint is None:
        _check(not resume, "resume needs a checkpoint path to resume from (--checkpoint PATH)")
        return
    _check(
        world_size == 1,
        "checkpoints are written by a single process: drop --checkpoint under torchrun (one sampling state per rank)",
    )
    path = check_destination(checkpoint, "checkpoint")
    if resume:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist: nothing to resume (drop --resume to start)")
    else:
        _check(
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
    _check(
        isinstance(saved, dict) and saved.get("format") == CHECKPOINT_FORMAT,
        f"checkpoint {path} was not written by this version of adaclip's trainer",
    )
    own = dataclasses.asdict(config)
    differing = sorted(k for k in own if k != "progress" and saved["config"].get(k) != own[k])
    _check(
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
    _check(isinstance(config, TrainConfig), f"config must be a TrainConfig or a mapping, got {type(config).__name__}")
    config = resolve(config)
    world_size = dist_utils.world_size()
    _check_parallel(config, world_size)
    _check_device_present(config.device)
    _check_outputs(out, checkpoint, resume, world_size)
    device = f"cuda:{torch.cuda.current_device()}" if world_size > 1 and config.device == "cuda" else config.device
    # moved to the device once (not per batch); sampling and evaluation gather batches there
    splits: Splits = load_dataset(
        config.dataset,
        seed=config.seed,
        train_size=config.train_size,
        data_dir=config.data_dir,
        **({} if config.feature_spread is None else {"feature_spread": config.feature_spread}),
    ).to(device)
    n_train = len(splits.train)
    _check(
        config.batch_size <= n_train,
        f"batch_size={config.batch_size} exceeds the {n_train} training examples; lower it",
    )
    delta = None
    if config.method != NONPRIVATE:
        delta = config.delta if config.delta is not None else default_delta(n_train)
        _check(
            delta < 1 / n_train,
            f"delta={delta} must be below 1/N = {1 / n_train:.3g} for N={n_train} training examples",
        )
        if config.noise_multiplier is not None:  # epsilon of the planned steps, before any training
            sample_rate = config.batch_size / n_train
            account(
                noise_multiplier=config.noise_multiplier,
                sample_rate=sample_rate,
                steps=config.epochs * int(1 / sample_rate),
                delta=delta,
                accountant=config.accountant,  # checked by resolve
            )

    torch.manual_seed(config.seed)
    task = splits.task
    model = build_model(config.model, splits.input_shape, splits.num_classes or 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    loss_fn = nn.functional.cross_entropy if task == "classification" else nn.functional.mse_loss
    loader: Any
    if config.method == NONPRIVATE and world_size > 1:
        sampler = DistributedSampler(splits.train, shuffle=True, seed=config.seed)
        loader = DataLoader(splits.train, batch_size=config.batch_size // world_size, sampler=sampler)
        model = DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
        noise_multiplier, sample_rate, method_params = None, None, {}
    elif config.method == NONPRIVATE:
        loader = DataLoader(
            BatchedTensorDataset(*splits.train.tensors),  # one gather per batch, not a __getitem__ per example
            batch_size=config.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(config.seed),
            collate_fn=collate_gathered,
        )
        noise_multiplier, sample_rate, method_params = None, None, {}
    else:
        model, optimizer, loader = make_private(
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
        noise_multiplier, sample_rate = optimizer.noise_multiplier, optimizer.sample_rate
        method_params = optimizer.rule.hyperparameters()

    progress = _RunHistory()
    if resume and checkpoint is not None:
        progress = _load_checkpoint(checkpoint, config, model, optimizer, loader, device)
    metric = "accuracy" if task == "classification" else "mse"
    probe = ReleaseProbe(optimizer, config.lr) if config.diagnostics and config.method != NONPRIVATE else None
    start = time.perf_counter()
    show = config.progress and not os.environ.get("TQDM_DISABLE") and dist_utils.rank() == 0
    with warnings.catch_warnings():
        # torch warns about Opacus's hooks when the inputs do not require grad; harmless here
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for epoch in range(progress.epoch + 1, config.epochs + 1):
            if isinstance(getattr(loader, "sampler", None), DistributedSampler):
                loader.sampler.set_epoch(epoch)
            loss_sum, loss_count = 0.0, 0
            for features, targets in tqdm(
                loader, desc=f"{config.method} epoch {epoch}/{config.epochs}", disable=not show, leave=False
            ):
                features, targets = features.to(device), targets.to(device)
                optimizer.zero_grad()
                loss = loss_fn(model(features), targets)
                loss.backward()
                if probe is not None:
                    probe.before_step()
                optimizer.step()
                progress.steps += 1
                if len(targets):
                    loss_value = loss.item()
                    loss_sum += loss_value * len(targets)
                    loss_count += len(targets)
                    if world_size == 1 and not math.isfinite(loss_value):
                        progress.divergence = (
                            f"the training loss is {loss_value} at epoch {epoch}, step {progress.steps}"
                        )
                        break
                stats: dict[str, Any] = dict(getattr(optimizer, "last_stats", {}))
                if probe is not None:
                    stats.update(probe.after_step())
                for key, value in stats.items():
                    progress.step_stats.setdefault(key, []).append(_finite_or_none(value))
            if world_size > 1:
                loss_sum, loss_count = dist_utils.all_reduce_sums([loss_sum, loss_count], device)
            if progress.divergence is None:
                summary = {
                    "epoch": epoch,
                    "train_loss": loss_sum / max(loss_count, 1),
                    f"val_{metric}": _evaluate(model, splits.validation, task, device),
                    f"test_{metric}": _evaluate(model, splits.test, task, device),
                }
                bad = [key for key, value in summary.items() if not math.isfinite(value)]
                if bad:
                    progress.divergence = f"{', '.join(bad)} not finite at the end of epoch {epoch}"
            if progress.divergence is not None:
                progress.per_epoch.append(
                    {"epoch": epoch, "train_loss": None, f"val_{metric}": None, f"test_{metric}": None}
                )
                if config.on_divergence == "raise":
                    raise TrainingDiverged(
                        f"training diverged: {progress.divergence} (lr={config.lr}); lower lr, or set "
                        "on_divergence='record' to keep a record of the diverged run"
                    )
                break
            progress.per_epoch.append(summary)
            progress.epoch = epoch
            if checkpoint is not None:
                progress.wall_time_s += time.perf_counter() - start
                start = time.perf_counter()
                _save_checkpoint(checkpoint, config, model, optimizer, loader, progress)
    progress.wall_time_s += time.perf_counter() - start
    record = _record(
        config, progress, optimizer, n_train, world_size, delta, noise_multiplier, sample_rate, method_params, metric
    )
    if out is not None and dist_utils.rank() == 0:
        write_text_atomic(out, to_json(record, indent=1) + "\n")
    return record


def _record(
    config: TrainConfig,
    progress: _RunHistory,
    optimizer: Any,
    n_train: int,
    world_size: int,
    delta: float | None,
    noise_multiplier: float | None,
    sample_rate: float | None,
    method_params: dict[str, Any],
    metric: str,
) -> dict[str, Any]:
    """The run's JSON-ready record: strict JSON, with ``None`` for whatever a diverged run could not measure."""
    accounting: Spent | None = None
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
        "delta": delta,
        "accountant": config.accountant if config.method != NONPRIVATE else None,
        "epsilon_accountant": None if accounting is None else accounting.accountant,
        "accounting_fallback": None if accounting is None else accounting.fallback,
        "noise_multiplier": noise_multiplier,
        "method_params": method_params,
        "sample_rate": sample_rate,
        "steps": progress.steps,
        "train_size": n_train,
        "world_size": world_size,
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
