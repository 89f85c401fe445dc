"""The one registry of datasets: every per-dataset fact the pipeline reads, in one :class:`DatasetSpec` each.

A dataset's spec says what it is (its task, and so its metric and the metric's direction; its number of
training examples; image, ScatterNet features or table; where it comes from), how it is loaded and
prepared, which folders its files come from, and the defaults of a run on it.  The command line, the
training run, the params validation, the sweeps and the report read :data:`DATASETS` (through
:func:`dataset_spec` and the helpers below), so adding a dataset is one :func:`register_dataset` call
(:func:`registered_dataset` for the duration of a ``with`` block).

:func:`load_dataset` and :func:`prepare` dispatch on the registry; the loaders themselves, the fixed
splits and the preprocessing are in :mod:`adaclip.research.data`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adaclip._validate import require, require_int, require_one_of, require_path
from adaclip.research import data
from adaclip.research.data import Splits, Task
from adaclip.research.defaults import RunDefaults, packaged_defaults

Input = Literal["image", "scattering", "table"]
"""What a dataset's examples are: 28x28 grayscale images, ScatterNet features ``[81, 7, 7]``, or a row of numbers."""

Files = Literal["prepared", "features"]
"""Where a sweep finds a dataset's files: the prepare stage's folder, or the ScatterNet stage's features folder."""


@dataclass(frozen=True)
class LoadRequest:
    """What :func:`load_dataset` was asked for; each loader reads the fields that apply to it.

    ``options`` are the synthetic dataset's ``feature_spread``, ``synthetic_size`` and ``synthetic_dim``.
    """

    name: str
    seed: int
    train_size: int | None
    data_dir: str | os.PathLike[str] | None
    download: bool
    verify: bool
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """Everything the pipeline knows about one dataset.

    * ``task``: ``"classification"`` (accuracy, higher is better) or ``"regression"`` (MSE, lower is
      better; the ``linear`` model): see :attr:`metric` and :attr:`higher_is_better`.
    * ``train_size``: its training examples before any ``train_size`` subsample (validation needs no loading).
    * ``input``: :data:`Input` (the models that fit: ``cnn`` needs images, ``scatter_cnn`` ScatterNet features).
    * ``source``: where the data comes from, in words.
    * ``prepared_as``: the folder of the prepare stage it needs (listed in ``data.datasets``), ``None`` if none;
      ``prepare`` that stage's step for it (copy its verified files into the given staging folder, return the
      manifest entry), ``None`` if the stage cannot prepare it.
    * ``files``: :data:`Files`, or ``None`` for a dataset that reads no files (a ``data_dir`` is then refused).
    * ``load``: its splits for a :class:`LoadRequest`; ``load_options``: the options of
      :attr:`LoadRequest.options` it takes (a run or a task may set only those).
    * ``defaults``: :class:`RunDefaults` of a run on it; ``anchored``: the report's published anchors are on it.
    """

    name: str
    task: Task
    train_size: int
    input: Input
    source: str
    prepared_as: str | None
    prepare: Callable[[Path, bool], dict[str, object]] | None
    files: Files | None
    load: Callable[[LoadRequest], Splits]
    defaults: RunDefaults
    load_options: frozenset[str] = frozenset()
    anchored: bool = False

    @property
    def metric(self) -> str:
        """The test metric of a run: ``accuracy`` for a classification, ``mse`` for a regression."""
        return "accuracy" if self.task == "classification" else "mse"

    @property
    def higher_is_better(self) -> bool:
        """Whether a higher metric is better (accuracy) or a lower one (MSE)."""
        return self.task == "classification"


_DATASETS: dict[str, DatasetSpec] = {}
DATASETS: Mapping[str, DatasetSpec] = _DATASETS
"""Every dataset by name (change it with :func:`register_dataset`)."""


def register_dataset(spec: DatasetSpec) -> None:
    """Add ``spec`` under its name; the CLI, training, params validation, sweeps and report then take it."""
    if not isinstance(spec, DatasetSpec):
        raise ValueError(f"spec must be a DatasetSpec, got {type(spec).__name__}")
    if not spec.name or spec.name in _DATASETS:
        raise ValueError(f"spec.name must be a new dataset name (not one of {list(_DATASETS)}), got {spec.name!r}")
    if spec.task not in ("classification", "regression"):
        raise ValueError(f"spec.task must be 'classification' or 'regression', got {spec.task!r}")
    require_int("spec.train_size", spec.train_size)
    _DATASETS[spec.name] = spec


def unregister_dataset(name: str) -> None:
    """Remove dataset ``name`` (added by :func:`register_dataset`)."""
    dataset_spec(name)
    del _DATASETS[name]


@contextmanager
def registered_dataset(spec: DatasetSpec) -> Iterator[str]:
    """Dataset ``spec`` registered inside the ``with`` block (for tests and experiments); yields its name."""
    register_dataset(spec)
    try:
        yield spec.name
    finally:
        unregister_dataset(spec.name)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``, or a ``ValueError`` listing the datasets."""
    return DATASETS[require_one_of("dataset", name, DATASETS)]


def dataset_names() -> tuple[str, ...]:
    """Every registered dataset's name, in registration order."""
    return tuple(DATASETS)


def prepared_datasets() -> tuple[str, ...]:
    """The datasets the prepare stage copies (the values ``data.datasets`` of ``params.yaml`` accepts)."""
    return tuple(name for name, spec in DATASETS.items() if spec.prepared_as == name and spec.prepare is not None)


def file_datasets() -> tuple[str, ...]:
    """The datasets read from files, the only ones a ``data_dir`` applies to."""
    return tuple(name for name, spec in DATASETS.items() if spec.files is not None)


def check_data_dir(name: str, data_dir: object) -> None:
    """A ``data_dir`` is a folder path, and only for the datasets read from files (:func:`file_datasets`)."""
    require_path("data_dir", data_dir)
    require(
        dataset_spec(name).files is not None,
        f"data_dir is for the datasets read from files {list(file_datasets())}; {name!r} needs no files",
    )


def datasets_with(**facts: object) -> tuple[str, ...]:
    """The datasets whose spec has every given value, e.g. ``datasets_with(input="image")``."""
    return tuple(name for name, spec in DATASETS.items() if all(getattr(spec, k) == v for k, v in facts.items()))


def datasets_taking(option: str) -> tuple[str, ...]:
    """The datasets whose loader takes ``option`` (e.g. ``feature_spread``: the synthetic dataset)."""
    return tuple(name for name, spec in DATASETS.items() if option in spec.load_options)


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    train_size: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    verify: bool = True,
    synthetic_size: int = data.SYNTHETIC_SIZE,
    synthetic_dim: int = 50,
    feature_spread: float = 100.0,
) -> Splits:
    """Load dataset ``name`` (one of :data:`DATASETS`); ``seed`` draws the ``train_size`` subsample
    (the synthetic data itself is fixed, like every split).

    ``data_dir`` is for the datasets read from files (:func:`file_datasets`); for any other it is
    refused rather than ignored.
    """
    spec = dataset_spec(name)
    if data_dir is not None:
        check_data_dir(name, data_dir)
    options = {"synthetic_size": synthetic_size, "synthetic_dim": synthetic_dim, "feature_spread": feature_spread}
    return spec.load(LoadRequest(name, seed, train_size, data_dir, download, verify, options))


def prepare(
    datasets: list[str], out_dir: str | os.PathLike[str], *, download: bool = True
) -> dict[str, dict[str, object]]:
    """The report's data stage: a verified copy of each image dataset in ``out_dir/<name>/``.

    Each dataset's spec prepares it (image datasets are located as :func:`adaclip.research.data.locate_idx`
    says, downloaded only as the last resort, every file checked against its SHA-256 and copied;
    scikit-learn and synthetic datasets need no files and are only listed).  ``out_dir/manifest.json``
    records the source and the checksums.  The folder is built next to ``out_dir`` and renamed into place,
    so a failure leaves no partial copy.
    """
    steps = {name: spec.prepare for name, spec in DATASETS.items() if spec.prepare is not None}
    unknown = sorted(set(datasets) - set(steps))
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; known: {list(steps)}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        manifest: dict[str, dict[str, object]] = {}
        for name in datasets:
            manifest[name] = steps[name](staging, download)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _load_idx(request: LoadRequest) -> Splits:
    return data.load_idx_dataset(
        request.name,
        seed=request.seed,
        train_size=request.train_size,
        data_dir=request.data_dir,
        download=request.download,
        verify=request.verify,
    )


def _load_scatternet(request: LoadRequest) -> Splits:
    return data.load_scatternet(seed=request.seed, train_size=request.train_size, data_dir=request.data_dir)


def _load_breast_cancer(request: LoadRequest) -> Splits:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    return data.tabular_splits(request.name, "classification", x, y, request.seed, request.train_size)


def _load_diabetes(request: LoadRequest) -> Splits:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    return data.tabular_splits(
        request.name, "regression", x, y / data.DIABETES_TARGET_SCALE, request.seed, request.train_size
    )


def _load_synthetic(request: LoadRequest) -> Splits:
    options = request.options
    x, y = data.synthetic_logistic(  # the same data for every seed
        options["synthetic_size"], options["synthetic_dim"], options["feature_spread"], data.SPLIT_SEED
    )
    return data.tabular_splits(request.name, "classification", x, y, request.seed, request.train_size)


def _prepare_idx(name: str) -> Callable[[Path, bool], dict[str, object]]:
    def step(staging: Path, download: bool) -> dict[str, object]:
        return data.copy_idx(name, staging / name, download=download)

    return step


def _prepare_sklearn(staging: Path, download: bool) -> dict[str, object]:
    import sklearn

    return {"source": f"scikit-learn {sklearn.__version__} (bundled)"}


def _prepare_synthetic(staging: Path, download: bool) -> dict[str, object]:
    return {"source": "adaclip.research.data.synthetic_logistic (generated from the run's seed)"}


def _tabular_train_size(n: int) -> int:
    """Training examples of an 80/10/10 split of ``n`` (:func:`adaclip.research.data.tabular_splits`)."""
    return n - 2 * round(0.1 * n)


_IDX_TRAIN_SIZE = 60000 - data.VALIDATION_SIZE


def _idx_spec(name: str, source: str, *, anchored: bool) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        task="classification",
        train_size=_IDX_TRAIN_SIZE,
        input="image",
        source=source,
        prepared_as=name,
        prepare=_prepare_idx(name),
        files="prepared",
        load=_load_idx,
        defaults=packaged_defaults(name),
        anchored=anchored,
    )


register_dataset(_idx_spec("fashion-mnist", "Fashion-MNIST (Xiao et al. 2017), IDX files", anchored=True))
register_dataset(_idx_spec("mnist", "MNIST (LeCun et al. 1998), IDX files", anchored=False))
register_dataset(
    DatasetSpec(
        name="fashion-mnist-scatternet",
        task="classification",
        train_size=_IDX_TRAIN_SIZE,
        input="scattering",
        source="ScatterNet features of Fashion-MNIST (adaclip.research.features)",
        prepared_as="fashion-mnist",
        prepare=None,
        files="features",
        load=_load_scatternet,
        # ScatterNet + linear (Tramèr & Boneh 2021's setting has B = 8192, momentum 0.9 and lr 16 with C = 0.1)
        defaults=packaged_defaults("fashion-mnist-scatternet"),
        anchored=True,
    )
)
register_dataset(
    DatasetSpec(
        name="breast-cancer",
        task="classification",
        train_size=_tabular_train_size(569),
        input="table",
        source="scikit-learn's Wisconsin breast cancer data (bundled)",
        prepared_as="breast-cancer",
        prepare=_prepare_sklearn,
        files=None,
        load=_load_breast_cancer,
        defaults=packaged_defaults("breast-cancer"),
    )
)
register_dataset(
    DatasetSpec(
        name="diabetes",
        task="regression",
        train_size=_tabular_train_size(442),
        input="table",
        source="scikit-learn's diabetes data (bundled), target / 100",
        prepared_as="diabetes",
        prepare=_prepare_sklearn,
        files=None,
        load=_load_diabetes,
        defaults=packaged_defaults("diabetes"),
    )
)
register_dataset(
    DatasetSpec(
        name="synthetic",
        task="classification",
        train_size=_tabular_train_size(data.SYNTHETIC_SIZE),
        input="table",
        source="adaclip.research.data.synthetic_logistic (generated)",
        prepared_as=None,
        prepare=_prepare_synthetic,
        files=None,
        load=_load_synthetic,
        # placeholders until a search: the Adam rules release Adam steps; these learn in the tiny run of the tests
        defaults=packaged_defaults("synthetic"),
        load_options=frozenset({"feature_spread", "synthetic_size", "synthetic_dim"}),
    )
)
