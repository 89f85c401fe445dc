"""End to end: `dvc repro` of the tiny profile in a copy of the repository, offline (scikit-learn data only).

The copy runs every stage, so every notebook runs through papermill with tiny parameters into a
temporary directory; a second `dvc repro` must find nothing to do, and `dvc exp run -S` must work.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name.startswith("reports/") or name == "dvc.lock" or not (ROOT / name).is_file():
            continue
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    shutil.copy(ROOT / "tests" / "fixtures" / "params-tiny.yaml", repo / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1"}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny"], repo, env)
    log = _run(["dvc", "repro"], repo, env)
    return repo, env, log


def _declared_outputs(repo):
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    outs = []
    for stage in stages.values():
        for out in stage.get("do", stage).get("outs", []):
            outs.append(next(iter(out)) if isinstance(out, dict) else out)
    return outs


def test_repro_writes_every_declared_output_and_the_report(tiny_repo):
    repo, _, _ = tiny_repo
    for out in _declared_outputs(repo):
        for item in (["accuracy", "clip", "size", "diagnostics"] if "${item}" in out else [None]):
            path = repo / (out.replace("${item}", item) if item else out)
            assert path.exists(), path
    for notebook in (repo / "notebooks").glob("*.ipynb"):
        executed = json.loads((repo / "reports" / "notebooks" / notebook.name).read_text())
        assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code"), notebook.name
    readme = (repo / "reports" / "README.md").read_text()
    assert "profile" in readme and "tiny" in readme
    for link in re.findall(r"\]\(([^)]+\.(?:png|md))\)", readme):
        assert (repo / "reports" / link).exists(), link
    html = (repo / "reports" / "report.html").read_text()
    assert "data:image/png;base64" in html and 'src="figures/' not in html  # self-contained


def test_metrics_show_prints_a_question_by_method_table(tiny_repo):
    repo, env, _ = tiny_repo
    out = _run(["dvc", "metrics", "show"], repo, env)
    header = out.splitlines()[0].split()
    assert header[0] == "Path" and {"adaclip", "fixed", "quantile"} <= set(header)
    assert "reports/metrics/q3_breast-cancer_eps3.json" in out


def test_second_repro_does_nothing(tiny_repo):
    repo, env, _ = tiny_repo
    out = _run(["dvc", "repro"], repo, env)
    assert "Running stage" not in out
    assert "Data and pipelines are up to date." in out


def test_exp_run_with_a_changed_parameter_reruns_only_what_depends_on_it(tiny_repo):
    repo, env, _ = tiny_repo
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "lock"], repo, env)
    out = _run(["dvc", "exp", "run", "-S", "theory.steps=50"], repo, env)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"noise", "aggregate", "report"}
