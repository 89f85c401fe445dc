"""Records to tables: grouping, the flat-region rule, the accuracy table."""

import math

import pandas as pd
import pytest

from adaclip.methods import METHODS
from adaclip.research import analysis


def _record(method, seed, accuracy, *, epsilon=3.0, clip=None, dataset="d"):
    params = {} if clip is None else {METHODS[method].scale_parameter: clip}
    return {
        "config": {"lr": 0.1, "batch_size": 10, "epochs": 1},
        "dataset": dataset,
        "model": "logistic",
        "method": method,
        "seed": seed,
        "target_epsilon": None if method == "nonprivate" else epsilon,
        "epsilon": None,
        "delta": 1e-5,
        "accountant": "prv",
        "noise_multiplier": 1.0,
        "method_params": params,
        "train_size": 100,
        "test_accuracy": accuracy,
        "val_accuracy": accuracy,
        "wall_time_s": 1.0,
        "steps": 10,
        "step_stats_mean": {"noise_power": 2.0, "clipped_fraction": 0.5},
    }


def test_flat_region_is_the_contiguous_run_within_tolerance_of_the_best():
    curve = {0.01: 0.50, 0.1: 0.795, 1.0: 0.80, 10.0: 0.792, 100.0: 0.60, 1000.0: 0.80}  # last point is not contiguous
    frame = analysis.runs_frame([_record("fixed", 0, acc, clip=c) for c, acc in curve.items()])
    region = analysis.flat_region(frame).iloc[0]
    assert (region.best_clip, region.flat_low, region.flat_high) == (1.0, 0.1, 10.0)
    assert region.decades == pytest.approx(2.0)
    assert region.best_metric == pytest.approx(80.0) and region.worst_metric == pytest.approx(50.0)
    assert region.grid_decades == pytest.approx(5.0)


def test_accuracy_table_gives_mean_and_sample_std_per_epsilon_with_the_baseline():
    records = [
        _record("adaclip", 0, 0.80),
        _record("adaclip", 1, 0.82),
        _record("adaclip", 0, 0.70, epsilon=1.0),
        _record("adaclip", 1, 0.70, epsilon=1.0),
    ]
    records += [_record("nonprivate", 0, 0.90), _record("nonprivate", 1, 0.90)]
    header, rows = analysis.accuracy_table(analysis.runs_frame(records))
    assert header == ["dataset", "metric", "method", "ε = 1", "ε = 3", "non-private"]
    std = math.sqrt(((80 - 81) ** 2 + (82 - 81) ** 2) / 1)  # ddof 1 over the two seeds
    assert rows == [["d", "test accuracy (%)", "AdaCliP", "70.0 ± 0.0", f"81.0 ± {std:.1f}", "90.0 ± 0.0"]]


def test_best_private_method_respects_the_metric_direction():
    records = [_record("fixed", 0, 0.7), _record("adaclip", 0, 0.8)]
    frame = analysis.runs_frame(records)
    assert analysis.best_private_method(frame, "d", 3.0) == ("adaclip", pytest.approx(80.0))
    frame["higher_is_better"] = False
    assert analysis.best_private_method(frame, "d", 3.0)[0] == "fixed"
    with pytest.raises(ValueError, match="no runs for d at epsilon = 8"):
        analysis.best_private_method(frame, "d", 8.0)


def test_wide_puts_methods_in_report_order():
    long = pd.DataFrame(
        {"method": ["quantile", "fixed", "adaclip", "fixed"], "step": [1, 1, 1, 2], "value": [1.0, 2.0, 3.0, 4.0]}
    )
    table = analysis.wide(long, "step")
    assert list(table.columns) == ["step", "fixed", "adaclip", "quantile"]
    assert table["fixed"].tolist() == [2.0, 4.0]
