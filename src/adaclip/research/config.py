"""One training run's configuration: :class:`TrainConfig`, which checks itself, and :func:`resolve`.

A :class:`TrainConfig` is frozen and keyword-only; constructing one checks every field (types included)
and converts numbers to plain Python ``int`` / ``float`` (NumPy scalars are accepted), so a record is
always JSON.  ``None`` means the dataset's default (the ``defaults`` of its
:class:`~adaclip.research.datasets.DatasetSpec`; the built-in datasets' are in ``defaults.yaml``);
:func:`resolve` fills those in and returns a new config, which checks itself again (the filled values and
the method's hyperparameters, which need the batch size).  Each field's metadata carries its command-line
help (:func:`adaclip.research.cli.parser` builds the ``train`` options from the fields).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from adaclip._validate import (
    require_at_most,
    require_bool,
    require_device,
    require_in_range,
    require_int,
    require_one_of,
    require_open_unit,
    require_path,
    require_positive,
    require_seed,
    require_str_keys,
)
from adaclip.methods import METHODS, NONPRIVATE, build_rule, check_method
from adaclip.privacy.accounting import ACCOUNTANTS, MAX_NOISE_MULTIPLIER
from adaclip.research.datasets import check_data_dir, dataset_names, dataset_spec, datasets_taking
from adaclip.research.models import MODELS

DIVERGENCE_POLICIES = ("raise", "record")
"""What a run does when its training loss or a metric becomes non-finite (see :class:`TrainConfig`)."""


def method_names() -> tuple[str, ...]:
    """Every method a run accepts: the registry as it is now, and the non-private baseline."""
    return (*METHODS, NONPRIVATE)


def _option(help: str, *, choices: Any = None, flag: str | None = None) -> dict[str, Any]:
    """A field's command-line option: its help, its choices (a callable: read when the parser is built) and,
    where it differs from ``--field-name``, its flag."""
    return {"help": help, "choices": choices, "flag": flag}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one run needs; ``None`` means the dataset's default (see ``defaults.yaml``).

    ``task`` is a label only (the pipeline's name for the dataset, model and setting, e.g. ``scatternet``).
    ``diagnostics`` records :mod:`adaclip.research.diagnostics` every step (not private: a research tool).
    For ``method="nonprivate"`` the privacy settings (``epsilon``, ``noise_multiplier``, ``delta``) are
    checked but not used (a sweep may share one setting across methods); the command line refuses them.
    ``on_divergence``: ``"raise"`` (a :class:`~adaclip.research.train.TrainingDiverged` error) or
    ``"record"`` (stop and record ``diverged: true``) when the training loss or a metric becomes non-finite.
    """

    dataset: str = field(metadata=_option("the dataset", choices=dataset_names))
    task: str | None = field(default=None, metadata=_option("a label for the record (the pipeline's task name)"))
    method: str = field(default="adaclip", metadata=_option("clipping method", choices=method_names))
    model: str | None = field(default=None, metadata=_option("unset: the dataset's (cnn for images)", choices=MODELS))
    epsilon: float | None = field(default=3.0, metadata=_option("target epsilon; sigma is calibrated for it"))
    noise_multiplier: float | None = field(default=None, metadata=_option("use this sigma instead of a target epsilon"))
    delta: float | None = field(default=None, metadata=_option("unset: 1e-5, or N^-1.1 if 1e-5 >= 1/N"))
    accountant: str = field(default="prv", metadata=_option("privacy accountant", choices=lambda: ACCOUNTANTS))
    epochs: int | None = field(default=None, metadata=_option("unset: the dataset's"))
    batch_size: int | None = field(
        default=None, metadata=_option("expected (Poisson) batch size; unset: the dataset's")
    )
    lr: float | None = field(default=None, metadata=_option("learning rate of SGD; unset: the dataset's"))
    momentum: float = field(default=0.0, metadata=_option("momentum of SGD, in [0, 1)"))
    seed: int = field(default=0, metadata=_option("fixes split, init, sampling and noise"))
    method_params: dict[str, Any] = field(
        default_factory=dict,
        metadata=_option("method parameter, e.g. --param initial_clip=0.5 (repeatable)", flag="--param"),
    )
    train_size: int | None = field(
        default=None, metadata=_option("subsample the training split to this many examples; unset: all")
    )
    feature_spread: float | None = field(
        default=None,
        metadata=_option("synthetic only: largest / smallest feature scale; unset: the synthetic dataset's default"),
    )
    data_dir: str | None = field(
        default=None,
        metadata=_option("folder with the dataset's files (IDX .gz for images); unset: the default places"),
    )
    device: str = field(default="cpu", metadata=_option("cpu, cuda or cuda:i"))
    diagnostics: bool = field(
        default=False,
        metadata=_option("also record each step's cosine to the clean (non-private) gradient; a report diagnostic"),
    )
    check_replicas: bool = field(
        default=False,
        metadata=_option(
            "under torchrun: assert every step that all ranks hold the same state and parameters "
            "(debugging; one broadcast per tensor)"
        ),
    )
    progress: bool = field(
        default=True, metadata=_option("no progress bar (or set TQDM_DISABLE=1)", flag="--no-progress")
    )
    on_divergence: str = field(
        default="raise",
        metadata=_option(
            "a non-finite loss or metric: stop with an error (raise) or record diverged: true (record)",
            choices=lambda: DIVERGENCE_POLICIES,
        ),
    )

    def __post_init__(self) -> None:
        for name, value in _checked_fields(self).items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a mapping of its keys (a YAML file, a sweep's cell); an unknown key is named."""
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a mapping of TrainConfig keys, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(map(str, values)) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        if "dataset" not in values:
            raise ValueError(f"config needs 'dataset', one of {list(dataset_names())}")
        return cls(**values)


def _optional(check: Any, name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
    """``None`` (the dataset's default, or not set) or what ``check`` accepts."""
    return None if value is None else check(name, value, *args, **kwargs)


def _checked_fields(config: TrainConfig) -> dict[str, Any]:
    """Every field of ``config`` checked (a one-line ``ValueError`` naming the first bad one), as plain values."""
    values = {
        "dataset": require_one_of("dataset", config.dataset, dataset_names()),
        "method": require_one_of("method", config.method, method_names()),
        "method_params": require_str_keys("method_params", config.method_params, "{initial_clip: 0.5}"),
        "model": _optional(require_one_of, "model", config.model, MODELS),
        "epochs": _optional(require_int, "epochs", config.epochs),
        "batch_size": _optional(require_int, "batch_size", config.batch_size),
        "lr": _optional(require_positive, "lr", config.lr),
        "momentum": require_in_range("momentum", config.momentum, 0.0, 1.0),
        "seed": require_seed("seed", config.seed),
        "train_size": _optional(require_int, "train_size", config.train_size),
        "feature_spread": _optional(require_positive, "feature_spread", config.feature_spread),
        "epsilon": _optional(require_positive, "epsilon", config.epsilon),
        "noise_multiplier": _optional(
            require_at_most, "noise_multiplier", config.noise_multiplier, MAX_NOISE_MULTIPLIER
        ),
        "delta": _optional(require_open_unit, "delta", config.delta),
        "accountant": require_one_of("accountant", config.accountant, ACCOUNTANTS),
        "on_divergence": require_one_of("on_divergence", config.on_divergence, DIVERGENCE_POLICIES),
        "data_dir": _optional(require_path, "data_dir", config.data_dir),
        "device": require_device("device", config.device),
        **{name: require_bool(name, getattr(config, name)) for name in ("diagnostics", "check_replicas", "progress")},
    }
    _check_combinations(config, values)
    return values


def _check_combinations(config: TrainConfig, values: dict[str, Any]) -> None:
    """The settings that only make sense together; the method's hyperparameters once the batch size is known."""
    dataset, method, params = values["dataset"], values["method"], values["method_params"]
    spread = values["feature_spread"]
    if spread is not None and (dataset not in datasets_taking("feature_spread") or spread < 1):
        raise ValueError(
            f"feature_spread is the spread of feature scales of {list(datasets_taking('feature_spread'))}, a number "
            f">= 1; got {config.feature_spread!r} for dataset {dataset!r}"
        )
    if values["data_dir"] is not None:
        check_data_dir(dataset, values["data_dir"])
    if method == NONPRIVATE:
        if params:
            raise ValueError(f"method {NONPRIVATE!r} takes no method_params, got {params!r}")
        return
    if (values["epsilon"] is None) == (values["noise_multiplier"] is None):
        raise ValueError("give exactly one of epsilon (target) and noise_multiplier; set the other to null")
    check_method(method, params)
    if values["batch_size"] is not None:  # every hyperparameter of the rule, before data loading and calibration
        build_rule(method, noise_multiplier=0.0, expected_batch_size=values["batch_size"], **params)


def resolve(config: TrainConfig) -> TrainConfig:
    """``config`` with the dataset's defaults filled in (a new config, checked as every config is): model, epochs,
    batch size and learning rate (``defaults.yaml``); the non-private baseline's privacy settings set to ``None``."""
    defaults = dataset_spec(config.dataset).defaults
    filled = dataclasses.replace(
        config,
        model=config.model or defaults.model,
        epochs=config.epochs if config.epochs is not None else defaults.epochs,
        batch_size=config.batch_size if config.batch_size is not None else defaults.batch_size,
        lr=config.lr if config.lr is not None else defaults.lr_for(config.method),
    )
    if filled.method == NONPRIVATE:
        return dataclasses.replace(filled, epsilon=None, noise_multiplier=None, delta=None)
    return filled


def default_delta(dataset_size: int) -> float:
    """``1e-5`` if that is below ``1 / N``, else ``N^-1.1`` (delta must stay well below ``1 / N``)."""
    return 1e-5 if 1 / dataset_size > 1e-5 else dataset_size**-1.1
