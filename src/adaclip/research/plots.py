"""The report's figures, drawn from :mod:`adaclip.research.analysis` tables in the one shared style.

Each function returns a matplotlib ``Figure``; notebooks save it with
:func:`adaclip.research.io.save_figure`.  Every method keeps its colour, marker and line style in
every figure; methods that share an x value are shifted apart slightly so that none hides another;
legends sit outside the axes; intervals are drawn as error bars or bands and the caption says which;
every title or caption carries (epsilon, delta, accountant) where privacy is involved.
"""

from __future__ import annotations

import itertools
import math
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
) -> None:
    """Mean with its interval (``low``/``high``) against ``x`` per method, dodged; non-private dashed."""
    names = list(methods) if methods is not None else _methods(summary)
    for index, method in enumerate(names):
        block = summary[summary["method"] == method].sort_values(x)
        if block.empty:
            continue
        xs = _dodge(block[x].to_numpy(dtype=float), index, len(names), log_x)
        ax.errorbar(
            xs,
            block["mean"],
            yerr=[block["mean"] - block["low"], block["high"] - block["mean"]],
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
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks) + 1.8, 4.0), squeeze=False, layout="constrained")
    for ax, task in zip(axes[0], tasks, strict=True):
        block = summary[summary["task"] == task]
        private = block[block["method"] != NONPRIVATE]
        interval_lines(ax, private, "target_epsilon", log_x=True)
        baseline = block[block["method"] == NONPRIVATE]
        if not baseline.empty:
            row = baseline.iloc[0]
            ax.axhline(row["mean"], color=color(NONPRIVATE), linestyle="--", label=label(NONPRIVATE))
            ax.axhspan(row["low"], row["high"], color=color(NONPRIVATE), alpha=0.15)
        if references and task in references:
            ax.axhline(references[task], color="black", linestyle=":", linewidth=1, label="predict the training mean")
        _log_ticks(ax, private["target_epsilon"].tolist())
        ax.set_xlabel("target ε")
        ax.set_ylabel(block["metric_name"].iloc[0])
        ax.set_title(task, fontsize="medium")
    _legend_outside(fig, *axes[0])
    fig.suptitle(caption, fontsize="medium")
    return fig


def paired_differences(differences: pd.DataFrame, *, caption: str) -> Figure:
    """Each method's seed-paired difference to DP-SGD with its 95 % interval, per task and epsilon."""
    tasks = sorted(differences["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks) + 1.8, 4.0), squeeze=False, layout="constrained")
    for ax, task in zip(axes[0], tasks, strict=True):
        block = differences[differences["task"] == task].rename(columns={"difference": "mean"})
        interval_lines(ax, block, "target_epsilon", log_x=True)
        ax.axhline(0.0, color=color("fixed"), linewidth=1, label="DP-SGD (tuned)")
        _log_ticks(ax, block["target_epsilon"].tolist())
        ax.set_xlabel("target ε")
        ax.set_ylabel("difference to DP-SGD (paired by seed)")
        ax.set_title(task, fontsize="medium")
    _legend_outside(fig, *axes[0])
    fig.suptitle(caption, fontsize="medium")
    return fig


def tuning_heatmaps(grid: pd.DataFrame, *, task: str, caption: str) -> Figure:
    """Validation metric over the learning-rate x scale grid, one heatmap per method (one row for AUTO-S)."""
    block = grid[grid["task"] == task]
    methods = [m for m in _methods(block) if m != NONPRIVATE]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.4 * len(methods), 3.6), squeeze=False, layout="constrained")
    values = block["val_metric"].dropna()
    low, high = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    image = None
    for ax, method in zip(axes[0], methods, strict=True):
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
        ax.set_xticks(range(table.shape[1]), [f"{v:.3g}" for v in table.columns], rotation=45)
        ax.set_yticks(range(table.shape[0]), [f"{v:.3g}" if isinstance(v, float) else str(v) for v in table.index])
        for (row, col), value in np.ndenumerate(table.to_numpy(dtype=float)):
            text = "div." if math.isnan(value) else f"{value:.1f}"
            ax.text(col, row, text, ha="center", va="center", fontsize="x-small", color="white")
        ax.set_xlabel(f"lr × {parameter}" if entry is not None and entry.step_per_scale else "learning rate")
        ax.set_ylabel(parameter or "")
        ax.set_title(label(method), fontsize="medium")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label=block["metric_name"].iloc[0].replace("test", "validation"))
    fig.suptitle(caption, fontsize="medium")
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
    interval_lines(ax, summary, "train_size", log_x=True)
    _log_ticks(ax, summary["train_size"].tolist())
    ax.set_xlabel("training examples n (same steps and sampling rate for every n)")
    ax.set_ylabel(ylabel)
    ax.set_title(caption, fontsize="medium")
    _legend_outside(fig, ax)
    return fig


def step_statistic(series: pd.DataFrame, *, ylabel: str, title: str, log_y: bool = False, window: int = 10) -> Figure:
    """A per-step statistic (``analysis.step_series``) per method, one panel per task, smoothed over ``window``."""
    tasks = sorted(series["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks) + 1.8, 3.8), squeeze=False, layout="constrained")
    for ax, task in zip(axes[0], tasks, strict=True):
        block = series[series["task"] == task]
        for method in _methods(block):
            steps = block[block["method"] == method].sort_values("step")
            smooth = steps["value"].astype(float).rolling(window, min_periods=1).mean()
            ax.plot(steps["step"], smooth, label=label(method), color=color(method), linestyle=_linestyle(method))
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(task, fontsize="medium")
    _legend_outside(fig, *axes[0])
    fig.suptitle(title, fontsize="medium")
    return fig


def heterogeneity_saving(summary: pd.DataFrame, *, caption: str) -> Figure:
    """Per task: the best saving ``1 - h`` coordinate-wise clipping allows on AdaCliP's run (on every method's runs
    if AdaCliP did not run), and what AdaCliP's ``b`` achieved."""
    tasks = sorted(summary["task"].unique())
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
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
    ax.set_xticks(positions, tasks)
    ax.set_ylabel("noise-power saving vs isotropic clipping")
    ax.set_title(caption, fontsize="medium")
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
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks) + 1.8, 3.8), squeeze=False, layout="constrained")
    for ax, task in zip(axes[0], tasks, strict=True):
        block = curves[curves["task"] == task]
        for method in _methods(block):
            mean = block[block["method"] == method].groupby("epoch")["metric"].mean()
            ax.plot(mean.index, mean.to_numpy(), label=label(method), color=color(method), linestyle=_linestyle(method))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(task, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.set_ylabel(block["metric_name"].iloc[0])
    _legend_outside(fig, *axes[0])
    fig.suptitle(title, fontsize="medium")
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
    bound against theory (green: no violation found, red: caught)."""
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
    right.set_xlabel(f"ε lower bound (o); theory (|), δ = {delta:g}")
    fig.suptitle(
        "Privacy audit (rules: PLD at q = 1; optimizer: PRV); green: no violation found, red: caught", fontsize="medium"
    )
    return fig


def gains_against_heterogeneity(gains: pd.DataFrame, *, ylabel: str, caption: str) -> Figure:
    """Each method's gain over DP-SGD against the task's heterogeneity index ``h``: the seed-paired accuracy
    difference with its 95 % interval (left) and the ratio of release signal-to-noise ratios (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.2), layout="constrained")
    methods = _methods(gains)
    for index, method in enumerate(methods):
        block = gains[gains["method"] == method].sort_values("heterogeneity")
        xs = _dodge(block["heterogeneity"].to_numpy(dtype=float), index, len(methods), log=True, width=0.015)
        style = {"color": color(method), "marker": _marker(method), "label": label(method)}
        left.errorbar(
            xs,
            block["difference"],
            yerr=[block["difference"] - block["low"], block["high"] - block["difference"]],
            linestyle="none",
            capsize=3,
            **style,
        )
        right.plot(xs, block["snr_ratio"], linestyle="none", **style)
    left.axhline(0.0, color=color("fixed"), linewidth=1, label="DP-SGD (tuned)")
    right.axhline(1.0, color=color("fixed"), linewidth=1)
    ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1.0) if gains["heterogeneity"].min() / 2 <= t <= 1.0]
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("heterogeneity index h = (Σ s_j)² / (d Σ s_j²)")
    left.set_ylabel(ylabel)
    right.set_yscale("log")
    right.set_ylabel("release SNR relative to DP-SGD's")
    for task, h in gains.groupby("task")["heterogeneity"].first().items():
        left.annotate(str(task), (h, left.get_ylim()[0]), fontsize="x-small", rotation=90, va="bottom", ha="center")
    _legend_outside(fig, left)
    fig.suptitle(caption, fontsize="medium")
    return fig
