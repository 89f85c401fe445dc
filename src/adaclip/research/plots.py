"""The report's figures, drawn from :mod:`adaclip.research.analysis` tables in the one shared style.

Each function returns a matplotlib ``Figure``; notebooks save it with
:func:`adaclip.research.reporting.save_figure`.  Every method keeps its colour and marker in every figure,
and every title or caption carries (epsilon, delta, accountant) where privacy is involved.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from adaclip.research.analysis import METHOD_ORDER, label, method_sort_key

# one colour, marker and line style per method, in the report's order (cycling if the registry grows)
_PALETTE = dict(zip(METHOD_ORDER, itertools.cycle(sns.color_palette("colorblind")), strict=False))
_MARKERS = dict(zip(METHOD_ORDER, itertools.cycle("o^sDvPX*"), strict=False))
_LINESTYLES = dict(
    zip(METHOD_ORDER, itertools.cycle(["--", "-", "-", "-.", (0, (5, 2, 1, 2)), ":", (0, (3, 1))]), strict=False)
)


def color(method: str) -> tuple[float, float, float]:
    """The method's colour in every figure."""
    return _PALETTE.get(method, (0.5, 0.5, 0.5))


def _marker(method: str) -> str:
    return _MARKERS.get(method, "o")


def privacy_caption(epsilon: str | float, delta: float | None, accountant: str | None) -> str:
    """``"ε = 3, δ = 1e-05 (PRV accountant)"``."""
    eps = f"{epsilon:g}" if isinstance(epsilon, (int, float)) else epsilon
    return f"ε = {eps}, δ = {delta:g} ({(accountant or '').upper()} accountant)"


def _methods(frame: pd.DataFrame) -> list[str]:
    return list(pd.Series(frame["method"].unique()).sort_values(key=method_sort_key))


def metric_against(
    summary: pd.DataFrame,
    x: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = True,
    baseline: pd.DataFrame | None = None,
    constants: pd.DataFrame | None = None,
    ax: plt.Axes | None = None,
) -> Figure:
    """Mean ± std of the metric against ``x`` per method (``summary`` from :func:`analysis.mean_std`).

    ``baseline`` (rows with ``mean``/``std``, e.g. non-private) is drawn as a horizontal band when
    it has no ``x`` values, else as a dashed curve.  ``constants`` (rows with ``method``/``mean``)
    are methods that do not depend on ``x``, drawn as dotted horizontal lines.
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
    else:
        fig = ax.figure
    for method in _methods(summary):
        block = summary[summary["method"] == method].sort_values(x)
        ax.errorbar(
            block[x],
            block["mean"],
            yerr=block["std"],
            label=label(method),
            color=color(method),
            marker=_marker(method),
            capsize=3,
        )
    if baseline is not None and not baseline.empty:
        if baseline[x].notna().any():
            block = baseline.sort_values(x)
            ax.errorbar(
                block[x],
                block["mean"],
                yerr=block["std"],
                label=label("nonprivate"),
                color=color("nonprivate"),
                linestyle="--",
                marker="o",
                capsize=3,
            )
        else:
            mean, std = float(baseline["mean"].iloc[0]), float(baseline["std"].iloc[0])
            ax.axhline(mean, color=color("nonprivate"), linestyle="--", label=label("nonprivate"))
            if std > 0:
                ax.axhspan(mean - std, mean + std, color=color("nonprivate"), alpha=0.1)
    if constants is not None:
        for row in constants.itertuples():
            ax.axhline(row.mean, color=color(row.method), linestyle=":", label=f"{label(row.method)} (no clip norm)")
    if log_x:
        ax.set_xscale("log")
        ticks = sorted(summary[x].dropna().unique())
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def step_statistic(series: pd.DataFrame, *, ylabel: str, title: str, log_y: bool = False, window: int = 10) -> Figure:
    """A per-step statistic (``analysis.step_series``) per method, smoothed by a moving mean of ``window`` steps."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in _methods(series):
        block = series[series["method"] == method].sort_values("step")
        smooth = block["value"].rolling(window, min_periods=1).mean()
        ax.plot(block["step"], smooth, label=label(method), color=color(method), linestyle=_LINESTYLES.get(method, "-"))
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def theory_noise(
    spreads: Sequence[float], closed_form: Sequence[float], simulated: Sequence[float], *, dim: int, batch_size: int
) -> Figure:
    """AdaCliP's optimal noise power relative to DP-SGD's against the spread of per-coordinate std."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    grid = np.asarray(spreads, dtype=float)
    ax.plot(grid, closed_form, color=color("adaclip"), label="closed form (Pichapati et al. Thm. 2)")
    ax.plot(
        grid,
        simulated,
        linestyle="none",
        marker="o",
        color="black",
        label=f"adaclip.AdaCliP, learned b (B = {batch_size})",
    )
    ax.axhline(1.0, color=color("fixed"), linestyle="--", label="DP-SGD (clip at the RMS norm)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("spread of per-coordinate gradient std (largest / smallest)")
    ax.set_ylabel("noise power relative to DP-SGD")
    ax.set_title(f"Optimal coordinate-wise transform vs DP-SGD, d = {dim} (any σ)", fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def training_curves(curves: pd.DataFrame, *, title: str) -> Figure:
    """Test metric against epoch per method (mean over seeds), one panel per dataset."""
    datasets = sorted(curves["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        block = curves[curves["dataset"] == dataset]
        for method in _methods(block):
            mean = block[block["method"] == method].groupby("epoch")["metric"].mean()
            ax.plot(
                mean.index,
                mean.to_numpy(),
                label=label(method),
                color=color(method),
                marker=_marker(method),
                linestyle="--" if method == "nonprivate" else "-",
            )
        ax.set_title(dataset, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.set_ylabel(block["metric_name"].iloc[0])
    axes[0][-1].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return fig


def accuracy_against_epsilon(summary: pd.DataFrame, *, caption: str) -> Figure:
    """Test metric against epsilon per method, one panel per dataset, non-private as a band."""
    datasets = sorted(summary["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.0 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        block = summary[summary["dataset"] == dataset]
        private = block[block["method"] != "nonprivate"]
        metric_against(
            private,
            "target_epsilon",
            xlabel="target ε",
            ylabel=block["metric_name"].iloc[0],
            title=dataset,
            baseline=block[block["method"] == "nonprivate"],
            ax=ax,
        )
    fig.suptitle(caption, fontsize="medium")
    return fig
