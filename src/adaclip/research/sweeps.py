"""The report's training sweeps: validated params in, one JSON-lines file of run records out.

A sweep is a list of :class:`adaclip.research.train.TrainConfig` dictionaries built from ``params.yaml``
(see :mod:`adaclip.research.params`), each run by :func:`adaclip.research.train.run`:

Per-dataset method parameters (``setting.datasets.<name>.method_params``, e.g. GeoClip's ``rank``)
go to every run of that dataset and method.

* ``lr_search`` – each (dataset, method, multiplier of the default lr) at ``setting.epsilon``;
  :func:`select_learning_rates` keeps, per (dataset, method), the lr with the best mean
  *validation* metric, and every other sweep trains with it.
* ``accuracy`` – dataset x method x epsilon x seed, plus a non-private run per dataset and seed.
* ``clip`` – method x initial clip norm ``C0`` x seed at ``setting.epsilon`` (the methods
  without a clip norm, e.g. AUTO-S, run once per seed).
* ``size`` – method x training-set size x seed at ``setting.epsilon``, plus non-private.
* ``diagnostics`` – every method at the *same* noise multiplier, keeping every step's statistics
  (noise power, clipped fraction, cosine to the clean gradient).

Every config is resolved (validated) before the first run.  Runs execute in ``runtime.workers``
processes with one torch thread each, so the records do not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adaclip.methods import METHODS
from adaclip.research.params import SWEEPS
from adaclip.research.records import write_records
from adaclip.research.train import TrainConfig, default_lr, resolve, run


def _base(params: dict[str, Any], dataset: str, method: str, seed: int, lr: float | None) -> dict[str, Any]:
    setting = params["setting"]
    config: dict[str, Any] = {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "accountant": setting["accountant"],
        "delta": setting["delta"],
        "epsilon": setting["epsilon"],
        "device": params["runtime"]["device"],
        "lr": lr,
        "progress": False,
        **{k: v for k, v in setting["datasets"][dataset].items() if v is not None and k != "method_params"},
    }
    method_params = setting["datasets"][dataset]["method_params"].get(method)
    if method_params:
        config["method_params"] = dict(method_params)
    if dataset in ("fashion-mnist", "mnist"):
        config["data_dir"] = None  # filled by run_sweep from the prepared data folder
    return config


def lr_search_configs(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (dataset, method including non-private, lr multiplier, seed) at ``setting.epsilon``."""
    configs = []
    for dataset in params["setting"]["datasets"]:
        for method in [*params["setting"]["methods"], "nonprivate"]:
            lr = default_lr(dataset, method)
            for multiplier in params["lr_search"]["multipliers"]:
                for seed in params["lr_search"]["seeds"]:
                    configs.append(_base(params, dataset, method, seed, lr * multiplier))
    return configs


def _lr(learning_rates: dict[str, dict[str, float]], dataset: str, method: str) -> float:
    try:
        return learning_rates[dataset][method]
    except KeyError:
        raise ValueError(
            f"no selected learning rate for {dataset}/{method}: re-run the lr_search stage with this dataset and method"
        ) from None


def sweep_configs(
    name: str, params: dict[str, Any], learning_rates: dict[str, dict[str, float]] | None = None
) -> list[dict[str, Any]]:
    """The configs of sweep ``name`` (one of :data:`SWEEPS`), with the selected learning rates."""
    if name not in SWEEPS:
        raise ValueError(f"sweep must be one of {SWEEPS}, got {name!r}")
    if name == "lr_search":
        return lr_search_configs(params)
    if learning_rates is None:
        raise ValueError(f"the {name} sweep needs the learning rates selected by the lr_search sweep")
    methods = params["setting"]["methods"]
    section = params[name]
    configs: list[dict[str, Any]] = []
    if name == "accuracy":
        for dataset in params["setting"]["datasets"]:
            for seed in section["seeds"]:
                for method in methods:
                    for eps in section["epsilons"]:
                        configs.append(
                            {
                                **_base(params, dataset, method, seed, _lr(learning_rates, dataset, method)),
                                "epsilon": eps,
                            }
                        )
                configs.append(
                    {
                        **_base(params, dataset, "nonprivate", seed, _lr(learning_rates, dataset, "nonprivate")),
                        "epsilon": None,
                    }
                )
    elif name == "clip":
        dataset = section["dataset"]
        for seed in section["seeds"]:
            for method in methods:
                base = _base(params, dataset, method, seed, _lr(learning_rates, dataset, method))
                scale_parameter = METHODS[method].scale_parameter
                if scale_parameter is None:  # e.g. AUTO-S: nothing to sweep
                    configs.append(base)
                    continue
                for clip in section["initial_clips"]:
                    configs.append({**base, "method_params": {**base.get("method_params", {}), scale_parameter: clip}})
    elif name == "size":
        dataset = section["dataset"]
        for seed in section["seeds"]:
            for size in section["train_sizes"]:
                for method in [*methods, "nonprivate"]:
                    config = {
                        **_base(params, dataset, method, seed, _lr(learning_rates, dataset, method)),
                        "train_size": size,
                    }
                    configs.append({**config, "epsilon": None} if method == "nonprivate" else config)
    else:  # diagnostics
        dataset = section["dataset"]
        for method in methods:
            config = _base(params, dataset, method, section["seed"], _lr(learning_rates, dataset, method))
            configs.append(
                {
                    **config,
                    "epsilon": None,
                    "noise_multiplier": section["noise_multiplier"],
                    "epochs": section["epochs"],
                    "diagnostics": True,
                }
            )
    return configs


def _run_one(task: tuple[dict[str, Any], bool]) -> dict[str, Any]:
    import torch

    config, keep_steps = task
    torch.set_num_threads(1)
    record = run(config)
    if not keep_steps:
        record.pop("step_stats")
    return record


def run_sweep(
    configs: Sequence[dict[str, Any]],
    out: str | os.PathLike[str],
    *,
    workers: int = 1,
    prepared_dir: str | os.PathLike[str] | None = None,
    keep_step_stats: bool = False,
) -> list[dict[str, Any]]:
    """Run every config (validated first) and write the records as JSON lines to ``out`` atomically.

    Image datasets read their verified IDX files from ``prepared_dir/<dataset>`` (the prepare
    stage's output).  Nothing is written unless every run succeeds.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    configs = [dict(c) for c in configs]
    for config in configs:
        if "data_dir" in config and config["data_dir"] is None and prepared_dir is not None:
            config["data_dir"] = str(Path(prepared_dir) / config["dataset"])
        resolve(TrainConfig.from_dict(config))
    tasks = [(config, keep_step_stats) for config in configs]
    if workers == 1 or len(tasks) == 1:
        records = [_run_one(task) for task in tasks]
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            records = pool.map(_run_one, tasks, chunksize=1)
    write_records(out, records)
    return records
