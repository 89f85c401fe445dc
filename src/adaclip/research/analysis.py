"""Run records -> tidy tables and the summary numbers the report states.

Every function here is a pure transformation of the records written by
:func:`adaclip.research.sweeps.run_sweep`; the notebooks plot and print what these return, and
:mod:`adaclip.research.report` fills the report's sentences from them.  Accuracies are in percent.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from adaclip.methods import METHODS

METHOD_ORDER = ("nonprivate", *METHODS)
"""The report's order of methods: the non-private baseline, then the registry's order."""


def _metric(record: dict[str, Any], split: str) -> tuple[str, float]:
    key = f"{split}_accuracy" if f"{split}_accuracy" in record else f"{split}_mse"
    return key, record[key]


def select_learning_rates(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per dataset and method, the lr with the best mean validation metric (accuracy up, MSE down).

    Ties go to the smaller lr; a diverged lr (a NaN or infinite metric) is never chosen unless every
    lr diverged.  Returns ``{dataset: {method: lr}}``.
    """
    scores: dict[tuple[str, str, float], list[float]] = {}
    higher_is_better: dict[str, bool] = {}
    for record in records:
        key, value = _metric(record, "val")
        higher_is_better[record["dataset"]] = key.endswith("accuracy")
        scores.setdefault((record["dataset"], record["method"], record["config"]["lr"]), []).append(value)
    best: dict[str, dict[str, tuple[float, float]]] = {}
    for (dataset, method, lr), values in sorted(scores.items()):
        score = statistics.fmean(values) * (1 if higher_is_better[dataset] else -1)
        score = score if math.isfinite(score) else -math.inf
        current = best.setdefault(dataset, {}).get(method)
        if current is None or score > current[1]:
            best[dataset][method] = (lr, score)
    return {dataset: {method: lr for method, (lr, _) in methods.items()} for dataset, methods in best.items()}


def label(method: str) -> str:
    """The display name of a method."""
    return "non-private" if method == "nonprivate" else METHODS[method].label if method in METHODS else method


def runs_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: its setting and results; ``metric`` is test accuracy in % or test MSE."""
    rows = []
    for r in records:
        config = r["config"]
        classification = "test_accuracy" in r
        scale = 100.0 if classification else 1.0
        method_params = r.get("method_params") or {}
        clip_key = METHODS[r["method"]].scale_parameter if r["method"] in METHODS else None
        means = r.get("step_stats_mean") or {}
        rows.append(
            {
                "dataset": r["dataset"],
                "model": r["model"],
                "method": r["method"],
                "seed": r["seed"],
                "target_epsilon": r["target_epsilon"],
                "epsilon": r["epsilon"],
                "delta": r["delta"],
                "accountant": r["accountant"],
                "noise_multiplier": r["noise_multiplier"],
                "lr": config["lr"],
                "batch_size": config["batch_size"],
                "epochs": config["epochs"],
                "train_size": r["train_size"],
                "initial_clip": method_params.get(clip_key) if clip_key else None,
                "metric_name": "test accuracy (%)" if classification else "test MSE",
                "metric": r["test_accuracy" if classification else "test_mse"] * scale,
                "val_metric": r["val_accuracy" if classification else "val_mse"] * scale,
                "higher_is_better": classification,
                "wall_time_s": r["wall_time_s"],
                "steps": r["steps"],
                "noise_power": means.get("noise_power", math.nan),
                "clipped_fraction": means.get("clipped_fraction", math.nan),
            }
        )
    return pd.DataFrame(rows)


def method_sort_key(methods: pd.Series) -> pd.Series:
    """Sort methods in the report's fixed order."""
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return methods.map(lambda m: order.get(m, len(order)))


def mean_std(frame: pd.DataFrame, by: Sequence[str], value: str = "metric") -> pd.DataFrame:
    """Mean, standard deviation (ddof 1; 0 for one seed) and count of ``value`` per group."""
    grouped = frame.groupby(list(by), dropna=False)[value]
    summary = grouped.agg(["mean", "std", "count"]).reset_index()
    summary["std"] = summary["std"].fillna(0.0)
    return summary


def format_mean_std(mean: float, std: float, count: int, digits: int = 1) -> str:
    """``"81.2 ± 0.3"`` (or just the mean for one seed)."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if count > 1 else f"{mean:.{digits}f}"


def accuracy_by_epsilon(frame: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, method and target epsilon (NaN for non-private): mean ± std of the test metric."""
    return mean_std(frame, ["dataset", "metric_name", "method", "target_epsilon"])


def accuracy_table(frame: pd.DataFrame, digits: dict[str, int] | None = None) -> tuple[list[str], list[list[str]]]:
    """Rows (dataset, method) and one column per epsilon, cells ``mean ± std`` over seeds."""
    summary = accuracy_by_epsilon(frame)
    epsilons = sorted(e for e in summary["target_epsilon"].dropna().unique())
    header = ["dataset", "metric", "method", *[f"ε = {e:g}" for e in epsilons], "non-private"]
    rows = []
    for (dataset, metric_name), block in summary.groupby(["dataset", "metric_name"], sort=True):
        places = (digits or {}).get(dataset, 1 if "accuracy" in metric_name else 3)
        private = block[block["method"] != "nonprivate"]
        baseline = block[block["method"] == "nonprivate"]
        base_cell = (
            "" if baseline.empty else format_mean_std(*baseline.iloc[0][["mean", "std", "count"]], digits=places)
        )
        for method in sorted(
            private["method"].unique(), key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99
        ):
            cells = []
            for eps in epsilons:
                hit = private[(private["method"] == method) & (private["target_epsilon"] == eps)]
                cells.append(
                    "" if hit.empty else format_mean_std(*hit.iloc[0][["mean", "std", "count"]], digits=places)
                )
            rows.append([dataset, metric_name, label(method), *cells, base_cell])
    return header, rows


def best_private_method(frame: pd.DataFrame, dataset: str, epsilon: float) -> tuple[str, float]:
    """The private method with the best mean test metric on ``dataset`` at target ``epsilon``."""
    summary = accuracy_by_epsilon(frame)
    block = summary[(summary["dataset"] == dataset) & (summary["target_epsilon"] == epsilon)]
    if block.empty:
        raise ValueError(f"no runs for {dataset} at epsilon = {epsilon}")
    higher = bool(frame[frame["dataset"] == dataset]["higher_is_better"].iloc[0])
    row = block.loc[block["mean"].idxmax() if higher else block["mean"].idxmin()]
    return str(row["method"]), float(row["mean"])


def flat_region(frame: pd.DataFrame, tolerance: float = 1.0) -> pd.DataFrame:
    """Per method, the range of ``C0`` whose mean test accuracy is within ``tolerance`` points of its best.

    The region is the contiguous run of grid points around the best ``C0``; ``decades`` is
    ``log10(high / low)`` (0 for a single point).  Methods without a clip norm have none.
    """
    rows = []
    for method, block in frame[frame["initial_clip"].notna()].groupby("method"):
        curve = block.groupby("initial_clip")["metric"].mean().sort_index()
        clips, values = curve.index.to_numpy(dtype=float), curve.to_numpy()
        best = int(np.argmax(values))
        low = high = best
        while low > 0 and values[low - 1] >= values[best] - tolerance:
            low -= 1
        while high < len(values) - 1 and values[high + 1] >= values[best] - tolerance:
            high += 1
        rows.append(
            {
                "method": method,
                "best_clip": clips[best],
                "best_metric": float(values[best]),
                "flat_low": clips[low],
                "flat_high": clips[high],
                "decades": float(np.log10(clips[high] / clips[low])),
                "grid_decades": float(np.log10(clips[-1] / clips[0])),
                "worst_metric": float(values.min()),
            }
        )
    result = pd.DataFrame(rows)
    return result.sort_values("method", key=method_sort_key).reset_index(drop=True) if not result.empty else result


def step_series(records: Iterable[dict[str, Any]], key: str) -> pd.DataFrame:
    """Long table (method, step, value) of one per-step statistic of the diagnostics records."""
    rows = []
    for r in records:
        values = r.get("step_stats", {}).get(key)
        if values is None:
            continue
        rows.extend({"method": r["method"], "step": i + 1, "value": v} for i, v in enumerate(values))
    return pd.DataFrame(rows, columns=["method", "step", "value"])


def step_summary(records: Iterable[dict[str, Any]], keys: Sequence[str]) -> pd.DataFrame:
    """Per method, the mean over all steps of each statistic in ``keys`` (and the final test metric)."""
    rows = []
    for r in records:
        stats = r.get("step_stats", {})
        row: dict[str, Any] = {"method": r["method"], "noise_multiplier": r["noise_multiplier"]}
        for key in keys:
            row[key] = float(np.mean(stats[key])) if key in stats else math.nan
        classification = "test_accuracy" in r
        row["metric"] = r["test_accuracy"] * 100 if classification else r["test_mse"]
        rows.append(row)
    result = pd.DataFrame(rows)
    return result.sort_values("method", key=method_sort_key).reset_index(drop=True)


def training_curves(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Long table (dataset, method, target_epsilon, seed, epoch, train_loss, test metric)."""
    rows = []
    for r in records:
        classification = "test_accuracy" in r
        for epoch in r["per_epoch"]:
            rows.append(
                {
                    "dataset": r["dataset"],
                    "method": r["method"],
                    "target_epsilon": r["target_epsilon"],
                    "seed": r["seed"],
                    "epoch": epoch["epoch"],
                    "train_loss": epoch["train_loss"],
                    "metric_name": "test accuracy (%)" if classification else "test MSE",
                    "metric": epoch["test_accuracy"] * 100 if classification else epoch["test_mse"],
                }
            )
    return pd.DataFrame(rows)


def wide(series: pd.DataFrame, index: str, columns: str = "method", values: str = "value") -> pd.DataFrame:
    """Pivot a long table to one column per method (the layout ``dvc plots`` reads), methods in report order."""
    table = series.pivot_table(index=index, columns=columns, values=values, aggfunc="mean")
    ordered = sorted(table.columns, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))
    return table[ordered].reset_index()
