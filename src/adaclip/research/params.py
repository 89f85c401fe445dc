"""The report pipeline's parameters: one strictly validated ``params.yaml``.

Every knob of ``dvc repro`` lives in ``params.yaml`` (the quick profile) or ``profiles/paper.yaml``
(the full-size profile; same keys).  :func:`load_params` reads such a file and rejects unknown or
missing keys with the key's dotted path and the accepted keys, so a misspelt parameter is an error
before any run starts.  Sections owned by other modules (``audit``, ``bench``) are checked by
validators those modules register in :data:`SECTION_VALIDATORS`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import yaml

from adaclip.methods import METHODS, check_method
from adaclip.privacy.accounting import ACCOUNTANTS
from adaclip.privacy.audit import audit_config
from adaclip.research.data import DATASETS
from adaclip.research.models import MODELS

SWEEPS = ("lr_search", "accuracy", "clip", "size", "diagnostics")
"""The training sweeps of the pipeline, each a section of the params file and a ``runs/<name>.jsonl``."""

# section -> key -> (checker, description); a key whose checker accepts None is optional
Checker = Callable[[Any], bool]


def is_device_name(value: Any) -> bool:
    """Whether ``value`` names a CPU or CUDA device as torch parses it (``cpu``, ``cuda``, ``cuda:i``)."""
    try:
        return isinstance(value, str) and torch.device(value).type in ("cpu", "cuda")
    except RuntimeError:
        return False


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _list_of(check: Checker) -> Checker:
    return lambda value: isinstance(value, list) and len(value) > 0 and all(check(v) for v in value)


def _one_of(options: tuple[str, ...]) -> Checker:
    return lambda value: value in options


def _optional(check: Checker) -> Checker:
    return lambda value: value is None or check(value)


def _string(value: Any) -> bool:
    return isinstance(value, str) and value != ""


_DATASET_SETTING = {
    "model": (_optional(_one_of(MODELS)), f"null or one of {list(MODELS)}"),
    "epochs": (_optional(_positive_int), "null or an int >= 1"),
    "batch_size": (_optional(_positive_int), "null or an int >= 1"),
    "train_size": (_optional(_positive_int), "null or an int >= 1"),
    "method_params": (
        lambda v: isinstance(v, dict) and set(v) <= set(METHODS) and all(isinstance(p, dict) for p in v.values()),
        f"a mapping from methods in {sorted(METHODS)} to their parameters, e.g. {{geoclip: {{rank: 64}}}}",
    ),
}
_PRIVATE = tuple(sorted(METHODS))
_SEEDS = (_list_of(_non_negative_int), "a non-empty list of ints >= 0")

SCHEMA: dict[str, dict[str, tuple[Checker, str]]] = {
    "runtime": {
        "device": (is_device_name, "'cpu', 'cuda' or 'cuda:i'"),
        "workers": (_positive_int, "an int >= 1 (runs in parallel, one process each)"),
    },
    "data": {"datasets": (_list_of(_one_of(DATASETS)), f"a non-empty list of {list(DATASETS)}")},
    "setting": {
        "methods": (_list_of(_one_of(_PRIVATE)), f"a non-empty list of {list(_PRIVATE)}"),
        "accountant": (_one_of(ACCOUNTANTS), f"one of {list(ACCOUNTANTS)}"),
        "delta": (_optional(lambda v: _number(v) and 0 < v < 1), "null (1e-5 or N^-1.1) or a number in (0, 1)"),
        "epsilon": (_positive, "a number > 0 (the budget of the lr, clip and size sweeps)"),
        "datasets": (
            lambda v: isinstance(v, dict) and len(v) > 0 and set(v) <= set(DATASETS),
            f"a mapping from datasets in {list(DATASETS)} to their settings",
        ),
    },
    "lr_search": {
        "multipliers": (_list_of(_positive), "a non-empty list of numbers > 0 (times the default lr)"),
        "seeds": _SEEDS,
    },
    "accuracy": {"epsilons": (_list_of(_positive), "a non-empty list of numbers > 0"), "seeds": _SEEDS},
    "clip": {
        "dataset": (_one_of(DATASETS), f"one of {list(DATASETS)}"),
        "initial_clips": (_list_of(_positive), "a non-empty list of numbers > 0"),
        "seeds": _SEEDS,
    },
    "size": {
        "dataset": (_one_of(DATASETS), f"one of {list(DATASETS)}"),
        "train_sizes": (_list_of(_positive_int), "a non-empty list of ints >= 1"),
        "seeds": _SEEDS,
    },
    "diagnostics": {
        "dataset": (_one_of(DATASETS), f"one of {list(DATASETS)}"),
        "noise_multiplier": (_positive, "a number > 0 (the same sigma for every method)"),
        "epochs": (_positive_int, "an int >= 1"),
        "seed": (_non_negative_int, "an int >= 0"),
    },
    "theory": {
        "dim": (_positive_int, "an int >= 1 (coordinates of the synthetic gradients)"),
        "spreads": (
            _list_of(lambda v: _number(v) and v >= 1),
            "a non-empty list of numbers >= 1 (largest / smallest std)",
        ),
        "batch_size": (_positive_int, "an int >= 1"),
        "steps": (_positive_int, "an int >= 1"),
        "seed": (_non_negative_int, "an int >= 0"),
    },
    "accounting": {
        "dataset_size": (_positive_int, "an int >= 1"),
        "expected_batch_size": (_positive_int, "an int >= 1"),
        "epochs": (_positive_int, "an int >= 1"),
        "delta": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
        "noise_multipliers": (_list_of(_positive), "a non-empty list of numbers > 0"),
        "curve_noise_multiplier": (_positive, "a number > 0 (sigma of the epsilon-against-steps figure)"),
    },
}
TOP_LEVEL = {"profile": (_string, "a name, e.g. 'quick' or 'paper'")}


def _bench_section(section: Any) -> None:
    """``benchmarks/bench.py --params-file`` checks every key and value of ``bench`` itself when its stage runs."""
    if not isinstance(section, dict):
        raise ValueError(
            "must be a mapping of benchmarks/bench.py options (models, batch_sizes, methods, repeats, ...)"
        )


SECTION_VALIDATORS: dict[str, Callable[[Mapping[str, Any]], object]] = {
    "audit": lambda section: audit_config(section, complete=True),
    "bench": _bench_section,
}
"""Validators for sections owned by other modules; each raises ``ValueError`` naming the key."""


def _check_section(name: str, values: Any, schema: Mapping[str, tuple[Checker, str]], source: str) -> None:
    if not isinstance(values, dict):
        raise ValueError(f"{source}: '{name}' must be a mapping with keys {sorted(schema)}")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {[f'{name}.{k}' for k in unknown]}; '{name}' accepts {sorted(schema)}"
        )
    missing = sorted(set(schema) - set(values))
    if missing:
        raise ValueError(f"{source}: missing key(s) {[f'{name}.{k}' for k in missing]}")
    for key, (check, description) in schema.items():
        if not check(values[key]):
            raise ValueError(f"{source}: {name}.{key} must be {description}, got {values[key]!r}")


def validate_params(params: Any, source: str = "params") -> dict[str, Any]:
    """Check a whole params mapping; return it unchanged or raise ``ValueError`` naming the key."""
    if not isinstance(params, dict):
        raise ValueError(f"{source} must hold a mapping of sections, got {type(params).__name__}")
    accepted = sorted({*TOP_LEVEL, *SCHEMA, *SECTION_VALIDATORS})
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {unknown}; accepted: {accepted}")
    missing = sorted(set(accepted) - set(params))
    if missing:
        raise ValueError(f"{source}: missing section(s) {missing}")
    for key, (check, description) in TOP_LEVEL.items():
        if not check(params[key]):
            raise ValueError(f"{source}: {key} must be {description}, got {params[key]!r}")
    for name, schema in SCHEMA.items():
        _check_section(name, params[name], schema, source)
    for name, settings in params["setting"]["datasets"].items():
        _check_section(f"setting.datasets.{name}", settings, _DATASET_SETTING, source)
        for method, method_params in settings["method_params"].items():
            try:
                check_method(method, method_params)
            except ValueError as error:
                raise ValueError(f"{source}: setting.datasets.{name}.method_params: {error}") from None
    for name in ("clip", "size", "diagnostics"):
        dataset = params[name]["dataset"]
        if dataset not in params["setting"]["datasets"]:
            raise ValueError(
                f"{source}: {name}.dataset={dataset!r} needs an entry in setting.datasets {sorted(params['setting']['datasets'])}"
            )
    not_prepared = sorted(set(params["setting"]["datasets"]) - set(params["data"]["datasets"]))
    if not_prepared:
        raise ValueError(
            f"{source}: setting.datasets {not_prepared} must also be listed in data.datasets (the prepare stage)"
        )
    for name, validator in SECTION_VALIDATORS.items():
        try:
            validator(params[name])
        except ValueError as error:
            raise ValueError(f"{source}: {name}: {error}") from None
    return params


def load_params(path: str | os.PathLike[str] = "params.yaml") -> dict[str, Any]:
    """Read and validate a params file (see :func:`validate_params`)."""
    with open(path, encoding="utf-8") as handle:
        params = yaml.safe_load(handle)
    return validate_params(params, source=str(path))


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
