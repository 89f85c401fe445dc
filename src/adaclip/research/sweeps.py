"""The report's training sweeps: a validated :class:`~adaclip.research.params.Params` in, run records out.

A sweep is a list of :class:`adaclip.research.train.TrainConfig` dictionaries, each run by
:func:`adaclip.research.train.run`:

* ``tuning`` – for every task and private method, the joint grid learning rate x scale (the method's
  ``scale_parameter``, e.g. DP-SGD's ``C``, AdaCliP's ``initial_clip``) at ``setting.epsilon``, plus the
  non-private baseline's learning-rate grid (as many cells).  For a method whose release scales with
  its scale parameter (``step_per_scale``: DP-SGD, DP-PSAC) the learning-rate axis is the step per unit
  of scale, so that the grid does not confound the clip norm with the step size.  :func:`select`
  keeps, per task and method, the cell with the best mean *validation* metric.
* ``accuracy`` – task x method x epsilon x seed at the selected hyperparameters (tuned at
  ``setting.epsilon``), plus the non-private baseline per task and seed.
* ``size`` – the size task's method x n x seed at the selected hyperparameters and ``setting.epsilon``,
  at the task's sampling rate ``q = B / N`` and number of epochs (so the same number of steps and the
  same sigma for every ``n``: the batch is ``q n``), plus non-private at the same steps.
* ``diagnostics`` – every method of the diagnostics tasks at its selected hyperparameters and
  ``setting.epsilon``, recording :mod:`adaclip.research.diagnostics` every step.

Every config is resolved (validated) before the first run.  Runs execute in ``runtime.workers``
processes with one torch thread each, so the records do not depend on the number of workers; a worker
exits within a second of its sweep's process dying (even by ``kill -9``), instead of finishing its run.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from adaclip._validate import require_int, require_one_of
from adaclip.methods import METHODS, NONPRIVATE
from adaclip.research.analysis import Hyperparameters
from adaclip.research.datasets import dataset_spec
from adaclip.research.params import SWEEPS, Params, Task, size_batch
from adaclip.research.records import write_records
from adaclip.research.train import TrainConfig, resolve, run

TIMINGS = ("wall_time_s", "examples_per_s")
"""Record fields that change from run to run of the same config: kept apart (:func:`timings_path`), so that a
sweep's records are byte-identical whenever its numbers are and regeneration can be checked with a diff."""


def timings_path(out: str | os.PathLike[str]) -> Path:
    """Where the timings of the sweep written to ``out`` go: ``runs/x.jsonl`` -> ``runs/x.timings.jsonl``."""
    path = Path(out)
    return path.with_name(path.stem + ".timings" + path.suffix)


def _base(params: Params, name: str, method: str, seed: int) -> dict[str, Any]:
    task = params.task(name)
    config: dict[str, Any] = {
        "dataset": task.dataset,
        "task": name,
        "model": task.model,
        "method": method,
        "seed": seed,
        "accountant": params.setting.accountant,
        "delta": params.setting.delta,
        "epsilon": None if method == NONPRIVATE else params.setting.epsilon,
        "device": params.runtime.device,
        "epochs": task.epochs,
        "batch_size": task.batch_size,
        "momentum": task.momentum,
        "train_size": task.train_size,
        **({} if task.feature_spread is None else {"feature_spread": task.feature_spread}),
        "progress": False,
        "on_divergence": "record",  # a diverged grid cell is a result (never selected), not a failed sweep
        "method_params": dict(task.method_params.get(method, {})),
    }
    if dataset_spec(task.dataset).files is not None:
        config["data_dir"] = None  # filled by run_sweep from the prepared data or features folder
    return config


def grid_point(task: Task, method: str, lr_factor: float, scale_factor: float | None) -> Hyperparameters:
    """The learning rate and scale of one grid cell (see the module docstring)."""
    entry = METHODS[method]
    if entry.scale_parameter is None or scale_factor is None:
        return Hyperparameters(lr=task.lr[method] * lr_factor, scale=None)
    scale = task.scale[method] * scale_factor
    step = task.lr[method] * lr_factor
    return Hyperparameters(lr=step / scale if entry.step_per_scale else step, scale=scale)


def _with(config: dict[str, Any], method: str, chosen: Hyperparameters) -> dict[str, Any]:
    parameter = METHODS[method].scale_parameter if method in METHODS else None
    result = {**config, "lr": chosen.lr}
    if parameter is not None and chosen.scale is not None:
        result["method_params"] = {**config["method_params"], parameter: chosen.scale}
    return result


def tuning_configs(params: Params) -> list[dict[str, Any]]:
    """Every task x method x grid cell x seed at ``setting.epsilon``, and the non-private lr grid."""
    configs = []
    grid = params.tuning
    for name, task in params.setting.tasks.items():
        for seed in grid.seeds:
            for method in task.methods:
                has_scale = METHODS[method].scale_parameter is not None
                for scale_factor in grid.scale_factors if has_scale else (None,):
                    for lr_factor in grid.lr_factors:
                        point = grid_point(task, method, lr_factor, scale_factor)
                        configs.append(_with(_base(params, name, method, seed), method, point))
            for lr_factor in grid.nonprivate_lr_factors:
                point = Hyperparameters(lr=task.lr[NONPRIVATE] * lr_factor, scale=None)
                configs.append(_with(_base(params, name, NONPRIVATE, seed), NONPRIVATE, point))
    return configs


def _chosen(selected: dict[tuple[str, str], Hyperparameters], task: str, method: str) -> Hyperparameters:
    try:
        return selected[(task, method)]
    except KeyError:
        raise ValueError(
            f"no tuned hyperparameters for task {task!r}, method {method!r}: "
            "re-run the tuning stage with this task and method"
        ) from None


def sweep_configs(
    name: str, params: Params, selected: dict[tuple[str, str], Hyperparameters] | None = None
) -> list[dict[str, Any]]:
    """The configs of sweep ``name`` (one of :data:`SWEEPS`), at the hyperparameters ``select`` chose."""
    require_one_of("sweep", name, SWEEPS)
    if name == "tuning":
        return tuning_configs(params)
    if selected is None:
        raise ValueError(f"the {name} sweep needs the hyperparameters selected from the tuning sweep")
    configs: list[dict[str, Any]] = []
    if name == "accuracy":
        for task_name, task in params.setting.tasks.items():
            for seed in params.accuracy.seeds:
                for method in task.methods:
                    point = _chosen(selected, task_name, method)
                    for eps in params.accuracy.epsilons:
                        configs.append({**_with(_base(params, task_name, method, seed), method, point), "epsilon": eps})
                point = _chosen(selected, task_name, NONPRIVATE)
                configs.append(_with(_base(params, task_name, NONPRIVATE, seed), NONPRIVATE, point))
    elif name == "size":
        task_name = params.size.task
        task = params.task(task_name)
        full = task.train_size if task.train_size is not None else dataset_spec(task.dataset).train_size
        for seed in params.size.seeds:
            for n in params.size.train_sizes:
                batch = size_batch(task.batch_size, full, n)
                for method in (*task.methods, NONPRIVATE):
                    config = _with(_base(params, task_name, method, seed), method, _chosen(selected, task_name, method))
                    configs.append({**config, "train_size": n, "batch_size": batch})
    else:  # diagnostics
        for task_name in params.diagnostics.tasks:
            for method in params.task(task_name).methods:
                config = _base(params, task_name, method, params.diagnostics.seed)
                configs.append({**_with(config, method, _chosen(selected, task_name, method)), "diagnostics": True})
    return configs


PARENT_POLL_S = 0.5


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: a daemon thread ends this worker once ``parent`` is gone (it is then re-parented)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_one(task: tuple[dict[str, Any], bool]) -> dict[str, Any]:
    import torch

    config, keep_steps = task
    torch.set_num_threads(1)
    record = run(config)
    if not keep_steps:
        record.pop("step_stats")
    return record


def _key(config: dict[str, Any]) -> str:
    """A resolved config as a comparable string (the progress bar does not change a run)."""
    return json.dumps({k: v for k, v in config.items() if k != "progress"}, sort_keys=True)


def _data_dir(config: dict[str, Any], prepared_dir: Path | None, features_dir: Path | None) -> str | None:
    """The folder of the dataset's files: the features folder, or its folder of the prepare stage."""
    spec = dataset_spec(config["dataset"])
    if spec.files == "features":
        return None if features_dir is None else str(features_dir)
    return None if prepared_dir is None or spec.prepared_as is None else str(prepared_dir / spec.prepared_as)


def run_sweep(
    configs: Sequence[dict[str, Any]],
    out: str | os.PathLike[str],
    *,
    workers: int = 1,
    prepared_dir: str | os.PathLike[str] | None = None,
    features_dir: str | os.PathLike[str] | None = None,
    keep_step_stats: bool = False,
    progress: bool = True,
    label: str = "sweep",
    reuse: Iterable[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Run every config (all validated first) and write the records as JSON lines to ``out`` atomically.

    Image datasets read their verified IDX files from ``prepared_dir/<dataset>`` (the prepare stage's
    output) and the ScatterNet features from ``features_dir``.  Nothing is written unless every run
    succeeds.  ``progress`` prints runs done / total and the time left (a line per run when stderr is
    not a terminal, e.g. under ``dvc repro``).  A run whose resolved config equals that of a record in ``reuse``
    (e.g. the tuning sweep's run at the selected cell) is not run again: the same config and seed give the same
    record on the CPU.
    """
    require_int("workers", workers)
    prepared = None if prepared_dir is None else Path(prepared_dir)
    features = None if features_dir is None else Path(features_dir)
    configs = [dict(c) for c in configs]
    known = {_key(record["config"]): record for record in reuse}
    reused: dict[int, dict[str, Any]] = {}
    for index, config in enumerate(configs):
        if "data_dir" in config and config["data_dir"] is None:
            config["data_dir"] = _data_dir(config, prepared, features)
        try:
            resolved = resolve(TrainConfig.from_dict(config))
        except ValueError as error:
            where = f"{config.get('task')}/{config.get('method')}"
            raise ValueError(f"{label} run {index} ({where}, seed {config.get('seed')}): {error}") from None
        match = known.get(_key(dataclasses.asdict(resolved)))
        if match is not None and (not keep_step_stats or "step_stats" in match):
            reused[index] = {k: v for k, v in match.items() if keep_step_stats or k != "step_stats"}
    tasks = [(config, keep_step_stats) for index, config in enumerate(configs) if index not in reused]
    computed = iter(list(_map(tasks, workers, progress and not os.environ.get("TQDM_DISABLE"), label)))
    records = [reused[index] if index in reused else next(computed) for index in range(len(configs))]
    timings = [{key: record.pop(key) for key in TIMINGS if key in record} for record in records]
    write_records(timings_path(out), timings)
    write_records(out, records)
    return records


class _ProgressBar:
    """Runs done / total and the time left: a tqdm bar on a terminal, else one line per finished run (logs)."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled, self.done = total, label, enabled, 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=label, unit="run") if enabled and sys.stderr.isatty() else None

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        elif self.enabled:
            elapsed = time.perf_counter() - self.start
            left = elapsed / self.done * (self.total - self.done)
            print(
                f"{self.label}: {self.done}/{self.total} runs, {elapsed:.0f} s so far, about {left:.0f} s left",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            print(f"{self.label}: {self.done} runs in {time.perf_counter() - self.start:.0f} s", flush=True)


def _map(
    tasks: list[tuple[dict[str, Any], bool]], workers: int, progress: bool, label: str
) -> Iterable[dict[str, Any]]:
    """The records in the order of ``tasks``, computed by ``workers`` processes, with :class:`_ProgressBar`."""
    bar = _ProgressBar(len(tasks), label, progress)
    try:
        if workers == 1 or len(tasks) == 1:
            for task in tasks:
                yield _run_one(task)
                bar.update()
            return
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(workers, len(tasks)), initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
            for record in pool.imap(_run_one, tasks, chunksize=1):
                yield record
                bar.update()
    finally:
        bar.close()
