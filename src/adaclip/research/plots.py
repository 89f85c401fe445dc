"""The report's figures, drawn from :mod:`adaclip.research.analysis` tables in the one shared style.

Each function returns a matplotlib ``Figure``; notebooks save it with
:func:`adaclip.research.io.save_figure`.  Every method keeps its colour, marker and line style in
every figure; methods that share an x value are shifted apart slightly so that none hides another;
legends sit outside the axes; intervals are drawn as error bars or bands and the caption says which;
every title or caption carries (epsilon, delta, accountant) where privacy is involved.

Legibility at the report's width (about 1 000 px for a 150 dpi PNG): panels sit in a grid at most
:data:`MAX_COLUMNS` across and no figure is wider than :data:`MAX_WIDTH_INCHES`; a metric's axis and the
intervals drawn on it stay inside the metric's range (:func:`metric_range`); positive values spanning two
decades or more get a log axis; long category names are rotated so that no two tick labels overlap.
"""

from __future__ import annotations

import itertools
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from adaclip.methods import METHODS, NONPRIVATE
from adaclip.research.analysis import METHOD_ORDER, label, method_sort_key

# one colour, marker and line style per method, in the report's order (cycling if the registry grows)
_PALETTE = dict(zip(METHOD_ORDER, itertools.cycle(sns.color_palette("colorblind")), strict=False))
_MARKERS = dict(zip(METHOD_ORDER, itertools.cycle("o^sDvPX*"), strict=False))
_LINESTYLES = dict(
    zip(METHOD_ORDER, itertools.cycle(["--", "-", "-.", ":", (0, (5, 2, 1, 2)), (0, (3, 1)), "-"]), strict=False)
)


def color(method: str) -> tuple[float, float, float]:
    """The method's colour in every figure."""
    return _PALETTE.get(method, (0.5, 0.5, 0.5))


def _marker(method: str) -> str:
    return _MARKERS.get(method, "o")


def _linestyle(method: str) -> Any:
    return _LINESTYLES.get(method, "-")


MAX_COLUMNS = 3
"""The most panels side by side in one figure."""
MAX_WIDTH_INCHES = 15.0
"""The widest figure, in inches at the report's savefig dpi (150): about 2 250 px shown at about 1 000 px."""
_PANEL_WIDTH = 3.8
_LEGEND_WIDTH = 2.4


def _panel_grid(
    count: int, *, height: float, width: float = _PANEL_WIDTH, extra_width: float = _LEGEND_WIDTH
) -> tuple[Figure, list[Axes]]:
    """``count`` panels in rows of at most :data:`MAX_COLUMNS`, with ``extra_width`` inches for a legend or a
    colour bar; the grid's unused cells are removed."""
    columns = max(1, min(count, MAX_COLUMNS))
    rows = max(1, math.ceil(count / columns))
    figure_width = min(width * columns + extra_width, MAX_WIDTH_INCHES)
    fig, axes = plt.subplots(rows, columns, figsize=(figure_width, height * rows), squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax in flat[count:]:
        fig.delaxes(ax)
    return fig, flat[:count]


def metric_range(metric_name: str) -> tuple[float, float]:
    """The values a metric can take, read from its name: accuracy in % within [0, 100] (a fraction within
    [0, 1]), an MSE or a loss at or above 0; a difference or anything else unbounded."""
    name = metric_name.lower()
    if "difference" in name:
        return -math.inf, math.inf
    if "accuracy" in name:
        return (0.0, 100.0) if "%" in name else (0.0, 1.0)
    if "mse" in name or "loss" in name:
        return 0.0, math.inf
    return -math.inf, math.inf


def _respect_range(ax: Axes, bounds: tuple[float, float]) -> None:
    """Clip the y-axis (after autoscaling) to the metric's range, so no axis runs past 100 % or below an MSE of 0."""
    low, high = ax.get_ylim()
    clipped = (max(low, bounds[0]), min(high, bounds[1]))
    if clipped[0] < clipped[1]:
        ax.set_ylim(*clipped)


def spans_decades(values: Any, decades: float = 2.0) -> bool:
    """Whether the finite values are all positive and their largest is at least ``10**decades`` times the
    smallest (such values get a log axis)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size < 2 or (finite <= 0).any():
        return False
    return bool(finite.max() >= finite.min() * 10**decades)


def _category_ticks(ax: Axes, positions: Sequence[float], names: Sequence[str]) -> None:
    """Category names under the x-axis, rotated so that long names do not overprint their neighbours."""
    ax.set_xticks(list(positions), list(names), rotation=40, ha="right", rotation_mode="anchor")


def _wrapped(text: str, width: int = 28) -> str:
    """An axis label broken into lines of at most ``width`` characters, so that it fits beside one panel."""
    return textwrap.fill(text, width)


def comparable_snr(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """``table`` with ``column`` (a release signal-to-noise ratio or a ratio of two) blanked for the rules that
    release an optimiser step (``Method.releases_step``: DP-MacAdam, DP-AdamBC).

    Their noise-free release is an Adam direction while ``E||noise||^2`` is the noise of the gradient they
    were built from, so the quotient has no common unit with the other methods' and is not reported.
    """
    steps = table["method"].map(lambda m: m in METHODS and METHODS[m].releases_step)
    result = table.copy()
    result[column] = result[column].astype(float).where(~steps)
    return result


def privacy_caption(epsilon: str | float, delta: float | None, accountant: str | None) -> str:
    """``"ε = 3, δ = 1e-05 (PRV accountant)"``."""
    eps = f"{epsilon:g}" if isinstance(epsilon, (int, float)) else epsilon
    return f"ε = {eps}, δ = {delta:g} ({(accountant or '').upper()} accountant)"


def _methods(frame: pd.DataFrame) -> list[str]:
    return list(pd.Series(frame["method"].unique()).sort_values(key=method_sort_key))


def _legend_outside(fig: Figure, *axes: Axes) -> None:
    """One legend right of the panels, with every labelled line of every panel once (a line drawn in one panel
    only, such as a task's reference line, is listed too)."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(text, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside right center", fontsize="small", frameon=False)


def _dodge(values: np.ndarray, index: int, count: int, log: bool, width: float = 0.06) -> np.ndarray:
    """Shift method ``index`` of ``count`` sideways (multiplicatively on a log axis) so markers do not overlap."""
    offset = (index - (count - 1) / 2) * width
    return values * 10**offset if log else values + offset


def interval_lines(
    ax: Axes,
    summary: pd.DataFrame,
    x: str,
    *,
    log_x: bool,
    methods: Sequence[str] | None = None,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> None:
    """Mean with its interval (``low``/``high``, clipped to ``bounds``: the metric's range) against ``x`` per
    method, dodged; non-private dashed."""
    names = list(methods) if methods is not None else _methods(summary)
    for index, method in enumerate(names):
        block = summary[summary["method"] == method].sort_values(x)
        if block.empty:
            continue
        xs = _dodge(block[x].to_numpy(dtype=float), index, len(names), log_x)
        mean = block["mean"].to_numpy(dtype=float)
        low = np.clip(block["low"].to_numpy(dtype=float), *bounds)
        high = np.clip(block["high"].to_numpy(dtype=float), *bounds)
        ax.errorbar(
            xs,
            mean,
            yerr=[np.maximum(mean - low, 0.0), np.maximum(high - mean, 0.0)],
            label=label(method),
            color=color(method),
            marker=_marker(method),
            linestyle=_linestyle(method),
            capsize=3,
        )


def _log_ticks(ax: Axes, values: Sequence[float]) -> None:
    ax.set_xscale("log")
    ticks = sorted(set(values))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()


def accuracy_against_epsilon(
    summary: pd.DataFrame, *, caption: str, references: Mapping[str, float] | None = None
) -> Figure:
    """Test metric against epsilon per method with 95 % intervals, one panel per task.

    Non-private is a horizontal line with its band; ``references`` adds a dotted line per task (e.g.
    the MSE of predicting the training mean).
    """
    tasks = sorted(summary["task"].unique())
    fig, axes = _panel_grid(len(tasks), height=3.4)
    for ax, task in zip(axes, tasks, strict=True):
        block = summary[summary["task"] == task]
        bounds = metric_range(block["metric_name"].iloc[0])
        private = block[block["method"] != NONPRIVATE]
        interval_lines(ax, private, "target_epsilon", log_x=True, bounds=bounds)
        baseline = block[block["method"] == NONPRIVATE]
        if not baseline.empty:
            row = baseline.iloc[0]
            ax.axhline(row["mean"], color=color(NONPRIVATE), linestyle="--", label=label(NONPRIVATE))
            band = np.clip([float(row["low"]), float(row["high"])], *bounds)
            ax.axhspan(band[0], band[1], color=color(NONPRIVATE), alpha=0.15)
        if references and task in references:
            ax.axhline(references[task], color="black", linestyle=":", linewidth=1, label="predict the training mean")
        _log_ticks(ax, private["target_epsilon"].tolist())
        _respect_range(ax, bounds)
        ax.set_xlabel("target ε")
        ax.set_ylabel(block["metric_name"].iloc[0])
        ax.set_title(task, fontsize="medium")
    _legend_outside(fig, *axes)
    fig.suptitle(caption, fontsize="medium", wrap=True)
    return fig


def paired_differences(differences: pd.DataFrame, *, caption: str) -> Figure:
    """Each method's seed-paired difference to DP-SGD with its 95 % interval, per task and epsilon."""
    tasks = sorted(differences["task"].unique())
    fig, axes = _panel_grid(len(tasks), height=3.4)
    for ax, task in zip(axes, tasks, strict=True):
        block = differences[differences["task"] == task].rename(columns={"difference": "mean"})
        interval_lines(ax, block, "target_epsilon", log_x=True)
        ax.axhline(0.0, color=color("fixed"), linewidth=1, label="DP-SGD (tuned)")
        _log_ticks(ax, block["target_epsilon"].tolist())
        ax.set_xlabel("target ε")
        ax.set_ylabel("difference to DP-SGD\n(paired by seed)")
        ax.set_title(task, fontsize="medium")
    _legend_outside(fig, *axes)
    fig.suptitle(caption, fontsize="medium", wrap=True)
    return fig


def tuning_heatmaps(grid: pd.DataFrame, *, task: str, caption: str) -> Figure:
    """Validation metric over the learning-rate x scale grid, one heatmap per method (one row for AUTO-S)."""
    block = grid[grid["task"] == task]
    methods = [m for m in _methods(block) if m != NONPRIVATE]
    fig, axes = _panel_grid(len(methods), height=3.2, width=3.6, extra_width=1.2)
    values = block["val_metric"].dropna()
    low, high = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    image = None
    for ax, method in zip(axes, methods, strict=True):
        cells = block[block["method"] == method]
        entry = METHODS.get(method)
        parameter = entry.scale_parameter if entry is not None else None
        # the grid's axes: lr x scale for DP-SGD-like methods (their lr differs in every cell), else lr
        table = cells.pivot_table(index="scale", columns="grid_lr", values="val_metric", dropna=False)
        if parameter is None or table.empty:  # no scale parameter: one row
            table = cells.set_index("grid_lr")[["val_metric"]].sort_index().T
            table.index = ["—"]
        image = ax.imshow(
            table.to_numpy(dtype=float), cmap="viridis", vmin=low, vmax=high, origin="lower", aspect="auto"
        )
        ax.grid(False)
        ax.set_xticks(
            range(table.shape[1]), [f"{v:.3g}" for v in table.columns], rotation=45, ha="right", rotation_mode="anchor"
        )
        ax.set_yticks(range(table.shape[0]), [f"{v:.3g}" if isinstance(v, float) else str(v) for v in table.index])
        for (row, col), value in np.ndenumerate(table.to_numpy(dtype=float)):
            text = "div." if math.isnan(value) else f"{value:.1f}"
            ax.text(col, row, text, ha="center", va="center", fontsize="x-small", color="white")
        ax.set_xlabel(f"lr × {parameter}" if entry is not None and entry.step_per_scale else "learning rate")
        ax.set_ylabel(parameter or "")
        ax.set_title(label(method), fontsize="medium")
    if image is not None:
        fig.colorbar(image, ax=axes, label=block["metric_name"].iloc[0].replace("test", "validation"))
    fig.suptitle(caption, fontsize="medium", wrap=True)
    return fig


def tuning_curves(cost: pd.DataFrame, *, task: str, ylabel: str, caption: str) -> Figure:
    """Expected best validation metric after k cells drawn at random from each method's grid."""
    fig, ax = plt.subplots(figsize=(7.2, 4.0), layout="constrained")
    block = cost[cost["task"] == task]
    for method in _methods(block):
        curve = block[block["method"] == method]["tuning_curve"].iloc[0]
        ks = sorted(int(k) for k in curve)
        ax.plot(
            ks,
            [curve[k] if k in curve else curve[str(k)] for k in ks],
            label=label(method),
            color=color(method),
            marker=_marker(method),
            linestyle=_linestyle(method),
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("random grid cells tried (k)")
    ax.set_ylabel(ylabel)
    ax.set_title(caption, fontsize="medium")
    _legend_outside(fig, ax)
    return fig


def metric_against_size(summary: pd.DataFrame, *, ylabel: str, caption: str) -> Figure:
    """Test metric against the training-set size with 95 % intervals per method (non-private dashed)."""
    fig, ax = plt.subplots(figsize=(7.2, 4.2), layout="constrained")
    bounds = metric_range(ylabel)
    interval_lines(ax, summary, "train_size", log_x=True, bounds=bounds)
    _log_ticks(ax, summary["train_size"].tolist())
    _respect_range(ax, bounds)
    ax.set_xlabel("training examples n (same steps and sampling rate for every n)")
    ax.set_ylabel(ylabel)
    ax.set_title(caption, fontsize="medium")
    _legend_outside(fig, ax)
    return fig


def step_statistic(series: pd.DataFrame, *, ylabel: str, title: str, log_y: bool = False, window: int = 10) -> Figure:
    """A per-step statistic (``analysis.step_series``) per method, one panel per task, smoothed over ``window``.

    The y-axis is logarithmic if ``log_y`` or if the statistic's positive values span two decades or more."""
    tasks = sorted(series["task"].unique())
    fig, axes = _panel_grid(len(tasks), height=3.2)
    for ax, task in zip(axes, tasks, strict=True):
        block = series[series["task"] == task]
        drawn = []
        for method in _methods(block):
            steps = block[block["method"] == method].sort_values("step")
            smooth = steps["value"].astype(float).rolling(window, min_periods=1).mean()
            drawn.append(smooth.to_numpy())
            ax.plot(steps["step"], smooth, label=label(method), color=color(method), linestyle=_linestyle(method))
        if log_y or (drawn and spans_decades(np.concatenate(drawn))):
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(_wrapped(ylabel))
        ax.set_title(task, fontsize="medium")
    _legend_outside(fig, *axes)
    fig.suptitle(title, fontsize="medium", wrap=True)
    return fig


def heterogeneity_saving(summary: pd.DataFrame, *, caption: str) -> Figure:
    """Per task: the best saving ``1 - h`` coordinate-wise clipping allows on AdaCliP's run (on every method's runs
    if AdaCliP did not run), and what AdaCliP's ``b`` achieved."""
    tasks = sorted(summary["task"].unique())
    fig, ax = plt.subplots(figsize=(min(3.6 + 0.8 * len(tasks), 10.0), 4.2), layout="constrained")
    positions = np.arange(len(tasks))
    best, achieved = [], []
    for task in tasks:
        block = summary[summary["task"] == task]
        adaclip = block[block["method"] == "adaclip"]
        # the bound 1 - h holds for the gradients of the same run: AdaCliP's own, if it ran on this task
        best.append(1 - float((adaclip if not adaclip.empty else block)["heterogeneity"].mean()))
        achieved.append(float(adaclip["shape_saving"].mean()) if not adaclip.empty else math.nan)
    ax.bar(positions - 0.2, best, width=0.4, color="lightgray", label="best possible, 1 − h (Thm. 2)")
    ax.bar(positions + 0.2, achieved, width=0.4, color=color("adaclip"), label="achieved by AdaCliP's b")
    ax.axhline(0, color="black", linewidth=0.8)
    _category_ticks(ax, positions, tasks)
    ax.set_ylabel("noise-power saving\nvs isotropic clipping")
    ax.set_title(caption, fontsize="medium", wrap=True)
    _legend_outside(fig, ax)
    return fig


def theory_noise(
    spreads: Sequence[float], closed_form: Sequence[float], simulated: Sequence[float], *, dim: int, batch_size: int
) -> Figure:
    """SYNTHETIC gradients: AdaCliP's optimal noise power relative to DP-SGD's against the per-coordinate spread."""
    fig, ax = plt.subplots(figsize=(7.2, 4.0), layout="constrained")
    grid = np.asarray(spreads, dtype=float)
    ax.plot(grid, closed_form, color=color("adaclip"), label="closed form (Pichapati et al. Thm. 2)")
    ax.plot(grid, simulated, linestyle="none", marker="o", color="black", label=f"learned b (B = {batch_size})")
    ax.axhline(1.0, color=color("fixed"), linestyle="--", label="DP-SGD (clip at the RMS norm)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("spread of per-coordinate gradient std (largest / smallest)")
    ax.set_ylabel("noise power relative to DP-SGD")
    ax.set_title(f"Synthetic Gaussian gradients, d = {dim} (any σ): the optimal transform", fontsize="medium")
    _legend_outside(fig, ax)
    return fig


def training_curves(curves: pd.DataFrame, *, title: str) -> Figure:
    """Test metric against epoch per method (mean over seeds), one panel per task; integer epoch ticks."""
    tasks = sorted(curves["task"].unique())
    fig, axes = _panel_grid(len(tasks), height=3.2)
    for ax, task in zip(axes, tasks, strict=True):
        block = curves[curves["task"] == task]
        for method in _methods(block):
            mean = block[block["method"] == method].groupby("epoch")["metric"].mean()
            ax.plot(mean.index, mean.to_numpy(), label=label(method), color=color(method), linestyle=_linestyle(method))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _respect_range(ax, metric_range(block["metric_name"].iloc[0]))
        ax.set_title(task, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.set_ylabel(block["metric_name"].iloc[0])
    _legend_outside(fig, *axes)
    fig.suptitle(title, fontsize="medium", wrap=True)
    return fig


def epsilon_against_steps(curve: pd.DataFrame, accountants: Sequence[str], *, title: str) -> Figure:
    """Epsilon against the number of steps, one line per accountant."""
    fig, ax = plt.subplots(figsize=(7.2, 4.0), layout="constrained")
    for name in accountants:
        ax.plot(curve["steps"], curve[name], marker="o", label=name.upper())
    ax.set_xscale("log")
    ax.set_xlabel("training steps")
    ax.set_ylabel("ε")
    ax.set_title(title, fontsize="medium")
    _legend_outside(fig, ax)
    return fig


def audit_results(results: Sequence[Any], *, delta: float) -> Figure:
    """Per audit: the standardised mean shift with its band against the analysis's mu, and the epsilon lower
    bound against theory (green: no violation found, red: caught).

    Both axes are logarithmic above 1 and linear below (symlog): a caught violation lies decades above the
    theory, and a lower bound of 0 stays on the axis."""
    ordered = list(results)[::-1]
    rows = range(len(ordered))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * len(ordered) + 1.8), sharey=True, layout="constrained")
    for y, result in zip(rows, ordered, strict=True):
        colour = "tab:green" if result.verdict == "pass" else "tab:red"
        shift = result.mean_shift
        left.errorbar(
            shift.estimate,
            y,
            xerr=[[shift.estimate - shift.low], [shift.high - shift.estimate]],
            fmt="o",
            color=colour,
            capsize=3,
        )
        left.plot(result.expected_mu, y, marker="|", color="black", markersize=14)
        right.plot([result.lower_bound.epsilon], [y], "o", color=colour)
        right.plot(result.theoretical_epsilon, y, marker="|", color="black", markersize=14)
    left.set_xscale("symlog", linthresh=2)
    left.set_yticks(list(rows), [r.name for r in ordered])
    left.set_xlabel("μ̂ with its band (o); the analysis's μ (|)")
    largest = max([1.0, *(max(r.lower_bound.epsilon, r.theoretical_epsilon) for r in ordered)])
    right.set_xscale("symlog", linthresh=1)
    right.set_xlim(0, 3 * largest)  # a margin of half a decade beyond the largest value
    right.set_xlabel(f"ε lower bound (o); theory (|), δ = {delta:g}")
    fig.suptitle(
        "Privacy audit (rules: PLD at q = 1; optimizer: PRV); green: no violation found, red: caught", fontsize="medium"
    )
    return fig


def gains_against_heterogeneity(gains: pd.DataFrame, *, ylabel: str, caption: str) -> Figure:
    """Each method's gain over DP-SGD, one panel per task in order of the task's heterogeneity index ``h`` (its own
    y-scale, so that one task's wide intervals squash no other): the seed-paired difference with its 95 % interval;
    and a last panel with the ratio of release signal-to-noise ratios against ``h`` on log axes."""
    order = gains.groupby("task")["heterogeneity"].first().sort_values()
    methods = _methods(gains)
    fig, axes = _panel_grid(len(order) + 1, height=3.4)
    for position, (ax, (task, h)) in enumerate(zip(axes, order.items(), strict=False)):
        block = gains[gains["task"] == task]
        for index, method in enumerate(methods):
            rows = block[block["method"] == method]
            if rows.empty:
                continue
            difference = rows["difference"].to_numpy(dtype=float)
            ax.errorbar(
                np.full(len(rows), index),
                difference,
                yerr=[difference - rows["low"].to_numpy(dtype=float), rows["high"].to_numpy(dtype=float) - difference],
                linestyle="none",
                capsize=3,
                color=color(method),
                marker=_marker(method),
                label=label(method),
            )
        ax.axhline(0.0, color=color("fixed"), linewidth=1, label="DP-SGD (tuned)")
        _category_ticks(ax, range(len(methods)), [label(m) for m in methods])
        ax.grid(False, axis="x")
        ax.set_title(f"{task} (h = {h:.2g})", fontsize="medium")
        if position % MAX_COLUMNS == 0:
            ax.set_ylabel(_wrapped(ylabel))
    ratios = axes[-1]
    for index, method in enumerate(methods):
        block = gains[gains["method"] == method].sort_values("heterogeneity")
        xs = _dodge(block["heterogeneity"].to_numpy(dtype=float), index, len(methods), log=True, width=0.015)
        ratios.plot(xs, block["snr_ratio"], linestyle="none", color=color(method), marker=_marker(method))
    ratios.axhline(1.0, color=color("fixed"), linewidth=1)
    ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1.0) if gains["heterogeneity"].min() / 2 <= t <= 1.0]
    ratios.set_xscale("log")
    ratios.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ratios.minorticks_off()
    ratios.set_xlabel("heterogeneity index h = (Σ s_j)² / (d Σ s_j²)")
    if spans_decades(gains["snr_ratio"], decades=0.0):  # positive ratios: a log axis centres 1
        ratios.set_yscale("log")
    ratios.set_ylabel(_wrapped("release SNR relative to DP-SGD's"))
    ratios.set_title("all tasks", fontsize="medium")
    _legend_outside(fig, *axes)
    fig.suptitle(caption, fontsize="medium", wrap=True)
    return fig
