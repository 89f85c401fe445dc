"""The command-line rows of ``tests/test_bad_inputs.py``, run as a new user would, against any source tree.

Each row runs ``python -m adaclip train`` in a fresh process with the row's arguments (``--out`` in an empty
folder, as the test does) and records the exit status, how many lines went to stderr, whether the last of
them is a Python traceback's, and whether anything was left in the folder.  Run it once with this branch's
``src`` and once with another tree's (e.g. the main checkout) to see what changed:

    PYTHONPATH=src .venv/bin/python probes/bad_inputs.py --src src --src /work/main/src

The rows are read from the test module with this branch's code; only the subprocesses use ``--src``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from adaclip.research.io import markdown_table, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def table() -> ModuleType:
    """``tests/test_bad_inputs.py`` (the tests folder is not a package)."""
    sys.path.insert(0, str(ROOT / "tests"))
    return importlib.import_module("test_bad_inputs")


def outcome(src: str, extra: list[str]) -> dict[str, object]:
    rows = table()
    with tempfile.TemporaryDirectory() as name:
        folder, before = rows.prepared_folder(Path(name))
        args = [part.replace("{tmp}", str(folder)) for part in extra]
        out = [] if "--out" in args else ["--out", str(folder / "out" / "run.json")]
        base = [] if "--config" in args else rows.BASE
        done = subprocess.run(
            [sys.executable, "-m", "adaclip", "train", *base, *out, *args],
            env={**os.environ, "PYTHONPATH": src, "TQDM_DISABLE": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        left = sorted({p.name for p in folder.iterdir()} - before) + [
            f"folder/{p.name}" for p in (folder / "folder").iterdir()
        ]
        lines = done.stderr.strip().splitlines()
        return {
            "code": done.returncode,
            "lines": len(lines),
            "traceback": any(line.startswith("Traceback") for line in lines),
            "left": ", ".join(left) or "-",
            "last": (lines or done.stdout.strip().splitlines() or [""])[-1][:110],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", action="append", required=True, help="a source tree's src folder (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "probes" / "bad_inputs.md")
    args = parser.parse_args()
    header = ["row"] + [f"{label} ({src})" for src in args.src for label in ("exit", "stderr lines")]
    header += [f"left behind ({src})" for src in args.src] + [f"message ({args.src[0]})"]
    rows, summary = [], {src: {"exit 2, one line, nothing left": 0} for src in args.src}
    cli_rows = table().CLI_ROWS
    for row, extra, _ in cli_rows:
        results = {src: outcome(src, extra) for src in args.src}
        for src, result in results.items():
            if result["code"] == 2 and result["lines"] == 1 and result["left"] == "-":
                summary[src]["exit 2, one line, nothing left"] += 1
        cells: list[object] = [row]
        for src in args.src:
            cells += [
                results[src]["code"],
                str(results[src]["lines"]) + (" (traceback)" if results[src]["traceback"] else ""),
            ]
        cells += [results[src]["left"] for src in args.src] + [results[args.src[0]]["last"].replace("|", "/")]
        rows.append(cells)
        print(row, {src: (r["code"], r["lines"]) for src, r in results.items()}, flush=True)
    totals = "; ".join(
        f"{src}: {summary[src]['exit 2, one line, nothing left']} of {len(cli_rows)} rows exit 2 with one line "
        "and leave nothing"
        for src in args.src
    )
    text = (
        f"The {len(cli_rows)} command-line rows of tests/test_bad_inputs.py, each `python -m adaclip train` in a fresh "
        f"process with `--out` in an empty folder (probes/bad_inputs.py). {totals}.\n\n" + markdown_table(header, rows)
    )
    write_text_atomic(args.out, text)
    print(totals)


if __name__ == "__main__":
    main()
