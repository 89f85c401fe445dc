"""The trainer's defaults per dataset, read from ``defaults.yaml`` (shipped with the package) and checked on load.

:func:`dataset_defaults` gives the model, expected batch size, epochs and learning rates that
:func:`adaclip.research.train.resolve` fills in where a config leaves them out; :func:`default_lr` the
learning rate of one method.  The file is validated like ``params.yaml`` (:func:`adaclip.research.params.parse`):
every dataset of :data:`adaclip.research.data.DATASETS` has one entry, every value its type and range, and
``method_lr`` names only registered methods.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources

from adaclip._validate import is_mapping_of, is_one_of, is_positive, is_positive_int
from adaclip.methods import METHODS
from adaclip.research.data import DATASETS
from adaclip.research.models import MODELS
from adaclip.research.params import _checked, parse
from adaclip.research.records import parse_yaml_value

DEFAULTS_FILE = "defaults.yaml"
"""The defaults' file name inside the ``adaclip.research`` package."""


@dataclass(frozen=True, kw_only=True)
class DatasetDefaults:
    """One dataset's defaults (see ``defaults.yaml``)."""

    model: str = field(metadata=_checked(is_one_of(MODELS), f"one of {list(MODELS)}"))
    batch_size: int = field(metadata=_checked(is_positive_int, "an int >= 1 (the expected Poisson batch size)"))
    epochs: int = field(metadata=_checked(is_positive_int, "an int >= 1"))
    lr: float = field(metadata=_checked(is_positive, "a number > 0 (every private method without a method_lr)"))
    nonprivate_lr: float = field(metadata=_checked(is_positive, "a number > 0"))
    method_lr: dict[str, float] = field(
        metadata=_checked(is_mapping_of(is_positive), "a mapping from method to a number > 0 ({} for none)")
    )


def load_defaults(text: str, source: str) -> dict[str, DatasetDefaults]:
    """The defaults in the YAML ``text``, checked; every error names ``source`` and the dotted key."""
    values = parse_yaml_value(text, source)
    if not isinstance(values, dict) or sorted(values) != sorted(DATASETS):
        found = sorted(values) if isinstance(values, dict) else values
        raise ValueError(f"{source} must map every dataset {list(DATASETS)} to its defaults, got {found!r}")
    defaults = {name: parse(DatasetDefaults, values[name], f"{source}: {name}") for name in DATASETS}
    for name, entry in defaults.items():
        unknown = sorted(set(entry.method_lr) - set(METHODS))
        if unknown:
            raise ValueError(f"{source}: {name}.method_lr has unknown method(s) {unknown}; it accepts {list(METHODS)}")
    return defaults


@functools.cache
def _defaults() -> dict[str, DatasetDefaults]:
    text = resources.files("adaclip.research").joinpath(DEFAULTS_FILE).read_text(encoding="utf-8")
    return load_defaults(text, DEFAULTS_FILE)


def dataset_defaults(dataset: str) -> DatasetDefaults:
    """The defaults of ``dataset`` (one of :data:`~adaclip.research.data.DATASETS`)."""
    return _defaults()[dataset]


def default_lr(dataset: str, method: str) -> float:
    """The default learning rate of ``method`` on ``dataset``: ``nonprivate_lr`` for the baseline, else the
    method's ``method_lr`` entry or the dataset's ``lr``."""
    defaults = dataset_defaults(dataset)
    if method == "nonprivate":
        return float(defaults.nonprivate_lr)
    return float(defaults.method_lr.get(method, defaults.lr))
