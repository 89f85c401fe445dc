"""Smoke test: the audit notebook runs through papermill with tiny parameters and writes its outputs."""

import json
from pathlib import Path

import papermill
import pytest
import yaml

from adaclip.audit.controls import CONTROLS

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "audit.ipynb"
# Too few trials to be tight: this checks the plumbing, tests/test_audit.py checks the verdicts.
TINY = {"trials": 16, "warmup_steps": 2, "methods": ["fixed", "adaclip"], "optimizer_trials": 8, "optimizer_steps": 2}


def run(tmp_path: Path, audit: dict) -> dict[str, Path]:
    params = yaml.safe_load((ROOT / "tests" / "fixtures" / "params-tiny.yaml").read_text())
    params["audit"].update(audit)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    reports = tmp_path / "reports"
    outputs = {
        "out_table": reports / "tables" / "audit.md",
        "out_json": reports / "data" / "audit.json",
        "out_figure": reports / "figures" / "audit",
    }
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "executed.ipynb"),
        parameters={"params_file": str(tmp_path / "params.yaml"), "reports_dir": str(reports)},
        kernel_name="python3",
        progress_bar=False,
    )
    return outputs


def test_audit_notebook_writes_table_json_and_figure(tmp_path):
    outputs = run(tmp_path, TINY)
    expected_rows = [
        "fixed",
        "adaclip",
        *(f"control: {name}" for name in CONTROLS),
        "fixed (optimizer",
        "adaclip (optimizer",
    ]

    lines = outputs["out_table"].read_text().splitlines()
    assert lines[0].startswith("Privacy audit at delta = 1e-05.")
    assert lines[2] == (
        "| method | theoretical eps | audited eps lower bound (95 %; Gaussian for rules, CP for the optimizer) "
        "| CP threshold bound (95 %) | mu_hat [band] | expected mu | verdict (pass = no violation found by this "
        "adversary) |"
    )
    assert len(lines) == 4 + len(expected_rows)
    assert all(line.startswith(f"| {name}") for line, name in zip(lines[4:], expected_rows, strict=True))

    report = json.loads(outputs["out_json"].read_text())
    assert report["config"]["trials"] == 16 and report["config"]["methods"] == ["fixed", "adaclip"]
    assert len(report["results"]) == len(expected_rows)
    assert {"theoretical_epsilon", "lower_bound", "mean_shift", "expected_mu", "verdict"} <= set(report["results"][0])

    assert outputs["out_figure"].with_suffix(".png").stat().st_size > 0
    assert outputs["out_figure"].with_suffix(".svg").stat().st_size > 0


def test_audit_notebook_rejects_a_misspelt_knob_before_any_work(tmp_path):
    with pytest.raises(
        papermill.PapermillExecutionError, match=r"audit: unknown audit key\(s\) \['trails'\]; accepted keys"
    ):
        run(tmp_path, {**TINY, "trails": 16})
    assert not (tmp_path / "reports").exists()
