"""``examples/opacus_port.py`` runs as a script, and a run stopped after one epoch and resumed from its
checkpoint ends with the parameters and epsilon of a run that was never stopped."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "opacus_port.py"


def _script(*args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, str(EXAMPLE), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _in_process(*args: str, capsys) -> str:
    spec = importlib.util.spec_from_file_location("opacus_port_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the scripts run: float sums in another order would give other parameters
    try:
        module.main(list(args))
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def _final(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("final:")]
    assert len(lines) == 1 and re.fullmatch(r"final: epochs 2, epsilon \d+\.\d{6}, parameters [0-9a-f]{16}", lines[0])
    return lines[0]


def test_the_example_resumes_from_its_checkpoint_to_the_uninterrupted_run(tmp_path, capsys):
    small = ("--examples", "256")
    uninterrupted = _in_process(*small, "--epochs", "2", "--checkpoint", str(tmp_path / "whole.pt"), capsys=capsys)
    first = _script(*small, "--epochs", "1", "--checkpoint", "run.pt", cwd=tmp_path)
    assert "epoch 1:" in first and (tmp_path / "run.pt").exists()
    resumed = _script(*small, "--epochs", "2", "--checkpoint", "run.pt", cwd=tmp_path)
    assert "resumed after epoch 1" in resumed and "epoch 1:" not in resumed
    assert _final(resumed) == _final(uninterrupted)
