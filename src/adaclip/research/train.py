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

Inside a ``torch.distributed`` process group of several ranks (``torchrun``; see
:mod:`adaclip.engine.distributed`) the same call trains data-parallel: private methods through
``make_private(..., distributed=True)`` (the batch size stays the global expected batch size),
the non-private baseline with ``DistributedDataParallel`` (each rank a ``1 / W`` share of the batch);
evaluation is sharded and summed over ranks; only rank 0 writes ``out``.
"""

from __future__ import annotations

import dataclasses
import json
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
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset
from tqdm import tqdm

from adaclip.engine import AdaptiveClipDPOptimizer, make_private
from adaclip.engine import distributed as dist_utils
from adaclip.methods import METHODS, build_rule
from adaclip.privacy.accounting import ACCOUNTANTS
from adaclip.research.data import DATASETS, Splits, load_dataset
from adaclip.research.diagnostics import ReleaseProbe
from adaclip.research.models import MODELS, build_model
from adaclip.research.params import is_device_name
from adaclip.research.reporting import write_text_atomic

PRIVATE_METHODS = tuple(sorted(METHODS))
ALL_METHODS = (*PRIVATE_METHODS, "nonprivate")

# Per dataset: default model, expected batch size, epochs, the learning rate of every private method
# and of the non-private baseline, and per-method learning rates where one was measured to differ.
# The image rates are the best of a three-point search with the tanh CNN on Fashion-MNIST at epsilon = 3,
# 5 epochs (reports/probes/fmnist_eps3_cnn*.md; GeoClip's with rank=64, which the CNN needs).  The
# tabular and synthetic rates are the best on validation of a three-point search at epsilon = 3 over
# seeds 0 and 1 (reports/probes/new_methods.md).  A method without an entry in ``method_lr`` uses ``lr``.
IMAGE_DEFAULTS: dict[str, Any] = {
    "model": "cnn",
    "batch_size": 256,
    "epochs": 10,
    "lr": 1.0,
    "nonprivate_lr": 0.25,
    "method_lr": {"adaclip": 0.03, "quantile": 4.0, "geoclip": 0.3},
}
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "fashion-mnist": IMAGE_DEFAULTS,
    "mnist": IMAGE_DEFAULTS,
    # ScatterNet + linear (Tramèr & Boneh 2021's setting has B = 8192, momentum 0.9 and lr 16 with C = 0.1)
    "fashion-mnist-scatternet": {
        "model": "logistic",
        "batch_size": 8192,
        "epochs": 30,
        "lr": 1.6,
        "nonprivate_lr": 1.0,
        "method_lr": {"adaclip": 0.1, "quantile": 0.05, "geoclip": 0.1},
    },
    "breast-cancer": {
        "model": "logistic",
        "batch_size": 32,
        "epochs": 20,
        "lr": 0.5,
        "nonprivate_lr": 0.1,
        "method_lr": {},
    },
    "diabetes": {"model": "linear", "batch_size": 32, "epochs": 20, "lr": 0.1, "nonprivate_lr": 0.05, "method_lr": {}},
    "synthetic": {
        "model": "logistic",
        "batch_size": 100,
        "epochs": 5,
        "lr": 0.5,
        "nonprivate_lr": 0.1,
        # placeholders until a search: the Adam rules release Adam steps; these learn in the tiny run of the tests
        "method_lr": {"macadam": 0.005, "adambc": 0.003},
    },
}


def default_lr(dataset: str, method: str) -> float:
    """The default learning rate of ``method`` on ``dataset`` (see ``DATASET_DEFAULTS``)."""
    defaults = DATASET_DEFAULTS[dataset]
    if method == "nonprivate":
        return float(defaults["nonprivate_lr"])
    return float(defaults["method_lr"].get(method, defaults["lr"]))


@dataclass
class TrainConfig:
    """Everything one run needs; ``None`` means the dataset's default (see ``DATASET_DEFAULTS``).

    ``task`` is a label only (the pipeline's name for the dataset, model and setting, e.g. ``scatternet``).
    ``diagnostics`` records :mod:`adaclip.research.diagnostics` every step (not private: a research tool).
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
    data_dir: str | None = None
    device: str = "cpu"
    diagnostics: bool = False
    check_replicas: bool = False
    progress: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        if "dataset" not in values:
            raise ValueError(f"config needs 'dataset', one of {DATASETS}")
        return cls(**values)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill dataset defaults and validate every field before any data is loaded."""
    _check(config.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {config.dataset!r}")
    _check(config.method in ALL_METHODS, f"method must be one of {ALL_METHODS}, got {config.method!r}")
    defaults = DATASET_DEFAULTS[config.dataset]
    resolved = dataclasses.replace(
        config,
        model=config.model or defaults["model"],
        epochs=config.epochs if config.epochs is not None else defaults["epochs"],
        batch_size=config.batch_size if config.batch_size is not None else defaults["batch_size"],
        lr=config.lr if config.lr is not None else default_lr(config.dataset, config.method),
        method_params=dict(config.method_params),
    )
    _check(resolved.model in MODELS, f"model must be one of {MODELS}, got {resolved.model!r}")
    _check(_is_int(resolved.epochs) and resolved.epochs >= 1, f"epochs must be an int >= 1, got {resolved.epochs!r}")
    _check(
        _is_int(resolved.batch_size) and resolved.batch_size >= 1,
        f"batch_size must be an int >= 1, got {resolved.batch_size!r}",
    )
    _check(_is_number(resolved.lr) and resolved.lr > 0, f"lr must be a number > 0, got {resolved.lr!r}")
    _check(
        _is_number(resolved.momentum) and 0 <= resolved.momentum < 1,
        f"momentum must lie in [0, 1), got {resolved.momentum!r}",
    )
    _check(_is_int(resolved.seed) and resolved.seed >= 0, f"seed must be an int >= 0, got {resolved.seed!r}")
    _check(resolved.accountant in ACCOUNTANTS, f"accountant must be one of {ACCOUNTANTS}, got {resolved.accountant!r}")
    _check(
        resolved.train_size is None or (_is_int(resolved.train_size) and resolved.train_size >= 1),
        f"train_size must be an int >= 1, got {resolved.train_size!r}",
    )
    _check(is_device_name(resolved.device), f"device must be 'cpu', 'cuda' or 'cuda:i', got {resolved.device!r}")
    _check(isinstance(resolved.diagnostics, bool), f"diagnostics must be true or false, got {resolved.diagnostics!r}")
    _check(
        isinstance(resolved.check_replicas, bool),
        f"check_replicas must be true or false, got {resolved.check_replicas!r}",
    )
    if resolved.method == "nonprivate":
        return dataclasses.replace(resolved, epsilon=None, noise_multiplier=None, delta=None)
    _check(
        (resolved.epsilon is None) != (resolved.noise_multiplier is None),
        "give exactly one of epsilon (target) and noise_multiplier; set the other to null",
    )
    if resolved.epsilon is not None:
        _check(
            _is_number(resolved.epsilon) and resolved.epsilon > 0,
            f"epsilon must be a number > 0, got {resolved.epsilon!r}",
        )
    else:
        _check(
            _is_number(resolved.noise_multiplier) and resolved.noise_multiplier > 0,
            f"noise_multiplier must be a number > 0, got {resolved.noise_multiplier!r}",
        )
    _check(
        resolved.delta is None or (_is_number(resolved.delta) and 0 < resolved.delta < 1),
        f"delta must lie in (0, 1), got {resolved.delta!r}",
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
        config.method != "nonprivate" or config.batch_size % world_size == 0,
        f"the non-private baseline splits batch_size={config.batch_size} evenly over {world_size} ranks: "
        "use a batch size divisible by --nproc_per_node",
    )
    _check(
        not config.device.startswith("cuda:"),
        f"device={config.device!r} pins every rank to one GPU; use device 'cuda' (each rank takes cuda:LOCAL_RANK)",
    )


def _evaluate(model: nn.Module, dataset: TensorDataset, task: str, device: str) -> float:
    """Accuracy (classification) or mean squared error (regression) on ``dataset`` (each rank a share, summed)."""
    model.eval()
    total, count = 0.0, 0
    world_size = dist_utils.world_size()
    shard = dataset if world_size == 1 else Subset(dataset, range(dist_utils.rank(), len(dataset), world_size))
    with torch.no_grad():
        for features, targets in DataLoader(shard, batch_size=1024):
            outputs = model(features.to(device))
            targets = targets.to(device)
            if task == "classification":
                total += (outputs.argmax(1) == targets).sum().item()
            else:
                total += (outputs - targets).square().sum().item()
            count += len(targets)
    model.train()
    if world_size > 1:
        total, count = dist_utils.all_reduce_sums([total, count], device)
    return total / count


def _mean(values: list[Any]) -> float | None:
    """The mean of the defined values (a diagnostic is ``None`` on a step where it is undefined)."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _versions() -> dict[str, str]:
    names = ("torch", "opacus", "dp-accounting", "numpy", "adaclip")
    return {"python": platform.python_version(), **{n: metadata.version(n) for n in names}}


def run(config: TrainConfig | dict[str, Any], out: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Train one model as ``config`` says and return its metrics record (also written to ``out``)."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    config = resolve(config)
    world_size = dist_utils.world_size()
    _check_parallel(config, world_size)
    _check_device_present(config.device)
    device = f"cuda:{torch.cuda.current_device()}" if world_size > 1 and config.device == "cuda" else config.device
    # moved to the device once (not per batch); sampling and evaluation gather batches there
    splits: Splits = load_dataset(
        config.dataset, seed=config.seed, train_size=config.train_size, data_dir=config.data_dir
    ).to(device)
    n_train = len(splits.train)
    _check(
        config.batch_size <= n_train,
        f"batch_size={config.batch_size} exceeds the {n_train} training examples; lower it",
    )
    delta = None
    if config.method != "nonprivate":
        delta = config.delta if config.delta is not None else default_delta(n_train)
        _check(
            delta < 1 / n_train,
            f"delta={delta} must be below 1/N = {1 / n_train:.3g} for N={n_train} training examples",
        )

    torch.manual_seed(config.seed)
    task = splits.task
    model = build_model(config.model, splits.input_shape, splits.num_classes or 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    loss_fn = nn.functional.cross_entropy if task == "classification" else nn.functional.mse_loss
    loader: Any
    if config.method == "nonprivate" and world_size > 1:
        sampler = DistributedSampler(splits.train, shuffle=True, seed=config.seed)
        loader = DataLoader(splits.train, batch_size=config.batch_size // world_size, sampler=sampler)
        model = DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
        noise_multiplier, sample_rate, method_params = None, None, {}
    elif config.method == "nonprivate":
        loader = DataLoader(
            splits.train,
            batch_size=config.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(config.seed),
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

    metric = "accuracy" if task == "classification" else "mse"
    probe = ReleaseProbe(optimizer, config.lr) if config.diagnostics and config.method != "nonprivate" else None
    per_epoch: list[dict[str, Any]] = []
    step_stats: dict[str, list[float]] = {}
    steps, start = 0, time.perf_counter()
    show = config.progress and not os.environ.get("TQDM_DISABLE") and dist_utils.rank() == 0
    with warnings.catch_warnings():
        # torch warns about Opacus's hooks when the inputs do not require grad; harmless here
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for epoch in range(1, config.epochs + 1):
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
                steps += 1
                if len(targets):
                    loss_sum += loss.item() * len(targets)
                    loss_count += len(targets)
                stats: dict[str, Any] = dict(getattr(optimizer, "last_stats", {}))
                if probe is not None:
                    stats.update(probe.after_step())
                for key, value in stats.items():
                    step_stats.setdefault(key, []).append(value)
            if world_size > 1:
                loss_sum, loss_count = dist_utils.all_reduce_sums([loss_sum, loss_count], device)
            per_epoch.append(
                {
                    "epoch": epoch,
                    "train_loss": loss_sum / max(loss_count, 1),
                    f"val_{metric}": _evaluate(model, splits.validation, task, device),
                    f"test_{metric}": _evaluate(model, splits.test, task, device),
                }
            )
    wall_time = time.perf_counter() - start

    spent = optimizer.get_epsilon() if isinstance(optimizer, AdaptiveClipDPOptimizer) else None
    record = {
        "config": dataclasses.asdict(config),
        "seed": config.seed,
        "method": config.method,
        "dataset": config.dataset,
        "model": config.model,
        "epsilon": spent,
        "target_epsilon": config.epsilon,
        "delta": delta,
        "accountant": config.accountant if config.method != "nonprivate" else None,
        "noise_multiplier": noise_multiplier,
        "method_params": method_params,
        "sample_rate": sample_rate,
        "steps": steps,
        "train_size": n_train,
        "world_size": world_size,
        f"val_{metric}": per_epoch[-1][f"val_{metric}"],
        f"test_{metric}": per_epoch[-1][f"test_{metric}"],
        "per_epoch": per_epoch,
        "step_stats": step_stats,
        "step_stats_mean": {key: _mean(values) for key, values in step_stats.items()},
        "wall_time_s": wall_time,
        "examples_per_s": config.epochs * n_train / wall_time,
        "versions": _versions(),
    }
    if out is not None and dist_utils.rank() == 0:
        write_text_atomic(out, json.dumps(record, indent=1) + "\n")
    return record
