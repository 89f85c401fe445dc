"""Source notebooks: committed without outputs, strict about parameters; the committed report is whole.

Every notebook also runs end to end through papermill in tests/test_dvc_pipeline.py (tiny profile).
"""

import json
import re
from pathlib import Path

import papermill
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def shows_a_figure_and_a_finding(executed: dict) -> bool:
    """An executed notebook reads as a paper's section: at least one figure shown inline (a PNG output), and a
    cell tagged ``findings`` whose output is the generated finding as Markdown."""
    outputs = [o for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    findings = [
        o
        for c in executed["cells"]
        if "findings" in c.get("metadata", {}).get("tags", [])
        for o in c.get("outputs", [])
        if "".join(o.get("data", {}).get("text/markdown", "")).strip()  # a string, or a list of lines once saved
    ]
    return any("image/png" in o.get("data", {}) for o in outputs) and bool(findings)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_executed_notebook_shows_its_figures_and_ends_with_its_finding(path):
    executed = json.loads((ROOT / "reports" / "notebooks" / path.name).read_text())
    assert shows_a_figure_and_a_finding(executed), f"reports/notebooks/{path.name}: no inline figure or no finding"
    assert "findings" in executed["cells"][-1]["metadata"].get("tags", []), "the finding closes the notebook"


def test_the_check_sees_a_notebook_without_figures_or_finding():
    figure = {"output_type": "display_data", "data": {"image/png": "iVBOR"}}
    finding = {"output_type": "display_data", "data": {"text/markdown": "**1. Less noise?** ..."}}
    cell = lambda outputs, tags=(): {"cell_type": "code", "metadata": {"tags": list(tags)}, "outputs": outputs}  # noqa: E731
    assert shows_a_figure_and_a_finding({"cells": [cell([figure]), cell([finding], ["findings"])]})
    assert not shows_a_figure_and_a_finding({"cells": [cell([]), cell([finding], ["findings"])]})
    assert not shows_a_figure_and_a_finding({"cells": [cell([figure]), cell([finding])]})  # not tagged
    assert not shows_a_figure_and_a_finding({"cells": [cell([figure]), cell([], ["findings"])]})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_source_notebook_has_no_outputs_and_one_parameters_cell(path):
    cells = json.loads(path.read_text())["cells"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in cells if c["cell_type"] == "code"), path
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1


def test_a_misspelt_notebook_parameter_is_an_error(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match=r"unknown notebook parameter\(s\) \['report_dir'\]"):
        papermill.execute_notebook(
            str(ROOT / "notebooks" / "accounting.ipynb"),
            str(tmp_path / "out.ipynb"),
            parameters={"report_dir": str(tmp_path)},
            kernel_name="python3",
            progress_bar=False,
        )
    assert not (tmp_path / "tables").exists()


def test_every_figure_and_table_the_committed_reports_name_exists():
    for readme in (ROOT / "README.md", ROOT / "reports" / "README.md"):
        links = re.findall(r"\]\(([^)#]+\.(?:png|svg|md|html|ipynb))\)", readme.read_text())
        assert links, readme
        for link in links:
            assert (readme.parent / link).exists(), f"{readme.name} names {link}"
