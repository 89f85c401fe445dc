"""The report's figures: the tuning grid's heatmap axes, legends of every panel, methods never drawn over each other."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from adaclip.research import analysis, plots


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _record(method, lr, scale, accuracy, seed=0):
    parameter = analysis.METHODS[method].scale_parameter if method in analysis.METHODS else None
    return {
        "config": {"task": "t", "lr": lr, "batch_size": 10, "epochs": 1},
        "dataset": "breast-cancer",
        "model": "logistic",
        "method": method,
        "seed": seed,
        "target_epsilon": 3.0,
        "epsilon": 3.0,
        "delta": 1e-5,
        "accountant": "prv",
        "noise_multiplier": 1.0,
        "method_params": {} if parameter is None or scale is None else {parameter: scale},
        "train_size": 100,
        "steps": 10,
        "test_accuracy": accuracy,
        "val_accuracy": accuracy,
        "step_stats_mean": {},
    }


def test_dpsgd_heatmap_is_the_step_x_clip_grid_with_every_cell_filled():
    """DP-SGD's grid is lr x C (its lr = step / C differs in every cell): the heatmap must be steps x C, not lr x C
    with empty cells drawn as diverged."""
    records = [
        _record("fixed", step / clip, clip, 0.5 + 0.1 * i + 0.01 * j)
        for i, step in enumerate((0.4, 1.6))
        for j, clip in enumerate((0.01, 0.1, 1.0))
    ]
    records += [_record("adaclip", lr, h2, 0.6) for lr in (0.1, 0.3) for h2 in (0.01, 1.0)]
    records += [_record("auto", lr, None, 0.7) for lr in (0.1, 0.3, 0.9)]
    grid = analysis.tuning_grid(analysis.runs_frame(records))
    fig = plots.tuning_heatmaps(grid, task="t", caption="c")
    fixed, adaclip, auto = fig.axes[:3]
    values = np.asarray(fixed.images[0].get_array(), dtype=float)
    assert values.shape == (3, 2) and np.isfinite(values).all()  # 3 clip norms x 2 steps
    assert [t.get_text() for t in fixed.get_xticklabels()] == ["0.4", "1.6"]
    assert fixed.get_xlabel() == "lr × clip_norm" and fixed.get_ylabel() == "clip_norm"
    assert not any(t.get_text() == "div." for t in fixed.texts)
    assert np.asarray(adaclip.images[0].get_array()).shape == (2, 2) and adaclip.get_xlabel() == "learning rate"
    assert np.asarray(auto.images[0].get_array()).shape == (1, 3)  # AUTO-S: the lr axis only


def test_a_diverged_cell_is_drawn_as_diverged():
    records = [_record("fixed", step / 0.1, 0.1, 0.8) for step in (0.4, 1.6)]
    records[1]["val_accuracy"] = float("nan")
    fig = plots.tuning_heatmaps(analysis.tuning_grid(analysis.runs_frame(records)), task="t", caption="c")
    assert [t.get_text() for t in fig.axes[0].texts] == ["80.0", "div."]


def _summary(rows):
    return pd.DataFrame(
        rows, columns=["task", "method", "target_epsilon", "mean", "low", "high", "seeds", "metric_name"]
    )


def test_the_legend_lists_every_line_of_every_panel_once():
    summary = _summary(
        [
            ("a", "fixed", 1.0, 80.0, 79.0, 81.0, 3, "test accuracy (%)"),
            ("a", "fixed", 3.0, 85.0, 84.0, 86.0, 3, "test accuracy (%)"),
            ("b", "fixed", 1.0, 0.6, 0.5, 0.7, 3, "test MSE"),
            ("b", "geoclip", 1.0, 0.7, 0.6, 0.8, 3, "test MSE"),  # only in the second panel
            ("b", "nonprivate", math.nan, 0.4, 0.35, 0.45, 3, "test MSE"),
        ]
    )
    fig = plots.accuracy_against_epsilon(summary, caption="c", references={"b": 1.0})
    texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert sorted(texts) == sorted(["DP-SGD (fixed C)", "GeoClip", "non-private", "predict the training mean"])


def test_methods_at_the_same_x_are_dodged_apart():
    summary = _summary(
        [(t, m, e, 80.0, 79.0, 81.0, 3, "acc") for t in ("a",) for m in ("fixed", "auto", "psac") for e in (1.0, 3.0)]
    )
    _, ax = plt.subplots()
    plots.interval_lines(ax, summary, "target_epsilon", log_x=True)
    xs = [tuple(container.lines[0].get_xdata()) for container in ax.containers]  # one error bar plot per method
    assert len(xs) == 3 and len(set(xs)) == 3  # same means, never on top of each other
    assert all(x[0] == pytest.approx(1.0, rel=0.2) and x[1] == pytest.approx(3.0, rel=0.2) for x in xs)


def test_heterogeneity_bars_set_adaclip_against_its_own_runs_bound():
    summary = pd.DataFrame(
        {
            "task": ["t", "t", "u"],
            "method": ["fixed", "adaclip", "fixed"],
            "heterogeneity": [0.5, 0.8, 0.9],
            "shape_saving": [math.nan, 0.15, math.nan],
        }
    )
    fig = plots.heterogeneity_saving(summary, caption="c")
    heights = [p.get_height() for p in fig.axes[0].patches]  # 1 - h for t and u, then AdaCliP's saving
    assert heights[:3] == pytest.approx([1 - 0.8, 1 - 0.9, 0.15])  # t: AdaCliP's own h, not the mean 0.65
    assert math.isnan(heights[3])  # no AdaCliP run on u: nothing achieved to draw


def test_training_curves_have_integer_epoch_ticks():
    curves = pd.DataFrame(
        {
            "task": ["t"] * 4,
            "method": ["fixed", "fixed", "adaclip", "adaclip"],
            "epoch": [1, 2, 1, 2],
            "metric": [80.0, 82.0, 79.0, 81.0],
            "metric_name": ["test accuracy (%)"] * 4,
        }
    )
    fig = plots.training_curves(curves, title="t")
    fig.canvas.draw()
    ticks = fig.axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)


def test_the_snr_of_rules_that_release_an_adam_step_is_blanked():
    table = pd.DataFrame({"method": ["fixed", "adaclip", "macadam", "adambc"], "snr": [1.0, 2.0, 3e4, 5e5]})
    blanked = plots.comparable_snr(table, "snr")
    assert blanked["snr"].tolist()[:2] == [1.0, 2.0] and blanked["snr"].iloc[2:].isna().all()
    assert table["snr"].tolist() == [1.0, 2.0, 3e4, 5e5]  # the input is left as it was
