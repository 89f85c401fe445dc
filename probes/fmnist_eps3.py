"""Fashion-MNIST at epsilon = 3 (delta = 1e-5, PRV): test accuracy per method after a small search.

For each model and method, train with each learning rate in the grid, pick the best by validation
accuracy (per epoch, so the epoch count is searched too), and report that run's test accuracy at the
chosen epoch and the wall time per epoch.  Every run goes through ``adaclip.research.train.run``.

    .venv/bin/python probes/fmnist_eps3.py --model logistic --epochs 5 --lrs 0.5 2 8
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from adaclip.research.io import markdown_table, write_text_atomic
from adaclip.research.train import run

METHODS = ("fixed", "adaclip", "quantile", "auto", "nonprivate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("logistic", "cnn"), required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--lrs", type=float, nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("reports/probes"))
    parser.add_argument("--name", help="output file name without .md (default fmnist_eps3_<model>)")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    rows = []
    for method in args.methods:
        best = None
        for lr in args.lrs:
            record = run(
                {
                    "dataset": "fashion-mnist",
                    "model": args.model,
                    "method": method,
                    "epsilon": 3.0,
                    "delta": 1e-5,
                    "accountant": "prv",
                    "epochs": args.epochs,
                    "lr": lr,
                    "seed": 0,
                    "progress": False,
                }
            )
            for epoch in record["per_epoch"]:
                print(method, lr, epoch, flush=True)
                if best is None or epoch["val_accuracy"] > best[1]["val_accuracy"]:
                    best = (lr, epoch, record)
        lr, epoch, record = best
        rows.append(
            [
                method,
                lr,
                epoch["epoch"],
                epoch["val_accuracy"],
                epoch["test_accuracy"],
                record["noise_multiplier"] if record["noise_multiplier"] is not None else "-",
                record["wall_time_s"] / args.epochs,
            ]
        )
    header = ["method", "lr", "epoch", "val accuracy", "test accuracy", "sigma", "s / epoch"]
    caption = (
        f"Fashion-MNIST, {args.model}, epsilon = 3 (delta = 1e-5, PRV; sigma calibrated for {args.epochs} epochs), "
        f"B = 256, 55k train / 5k validation / 10k test, seed 0; lr grid {args.lrs}, best epoch by validation.\n\n"
    )
    write_text_atomic(
        args.out / f"{args.name or 'fmnist_eps3_' + args.model}.md", caption + markdown_table(header, rows)
    )
    print(caption + markdown_table(header, rows))


if __name__ == "__main__":
    main()
