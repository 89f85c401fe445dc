"""The report's numbers and its generated ``reports/README.md``.

:func:`summarise` turns the sweeps' records (and the benchmark's and audit's results) into one
JSON-ready summary; :func:`headline_metrics` picks from it the small ``{method: value}`` files that
``dvc metrics show`` prints as a question x method table; :func:`findings` writes each question's
answer as sentences whose every number comes from the summary, and which call a difference a win or
a loss only when its 95 % interval excludes zero (a "tie" otherwise); :func:`render_readme` assembles
``reports/README.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from adaclip._validate import require_in_range, require_one_of
from adaclip.methods import METHODS, NONPRIVATE
from adaclip.privacy.accounting import epsilon as epsilon_of
from adaclip.research import analysis
from adaclip.research.datasets import dataset_spec, load_dataset
from adaclip.research.params import Params
from adaclip.research.records import load_yaml
from adaclip.research.theory import dpsgd_noise_power, log_spaced_std, optimal_noise_power


@dataclass(frozen=True)
class Anchor:
    """A published Fashion-MNIST result at epsilon = 3, delta = 1e-5."""

    model: str
    reference: str
    accuracy: float
    accountant: str
    note: str


ANCHORS_FILE = Path(__file__).with_name("anchors.yaml")
"""The published anchors, package data beside this module."""


def load_anchors(path: str | os.PathLike[str] = ANCHORS_FILE) -> tuple[Anchor, ...]:
    """The anchors listed in ``path``, each checked: exactly :class:`Anchor`'s fields, text where text is due,
    an accuracy in [0, 100] % and an accountant the library knows (RDP, PRV, PLD)."""
    entries = load_yaml(path)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: must hold a non-empty list of anchors, got {entries!r}")
    names = [f.name for f in fields(Anchor)]
    anchors = []
    for index, entry in enumerate(entries):
        where = f"{path}: anchor {index}"
        if not isinstance(entry, dict) or sorted(entry) != sorted(names):
            raise ValueError(f"{where} must have exactly the fields {names}, got {entry!r}")
        for name in ("model", "reference", "note"):
            if not isinstance(entry[name], str) or not entry[name]:
                raise ValueError(f"{where}: {name} must be a non-empty text, got {entry[name]!r}")
        accuracy = require_in_range(f"{where}: accuracy", entry["accuracy"], 0, 100, closed_high=True)
        accountant = require_one_of(f"{where}: accountant", entry["accountant"], ("RDP", "PRV", "PLD"))
        anchors.append(Anchor(entry["model"], entry["reference"], accuracy, accountant, entry["note"]))
    return tuple(anchors)


ANCHORS = load_anchors()
"""Published numbers the report sets ours beside (each with the accountant its authors used)."""


def mean_prediction_mse(params: Params, task: str) -> float:
    """Test MSE of predicting the training targets' mean: the reference line a regression must beat."""
    settings = params.task(task)
    splits = load_dataset(settings.dataset, seed=0, train_size=settings.train_size)
    mean = splits.train.tensors[1].float().mean()
    return float((splits.test.tensors[1].float() - mean).square().mean())


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN and infinities to None (no finite value), tuple keys joined."""
    if isinstance(value, dict):
        return {("/".join(k) if isinstance(k, tuple) else str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def _tuning(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    cost = analysis.tuning_cost(analysis.runs_frame(records))
    chosen = analysis.select(records)
    result: dict[str, Any] = {}
    for row in cost.itertuples():
        pick = chosen[(row.task, row.method)]
        result.setdefault(row.task, {})[row.method] = {
            "cells": row.cells,
            "best": row.best,
            "share_near_best": row.share_near_best,
            "expected_best_of_1": row.tuning_curve[1],
            "lr": pick.lr,
            "scale": pick.scale,
        }
    return result


def _accuracy(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    frame = analysis.runs_frame(records)
    summary = analysis.accuracy_summary(frame)
    differences = analysis.paired_differences(frame)
    result: dict[str, Any] = {}
    for task, block in summary.groupby("task"):
        entry: dict[str, Any] = {
            "metric": block["metric_name"].iloc[0],
            "higher_is_better": bool(block["higher_is_better"].iloc[0]),
            "by_epsilon": {},
            NONPRIVATE: None,
        }
        for row in block.itertuples():
            cell = {"mean": row.mean, "low": row.low, "high": row.high, "seeds": row.seeds}
            if row.method == NONPRIVATE:
                entry[NONPRIVATE] = cell
            else:
                entry["by_epsilon"].setdefault(f"{row.target_epsilon:g}", {})[row.method] = cell
        for row in differences[differences["task"] == task].itertuples():
            cell = entry["by_epsilon"][f"{row.target_epsilon:g}"][row.method]
            cell["vs_dpsgd"] = {
                "difference": row.difference,
                "low": row.low,
                "high": row.high,
                "seeds": row.seeds,
                "verdict": row.verdict,
            }
        result[str(task)] = entry
    return result


def _anchors(records: Sequence[dict[str, Any]], params: Params) -> dict[str, Any]:
    """The published anchors, and our tuned DP-SGD on the main task at the main epsilon with its PRV and RDP epsilon."""
    frame = analysis.runs_frame(records)
    ours = frame[
        (frame["task"] == params.setting.main_task)
        & (frame["method"] == "fixed")
        & (frame["target_epsilon"] == params.setting.epsilon)
    ]
    if ours.empty or not dataset_spec(params.task(params.setting.main_task).dataset).anchored:
        return {"published": [a.__dict__ for a in ANCHORS]}
    first = ours.iloc[0]
    value = analysis.interval(ours["metric"].tolist())
    rdp = epsilon_of(
        noise_multiplier=float(first["noise_multiplier"]),
        sample_rate=float(first["batch_size"]) / float(first["train_size"]),
        steps=int(first["steps"]),
        delta=float(first["delta"]),
        accountant="rdp",
    )
    return {
        "published": [a.__dict__ for a in ANCHORS],
        "ours": {
            "task": params.setting.main_task,
            "dataset": str(first["dataset"]),
            "model": str(first["model"]),
            "mean": value.mean,
            "low": value.low,
            "high": value.high,
            "seeds": value.n,
            "epsilon": float(first["epsilon"]),
            "accountant": str(first["accountant"]),
            "epsilon_rdp": rdp,
            "noise_multiplier": float(first["noise_multiplier"]),
            "epochs": int(first["epochs"]),
            "batch_size": int(first["batch_size"]),
            "train_size": int(first["train_size"]),
        },
    }


def _size(records: Sequence[dict[str, Any]], accuracy: Sequence[dict[str, Any]], params: Params) -> dict[str, Any]:
    full = [
        r
        for r in accuracy
        if r["config"].get("task") == params.size.task and r["target_epsilon"] in (params.setting.epsilon, None)
    ]
    summary = analysis.size_summary(analysis.runs_frame([*records, *full]))
    result: dict[str, Any] = {}
    for row in summary.to_dict("records"):
        cell = {k: row[k] for k in ("mean", "low", "high", "seeds")}
        if isinstance(row.get("verdict"), str):
            cell |= {
                "gap": row["gap"],
                "gap_low": row["gap_low"],
                "gap_high": row["gap_high"],
                "gap_seeds": row["gap_seeds"],
                "verdict": row["verdict"],
            }
        result.setdefault(row["method"], {})[str(int(row["train_size"]))] = cell
    return result


def _diagnostics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    table = analysis.diagnostics_summary(records)
    result: dict[str, Any] = {}
    for row in table.to_dict("records"):
        result.setdefault(row["task"], {})[row["method"]] = {key: row[key] for key in analysis.DIAGNOSTICS}
        if _releases_step(row["method"]):
            result[row["task"]][row["method"]]["snr"] = None
    return result


def _releases_step(method: str) -> bool:
    """Whether ``method`` releases an Adam step: its release SNR has no common unit with the others'
    (:func:`adaclip.research.plots.comparable_snr`), so the report leaves it out."""
    return method in METHODS and METHODS[method].releases_step


def _heterogeneity(
    diagnostics: Sequence[dict[str, Any]], accuracy: Sequence[dict[str, Any]], params: Params
) -> dict[str, Any]:
    """Per task: ``h`` and each method's gain over DP-SGD (:func:`adaclip.research.analysis.heterogeneity_gains`)."""
    gains = analysis.heterogeneity_gains(diagnostics, accuracy, params.setting.epsilon)
    result: dict[str, Any] = {}
    for row in gains.to_dict("records"):
        entry = result.setdefault(row["task"], {"heterogeneity": row["heterogeneity"], "methods": {}})
        entry["methods"][row["method"]] = {key: row[key] for key in ("difference", "low", "high", "snr_ratio")} | {
            "higher_is_better": dataset_spec(params.task(row["task"]).dataset).higher_is_better
        }
        if _releases_step(row["method"]):
            entry["methods"][row["method"]]["snr_ratio"] = None
    return result


def _theory(params: Params) -> dict[str, Any]:
    section = params.theory
    ratios = {}
    for spread in section.spreads:
        std = log_spaced_std(section.dim, spread)
        ratios[f"{spread:g}"] = optimal_noise_power(std) / dpsgd_noise_power(std)
    return {"dim": section.dim, "noise_power_ratio": ratios}


def _audit(audit: dict[str, Any]) -> dict[str, Any]:
    """Per audit row (:mod:`adaclip.audit`): kind, verdict, theoretical epsilon and the audited lower bound."""
    return {
        row["name"]: {
            "kind": row["kind"],
            "passed": row["verdict"] == "pass",
            "theoretical_epsilon": row["theoretical_epsilon"],
            "lower_bound": row["lower_bound"]["epsilon"],
        }
        for row in audit["results"]
    }


def _compute(bench: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per (model, batch size, method, path): the benchmark cell's step time relative to non-private (median of
    the per-round ratios of every run), its spread ((Q3 - Q1) / median of those ratios) and whether the benchmark
    marked it unstable (spread above 10 %), and the step time and throughput (mean over the runs)."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in bench:
        key = f"{row['model']}/B={row['batch_size']}"
        grouped.setdefault(key, {}).setdefault(f"{row['method']}/{row['path']}", []).append(row)
    return {
        key: {
            setup: {
                "ratio_to_nonprivate": rows[0]["cell"]["ratio"],
                "spread": rows[0]["cell"]["spread"],
                "unstable": rows[0]["cell"]["unstable"],
                **{name: float(np.mean([r[name] for r in rows])) for name in ("step_time_s", "examples_per_s")},
            }
            for setup, rows in setups.items()
        }
        for key, setups in grouped.items()
    }


def summarise(
    params: Params,
    sweeps: dict[str, Sequence[dict[str, Any]]],
    bench: Sequence[dict[str, Any]] | None = None,
    audit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the report states: from the sweeps' records (``{sweep: records}``), the benchmark and the audit.

    A section whose sweeps are not in ``sweeps`` is empty (``{}``), so that a notebook can state the finding of
    its own question from the sweeps it reads (its writer then has what it needs and nothing more).
    """
    setting = params.setting
    tuning, accuracy, size, diagnostics = (sweeps.get(name) for name in ("tuning", "accuracy", "size", "diagnostics"))
    summary: dict[str, Any] = {
        "profile": params.profile,
        "privacy": {"delta": setting.delta, "accountant": setting.accountant, "main_epsilon": setting.epsilon},
        "main_task": setting.main_task,
        "tuning": {} if tuning is None else _tuning(tuning),
        "accuracy": {} if accuracy is None else _accuracy(accuracy),
        "anchors": {} if accuracy is None else _anchors(accuracy, params),
        "size": {} if size is None or accuracy is None else _size(size, accuracy, params),
        "size_task": params.size.task,
        "higher_is_better": {
            task: dataset_spec(spec.dataset).higher_is_better for task, spec in params.setting.tasks.items()
        },
        "diagnostics": {} if diagnostics is None else _diagnostics(diagnostics),
        "heterogeneity": (
            {} if diagnostics is None or accuracy is None else _heterogeneity(diagnostics, accuracy, params)
        ),
        "theory": _theory(params),
    }
    if bench is not None:
        summary["compute"] = _compute(bench)
    if audit is not None:
        summary["audit"] = _audit(audit)
    cleaned: dict[str, Any] = _clean(summary)
    return cleaned


def headline_metrics(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Small ``{method: value}`` tables, one per question, for ``dvc metrics show``."""
    main = f"{summary['privacy']['main_epsilon']:g}"
    metrics: dict[str, dict[str, float]] = {}
    for task, entry in summary["accuracy"].items():
        values = {m: v["mean"] for m, v in entry["by_epsilon"].get(main, {}).items()}
        if entry[NONPRIVATE] is not None:
            values[NONPRIVATE] = entry[NONPRIVATE]["mean"]
        metrics[f"q3_{task}_eps{main}"] = values
    for task, methods in summary["tuning"].items():
        metrics[f"q2_{task}_share_near_best"] = {m: v["share_near_best"] for m, v in methods.items()}
    for task, methods in summary["diagnostics"].items():
        metrics[f"q1_{task}_snr"] = {m: v["snr"] for m, v in methods.items()}
    if summary["size"]:
        smallest = min((n for cells in summary["size"].values() for n in cells), key=int)
        metrics[f"q4_n{smallest}"] = {
            m: cells[smallest]["mean"] for m, cells in summary["size"].items() if smallest in cells
        }
    return {name: {k: round(v, 5) for k, v in values.items() if v is not None} for name, values in metrics.items()}


def _ordered(by_method: dict[str, Any]) -> list[str]:
    order = analysis.METHOD_ORDER
    return sorted(by_method, key=lambda m: order.index(m) if m in order else len(order))


def _fmt(cell: dict[str, Any], higher_is_better: bool) -> str:
    digits = 1 if higher_is_better else 3
    unit = " %" if higher_is_better else ""
    if cell.get("seeds", 2) > 1 and cell["high"] != cell["low"]:
        return f"{cell['mean']:.{digits}f} ± {(cell['high'] - cell['low']) / 2:.{digits}f}{unit}"
    return f"{cell['mean']:.{digits}f}{unit}"


_WORDS = {"win": "better than", "loss": "worse than", "tie": "a tie with", "undefined": "no verdict against"}


def _verdict_word(difference: float | None, low: float | None, high: float | None, seeds: int, higher: bool) -> str:
    """The words for a paired difference, decided here from the interval the sentence prints (never a stored
    verdict): "better than" / "worse than" only when ``[low, high]`` excludes 0, in the metric's direction."""
    if difference is None or low is None or high is None:
        return _WORDS["undefined"]
    return _WORDS[analysis.verdict(analysis.Interval(difference, low, high, seeds), higher)]


def _signed(value: float | None, digits: int) -> str:
    return "undefined" if value is None else f"{value:+.{digits}f}"


def _versus(cell: dict[str, Any], higher_is_better: bool) -> str:
    versus = cell["vs_dpsgd"]
    digits = 1 if higher_is_better else 3
    word = _verdict_word(
        versus["difference"], versus["low"], versus["high"], int(versus.get("seeds", 1)), higher_is_better
    )
    return (
        f"{_signed(versus['difference'], digits)} [{_signed(versus['low'], digits)}, "
        f"{_signed(versus['high'], digits)}], {word} DP-SGD"
    )


def _caption(summary: dict[str, Any]) -> str:
    """The privacy setting every finding states: ``ε = …, δ = …, ACCOUNTANT``."""
    privacy = summary["privacy"]
    return f"ε = {privacy['main_epsilon']:g}, δ = {privacy['delta']:g}, {privacy['accountant'].upper()}"


def _gradient_heterogeneity(diagnostics: dict[str, Any]) -> list[str]:
    """Per task: its gradients' heterogeneity ``h``, the ``1 - h`` bound on coordinate-wise clipping's saving, and
    AdaCliP's achieved saving.  AdaCliP's saving is bounded by ``1 - h`` of its own run's gradients, so its ``h`` is
    quoted where AdaCliP ran, another method's otherwise."""
    savings = []
    for task, methods in diagnostics.items():
        own = methods.get("adaclip", {}).get("heterogeneity")
        h = (
            own
            if own is not None
            else next((v["heterogeneity"] for v in methods.values() if v["heterogeneity"] is not None), None)
        )
        if h is None:
            continue
        achieved = methods.get("adaclip", {}).get("shape_saving")
        saving = f"; AdaCliP's b saved {100 * achieved:.0f} %" if achieved is not None else ""
        savings.append(f"{task}: h = {h:.2f}, at most {100 * (1 - h):.0f} % to gain{saving}")
    return savings


def noise_finding(summary: dict[str, Any]) -> str | None:
    """Question 1, less noise: each method's release SNR, cosines and parameter noise on the main task."""
    main = summary["main_task"]
    if main not in summary["diagnostics"]:
        return None
    diag = summary["diagnostics"][main]
    snr = ", ".join(f"{analysis.label(m)} {diag[m]['snr']:.3g}" for m in _ordered(diag) if diag[m]["snr"] is not None)
    cosine = ", ".join(
        f"{analysis.label(m)} {diag[m]['cosine_noise_free']:.2f}/{diag[m]['cosine_release']:.2f}"
        for m in _ordered(diag)
        if diag[m]["cosine_release"] is not None and diag[m]["cosine_noise_free"] is not None
    )
    parameter_noise = ", ".join(
        f"{analysis.label(m)} {diag[m]['parameter_noise']:.3g}"
        for m in _ordered(diag)
        if diag[m]["parameter_noise"] is not None
    )
    savings = _gradient_heterogeneity(summary["diagnostics"])
    spreads = summary["theory"]["noise_power_ratio"]
    widest = max(spreads, key=float)
    return (
        f"On {main}, each method at its tuned hyperparameters ({_caption(summary)}): the release's signal-to-noise "
        f"ratio (‖noise-free release‖² / E‖noise‖², mean over steps) was {snr}; the cosine of the noise-free "
        f"release and of the release with the clean batch gradient was {cosine}; the noise each step adds to the "
        f"parameters (lr² E‖noise‖²) was {parameter_noise}. Coordinate-wise clipping can only help as much as "
        f"the gradients are heterogeneous: {'; '.join(savings)}. (Synthetic gradients whose per-coordinate std "
        f"spreads over a factor {float(widest):g} would allow the optimal transform {spreads[widest]:.2f}× "
        f"DP-SGD's noise power.)"
    )


def tuning_finding(summary: dict[str, Any]) -> str | None:
    """Question 2, no hand tuning: the share of each method's tuning grid near its best, and one random cell."""
    main = summary["main_task"]
    tuning = summary["tuning"].get(main)
    if not tuning:
        return None
    higher = summary["higher_is_better"][main]
    digits = 1 if higher else 3

    def one_cell(value: float | None) -> str:
        return "undefined: a random cell can diverge" if value is None else f"{value:.{digits}f} expected"

    parts = [
        f"{analysis.label(m)} {100 * v['share_near_best']:.0f} % of {v['cells']} cells "
        f"(best {v['best']:.{digits}f}, one random cell {one_cell(v['expected_best_of_1'])})"
        for m, v in tuning.items()
        if m != NONPRIVATE
    ]
    near = "1 point of each method's best validation accuracy" if higher else "5 % of each method's best validation MSE"
    return (
        f"On {main} at {_caption(summary)}, the share of the learning rate × scale grid within {near}: "
        + "; ".join(parts)
        + "."
    )


def accuracy_finding(summary: dict[str, Any]) -> str | None:
    """Question 3, accuracy at the same (ε, δ): per task, each method's test metric and paired gap to DP-SGD."""
    main_eps = f"{summary['privacy']['main_epsilon']:g}"
    sentences = []
    for task, entry in summary["accuracy"].items():
        at_main = entry["by_epsilon"].get(main_eps)
        if not at_main or "fixed" not in at_main:
            continue
        higher = entry["higher_is_better"]
        others = "; ".join(
            f"{analysis.label(m)} {_fmt(at_main[m], higher)} ({_versus(at_main[m], higher)})"
            for m in _ordered(at_main)
            if m != "fixed" and "vs_dpsgd" in at_main[m]
        )
        baseline = f"; non-private {_fmt(entry[NONPRIVATE], higher)}" if entry[NONPRIVATE] else ""
        sentences.append(f"{task}: DP-SGD {_fmt(at_main['fixed'], higher)}; {others}{baseline}")
    if not sentences:
        return None
    return (
        f"At {_caption(summary)}, test metric (mean ± half-width of the 95 % interval; paired difference to DP-SGD "
        f"[95 % interval]): " + ". ".join(sentences) + "."
    )


def anchors_finding(summary: dict[str, Any]) -> str | None:
    """Beside the published state of the art: our tuned DP-SGD on the main task and the published anchors."""
    anchors = summary["anchors"]
    if "ours" not in anchors:
        return None
    ours = anchors["ours"]
    published = "; ".join(
        f"{a['model']} {a['accuracy']:g} % ({a['reference']}, {a['accountant']})" for a in anchors["published"]
    )
    return (
        f"Our DP-SGD on {ours['task']} ({ours['model']} model, {ours['dataset']}) reached {_fmt(ours, True)} at "
        f"{ours['accountant'].upper()} ε = "
        f"{ours['epsilon']:.2f} (RDP ε = {ours['epsilon_rdp']:.2f} for the same run; "
        f"σ = {ours['noise_multiplier']:.3g}, "
        f"{ours['epochs']} epochs, B = {ours['batch_size']}, N = {ours['train_size']}). Published: {published}."
    )


def size_finding(summary: dict[str, Any]) -> str | None:
    """Question 4, how much data: AdaCliP minus DP-SGD at the smallest and the largest training set."""
    size = summary["size"]
    if "fixed" not in size or "adaclip" not in size:
        return None
    sizes = sorted(size["adaclip"], key=int)
    higher = summary["higher_is_better"][summary["size_task"]]
    digits, unit = (1, " points") if higher else (3, "")
    parts = []
    for n in dict.fromkeys((sizes[0], sizes[-1])):
        cell = size["adaclip"][n]
        if "gap" in cell:
            word = _verdict_word(cell["gap"], cell["gap_low"], cell["gap_high"], int(cell.get("gap_seeds", 1)), higher)
            parts.append(
                f"{_signed(cell['gap'], digits)} [{_signed(cell['gap_low'], digits)}, "
                f"{_signed(cell['gap_high'], digits)}]{unit} at n = {n} ({word} DP-SGD)"
            )
    if not parts:
        return None
    return (
        f"On {summary['size_task']} at {_caption(summary)}, with the same sampling rate and number of steps for "
        f"every n, AdaCliP minus DP-SGD was " + " and ".join(parts) + "."
    )


def compute_finding(summary: dict[str, Any]) -> str | None:
    """Question 5, the cost in compute: step time relative to non-private training, ours and Opacus's."""
    compute = summary.get("compute")
    if not compute:
        return None
    unstable = sum(r["unstable"] for rows in compute.values() for n, r in rows.items() if n != "nonprivate/-")
    parts = []
    for key in sorted(compute, key=lambda k: (k.split("/B=")[0], int(k.split("B=")[1]))):
        rows = {n: r for n, r in compute[key].items() if not r["unstable"]}
        ours_fast = {n.split("/")[0]: r["ratio_to_nonprivate"] for n, r in rows.items() if n.endswith("/fast")}
        if not ours_fast:
            continue
        low, high = min(ours_fast, key=ours_fast.get), max(ours_fast, key=ours_fast.get)
        opacus = ", ".join(
            f"{n} {r['ratio_to_nonprivate']:.2f}×" for n, r in sorted(rows.items()) if n.startswith("opacus/")
        )
        parts.append(
            f"{key}: {ours_fast[low]:.2f}× ({analysis.label(low)}) to "
            f"{ours_fast[high]:.2f}× ({analysis.label(high)}) "
            f"on the fast path ({opacus})"
        )
    if not parts and not unstable:
        return None
    return (
        "Step time relative to non-private training, measured in one process (median over interleaved "
        "rounds; only cells whose spread, (Q3 − Q1) / median of the per-round ratios, is at most 10 %): "
        + ("; ".join(parts) if parts else "no stable cell")
        + "."
        + (f" {unstable} unstable cell(s) not quoted (`tables/bench.md`)." if unstable else "")
    )


def heterogeneity_finding(summary: dict[str, Any]) -> str | None:
    """When coordinate-wise clipping helps: each method's paired gain over DP-SGD on the synthetic tasks."""
    heterogeneity = summary.get("heterogeneity")
    if not heterogeneity:
        return None
    parts = []
    for task, entry in sorted(heterogeneity.items(), key=lambda item: -item[1]["heterogeneity"]):
        gains = []
        for method in _ordered(entry["methods"]):
            cell = entry["methods"][method]
            higher, digits = cell["higher_is_better"], 1 if cell["higher_is_better"] else 3
            word = _verdict_word(cell["difference"], cell["low"], cell["high"], 2, higher)
            ratio = "" if cell["snr_ratio"] is None else f", SNR ×{cell['snr_ratio']:.2g}"
            gains.append(f"{analysis.label(method)} {_signed(cell['difference'], digits)} ({word} DP-SGD{ratio})")
        parts.append(f"{task} (h = {entry['heterogeneity']:.2f}): " + ", ".join(gains))
    return (
        f"Gain over tuned DP-SGD at {_caption(summary)} (paired by seed; accuracy points, MSE for diabetes), tasks "
        f"from homogeneous to heterogeneous gradients: " + "; ".join(parts) + "."
    )


def audit_finding(summary: dict[str, Any]) -> str | None:
    """Is it private: the audits of correct methods that passed, the tightest bound, the controls caught."""
    audit = summary.get("audit")
    if not audit:
        return None
    correct = {n: r for n, r in audit.items() if r["kind"] != "control"}
    controls = {n: r for n, r in audit.items() if r["kind"] == "control"}
    tightest = max(correct, key=lambda n: correct[n]["lower_bound"] / correct[n]["theoretical_epsilon"])
    return (
        f"No violation was found by this adversary in {sum(r['passed'] for r in correct.values())} of "
        f"{len(correct)} audits of correct methods (the tightest audited lower bound: "
        f"{correct[tightest]['lower_bound']:.2f} against ε = {correct[tightest]['theoretical_epsilon']:.2f} for "
        f"{tightest}); {sum(not r['passed'] for r in controls.values())} of {len(controls)} deliberately broken "
        f"controls were caught. A pass bounds ε from below for this adversary only; it does not prove privacy."
    )


class Question(NamedTuple):
    """One section of the report: what it asks and where its artefacts are."""

    key: str
    """The section's key in :func:`findings` (and :data:`WRITERS`)."""
    title: str
    figures: tuple[str, ...]
    """Figure stems under ``reports/``."""
    notebook: str
    """The notebook (or ``bench``) that makes its figures and table."""
    table: str
    """Its table, under ``reports/``."""


QUESTIONS = (
    Question(
        "noise",
        "1. Less noise?",
        ("figures/snr", "figures/cosine_noise_free", "figures/heterogeneity", "figures/theory_noise"),
        "noise",
        "tables/noise.md",
    ),
    Question(
        "tuning",
        "2. No hand tuning?",
        ("figures/tuning_heatmaps", "figures/tuning_curves"),
        "tuning",
        "tables/tuning.md",
    ),
    Question(
        "accuracy",
        "3. Better accuracy at the same (ε, δ)?",
        ("figures/accuracy", "figures/paired", "figures/training_curves"),
        "accuracy",
        "tables/paired.md",
    ),
    Question("anchors", "Beside the published state of the art", (), "accuracy", "tables/anchors.md"),
    Question(
        "heterogeneity",
        "When does coordinate-wise clipping help?",
        ("figures/heterogeneity_gain",),
        "heterogeneity",
        "tables/heterogeneity.md",
    ),
    Question("size", "4. How much data?", ("figures/data_size",), "data_size", "tables/data_size.md"),
    Question("compute", "5. What does it cost in compute?", ("figures/bench",), "bench", "tables/bench.md"),
    Question("audit", "Is it private? The white-box privacy audit", ("figures/audit",), "audit", "tables/audit.md"),
    Question(
        "accounting", "Accounting: ε against steps", ("figures/epsilon_steps",), "accounting", "tables/accounting.md"
    ),
)
"""The report's sections in order."""

WRITERS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "noise": noise_finding,
    "tuning": tuning_finding,
    "accuracy": accuracy_finding,
    "anchors": anchors_finding,
    "size": size_finding,
    "compute": compute_finding,
    "heterogeneity": heterogeneity_finding,
    "audit": audit_finding,
}
"""The writer of each question's finding (the ``accounting`` section has a table and a figure only)."""


def findings(summary: dict[str, Any]) -> dict[str, str]:
    """Sentences per question, every number read from ``summary``; a win only when the interval excludes 0.

    Each question has its own writer in :data:`WRITERS`, which returns ``None`` where the summary holds nothing
    for it; the questions without a finding are left out.
    """
    written = {key: writer(summary) for key, writer in WRITERS.items()}
    return {key: text for key, text in written.items() if text is not None}


def finding_markdown(summary: dict[str, Any], *keys: str) -> str:
    """The findings of questions ``keys`` as the Markdown that closes a notebook (each question's title in bold).

    A question whose writer finds nothing in ``summary`` says so in words rather than vanishing.
    """
    titles = {question.key: question.title for question in QUESTIONS}
    paragraphs = []
    for key in keys:
        if key not in WRITERS:
            raise ValueError(f"keys must be among the questions with a writer {list(WRITERS)}, got {key!r}")
        text = WRITERS[key](summary)
        paragraphs.append(f"**{titles[key]}** {text or 'The runs this notebook reads hold nothing for it.'}")
    return "\n\n".join(paragraphs)


def accounting_finding(curve: Any, accountants: Sequence[str]) -> str:
    """What the ε-against-steps table shows: each accountant's ε after the last step, and each one's ratio to the
    tightest (``curve``: a table with a ``steps`` column and one ε column per accountant)."""
    last = curve.iloc[-1]
    tightest = min(float(last[name]) for name in accountants)
    cells = ", ".join(
        f"{name.upper()} {float(last[name]):.3f} ({float(last[name]) / tightest:.2f}×)" for name in accountants
    )
    return (
        f"**Accounting: ε against steps** After {int(last['steps'])} steps: {cells} (in brackets each accountant's "
        f"ε relative to the tightest)."
    )


NOTEBOOK_STAGES = {"tuning": "tuning_cost"}
"""The dvc.yaml stage of a notebook where it is not the notebook's name (``tuning`` is the tuning sweep's stage)."""


def source_of(notebook: str) -> str:
    """Where a section's artefacts come from."""
    if notebook == "bench":
        return "`benchmarks/bench.py` (stage `bench`)"
    return f"`notebooks/{notebook}.ipynb` (stage `{NOTEBOOK_STAGES.get(notebook, notebook)}`)"


def render_readme(summary: dict[str, Any], tables: dict[str, str]) -> str:
    """``reports/README.md``: each question, its findings from ``summary``, its figures and its table.

    ``tables`` maps a section's table path (as in :data:`QUESTIONS`) to its Markdown, for the sections whose
    table is shown inline; sections with neither a finding nor an inline table are left out.
    """
    found = findings(summary)
    privacy = summary["privacy"]
    lines = [
        "# Report (generated)",
        "",
        f"Generated by `dvc repro` from the `{summary['profile']}` profile; do not edit by hand. Every number in the "
        f"findings is read from the runs by `adaclip.research.report.findings`. Privacy: δ = {privacy['delta']:g}, "
        f"{privacy['accountant'].upper()} accountant. Each method runs at its own hyperparameters, tuned on the "
        f"validation split at ε = {privacy['main_epsilon']:g} ([`tables/tuning.md`](tables/tuning.md)); test metrics "
        f"are reported with 95 % intervals over seeds, and differences to DP-SGD are paired by seed: a win or a loss "
        f"only when the interval excludes zero, a tie otherwise. Executed notebooks are in `notebooks/`, every figure "
        f"is PNG and SVG, and the whole report is one self-contained HTML file, `report.html`.",
        "",
    ]
    for question in QUESTIONS:
        if question.key not in found and question.table not in tables:
            continue
        lines += [f"## {question.title}", ""]
        if question.key in found:
            lines += [found[question.key], ""]
        lines += [f"![{stem}]({stem}.png)" for stem in question.figures]
        lines += ["", f"Table: [`{question.table}`]({question.table}). Source: {source_of(question.notebook)}.", ""]
        if question.table in tables:
            lines += [tables[question.table].rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"
