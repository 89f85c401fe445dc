"""Sweep construction, learning-rate selection and the sweep runner."""

import copy
from pathlib import Path

import pytest

from adaclip.research.analysis import select_learning_rates
from adaclip.research.params import load_params
from adaclip.research.records import read_records
from adaclip.research.sweeps import run_sweep, sweep_configs

ROOT = Path(__file__).resolve().parents[2]


def _record(dataset, method, lr, val, key="val_accuracy"):
    return {"dataset": dataset, "method": method, "config": {"lr": lr}, key: val}


def test_select_learning_rates_maximises_accuracy_minimises_mse_and_breaks_ties_low():
    records = [
        _record("a", "fixed", 0.1, 0.50),
        _record("a", "fixed", 0.1, 0.70),  # mean 0.60
        _record("a", "fixed", 1.0, 0.62),
        _record("a", "fixed", 1.0, 0.60),  # mean 0.61: best
        _record("a", "auto", 0.3, 0.8),
        _record("a", "auto", 3.0, 0.8),  # tie: the smaller lr
        _record("d", "fixed", 0.1, 0.9, "val_mse"),
        _record("d", "fixed", 1.0, 0.4, "val_mse"),
        _record("d", "auto", 0.01, float("nan"), "val_mse"),
        _record("d", "auto", 0.1, 0.9, "val_mse"),  # the first lr diverged
    ]
    assert select_learning_rates(records) == {"a": {"fixed": 1.0, "auto": 0.3}, "d": {"fixed": 1.0, "auto": 0.1}}


@pytest.fixture(scope="module")
def quick():
    return load_params(ROOT / "params.yaml")


def _lrs(params, value=0.1):
    return {d: {m: value for m in [*params["setting"]["methods"], "nonprivate"]} for d in params["setting"]["datasets"]}


def test_sweeps_cover_their_grids(quick):
    methods, datasets = quick["setting"]["methods"], quick["setting"]["datasets"]
    lr = sweep_configs("lr_search", quick)
    assert len(lr) == len(datasets) * (len(methods) + 1) * len(quick["lr_search"]["multipliers"]) * len(
        quick["lr_search"]["seeds"]
    )
    accuracy = sweep_configs("accuracy", quick, _lrs(quick))
    seeds, epsilons = quick["accuracy"]["seeds"], quick["accuracy"]["epsilons"]
    assert len(accuracy) == len(datasets) * len(seeds) * (len(methods) * len(epsilons) + 1)
    assert {c["epsilon"] for c in accuracy if c["method"] == "nonprivate"} == {None}
    clip = sweep_configs("clip", quick, _lrs(quick))
    fixed = [c for c in clip if c["method"] == "fixed"]
    assert sorted(c["method_params"]["clip_norm"] for c in fixed) == sorted(
        quick["clip"]["initial_clips"] * len(quick["clip"]["seeds"])
    )
    assert [c for c in clip if c["method"] == "auto"] and all(
        "method_params" not in c for c in clip if c["method"] == "auto"
    )
    diagnostics = sweep_configs("diagnostics", quick, _lrs(quick))
    assert {c["noise_multiplier"] for c in diagnostics} == {quick["diagnostics"]["noise_multiplier"]}
    assert all(c["epsilon"] is None and c["diagnostics"] for c in diagnostics)
    size = sweep_configs("size", quick, _lrs(quick))
    assert sorted({c["train_size"] for c in size}) == sorted(quick["size"]["train_sizes"])


def test_sweeps_after_lr_search_need_its_learning_rates(quick):
    with pytest.raises(ValueError, match="needs the learning rates selected by the lr_search sweep"):
        sweep_configs("accuracy", quick)
    lrs = _lrs(quick)
    del lrs["diabetes"]["adaclip"]
    with pytest.raises(ValueError, match="no selected learning rate for diabetes/adaclip: re-run the lr_search stage"):
        sweep_configs("accuracy", quick, lrs)


def test_run_sweep_validates_everything_before_running_and_writes_nothing_on_error(tmp_path):
    good = {"dataset": "synthetic", "method": "fixed", "epochs": 1, "progress": False}
    bad = {**good, "method_params": {"clip_nrom": 1.0}}
    out = tmp_path / "runs.jsonl"
    with pytest.raises(ValueError, match="unknown parameter"):
        run_sweep([good, bad], out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_run_sweep_records_do_not_depend_on_the_number_of_workers(tmp_path):
    configs = [
        {"dataset": "synthetic", "method": m, "epochs": 1, "progress": False, "delta": 1e-5, "train_size": 2000}
        for m in ("adaclip", "quantile")
    ]
    one = run_sweep(configs, tmp_path / "one.jsonl", workers=1)
    two = run_sweep(copy.deepcopy(configs), tmp_path / "two.jsonl", workers=2)
    assert read_records(tmp_path / "two.jsonl") == two
    for a, b in zip(one, two, strict=True):
        assert a["method"] == b["method"] and "step_stats" not in a
        assert (a["test_accuracy"], a["per_epoch"], a["step_stats_mean"], a["epsilon"]) == (
            b["test_accuracy"],
            b["per_epoch"],
            b["step_stats_mean"],
            b["epsilon"],
        )


def test_every_registered_scale_parameter_is_a_parameter_of_its_rule():
    """The clip sweep sets each method's ``scale_parameter``; it must be one of the rule's keyword parameters."""
    from adaclip.methods import METHODS, method_parameters

    for name, entry in METHODS.items():
        assert entry.scale_parameter is None or entry.scale_parameter in method_parameters(name), name
