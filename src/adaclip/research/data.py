"""The datasets' loaders: tensors with seeded train / validation / test splits, all offline by default.

Each dataset's facts (task, size, input, defaults) and the choice of its loader are its
:class:`~adaclip.research.datasets.DatasetSpec`; :func:`adaclip.research.datasets.load_dataset` loads one by name.

* ``fashion-mnist`` and ``mnist``: IDX ``.gz`` files.  A ``data_dir`` argument is the only place looked
  at: it must hold the four files, or loading fails naming what is missing (a folder the user names
  is used or refused, never silently replaced).  Without it they are looked for in this order: the
  environment variable (``FASHION_MNIST_DIR`` / ``MNIST_DIR``), ``data/raw/<name>/`` (relative to the
  working directory), the system folder (Debian's ``dataset-fashion-mnist`` package puts
  Fashion-MNIST in ``/usr/share/datasets/fashion-mnist/``), and last a download from the official
  mirror into ``data/raw/<name>/``.  The decompressed content of every file is checked
  against its SHA-256 wherever it came from.  The official test set is the test split; the
  validation split is carved from the training set.
* ``fashion-mnist-scatternet``: the ScatterNet features of Fashion-MNIST (:mod:`adaclip.research.features`),
  read from ``data_dir/features.pt`` (default ``data/features/fashion-mnist-scatternet``), with the same splits.
* ``breast-cancer`` (classification) and ``diabetes`` (regression) from scikit-learn, 80/10/10.
* ``synthetic``: logistic regression whose feature scales spread log-uniformly over
  ``feature_spread``, so per-coordinate gradient magnitudes differ by that factor (AdaCliP's case).

The split into training, validation and test examples is fixed (the same for every run seed), so that
every run of a sweep is selected on and evaluated against the same examples; the run seed draws the
``train_size`` subsample.

Preprocessing is data-independent, so it releases nothing about the training set and costs no privacy:
images are scaled to ``[0, 1]`` (no mean or deviation of the training set), ScatterNet features are
normalised per example, breast-cancer features are used as published (their scales span five orders of
magnitude: a strongly heterogeneous task), diabetes comes with features scikit-learn already scaled and its target is
divided by the constant ``DIABETES_TARGET_SCALE`` (so the test MSE is in units of ``(y / 100)^2``).
Statistics of the training set (a standardisation, say) would have to be released with noise and
accounted for.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from adaclip._validate import require_path

Task = Literal["classification", "regression"]
IDX_PARTS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SPLIT_SEED = 0
"""Fixes the train / validation / test split of every dataset (independent of the run seed)."""
VALIDATION_SIZE = 5000
"""Validation examples carved from the 60 000 training images of Fashion-MNIST and MNIST."""
SYNTHETIC_SIZE = 10000
DIABETES_TARGET_SCALE = 100.0
SCATTERNET_DIR = Path("data/features/fashion-mnist-scatternet")


@dataclass(frozen=True)
class IdxSource:
    """Where an IDX dataset may be found and the SHA-256 of each decompressed file."""

    env_var: str
    system_dir: str
    mirror: str
    sha256: dict[str, str]


IDX_SOURCES = {
    "fashion-mnist": IdxSource(
        env_var="FASHION_MNIST_DIR",
        system_dir="/usr/share/datasets/fashion-mnist",
        mirror="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
    ),
    "mnist": IdxSource(
        env_var="MNIST_DIR",
        system_dir="/usr/share/datasets/mnist",
        mirror="https://ossci-datasets.s3.amazonaws.com/mnist/",
        sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    ),
}


class DataNotFoundError(FileNotFoundError):
    """An IDX dataset is missing everywhere it was looked for (the message lists where and how to fix)."""


class CorruptDataError(ValueError):
    """A dataset file exists but is not the expected content."""


@dataclass(frozen=True)
class Splits:
    """Train / validation / test splits of one dataset as tensors."""

    name: str
    task: Task
    num_classes: int | None
    train: TensorDataset
    validation: TensorDataset
    test: TensorDataset

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.tensors[0].shape[1:])

    def to(self, device: torch.device | str) -> Splits:
        """The same splits with every tensor on ``device`` (dtypes kept): move the data once, not per batch.

        Fashion-MNIST's splits take about 200 MB; :class:`adaclip.engine.sampling.TensorPoissonLoader` then
        gathers each batch on the device.
        """
        moved = {
            name: TensorDataset(*(t.to(device) for t in getattr(self, name).tensors))
            for name in ("train", "validation", "test")
        }
        return dataclasses.replace(self, **moved)


def read_idx(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """Parse one gzipped IDX file (unsigned bytes); check its decompressed SHA-256 if given."""
    try:
        with gzip.open(path, "rb") as handle:
            payload = handle.read()
    except (OSError, EOFError) as error:
        raise CorruptDataError(
            f"{path} is not a readable .gz file ({error}); delete it so it is fetched again"
        ) from error
    if expected_sha256 is not None and hashlib.sha256(payload).hexdigest() != expected_sha256:
        raise CorruptDataError(
            f"{path} has the wrong SHA-256 (corrupt or a different dataset); delete it so it is fetched again"
        )
    if len(payload) < 4 or payload[:2] != b"\x00\x00" or payload[2] != 0x08:
        raise CorruptDataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = payload[3]
    shape = tuple(int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(payload) - offset != int(np.prod(shape)):
        raise CorruptDataError(f"{path}: header promises shape {shape} but holds {len(payload) - offset} bytes")
    return np.frombuffer(payload, dtype=np.uint8, offset=offset).reshape(shape)


def _candidate_dirs(name: str) -> list[Path]:
    source = IDX_SOURCES[name]
    candidates = [Path(os.environ[source.env_var])] if os.environ.get(source.env_var) else []
    return [*candidates, Path("data/raw") / name, Path(source.system_dir)]


def _check_data_dir(name: str, data_dir: str | os.PathLike[str]) -> Path:
    """The folder the user named, if it holds all four files of ``name``; otherwise a one-line error."""
    require_path("data_dir", data_dir)
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataNotFoundError(
            f"data_dir {directory} is not a folder (it does not exist or is a file); it must hold the four "
            f"{name} .gz files, or leave data_dir out to use the default places"
        )
    missing = [f"{part}.gz" for part in IDX_PARTS if not (directory / f"{part}.gz").is_file()]
    if missing:
        raise DataNotFoundError(
            f"data_dir {directory} lacks {len(missing)} of the four {name} files: {', '.join(missing)}"
        )
    return directory


def _has_all_parts(directory: Path) -> bool:
    return all((directory / f"{part}.gz").is_file() for part in IDX_PARTS)


def _download(name: str, destination: Path) -> None:
    """Fetch the four files from the mirror into ``destination`` atomically, verifying each."""
    source = IDX_SOURCES[name]
    destination.mkdir(parents=True, exist_ok=True)
    for part in IDX_PARTS:
        target = destination / f"{part}.gz"
        if target.is_file():
            continue
        fd, tmp = tempfile.mkstemp(dir=destination, suffix=".part")
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(source.mirror + target.name, timeout=60) as response,
            ):
                shutil.copyfileobj(response, out)
            read_idx(Path(tmp), source.sha256[part])
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)


def locate_idx(name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """``data_dir`` if given (it must hold all four IDX files of ``name``); else the first default folder holding
    them, downloading them as the last resort."""
    if data_dir is not None:
        return _check_data_dir(name, data_dir)
    candidates = _candidate_dirs(name)
    for directory in candidates:
        if _has_all_parts(directory):
            return directory
    looked = ", ".join(str(c) for c in candidates)
    hint = (
        f"Install Debian's package (apt-get install dataset-fashion-mnist), or put the four .gz files in one "
        f"of those folders, or set {IDX_SOURCES[name].env_var}."
        if name == "fashion-mnist"
        else f"Put the four .gz files in one of those folders or set {IDX_SOURCES[name].env_var}."
    )
    if download:
        try:
            _download(name, Path("data/raw") / name)
            return Path("data/raw") / name
        except OSError as error:
            raise DataNotFoundError(
                f"{name} not found in {looked}, "
                f"and the download from {IDX_SOURCES[name].mirror} failed ({error}). {hint}"
            ) from error
    raise DataNotFoundError(f"{name} not found in {looked} (download disabled). {hint}")


def _split_indices(n: int, fractions: tuple[float, float], generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    order = torch.randperm(n, generator=generator)
    n_val, n_test = round(fractions[0] * n), round(fractions[1] * n)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def _subsample(indices: Tensor, train_size: int | None, generator: torch.Generator) -> Tensor:
    if train_size is None:
        return indices
    if not 1 <= train_size <= len(indices):
        raise ValueError(f"train_size must lie in [1, {len(indices)}] for this dataset, got {train_size}")
    return indices[torch.randperm(len(indices), generator=generator)[:train_size]]


@functools.lru_cache(maxsize=2)
def idx_arrays(directory: Path, name: str, verify: bool) -> dict[str, np.ndarray]:
    """The four verified IDX arrays of ``name`` in ``directory``, read once per process (sweeps reuse them)."""
    digests = IDX_SOURCES[name].sha256 if verify else {}
    return {part: read_idx(directory / f"{part}.gz", digests.get(part)) for part in IDX_PARTS}


def load_idx_dataset(
    name: str,
    *,
    seed: int = 0,
    validation_size: int = VALIDATION_SIZE,
    train_size: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    verify: bool = True,
) -> Splits:
    """Fashion-MNIST or MNIST as ``[n, 1, 28, 28]`` float tensors in ``[0, 1]`` and int64 labels."""
    directory = locate_idx(name, data_dir, download).resolve()
    arrays = idx_arrays(directory, name, verify)
    train_x = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255).unsqueeze(1)
    train_y = torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64))
    test_x = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255).unsqueeze(1)
    test_y = torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64))
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise CorruptDataError(f"{directory}: image and label files disagree on the number of examples")
    if not 1 <= validation_size < len(train_x):
        raise ValueError(f"validation_size must lie in [1, {len(train_x) - 1}], got {validation_size}")
    return _image_splits(
        name, train_x, train_y, test_x, test_y, seed=seed, train_size=train_size, validation_size=validation_size
    )


def _image_splits(
    name: str,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    seed: int,
    train_size: int | None,
    validation_size: int = VALIDATION_SIZE,
) -> Splits:
    """The fixed split (``SPLIT_SEED``) of the official training set into training and validation examples."""
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx = _subsample(order[validation_size:], train_size, torch.Generator().manual_seed(seed))
    val_idx = order[:validation_size]
    return Splits(
        name,
        "classification",
        10,
        TensorDataset(train_x[train_idx], train_y[train_idx]),
        TensorDataset(train_x[val_idx], train_y[val_idx]),
        TensorDataset(test_x, test_y),
    )


@functools.lru_cache(maxsize=1)
def _scatternet_features(path: Path) -> dict[str, Tensor]:
    """The features file written by :mod:`adaclip.research.features`, read once per process."""
    if not path.is_file():
        raise DataNotFoundError(
            f"{path} not found: compute the ScatterNet features first "
            "(`dvc repro features`, or python -m adaclip.research.features --data-dir ... --out ...)"
        )
    loaded: dict[str, Tensor] = torch.load(path, weights_only=True)
    return loaded


def load_scatternet(
    *,
    seed: int,
    train_size: int | None,
    data_dir: str | os.PathLike[str] | None,
    validation_size: int = VALIDATION_SIZE,
) -> Splits:
    """ScatterNet features of Fashion-MNIST, ``[n, K, h, w]``, with Fashion-MNIST's fixed split."""
    features = _scatternet_features(
        (Path(data_dir) if data_dir is not None else SCATTERNET_DIR).resolve() / "features.pt"
    )
    return _image_splits(
        "fashion-mnist-scatternet",
        features["train_x"],
        features["train_y"],
        features["test_x"],
        features["test_y"],
        seed=seed,
        train_size=train_size,
        validation_size=validation_size,
    )


def tabular_splits(name: str, task: Task, x: np.ndarray, y: np.ndarray, seed: int, train_size: int | None) -> Splits:
    """80/10/10 split (fixed by ``SPLIT_SEED``); the run seed draws the ``train_size`` subsample."""
    features = torch.as_tensor(x, dtype=torch.float32)
    targets = torch.as_tensor(y, dtype=torch.int64 if task == "classification" else torch.float32)
    train_idx, val_idx, test_idx = _split_indices(len(features), (0.1, 0.1), torch.Generator().manual_seed(SPLIT_SEED))
    train_idx = _subsample(train_idx, train_size, torch.Generator().manual_seed(seed))
    x_tr, x_va, x_te = features[train_idx], features[val_idx], features[test_idx]
    y_tr, y_va, y_te = targets[train_idx], targets[val_idx], targets[test_idx]
    num_classes = int(targets.max()) + 1 if task == "classification" else None
    return Splits(
        name, task, num_classes, TensorDataset(x_tr, y_tr), TensorDataset(x_va, y_va), TensorDataset(x_te, y_te)
    )


def synthetic_logistic(n: int, dim: int, feature_spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logistic data with feature scales ``s_j`` log-spaced from 1 to ``1 / feature_spread``.

    The true weights are ``w_j = u_j / s_j`` (``u ~ N(0, I / dim)``), so every coordinate matters
    equally for the label while per-example gradients ``(p - y) x_j`` have magnitudes ``~ s_j``.
    """
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, -np.log10(feature_spread), dim)
    x = rng.standard_normal((n, dim)) * scales
    weights = rng.standard_normal(dim) / np.sqrt(dim) / scales * 3
    labels = (rng.random(n) < 1 / (1 + np.exp(-x @ weights))).astype(np.int64)
    return x, labels


def copy_idx(name: str, destination: Path, *, download: bool = True) -> dict[str, object]:
    """Copy the four IDX files of ``name`` into ``destination``, each checked against its SHA-256 first.

    They are located as :func:`locate_idx` says (downloaded only as the last resort); returns the manifest
    entry of the prepare stage: the folder they came from and their checksums.
    """
    source = locate_idx(name, download=download)
    destination.mkdir()
    for part in IDX_PARTS:
        read_idx(source / f"{part}.gz", IDX_SOURCES[name].sha256[part])
        shutil.copyfile(source / f"{part}.gz", destination / f"{part}.gz")
    return {"source": str(source), "sha256": IDX_SOURCES[name].sha256}
