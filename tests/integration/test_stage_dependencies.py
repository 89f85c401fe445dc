"""Every DVC stage lists, as a dependency, every adaclip module its command imports.

A stage whose command imports a module that ``dvc.yaml`` does not list would keep stale outputs after
that module changes.  For each stage this test imports what its command imports, in a fresh process,
and checks that every ``adaclip`` module loaded is covered by a dependency (the file, or a folder
above it): ``python -m adaclip <command>`` imports the CLI and the command's module
(:data:`adaclip.research.cli.COMMAND_MODULES`); a script or a notebook its import statements.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = PIPELINE["stages"]
VARS = {name: value for entry in PIPELINE.get("vars", []) for name, value in entry.items()}


def expanded_stages() -> dict[str, dict]:
    stages = {}
    for name, stage in STAGES.items():
        if "foreach" in stage:
            for item in stage["foreach"]:
                body = json.loads(json.dumps(stage["do"]).replace("${item}", item))
                stages[f"{name}@{item}"] = body
        else:
            stages[name] = stage
    return stages


def import_statements(code: str) -> list[str]:
    tree = ast.parse(code)
    return [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def entry_imports(cmd: str) -> list[str]:
    """Python import statements that load what the stage's command loads."""
    statements = []
    for name, value in VARS.items():  # dvc.yaml's vars, e.g. ${nb}: the notebook runner
        cmd = cmd.replace(f"${{{name}}}", value)
    for command in re.findall(r"-m adaclip (\w+)", cmd):
        statements += [
            "import importlib, adaclip.research.cli as cli",
            f"importlib.import_module(cli.COMMAND_MODULES[{command!r}])",
        ]
    for module in re.findall(r"-m (adaclip\.[\w.]+)", cmd):
        statements.append(f"import {module}")
    for script in re.findall(r"(\S+\.py)\b", cmd):
        statements += import_statements((ROOT / script).read_text())
    for notebook in re.findall(r"(notebooks/\S+\.ipynb)", cmd):
        cells = json.loads((ROOT / notebook).read_text())["cells"]
        for cell in cells:
            if cell["cell_type"] == "code":
                statements += import_statements("".join(cell["source"]))
    return statements


def loaded_files(statements: list[str]) -> set[str]:
    code = "\n".join(
        [
            *statements,
            "import sys",
            "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.startswith('adaclip')))",
        ]
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return {str(Path(path).resolve().relative_to(ROOT)) for path in result.stdout.split()}


STAGE_ITEMS = sorted(expanded_stages().items())


@pytest.mark.parametrize("name, stage", STAGE_ITEMS, ids=[name for name, _ in STAGE_ITEMS])
def test_stage_depends_on_every_module_its_command_imports(name, stage):
    statements = entry_imports(stage["cmd"])
    if not statements:
        pytest.fail(f"stage {name}: no Python entry point recognised in its command {stage['cmd']!r}")
    deps = [str(Path(d)) for d in stage.get("deps", [])]
    missing = sorted(f for f in loaded_files(statements) if not any(f == d or f.startswith(d + os.sep) for d in deps))
    assert not missing, f"stage {name} imports modules dvc.yaml does not list as deps: {missing}"


def test_the_check_sees_a_missing_module():
    files = loaded_files(entry_imports("python -m adaclip aggregate"))
    assert "src/adaclip/research/report.py" in files and "src/adaclip/research/analysis.py" in files


def test_the_lock_holds_exactly_the_stages_of_the_pipeline():
    """A stage removed from dvc.yaml must leave dvc.lock too (DVC keeps a removed stage's entry)."""
    locked = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    assert sorted(locked) == sorted(expanded_stages())
