"""Dataset loading: IDX parsing, search order, checksums, download, splits and standardisation."""

import dataclasses
import functools
import gzip
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from adaclip.research import data
from adaclip.research.data import IDX_PARTS, CorruptDataError, DataNotFoundError, read_idx
from adaclip.research.datasets import dataset_spec, load_dataset

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def idx_payload(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_idx(directory: Path, n_train: int = 120, n_test: int = 30, seed: int = 0) -> dict[str, str]:
    """Four small IDX .gz files; returns the SHA-256 of each decompressed payload."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    digests = {}
    for part, array in arrays.items():
        payload = idx_payload(array)
        (directory / f"{part}.gz").write_bytes(gzip.compress(payload))
        digests[part] = hashlib.sha256(payload).hexdigest()
    return digests


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Run in an empty folder with no system copy and no environment variable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    source = dataclasses.replace(data.IDX_SOURCES["fashion-mnist"], system_dir=str(tmp_path / "no-system-copy"))
    monkeypatch.setitem(data.IDX_SOURCES, "fashion-mnist", source)
    return tmp_path


def test_read_idx_parses_header_and_checks_content(tmp_path):
    array = np.arange(24).reshape(2, 3, 4)
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_payload(array)))
    np.testing.assert_array_equal(read_idx(path, hashlib.sha256(idx_payload(array)).hexdigest()), array)
    with pytest.raises(CorruptDataError, match="SHA-256"):
        read_idx(path, "0" * 64)
    path.write_bytes(gzip.compress(idx_payload(array))[:-10])
    with pytest.raises(CorruptDataError, match=r"not a readable \.gz"):
        read_idx(path)
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc"))
    with pytest.raises(CorruptDataError, match="magic"):
        read_idx(path)
    path.write_bytes(gzip.compress(idx_payload(array)[:-1]))
    with pytest.raises(CorruptDataError, match="header promises"):
        read_idx(path)


def test_loads_fake_idx_from_data_dir_with_a_fixed_split_and_pixels_in_unit_range(isolated):
    write_fake_idx(isolated / "fake")
    load = functools.partial(data.load_idx_dataset, "fashion-mnist", data_dir=isolated / "fake", validation_size=20)
    splits = load(verify=False, seed=1)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (100, 20, 30)
    train_x = splits.train.tensors[0]
    # data-independent scaling: pixel / 255, no statistic of the training set
    assert train_x.min() >= 0 and train_x.max() <= 1 and train_x.max() > 0.99
    torch.testing.assert_close(train_x * 255, (train_x * 255).round())
    # the split does not depend on the run seed
    other = load(verify=False, seed=2)
    assert torch.equal(other.validation.tensors[0], splits.validation.tensors[0])
    assert torch.equal(other.train.tensors[0], splits.train.tensors[0])
    # train and validation rows come from different images
    rows = {tuple(x.flatten()[:20].tolist()) for x in splits.train.tensors[0]}
    val_rows = {tuple(x.flatten()[:20].tolist()) for x in splits.validation.tensors[0]}
    assert len(rows) == 100 and not rows & val_rows
    # the run seed draws the train_size subsample
    assert not torch.equal(
        load(verify=False, seed=1, train_size=50).train.tensors[0],
        load(verify=False, seed=2, train_size=50).train.tensors[0],
    )


def test_search_order_environment_then_data_raw(isolated, monkeypatch):
    write_fake_idx(isolated / "data" / "raw" / "fashion-mnist")
    assert data.locate_idx("fashion-mnist", download=False) == Path("data/raw/fashion-mnist")
    write_fake_idx(isolated / "from-env")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(isolated / "from-env"))
    assert data.locate_idx("fashion-mnist", download=False) == isolated / "from-env"
    assert (
        data.locate_idx("fashion-mnist", data_dir=isolated / "data/raw/fashion-mnist", download=False)
        == isolated / "data/raw/fashion-mnist"
    )


def test_missing_dataset_says_where_it_looked_and_how_to_fix(isolated):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist", download=False)
    message = str(info.value)
    assert "data/raw/fashion-mnist" in message and "no-system-copy" in message
    assert "apt-get install dataset-fashion-mnist" in message and "FASHION_MNIST_DIR" in message


def test_failed_download_is_reported_with_the_hint(isolated, monkeypatch):
    def offline(url, timeout):
        raise OSError("network unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataNotFoundError, match=r"download from .* failed"):
        load_dataset("fashion-mnist")
    assert not list((isolated / "data" / "raw" / "fashion-mnist").glob("*"))  # nothing half-written


def test_download_verifies_and_writes_atomically(isolated, monkeypatch):
    served = isolated / "mirror"
    digests = write_fake_idx(served)
    source = dataclasses.replace(data.IDX_SOURCES["fashion-mnist"], sha256=digests)
    monkeypatch.setitem(data.IDX_SOURCES, "fashion-mnist", source)
    monkeypatch.setattr(
        data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO((served / url.rsplit("/", 1)[1]).read_bytes())
    )
    splits = data.load_idx_dataset("fashion-mnist", validation_size=20)
    assert len(splits.train) == 100
    assert sorted(p.name for p in (isolated / "data/raw/fashion-mnist").iterdir()) == sorted(
        f"{p}.gz" for p in IDX_PARTS
    )
    # a corrupt download is refused and leaves nothing behind
    wrong = dataclasses.replace(source, sha256={**digests, "t10k-labels-idx1-ubyte": "0" * 64})
    monkeypatch.setitem(data.IDX_SOURCES, "fashion-mnist", wrong)
    monkeypatch.chdir(isolated / "mirror")
    with pytest.raises(CorruptDataError):
        data.load_idx_dataset("fashion-mnist", validation_size=20)
    assert not (isolated / "mirror/data/raw/fashion-mnist/t10k-labels-idx1-ubyte.gz").exists()
    assert not list((isolated / "mirror/data/raw/fashion-mnist").glob("*.part"))


def test_corrupt_local_file_is_named(isolated):
    write_fake_idx(isolated / "data" / "raw" / "fashion-mnist")
    with pytest.raises(CorruptDataError, match=r"train-images-idx3-ubyte\.gz has the wrong SHA-256"):
        load_dataset("fashion-mnist", download=False)


@pytest.mark.skipif(
    not (SYSTEM_FMNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist_loads_and_verifies(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    splits = load_dataset("fashion-mnist", download=False)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (55000, 5000, 10000)
    labels = torch.cat([splits.train.tensors[1], splits.validation.tensors[1]])
    assert torch.equal(torch.bincount(labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(splits.test.tensors[1]), torch.full((10,), 1000))


def test_mnist_needs_no_network_unless_asked(isolated, monkeypatch):
    monkeypatch.delenv("MNIST_DIR", raising=False)
    with pytest.raises(DataNotFoundError, match="MNIST_DIR"):
        load_dataset("mnist", download=False)


@pytest.mark.parametrize(
    "name, task, sizes", [("breast-cancer", "classification", (455, 57, 57)), ("diabetes", "regression", (354, 44, 44))]
)
def test_sklearn_datasets_split_80_10_10_with_data_independent_preprocessing(name, task, sizes):
    from sklearn.datasets import load_breast_cancer, load_diabetes

    splits = load_dataset(name, seed=0)
    assert splits.task == task
    assert (len(splits.train), len(splits.validation), len(splits.test)) == sizes
    assert dataset_spec(name).train_size == sizes[0]
    raw_x, raw_y = (load_breast_cancer if name == "breast-cancer" else load_diabetes)(return_X_y=True)
    rows = torch.cat([splits.train.tensors[0], splits.validation.tensors[0], splits.test.tensors[0]])
    targets = torch.cat([splits.train.tensors[1], splits.validation.tensors[1], splits.test.tensors[1]])
    # every example as published (no statistic of the training set), the diabetes target divided by a constant
    expected_x = raw_x
    expected_y = raw_y if task == "classification" else raw_y / data.DIABETES_TARGET_SCALE
    order = np.lexsort(expected_x.T[::-1])
    got = np.lexsort(rows.double().numpy().T[::-1])
    np.testing.assert_allclose(rows.double().numpy()[got], expected_x[order], rtol=1e-6)
    np.testing.assert_allclose(targets.double().numpy()[got], expected_y[order], rtol=1e-6)
    assert torch.equal(load_dataset(name, seed=5).test.tensors[0], splits.test.tensors[0])  # fixed split
    if task == "classification":
        assert splits.num_classes == 2 and splits.train.tensors[1].dtype == torch.int64


def test_train_size_subsamples_and_is_validated():
    assert len(load_dataset("breast-cancer", train_size=100).train) == 100
    with pytest.raises(ValueError, match="train_size"):
        load_dataset("breast-cancer", train_size=10_000)


def test_synthetic_has_the_chosen_feature_spread():
    x, y = data.synthetic_logistic(20000, 10, 100.0, seed=0)
    stds = x.std(0)
    assert stds[0] / stds[-1] == pytest.approx(100, rel=0.05)
    assert 0.3 < y.mean() < 0.7


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("cifar")


def test_image_and_label_counts_that_disagree_are_named_with_the_folder(isolated):
    folder = isolated / "fake"
    write_fake_idx(folder)
    labels = folder / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_payload(np.arange(119) % 10)))  # 120 images, 119 labels
    with pytest.raises(CorruptDataError, match=r"fake: image and label files disagree"):
        data.load_idx_dataset("fashion-mnist", data_dir=folder, verify=False, download=False)


def test_a_named_data_dir_is_used_or_refused_never_replaced(isolated, monkeypatch):
    """``--data-dir`` that did not exist, or lacked files, silently fell back to the system copy."""
    write_fake_idx(isolated / "data" / "raw" / "fashion-mnist")  # a default place that would have been used
    write_fake_idx(isolated / "from-env")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(isolated / "from-env"))
    with pytest.raises(DataNotFoundError, match=r"data_dir .*missing-folder is not a folder"):
        data.locate_idx("fashion-mnist", data_dir=isolated / "missing-folder")
    partial = isolated / "partial"
    write_fake_idx(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match=r"lacks 1 of the four fashion-mnist files: t10k-labels-idx1-ubyte\.gz"):
        load_dataset("fashion-mnist", data_dir=partial, verify=False)
    (isolated / "a-file").write_text("x")
    with pytest.raises(DataNotFoundError, match="is not a folder"):
        data.locate_idx("fashion-mnist", data_dir=isolated / "a-file")
    assert not list((isolated / "partial").glob("*.part"))  # nothing downloaded into it


def test_data_dir_for_a_dataset_without_files_is_refused():
    with pytest.raises(
        ValueError, match=r"data_dir is for the datasets read from files .* 'breast-cancer' needs no files"
    ):
        load_dataset("breast-cancer", data_dir="/usr/share/datasets")
