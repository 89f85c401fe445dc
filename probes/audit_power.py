"""The audit's lower bounds for every method and control: the Gaussian trade-off bound against Clopper–Pearson.

Runs the audit of ``notebooks/audit.ipynb`` with the library's default ``AuditConfig`` (500 trials per world,
sigma = 2, 2 steps, delta = 1e-5, 95 %) and tabulates, per row, the theoretical epsilon, the headline lower
bound (Gaussian trade-off for rule audits, Clopper–Pearson for the optimizer path), the Clopper–Pearson
threshold bound, ``mu_hat`` with its band, and the verdict.  One process:

    PYTHONPATH=src .venv/bin/python probes/audit_power.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from adaclip.audit import audit_config, audit_method, audit_optimizer
from adaclip.audit.controls import CONTROLS, audit_control
from adaclip.research.io import markdown_table, write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/probes/audit_power.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = audit_config()
    start = time.perf_counter()
    results = [audit_method(method, config) for method in config.method_names]
    results += [audit_control(name, config) for name in CONTROLS]
    results += [audit_optimizer(method, config) for method in config.method_names]
    seconds = time.perf_counter() - start
    rows = [
        [
            r.name,
            r.kind,
            r.theoretical_epsilon,
            r.lower_bound.epsilon,
            f"{r.lower_bound.epsilon / r.theoretical_epsilon:.0%}",
            r.threshold_bound.epsilon,
            f"{r.mean_shift.estimate:.3f} [{r.mean_shift.low:.3f}, {r.mean_shift.high:.3f}]",
            r.expected_mu,
            r.verdict,
        ]
        for r in results
    ]
    header = [
        "audit",
        "kind",
        "theoretical eps",
        "headline lower bound",
        "of theory",
        "CP threshold bound",
        "mu_hat [band]",
        "expected mu",
        "verdict",
    ]
    text = (
        f"Default AuditConfig ({config.trials} trials per world, sigma = {config.noise_multiplier:g}, "
        f"{config.steps} steps, B = {config.expected_batch_size}, d = {config.dim}, delta = {config.delta:g}, "
        f"{config.confidence:.0%}; optimizer path: {config.optimizer_trials} trials, sigma = "
        f"{config.optimizer_noise_multiplier:g}, {config.optimizer_steps} steps, q = "
        f"{config.expected_batch_size / config.optimizer_dataset_size:g}), {seconds:.0f} s in one process on a "
        "shared 2-core machine (probes/audit_power.py).  Headline bound: Gaussian trade-off of mu_hat's one-sided "
        "lower limit for the rule audits and controls, Clopper–Pearson for the optimizer path.  pass = no violation "
        "found by this adversary.\n\n" + markdown_table(header, rows)
    )
    write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
