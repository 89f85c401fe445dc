"""Run records -> tidy tables, intervals and the numbers the report states.

Every function here is a pure transformation of the records written by
:func:`adaclip.research.sweeps.run_sweep`; the notebooks plot and print what these return, and
:mod:`adaclip.research.report` fills the report's sentences from them.  Accuracies are in percent.

Statistics: a mean over seeds comes with a two-sided 95 % Student-t interval (``t_{0.975, n-1} s /
sqrt(n)``); a method's difference to DP-SGD is paired by seed (the same seed fixes the same
initialisation and Poisson batches for both), with the t interval of the mean paired difference; a
difference is a "win" or a "loss" only when that interval excludes zero, otherwise a "tie".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from adaclip.methods import METHODS, NONPRIVATE

METHOD_ORDER = (NONPRIVATE, *METHODS)
"""The report's order of methods: the non-private baseline, then the registry's order."""
BASELINE = "fixed"
"""Every private method is compared with tuned DP-SGD."""
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Hyperparameters:
    """A learning rate and the value of the method's scale parameter (``None`` if it has none)."""

    lr: float
    scale: float | None


def label(method: str) -> str:
    """The display name of a method."""
    return "non-private" if method == NONPRIVATE else METHODS[method].label if method in METHODS else method


def method_sort_key(methods: pd.Series) -> pd.Series:
    """Sort methods in the report's fixed order."""
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return methods.map(lambda m: order.get(m, len(order)))


def _scale_of(record: dict[str, Any]) -> float | None:
    parameter = METHODS[record["method"]].scale_parameter if record["method"] in METHODS else None
    if parameter is None:
        return None
    value = (record.get("method_params") or {}).get(parameter)
    return None if value is None else float(value)


def runs_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per run; ``metric`` and ``val_metric`` are accuracy in % or MSE (NaN for a diverged run)."""
    rows = []
    for r in records:
        config = r["config"]
        classification = "test_accuracy" in r
        scale = 100.0 if classification else 1.0
        test = r.get("test_accuracy" if classification else "test_mse")
        val = r.get("val_accuracy" if classification else "val_mse")
        means = r.get("step_stats_mean") or {}
        rows.append(
            {
                "task": config.get("task") or r["dataset"],
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
                "scale": _scale_of(r),
                "batch_size": config["batch_size"],
                "epochs": config["epochs"],
                "train_size": r["train_size"],
                "steps": r["steps"],
                "diverged": bool(r.get("diverged", False)),
                "metric_name": "test accuracy (%)" if classification else "test MSE",
                "metric": math.nan if test is None else test * scale,
                "val_metric": math.nan if val is None else val * scale,
                "higher_is_better": classification,
                **{f"mean_{key}": (math.nan if value is None else value) for key, value in means.items()},
            }
        )
    return pd.DataFrame(rows)


def _score(frame: pd.DataFrame, column: str) -> pd.Series:
    """The column oriented so that larger is better; diverged runs (flagged, or a NaN metric) at minus infinity."""
    oriented = frame[column].where(frame["higher_is_better"], -frame[column])
    return oriented.where(~frame["diverged"], math.nan).fillna(-math.inf)


def select(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], Hyperparameters]:
    """Per (task, method), the grid cell with the best mean validation metric over seeds.

    Accuracy up, MSE down; a diverged cell is never chosen unless every cell diverged; ties go to the
    smaller learning rate, then the smaller scale.
    """
    frame = runs_frame(records)
    frame["score"] = _score(frame, "val_metric")
    frame["scale_key"] = frame["scale"].fillna(-1.0)
    cells = frame.groupby(["task", "method", "lr", "scale_key"], dropna=False)["score"].mean().reset_index()
    chosen = {}
    for (task, method), block in cells.groupby(["task", "method"]):
        best = block.sort_values(["score", "lr", "scale_key"], ascending=[False, True, True]).iloc[0]
        chosen[(str(task), str(method))] = Hyperparameters(
            lr=float(best["lr"]), scale=None if best["scale_key"] < 0 else float(best["scale_key"])
        )
    return chosen


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with its two-sided t interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t interval of ``values`` (a zero-width interval for one value; NaN if any diverged)."""
    data = np.asarray(values, dtype=float)
    n = len(data)
    if n == 0:
        raise ValueError("an interval needs at least one value")
    mean = float(data.mean())
    if n == 1 or not np.isfinite(data).all():
        return Interval(mean, mean, mean, n)
    half = float(student_t.ppf(1 - (1 - confidence) / 2, n - 1) * data.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def format_interval(value: Interval, digits: int = 1) -> str:
    """``"89.4 ± 0.3"`` (the half-width of the 95 % interval), or the mean alone for one seed."""
    if value.n == 1:
        return f"{value.mean:.{digits}f}"
    return f"{value.mean:.{digits}f} ± {value.half_width:.{digits}f}"


def accuracy_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per task, method and target epsilon (NaN for non-private): mean and 95 % interval of the test metric."""
    rows = []
    for (task, method, eps), block in frame.groupby(["task", "method", "target_epsilon"], dropna=False):
        value = interval(block.sort_values("seed")["metric"].tolist())
        rows.append(
            {
                "task": task,
                "method": method,
                "target_epsilon": eps,
                "mean": value.mean,
                "low": value.low,
                "high": value.high,
                "seeds": value.n,
                "metric_name": block["metric_name"].iloc[0],
                "higher_is_better": bool(block["higher_is_better"].iloc[0]),
            }
        )
    return pd.DataFrame(rows).sort_values(["task", "target_epsilon"], kind="stable").reset_index(drop=True)


VERDICTS = ("win", "loss", "tie", "undefined")
"""A paired difference is a win or a loss only when its interval excludes 0, a tie otherwise (or with one
seed); "undefined" when a run diverged (no finite difference), which is no evidence of a tie."""


def verdict(difference: Interval, higher_is_better: bool) -> str:
    """``"win"``, ``"loss"``, ``"tie"`` or ``"undefined"`` for a paired difference (method minus DP-SGD)."""
    if not all(math.isfinite(v) for v in (difference.mean, difference.low, difference.high)):
        return "undefined"
    if difference.n < 2 or difference.low <= 0 <= difference.high:
        return "tie"
    better = difference.low > 0 if higher_is_better else difference.high < 0
    return "win" if better else "loss"


def _paired(runs: pd.DataFrame, reference: pd.Series) -> pd.Series:
    """The metric of ``runs`` at the seeds ``reference`` (DP-SGD's metric by seed) also has; a diverged run's NaN
    stays (it makes the difference undefined rather than dropping the seed)."""
    metric = runs.set_index("seed")["metric"]
    return metric[metric.index.isin(reference.index)]


def paired_differences(frame: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Per task, epsilon and private method: the seed-paired difference to ``baseline``, its interval and verdict."""
    private = frame[frame["method"] != NONPRIVATE]
    rows = []
    for (task, eps), block in private.groupby(["task", "target_epsilon"]):
        reference = block[block["method"] == baseline].set_index("seed")["metric"]
        for method, runs in block.groupby("method"):
            if method == baseline:
                continue
            paired = _paired(runs, reference)
            differences = (paired - reference.loc[paired.index]).tolist()
            if not differences:
                continue
            value = interval(differences)
            higher = bool(block["higher_is_better"].iloc[0])
            rows.append(
                {
                    "task": task,
                    "target_epsilon": eps,
                    "method": method,
                    "difference": value.mean,
                    "low": value.low,
                    "high": value.high,
                    "seeds": value.n,
                    "verdict": verdict(value, higher),
                }
            )
    return pd.DataFrame(
        rows, columns=["task", "target_epsilon", "method", "difference", "low", "high", "seeds", "verdict"]
    )


def expected_best_of_k(scores: Sequence[float], k: int) -> float:
    """Expected maximum of ``k`` cells drawn without replacement from ``scores`` (Dodge et al. 2019's tuning curve).

    With the scores sorted ascending ``s_(1) <= ... <= s_(m)``, the maximum of a uniformly random
    ``k``-subset is ``s_(i)`` with probability ``C(i - 1, k - 1) / C(m, k)``.  A diverged cell scores
    ``-inf``: the expectation is ``-inf`` while ``k`` cells can all have diverged, finite beyond.
    """
    ordered = sorted(scores)
    m = len(ordered)
    if not 1 <= k <= m:
        raise ValueError(f"k must lie in [1, {m}], got {k}")
    total = math.comb(m, k)
    # cells below the k-th smallest are never the maximum: skip them (a diverged cell's -inf times 0 is NaN)
    return sum(score * math.comb(i - 1, k - 1) / total for i, score in enumerate(ordered, start=1) if i >= k)


def grid_lr(method: str, lr: float, scale: float | None) -> float:
    """The learning-rate axis of the tuning grid: ``lr x scale`` (to 12 digits) for a method whose step scales with
    its scale parameter (``step_per_scale``, e.g. DP-SGD's ``lr x C``), else ``lr``."""
    if method in METHODS and METHODS[method].step_per_scale and scale is not None:
        return float(f"{lr * scale:.12g}")
    return lr


def tuning_grid(frame: pd.DataFrame) -> pd.DataFrame:
    """Per task, method and grid cell (lr, scale): the mean validation and test metric over seeds (NaN if a
    seed diverged), and the cell's ``grid_lr`` (see :func:`grid_lr`)."""
    diverged = frame["diverged"] | frame["val_metric"].isna()
    grid = frame.assign(
        scale_key=frame["scale"].fillna(-1.0),
        val_metric=frame["val_metric"].where(~diverged),
        metric=frame["metric"].where(~diverged),
    )

    def mean(values: pd.Series) -> float:
        return float(values.mean(skipna=False))

    cells = (
        grid.groupby(["task", "method", "lr", "scale_key"])
        .agg(
            val_metric=("val_metric", mean),
            metric=("metric", mean),
            higher_is_better=("higher_is_better", "first"),
            metric_name=("metric_name", "first"),
        )
        .reset_index()
    )
    cells["scale"] = cells["scale_key"].where(cells["scale_key"] >= 0)
    cells["grid_lr"] = [
        grid_lr(m, lr, None if math.isnan(c) else c)
        for m, lr, c in zip(cells["method"], cells["lr"], cells["scale"], strict=True)
    ]
    return cells.drop(columns="scale_key")


def tuning_cost(frame: pd.DataFrame, points: float = 1.0, relative: float = 0.05) -> pd.DataFrame:
    """Per task and method: grid size, best validation metric, the share of cells near it (within ``points``
    accuracy points, or within ``relative`` of the best MSE), and the expected best validation metric after
    k = 1, ..., all random cells (the tuning curve)."""
    rows = []
    for (task, method), cells in tuning_grid(frame).groupby(["task", "method"]):
        higher = bool(cells["higher_is_better"].iloc[0])
        scores = cells["val_metric"].where(cells["val_metric"].notna(), -math.inf if higher else math.inf)
        oriented = scores if higher else -scores
        best = float(oriented.max())
        tolerance = points if higher else relative * abs(best)
        near = float((oriented >= best - tolerance).mean())
        curve = {k: expected_best_of_k(oriented.tolist(), k) for k in range(1, len(oriented) + 1)}
        rows.append(
            {
                "task": task,
                "method": method,
                "cells": len(cells),
                "best": best if higher else -best,
                "share_near_best": near,
                "tuning_curve": {k: (v if higher else -v) for k, v in curve.items()},
            }
        )
    result = pd.DataFrame(rows)
    return result.sort_values("method", key=method_sort_key, kind="stable").reset_index(drop=True) if rows else result


def size_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method and n: mean and interval of the test metric, and the seed-paired gap to DP-SGD."""
    rows = []
    for (method, n), block in frame.groupby(["method", "train_size"]):
        value = interval(block.sort_values("seed")["metric"].tolist())
        row = {
            "method": method,
            "train_size": int(n),
            "mean": value.mean,
            "low": value.low,
            "high": value.high,
            "seeds": value.n,
        }
        reference = frame[(frame["method"] == BASELINE) & (frame["train_size"] == n)].set_index("seed")["metric"]
        paired = _paired(block, reference)
        if method != BASELINE and len(paired):
            gap = interval((paired - reference.loc[paired.index]).tolist())
            higher = bool(block["higher_is_better"].iloc[0])
            row |= {
                "gap": gap.mean,
                "gap_low": gap.low,
                "gap_high": gap.high,
                "gap_seeds": gap.n,
                "verdict": verdict(gap, higher),
            }
        rows.append(row)
    return pd.DataFrame(rows)


DIAGNOSTICS = ("snr", "cosine_release", "cosine_noise_free", "parameter_noise", "heterogeneity", "shape_saving")
"""The per-step diagnostics the report summarises (see :mod:`adaclip.research.diagnostics`)."""


def diagnostics_summary(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Per task and method: the mean over all steps of every diagnostic, and the run's test metric."""
    rows = []
    for r in records:
        stats = r.get("step_stats", {})
        row: dict[str, Any] = {"task": r["config"].get("task") or r["dataset"], "method": r["method"]}
        for key in DIAGNOSTICS:
            values = [v for v in stats.get(key, []) if v is not None]
            row[key] = float(np.mean(values)) if values else math.nan
        rows.append(row)
    result = pd.DataFrame(rows)
    return result.sort_values(["task", "method"], key=lambda c: method_sort_key(c) if c.name == "method" else c)


def step_series(records: Iterable[dict[str, Any]], key: str) -> pd.DataFrame:
    """Long table (task, method, step, value) of one per-step statistic of the diagnostics records."""
    rows = []
    for r in records:
        values = r.get("step_stats", {}).get(key)
        if values is None:
            continue
        task = r["config"].get("task") or r["dataset"]
        rows.extend({"task": task, "method": r["method"], "step": i + 1, "value": v} for i, v in enumerate(values))
    return pd.DataFrame(rows, columns=["task", "method", "step", "value"])


def training_curves(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Long table (task, method, target_epsilon, seed, epoch, train_loss, test metric)."""
    rows = []
    for r in records:
        classification = "test_accuracy" in r
        for epoch in r["per_epoch"]:
            test = epoch.get("test_accuracy" if classification else "test_mse")
            rows.append(
                {
                    "task": r["config"].get("task") or r["dataset"],
                    "method": r["method"],
                    "target_epsilon": r["target_epsilon"],
                    "seed": r["seed"],
                    "epoch": epoch["epoch"],
                    "train_loss": epoch["train_loss"],
                    "metric_name": "test accuracy (%)" if classification else "test MSE",
                    "metric": math.nan if test is None else test * (100 if classification else 1),
                }
            )
    return pd.DataFrame(rows)


def wide(series: pd.DataFrame, index: str, columns: str = "method", values: str = "value") -> pd.DataFrame:
    """Pivot a long table to one column per method (the layout ``dvc plots`` reads), methods in report order."""
    table = series.pivot_table(index=index, columns=columns, values=values, aggfunc="mean")
    ordered = sorted(table.columns, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))
    return table[ordered].reset_index()


def heterogeneity_gains(
    diagnostics: Iterable[dict[str, Any]], accuracy: Iterable[dict[str, Any]], epsilon: float
) -> pd.DataFrame:
    """Per task and private method: the task's heterogeneity index ``h`` and the method's gain over DP-SGD.

    ``h`` is the mean over steps of DP-SGD's diagnostics run on the task (the per-example gradients' own
    heterogeneity); ``snr_ratio`` the method's mean release signal-to-noise ratio over DP-SGD's; ``difference``
    (with ``low``, ``high`` and ``verdict``) the seed-paired test-metric difference to DP-SGD at ``epsilon``.
    """
    summary = diagnostics_summary(diagnostics)
    differences = paired_differences(runs_frame(accuracy))
    differences = differences[differences["target_epsilon"] == epsilon]
    rows = []
    for task, block in summary.groupby("task"):
        reference = block[block["method"] == BASELINE]
        if reference.empty:
            continue
        h, snr = float(reference["heterogeneity"].iloc[0]), float(reference["snr"].iloc[0])
        for row in block[block["method"] != BASELINE].itertuples():
            paired = differences[(differences["task"] == task) & (differences["method"] == row.method)]
            rows.append(
                {
                    "task": task,
                    "method": row.method,
                    "heterogeneity": h,
                    "snr_ratio": row.snr / snr if snr > 0 else math.nan,
                    **(
                        paired[["difference", "low", "high", "verdict"]].iloc[0].to_dict()
                        if not paired.empty
                        else {"difference": math.nan, "low": math.nan, "high": math.nan, "verdict": "undefined"}
                    ),
                }
            )
    return pd.DataFrame(
        rows, columns=["task", "method", "heterogeneity", "snr_ratio", "difference", "low", "high", "verdict"]
    )
