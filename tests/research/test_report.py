"""The generated report: findings whose every number is read from the summary, which never call a tie a win."""

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from adaclip.research import analysis, report
from adaclip.research.report import QUESTIONS, findings, headline_metrics, render_readme, source_of

ROOT = Path(__file__).resolve().parents[2]


def _versus(difference, low, high, verdict, seeds=3):
    return {"difference": difference, "low": low, "high": high, "seeds": seeds, "verdict": verdict}


def _cell(mean, low, high, seeds=3, versus=None):
    cell = {"mean": mean, "low": low, "high": high, "seeds": seeds}
    return cell if versus is None else {**cell, "vs_dpsgd": versus}


SUMMARY = {
    "profile": "quick",
    "privacy": {"delta": 1e-5, "accountant": "prv", "main_epsilon": 3.0},
    "main_task": "scatternet",
    "size_task": "scatternet",
    "higher_is_better": {"scatternet": True, "diabetes": False},
    "diagnostics": {
        "scatternet": {
            "fixed": {
                "snr": 0.0371,
                "cosine_release": 0.183,
                "cosine_noise_free": 0.912,
                "parameter_noise": 0.1234,
                "heterogeneity": 0.81,
                "shape_saving": None,
            },
            "adaclip": {
                "snr": 0.0362,
                "cosine_release": 0.171,
                "cosine_noise_free": 0.874,
                "parameter_noise": 0.0217,
                "heterogeneity": 0.86,
                "shape_saving": 0.0625,
            },
        },
        "diabetes": {
            "fixed": {
                "snr": 2.5,
                "cosine_release": 0.5,
                "cosine_noise_free": 0.9,
                "parameter_noise": 0.01,
                "heterogeneity": 0.64,
                "shape_saving": None,
            }
        },
    },
    "theory": {"dim": 100, "noise_power_ratio": {"1": 1.0, "1000": 0.29}},
    "tuning": {
        "scatternet": {
            "fixed": {
                "cells": 9,
                "best": 89.37,
                "share_near_best": 0.444,
                "expected_best_of_1": 80.25,
                "lr": 16.0,
                "scale": 0.1,
            },
            "auto": {"cells": 3, "best": 88.9, "share_near_best": 1 / 3, "expected_best_of_1": 70.5, "lr": 1.6},
            "nonprivate": {"cells": 9, "best": 91.0, "share_near_best": 0.5, "expected_best_of_1": 85.0, "lr": 1.0},
        }
    },
    "accuracy": {
        "scatternet": {
            "metric": "test accuracy (%)",
            "higher_is_better": True,
            "by_epsilon": {
                "3": {
                    "fixed": _cell(89.37, 89.12, 89.62),
                    "adaclip": _cell(88.91, 88.5, 89.32, versus=_versus(-0.46, -0.81, -0.11, "loss")),
                    "auto": _cell(89.45, 89.1, 89.8, versus=_versus(0.08, -0.21, 0.37, "tie")),
                    "psac": _cell(89.6, 89.5, 89.7, versus=_versus(0.23, 0.12, 0.34, "win")),
                },
                "1": {"fixed": _cell(86.0, 85.5, 86.5), "adaclip": _cell(85.0, 84.0, 86.0)},
            },
            "nonprivate": _cell(91.23, 91.0, 91.46),
        },
        "diabetes": {
            "metric": "test MSE",
            "higher_is_better": False,
            "by_epsilon": {
                "3": {
                    "fixed": _cell(0.612, 0.6, 0.624),
                    "adaclip": _cell(0.587, 0.58, 0.594, versus=_versus(-0.025, -0.031, -0.019, "win")),
                    "quantile": _cell(0.655, 0.64, 0.67, versus=_versus(0.043, 0.031, 0.055, "loss")),
                    "auto": _cell(0.6, 0.55, 0.65, versus=_versus(-0.012, -0.05, 0.026, "tie")),
                }
            },
            "nonprivate": _cell(0.5, 0.49, 0.51),
        },
    },
    "anchors": {
        "published": [
            {"model": "ScatterNet + linear, DP-SGD", "reference": "T&B", "accuracy": 89.7, "accountant": "RDP"},
        ],
        "ours": {
            "task": "scatternet",
            "dataset": "fashion-mnist-scatternet",
            "model": "logistic",
            "mean": 89.37,
            "low": 89.12,
            "high": 89.62,
            "seeds": 3,
            "epsilon": 2.99,
            "accountant": "prv",
            "epsilon_rdp": 3.41,
            "noise_multiplier": 2.97,
            "epochs": 30,
            "batch_size": 8192,
            "train_size": 55000,
        },
    },
    "size": {
        "fixed": {"1000": _cell(70.0, 69.0, 71.0), "30000": _cell(88.0, 87.5, 88.5)},
        "adaclip": {
            "1000": {**_cell(72.5, 71.0, 74.0), "gap": 2.5, "gap_low": 1.25, "gap_high": 3.75, "gap_seeds": 3},
            "30000": {**_cell(87.0, 86.0, 88.0), "gap": -1.0, "gap_low": -2.5, "gap_high": 0.5, "gap_seeds": 3},
        },
    },
    "compute": {
        "mlp/B=64": {
            "nonprivate/-": {"ratio_to_nonprivate": 1.0, "spread": 0.0, "unstable": False},
            "adaclip/fast": {"ratio_to_nonprivate": 9.0, "spread": 0.04, "unstable": False},
            "fixed/fast": {"ratio_to_nonprivate": 3.0, "spread": 0.06, "unstable": False},
            "auto/fast": {"ratio_to_nonprivate": 1.2, "spread": 0.3, "unstable": True},
            "opacus/hooks": {"ratio_to_nonprivate": 12.0, "spread": 0.05, "unstable": False},
            "opacus/ghost": {"ratio_to_nonprivate": 4.5, "spread": 0.5, "unstable": True},
        },
        "mlp/B=600": {"fixed/fast": {"ratio_to_nonprivate": 1.4, "spread": 0.2, "unstable": True}},
    },
    "audit": {
        "fixed": {"kind": "rule", "passed": True, "theoretical_epsilon": 3.0, "lower_bound": 0.5},
        "adaclip (optimizer)": {"kind": "optimizer", "passed": True, "theoretical_epsilon": 6.0, "lower_bound": 1.5},
        "control: no clipping": {"kind": "control", "passed": False, "theoretical_epsilon": 3.0, "lower_bound": 4.0},
        "control: noise halved": {"kind": "control", "passed": True, "theoretical_epsilon": 3.0, "lower_bound": 1.0},
    },
}


def _clause(text, method):
    """The part of the accuracy sentence about ``method`` (up to the next method's clause)."""
    start = text.index(f"{analysis.label(method)} ")
    return text[start : text.find(";", start) if ";" in text[start:] else None]


def test_a_tie_is_never_called_a_win_and_the_words_follow_the_interval():
    text = findings(SUMMARY)["accuracy"]
    assert "AdaCliP 88.9 ± 0.4 % (-0.5 [-0.8, -0.1], worse than DP-SGD)" in text
    assert "AUTO-S 89.5 ± 0.4 % (+0.1 [-0.2, +0.4], a tie with DP-SGD)" in text
    assert "DP-PSAC 89.6 ± 0.1 % (+0.2 [+0.1, +0.3], better than DP-SGD)" in text
    # MSE: lower is better, so a negative difference whose interval excludes 0 is the better one
    assert "AdaCliP 0.587 ± 0.007 (-0.025 [-0.031, -0.019], better than DP-SGD)" in text
    assert "quantile clipping 0.655 ± 0.015 (+0.043 [+0.031, +0.055], worse than DP-SGD)" in text
    assert "AUTO-S 0.600 ± 0.050 (-0.012 [-0.050, +0.026], a tie with DP-SGD)" in text
    assert "diabetes: DP-SGD 0.612 ± 0.012" in text and "non-private 0.500 ± 0.010" in text


@pytest.mark.parametrize(
    ("low", "high", "seeds", "stored", "words"),
    [
        (-0.2, 0.6, 3, "win", "a tie with"),  # a stored "win" whose interval covers 0 is still a tie
        (0.0, 0.6, 3, "win", "a tie with"),  # 0 on the boundary is covered
        (0.1, 0.6, 1, "win", "a tie with"),  # one seed: no interval
        (0.1, 0.6, 3, "tie", "better than"),
        (-0.6, -0.1, 3, "win", "worse than"),
        (None, None, 3, "undefined", "no verdict against"),  # a diverged seed: no finite interval
    ],
)
def test_the_verdict_words_are_decided_from_the_printed_interval(low, high, seeds, stored, words):
    summary = copy.deepcopy(SUMMARY)
    cell = summary["accuracy"]["scatternet"]["by_epsilon"]["3"]["auto"]
    cell["vs_dpsgd"] = _versus(None if low is None else (low + high) / 2, low, high, stored, seeds)
    clause = _clause(findings(summary)["accuracy"], "auto")
    assert clause.endswith(f"{words} DP-SGD)"), clause
    if low is None:
        assert "undefined [undefined, undefined]" in clause


def test_size_finding_pairs_with_dpsgd_and_says_tie_when_the_gap_covers_zero():
    text = findings(SUMMARY)["size"]
    assert "+2.5 [+1.2, +3.8] points at n = 1000 (better than DP-SGD)" in text
    assert "-1.0 [-2.5, +0.5] points at n = 30000 (a tie with DP-SGD)" in text
    summary = copy.deepcopy(SUMMARY)
    summary["size_task"] = "diabetes"  # MSE: a positive gap is worse, and no "points"
    assert "+2.500 [+1.250, +3.750] at n = 1000 (worse than DP-SGD)" in findings(summary)["size"]


def test_the_noise_finding_states_the_comparable_units_and_adaclips_own_bound():
    text = findings(SUMMARY)["noise"]
    assert "DP-SGD (fixed C) 0.0371, AdaCliP 0.0362" in text  # SNR, report order, 3 significant digits
    assert "DP-SGD (fixed C) 0.91/0.18, AdaCliP 0.87/0.17" in text  # noise-free / release cosines
    assert "DP-SGD (fixed C) 0.123, AdaCliP 0.0217" in text  # lr^2 E||noise||^2
    # AdaCliP's saving is set against 1 - h of its own run (0.86), not DP-SGD's (0.81)
    assert "scatternet: h = 0.86, at most 14 % to gain; AdaCliP's b saved 6 %" in text
    assert "diabetes: h = 0.64, at most 36 % to gain" in text
    assert "spreads over a factor 1000 would allow the optimal transform 0.29× DP-SGD's noise power" in text


def test_the_compute_finding_quotes_only_stable_benchmark_cells():
    text = findings(SUMMARY)["compute"]
    # AUTO-S (1.2x) and Opacus ghost are unstable: the range runs from DP-SGD, and ghost clipping is not quoted
    assert "mlp/B=64: 3.00× (DP-SGD (fixed C)) to 9.00× (AdaCliP) on the fast path (opacus/hooks 12.00×)" in text
    assert "1.20×" not in text and "ghost" not in text and "4.50×" not in text
    assert "mlp/B=600" not in text and "1.40×" not in text  # no stable cell at B = 600
    assert "3 unstable cell(s) not quoted" in text  # the two at B = 64 and the one at B = 600
    summary = copy.deepcopy(SUMMARY)
    del summary["compute"]["mlp/B=600"]
    summary["compute"]["mlp/B=64"] = {
        n: {**r, "unstable": True} for n, r in summary["compute"]["mlp/B=64"].items() if n != "nonprivate/-"
    }
    assert "no stable cell. 5 unstable cell(s) not quoted" in findings(summary)["compute"]


def test_summarise_takes_each_benchmark_cells_pooled_ratio_and_flag():
    cell = {"ratio": 2.5, "q1": 2.0, "q3": 3.0, "spread": 0.4, "rounds": 6, "unstable": True}
    rows = [
        {
            "model": "mlp",
            "batch_size": 64,
            "method": "auto",
            "path": "fast",
            "run": run,
            "cell": cell,
            "ratio_to_nonprivate": ratio,
            "step_time_s": step,
            "examples_per_s": 64 / step,
        }
        for run, ratio, step in ((1, 2.0, 0.002), (2, 3.0, 0.004))
    ]
    compute = report._compute(rows)
    assert compute == {
        "mlp/B=64": {
            "auto/fast": {
                "ratio_to_nonprivate": 2.5,  # the pooled median, not the mean of the runs' medians
                "spread": 0.4,
                "unstable": True,
                "step_time_s": pytest.approx(0.003),
                "examples_per_s": pytest.approx((32000 + 16000) / 2),
            }
        }
    }


def test_the_tuning_finding_reads_the_grid_and_its_metric():
    text = findings(SUMMARY)["tuning"]
    assert "within 1 point of each method's best validation accuracy" in text
    assert "DP-SGD (fixed C) 44 % of 9 cells (best 89.4, one random cell 80.2 expected)" in text
    assert "AUTO-S 33 % of 3 cells" in text and "non-private" not in text
    summary = copy.deepcopy(SUMMARY)
    summary["tuning"]["scatternet"]["fixed"]["expected_best_of_1"] = None  # a diverged cell: infinite expectation
    assert "one random cell undefined: a random cell can diverge" in findings(summary)["tuning"]
    summary["higher_is_better"]["scatternet"] = False  # the task's direction, even where no accuracy runs are read
    del summary["accuracy"]["scatternet"]
    assert "within 5 % of each method's best validation MSE" in findings(summary)["tuning"]


def test_the_anchor_finding_names_our_task_and_both_accountants():
    text = findings(SUMMARY)["anchors"]
    assert text.startswith("Our DP-SGD on scatternet (logistic model, fashion-mnist-scatternet) reached 89.4 ± 0.2 %")
    assert "PRV ε = 2.99 (RDP ε = 3.41 for the same run; σ = 2.97, 30 epochs, B = 8192, N = 55000)" in text
    assert "ScatterNet + linear, DP-SGD 89.7 % (T&B, RDP)" in text


# every numeric leaf of the summary that the findings state: perturbing it must change the text
NOT_STATED = {
    "theory.dim",
    "theory.noise_power_ratio.1",  # only the widest spread is quoted
    "tuning.scatternet.fixed.lr",  # the chosen cell is in the tuning table, not the sentence
    "tuning.scatternet.fixed.scale",
    "tuning.scatternet.auto.lr",
    "tuning.scatternet.nonprivate",  # the baseline's grid is in the table
    "diagnostics.scatternet.fixed.heterogeneity",  # AdaCliP's own run's h is quoted
    "diagnostics.diabetes.fixed.snr",  # only the main task's release statistics are quoted
    "diagnostics.diabetes.fixed.cosine",
    "diagnostics.diabetes.fixed.parameter_noise",
    "accuracy.scatternet.by_epsilon.1",  # only the main epsilon is quoted
    "size.fixed",  # the finding quotes AdaCliP's gap to DP-SGD
    "compute.mlp/B=64.nonprivate/-",  # the reference of every ratio
    "compute.mlp/B=64.auto/fast",  # unstable cells are not quoted
    "compute.mlp/B=64.opacus/ghost",
    "compute.mlp/B=600",
    "compute.mlp/B=64.adaclip/fast.spread",  # spreads are in the table; the sentence quotes stable cells only
    "compute.mlp/B=64.fixed/fast.spread",
    "compute.mlp/B=64.opacus/hooks.spread",
    "size.adaclip.1000.mean",
    "size.adaclip.1000.low",
    "size.adaclip.1000.high",
    "size.adaclip.30000.mean",
    "size.adaclip.30000.low",
    "size.adaclip.30000.high",
    "audit.fixed",  # the audit quotes the tightest bound (adaclip's) and counts the others
    "audit.control",
}


def _numeric_leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numeric_leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _numeric_leaves(value, f"{prefix}[{index}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix


def _set(tree, path, value):
    keys = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    for key in keys[:-1]:
        tree = tree[int(key[1:-1])] if key.startswith("[") else tree[key]
    last = keys[-1]
    if last.startswith("["):
        tree[int(last[1:-1])] = value
    else:
        tree[last] = value


def _get(tree, path):
    for key in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        tree = tree[int(key[1:-1])] if key.startswith("[") else tree[key]
    return tree


def test_every_stated_number_comes_from_the_summary():
    before = findings(SUMMARY)
    stated = [
        p
        for p in _numeric_leaves(SUMMARY)
        if not any(p.startswith(n) for n in NOT_STATED) and not p.endswith("seeds")  # counts decide the format only
    ]
    assert len(stated) > 60
    for path in stated:
        summary = copy.deepcopy(SUMMARY)
        value = _get(summary, path)
        # a visible change at every precision the report uses, keeping the sign and intervals in order
        _set(summary, path, value + 7 if isinstance(value, int) else value * 1.37 + 0.0731 * (1 if value >= 0 else -1))
        assert findings(summary) != before, f"{path} is not stated in any finding"


def test_perturbing_a_summary_value_changes_exactly_that_number_in_the_sentence():
    summary = copy.deepcopy(SUMMARY)
    summary["accuracy"]["scatternet"]["by_epsilon"]["3"]["psac"]["mean"] = 90.84
    summary["diagnostics"]["scatternet"]["adaclip"]["snr"] = 0.0518
    found = findings(summary)
    assert "DP-PSAC 90.8 ± 0.1 %" in found["accuracy"] and "DP-PSAC 89.6" not in found["accuracy"]
    assert "AdaCliP 0.0518" in found["noise"] and "0.0362" not in found["noise"]


def test_a_section_without_its_data_is_left_out():
    summary = {k: v for k, v in SUMMARY.items() if k not in ("audit", "compute")}
    found = findings(summary)
    assert "audit" not in found and "compute" not in found and "accuracy" in found
    text = render_readme(summary, {})
    assert "privacy audit" not in text and "What does it cost in compute" not in text


def _stage_outputs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outputs = {}
    for name, stage in stages.items():
        outputs[name] = {next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])}
    return stages, outputs


def test_each_question_names_files_its_stage_writes():
    stages, outputs = _stage_outputs()
    for key, _title, figures, notebook, table in QUESTIONS:
        stage = re.search(r"\(stage `([^`]+)`\)", source_of(notebook)).group(1)
        assert stage in stages, (key, stage)
        if notebook != "bench":
            assert f"notebooks/{notebook}.ipynb" in stages[stage]["cmd"], (key, stage)
        for path in [f"{stem}.png" for stem in figures] + [table]:
            assert f"reports/{path}" in outputs[stage], (key, path)


def test_readme_links_only_files_listed_in_questions():
    tables = {"tables/accounting.md": "| a |\n|---|\n| 1 |\n"}
    text = render_readme(SUMMARY, tables)
    listed = {f"{stem}.png" for _, _, figures, _, _ in QUESTIONS for stem in figures}
    listed |= {table for *_, table in QUESTIONS}
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links and set(links) <= listed, set(links) - listed
    for key, title, figures, _, table in QUESTIONS:
        if key in findings(SUMMARY) or table in tables:
            assert f"## {title}" in text and all(f"({stem}.png)" in text for stem in figures)
    assert "| 1 |" in text and "`quick` profile" in text
    assert "stage `tuning_cost`" in text  # the tuning notebook's stage (`tuning` is the sweep)


def test_headline_metrics_are_method_keyed_tables_from_the_summary():
    metrics = headline_metrics(SUMMARY)
    assert metrics["q3_scatternet_eps3"] == {
        "fixed": 89.37,
        "adaclip": 88.91,
        "auto": 89.45,
        "psac": 89.6,
        "nonprivate": 91.23,
    }
    assert metrics["q3_diabetes_eps3"]["adaclip"] == 0.587
    assert metrics["q2_scatternet_share_near_best"] == {"fixed": 0.444, "auto": 0.33333, "nonprivate": 0.5}
    assert metrics["q1_scatternet_snr"] == {"fixed": 0.0371, "adaclip": 0.0362}
    assert metrics["q4_n1000"] == {"fixed": 70.0, "adaclip": 72.5}


def test_clean_makes_the_summary_json_safe():
    cleaned = report._clean({("t", "m"): [float("nan"), float("inf"), -float("inf"), 1.5, True, 2]})
    assert cleaned == {"t/m": [None, None, None, 1.5, True, 2]}


def _run(task, method, seed, accuracy, *, epsilon=3.0, lr=0.1, scale=None, n=55000, batch=8192, stats=None):
    parameter = {"fixed": "clip_norm", "adaclip": "initial_clip"}.get(method)
    return {
        "config": {"task": task, "lr": lr, "batch_size": batch, "epochs": 30},
        "dataset": "fashion-mnist-scatternet",
        "model": "logistic",
        "method": method,
        "seed": seed,
        "target_epsilon": None if method == "nonprivate" else epsilon,
        "epsilon": None if method == "nonprivate" else 0.998 * epsilon,
        "delta": 1e-5,
        "accountant": "prv",
        "noise_multiplier": None if method == "nonprivate" else 2.97,
        "method_params": {} if scale is None else {parameter: scale},
        "train_size": n,
        "steps": 30 * int(n / batch),
        "test_accuracy": accuracy,
        "val_accuracy": accuracy,
        "step_stats_mean": {},
        "step_stats": stats or {},
    }


def test_summarise_turns_the_records_into_the_numbers_the_findings_state():
    from adaclip.privacy.accounting import epsilon
    from adaclip.research.params import load_params
    from adaclip.research.report import summarise

    params = load_params(ROOT / "params.yaml")  # main task: ScatterNet + linear, as the anchors
    gaps = {0: 0.004, 1: 0.006, 2: 0.005}
    accuracy = []
    for seed, gap in gaps.items():
        base = 0.89 + 0.002 * seed
        accuracy += [_run("scatternet", "fixed", seed, base), _run("scatternet", "adaclip", seed, base + gap)]
        accuracy += [_run("scatternet", "nonprivate", seed, 0.91)]
    size = [
        _run("scatternet", m, seed, 0.80 + (0.01 if m == "adaclip" else 0), n=1000, batch=149)
        for m in ("fixed", "adaclip")
        for seed in gaps
    ]
    tuning = [
        _run("scatternet", "fixed", 0, 0.85, lr=16.0, scale=0.1),
        _run("scatternet", "fixed", 0, 0.87, lr=1.6, scale=1.0),
        _run("scatternet", "adaclip", 0, 0.86, lr=0.1, scale=0.1),
        {**_run("scatternet", "adaclip", 0, 0.0, lr=0.3, scale=0.1), "val_accuracy": float("nan")},
    ]
    stats = {"snr": [0.5, 0.7], "cosine_release": [0.1, 0.3], "heterogeneity": [0.8, 0.9], "shape_saving": [0.05, 0.1]}
    diagnostics = [_run("scatternet", m, 0, 0.9, stats=stats) for m in ("adaclip", "adambc")]
    summary = summarise(params, {"tuning": tuning, "accuracy": accuracy, "size": size, "diagnostics": diagnostics})
    json.dumps(summary, allow_nan=False)  # NaN and infinities became null
    cell = summary["accuracy"]["scatternet"]["by_epsilon"]["3"]["adaclip"]
    assert cell["vs_dpsgd"]["difference"] == pytest.approx(100 * sum(gaps.values()) / 3)
    assert cell["vs_dpsgd"]["verdict"] == "win" and cell["vs_dpsgd"]["seeds"] == 3
    assert summary["accuracy"]["scatternet"]["nonprivate"]["mean"] == pytest.approx(91.0)
    ours = summary["anchors"]["ours"]
    assert ours["epsilon_rdp"] == epsilon(
        noise_multiplier=2.97, sample_rate=8192 / 55000, steps=30 * 6, delta=1e-5, accountant="rdp"
    )
    assert ours["mean"] == pytest.approx(89.2) and ours["task"] == "scatternet"
    assert set(summary["size"]["adaclip"]) == {"1000", "55000"}  # n = N is the accuracy sweep's run
    assert summary["size"]["adaclip"]["1000"]["gap"] == pytest.approx(1.0)
    tuned = summary["tuning"]["scatternet"]
    assert (tuned["fixed"]["lr"], tuned["fixed"]["scale"], tuned["fixed"]["best"]) == (1.6, 1.0, pytest.approx(87.0))
    assert tuned["adaclip"]["expected_best_of_1"] is None  # a random cell can be the diverged one
    assert summary["diagnostics"]["scatternet"]["adaclip"]["snr"] == pytest.approx(0.6)
    assert summary["diagnostics"]["scatternet"]["adambc"]["snr"] is None  # an Adam step: no comparable SNR
    assert "better than DP-SGD" in findings(summary)["accuracy"]
    tiny = load_params(ROOT / "tests" / "fixtures" / "params-tiny.yaml")  # main task breast cancer: no anchor
    relabelled = [{**r, "config": {**r["config"], "task": "breast-cancer"}} for r in accuracy]
    assert "ours" not in report._anchors(relabelled, tiny)
    assert "ours" in report._anchors(accuracy, params)
    # a notebook states its own question's finding from the one sweep it reads
    alone = summarise(params, {"accuracy": accuracy})
    assert alone["accuracy"] == summary["accuracy"] and alone["tuning"] == alone["size"] == alone["diagnostics"] == {}
    closing = report.finding_markdown(alone, "accuracy", "size")
    assert closing == (
        f"**{QUESTIONS[2].title}** {findings(summary)['accuracy']}\n\n"
        f"**4. How much data?** The runs this notebook reads hold nothing for it."
    )
    with pytest.raises(ValueError, match="keys must be among the questions with a writer"):
        report.finding_markdown(alone, "accounting")


def test_the_accounting_finding_reads_the_last_step_of_each_accountant():
    import pandas as pd

    curve = pd.DataFrame({"steps": [1, 100], "rdp": [0.5, 3.3], "prv": [0.4, 3.0], "pld": [0.4, 3.0]})
    text = report.accounting_finding(curve, ["rdp", "prv", "pld"])
    assert "After 100 steps: RDP 3.300 (1.10×), PRV 3.000 (1.00×), PLD 3.000 (1.00×)" in text


def test_every_finding_has_a_question_and_a_writer_of_its_own():
    keys = [question.key for question in QUESTIONS]
    assert len(set(keys)) == len(keys) and set(report.WRITERS) <= set(keys)
    assert len(set(report.WRITERS.values())) == len(report.WRITERS)
    assert set(findings(SUMMARY)) == set(report.WRITERS) - {"heterogeneity"}  # SUMMARY has no heterogeneity tasks


def test_the_committed_report_is_what_the_committed_summary_renders():
    # the README the report stage wrote from the committed summary and tables, byte for byte
    reports = ROOT / "reports"
    summary = json.loads((reports / "summary.json").read_text())
    inline = ("tables/audit.md", "tables/accounting.md", "tables/anchors.md")
    tables = {t: (reports / t).read_text() for t in inline if (reports / t).exists()}
    assert render_readme(summary, tables) == (reports / "README.md").read_text()


def test_the_packaged_anchors_are_read_and_checked():
    anchors = report.load_anchors()
    assert [(a.reference, a.accuracy) for a in anchors[:2]] == [
        ("Tramèr & Boneh 2021", 86.0),
        ("Tramèr & Boneh 2021", 89.7),
    ]
    assert all(isinstance(a.accuracy, float) and a.accountant == "RDP" for a in anchors)
    assert anchors == report.ANCHORS


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"accuracy": 186.0}, r"anchor 0: accuracy must lie in \[0, 100\]"),
        ({"accuracy": True}, r"anchor 0: accuracy must lie in"),
        ({"accountant": "moments"}, r"anchor 0: accountant must be one of \['RDP', 'PRV', 'PLD'\]"),
        ({"note": ""}, r"anchor 0: note must be a non-empty text"),
        ({"year": 2021}, r"anchor 0 must have exactly the fields"),
    ],
)
def test_a_bad_anchors_file_is_refused_with_the_entry_and_field(tmp_path, entry, message):
    good = {"model": "m", "reference": "r", "accuracy": 86.0, "accountant": "RDP", "note": "n"}
    path = tmp_path / "anchors.yaml"
    path.write_text(yaml.safe_dump([{**good, **entry}]))
    with pytest.raises(ValueError, match=message):
        report.load_anchors(path)
    path.write_text("{}\n")
    with pytest.raises(ValueError, match="non-empty list of anchors"):
        report.load_anchors(path)
