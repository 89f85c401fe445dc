"""Data-parallel (torchrun, N processes) against single-process training with the same arguments.

For each method and seed, run ``python -m adaclip train ARGS`` and ``torchrun --standalone
--nproc_per_node N -m adaclip train ARGS`` and tabulate epsilon, steps and test accuracy.  The two
runs of a seed share the model initialisation and the noise seed but not the Poisson batches (each
rank samples its own share), so their accuracies agree only within seed-to-seed noise: the table
gives the per-method mean and standard deviation over seeds for both.

    PYTHONPATH=src .venv/bin/python probes/distributed_vs_single.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from adaclip.research.io import markdown_table, write_text_atomic

ARGS = [
    "--dataset",
    "fashion-mnist",
    "--model",
    "logistic",
    "--train-size",
    "10000",
    "--epochs",
    "3",
    "--batch-size",
    "256",
    "--epsilon",
    "3",
    "--delta",
    "1e-5",
    "--no-progress",
]


def _train(extra: list[str], processes: int, out: Path) -> dict:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        if processes > 1
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    subprocess.run([*launcher, "-m", "adaclip", "train", *ARGS, *extra, "--out", str(out)], check=True, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["fixed", "adaclip", "quantile"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("reports/probes/distributed_vs_single.md"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods:
            runs: dict[int, list[dict]] = {1: [], args.processes: []}
            for seed in args.seeds:
                for processes in runs:
                    out = Path(scratch) / f"{method}_{seed}_{processes}.json"
                    runs[processes].append(_train(["--method", method, "--seed", str(seed)], processes, out))
                    print(method, seed, processes, runs[processes][-1]["test_accuracy"], flush=True)
            for processes, records in runs.items():
                accuracies = [r["test_accuracy"] for r in records]
                rows.append(
                    [
                        method,
                        processes,
                        f"{records[0]['epsilon']:.4f}",
                        records[0]["steps"],
                        f"{100 * statistics.mean(accuracies):.2f} ± {100 * statistics.stdev(accuracies):.2f}",
                        " / ".join(f"{100 * a:.2f}" for a in accuracies),
                        f"{statistics.mean(r['wall_time_s'] for r in records):.1f}",
                    ]
                )
    header = (
        "Fashion-MNIST logistic regression, 10k training examples, 3 epochs, B = 256, "
        "epsilon = 3 (delta = 1e-5, PRV), "
        f"each method's default learning rate; seeds {args.seeds}; one process vs torchrun with {args.processes} gloo "
        "processes on CPU (one thread each). Same arguments, same initialisation and noise seed; "
        "the Poisson batches differ. "
        "Wall times on a shared 2-core machine: compare only roughly.\n\n"
    )
    table = markdown_table(
        ["method", "processes", "epsilon", "steps", "test accuracy (%) mean ± sd", "per seed", "wall s"], rows
    )
    write_text_atomic(args.out, header + table + "\n")
    print(header + table)


if __name__ == "__main__":
    main()
