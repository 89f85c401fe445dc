"""Adding a dataset takes its spec and nothing else.

A small synthetic regression (``y = x . w``, no noise beyond float rounding) is registered for the duration of
each test, the way a new dataset would be; params validation, the prepare stage, ``adaclip train``, the sweeps
and the report's direction of "better" must all take it from its spec alone.
"""

import json

import numpy as np
import pandas as pd
import pytest

from adaclip.research import analysis, cli, report
from adaclip.research.data import tabular_splits
from adaclip.research.datasets import (
    DATASETS,
    DatasetSpec,
    LoadRequest,
    RunDefaults,
    dataset_spec,
    load_dataset,
    prepare,
    register_dataset,
    registered_dataset,
)
from adaclip.research.params import params_from_mapping
from adaclip.research.records import load_yaml
from adaclip.research.sweeps import run_sweep, tuning_configs

ROWS, FEATURES = 200, 4


def _load_ramp(request: LoadRequest):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, FEATURES))
    return tabular_splits(
        request.name, "regression", x, x @ np.arange(1.0, FEATURES + 1), request.seed, request.train_size
    )


RAMP = DatasetSpec(
    name="ramp",
    task="regression",
    train_size=ROWS - 2 * round(0.1 * ROWS),
    input="table",
    source="generated in the test",
    prepared_as="ramp",
    prepare=lambda staging, download: {"source": "generated in the test"},
    files=None,
    load=_load_ramp,
    defaults=RunDefaults(model="linear", batch_size=20, epochs=1, lr=0.05, nonprivate_lr=0.05),
)


@pytest.fixture
def ramp():
    with registered_dataset(RAMP) as name:
        yield name
    assert name not in DATASETS


def _params_with_ramp():
    values = load_yaml("tests/fixtures/params-tiny.yaml")
    values["data"]["datasets"].append("ramp")
    values["setting"]["tasks"]["ramp"] = {
        "dataset": "ramp",
        "model": "linear",
        "epochs": 1,
        "batch_size": 20,
        "momentum": 0.0,
        "train_size": None,
        "methods": ["fixed"],
        "lr": {"fixed": 0.05, "nonprivate": 0.05},
        "scale": {"fixed": 1.0},
        "method_params": {},
    }
    return params_from_mapping(values)


def test_the_spec_gives_the_metric_and_its_direction(ramp):
    spec = dataset_spec(ramp)
    assert (spec.metric, spec.higher_is_better) == ("mse", False)
    assert (dataset_spec("breast-cancer").metric, dataset_spec("breast-cancer").higher_is_better) == ("accuracy", True)
    with pytest.raises(ValueError, match="new dataset name"):
        register_dataset(RAMP)


def test_params_validation_takes_it_and_checks_it_like_any_other(ramp):
    params = _params_with_ramp()
    assert params.task("ramp").dataset == ramp
    values = load_yaml("tests/fixtures/params-tiny.yaml")
    values["setting"]["tasks"]["ramp"] = {**values["setting"]["tasks"]["diabetes"], "dataset": "ramp"}
    with pytest.raises(ValueError, match=r"needs 'ramp' in data\.datasets"):
        params_from_mapping(values)
    values["data"]["datasets"].append("ramp")
    values["setting"]["tasks"]["ramp"]["model"] = "logistic"
    with pytest.raises(ValueError, match=r"model='logistic' does not fit ramp \(regression\)"):
        params_from_mapping(values)


def test_it_is_prepared_and_loaded(ramp, tmp_path):
    manifest = prepare(["ramp", "diabetes"], tmp_path / "prepared")
    assert manifest["ramp"] == {"source": "generated in the test"}
    assert json.loads((tmp_path / "prepared" / "manifest.json").read_text())["ramp"] == manifest["ramp"]
    splits = load_dataset(ramp, seed=1, train_size=50)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (50, 20, 20)
    x, y = splits.test.tensors
    np.testing.assert_allclose(y.numpy(), x.numpy() @ np.arange(1.0, FEATURES + 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="data_dir is for the datasets read from files"):
        load_dataset(ramp, data_dir=tmp_path)


def test_adaclip_train_trains_on_it_with_the_spec_defaults(ramp, tmp_path):
    out = tmp_path / "record.json"
    code = cli.main(["train", "--dataset", ramp, "--method", "fixed", "--no-progress", "--out", str(out)])
    record = json.loads(out.read_text())
    assert code == 0
    assert (record["model"], record["config"]["batch_size"], record["config"]["lr"]) == ("linear", 20, 0.05)
    assert record["train_size"] == RAMP.train_size and np.isfinite(record["test_mse"])


def test_the_sweeps_and_the_report_take_its_direction_from_the_spec(ramp, tmp_path, monkeypatch):
    params = _params_with_ramp()
    configs = [c for c in tuning_configs(params) if c["task"] == "ramp"]
    assert len(configs) == 2 * 2 and all("data_dir" not in c for c in configs)  # 2 lr cells, fixed and non-private
    (record,) = run_sweep(configs[:1], tmp_path / "tuning.jsonl", progress=False)
    assert record["dataset"] == ramp and "test_mse" in record
    gains = pd.DataFrame(
        [
            {"task": "ramp", "method": "fixed", "heterogeneity": 0.5, "difference": -0.1, "low": -0.2, "high": 0.0},
            {"task": "breast-cancer", "method": "fixed", "heterogeneity": 0.5, "difference": 1, "low": 0, "high": 2},
        ],
    ).assign(snr_ratio=1.0)
    monkeypatch.setattr(analysis, "heterogeneity_gains", lambda *args: gains)
    directions = report._heterogeneity([], [], params)
    assert directions["ramp"]["methods"]["fixed"]["higher_is_better"] is False
    assert directions["breast-cancer"]["methods"]["fixed"]["higher_is_better"] is True
