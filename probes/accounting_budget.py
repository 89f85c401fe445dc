"""What a PRV or PLD evaluation costs against the grid that ``adaclip.privacy.accounting.grid_points`` predicts.

For settings from an ordinary run (sigma near 1) down to the small sigmas where the grid explodes, time one
epsilon evaluation per accountant (and its peak traced memory, in a second evaluation under ``tracemalloc``,
which slows it) where the predicted grid is at most ``--max-points``; the budgets ``PRV_MAX_POINTS``,
``PLD_MAX_STEP_POINTS`` and ``PLD_MAX_POINTS`` were read off this table.  One process, one thread:

    PYTHONPATH=src .venv/bin/python probes/accounting_budget.py
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc
from pathlib import Path

import torch

from adaclip.privacy.accounting import (
    PLD_MAX_POINTS,
    PLD_MAX_STEP_POINTS,
    PRV_MAX_POINTS,
    _epsilon_unchecked,
    grid_points,
)
from adaclip.research.io import markdown_table, write_text_atomic

SETTINGS = [  # (sigma, q, steps)
    (1.0, 0.0047, 2150),  # Fashion-MNIST, B = 256, 10 epochs
    (0.6, 0.0047, 2150),
    (1.0, 0.07, 280),  # breast-cancer, B = 32, 20 epochs
    (0.5, 0.01, 1000),
    (0.4, 0.01, 1000),
    (0.3, 0.01, 1000),
    (0.2, 0.01, 1000),
    (0.1, 0.01, 1000),
    (0.05, 0.01, 1000),  # the example
    (0.5, 0.2, 3),
    (2.0, 1.0, 2),  # the audit's setting
]


def measure(sigma: float, q: float, steps: int, accountant: str) -> tuple[float, float]:
    """Seconds of one evaluation, and its peak traced memory in MB (a second evaluation)."""
    start = time.perf_counter()
    _epsilon_unchecked(sigma, q, steps, 1e-5, accountant)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    _epsilon_unchecked(sigma, q, steps, 1e-5, accountant)
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-points", type=float, default=8e6, help="skip evaluations predicted above this")
    parser.add_argument("--out", type=Path, default=Path("reports/probes/accounting_budget.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    rows = []
    for sigma, q, steps in SETTINGS:
        for accountant in ("prv", "pld"):
            step, composed = grid_points(sigma, q, steps, 1e-5, accountant)
            if max(step, composed) > args.max_points:
                seconds, peak = "skipped", "skipped"
            else:
                seconds, peak = (f"{value:.2f}" for value in measure(sigma, q, steps, accountant))
            budget = (
                composed <= PRV_MAX_POINTS
                if accountant == "prv"
                else step <= PLD_MAX_STEP_POINTS and composed <= PLD_MAX_POINTS
            )
            rows.append(
                [
                    sigma,
                    q,
                    steps,
                    accountant,
                    f"{step:.3g}",
                    f"{composed:.3g}",
                    seconds,
                    peak,
                    "yes" if budget else "RDP",
                ]
            )
            print(rows[-1], flush=True)
    header = ["sigma", "q", "steps", "accountant", "step grid", "composed grid", "seconds", "peak MB", "within budget"]
    text = (
        "One epsilon evaluation (delta = 1e-5) per setting and accountant on one CPU thread of a shared 2-core "
        f"machine whose 1-minute load average was {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the "
        "end (other jobs: the seconds are inflated and noisy, the memory is not) (probes/accounting_budget.py); "
        "peak MB is tracemalloc's peak of a second evaluation.  Grids are "
        f"the predictions of grid_points; budgets: PRV {PRV_MAX_POINTS:.0e} points, PLD {PLD_MAX_STEP_POINTS:.0e} "
        f"per step and {PLD_MAX_POINTS:.0e} composed; 'RDP' means the accountant falls back to RDP there.\n\n"
        + markdown_table(header, rows)
    )
    write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()
