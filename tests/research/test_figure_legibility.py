"""Every figure of the report is legible at the report's width: at most three panels across, a bounded size in
pixels at the report's dpi, no two tick labels of an axis on top of each other, metric axes inside their range."""

import itertools
import math
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from adaclip.research import plots
from adaclip.research.io import apply_style

SAVE_DPI = 150  # the report's savefig dpi (io.apply_style)
MAX_WIDTH_PX = 15 * SAVE_DPI  # shown at about 1 000 px in report.html
MAX_HEIGHT_PX = 16 * SAVE_DPI
MIN_SIDE_PX = 3 * SAVE_DPI

TASKS = ["fashion-mnist-cnn", "fashion-mnist-scatternet", "breast-cancer", "diabetes", "synthetic-100", "synthetic-1"]
METHODS = ["fixed", "adaclip", "quantile", "auto", "geoclip", "psac", "macadam", "adambc"]
EPSILONS = [1.0, 3.0, 8.0]


@pytest.fixture(autouse=True)
def _style():
    with matplotlib.rc_context():
        apply_style()
        yield
    plt.close("all")


def _metric_name(task):
    return "test MSE" if task == "diabetes" else "test accuracy (%)"


def _accuracy_summary():
    rng = np.random.default_rng(0)
    rows = []
    for task in TASKS:
        for method in [*METHODS, "nonprivate"]:
            for epsilon in EPSILONS if method != "nonprivate" else [math.nan]:
                if task == "diabetes":
                    mean = rng.uniform(0.5, 0.9)
                    rows.append((task, method, epsilon, mean, mean - 0.8, mean + 0.3, 5, "test MSE"))
                else:
                    mean = rng.uniform(80, 99)
                    rows.append((task, method, epsilon, mean, mean - 30, mean + 30, 5, "test accuracy (%)"))
    return pd.DataFrame(
        rows, columns=["task", "method", "target_epsilon", "mean", "low", "high", "seeds", "metric_name"]
    )


def _differences():
    summary = _accuracy_summary()
    private = summary[summary["method"] != "nonprivate"].rename(columns={"mean": "difference"})
    private = private.assign(low=private["difference"] - 90, high=private["difference"] - 70)
    return private.assign(difference=private["difference"] - 80)


def _tuning_grid():
    rows = []
    for method in [m for m in METHODS if m != "nonprivate"]:
        scales = [None] if method == "auto" else [0.01, 0.1, 1.0]
        for lr, scale in itertools.product([0.1, 0.3, 1.0], scales):
            grid_lr = lr if method != "fixed" else lr * 10
            rows.append(
                {
                    "task": "main",
                    "method": method,
                    "grid_lr": grid_lr,
                    "scale": scale,
                    "val_metric": 80 + lr,
                    "metric_name": "test accuracy (%)",
                }
            )
    return pd.DataFrame(rows)


def _series():
    steps = np.arange(1, 201)
    rows = []
    for task in TASKS:
        for index, method in enumerate(METHODS[:6]):
            values = 10.0 ** (3 - 3 * steps / 200) * (1 + index)  # three decades, as the SNR does
            rows += [
                {"task": task, "method": method, "step": s, "value": v} for s, v in zip(steps, values, strict=True)
            ]
    return pd.DataFrame(rows)


def _curves():
    rows = []
    for task in TASKS:
        for method in METHODS:
            for epoch in range(1, 11):
                rows.append(
                    {
                        "task": task,
                        "method": method,
                        "epoch": epoch,
                        "metric": 100 - 5 / epoch,
                        "metric_name": _metric_name(task),
                    }
                )
    return pd.DataFrame(rows)


def _audit_results():
    names = [f"{m}" for m in METHODS]
    names += [
        "control: no clipping (fixed)",
        "control: noise halved (fixed)",
        "control: normaliser = realised batch size (fixed)",
        "control: AdaCliP statistics from raw gradients (adaclip)",
        "control: AdaCliP quantile-scale count without noise (adaclip)",
    ]
    names += [f"{m} (optimizer, q = 0.5)" for m in METHODS]
    results = []
    for index, name in enumerate(names):
        caught = name.startswith("control")
        estimate = 700.0 if "no clipping" in name else (2.0 if caught else 0.8)
        results.append(
            SimpleNamespace(
                name=name,
                verdict="fail" if caught else "pass",
                mean_shift=SimpleNamespace(estimate=estimate, low=estimate * 0.8, high=estimate * 1.2),
                expected_mu=0.8,
                lower_bound=SimpleNamespace(epsilon=2.2e5 if "no clipping" in name else 0.4 + 0.01 * index),
                theoretical_epsilon=2.94,
            )
        )
    return results


def _gains():
    rows = []
    for task, h in zip(
        ["breast-cancer", "synthetic-10000", "synthetic-100", "scatternet", "synthetic-1"],
        [0.09, 0.2, 0.4, 0.6, 0.95],
        strict=True,
    ):
        width = 30.0 if task == "breast-cancer" else 1.0
        for method in METHODS[1:]:
            rows.append(
                {
                    "task": task,
                    "method": method,
                    "heterogeneity": h,
                    "difference": 1.0,
                    "low": 1.0 - width,
                    "high": 1.0 + width,
                    "snr_ratio": 0.4 + 10 * h,
                }
            )
    return pd.DataFrame(rows)


FIGURES = {
    "accuracy": lambda: plots.accuracy_against_epsilon(
        _accuracy_summary(), caption="Test metric against ε " * 3, references={"diabetes": 1.0}
    ),
    "paired": lambda: plots.paired_differences(_differences(), caption="Difference to tuned DP-SGD, paired by seed"),
    "tuning_heatmaps": lambda: plots.tuning_heatmaps(
        _tuning_grid(), task="main", caption="main: validation metric over the grid"
    ),
    "tuning_curves": lambda: plots.tuning_curves(
        pd.DataFrame(
            {
                "task": ["main"] * 3,
                "method": ["fixed", "adaclip", "auto"],
                "tuning_curve": [{1: 80.0, 2: 85.0, 9: 89.0}] * 3,
            }
        ),
        task="main",
        ylabel="test accuracy (%)",
        caption="main: tuning curves",
    ),
    "data_size": lambda: plots.metric_against_size(
        pd.DataFrame(
            [(m, n, 85.0, 60.0, 110.0) for m in METHODS for n in (1000, 3000, 10000, 30000, 55000)],
            columns=["method", "train_size", "mean", "low", "high"],
        ),
        ylabel="test accuracy (%)",
        caption="Test metric against the training-set size",
    ),
    "snr": lambda: plots.step_statistic(_series(), ylabel="signal-to-noise ratio of the release", title="SNR per step"),
    "heterogeneity": lambda: plots.heterogeneity_saving(
        pd.DataFrame(
            {
                "task": TASKS,
                "method": ["adaclip"] * len(TASKS),
                "heterogeneity": np.linspace(0.1, 0.9, len(TASKS)),
                "shape_saving": 0.1,
            }
        ),
        caption="What coordinate-wise clipping can save, and what AdaCliP saved",
    ),
    "theory_noise": lambda: plots.theory_noise(
        [1, 10, 100, 1000], [1, 0.8, 0.5, 0.3], [1, 0.9, 0.6, 0.4], dim=100, batch_size=64
    ),
    "training_curves": lambda: plots.training_curves(_curves(), title="Test metric per epoch"),
    "epsilon_steps": lambda: plots.epsilon_against_steps(
        pd.DataFrame({"steps": [10, 100, 1000, 10000], "rdp": [0.5, 1.0, 3.0, 9.0], "prv": [0.4, 0.9, 2.8, 8.5]}),
        ["rdp", "prv"],
        title="ε against steps",
    ),
    "audit": lambda: plots.audit_results(_audit_results(), delta=1e-5),
    "heterogeneity_gain": lambda: plots.gains_against_heterogeneity(
        _gains(), ylabel="test accuracy difference to DP-SGD (points)", caption="Gain over tuned DP-SGD"
    ),
}


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def panels_across(fig):
    """The most panels that share a row (their vertical extents overlap)."""
    boxes = [ax.get_position() for ax in _panels(fig)]
    return max(sum(1 for other in boxes if other.y0 < box.y1 and box.y0 < other.y1) for box in boxes)


def _shown_tick_labels(axis):
    """The axis's drawn, non-empty major and minor tick labels (ticks inside the view interval only)."""
    low, high = sorted(axis.get_view_interval())
    labels = []
    for ticks, locs in (
        (axis.get_major_ticks(), axis.get_majorticklocs()),
        (axis.get_minor_ticks(), axis.get_minorticklocs()),
    ):
        for tick, loc in zip(ticks, locs, strict=False):
            text = tick.label1
            inside = low - 1e-9 * abs(low) <= loc <= high + 1e-9 * abs(high)
            if inside and tick.get_visible() and text.get_visible() and text.get_text().strip():
                labels.append(text)
    return labels


def _oriented_box(text, renderer):
    """Centre, unrotated width and height, and angle (radians) of a text's box in display pixels."""
    box = text.get_window_extent(renderer)
    rotation = text.get_rotation()
    text.set_rotation(0)
    upright = text.get_window_extent(renderer)
    text.set_rotation(rotation)
    return (
        np.array([(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2]),
        upright.width,
        upright.height,
        math.radians(rotation),
    )


def overlapping_tick_labels(fig, tolerance_px=0.5):
    """Pairs of tick labels of one axis whose boxes overlap (rotated boxes compared in their own frame)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    clashes = []
    for ax in _panels(fig):
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [(text.get_text(), *_oriented_box(text, renderer)) for text in _shown_tick_labels(axis)]
            for (name_a, ca, wa, ha, ta), (name_b, cb, wb, hb, tb) in itertools.combinations(boxes, 2):
                assert math.isclose(ta, tb), f"tick labels of one axis at different angles: {name_a!r}, {name_b!r}"
                rotate = np.array([[math.cos(ta), math.sin(ta)], [-math.sin(ta), math.cos(ta)]])
                along, across = np.abs(rotate @ (cb - ca))
                if along < (wa + wb) / 2 - tolerance_px and across < (ha + hb) / 2 - tolerance_px:
                    clashes.append((ax.get_title(), name_a, name_b))
    return clashes


def saved_size_px(fig):
    """The PNG's width and height at the report's dpi with ``bbox_inches="tight"`` (io.apply_style)."""
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    return box.width * SAVE_DPI, box.height * SAVE_DPI


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_every_figure_is_legible_at_the_reports_width(name):
    fig = FIGURES[name]()
    width, height = saved_size_px(fig)
    assert MIN_SIDE_PX <= width <= MAX_WIDTH_PX, (name, width)
    assert MIN_SIDE_PX <= height <= MAX_HEIGHT_PX, (name, height)
    assert panels_across(fig) <= 3
    assert overlapping_tick_labels(fig) == []


def test_the_overlap_check_catches_a_crowded_axis():
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.set_xticks(range(30), [f"a long category name {i}" for i in range(30)])
    assert len(overlapping_tick_labels(fig)) > 20
    ax.set_xticks(
        range(30), [f"a long category name {i}" for i in range(30)], rotation=40, ha="right", rotation_mode="anchor"
    )
    assert overlapping_tick_labels(fig) != []  # 40 degrees is not enough for 30 names in 6 inches
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.set_xticks(range(5), [f"name {i}" for i in range(5)], rotation=40, ha="right", rotation_mode="anchor")
    assert overlapping_tick_labels(fig) == []  # rotated boxes whose bounding boxes overlap, the glyphs do not


def test_six_tasks_sit_in_two_rows_of_three():
    fig = FIGURES["accuracy"]()
    assert len(_panels(fig)) == 6 and panels_across(fig) == 3


def test_metric_axes_and_intervals_stay_in_the_metrics_range():
    fig = FIGURES["accuracy"]()
    for ax in _panels(fig):
        low, high = ax.get_ylim()
        if ax.get_ylabel() == "test MSE":
            assert low >= 0
        else:
            assert low >= 0 and high <= 100
        for line in ax.lines:  # error-bar caps sit at the clipped interval's ends
            ys = np.asarray(line.get_ydata(), dtype=float)
            if ax.get_ylabel() == "test MSE":
                assert (ys >= 0).all()
            else:
                assert ((ys >= 0) & (ys <= 100)).all()


def test_values_spanning_decades_get_a_log_axis():
    snr = FIGURES["snr"]()
    assert {ax.get_yscale() for ax in _panels(snr)} == {"log"}
    audit = FIGURES["audit"]()
    assert audit.axes[1].get_xscale() == "symlog"
    gains = FIGURES["heterogeneity_gain"]()
    assert gains.axes[-1].get_yscale() == "log"


def test_each_task_of_the_heterogeneity_gain_has_its_own_scale():
    """Breast Cancer's ±30-point intervals do not set the scale of the task beside it."""
    fig = FIGURES["heterogeneity_gain"]()
    panels = _panels(fig)
    assert len(panels) == 6  # five tasks and the SNR panel
    spans = {ax.get_title().split(" ")[0]: np.diff(ax.get_ylim())[0] for ax in panels[:-1]}
    assert spans["breast-cancer"] > 50 and spans["synthetic-1"] < 5


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("test accuracy (%)", (0.0, 100.0)),
        ("test MSE", (0.0, math.inf)),
        ("difference to DP-SGD", (-math.inf, math.inf)),
    ],
)
def test_metric_range_reads_the_metrics_name(name, expected):
    assert plots.metric_range(name) == expected
