"""The report pipeline's parameters: one ``params.yaml``, read once into frozen, keyword-only dataclasses.

Every knob of ``dvc repro`` lives in ``params.yaml`` (the quick profile) or ``profiles/paper.yaml`` (the
full-size profile; same keys).  :func:`load_params` reads such a file into a :class:`Params` and
validates everything before any run starts: unknown or missing keys, types and ranges, and the
settings that only make sense together (a task's batch size against its training-set size, delta
against ``1 / N``, every method with a learning rate and a scale).  Every error names the dotted key
and what it accepts.

Sections: ``runtime`` (device, parallel workers), ``data`` (the datasets the prepare stage copies),
``features`` (the ScatterNet stage), ``setting`` (methods, accountant, delta, the main epsilon and
the tasks), ``tuning`` (the joint grid learning rate x scale per method at the main epsilon: claims 2
and 3), ``accuracy`` (claim 3), ``size`` (claim 4), ``diagnostics`` (claim 1), ``theory``,
``accounting``, ``audit`` (:class:`adaclip.audit.AuditConfig`) and ``bench`` (validated by
``benchmarks/bench.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

from adaclip._validate import (
    is_at_least,
    is_device_name,
    is_in_unit_interval,
    is_list_of,
    is_mapping,
    is_mapping_of,
    is_name,
    is_one_of,
    is_open_unit,
    is_optional,
    is_positive,
    is_positive_int,
    is_registered,
    is_seed,
    is_string,
    require_delta_below_inverse_n,
)
from adaclip.audit import AuditConfig, audit_config
from adaclip.methods import METHODS, NONPRIVATE, check_method
from adaclip.privacy.accounting import ACCOUNTANTS
from adaclip.research.datasets import dataset_names, dataset_spec, datasets_taking, datasets_with, prepared_datasets
from adaclip.research.models import MODELS
from adaclip.research.records import load_yaml

SWEEPS = ("tuning", "accuracy", "size", "diagnostics")
"""The training sweeps of the pipeline, each a section of the params file and a ``runs/<name>.jsonl``."""

Checker = Callable[[Any], bool]
if TYPE_CHECKING:
    from _typeshed import DataclassInstance

S = TypeVar("S", bound="DataclassInstance")


class _Described:
    """A description naming a registry's entries as they are when the message is written (``template`` has one
    ``{}``, the list of names)."""

    def __init__(self, template: str, names: Callable[[], tuple[str, ...]]) -> None:
        self.template, self.names = template, names

    def __str__(self) -> str:
        return self.template.format(list(self.names()))


def _checked(check: Checker, description: object) -> dict[str, Any]:
    """Field metadata: the key of the field's name, validated by ``check`` (``description`` says what it accepts)."""
    return {"check": check, "description": description}


def _frozen(value: Any) -> Any:
    """Lists become tuples (the sections are immutable)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def parse(kind: type[S], values: Any, path: str) -> S:
    """Build section ``kind`` from the mapping ``values`` found at dotted ``path``; every error names the key."""
    names = [f.name for f in fields(kind)]
    prefix = f"{path}." if path else ""
    if not isinstance(values, Mapping):
        raise ValueError(f"{path or 'the params file'} must be a mapping with keys {names}, got {values!r}")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {[prefix + str(k) for k in unknown]}; '{path or 'params'}' accepts {names}")
    optional = {f.name for f in fields(kind) if f.default is not MISSING}
    missing = [name for name in names if name not in values and name not in optional]
    if missing:
        raise ValueError(f"missing key(s) {[prefix + k for k in missing]}")
    converted = {}
    for item in fields(kind):
        if item.name not in values:  # an optional key left out: its default
            converted[item.name] = item.default
            continue
        value, where = values[item.name], prefix + item.name
        if "parser" in item.metadata:
            try:
                converted[item.name] = item.metadata["parser"](value)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        elif "section" in item.metadata:
            converted[item.name] = parse(item.metadata["section"], value, where)
        elif "named" in item.metadata:
            if not isinstance(value, Mapping) or not value:
                raise ValueError(f"{where} must be a non-empty mapping of names to sections, got {value!r}")
            converted[item.name] = {
                str(name): parse(item.metadata["named"], entry, f"{where}.{name}") for name, entry in value.items()
            }
        else:
            if not item.metadata["check"](value):
                raise ValueError(f"{where} must be {item.metadata['description']}, got {value!r}")
            converted[item.name] = _frozen(value)
    return kind(**converted)


_METHOD_NAMES = tuple(METHODS)
_SEEDS = (is_list_of(is_seed), "a non-empty list of ints >= 0 (each fixes init, sampling and noise)")


_number_map = is_mapping_of(is_positive)


@dataclass(frozen=True, kw_only=True)
class Runtime:
    device: str = field(metadata=_checked(is_device_name, "'cpu', 'cuda' or 'cuda:i'"))
    workers: int = field(
        metadata=_checked(is_positive_int, "an int >= 1 (runs in parallel, one process and one torch thread each)")
    )


@dataclass(frozen=True, kw_only=True)
class Data:
    datasets: tuple[str, ...] = field(
        metadata=_checked(
            is_list_of(is_registered(prepared_datasets)),
            _Described("a non-empty list of the datasets the prepare stage copies {}", prepared_datasets),
        )
    )


@dataclass(frozen=True, kw_only=True)
class Features:
    """The ScatterNet stage (:mod:`adaclip.research.features`)."""

    scales: int = field(metadata=_checked(is_positive_int, "an int >= 1 (J)"))
    orientations: int = field(metadata=_checked(is_positive_int, "an int >= 1 (L)"))
    groups: int = field(
        metadata=_checked(is_positive_int, "an int >= 1 (GroupNorm groups; must divide the channel count)")
    )
    limit: int = field(metadata=_checked(is_seed, "an int >= 0: 0 for every image, else only the first images (tests)"))


@dataclass(frozen=True, kw_only=True)
class Task:
    """One learning task: a dataset, a model, the optimisation setting, and the grid centre of every method.

    ``lr`` maps each method (and ``nonprivate``) to the centre of its learning-rate grid; for a method
    whose release scales with its scale parameter (``METHODS[m].step_per_scale``) the value is the step
    per unit of scale, ``lr x scale``, and the learning rate used is ``lr / scale``.  ``scale`` maps each
    method with a scale parameter to the centre of that parameter's grid.  ``feature_spread`` (optional,
    the synthetic dataset only) sets how unequal the synthetic features' scales are, and so how
    heterogeneous the per-example gradients' coordinates are.
    """

    dataset: str = field(metadata=_checked(is_registered(dataset_names), _Described("one of {}", dataset_names)))
    model: str = field(metadata=_checked(is_one_of(MODELS), f"one of {list(MODELS)}"))
    epochs: int = field(metadata=_checked(is_positive_int, "an int >= 1"))
    batch_size: int = field(metadata=_checked(is_positive_int, "an int >= 1 (the expected Poisson batch size B)"))
    momentum: float = field(metadata=_checked(is_in_unit_interval, "a number in [0, 1)"))
    train_size: int | None = field(
        metadata=_checked(is_optional(is_positive_int), "null (all training examples) or an int >= 1")
    )
    methods: tuple[str, ...] = field(
        metadata=_checked(is_list_of(is_one_of(_METHOD_NAMES)), f"a non-empty list of {list(_METHOD_NAMES)}")
    )
    lr: dict[str, float] = field(
        metadata=_checked(_number_map, "a mapping from method (and nonprivate) to a number > 0")
    )
    scale: dict[str, float] = field(
        metadata=_checked(_number_map, "a mapping from method to a number > 0 (its scale parameter)")
    )
    feature_spread: float | None = field(
        default=None,
        metadata=_checked(
            is_optional(is_at_least(1)),
            "a number >= 1 for the synthetic dataset (largest / smallest feature scale), or left out",
        ),
    )
    method_params: dict[str, dict[str, Any]] = field(
        metadata=_checked(
            is_mapping_of(is_mapping),
            "a mapping from method to its fixed parameters, e.g. {geoclip: {rank: 16}}",
        )
    )


@dataclass(frozen=True, kw_only=True)
class Setting:
    methods: tuple[str, ...] = field(
        metadata=_checked(is_list_of(is_one_of(_METHOD_NAMES)), f"a non-empty list of {list(_METHOD_NAMES)}")
    )
    accountant: str = field(metadata=_checked(is_one_of(ACCOUNTANTS), f"one of {list(ACCOUNTANTS)}"))
    delta: float = field(metadata=_checked(is_open_unit, "a number in (0, 1), below 1/N of every task"))
    epsilon: float = field(
        metadata=_checked(is_positive, "a number > 0 (the main budget: tuning, size and diagnostics run at it)")
    )
    main_task: str = field(metadata=_checked(is_string, "the name of one entry of setting.tasks"))
    tasks: dict[str, Task] = field(metadata={"named": Task})


@dataclass(frozen=True, kw_only=True)
class Tuning:
    """The joint grid (claims 2 and 3): for every task and method, learning rate x scale at ``setting.epsilon``."""

    lr_factors: tuple[float, ...] = field(
        metadata=_checked(is_list_of(is_positive), "a non-empty list of numbers > 0 (times the lr centre)")
    )
    scale_factors: tuple[float, ...] = field(
        metadata=_checked(is_list_of(is_positive), "a non-empty list of numbers > 0 (times the scale centre)")
    )
    nonprivate_lr_factors: tuple[float, ...] = field(
        metadata=_checked(
            is_list_of(is_positive),
            "a non-empty list of numbers > 0 (the non-private lr grid: as many cells as a private method's grid)",
        )
    )
    seeds: tuple[int, ...] = field(metadata=_checked(*_SEEDS))


@dataclass(frozen=True, kw_only=True)
class Accuracy:
    epsilons: tuple[float, ...] = field(metadata=_checked(is_list_of(is_positive), "a non-empty list of numbers > 0"))
    seeds: tuple[int, ...] = field(metadata=_checked(*_SEEDS))


@dataclass(frozen=True, kw_only=True)
class Size:
    """Claim 4: test metric against the training-set size ``n`` at a fixed sampling rate and number of steps."""

    task: str = field(metadata=_checked(is_string, "the name of one entry of setting.tasks"))
    train_sizes: tuple[int, ...] = field(
        metadata=_checked(is_list_of(is_positive_int), "a non-empty list of ints >= 1")
    )
    seeds: tuple[int, ...] = field(metadata=_checked(*_SEEDS))


@dataclass(frozen=True, kw_only=True)
class Diagnostics:
    """Claim 1: per-step signal-to-noise ratio, cosines and heterogeneity over whole runs at the tuned setting."""

    tasks: tuple[str, ...] = field(metadata=_checked(is_list_of(is_string), "a non-empty list of setting.tasks names"))
    seed: int = field(metadata=_checked(is_seed, "an int >= 0"))


@dataclass(frozen=True, kw_only=True)
class Theory:
    dim: int = field(metadata=_checked(is_positive_int, "an int >= 1 (coordinates of the synthetic gradients)"))
    spreads: tuple[float, ...] = field(
        metadata=_checked(is_list_of(is_at_least(1)), "a non-empty list of numbers >= 1 (largest / smallest std)")
    )
    batch_size: int = field(metadata=_checked(is_positive_int, "an int >= 1"))
    steps: int = field(metadata=_checked(is_positive_int, "an int >= 1"))
    seed: int = field(metadata=_checked(is_seed, "an int >= 0"))


@dataclass(frozen=True, kw_only=True)
class AccountingTable:
    dataset_size: int = field(metadata=_checked(is_positive_int, "an int >= 1"))
    expected_batch_size: int = field(metadata=_checked(is_positive_int, "an int >= 1"))
    epochs: int = field(metadata=_checked(is_positive_int, "an int >= 1"))
    delta: float = field(metadata=_checked(is_open_unit, "a number in (0, 1)"))
    noise_multipliers: tuple[float, ...] = field(
        metadata=_checked(is_list_of(is_positive), "a non-empty list of numbers > 0")
    )
    curve_noise_multiplier: float = field(
        metadata=_checked(is_positive, "a number > 0 (sigma of the epsilon-against-steps figure)")
    )


@dataclass(frozen=True, kw_only=True)
class Params:
    """A whole validated params file (see the module docstring)."""

    profile: str = field(metadata=_checked(is_name, "a name, e.g. 'quick' or 'paper'"))
    runtime: Runtime = field(metadata={"section": Runtime})
    data: Data = field(metadata={"section": Data})
    features: Features = field(metadata={"section": Features})
    setting: Setting = field(metadata={"section": Setting})
    tuning: Tuning = field(metadata={"section": Tuning})
    accuracy: Accuracy = field(metadata={"section": Accuracy})
    size: Size = field(metadata={"section": Size})
    diagnostics: Diagnostics = field(metadata={"section": Diagnostics})
    theory: Theory = field(metadata={"section": Theory})
    accounting: AccountingTable = field(metadata={"section": AccountingTable})
    audit: AuditConfig = field(metadata={"parser": lambda value: audit_config(value, complete=True)})
    bench: dict[str, Any] = field(metadata={"parser": lambda value: _bench_section(value)})

    def task(self, name: str) -> Task:
        """The task called ``name``."""
        return self.setting.tasks[name]


def scattering_channels(scales: int, orientations: int) -> int:
    """Channels of a 2-D scattering transform of order 2: ``1 + J L + L^2 J (J - 1) / 2`` (81 for J = 2, L = 8)."""
    return 1 + scales * orientations + orientations**2 * scales * (scales - 1) // 2


def size_batch(batch_size: int, full: int, n: int) -> int:
    """The expected batch size at ``n`` training examples that keeps the task's sampling rate ``q = B / N``.

    ``round(q n)`` (at least 1): the claim-4 size sweep trains every ``n`` at the same ``q`` and epochs, so with
    the same number of steps and, up to this rounding of ``q n``, the same noise multiplier.
    """
    return max(1, round(batch_size * n / full))


def _or(names: tuple[str, ...]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return " or ".join(filter(None, (", ".join(names[:-1]), names[-1] if names else "")))


def _check_task(name: str, task: Task, setting: Setting, prepared: tuple[str, ...]) -> None:
    where = f"setting.tasks.{name}"
    spec = dataset_spec(task.dataset)
    if spec.prepared_as is not None and spec.prepared_as not in prepared:
        raise ValueError(
            f"{where}.dataset={task.dataset!r} needs {spec.prepared_as!r} in data.datasets (the prepare stage)"
        )
    available = spec.train_size
    size = task.train_size if task.train_size is not None else available
    if size > available:
        raise ValueError(f"{where}.train_size={size} exceeds the {available} training examples of {task.dataset}")
    if task.batch_size > size:
        raise ValueError(f"{where}.batch_size={task.batch_size} exceeds the {size} training examples; lower it")
    require_delta_below_inverse_n(setting.delta, size, name="setting.delta", what=f"training examples of {where}")
    spread = datasets_taking("feature_spread")
    if (task.feature_spread is not None) != (task.dataset in spread):
        raise ValueError(f"{where}.feature_spread is for (and needed by) the {_or(spread)} dataset only")
    images = datasets_with(input="image")
    if task.model == "cnn" and task.dataset not in images:
        raise ValueError(f"{where}.model='cnn' needs 28x28 images ({_or(images)}), not {task.dataset}")
    if task.model == "scatter_cnn" and spec.input != "scattering":
        raise ValueError(
            f"{where}.model='scatter_cnn' needs dataset {_or(datasets_with(input='scattering'))}, not {task.dataset}"
        )
    if (task.model == "linear") != (spec.task == "regression"):
        fix = (
            "use model 'linear'"
            if spec.task == "regression"
            else f"'linear' is for regression ({_or(datasets_with(task='regression'))})"
        )
        raise ValueError(f"{where}.model={task.model!r} does not fit {task.dataset} ({spec.task}): {fix}")
    unknown = sorted(set(task.methods) - set(setting.methods))
    if unknown:
        raise ValueError(f"{where}.methods {unknown} must also be listed in setting.methods")
    scaled = [m for m in METHODS if METHODS[m].scale_parameter is not None]
    for key, known in (("lr", [*METHODS, NONPRIVATE]), ("scale", scaled), ("method_params", list(METHODS))):
        unknown = sorted(set(getattr(task, key)) - set(known))
        if unknown:
            raise ValueError(f"{where}.{key} has unknown method(s) {unknown}; it accepts {known}")
    for method in (*task.methods, NONPRIVATE):
        if method not in task.lr:
            raise ValueError(f"{where}.lr needs a learning-rate centre for {method!r}")
    for method in task.methods:
        if METHODS[method].scale_parameter is not None and method not in task.scale:
            raise ValueError(f"{where}.scale needs a centre for {method!r} (its {METHODS[method].scale_parameter})")
    for method, params in task.method_params.items():
        try:
            check_method(method, params)
        except ValueError as error:
            raise ValueError(f"{where}.method_params.{method}: {error}") from None
        parameter = METHODS[method].scale_parameter
        if parameter is not None and parameter in params:
            raise ValueError(
                f"{where}.method_params.{method}.{parameter} is the tuning grid's scale axis: "
                f"set its centre in {where}.scale.{method} instead"
            )


def validate(params: Params) -> Params:
    """The checks across sections (each names the key); returns ``params``."""
    setting = params.setting
    features = params.features
    channels = scattering_channels(features.scales, features.orientations)
    if channels % features.groups:
        raise ValueError(
            f"features.groups={features.groups} must divide the {channels} scattering channels of "
            f"J = {features.scales}, L = {features.orientations} (27 for J = 2, L = 8)"
        )
    if setting.main_task not in setting.tasks:
        raise ValueError(f"setting.main_task={setting.main_task!r} must be one of setting.tasks {list(setting.tasks)}")
    cells = len(params.tuning.lr_factors) * len(params.tuning.scale_factors)
    if len(params.tuning.nonprivate_lr_factors) < cells:
        raise ValueError(
            f"tuning.nonprivate_lr_factors has {len(params.tuning.nonprivate_lr_factors)} values: the non-private "
            f"baseline needs at least a private method's budget of {cells} grid cells"
        )
    for name, task in setting.tasks.items():
        _check_task(name, task, setting, params.data.datasets)
    if params.size.task not in setting.tasks:
        raise ValueError(f"size.task={params.size.task!r} must be one of setting.tasks {list(setting.tasks)}")
    size_task = setting.tasks[params.size.task]
    full = size_task.train_size if size_task.train_size is not None else dataset_spec(size_task.dataset).train_size
    steps_per_epoch = int(1 / (size_task.batch_size / full))
    for index, n in enumerate(params.size.train_sizes):
        where = f"size.train_sizes[{index}]={n}"
        if n > full:
            raise ValueError(f"{where} exceeds the {full} training examples of setting.tasks.{params.size.task}")
        require_delta_below_inverse_n(setting.delta, n, name="setting.delta", what=f"training examples of {where}")
        batch = size_batch(size_task.batch_size, full, n)
        if int(1 / (batch / n)) != steps_per_epoch:
            raise ValueError(
                f"{where}: its batch size round(B n / N) = {batch} gives {int(1 / (batch / n))} steps per epoch, "
                f"not the task's {steps_per_epoch}; choose an n for which B n / N is close to an integer"
            )
    unknown = sorted(set(params.diagnostics.tasks) - set(setting.tasks))
    if unknown:
        raise ValueError(f"diagnostics.tasks {unknown} must be names of setting.tasks {list(setting.tasks)}")
    table = params.accounting
    if table.expected_batch_size > table.dataset_size:
        raise ValueError(
            f"accounting.expected_batch_size={table.expected_batch_size} exceeds "
            f"accounting.dataset_size={table.dataset_size}"
        )
    if table.delta >= 1 / table.dataset_size:
        raise ValueError(f"accounting.delta={table.delta} must be below 1/accounting.dataset_size")
    return params


def _bench_section(section: Any) -> dict[str, Any]:
    """``benchmarks/bench.py --params-file`` checks every key and value of ``bench`` itself when its stage runs."""
    if not isinstance(section, Mapping):
        raise ValueError("must be a mapping of benchmarks/bench.py options (models, batch_sizes, methods, ...)")
    return dict(section)


def params_from_mapping(values: Any) -> Params:
    """A :class:`Params` from a parsed YAML mapping, fully validated (every error names the dotted key)."""
    return validate(parse(Params, values, ""))


def load_params(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """Read and validate a params file; errors start with the file name and name the dotted key.

    Read with :func:`adaclip.research.records.load_yaml`: numbers written like ``1e-5`` are numbers, and a
    syntax error names the line and column.
    """
    values = load_yaml(path)
    try:
        return params_from_mapping(values)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def check_notebook_parameters(namespace: Mapping[str, Any], allowed: set[str]) -> None:
    """Fail on a papermill parameter the notebook does not declare (papermill itself only warns).

    Call it right after the parameters cell with ``globals()`` and the declared names; IPython's
    own names and private names (leading underscore) are ignored.
    """
    ipython = {"In", "Out", "get_ipython", "exit", "quit", "open"}
    unknown = sorted(
        k
        for k in namespace
        if not k.startswith("_")
        and k not in ipython
        and k not in allowed
        and not callable(namespace[k])
        and type(namespace[k]).__name__ != "module"
    )
    if unknown:
        raise ValueError(f"unknown notebook parameter(s) {unknown}; this notebook accepts {sorted(allowed)}")
