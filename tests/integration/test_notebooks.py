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
