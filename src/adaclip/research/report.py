"""The report's numbers and its generated ``reports/README.md``.

:func:`summarise` turns the sweeps' records (and the benchmark's and audit's results) into one
JSON-ready summary; :func:`headline_metrics` picks from it the small ``{method: value}`` files
that ``dvc metrics show`` prints as a question x method table; :func:`render_readme` writes each
question's finding as a sentence whose every number comes from the summary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from adaclip.research import analysis
from adaclip.research.theory import dpsgd_noise_power, log_spaced_std, optimal_noise_power

DIAGNOSTIC_KEYS = ("noise_power", "cosine_to_clean", "clipped_fraction")


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _accuracy(records: Sequence[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    frame = analysis.runs_frame(records)
    summary = analysis.accuracy_by_epsilon(frame)
    result: dict[str, Any] = {}
    for dataset, block in summary.groupby("dataset"):
        entry: dict[str, Any] = {
            "metric": block["metric_name"].iloc[0],
            "higher_is_better": bool(frame[frame["dataset"] == dataset]["higher_is_better"].iloc[0]),
        }
        entry["by_epsilon"] = {
            f"{eps:g}": {
                row.method: {"mean": row.mean, "std": row.std, "seeds": int(row.count)}
                for row in block[block["target_epsilon"] == eps].itertuples()
            }
            for eps in sorted(block["target_epsilon"].dropna().unique())
        }
        baseline = block[block["method"] == "nonprivate"]
        entry["nonprivate"] = (
            None if baseline.empty else {"mean": baseline["mean"].iloc[0], "std": baseline["std"].iloc[0]}
        )
        main = params["setting"]["epsilon"]
        if f"{main:g}" in entry["by_epsilon"]:
            entry["best_at_main_epsilon"] = dict(
                zip(("method", "mean"), analysis.best_private_method(frame, dataset, main), strict=True)
            )
        result[dataset] = entry
    return result


def _clip(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    frame = analysis.runs_frame(records)
    regions = analysis.flat_region(frame)
    without = frame[frame["initial_clip"].isna()].groupby("method")["metric"].mean()
    return {
        "flat_regions": {row.method: row._asdict() for row in regions.itertuples(index=False)},
        "without_clip_norm": {m: float(v) for m, v in without.items()},
        "grid": sorted(float(c) for c in frame["initial_clip"].dropna().unique()),
    }


def _size(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    frame = analysis.runs_frame(records)
    summary = analysis.mean_std(frame, ["method", "train_size"])
    return {
        str(method): {str(int(row.train_size)): {"mean": row.mean, "std": row.std} for row in block.itertuples()}
        for method, block in summary.groupby("method")
    }


def _diagnostics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    table = analysis.step_summary(records, DIAGNOSTIC_KEYS)
    return {
        row.method: {k: getattr(row, k) for k in (*DIAGNOSTIC_KEYS, "metric", "noise_multiplier")}
        for row in table.itertuples()
    }


def _theory(params: dict[str, Any]) -> dict[str, Any]:
    section = params["theory"]
    ratios = {}
    for spread in section["spreads"]:
        std = log_spaced_std(section["dim"], spread)
        ratios[f"{spread:g}"] = optimal_noise_power(std) / dpsgd_noise_power(std)
    return {"dim": section["dim"], "noise_power_ratio": ratios}


def summarise(
    params: dict[str, Any],
    sweeps: dict[str, Sequence[dict[str, Any]]],
    bench: Sequence[dict[str, Any]] | None = None,
    audit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the report states, from the sweeps' records (``{sweep name: records}``), the benchmark's and the audit's."""
    any_record = next(r for records in sweeps.values() for r in records if r["method"] != "nonprivate")
    summary: dict[str, Any] = {
        "profile": params["profile"],
        "privacy": {
            "delta": any_record["delta"],
            "accountant": any_record["accountant"],
            "main_epsilon": params["setting"]["epsilon"],
        },
        "learning_rates": analysis.select_learning_rates(sweeps["lr_search"]),
        "accuracy": _accuracy(sweeps["accuracy"], params),
        "clip": _clip(sweeps["clip"]),
        "size": _size(sweeps["size"]),
        "diagnostics": _diagnostics(sweeps["diagnostics"]),
        "theory": _theory(params),
    }
    if bench is not None:
        summary["compute"] = _compute(bench)
    if audit is not None:
        summary["audit"] = _audit(audit)
    return _clean(summary)


def _audit(audit: dict[str, Any]) -> dict[str, Any]:
    """Per audit row (see :mod:`adaclip.privacy.audit`): kind, verdict, theoretical epsilon and the audited lower bound."""
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
    """Step time relative to non-private (mean over the benchmark's runs), per (model, batch size, method, path)."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in bench:
        key = f"{row['model']}/B={row['batch_size']}"
        grouped.setdefault(key, {}).setdefault(f"{row['method']}/{row['path']}", []).append(row)
    return {
        key: {
            setup: {
                name: float(np.mean([r[name] for r in rows]))
                for name in ("ratio_to_nonprivate", "step_time_s", "examples_per_s")
            }
            for setup, rows in setups.items()
        }
        for key, setups in grouped.items()
    }


def headline_metrics(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Small ``{method: value}`` tables, one per question, for ``dvc metrics show``."""
    main = f"{summary['privacy']['main_epsilon']:g}"
    metrics: dict[str, dict[str, float]] = {}
    for dataset, entry in summary["accuracy"].items():
        values = {m: v["mean"] for m, v in entry["by_epsilon"].get(main, {}).items()}
        if entry["nonprivate"] is not None:
            values["nonprivate"] = entry["nonprivate"]["mean"]
        metrics[f"q3_{dataset}_eps{main}"] = values
    metrics["q2_flat_decades"] = {m: r["decades"] for m, r in summary["clip"]["flat_regions"].items()}
    metrics["q1_noise_power"] = {m: r["noise_power"] for m, r in summary["diagnostics"].items()}
    metrics["q1_cosine_to_clean"] = {m: r["cosine_to_clean"] for m, r in summary["diagnostics"].items()}
    if "compute" in summary:
        largest = max(
            (k for k in summary["compute"] if k.startswith("mlp/")), key=lambda k: int(k.split("B=")[1]), default=None
        )
        if largest is not None:
            metrics["q5_step_time_ratio_mlp"] = {
                setup.split("/")[0]: row["ratio_to_nonprivate"]
                for setup, row in summary["compute"][largest].items()
                if setup.endswith("/fast")
            }
    smallest = {m: min(v, key=int) for m, v in summary["size"].items()}
    metrics["q4_smallest_n"] = {m: summary["size"][m][n]["mean"] for m, n in smallest.items()}
    return {name: {k: round(v, 5) for k, v in values.items() if v is not None} for name, values in metrics.items()}


def _ordered(by_method: dict[str, Any]) -> list[str]:
    return sorted(
        by_method,
        key=lambda m: analysis.METHOD_ORDER.index(m) if m in analysis.METHOD_ORDER else len(analysis.METHOD_ORDER),
    )


def _pct(value: float) -> str:
    return f"{value:.1f} %"


def findings(summary: dict[str, Any]) -> dict[str, str]:
    """One sentence per question, every number read from ``summary``."""
    privacy = summary["privacy"]
    caption = f"ε = {privacy['main_epsilon']:g}, δ = {privacy['delta']:g}, {privacy['accountant'].upper()}"
    result: dict[str, str] = {}

    diag = summary["diagnostics"]
    if "fixed" in diag and "adaclip" in diag:
        sigma = diag["fixed"]["noise_multiplier"]
        ratio = diag["adaclip"]["noise_power"] / diag["fixed"]["noise_power"]
        cosines = ", ".join(f"{analysis.label(m)} {diag[m]['cosine_to_clean']:.2f}" for m in _ordered(diag))
        spreads = summary["theory"]["noise_power_ratio"]
        widest, narrowest = max(spreads, key=float), min(spreads, key=float)
        result["noise"] = (
            f"At the same σ = {sigma:g}, AdaCliP injected {ratio:.3g}× the noise power of DP-SGD (fixed C) when training "
            f"(mean over steps); the mean cosine between the released step and the clean batch gradient was {cosines}. "
            f"In theory the optimal AdaCliP transform needs {spreads[widest]:.2f}× DP-SGD's noise power when per-coordinate "
            f"gradient std spreads over a factor {float(widest):g} (d = {summary['theory']['dim']}), and {spreads[narrowest]:.2f}× "
            f"at a spread of {float(narrowest):g}."
        )

    regions = summary["clip"]["flat_regions"]
    if regions:
        grid = summary["clip"]["grid"]
        parts = [
            f"{analysis.label(m)} {regions[m]['decades']:.0f} decade(s) (C0 from {regions[m]['flat_low']:g} to {regions[m]['flat_high']:g})"
            for m in _ordered(regions)
        ]
        result["clip"] = (
            f"Across C0 from {grid[0]:g} to {grid[-1]:g} ({math.log10(grid[-1] / grid[0]):.0f} decades, {caption}), final accuracy stayed "
            f"within 1 point of each method's best over: " + "; ".join(parts) + "."
        )

    sentences = []
    for dataset, entry in summary["accuracy"].items():
        best = entry.get("best_at_main_epsilon")
        if not best:
            continue
        at_main = entry["by_epsilon"][f"{privacy['main_epsilon']:g}"]
        unit = "%" if entry["higher_is_better"] else " MSE"
        fmt = (lambda v: f"{v:.1f}{unit}") if entry["higher_is_better"] else (lambda v: f"{v:.3f}{unit}")
        others = ", ".join(
            f"{analysis.label(m)} {fmt(at_main[m]['mean'])}" for m in _ordered(at_main) if m != best["method"]
        )
        baseline = f"; non-private {fmt(entry['nonprivate']['mean'])}" if entry["nonprivate"] else ""
        sentences.append(
            f"{dataset}: {analysis.label(best['method'])} was best with {fmt(best['mean'])} ({others}{baseline})"
        )
    if sentences:
        result["accuracy"] = f"At {caption}, test " + "; ".join(sentences) + "."

    size = summary["size"]
    if "fixed" in size and "adaclip" in size:
        sizes = sorted(size["fixed"], key=int)
        small, large = sizes[0], sizes[-1]
        gap_small = size["adaclip"][small]["mean"] - size["fixed"][small]["mean"]
        gap_large = size["adaclip"][large]["mean"] - size["fixed"][large]["mean"]
        result["size"] = (
            f"AdaCliP minus DP-SGD test accuracy was {gap_small:+.1f} points at n = {small} and {gap_large:+.1f} points at n = {large} "
            f"({caption}); DP-SGD went from {_pct(size['fixed'][small]['mean'])} to {_pct(size['fixed'][large]['mean'])}."
        )

    compute = summary.get("compute")
    if compute:
        parts = []
        for key in sorted(compute, key=lambda k: (k.split("/B=")[0], int(k.split("B=")[1]))):
            rows = compute[key]
            ours = {
                name.split("/")[0]: row["ratio_to_nonprivate"] for name, row in rows.items() if name.endswith("/fast")
            }
            low, high = min(ours, key=ours.get), max(ours, key=ours.get)
            opacus = ", ".join(
                f"{name} {row['ratio_to_nonprivate']:.2f}×"
                for name, row in sorted(rows.items())
                if name.startswith("opacus/")
            )
            parts.append(
                f"{key}: {ours[low]:.2f}× ({analysis.label(low)}) to {ours[high]:.2f}× ({analysis.label(high)}) on the fast path ({opacus})"
            )
        result["compute"] = (
            "Step time relative to non-private training, measured in one process: " + "; ".join(parts) + "."
        )

    audit = summary.get("audit")
    if audit:
        correct = {n: r for n, r in audit.items() if r["kind"] != "control"}
        controls = {n: r for n, r in audit.items() if r["kind"] == "control"}
        worst = max(correct, key=lambda n: correct[n]["lower_bound"] / correct[n]["theoretical_epsilon"])
        result["audit"] = (
            f"{sum(r['passed'] for r in correct.values())} of {len(correct)} audits of correct methods passed (largest audited lower "
            f"bound: {correct[worst]['lower_bound']:.2f} against ε = {correct[worst]['theoretical_epsilon']:.2f} for {worst}); "
            f"{sum(not r['passed'] for r in controls.values())} of {len(controls)} deliberately broken controls were caught."
        )
    return result


QUESTIONS = (
    (
        "noise",
        "1. Less noise?",
        ["figures/noise_power", "figures/cosine", "figures/theory_noise"],
        "noise",
        "tables/noise.md",
    ),
    (
        "clip",
        "2. No hand tuning of the clip norm?",
        ["figures/clip_sensitivity"],
        "clipping",
        "tables/clip_sensitivity.md",
    ),
    (
        "accuracy",
        "3. Better accuracy at the same (ε, δ)?",
        ["figures/accuracy", "figures/training_curves"],
        "accuracy",
        "tables/accuracy.md",
    ),
    ("size", "4. How much data?", ["figures/data_size"], "data_size", "tables/data_size.md"),
    ("compute", "5. What does it cost in compute?", ["figures/bench"], "bench", "tables/bench.md"),
    ("audit", "Is it private? The white-box privacy audit", ["figures/audit"], "audit", "tables/audit.md"),
    ("accounting", "Accounting: ε against steps", ["figures/epsilon_steps"], "accounting", "tables/accounting.md"),
)
"""(finding key, title, figure stems under reports/, notebook or stage, table under reports/)."""


def source_of(notebook: str) -> str:
    """Where a section's artefacts come from."""
    return (
        "`benchmarks/bench.py` (stage `bench`)"
        if notebook == "bench"
        else f"`notebooks/{notebook}.ipynb` (stage `{notebook}`)"
    )


def render_readme(summary: dict[str, Any], tables: dict[str, str]) -> str:
    """``reports/README.md``: each question, its finding from ``summary``, its figures and its table.

    ``tables`` maps a section's table path (as in :data:`QUESTIONS`) to its Markdown, for the
    sections whose table is shown inline (the audit and accounting ones); sections whose table is
    missing from the profile are left out.
    """
    found = findings(summary)
    privacy = summary["privacy"]
    lines = [
        "# Report (generated)",
        "",
        f"Generated by `dvc repro` from the `{summary['profile']}` profile; do not edit by hand. Every number in the "
        f"findings is read from the runs by `adaclip.research.report.findings`. Privacy: δ = {privacy['delta']:g}, "
        f"{privacy['accountant'].upper()} accountant. Learning rates were chosen per dataset and method on the validation "
        f"split ([`tables/learning_rates.md`](tables/learning_rates.md)); test metrics are reported. Executed notebooks are in "
        f"`notebooks/`, every figure is PNG and SVG, and the whole report is one self-contained HTML file, `report.html`.",
        "",
    ]
    for key, title, figures, notebook, table in QUESTIONS:
        if key not in found and table not in tables:
            continue
        lines += [f"## {title}", ""]
        if key in found:
            lines += [found[key], ""]
        lines += [f"![{stem}]({stem}.png)" for stem in figures]
        lines += ["", f"Table: [`{table}`]({table}). Source: {source_of(notebook)}.", ""]
        if table in tables:
            lines += [tables[table].rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"
