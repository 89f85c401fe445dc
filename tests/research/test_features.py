"""ScatterNet features: shape, per-example normalisation, independence from other examples, the stage's file."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from test_data import write_fake_idx

from adaclip.research import data, features


def test_scattering_gives_81_channels_of_7x7_normalised_per_example_group():
    images = torch.rand(5, 28, 28, generator=torch.Generator().manual_seed(0))
    out = features.scatter_features(images, batch_size=2)
    assert out.shape == (5, 81, 7, 7) and out.dtype == torch.float32
    # GroupNorm written out: 27 groups of 3 consecutive channels x 49 positions, (x - mean) / sqrt(var + 1e-5)
    raw = features.scattering()(images).reshape(5, 27, -1).double()
    mean, var = raw.mean(-1, keepdim=True), raw.var(-1, unbiased=False, keepdim=True)
    expected = ((raw - mean) / (var + 1e-5).sqrt()).reshape(5, 81, 7, 7)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_an_example_s_features_do_not_depend_on_the_other_examples():
    images = torch.rand(6, 28, 28, generator=torch.Generator().manual_seed(1))
    together = features.scatter_features(images, batch_size=6)
    alone = torch.cat([features.scatter_features(images[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    changed = images.clone()
    changed[0] = torch.rand(28, 28)
    torch.testing.assert_close(features.scatter_features(changed)[1:], together[1:], rtol=1e-5, atol=1e-5)


def test_groups_must_divide_the_channels():
    with pytest.raises(ValueError, match="groups=4 must divide the 81"):
        features.scatter_features(torch.rand(1, 28, 28), groups=4)


def test_the_stage_writes_features_that_load_as_a_dataset_with_fashion_mnist_s_split(tmp_path, monkeypatch):
    digests = write_fake_idx(tmp_path / "idx", n_train=40, n_test=10)  # not Fashion-MNIST: its own digests
    monkeypatch.setitem(
        data.IDX_SOURCES, "fashion-mnist", dataclasses.replace(data.IDX_SOURCES["fashion-mnist"], sha256=digests)
    )
    data.idx_arrays.cache_clear()
    # main sets MKL_CBWR for its process; restore this one's afterwards, or every subprocess a later test starts
    # would run MKL on another code path than the test process and differ from it in the last bits
    monkeypatch.setenv("MKL_CBWR", "")  # records this process's value (or its absence) for the teardown
    monkeypatch.delenv("MKL_CBWR")
    assert features.main(["--data-dir", str(tmp_path / "idx"), "--out", str(tmp_path / "out")]) == 0
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"
    data.idx_arrays.cache_clear()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["features.pt"]  # no temporary file left
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "out" / "features.pt").stat().st_mode & 0o777 == 0o666 & ~mask  # as a plain open gives
    splits = data.load_scatternet(seed=0, train_size=None, data_dir=tmp_path / "out", validation_size=8)
    assert splits.input_shape == (81, 7, 7)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (32, 8, 10)


def test_missing_features_name_the_stage(tmp_path):
    with pytest.raises(data.DataNotFoundError, match="dvc repro features"):
        data.load_scatternet(seed=0, train_size=None, data_dir=tmp_path)


def test_the_stage_runs_mkl_s_fft_in_its_reproducible_mode_unless_the_user_chose_one(tmp_path):
    """MKL picks its FFT code path by processor, so the features' bytes differed between machines; the stage runs
    MKL's conditional numerical reproducibility mode, which MKL reports (MKL_VERBOSE) as CNR:COMPATIBLE."""
    digests = write_fake_idx(tmp_path / "idx", n_train=4, n_test=2)
    script = (
        "import dataclasses, sys\n"
        "from adaclip.research import data, features\n"
        f"source = dataclasses.replace(data.IDX_SOURCES['fashion-mnist'], sha256={digests!r})\n"
        "data.IDX_SOURCES['fashion-mnist'] = source\n"
        f"sys.exit(features.main(['--data-dir', {str(tmp_path / 'idx')!r}, '--out', {str(tmp_path / 'out')!r}]))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"}
    env.update(MKL_VERBOSE="1", TQDM_DISABLE="1")
    ran = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    fft_calls = [line for line in ran.stdout.splitlines() if "MKL_VERBOSE FFT" in line]
    assert fft_calls and all("CNR:COMPATIBLE" in line for line in fft_calls)
    env["MKL_CBWR"] = "AUTO"  # a user's own choice is kept
    ran = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert all("CNR:AUTO" in line for line in ran.stdout.splitlines() if "MKL_VERBOSE FFT" in line)
