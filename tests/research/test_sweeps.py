"""The sweeps: the tuning grid lr x scale, the runs at the selected hyperparameters, reuse and the sweep runner."""

import copy
import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaclip.methods import METHODS
from adaclip.privacy.accounting import noise_multiplier_for
from adaclip.research import sweeps
from adaclip.research.analysis import Hyperparameters
from adaclip.research.params import load_params
from adaclip.research.records import read_records
from adaclip.research.sweeps import run_sweep, sweep_configs
from adaclip.research.train import TrainConfig, resolve

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny():
    """The tiny profile with a 2 x 3 grid (lr factors x scale factors) and 4 non-private cells."""
    params = load_params(ROOT / "tests" / "fixtures" / "params-tiny.yaml")
    grid = dataclasses.replace(
        params.tuning, lr_factors=(1.0, 3.0), scale_factors=(0.1, 1.0, 10.0), nonprivate_lr_factors=(0.5, 1, 2, 4)
    )
    return dataclasses.replace(params, tuning=grid)


def _scale(config):
    parameter = METHODS[config["method"]].scale_parameter if config["method"] in METHODS else None
    return None if parameter is None else config["method_params"].get(parameter)


def _cells(configs, task, method):
    return [c for c in configs if c["task"] == task and c["method"] == method]


def test_tuning_grid_is_lr_per_unit_of_scale_for_dpsgd_and_lr_for_the_others(tiny):
    configs = sweep_configs("tuning", tiny)
    grid = tiny.tuning
    for name, task in tiny.setting.tasks.items():
        for method in task.methods:
            cells = _cells(configs, name, method)
            entry = METHODS[method]
            steps = sorted(task.lr[method] * f for f in grid.lr_factors)
            if entry.scale_parameter is None:  # AUTO-S: the lr axis only
                assert sorted(c["lr"] for c in cells) == pytest.approx(steps)
                assert all(c["method_params"] == {} for c in cells)
                continue
            assert len(cells) == len(grid.lr_factors) * len(grid.scale_factors) * len(grid.seeds)
            scales = sorted({_scale(c) for c in cells})
            assert scales == pytest.approx(sorted(task.scale[method] * f for f in grid.scale_factors))
            for scale in scales:
                row = sorted(c["lr"] for c in cells if _scale(c) == scale)
                if entry.step_per_scale:  # lr = step / C: lr x C is the same all along the scale axis
                    assert [lr * scale for lr in row] == pytest.approx(steps, rel=1e-12)
                else:
                    assert row == pytest.approx(steps, rel=1e-12)
        nonprivate = _cells(configs, name, "nonprivate")
        assert len(nonprivate) == len(grid.nonprivate_lr_factors) * len(grid.seeds)
        assert sorted(c["lr"] for c in nonprivate) == pytest.approx(
            sorted(task.lr["nonprivate"] * f for f in grid.nonprivate_lr_factors)
        )
    assert {c["epsilon"] for c in configs if c["method"] != "nonprivate"} == {tiny.setting.epsilon}
    assert {c["epsilon"] for c in configs if c["method"] == "nonprivate"} == {None}
    # DP-SGD's cells really differ in lr along the scale axis (the step is what stays fixed)
    fixed = _cells(configs, "breast-cancer", "fixed")
    assert len({c["lr"] for c in fixed}) == len(fixed)
    for config in configs:
        resolve(TrainConfig.from_dict(config))  # every cell is a valid run


def _selected(params):
    """Distinct made-up hyperparameters for every task and method (and non-private)."""
    chosen = {}
    for index, (name, task) in enumerate(params.setting.tasks.items()):
        for j, method in enumerate((*task.methods, "nonprivate")):
            has_scale = method in METHODS and METHODS[method].scale_parameter is not None
            chosen[(name, method)] = Hyperparameters(
                lr=0.01 * (1 + index) + 0.001 * j, scale=task.scale[method] * (1.5 + index) if has_scale else None
            )
    return chosen


@pytest.mark.parametrize("sweep", ["accuracy", "size", "diagnostics"])
def test_later_sweeps_run_exactly_the_selected_hyperparameters(tiny, sweep):
    selected = _selected(tiny)
    configs = sweep_configs(sweep, tiny, selected)
    assert configs
    for config in configs:
        chosen = selected[(config["task"], config["method"])]
        assert config["lr"] == chosen.lr
        assert _scale(config) == chosen.scale
        resolve(TrainConfig.from_dict(config))
    if sweep == "diagnostics":
        assert all(c["diagnostics"] for c in configs) and {c["method"] for c in configs} == set(
            tiny.task("breast-cancer").methods
        )
        assert {c["epsilon"] for c in configs} == {tiny.setting.epsilon}


def test_accuracy_sweep_covers_task_x_method_x_epsilon_x_seed_and_the_baseline(tiny):
    configs = sweep_configs("accuracy", tiny, _selected(tiny))
    acc = tiny.accuracy
    expected = sum(len(acc.seeds) * (len(t.methods) * len(acc.epsilons) + 1) for t in tiny.setting.tasks.values())
    assert len(configs) == expected
    for name, task in tiny.setting.tasks.items():
        for method in task.methods:
            runs = _cells(configs, name, method)
            assert sorted((c["epsilon"], c["seed"]) for c in runs) == sorted(
                (e, s) for e in acc.epsilons for s in acc.seeds
            )
        assert sorted(c["seed"] for c in _cells(configs, name, "nonprivate")) == sorted(acc.seeds)
        assert {c["epsilon"] for c in _cells(configs, name, "nonprivate")} == {None}


def test_later_sweeps_need_the_tuning_records_and_every_selected_cell(tiny):
    with pytest.raises(ValueError, match="the accuracy sweep needs the hyperparameters selected from the tuning"):
        sweep_configs("accuracy", tiny)
    selected = _selected(tiny)
    del selected[("diabetes", "adaclip")]
    with pytest.raises(ValueError, match="no tuned hyperparameters for task 'diabetes', method 'adaclip'"):
        sweep_configs("accuracy", tiny, selected)
    with pytest.raises(ValueError, match="sweep must be one of"):
        sweep_configs("clip", tiny, selected)


def _steps_and_sigma(config, params, accountant=None):
    """What make_private does with a config: q = B / n, epochs x int(1 / q) steps, sigma calibrated for them."""
    q = config["batch_size"] / config["train_size"]
    steps = config["epochs"] * int(1 / q)
    sigma = noise_multiplier_for(
        target_epsilon=config["epsilon"],
        sample_rate=q,
        steps=steps,
        delta=params.setting.delta,
        accountant=accountant or params.setting.accountant,
    )
    return steps, sigma


def test_size_sweep_keeps_the_sampling_rate_so_every_n_has_the_same_steps_and_sigma(tiny):
    # B = 65 of N = 455 is q = 1/7 exactly, and so is B n / N for n = 182 and 364
    task = dataclasses.replace(tiny.task("breast-cancer"), batch_size=65, epochs=2)
    params = dataclasses.replace(
        tiny,
        setting=dataclasses.replace(tiny.setting, tasks={**tiny.setting.tasks, "breast-cancer": task}),
        size=dataclasses.replace(tiny.size, train_sizes=(182, 364), seeds=(0, 1)),
    )
    configs = sweep_configs("size", params, _selected(params))
    assert len(configs) == 2 * 2 * (len(task.methods) + 1)
    assert {(c["train_size"], c["batch_size"]) for c in configs} == {(182, 26), (364, 52)}
    assert {c["epochs"] for c in configs} == {2}
    full = {**configs[0], "train_size": 455, "batch_size": 65, "epsilon": params.setting.epsilon}
    reference = _steps_and_sigma(full, params)
    private = [c for c in configs if c["method"] != "nonprivate"]
    assert {c["epsilon"] for c in private} == {params.setting.epsilon}
    assert {_steps_and_sigma(c, params) for c in private} == {reference}


def test_size_sweep_of_the_quick_profile_keeps_steps_and_sigma_up_to_rounding_q_n():
    quick = load_params(ROOT / "params.yaml")
    task = quick.task(quick.size.task)
    configs = [c for c in sweep_configs("size", quick, _selected(quick)) if c["method"] == "fixed" and c["seed"] == 0]
    assert sorted(c["train_size"] for c in configs) == sorted(quick.size.train_sizes)
    full = {**configs[0], "train_size": 55000, "batch_size": task.batch_size}
    steps, sigma = _steps_and_sigma(full, quick, "rdp")  # RDP: the fastest calibration, the same argument
    for config in configs:
        n = config["train_size"]
        assert abs(config["batch_size"] - task.batch_size * n / 55000) <= 0.5  # q n rounded
        size_steps, size_sigma = _steps_and_sigma(config, quick, "rdp")
        assert size_steps == steps and size_sigma == pytest.approx(sigma, rel=2e-3)


def _fake_run(calls):
    """A stand-in for train.run that records its calls and returns a record carrying the resolved config."""

    def run(config):
        calls.append(config)
        resolved = dataclasses.asdict(resolve(TrainConfig.from_dict(config)))
        return {"config": resolved, "method": config["method"], "call": len(calls), "step_stats": {"snr": [1.0]}}

    return run


def test_a_run_identical_to_a_tuning_record_is_reused_not_rerun(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweeps, "run", _fake_run(calls))
    tuning = run_sweep(sweep_configs("tuning", tiny), tmp_path / "tuning.jsonl", progress=False)
    assert len(calls) == len(tuning) and all("step_stats" not in r for r in tuning)
    # select one cell per task and method: the first of the grid
    selected = {}
    for record in tuning:
        config = record["config"]
        key = (config["task"], config["method"])
        if key not in selected:
            selected[key] = Hyperparameters(lr=config["lr"], scale=_scale(config))
    configs = sweep_configs("accuracy", tiny, selected)
    calls.clear()
    records = run_sweep(configs, tmp_path / "accuracy.jsonl", progress=False, reuse=tuning)
    main = tiny.setting.epsilon
    reusable = [
        c for c in configs if c["seed"] in tiny.tuning.seeds and c["epsilon"] in (main, None)
    ]  # the selected cell at the tuning epsilon and seed
    assert len(reusable) == sum(len(t.methods) + 1 for t in tiny.setting.tasks.values())
    assert len(calls) == len(configs) - len(reusable)
    by_key = {sweeps._key(r["config"]): r for r in tuning}
    for config, record in zip(configs, records, strict=True):
        if config in reusable:
            assert record == by_key[sweeps._key(record["config"])]  # the tuning record itself
        else:
            assert record["config"]["epsilon"] == config["epsilon"] and record["config"]["seed"] == config["seed"]
    assert read_records(tmp_path / "accuracy.jsonl") == records


def test_a_diagnostics_run_reuses_only_a_record_with_step_statistics(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweeps, "run", _fake_run(calls))
    configs = sweep_configs("diagnostics", tiny, _selected(tiny))[:2]
    resolved = [dataclasses.asdict(resolve(TrainConfig.from_dict(c))) for c in configs]
    without = [{"config": r, "method": r["method"], "call": 0} for r in resolved]
    run_sweep(configs, tmp_path / "a.jsonl", keep_step_stats=True, progress=False, reuse=without)
    assert len(calls) == 2  # a record without step statistics cannot stand in for a diagnostics run
    with_stats = [{**r, "step_stats": {"snr": [2.0]}} for r in without]
    calls.clear()
    records = run_sweep(configs, tmp_path / "b.jsonl", keep_step_stats=True, progress=False, reuse=with_stats)
    assert calls == [] and records == with_stats


def test_run_sweep_prints_runs_done_of_total_and_time_left(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(sweeps, "run", _fake_run([]))
    configs = [{"dataset": "breast-cancer", "method": "fixed", "epochs": 1, "seed": s} for s in range(3)]
    run_sweep(configs, tmp_path / "runs.jsonl", label="tuning")
    captured = capsys.readouterr()
    lines = captured.err.splitlines()  # stderr is not a terminal here: a line per run, as in a log
    assert [line.split(",")[0] for line in lines] == ["tuning: 1/3 runs", "tuning: 2/3 runs", "tuning: 3/3 runs"]
    assert all("s left" in line for line in lines)
    assert "tuning: 3 runs in" in captured.out
    run_sweep(configs, tmp_path / "quiet.jsonl", progress=False)
    assert capsys.readouterr() == ("", "")


def test_run_sweep_validates_everything_before_running_and_writes_nothing_on_error(tmp_path):
    good = {"dataset": "synthetic", "method": "fixed", "epochs": 1, "progress": False}
    bad = {**good, "method_params": {"clip_nrom": 1.0}, "task": "t"}
    out = tmp_path / "runs.jsonl"
    with pytest.raises(ValueError, match=r"sweep run 1 \(t/fixed, seed None\): unknown parameter"):
        run_sweep([good, bad], out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        run_sweep([good], out, workers=True)


def test_run_sweep_records_do_not_depend_on_the_number_of_workers(tmp_path):
    configs = [
        {"dataset": "breast-cancer", "method": m, "epochs": 1, "progress": False} for m in ("adaclip", "quantile")
    ]
    one = run_sweep(configs, tmp_path / "one.jsonl", workers=1, progress=False)
    two = run_sweep(copy.deepcopy(configs), tmp_path / "two.jsonl", workers=2, progress=False)
    assert read_records(tmp_path / "two.jsonl") == two
    for a, b in zip(one, two, strict=True):
        assert a["method"] == b["method"] and "step_stats" not in a
        assert (a["test_accuracy"], a["per_epoch"], a["step_stats_mean"], a["epsilon"]) == (
            b["test_accuracy"],
            b["per_epoch"],
            b["step_stats_mean"],
            b["epsilon"],
        )
        assert math.isfinite(a["test_accuracy"])


SWEEP_PARENT = """
import sys
from adaclip.research.sweeps import run_sweep
run = {"dataset": "breast-cancer", "method": "fixed", "epochs": 100000, "progress": False}
configs = [{**run, "seed": seed} for seed in (0, 1)]
run_sweep(configs, sys.argv[1], workers=2, progress=False)
"""


def _workers_of(parent: int) -> list[int]:
    """Live pool workers (spawned processes other than the resource tracker) whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == parent and state != "Z" and b"spawn_main" in command and b"resource_tracker" not in command:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_sweep_workers_exit_when_the_sweep_is_killed(tmp_path):
    """``kill -9`` of a sweep's process ends its pool workers soon, not after their runs (hours here)."""
    parent = subprocess.Popen([sys.executable, "-c", SWEEP_PARENT, str(tmp_path / "runs.jsonl")])
    try:
        deadline = time.monotonic() + 120
        while len(workers := _workers_of(parent.pid)) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, "the sweep did not start two workers"
            time.sleep(0.2)
        assert all(_alive(pid) for pid in workers)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 60  # generous for a loaded machine: a worker may still be importing torch
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "pool workers outlived their killed sweep"
    assert not (tmp_path / "runs.jsonl").exists()
