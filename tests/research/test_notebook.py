"""The notebook runner drops papermill's and the kernel's timing metadata, and nothing else."""

import copy
import json

import pytest

from adaclip.research.notebook import main, strip_timing


def _executed():
    """An executed notebook as papermill and nbclient write it (timestamps, durations, paths)."""
    stamp = "2026-01-02T03:04:05.678901Z"
    return {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python", "version": "3.11.7"},
            "papermill": {
                "default_parameters": {},
                "parameters": {"params_file": "params.yaml"},
                "start_time": stamp,
                "end_time": stamp,
                "duration": 12.5,
                "exception": None,
                "input_path": "notebooks/x.ipynb",
                "output_path": "reports/notebooks/.x.ipynb.abc123.ipynb",
                "environment_variables": {},
                "version": "2.6.0",
            },
        },
        "cells": [
            {
                "cell_type": "code",
                "id": "a1",
                "execution_count": 1,
                "metadata": {
                    "tags": ["parameters"],
                    "execution": {
                        "iopub.execute_input": stamp,
                        "iopub.status.busy": stamp,
                        "iopub.status.idle": stamp,
                        "shell.execute_reply": stamp,
                    },
                    "papermill": {
                        "start_time": stamp,
                        "end_time": stamp,
                        "duration": 0.01,
                        "status": "completed",
                        "exception": False,
                    },
                },
                "source": ["params_file = 'params.yaml'\n"],
                "outputs": [{"output_type": "stream", "name": "stdout", "text": ["took 3 s\n"]}],
            },
            {"cell_type": "markdown", "id": "b2", "metadata": {"collapsed": True}, "source": ["# Title"]},
        ],
    }


def test_strip_timing_removes_timing_metadata_and_nothing_else():
    original = _executed()
    stripped = strip_timing(copy.deepcopy(original))
    assert stripped["metadata"]["papermill"] == {"default_parameters": {}, "parameters": {"params_file": "params.yaml"}}
    code, markdown = stripped["cells"]
    assert code["metadata"] == {"tags": ["parameters"], "papermill": {}}
    assert markdown == original["cells"][1]
    for before, after in zip(original["cells"], stripped["cells"], strict=True):
        assert after["source"] == before["source"] and after.get("outputs") == before.get("outputs")
        assert after.get("execution_count") == before.get("execution_count") and after["id"] == before["id"]
    for key in ("kernelspec", "language_info"):
        assert stripped["metadata"][key] == original["metadata"][key]
    assert {k: v for k, v in stripped.items() if k not in ("metadata", "cells")} == {"nbformat": 4, "nbformat_minor": 5}
    # two runs that differ only in their timing give the same file
    later = _executed()
    later["metadata"]["papermill"]["duration"] = 99.0
    later["cells"][0]["metadata"]["execution"]["iopub.status.idle"] = "2027-01-01T00:00:00Z"
    later["metadata"]["papermill"]["output_path"] = "reports/notebooks/.x.ipynb.zzz.ipynb"
    assert json.dumps(strip_timing(later)) == json.dumps(stripped)
    # an output that changed is not hidden
    later["cells"][0]["outputs"][0]["text"] = ["took 4 s\n"]
    assert strip_timing(later) != stripped


def test_strip_timing_accepts_a_notebook_without_papermill_metadata():
    notebook = {"metadata": {}, "cells": [{"cell_type": "code", "metadata": {}, "source": [], "outputs": []}]}
    assert strip_timing(copy.deepcopy(notebook)) == notebook


@pytest.fixture
def notebook(tmp_path):
    def write(*sources):
        cells = [
            {
                "cell_type": "code",
                "id": "p",
                "metadata": {"tags": ["parameters"]},
                "source": "value = 1",
                "outputs": [],
            },
            *[
                {"cell_type": "code", "id": f"c{i}", "metadata": {}, "source": s, "outputs": []}
                for i, s in enumerate(sources)
            ],
        ]
        path = tmp_path / "in.ipynb"
        kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
        path.write_text(
            json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {"kernelspec": kernelspec}, "cells": cells})
        )
        return path

    return write


def test_runner_writes_the_executed_notebook_without_timings_or_fails_leaving_nothing(tmp_path, notebook, capsys):
    out = tmp_path / "out" / "x.ipynb"
    assert main([str(notebook("print(value * 2)")), str(out), "-p", "value", "21"]) == 0
    executed = json.loads(out.read_text())
    assert "".join(executed["cells"][-1]["outputs"][0]["text"]) == "2121\n"  # injected, as a string
    assert set(executed["metadata"]["papermill"]) <= {"default_parameters", "parameters"}
    assert all("execution" not in c["metadata"] for c in executed["cells"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.ipynb"]  # no temporary file left
    failing = tmp_path / "out" / "y.ipynb"
    assert main([str(notebook("raise ValueError('boom')")), str(failing)]) == 1
    assert "boom" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.ipynb"]  # no output and no half-written file


def test_the_injected_parameters_cell_gets_the_same_id_on_every_run():
    """papermill gives the cell it injects a random id; two runs with the same numbers must write the same bytes."""

    def run(random_id):
        injected = {"cell_type": "code", "id": random_id, "metadata": {"tags": ["injected-parameters"]}, "source": []}
        other = {"cell_type": "code", "id": "kept", "metadata": {"tags": ["parameters"]}, "source": []}
        return strip_timing({"metadata": {}, "cells": [other, injected]})

    first, second = run("691b4f42"), run("60357f81")
    assert first == second and [cell["id"] for cell in first["cells"]] == ["kept", "injected-parameters"]
