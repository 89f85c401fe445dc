"""ScatterNet + linear configurations per CPU-minute: a population of K (:mod:`adaclip.research.population`) against
solo runs, one torch thread, one process, interleaved repeats.

A *solo* configuration is the research trainer's path: ``make_private`` (DP-SGD, book-keeping fast path) over the
training split as a ``TensorDataset``, SGD with momentum 0.9; a step takes the next Poisson batch from the private
loader (the gather), runs the forward pass, the cross-entropy, the backward pass and ``optimizer.step`` (noise
included).  A *population* step gathers the batch once and steps all K members
(:meth:`~adaclip.research.population.Population.step`), members differing in learning rate, clip norm and seed.
Each run also evaluates on the validation and test splits once per epoch, as the trainer does; both are timed.

Timing is the CPU time of this thread (``time.thread_time``; with one torch thread the work runs on it), per block of
``--steps`` consecutive steps of one setup, the setups round-robin for ``--repeats`` rounds (so load from other jobs
hits every setup alike); the median block gives the per-step cost, and the median of ``--repeats`` evaluations the
per-epoch evaluation cost.  A run of ``E`` epochs of ``T`` steps then costs ``E (T step + eval)`` CPU seconds, and a
setup trains ``K`` configurations in that time::

    configurations per CPU-minute = 60 K / (E (T step + eval))

(``E = 30`` epochs of ``T = int(N / B) = 6`` steps at the quick profile).  Features: the real ScatterNet features
when ``--data-dir`` holds ``features.pt`` (:mod:`adaclip.research.features`), else a random matrix of their shape.

    taskset -c 0 python benchmarks/bench_population.py --out reports/probes/population.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import make_private
from adaclip.engine.sampling import gather_rows
from adaclip.research.data import Splits
from adaclip.research.datasets import load_dataset
from adaclip.research.models import build_model
from adaclip.research.population import Member, Population, Privacy
from adaclip.research.population_training import evaluate, population_batches

BATCH, EPOCHS, SIGMA, DELTA = 8192, 30, 3.0, 1e-5


def scatternet_splits(data_dir: Path) -> tuple[Splits, str]:
    """The ScatterNet splits, or random features of their shape (55 000 / 5 000 / 10 000 x 3 969) without the file."""
    if (data_dir / "features.pt").is_file():
        return load_dataset("fashion-mnist-scatternet", data_dir=data_dir), f"real features ({data_dir})"
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorDataset:
        return TensorDataset(
            torch.randn(n, 81, 7, 7, generator=generator), torch.randint(0, 10, (n,), generator=generator)
        )

    return Splits("fashion-mnist-scatternet", "classification", 10, split(55_000), split(5_000), split(10_000)), (
        "random features of the real shape (features.pt not found)"
    )


def members(k: int) -> list[Member]:
    """K DP-SGD configurations with different learning rates, clip norms and seeds."""
    return [
        Member(
            "fixed",
            lr=0.4 * 2 ** (i % 4),
            momentum=0.9,
            noise_multiplier=SIGMA,
            method_params={"clip_norm": 0.1 * 3 ** (i // 4 % 4)},
            seed=i,
        )
        for i in range(k)
    ]


class Solo:
    """One configuration through ``make_private``, as the research trainer runs it."""

    def __init__(self, splits: Splits) -> None:
        torch.manual_seed(0)
        model = build_model("logistic", splits.input_shape, 10)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.6, momentum=0.9)
        self.model, self.optimizer, self.loader = make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(splits.train, batch_size=BATCH),
            method="fixed",
            noise_multiplier=SIGMA,
            delta=DELTA,
            seed=0,
            clip_norm=0.1,
        )
        self.batches = iter(self.loader)
        self.evaluation = [splits.validation.tensors, splits.test.tensors]

    def step(self) -> None:
        try:
            features, targets = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            features, targets = next(self.batches)
        self.optimizer.zero_grad()
        nn.functional.cross_entropy(self.model(features), targets).backward()
        self.optimizer.step()

    def evaluate(self) -> None:
        with torch.no_grad():
            for inputs, labels in self.evaluation:
                for start in range(0, len(labels), 1024):
                    (self.model(inputs[start : start + 1024]).argmax(1) == labels[start : start + 1024]).sum().item()


class Stacked:
    """K configurations as one population on the same batches."""

    def __init__(self, splits: Splits, k: int) -> None:
        self.features = splits.train.tensors[0].reshape(len(splits.train), -1)
        self.labels = splits.train.tensors[1]
        self.input_squared = torch.linalg.vector_norm(self.features, dim=1).square_()  # once, as train_population
        n = self.features.shape[0]
        self.population = Population(
            members(k),
            model="logistic",
            num_features=self.features.shape[1],
            num_outputs=10,
            expected_batch_size=BATCH,
            privacy=Privacy(BATCH / n, EPOCHS * int(n / BATCH), DELTA),
        )
        self.batches = [b for epoch in population_batches(n, BATCH, 2, 0, poisson=True) for b in epoch]
        self.position = 0
        self.evaluation = [(s.tensors[0].reshape(len(s), -1), s.tensors[1]) for s in (splits.validation, splits.test)]

    def step(self) -> None:
        indices = self.batches[self.position % len(self.batches)]
        self.position += 1
        self.population.step(
            gather_rows(self.features, indices),
            gather_rows(self.labels, indices),
            gather_rows(self.input_squared, indices),
        )

    def evaluate(self) -> None:
        for features, labels in self.evaluation:
            evaluate(self.population, features, labels)


def cpu_time(action: Callable[[], None], times: int) -> float:
    """CPU seconds of this thread per call of ``action``, over ``times`` consecutive calls."""
    start = time.thread_time()
    for _ in range(times):
        action()
    return (time.thread_time() - start) / times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/features/fashion-mnist-scatternet"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=4, help="rounds of blocks (interleaved over the setups)")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.thread_time()
    splits, source = scatternet_splits(args.data_dir)
    load = time.thread_time() - start
    n = len(splits.train)
    steps_per_epoch = int(n / BATCH)
    setups: dict[str, Solo | Stacked] = {"solo": Solo(splits)} | {
        f"population K={k}": Stacked(splits, k) for k in args.sizes
    }
    sizes = {"solo": 1} | {f"population K={k}": k for k in args.sizes}
    for setup in setups.values():  # warm-up: first-touch allocations, lazily built state
        setup.step()
        setup.evaluate()
    step_times: dict[str, list[float]] = {name: [] for name in setups}
    eval_times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.repeats):
        for name, setup in setups.items():
            step_times[name].append(cpu_time(setup.step, args.steps))
            eval_times[name].append(cpu_time(setup.evaluate, 1))
    rows = []
    solo_rate = None
    for name in setups:
        step, evaluation = statistics.median(step_times[name]), statistics.median(eval_times[name])
        run = EPOCHS * (steps_per_epoch * step + evaluation)
        rate = 60 * sizes[name] / run
        solo_rate = rate if name == "solo" else solo_rate
        rows.append((name, sizes[name], step, evaluation, run / sizes[name], rate, rate / (solo_rate or rate)))
    with_load = [(r[0], 60 * r[1] / (r[4] * r[1] + load)) for r in rows]
    lines = [
        f"Data: {source}; B = {BATCH}, {steps_per_epoch} steps per epoch, {EPOCHS} epochs; DP-SGD, sigma = {SIGMA}; "
        f"one torch thread; {args.repeats} interleaved rounds of {args.steps}-step blocks; CPU time of the thread.",
        "",
        "| setup | K | CPU s per step | CPU s per evaluation | CPU s per configuration-run | configurations per "
        "CPU-minute | vs solo |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.1f}x |" for r in rows),
        "",
        f"Loading the data took {load:.1f} CPU s; a solo run loads it once per configuration, a population once "
        "for its K. Counting the load, configurations per CPU-minute: "
        + ", ".join(f"{name} {rate:.2f} ({rate / with_load[0][1]:.1f}x)" for name, rate in with_load)
        + ".",
    ]
    print("\n".join(lines))
    if args.out is not None:
        command = "taskset -c 0 python benchmarks/bench_population.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        args.out.write_text(
            "# Population vs solo runs: ScatterNet + linear configurations per CPU-minute\n\n"
            f"Command: `PYTHONPATH=src {command}`\n\n" + "\n".join(lines) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
