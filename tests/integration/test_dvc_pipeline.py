"""End to end: `dvc repro` of the tiny profile in a copy of the repository, offline (scikit-learn data only).

The copy runs every stage, so every notebook runs through papermill with tiny parameters into a
temporary directory; a second `dvc repro` must find nothing to do, `dvc exp run -S` must work, and a
queued grid of experiments must run in parallel (`dvc queue start -j 2`) without touching the
workspace or each other's outputs.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sklearn.datasets import load_breast_cancer
from test_notebooks import shows_a_figure_and_a_finding

ROOT = Path(__file__).resolve().parents[2]


def _run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def _stdout(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _commit(repo, env, message):
    """Commit the copy's whole state (outputs and dvc.lock included); tests may run in any order."""
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", message, "--allow-empty"], repo, env)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
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
        for item in ["accuracy", "size", "diagnostics"] if "${item}" in out else [None]:
            path = repo / (out.replace("${item}", item) if item else out)
            assert path.exists(), path
    for notebook in (repo / "notebooks").glob("*.ipynb"):
        executed = json.loads((repo / "reports" / "notebooks" / notebook.name).read_text())
        assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code"), notebook.name
        assert shows_a_figure_and_a_finding(executed), notebook.name
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
    _commit(repo, env, "lock")
    out = _run(["dvc", "exp", "run", "-S", "theory.steps=50"], repo, env)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"noise", "aggregate", "report"}


QUEUE_TIMEOUT_S = 600  # two tiny experiments take about 3 minutes on 2 busy cores


def _workspace_digest(repo):
    """SHA-256 of every workspace file (outputs and DVC-tracked runs/ included), outside .git and .dvc."""
    return {
        str(path.relative_to(repo)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(repo.rglob("*"))
        if path.is_file() and path.relative_to(repo).parts[0] not in (".git", ".dvc")
    }


def _queue_tasks(repo, env):
    """``{task: status}`` from `dvc queue status` (rows: task, name, created time, status)."""
    lines = _stdout(["dvc", "queue", "status"], repo, env).splitlines()
    rows = [line.split() for line in lines if re.match(r"[0-9a-f]{7} ", line)]
    return {row[0]: row[-1] for row in rows}


def _wait_for_queue(repo, env, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tasks = _queue_tasks(repo, env)
        if tasks and not {"Queued", "Running"} & set(tasks.values()):
            return tasks
        time.sleep(10)  # each `dvc queue status` costs about a second of CPU
    raise AssertionError(f"queued experiments did not finish within {timeout_s} s: {_queue_tasks(repo, env)}")


def _start_workers(repo, env, jobs):
    """`dvc queue start -j jobs`.

    Its output goes to a file, as the background workers inherit it (a pipe would wait for them).
    """
    with open(repo / ".dvc" / "tmp" / "queue-start.log", "w+") as log:
        result = subprocess.run(
            ["dvc", "queue", "start", "-j", str(jobs)],
            cwd=repo,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
        log.seek(0)
        assert result.returncode == 0, f"dvc queue start failed:\n{log.read()[-3000:]}"


def _stop_workers(repo, env, kill):
    _run(["dvc", "queue", "stop", *(["--kill"] if kill else [])], repo, env)
    deadline = time.monotonic() + 60
    while "Worker status: 0 active, 0 idle" not in _run(["dvc", "queue", "status"], repo, env):
        assert time.monotonic() < deadline, "dvc queue workers still alive 60 s after dvc queue stop"
        time.sleep(10)


def test_queued_grid_runs_in_parallel_in_isolated_workspaces(tiny_repo):
    """The README's parallel-sweep commands: a grid over the diagnostics sweep's seed.

    Each experiment reruns a real training sweep (sweep@diagnostics) and what depends on it (noise,
    heterogeneity, aggregate, report) in its own copy under .dvc/tmp/exps, two at a time. The workspace imports adaclip
    from its own src/ (as after `pip install -e .`) and that code is broken after queueing: the queued
    experiments must run the code they were queued with, and leave the workspace untouched.
    """
    repo, env, _ = tiny_repo
    _commit(repo, env, "reproduced")  # experiments start from a reproduced state and rerun only what a param changes
    env = {**env, "PYTHONPATH": str(repo / "src")}
    before = _workspace_digest(repo)
    seeds = (1, 2)
    _run(["dvc", "exp", "run", "--queue", "-S", f"diagnostics.seed={seeds[0]},{seeds[1]}"], repo, env)
    assert len(_queue_tasks(repo, env)) == len(seeds)
    report_module = repo / "src" / "adaclip" / "research" / "report.py"
    source = report_module.read_text()
    report_module.write_text(source + "\nraise RuntimeError('workspace code edited after queueing')\n")
    finished = False
    try:
        _start_workers(repo, env, jobs=2)
        tasks = _wait_for_queue(repo, env, QUEUE_TIMEOUT_S)
        finished = True
    finally:
        report_module.write_text(source)
        _stop_workers(repo, env, kill=not finished)
    failed = [task for task, status in tasks.items() if status != "Success"]
    assert not failed, "\n".join(_run(["dvc", "queue", "logs", task], repo, env)[-3000:] for task in failed)
    assert _workspace_digest(repo) == before
    for task in tasks:  # each reran the sweep whose params changed and what depends on it, nothing else
        ran = set(re.findall(r"Running stage '([^']+)'", _run(["dvc", "queue", "logs", task], repo, env)))
        assert ran == {"sweep@diagnostics", "noise", "heterogeneity", "aggregate", "report"}, (task, ran)

    baseline = json.loads(_stdout(["dvc", "exp", "show", "--json"], repo, env))[1]  # [0] is the workspace, [1] HEAD
    experiments = {}
    for experiment in baseline["experiments"]:
        data = experiment["revs"][0]["data"]
        experiments[data["params"]["params.yaml"]["data"]["diagnostics"]["seed"]] = (experiment["name"], data)
    assert sorted(experiments) == list(seeds)
    base_outs = baseline["data"]["outs"]
    diagnostics_hashes = {base_outs["runs/diagnostics.jsonl"]["hash"]}
    for name, data in experiments.values():
        # Only the sweep whose params changed has new records; the other sweeps are the baseline's.
        for out in ("runs/tuning.jsonl", "runs/accuracy.jsonl", "runs/size.jsonl"):
            assert data["outs"][out]["hash"] == base_outs[out]["hash"], (name, out)
        diagnostics_hashes.add(data["outs"]["runs/diagnostics.jsonl"]["hash"])
    assert len(diagnostics_hashes) == 1 + len(seeds)  # each experiment wrote its own, different records
    changed = _stdout(["dvc", "exp", "show", "--only-changed", "--csv"], repo, env)
    assert "diagnostics.seed" in changed and "accuracy.seeds" not in changed

    name, data = experiments[seeds[1]]
    _run(["dvc", "exp", "apply", name], repo, env)
    applied = repo / "runs" / "diagnostics.jsonl"
    assert hashlib.md5(applied.read_bytes()).hexdigest() == data["outs"]["runs/diagnostics.jsonl"]["hash"]
    records = [json.loads(line) for line in applied.read_text().splitlines()]
    assert {r["seed"] for r in records} == {seeds[1]}
    # AUTO-S has sensitivity 1: noise N(0, sigma^2 I) on the sum, divided by B, so E||noise||^2 = d sigma^2 / B^2
    auto = next(r for r in records if r["method"] == "auto")
    dim = (load_breast_cancer().data.shape[1] + 1) * 2  # the logistic model of 2 classes: Linear(features, 2)
    expected = dim * auto["noise_multiplier"] ** 2 / auto["config"]["batch_size"] ** 2
    assert auto["step_stats"]["noise_power"] == pytest.approx([expected] * auto["steps"], rel=1e-12)
    _run(["dvc", "exp", "branch", name, "seed-2"], repo, env)
    branched = yaml.safe_load(_stdout(["git", "show", "seed-2:params.yaml"], repo, env))
    assert branched["diagnostics"]["seed"] == seeds[1]
    _run(["git", "reset", "-q", "--hard"], repo, env)
    _run(["dvc", "checkout", "--force", "-q"], repo, env)
