"""Run a parameterised notebook with papermill and write its executed copy with reproducible metadata.

``python -m adaclip.research.notebook notebooks/x.ipynb reports/notebooks/x.ipynb -p params_file params.yaml``

papermill records start and end times and durations in the executed notebook's metadata and the kernel
records execution timestamps, so every run would change the file although every output is the same.
This runner drops that timing metadata, so that regenerating the report can be checked with
``git diff --exit-code`` (the outputs themselves must be deterministic, which the pipeline arranges).
The executed notebook is written atomically; a failing cell fails the command (exit 1) and names it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def strip_timing(notebook: dict[str, Any]) -> dict[str, Any]:
    """Remove papermill's and the kernel's timing metadata from an executed notebook, and give the cell papermill
    injects a fixed id, so that a rerun with the same numbers writes the same bytes."""
    papermill = notebook.get("metadata", {}).get("papermill", {})
    for key in (
        "start_time",
        "end_time",
        "duration",
        "exception",
        "input_path",
        "output_path",
        "environment_variables",
        "version",
    ):
        papermill.pop(key, None)
    for cell in notebook.get("cells", []):
        metadata = cell.get("metadata", {})
        if "injected-parameters" in metadata.get("tags", []):
            cell["id"] = "injected-parameters"  # papermill gives the cell it adds a random id on every run
        metadata.pop("execution", None)
        for key in ("start_time", "end_time", "duration", "status", "exception"):
            metadata.get("papermill", {}).pop(key, None)
    return notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaclip.research.notebook", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a notebook parameter; the value is passed as a string (unlike papermill's -p, no number parsing)",
    )
    args = parser.parse_args(argv)
    import papermill

    args.output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.output.parent, prefix=f".{args.output.name}.", suffix=".ipynb")
    os.close(fd)
    try:
        papermill.execute_notebook(
            str(args.input),
            tmp,
            parameters=dict(args.parameter),
            kernel_name="python3",
            progress_bar=False,
            log_output=False,
        )
        notebook = strip_timing(json.loads(Path(tmp).read_text(encoding="utf-8")))
        Path(tmp).write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, args.output)
    except Exception as error:  # papermill raises PapermillExecutionError naming the failing cell
        Path(tmp).unlink(missing_ok=True)
        print(f"error: {args.input}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
