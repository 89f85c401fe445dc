"""Probe: which AdaCliP variance estimator should be the default, and how do DP-MacAdam and DP-AdamBC compare?

What it measures
----------------
Each method (AdaCliP with each ``estimator``, DP-MacAdam, DP-AdamBC, DP-SGD) is trained privately
with plain SGD (no momentum) wrapping it, at (epsilon, delta) = (3, 1e-5) with the PRV accountant,
expected batch size B = 256 and 3 epochs (sigma calibrated once per task for int(1 / q) steps per
epoch, so every run spends the same budget), on two tasks:

* ``fmnist``: Fashion-MNIST multinomial logistic regression (``adaclip.research.datasets.load_dataset``:
  10,000 training images, 5,000 validation, the 10,000 test images; pixels standardised by one scalar
  mean and std of the training split).
* ``synthetic-<spread>``: ``adaclip.research.data.synthetic_logistic`` (12,000 examples drawn once with
  seed 0, d = 50, feature scales log-spaced over ``spread``), the first 10,000 for training, then 1,000
  validation and 1,000 test, not standardised (standardising per feature would remove the spread and put
  h near 1), logistic regression with two outputs.

Protocol: for every method, a small grid (learning rate; DP-SGD also C; DP-AdamBC also gamma') is run
with selection seeds 0, 1, 2; the configuration with the best mean validation accuracy is then re-run
with fresh evaluation seeds 3-7, whose validation and test accuracies are reported (mean and 95 %
t-interval over the 5 seeds).  A run's seed fixes the initialisation, the Poisson batches and the
noise, so runs with equal seeds share their batches: the test-accuracy difference to DP-SGD is paired
by seed.

Release signal-to-noise ratio: at every step, ``||noise-free release||^2 / E||noise||^2`` in gradient
units, where the noise-free release is ``V / B + a`` (``V`` the clipped sum, ``a`` the rule's shift:
AdaCliP's and DP-MacAdam's ``a`` or ``m^``, 0 for DP-SGD and DP-AdamBC) and ``E||noise||^2`` the rule's
``noise_power``; both are averaged over the last epoch's steps and their ratio is reported (for the Adam
rules it is the SNR of the privatised gradient, before the Adam step).  The shift ``a`` is a moving
average of earlier releases, so for shifted rules the *centred* SNR ``||V / B||^2 / E||noise||^2`` (this
step's fresh information only) is reported as well; for DP-SGD and DP-AdamBC the two are equal.

Heterogeneity index ``h = (sum_j s_j)^2 / (d sum_j s_j^2)``, ``s_j`` the standard deviation over
training examples of coordinate ``j`` of the per-example gradient, at the initial model of seed 0 and
at the final model of DP-SGD's first evaluation run.

Results go to ``reports/probes/adaclip_variants.md``.  Run from the repository root::

    PYTHONPATH=src .venv/bin/python probes/adaclip_variants.py            # the whole probe
    PYTHONPATH=src .venv/bin/python probes/adaclip_variants.py --quick    # smoke test, no file
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats as scipy_stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import make_private, noise_multiplier_for
from adaclip.research.data import synthetic_logistic
from adaclip.research.datasets import load_dataset
from adaclip.research.io import markdown_table, write_text_atomic
from adaclip.research.models import build_model

OUT_PATH = Path(__file__).resolve().parents[1] / "reports" / "probes" / "adaclip_variants.md"
EPSILON, DELTA, ACCOUNTANT, BATCH_SIZE, EPOCHS = 3.0, 1e-5, "prv", 256, 3
SELECTION_SEEDS, EVALUATION_SEEDS = (0, 1, 2), (3, 4, 5, 6, 7)
SYNTHETIC_SPREADS = (1000.0, 10000.0)


@dataclass(frozen=True)
class Candidate:
    """One method and its search grid: ``grid`` maps parameter names (``lr`` and rule parameters) to values."""

    label: str
    method: str
    grid: dict[str, tuple[float, ...]]
    fixed: dict[str, Any] = field(default_factory=dict)

    def configs(self) -> list[dict[str, Any]]:
        names = list(self.grid)
        return [dict(zip(names, values, strict=True)) for values in itertools.product(*self.grid.values())]


def candidates() -> list[Candidate]:
    """The methods and grids.  AdaCliP and the Adam rules release in gradient (or Adam-step) units: lr is not rescaled.

    DP-SGD's update is about lr * C, so its lr grid is ``base / C``.
    """
    return [
        Candidate("DP-SGD", "fixed", {"clip_norm": (0.3, 1.0, 3.0), "base_lr": (0.5, 2.0, 8.0, 32.0)}),
        Candidate("AdaCliP paper", "adaclip", {"lr": (3.0, 10.0, 30.0, 100.0)}, {"estimator": "paper"}),
        Candidate("AdaCliP per_example", "adaclip", {"lr": (0.01, 0.03, 0.1, 0.3)}, {"estimator": "per_example"}),
        Candidate(
            "AdaCliP bias_free",
            "adaclip",
            {"h1": (1e-12, 1e-6), "lr": (0.1, 1.0, 10.0, 100.0)},
            {"estimator": "bias_free"},
        ),
        Candidate(
            "AdaCliP quantile_scale",
            "adaclip",
            {"h2": (0.1, 100.0), "lr": (0.3, 1.0, 3.0, 10.0)},
            {"estimator": "quantile_scale"},
        ),
        Candidate("DP-MacAdam", "macadam", {"h1": (1e-12, 1e-6), "lr": (1e-3, 3e-3, 1e-2, 3e-2)}),
        Candidate("DP-AdamBC", "adambc", {"gamma": (1e-9, 1e-6), "lr": (1e-3, 3e-3, 1e-2, 3e-2)}),
    ]


def at_edge(candidate: Candidate, config: dict[str, Any]) -> str:
    """The searched parameters whose chosen value is the smallest or largest of its grid (optimum maybe beyond)."""
    edges = [
        name
        for name, values in candidate.grid.items()
        if len(values) > 1 and config[name] in (min(values), max(values))
    ]
    return ", ".join(edges) or "-"


def load_task(task: str) -> dict[str, TensorDataset]:
    if task == "fmnist":
        splits = load_dataset("fashion-mnist", seed=0, train_size=10_000, download=False)
        return {"train": splits.train, "val": splits.validation, "test": splits.test}
    spread = float(task.removeprefix("synthetic-"))
    x, y = synthetic_logistic(12_000, 50, spread, seed=0)
    features, labels = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    cut = {"train": slice(0, 10_000), "val": slice(10_000, 11_000), "test": slice(11_000, 12_000)}
    return {name: TensorDataset(features[part], labels[part]) for name, part in cut.items()}


def new_model(data: dict[str, TensorDataset]) -> nn.Module:
    features, labels = data["train"].tensors
    return build_model("logistic", tuple(features.shape[1:]), int(labels.max()) + 1)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    features, labels = data.tensors
    return float((model(features).argmax(1) == labels).float().mean())


def train(data: dict[str, TensorDataset], sigma: float, method: str, config: dict[str, Any], seed: int) -> dict:
    """One private run; validation and test accuracy, last-epoch SNR and clipped fraction, and the model."""
    params = dict(config)
    lr = params.pop("lr") if "lr" in params else params.pop("base_lr") / params["clip_norm"]
    torch.manual_seed(seed)
    model = new_model(data)
    module, optimizer, loader = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(data["train"], batch_size=BATCH_SIZE),
        method=method,
        noise_multiplier=sigma,
        delta=DELTA,
        accountant=ACCOUNTANT,
        seed=seed,
        **params,
    )
    rule, release = optimizer.rule, optimizer.rule.release
    signal, fresh, noise, clipped = [], [], [], []

    def recording_release(summed: Any, state: Any, draws: torch.Tensor) -> Any:
        shift = rule.norm_transform(state)
        centred = summed.vector / rule.expected_batch_size
        noise_free = centred + (0.0 if shift is None else shift[0])
        out = release(summed, state, draws)
        signal.append(float(noise_free @ noise_free))
        fresh.append(float(centred @ centred))
        noise.append(out[2]["noise_power"])
        clipped.append(out[2]["clipped_fraction"])
        return out

    rule.release = recording_release  # the optimizer calls rule.release: record around it, change nothing
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(EPOCHS):
        for features, labels in loader:
            optimizer.zero_grad()
            loss_fn(module(features), labels).backward()
            optimizer.step()
    last = slice(-len(loader), None)
    finite = all(math.isfinite(float(p.sum())) for p in model.parameters())
    return {
        "val": accuracy(model, data["val"]) if finite else 0.0,
        "test": accuracy(model, data["test"]) if finite else 0.0,
        "snr": statistics.fmean(signal[last]) / statistics.fmean(noise[last]) if finite else float("nan"),
        "fresh_snr": statistics.fmean(fresh[last]) / statistics.fmean(noise[last]) if finite else float("nan"),
        "clipped": statistics.fmean(clipped[last]),
        "epsilon": optimizer.get_epsilon(),
        "model": model,
    }


def heterogeneity(model: nn.Module, data: TensorDataset, examples: int = 2000) -> float:
    """``h = (sum_j s_j)^2 / (d sum_j s_j^2)`` of the per-example gradients of ``model`` (logistic: closed form)."""
    features, labels = (t[:examples] for t in data.tensors)
    flat = features.flatten(1)
    with torch.no_grad():
        residual = torch.softmax(model(features), 1)
        residual[torch.arange(len(labels)), labels] -= 1  # d loss / d logits = p - onehot(y)
    grads = torch.cat([(residual[:, :, None] * flat[:, None, :]).flatten(1), residual], 1)  # weight, then bias
    std = grads.double().std(0)
    return float(std.sum() ** 2 / (std.numel() * std.square().sum()))


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of the 95 % t-interval."""
    if len(values) < 2:
        return statistics.fmean(values), float("nan")
    half = scipy_stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return statistics.fmean(values), half


def pm(values: list[float], scale: float = 100.0) -> str:
    mean, half = interval([v * scale for v in values])
    return f"{mean:.2f} ± {half:.2f}"


def config_text(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in config.items())


def probe_task(task: str, selection: tuple[int, ...], evaluation: tuple[int, ...], log: list[str]) -> list[str]:
    start = time.perf_counter()
    data = load_task(task)
    n = len(data["train"])
    sample_rate = BATCH_SIZE / n
    sigma = noise_multiplier_for(
        target_epsilon=EPSILON,
        sample_rate=sample_rate,
        steps=EPOCHS * int(1 / sample_rate),
        delta=DELTA,
        accountant=ACCOUNTANT,
    )
    torch.manual_seed(0)
    h_init = heterogeneity(new_model(data), data["train"])
    search_rows, chosen = [], {}
    for candidate in candidates():
        best = None
        for config in candidate.configs():
            full = {**candidate.fixed, **config}
            runs = [train(data, sigma, candidate.method, full, seed) for seed in selection]
            val = statistics.fmean(r["val"] for r in runs)
            line = f"{task} {candidate.label} {config_text(config)}: val {pm([r['val'] for r in runs])}"
            print(line, flush=True)
            search_rows.append(
                [
                    candidate.label,
                    config_text(config),
                    pm([r["val"] for r in runs]),
                    statistics.fmean(r["snr"] for r in runs),
                ]
            )
            if best is None or val > best[0]:
                best = (val, config)
        chosen[candidate.label] = (candidate, best[1])
    results = {}
    for label, (candidate, config) in chosen.items():
        results[label] = [train(data, sigma, candidate.method, {**candidate.fixed, **config}, s) for s in evaluation]
        print(f"{task} evaluated {label}: test {pm([r['test'] for r in results[label]])}", flush=True)
    h_trained = heterogeneity(results["DP-SGD"][0]["model"], data["train"])
    baseline = results["DP-SGD"]
    rows = []
    for label, runs in results.items():
        differences = [r["test"] - b["test"] for r, b in zip(runs, baseline, strict=True)]
        snr = statistics.fmean(r["snr"] for r in runs)
        fresh_snr = statistics.fmean(r["fresh_snr"] for r in runs)
        rows.append(
            [
                label,
                config_text(chosen[label][1]),
                at_edge(*chosen[label]),
                pm([r["val"] for r in runs]),
                pm([r["test"] for r in runs]),
                pm(differences) if label != "DP-SGD" else "-",
                snr,
                snr / statistics.fmean(b["snr"] for b in baseline),
                fresh_snr,
                statistics.fmean(r["clipped"] for r in runs),
            ]
        )
    epsilon_spent = max(r["epsilon"] for runs in results.values() for r in runs)
    minutes = (time.perf_counter() - start) / 60
    log.append(f"{task}: {minutes:.1f} min")
    header = [
        "method",
        "chosen (on validation, seeds 0-2)",
        "at grid edge",
        "val acc %",
        "test acc %",
        "test − DP-SGD (paired), points",
        "release SNR",
        "SNR / DP-SGD's",
        "centred SNR",
        "clipped fraction",
    ]
    return [
        f"## {task}",
        "",
        f"n = {n} training examples, q = {sample_rate:.4g}, sigma = {sigma:.4f} (PRV; largest epsilon spent "
        f"{epsilon_spent:.3f}), {EPOCHS * int(1 / sample_rate)} steps.  Heterogeneity index h = {h_init:.3f} at the "
        f"initial model, {h_trained:.3f} at DP-SGD's final model (evaluation seed {evaluation[0]}).",
        "",
        f"Evaluation seeds {list(evaluation)}: mean ± 95 % t-interval half-width; SNR and clipped fraction "
        "are means over the last epoch's steps and the seeds.",
        "",
        markdown_table(header, rows),
        "",
        f"Search (selection seeds {list(selection)}; mean validation accuracy ± 95 % t-interval, mean SNR):",
        "",
        markdown_table(["method", "configuration", "val acc %", "release SNR"], search_rows),
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed each, no output file")
    parser.add_argument("--tasks", nargs="+", default=["fmnist", *(f"synthetic-{s:g}" for s in SYNTHETIC_SPREADS)])
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(2)
    selection, evaluation = ((0,), (3, 4)) if args.quick else (SELECTION_SEEDS, EVALUATION_SEEDS)
    start, cpu, log = time.perf_counter(), time.process_time(), []
    sections = [probe_task(task, selection, evaluation, log) for task in args.tasks]
    total, cpu_total = (time.perf_counter() - start) / 60, (time.process_time() - cpu) / 60
    text = "\n".join(
        [
            "# AdaCliP variance estimators, DP-MacAdam and DP-AdamBC against tuned DP-SGD",
            "",
            "Produced by `probes/adaclip_variants.py` (its docstring has the protocol); regenerate from the repository "
            "root with `PYTHONPATH=src .venv/bin/python probes/adaclip_variants.py`.",
            "",
            f"Setting: epsilon = {EPSILON:g}, delta = {DELTA:g}, {ACCOUNTANT.upper()}, B = {BATCH_SIZE}, {EPOCHS} "
            f"epochs, plain SGD wrapping each rule, rule defaults except the searched parameters.  Machine: 2-core "
            f"CPU shared with other jobs, torch {torch.__version__}, numpy {np.__version__}.  Wall time "
            f"{total:.1f} min ({'; '.join(log)}), CPU time {cpu_total:.1f} min.",
            "",
            *itertools.chain.from_iterable(sections),
        ]
    )
    print(text)
    if not args.quick:
        write_text_atomic(OUT_PATH, text)


if __name__ == "__main__":
    main()
