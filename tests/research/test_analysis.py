"""Records to the report's statistics: selection, t intervals, paired differences, tuning cost, size, diagnostics."""

import itertools
import math
import statistics

import pandas as pd
import pytest
from scipy.stats import t as student_t

from adaclip.methods import METHODS
from adaclip.research import analysis


def _record(method, seed, metric, *, lr=0.1, scale=None, epsilon=3.0, task="t", mse=False, diverged=None, **extra):
    """A run record as train.run writes it (metric: accuracy in [0, 1] or MSE; val defaults to the test metric)."""
    params = {} if scale is None else {METHODS[method].scale_parameter: scale}
    key = "mse" if mse else "accuracy"
    record = {
        "config": {"task": task, "lr": lr, "batch_size": 10, "epochs": 1},
        "dataset": "diabetes" if mse else "breast-cancer",
        "model": "linear" if mse else "logistic",
        "method": method,
        "seed": seed,
        "target_epsilon": None if method == "nonprivate" else epsilon,
        "epsilon": None if method == "nonprivate" else epsilon,
        "delta": 1e-5,
        "accountant": "prv",
        "noise_multiplier": 1.0,
        "method_params": params,
        "train_size": extra.pop("train_size", 100),
        "steps": 10,
        f"test_{key}": metric,
        f"val_{key}": extra.pop("val", metric),
        "step_stats_mean": {},
        **extra,
    }
    if diverged is not None:
        record["diverged"] = diverged
    return record


# --- select ------------------------------------------------------------------------------------------------------


def test_select_picks_the_best_mean_validation_metric_over_seeds():
    records = [
        _record("fixed", 0, 0.0, val=0.50, lr=1.0, scale=0.1),
        _record("fixed", 1, 0.0, val=0.70, lr=1.0, scale=0.1),  # mean 0.60
        _record("fixed", 0, 0.0, val=0.62, lr=0.5, scale=1.0),
        _record("fixed", 1, 0.0, val=0.60, lr=0.5, scale=1.0),  # mean 0.61: best
        _record("fixed", 0, 0.99, val=0.10, lr=0.1, scale=0.1),  # the best test metric is not what selects
        _record("fixed", 1, 0.99, val=0.10, lr=0.1, scale=0.1),
        _record("auto", 0, 0.5, val=0.3, lr=0.3),
        _record("auto", 0, 0.5, val=0.4, lr=3.0),
        _record("nonprivate", 0, 0.5, val=0.9, lr=0.2),
    ]
    chosen = analysis.select(records)
    assert chosen == {
        ("t", "fixed"): analysis.Hyperparameters(lr=0.5, scale=1.0),
        ("t", "auto"): analysis.Hyperparameters(lr=3.0, scale=None),
        ("t", "nonprivate"): analysis.Hyperparameters(lr=0.2, scale=None),
    }


def test_select_minimises_mse_and_never_picks_a_diverged_cell_unless_all_diverged():
    nan = float("nan")
    records = [
        _record("fixed", 0, nan, mse=True, lr=0.01, scale=1.0),  # diverged (NaN): never chosen
        _record("fixed", 0, 0.9, mse=True, lr=0.1, scale=1.0),
        _record("fixed", 0, 0.4, mse=True, lr=1.0, scale=1.0),  # the lowest MSE
        _record("fixed", 0, 0.1, mse=True, lr=1.0, scale=10.0, diverged=True),  # flagged: never chosen
        _record("adaclip", 0, 0.2, mse=True, lr=0.1, scale=0.1),
        _record("adaclip", 1, nan, mse=True, lr=0.1, scale=0.1),  # one seed diverged: the cell diverged
        _record("adaclip", 0, 0.3, mse=True, lr=0.1, scale=1.0),
        _record("adaclip", 1, 0.3, mse=True, lr=0.1, scale=1.0),
        _record("auto", 0, nan, mse=True, lr=3.0),
        _record("auto", 0, nan, mse=True, lr=0.3),  # all diverged: the smallest lr
    ]
    chosen = analysis.select(records)
    assert chosen[("t", "fixed")] == analysis.Hyperparameters(lr=1.0, scale=1.0)
    assert chosen[("t", "adaclip")] == analysis.Hyperparameters(lr=0.1, scale=1.0)
    assert chosen[("t", "auto")] == analysis.Hyperparameters(lr=0.3, scale=None)


def test_select_breaks_ties_to_the_smaller_lr_then_the_smaller_scale():
    records = [
        _record("adaclip", 0, 0.8, lr=0.3, scale=0.01),
        _record("adaclip", 0, 0.8, lr=0.1, scale=1.0),
        _record("adaclip", 0, 0.8, lr=0.1, scale=0.1),
        _record("adaclip", 0, 0.7, lr=0.01, scale=0.001),
    ]
    for order in (records, records[::-1]):
        assert analysis.select(order)[("t", "adaclip")] == analysis.Hyperparameters(lr=0.1, scale=0.1)


# --- intervals and paired differences ------------------------------------------------------------------------------


def test_interval_is_the_student_t_interval_computed_by_hand():
    values = [81.0, 79.5, 83.25, 80.0]
    n = len(values)
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t.ppf(0.975, n - 1) * s / math.sqrt(n)  # 3.182 for 3 degrees of freedom
    assert student_t.ppf(0.975, 3) == pytest.approx(3.182446, abs=1e-6)
    value = analysis.interval(values)
    assert (value.mean, value.low, value.high, value.n) == (
        pytest.approx(mean),
        pytest.approx(mean - half),
        pytest.approx(mean + half),
        4,
    )
    assert value.half_width == pytest.approx(half)
    assert analysis.interval(values, confidence=0.9).half_width == pytest.approx(
        student_t.ppf(0.95, n - 1) * s / math.sqrt(n)
    )
    assert analysis.interval([2.5]) == analysis.Interval(2.5, 2.5, 2.5, 1)  # one seed: no interval
    assert analysis.format_interval(value) == f"{mean:.1f} ± {half:.1f}"
    assert analysis.format_interval(analysis.interval([2.5])) == "2.5"
    diverged = analysis.interval([1.0, float("nan")])
    assert math.isnan(diverged.mean) and math.isnan(diverged.low)  # a diverged seed is never averaged away
    with pytest.raises(ValueError, match="at least one value"):
        analysis.interval([])


def test_accuracy_summary_is_mean_and_interval_per_task_method_and_epsilon():
    accuracy = {0: 0.80, 1: 0.83, 2: 0.79}
    records = [_record("adaclip", s, a) for s, a in accuracy.items()]
    records += [_record("adaclip", s, 0.5 + 0.1 * s, epsilon=1.0) for s in range(3)]
    records += [_record("nonprivate", s, 0.9) for s in range(3)]
    summary = analysis.accuracy_summary(analysis.runs_frame(records))
    row = summary[(summary["method"] == "adaclip") & (summary["target_epsilon"] == 3.0)].iloc[0]
    expected = analysis.interval([100 * a for a in accuracy.values()])
    assert (row["mean"], row["low"], row["high"], row["seeds"]) == pytest.approx(
        (expected.mean, expected.low, expected.high, 3)
    )
    assert row["metric_name"] == "test accuracy (%)" and row["higher_is_better"]
    baseline = summary[summary["method"] == "nonprivate"].iloc[0]
    assert math.isnan(baseline["target_epsilon"]) and baseline["mean"] == pytest.approx(90.0)
    assert len(summary) == 3


def _paired_records(differences, *, mse=False, method="adaclip", base=0.7):
    records = []
    for seed, difference in enumerate(differences):
        seed_offset = 0.01 * seed * (-1) ** seed  # the seeds differ a lot more than the methods
        records.append(_record("fixed", seed, base + seed_offset, mse=mse))
        records.append(_record(method, seed, base + seed_offset + difference, mse=mse))
    return records


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    differences = [0.020, 0.031, 0.012, 0.025]
    frame = analysis.runs_frame(_paired_records(differences))
    row = analysis.paired_differences(frame).iloc[0]
    by_hand = [100 * d for d in differences]
    mean, s, n = statistics.mean(by_hand), statistics.stdev(by_hand), len(by_hand)
    half = student_t.ppf(0.975, n - 1) * s / math.sqrt(n)
    assert (row["task"], row["method"], row["target_epsilon"], row["seeds"]) == ("t", "adaclip", 3.0, 4)
    assert (row["difference"], row["low"], row["high"]) == pytest.approx((mean, mean - half, mean + half))
    assert row["verdict"] == "win"
    # unpaired, the seed-to-seed spread would hide the same differences: the pairing is what the interval uses
    assert row["high"] - row["low"] < 2 * statistics.stdev(frame[frame["method"] == "fixed"]["metric"])


@pytest.mark.parametrize(
    ("differences", "mse", "expected"),
    [
        ([0.02, 0.03, 0.025], False, "win"),
        ([-0.02, -0.03, -0.025], False, "loss"),
        ([0.05, -0.04, 0.01], False, "tie"),  # the interval covers 0
        ([0.02, 0.03, 0.025], True, "loss"),  # higher MSE is worse
        ([-0.02, -0.03, -0.025], True, "win"),
        ([0.05, -0.04, 0.01], True, "tie"),
        ([0.05], False, "tie"),  # one seed: no interval, never a win
        ([0.02, float("nan"), 0.025], False, "undefined"),  # a diverged seed is no evidence of a tie
    ],
)
def test_verdict_is_a_tie_when_the_interval_covers_zero_and_flips_for_mse(differences, mse, expected):
    frame = analysis.runs_frame(_paired_records(differences, mse=mse))
    assert analysis.paired_differences(frame)["verdict"].tolist() == [expected]


def test_verdict_at_the_interval_boundaries():
    assert analysis.verdict(analysis.Interval(1.0, 0.0, 2.0, 3), True) == "tie"  # 0 on the boundary: covered
    assert analysis.verdict(analysis.Interval(1.0, 1e-9, 2.0, 3), True) == "win"
    assert analysis.verdict(analysis.Interval(1.0, 1e-9, 2.0, 3), False) == "loss"
    assert analysis.verdict(analysis.Interval(-1.0, -2.0, -1e-9, 3), False) == "win"
    assert set(analysis.VERDICTS) == {"win", "loss", "tie", "undefined"}


# --- tuning cost ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores",
    [
        [3.0, 1.0, 2.0],
        [5.0, 5.0, 1.0, 7.0, 2.0, 2.0],
        [0.1, -4.0, 9.5, 3.25, 3.25, 8.0, -1.0],
        [-math.inf, 2.0, -math.inf, 4.0, 1.0],  # diverged cells
    ],
)
def test_expected_best_of_k_is_the_mean_best_over_every_k_subset(scores):
    for k in range(1, len(scores) + 1):
        subsets = list(itertools.combinations(scores, k))
        brute = sum(max(subset) for subset in subsets) / len(subsets)
        assert analysis.expected_best_of_k(scores, k) == pytest.approx(brute), k
    assert analysis.expected_best_of_k(scores, len(scores)) == max(scores)
    with pytest.raises(ValueError, match="k must lie in"):
        analysis.expected_best_of_k(scores, 0)


def _grid(values, *, mse=False, method="adaclip", seeds=(0,)):
    """Tuning records: ``values[(lr, scale)]`` is the validation metric of that cell."""
    return [
        _record(method, seed, value, lr=lr, scale=scale, mse=mse, val=value)
        for (lr, scale), value in values.items()
        for seed in seeds
    ]


def test_tuning_cost_counts_the_cells_within_one_point_of_the_best_accuracy():
    values = {(0.1, 0.1): 0.800, (0.1, 1.0): 0.7905, (1.0, 0.1): 0.789, (1.0, 1.0): 0.5}
    cost = analysis.tuning_cost(analysis.runs_frame(_grid(values)))
    row = cost.iloc[0]
    assert (row["task"], row["method"], row["cells"]) == ("t", "adaclip", 4)
    assert row["best"] == pytest.approx(80.0)
    assert row["share_near_best"] == pytest.approx(2 / 4)  # 80.0 and 79.05 (78.9 is 1.1 points below)
    scores = [100 * v for v in values.values()]
    assert row["tuning_curve"] == pytest.approx({k: analysis.expected_best_of_k(scores, k) for k in range(1, 5)})
    assert row["tuning_curve"][1] == pytest.approx(sum(scores) / 4)


def test_tuning_cost_for_mse_is_within_five_percent_of_the_lowest_and_a_diverged_cell_is_the_worst():
    values = {(0.1, 0.1): 0.40, (0.1, 1.0): 0.419, (1.0, 0.1): 0.421, (1.0, 1.0): float("nan")}
    row = analysis.tuning_cost(analysis.runs_frame(_grid(values, mse=True))).iloc[0]
    assert row["best"] == pytest.approx(0.40)
    assert row["share_near_best"] == pytest.approx(2 / 4)  # 0.419 <= 1.05 x 0.40 = 0.42 < 0.421; NaN is not near
    curve = row["tuning_curve"]
    assert curve[1] == math.inf  # one random cell can be the diverged one: no finite expectation
    by_hand = [0.40, 0.40, 0.40, 0.419, 0.419, 0.421]  # min over the 6 pairs, the diverged cell never the minimum
    assert curve[2] == pytest.approx(sum(by_hand) / 6)
    assert curve[4] == pytest.approx(0.40)


def test_tuning_grid_marks_a_cell_diverged_if_any_seed_diverged_and_gives_the_grid_lr():
    records = _grid({(16.0, 0.1): 0.8, (1.6, 1.0): 0.7}, method="fixed", seeds=(0, 1))
    records[1]["val_accuracy"] = float("nan")  # seed 1 of the first cell
    records += _grid({(0.5, 0.1): 0.6}, method="adaclip") + _grid({(0.5, None): 0.6}, method="auto")
    grid = analysis.tuning_grid(analysis.runs_frame(records)).set_index(["method", "lr"])
    assert math.isnan(grid.loc[("fixed", 16.0), "val_metric"])
    assert grid.loc[("fixed", 1.6), "val_metric"] == pytest.approx(70.0)
    # DP-SGD's grid axis is lr x C (the same step at both scales), the others' is lr
    assert grid.loc[("fixed", 16.0), "grid_lr"] == grid.loc[("fixed", 1.6), "grid_lr"] == 1.6
    assert grid.loc[("adaclip", 0.5), "grid_lr"] == 0.5 and grid.loc[("auto", 0.5), "grid_lr"] == 0.5
    assert math.isnan(grid.loc[("auto", 0.5), "scale"])


# --- size and diagnostics ------------------------------------------------------------------------------------------


def test_size_summary_pairs_each_method_with_dpsgd_at_the_same_n_in_the_metric_direction():
    records = []
    for n, gap in ((100, 0.05), (1000, -0.05)):
        for seed in range(3):
            base = 0.5 + 0.01 * seed
            records.append(_record("fixed", seed, base, mse=True, train_size=n))
            records.append(_record("adaclip", seed, base + gap + 0.001 * seed, mse=True, train_size=n))
    summary = analysis.size_summary(analysis.runs_frame(records)).set_index(["method", "train_size"])
    small, large = summary.loc[("adaclip", 100)], summary.loc[("adaclip", 1000)]
    gaps = [0.05 + 0.001 * s for s in range(3)]
    assert small["gap"] == pytest.approx(statistics.mean(gaps)) and small["gap_seeds"] == 3
    assert small["verdict"] == "loss" and large["verdict"] == "win"  # MSE: a positive gap is worse
    assert summary.loc[("fixed", 100), "mean"] == pytest.approx(0.51) and summary.loc[("fixed", 100), "seeds"] == 3
    assert pd.isna(summary.loc[("fixed", 100), "verdict"])


def test_diagnostics_summary_is_the_mean_over_steps_skipping_undefined_steps():
    def record(method, task, stats):
        return {"config": {"task": task}, "dataset": "d", "method": method, "step_stats": stats}

    records = [
        record("adaclip", "b", {"snr": [1.0, 3.0, None], "heterogeneity": [0.5, 0.7], "shape_saving": [0.1, 0.3]}),
        record("fixed", "b", {"snr": [2.0], "heterogeneity": [0.4]}),
        record("fixed", "a", {"snr": [None]}),
    ]
    table = analysis.diagnostics_summary(records)
    assert list(zip(table["task"], table["method"], strict=True)) == [("a", "fixed"), ("b", "fixed"), ("b", "adaclip")]
    adaclip = table[table["method"] == "adaclip"].iloc[0]
    assert (adaclip["snr"], adaclip["heterogeneity"], adaclip["shape_saving"]) == pytest.approx((2.0, 0.6, 0.2))
    assert math.isnan(table.iloc[0]["snr"]) and math.isnan(table.iloc[1]["shape_saving"])
    series = analysis.step_series(records, "snr")
    assert series[series["method"] == "adaclip"]["step"].tolist() == [1, 2, 3]


def test_wide_puts_methods_in_report_order():
    long = pd.DataFrame(
        {"method": ["quantile", "fixed", "adaclip", "fixed"], "step": [1, 1, 1, 2], "value": [1.0, 2.0, 3.0, 4.0]}
    )
    table = analysis.wide(long, "step")
    assert list(table.columns) == ["step", "fixed", "adaclip", "quantile"]
    assert table["fixed"].tolist() == [2.0, 4.0]
