"""Smoke test: every source notebook runs through papermill with tiny parameters."""

import json
from pathlib import Path

import papermill

ROOT = Path(__file__).resolve().parents[1]


def test_notebooks_are_committed_without_outputs():
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(path.read_text())["cells"]
        assert not any(c.get("outputs") or c.get("execution_count") for c in cells if c["cell_type"] == "code"), path


def test_accounting_notebook_writes_its_table(tmp_path):
    out_table = tmp_path / "accounting.md"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "accounting.ipynb"),
        str(tmp_path / "executed.ipynb"),
        parameters={
            "accounting": {"dataset_size": 1000, "expected_batch_size": 100, "epochs": 1, "delta": 1e-5, "noise_multipliers": [1.0]},
            "out_table": str(out_table),
        },
        kernel_name="python3",
        progress_bar=False,
    )
    lines = out_table.read_text().splitlines()
    assert lines[0].startswith("Epsilon at delta = 1e-05 after 10 steps")
    assert lines[2].startswith("| noise multiplier | epsilon (PRV) | epsilon (PLD) | epsilon (RDP) |")
    assert len(lines) == 5 and lines[4].startswith("| 1 |")
