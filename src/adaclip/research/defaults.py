"""A run's defaults on a dataset (model, expected batch size, epochs, learning rates), and the built-in datasets'
defaults read from ``defaults.yaml`` (shipped with the package) and checked on load.

:class:`RunDefaults` is what a :class:`~adaclip.research.datasets.DatasetSpec` carries: the values
:func:`adaclip.research.config.resolve` fills in where a config leaves them out.  The built-in datasets take
theirs from the data file (:func:`packaged_defaults`), so that they are data, not code; a dataset registered
later gives its own :class:`RunDefaults` in its spec.  The report does not use these: its learning rates come
from the tuning sweep over the grids of ``params.yaml``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources

from adaclip._validate import is_mapping_of, is_one_of, is_positive, is_positive_int, require
from adaclip.methods import METHODS, NONPRIVATE
from adaclip.research.models import MODELS
from adaclip.research.records import parse_yaml_value

DEFAULTS_FILE = "defaults.yaml"
"""The built-in datasets' defaults, a file inside the ``adaclip.research`` package."""


@dataclass(frozen=True, kw_only=True)
class RunDefaults:
    """A run's defaults on a dataset: model, expected batch size, epochs and learning rates.

    ``lr`` is every private method's learning rate unless ``method_lr`` names the method;
    ``nonprivate_lr`` the non-private baseline's.
    """

    model: str
    batch_size: int
    epochs: int
    lr: float
    nonprivate_lr: float
    method_lr: Mapping[str, float] = field(default_factory=dict)

    def lr_for(self, method: str) -> float:
        """The default learning rate of ``method`` (or :data:`~adaclip.methods.NONPRIVATE`)."""
        if method == NONPRIVATE:
            return float(self.nonprivate_lr)
        return float(self.method_lr.get(method, self.lr))


_FIELDS = {
    "model": (is_one_of(MODELS), f"one of {list(MODELS)}"),
    "batch_size": (is_positive_int, "an int >= 1 (the expected Poisson batch size)"),
    "epochs": (is_positive_int, "an int >= 1"),
    "lr": (is_positive, "a number > 0 (every private method without a method_lr)"),
    "nonprivate_lr": (is_positive, "a number > 0"),
    "method_lr": (is_mapping_of(is_positive), "a mapping from method to a number > 0 ({} for none)"),
}


def load_defaults(text: str, source: str) -> dict[str, RunDefaults]:
    """The defaults in the YAML ``text`` (dataset name → its defaults), checked; every error names ``source``
    and the dotted key."""
    values = parse_yaml_value(text, source)
    require(isinstance(values, dict) and bool(values), f"{source} must map dataset names to their defaults")
    defaults = {}
    for name, entry in values.items():
        require(
            isinstance(entry, dict) and sorted(entry) == sorted(_FIELDS),
            f"{source}: {name} must have exactly the keys {sorted(_FIELDS)}, got {entry!r}",
        )
        for key, (check, accepted) in _FIELDS.items():
            require(check(entry[key]), f"{source}: {name}.{key} must be {accepted}, got {entry[key]!r}")
        unknown = sorted(set(entry["method_lr"]) - set(METHODS))
        require(not unknown, f"{source}: {name}.method_lr has unknown method(s) {unknown}; it accepts {list(METHODS)}")
        defaults[name] = RunDefaults(**entry)
    return defaults


@functools.cache
def _packaged() -> dict[str, RunDefaults]:
    text = resources.files("adaclip.research").joinpath(DEFAULTS_FILE).read_text(encoding="utf-8")
    return load_defaults(text, DEFAULTS_FILE)


def packaged_defaults(dataset: str) -> RunDefaults:
    """The defaults of built-in ``dataset`` from ``defaults.yaml``."""
    packaged = _packaged()
    require(dataset in packaged, f"{DEFAULTS_FILE} has no entry for dataset {dataset!r}; add one")
    return packaged[dataset]
