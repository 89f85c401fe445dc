"""Step time, throughput and peak memory of private training relative to non-private training.

For every model and batch size, one process builds one *setup* per training variant, all from the
same initial weights and the same fixed in-memory batch of ``B`` random examples (pure training
steps: no data loader, so only the per-example machinery differs):

* ``nonprivate``: plain SGD;
* ``opacus/hooks``: Opacus DP-SGD with per-example gradient hooks (``PrivacyEngine.make_private``);
* ``opacus/ghost``: Opacus ghost clipping (``grad_sample_mode="ghost"``, flat clip, two backward passes);
* ``<method>/fast`` and ``<method>/materialise`` for each adaclip method: ``adaclip.make_private``
  with ``per_example="fast"`` (book-keeping, no ``[B, d]``) or ``"materialise"`` (the ``[B, d]`` matrix).

A step is ``zero_grad``, forward, cross-entropy loss, backward and ``optimizer.step`` (with noise,
sigma = 1).  Timing interleaves the setups round-robin: a *round* times one sample of every setup in
turn (a sample is a block of consecutive steps of one setup), so drift from other load on the machine
hits every setup alike.  ``step_time_s`` is the median over a run's samples of wall-clock time per step,
``cpu_time_s`` the same in CPU time of this thread (robust to preemption on a shared machine, meaningful
with one thread on CPU).  A *per-round ratio* divides a setup's sample by the ``nonprivate`` sample of
the same round (same model and batch size); a run's ``ratio_to_nonprivate`` is the median of its
per-round ratios.  ``--runs 2`` repeats the whole measurement in the same process; a cell (model, batch
size, setup) pools the rounds of every run: its ratio is their median and its *spread* their
interquartile range over the median, ``(Q3 - Q1) / median`` (quartiles interpolated linearly between the
sorted ratios).  A cell whose spread exceeds :data:`UNSTABLE_SPREAD` (10 %), or that has a single round,
is marked unstable: its ratio is not a number to quote.

Memory is measured in separate, untimed steps after the timing: ``peak_memory_bytes`` on CUDA is
``torch.cuda.max_memory_allocated`` during a step minus the memory allocated before it; on CPU the
peak of the running sum of the torch profiler's allocation events during a step (torch tensors only,
relative to the start of the step, so parameters, data and state allocated earlier are not counted;
the maximum over three steps).  ``largest_tensor_bytes`` is the largest tensor any operation of a
step returns (a ``TorchDispatchMode``; on either device).  ``per_example_bytes`` is the size
``B * d * 4`` of the per-example gradient matrix that the fast path never forms.

Models: logistic regression and one-hidden-layer MLPs of width 100 and 1000 on 28 x 28 inputs, the tanh
CNN, and ``scatter_linear`` (a linear layer on ScatterNet's 81 x 7 x 7 = 3969 features).  GeoClip runs its
rank-:data:`GEOCLIP_RANK` form.  Private steps draw the next step's noise in a worker thread when the draw
is large (:mod:`adaclip.engine.noise`); ``cpu_time_s`` counts this thread only.

Outputs: a Markdown table (the setups, then the *scaling table*: ratio and peak memory per model and setup,
one column per batch size), a JSON list of records and a figure (ratio to non-private per setup).

**Where the floor is** (CPU, one thread; the numbers were measured on the project's 2-core AMD EPYC machine
while other jobs shared it, see ``reports/probes/bench_scaling.md``).  For a linear layer with ``p`` inputs
and ``q`` outputs a non-private step does the forward product, the input gradient (not for a first layer)
and the weight gradient: two or three products of ``2 B p q`` flops (about 87 GFLOP/s here: 0.12 ms for
the MLP's first layer at B = 64, 1.07 ms at B = 600).  The fast path keeps the forward and input-gradient
products, replaces the weight gradient by the reweighted sum (one product of the same size) and adds

* the norms ``||x_i||^2 ||delta_i||^2``: ``O(B (p + q))``, negligible;
* ``d`` Gaussian numbers: 3.4 ns each (0.03 ms for logistic's 7 850 parameters, 0.27 ms for the MLP's
  79 510, 2.7 ms for the 795 010 of the width-1000 MLP), drawn in the worker thread from 2^18 numbers on
  and otherwise on the critical path (a hand-off to the thread costs more than a small draw);
* a fixed cost per step: a DP-SGD step runs about 55 more torch operations than a non-private one
  (norms, weights, counts, the non-finite policy, the noisy mean, the finiteness check, the parameter
  gradients), AdaCliP about 150 (its state update is a dozen vector operations over ``d``); at 5-7 us
  per eager operation that is 0.35 ms and 0.8 ms.

So DP-SGD's floor is ``1 + (0.35 ms + noise) / t_nonprivate``: with the non-private steps measured in two
probe runs under varying load (logistic 0.25-0.47 ms and MLP 0.85-1.11 ms at B = 64; MLP 2.9-5.3 ms at
B = 600) that is about 1.8-2.5x for logistic and 1.6-1.7x for the MLP at B = 64, and 1.1-1.2x for the MLP
at B = 600: at small batches the
private step is bound by the number of operations it dispatches, not by arithmetic.  AdaCliP's transformed
norm ``(delta^2)^T (1/b^2) (x^2) - 2 delta^T (a/b^2) x + sum a^2/b^2`` needs two more products of the
weight's size per layer (they read ``x`` once, in cache-sized chunks, but cannot share one product: ``delta``
enters one squared and one not).  For a first layer, whose non-private step is two products, that is four
products against two, a floor of 2x plus the noise and 0.8 ms; for a hidden layer (three products) 5/3.
For ScatterNet + linear at B = 8192 (``q = 10``) the products are bound by reading ``x`` (124 MiB): the
non-private step reads it twice, AdaCliP's fast path three times (the forward, the norms' one chunked pass,
the reweighted sum), a floor of 1.5x.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip.engine import make_private
from adaclip.methods import NONPRIVATE
from adaclip.research.io import apply_style, markdown_table, save_figure, write_text_atomic
from adaclip.research.models import build_model


def largest_tensor_mode() -> Any:
    """A fresh ``LargestTensor`` dispatch mode, the one of ``tests/engine/tensor_sizes.py`` (loaded from its file)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "engine" / "tensor_sizes.py"
    spec = importlib.util.spec_from_file_location("tensor_sizes", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LargestTensor()


IMAGE = (1, 28, 28)
SCATTERNET = (81, 7, 7)
MODELS = {
    "logistic": ("logistic", {}, IMAGE),
    "mlp": ("mlp", {"hidden": 100}, IMAGE),
    "mlp1000": ("mlp", {"hidden": 1000}, IMAGE),
    "cnn": ("cnn", {}, IMAGE),
    "scatter_linear": ("logistic", {}, SCATTERNET),
}
"""name -> (model kind, its options, input shape); random inputs of that shape."""
MODEL_LABELS = {
    "logistic": "logistic 784-10",
    "mlp": "MLP 784-100-10",
    "mlp1000": "MLP 784-1000-10",
    "cnn": "tanh CNN",
    "scatter_linear": "ScatterNet features 3969-10 (linear)",
}
OUR_METHODS = ("fixed", "quantile", "auto", "adaclip", "psac", "geoclip", "macadam", "adambc")
GEOCLIP_RANK = 8
"""GeoClip runs its rank-k form (the full d x d matrix is refused above 4096 parameters)."""
PATHS = ("fast", "materialise")
BASELINES = ("opacus/hooks", "opacus/ghost")
NOISE_MULTIPLIER = 1.0
UNSTABLE_SPREAD = 0.10
"""A cell is unstable when its spread, (Q3 - Q1) / median of its per-round ratios, exceeds this."""
QUICK = {"models": ["logistic", "mlp", "cnn"], "batch_sizes": [64, 600], "repeats": 6, "warmup": 1, "runs": 2}
FULL = {
    "models": ["logistic", "mlp", "mlp1000", "cnn"],
    "batch_sizes": [64, 256, 600],
    "repeats": 21,
    "warmup": 3,
    "runs": 2,
}


@dataclass
class Setup:
    """One training variant: a closure doing one step on the fixed batch."""

    method: str
    path: str
    step: Callable[[], None]


def _model(name: str, seed: int) -> nn.Module:
    kind, options, shape = MODELS[name]
    torch.manual_seed(seed)
    return build_model(kind, shape, 10, **options)


def _step_with(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor], loss_fn: Callable
) -> Callable[[], None]:
    features, labels = batch

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model(features), labels).backward()
        optimizer.step()

    return step


def per_example_bytes(model_name: str, batch_size: int) -> int:
    """Size of the float32 per-example gradient matrix ``[B, d]``."""
    return batch_size * sum(p.numel() for p in _model(model_name, 0).parameters()) * 4


def build_setups(
    model_name: str,
    batch_size: int,
    methods: list[str],
    paths: list[str],
    baselines: list[str],
    device: str,
    seed: int = 0,
) -> list[Setup]:
    """Every requested variant for one model and batch size, each with its own copy of the same initial model."""
    from opacus import PrivacyEngine

    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch_size, *MODELS[model_name][2], generator=generator).to(device)
    labels = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    batch = (features, labels)
    dataset_size = 20 * batch_size  # only fixes q = B / N for the optimizers; the batch above is what is trained on
    loader = DataLoader(TensorDataset(torch.zeros(dataset_size, 1), torch.zeros(dataset_size)), batch_size=batch_size)
    initial = _model(model_name, seed).to(device)
    cross_entropy = nn.functional.cross_entropy
    setups = []

    model = copy.deepcopy(initial)
    setups.append(
        Setup(NONPRIVATE, "-", _step_with(model, torch.optim.SGD(model.parameters(), lr=0.01), batch, cross_entropy))
    )
    for baseline in baselines:
        model = copy.deepcopy(initial)
        mode = baseline.split("/")[1]
        private = PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            data_loader=loader,
            criterion=nn.CrossEntropyLoss(),
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        if mode == "ghost":
            module, optimizer, criterion, _ = private
            setups.append(Setup("opacus", mode, _step_with(module, optimizer, batch, criterion)))
        else:
            module, optimizer, _ = private
            setups.append(Setup("opacus", mode, _step_with(module, optimizer, batch, cross_entropy)))
    for method in methods:
        params = _method_params(method, batch_size)
        for path in paths:
            model = copy.deepcopy(initial)
            module, optimizer, _ = make_private(
                module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                data_loader=loader,
                method=method,
                noise_multiplier=NOISE_MULTIPLIER,
                delta=0.1 / dataset_size,
                seed=seed,
                per_example=path,
                **params,
            )
            setups.append(Setup(method, path, _step_with(module, optimizer, batch, cross_entropy)))
    return setups


def _method_params(method: str, batch_size: int) -> dict[str, Any]:
    """Rule parameters besides the defaults: quantile clipping's count noise for this batch size, GeoClip's rank."""
    if method == "quantile":
        return {"count_noise_std": max(batch_size / 20, NOISE_MULTIPLIER)}
    if method == "geoclip":
        return {"rank": GEOCLIP_RANK}
    return {}


def _synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_setups(
    setups: list[Setup], repeats: int, warmup: int, device: str, target_sample_s: float = 0.02, slow_step_s: float = 0.1
) -> dict[int, tuple[list[float], list[float]]]:
    """Wall-clock and CPU seconds per step of each setup, one sample per round (``repeats`` rounds, round-robin).

    Each sample times a block of consecutive steps of one setup, sized from the warm-up so that a
    sample lasts about ``target_sample_s`` (one step for slow setups).  Setups slower than
    ``slow_step_s`` per step (the materialised paths of large models) get ``max(3, repeats // 3)``
    samples, taken in the first rounds: sample ``k`` of every setup belongs to round ``k``.
    """
    blocks, samples = {}, {}
    for index, setup in enumerate(setups):
        for _ in range(max(warmup, 1)):
            _synchronise(device)
            start = time.perf_counter()
            setup.step()
            _synchronise(device)
            elapsed = time.perf_counter() - start
        blocks[index] = max(1, min(20, math.ceil(target_sample_s / max(elapsed, 1e-6))))
        samples[index] = min(repeats, max(3, repeats // 3)) if elapsed > slow_step_s else repeats
    wall: dict[int, list[float]] = {i: [] for i in range(len(setups))}
    cpu: dict[int, list[float]] = {i: [] for i in range(len(setups))}
    for round_index in range(repeats):
        for index, setup in enumerate(setups):
            if round_index >= samples[index]:
                continue
            _synchronise(device)
            start_wall, start_cpu = time.perf_counter(), time.thread_time()
            for _ in range(blocks[index]):
                setup.step()
            _synchronise(device)
            wall[index].append((time.perf_counter() - start_wall) / blocks[index])
            cpu[index].append((time.thread_time() - start_cpu) / blocks[index])
    return {i: (wall[i], cpu[i]) for i in wall}


def per_round_ratios(samples: list[float], baseline: list[float]) -> list[float]:
    """A setup's sample over the baseline's sample of the same round, for every round the setup was timed in."""
    return [sample / reference for sample, reference in zip(samples, baseline, strict=False)]


def ratio_statistics(ratios: list[float]) -> dict[str, Any]:
    """Median, quartiles and spread ``(Q3 - Q1) / median`` of a cell's per-round ratios; unstable above 10 %.

    Quartiles interpolate linearly between the sorted ratios (``statistics.quantiles(method="inclusive")``,
    numpy's default).  With a single round there is no spread (``None``) and the cell counts as unstable.
    """
    if not ratios:
        raise ValueError("ratios: expected at least one per-round ratio, got none")
    median = statistics.median(ratios)
    if len(ratios) < 2:
        return {"ratio": median, "q1": None, "q3": None, "spread": None, "rounds": 1, "unstable": True}
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    spread = (q3 - q1) / median
    return {
        "ratio": median,
        "q1": q1,
        "q3": q3,
        "spread": spread,
        "rounds": len(ratios),
        "unstable": bool(spread > UNSTABLE_SPREAD),
    }


def peak_step_memory(setup: Setup, device: str, steps: int = 3) -> int:
    """Peak bytes allocated by torch during a step, above what was allocated before it (max over ``steps`` steps).

    On CPU the profiler's allocation events of one step are summed in time order (frees of blocks
    allocated before the step are not reported by the profiler, so they cannot hide an allocation);
    the maximum over a few steps guards against events the profiler occasionally drops.
    """
    peaks = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            setup.step()
            torch.cuda.synchronize(device)
            peaks.append(int(torch.cuda.max_memory_allocated(device) - before))
            continue
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            setup.step()
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
        running = peak = 0
        for _, nbytes in events:
            running += nbytes
            peak = max(peak, running)
        peaks.append(peak)
    return max(peaks)


def largest_step_tensor(setup: Setup) -> int:
    """Bytes of the largest tensor created during one step (a ``[B, d]`` matrix shows up here)."""
    with largest_tensor_mode() as tracker:
        setup.step()
    return tracker.largest_bytes


def measure(
    models: list[str],
    batch_sizes: list[int],
    methods: list[str],
    paths: list[str],
    baselines: list[str],
    repeats: int,
    warmup: int,
    runs: int,
    device: str,
    max_per_example_bytes: float = math.inf,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Records for every model, batch size, setup and run (see the module docstring), and the setups skipped.

    Setups that materialise ``[B, d]`` (``materialise`` and ``opacus/hooks``) are skipped where that
    matrix exceeds ``max_per_example_bytes``.
    """
    records, skipped = [], []
    for model_name in models:
        for batch_size in batch_sizes:
            size = per_example_bytes(model_name, batch_size)
            too_big = size > max_per_example_bytes
            if too_big:
                skipped.append(
                    f"{MODEL_LABELS[model_name]}, B={batch_size}: materialise and opacus/hooks "
                    f"([B, d] = {size / 2**30:.2f} GiB)"
                )
            setups = build_setups(
                model_name,
                batch_size,
                methods,
                [p for p in paths if not (too_big and p == "materialise")],
                [b for b in baselines if not (too_big and b == "opacus/hooks")],
                device,
            )
            timed = [time_setups(setups, repeats, warmup if run == 1 else 1, device) for run in range(1, runs + 1)]
            memory = {i: peak_step_memory(setup, device) for i, setup in enumerate(setups)}  # warm: steady-state steps
            largest = {i: largest_step_tensor(setup) for i, setup in enumerate(setups)}
            ratios = [{i: per_round_ratios(times[i][0], times[0][0]) for i in times} for times in timed]
            cells = {i: ratio_statistics([r for by_run in ratios for r in by_run[i]]) for i in range(len(setups))}
            for run, times in enumerate(timed, start=1):
                for index, setup in enumerate(setups):
                    wall, cpu = statistics.median(times[index][0]), statistics.median(times[index][1])
                    cpu_ratios = [c / b for c, b in zip(times[index][1], times[0][1], strict=False) if b > 0]
                    records.append(
                        {
                            "model": model_name,
                            "batch_size": batch_size,
                            "method": setup.method,
                            "path": setup.path,
                            "run": run,
                            "step_time_s": wall,
                            "examples_per_s": batch_size / wall,
                            "ratio_to_nonprivate": statistics.median(ratios[run - 1][index]),
                            "round_ratios": ratios[run - 1][index],
                            "cell": cells[index],
                            "cpu_time_s": cpu,
                            "cpu_ratio_to_nonprivate": statistics.median(cpu_ratios) if cpu_ratios else float("nan"),
                            "peak_memory_bytes": memory[index],
                            "largest_tensor_bytes": largest[index],
                            "per_example_bytes": size,
                            "parameters": size // (4 * batch_size),
                            "device": device,
                        }
                    )
                if progress:
                    summary = ", ".join(
                        f"{s.method}/{s.path} {statistics.median(ratios[run - 1][i]):.2f}x"
                        for i, s in enumerate(setups)
                        if i
                    )
                    print(
                        f"[bench] {model_name} B={batch_size} run {run}: "
                        f"non-private {statistics.median(times[0][0]) * 1e3:.2f} ms; {summary}",
                        file=sys.stderr,
                        flush=True,
                    )
    return records, skipped


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_label(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({_cpu_name()}, {torch.get_num_threads()} of {os.cpu_count()} cores used)"


def _percent(spread: float | None) -> str:
    return "-" if spread is None else f"{100 * spread:.0f} %"


def _stability(cell: dict[str, Any]) -> str:
    if cell["spread"] is None:
        return "unstable (one round)"
    return "unstable" if cell["unstable"] else "stable"


def table(records: list[dict[str, Any]], header_note: str, skipped: list[str]) -> str:
    """Markdown: one row per model, batch size and setup: the cell's ratio, spread and stability, each run's ratio."""
    runs = sorted({r["run"] for r in records})
    keyed: dict[tuple, dict[int, dict[str, Any]]] = {}
    for r in records:
        keyed.setdefault((r["model"], r["batch_size"], r["method"], r["path"]), {})[r["run"]] = r
    header = ["model", "B", "method", "path", "step (ms)", "examples/s", "x non-private", "spread", "stable?"]
    header += [f"x non-private (run {run})" for run in runs] + [f"x CPU time (run {run})" for run in runs]
    header += ["peak memory (MiB)", "largest tensor (MiB)", "[B, d] (MiB)"]
    rows = []
    for (model, batch, method, path), by_run in keyed.items():
        last = by_run[runs[-1]]
        cell = last["cell"]
        rows.append(
            [
                MODEL_LABELS.get(model, model),
                batch,
                method,
                path,
                round(last["step_time_s"] * 1e3, 3),
                round(last["examples_per_s"]),
                f"{cell['ratio']:.2f}",
                _percent(cell["spread"]),
                _stability(cell),
            ]
            + [f"{by_run[run]['ratio_to_nonprivate']:.2f}" for run in runs]
            + [f"{by_run[run]['cpu_ratio_to_nonprivate']:.2f}" for run in runs]
            + [f"{last[key] / 2**20:.2f}" for key in ("peak_memory_bytes", "largest_tensor_bytes", "per_example_bytes")]
        )
    text = header_note + "\n\n" + markdown_table(header, rows)
    if skipped:
        text += "\nNot run (the per-example matrix exceeds --max-per-example-gib): " + "; ".join(skipped) + ".\n"
    return text


def scaling_table(records: list[dict[str, Any]]) -> str:
    """Markdown: the scaling table, one row per model and setup, one column per batch size.

    A cell is the step time relative to non-private (the cell's median over the rounds of every run), its
    spread and the peak memory of a step, with "unstable" where the spread exceeds 10 %; the non-private row
    gives its step time (last run) instead of the ratio; "-" where the setup was not run (skipped, or not in
    the grid).
    """
    last_run = max(r["run"] for r in records)
    chosen = [r for r in records if r["run"] == last_run]
    batch_sizes = sorted({r["batch_size"] for r in chosen})
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for r in chosen:
        setup = "non-private" if r["method"] == NONPRIVATE else f"{r['method']}/{r['path']}"
        memory = f"{r['peak_memory_bytes'] / 2**20:.1f} MiB"
        if r["method"] == NONPRIVATE:
            timing = f"{r['step_time_s'] * 1e3:.2f} ms"
        else:
            cell = r["cell"]
            flag = "" if not cell["unstable"] else ", unstable"
            timing = f"{cell['ratio']:.2f}x ({_percent(cell['spread'])}{flag})"
        cells.setdefault((MODEL_LABELS.get(r["model"], r["model"]), setup), {})[r["batch_size"]] = f"{timing}, {memory}"
    header = ["model", "setup"] + [f"B = {b}" for b in batch_sizes]
    rows = [[model, setup] + [by_batch.get(b, "-") for b in batch_sizes] for (model, setup), by_batch in cells.items()]
    return markdown_table(header, rows)


def figure(records: list[dict[str, Any]], stem: Path, title: str) -> list[Path]:
    """Each cell's ratio to non-private (median over rounds, bar from Q1 to Q3) per setup, a panel per batch size."""
    apply_style()
    import matplotlib.pyplot as plt

    last_run = max(r["run"] for r in records)
    chosen = [r for r in records if r["run"] == last_run and r["method"] != NONPRIVATE]
    batch_sizes = sorted({r["batch_size"] for r in chosen})
    models = list(dict.fromkeys(r["model"] for r in chosen))
    setups = list(dict.fromkeys(f"{r['method']}/{r['path']}" for r in chosen))
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(4.5 * len(batch_sizes), 4.2), sharey=True, squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, batch_size in zip(axes[0], batch_sizes, strict=True):
        for k, model in enumerate(models):
            cells = {
                f"{r['method']}/{r['path']}": r["cell"]
                for r in chosen
                if r["model"] == model and r["batch_size"] == batch_size
            }
            xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(setups))]
            absent = {"ratio": float("nan"), "q1": None, "q3": None}
            bars = [cells.get(s, absent) for s in setups]
            medians = [c["ratio"] for c in bars]
            low = [c["ratio"] - c["q1"] if c["q1"] is not None else 0.0 for c in bars]
            high = [c["q3"] - c["ratio"] if c["q3"] is not None else 0.0 for c in bars]
            ax.bar(xs, medians, width=width, yerr=[low, high], capsize=1.5, label=MODEL_LABELS.get(model, model))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(setups)), setups, rotation=70, ha="right", fontsize=8)
        ax.set_title(f"batch size {batch_size}")
    axes[0][0].set_ylabel("step time / non-private step time")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    written = save_figure(fig, stem)
    plt.close(fig)
    return written


OPTION_DEFAULTS = {
    "methods": list(OUR_METHODS),
    "paths": list(PATHS),
    "baselines": list(BASELINES),
    "threads": 1,
    "device": "cpu",
    "max_per_example_gib": 1.0,
}


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_argument(
        "--quick", action="store_true", help=f"the quick profile (about 2 minutes on 2 CPU cores): {QUICK}"
    )
    cli.add_argument(
        "--params-file",
        type=Path,
        help="YAML file whose 'bench' mapping sets any option below (options given here win)",
    )
    cli.add_argument("--models", nargs="+", choices=sorted(MODELS), help=f"default {FULL['models']}")
    cli.add_argument("--batch-sizes", nargs="+", type=int, help=f"default {FULL['batch_sizes']}")
    cli.add_argument("--methods", nargs="+", choices=OUR_METHODS, help=f"default {list(OUR_METHODS)}")
    cli.add_argument("--paths", nargs="+", choices=PATHS, help=f"default {list(PATHS)}")
    cli.add_argument("--baselines", nargs="*", choices=BASELINES, help=f"default {list(BASELINES)}")
    cli.add_argument(
        "--repeats", type=int, help=f"rounds per run, each timing one sample of every setup (default {FULL['repeats']})"
    )
    cli.add_argument(
        "--warmup", type=int, help=f"untimed steps per setup before the first run (default {FULL['warmup']})"
    )
    cli.add_argument(
        "--runs",
        type=int,
        help=f"whole measurements in this process; a cell pools their rounds (default {FULL['runs']})",
    )
    cli.add_argument("--threads", type=int, help="torch CPU threads (default 1: stable timings on a shared machine)")
    cli.add_argument("--device", help="cpu (default) or cuda[:i]")
    cli.add_argument(
        "--max-per-example-gib", type=float, help="skip setups that materialise a larger [B, d] matrix (default 1)"
    )
    cli.add_argument("--table", type=Path, default=Path("reports/tables/bench.md"))
    cli.add_argument("--json", type=Path, default=Path("reports/data/bench.json"))
    cli.add_argument("--figure", type=Path, default=Path("reports/figures/bench"), help="stem: writes .png and .svg")
    cli.add_argument("--quiet", action="store_true")
    return cli


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Profile defaults, then the params file's ``bench`` mapping, then options given on the command line; validated."""
    options: dict[str, Any] = {**OPTION_DEFAULTS, **(QUICK if args.quick else FULL)}
    if args.params_file is not None:
        import yaml

        loaded = yaml.safe_load(args.params_file.read_text()) or {}
        section = loaded.get("bench") if isinstance(loaded, dict) else None
        if not isinstance(section, dict):
            raise SystemExit(f"error: {args.params_file} has no 'bench' mapping")
        unknown = sorted(set(section) - set(options) - {"quick"})
        if unknown:
            raise SystemExit(
                f"error: unknown key(s) {unknown} in the 'bench' mapping of {args.params_file}; "
                f"known: {sorted(options)}"
            )
        if section.get("quick"):
            options.update(QUICK)
        options.update({k: v for k, v in section.items() if k != "quick"})
    options.update({k: getattr(args, k) for k in options if getattr(args, k, None) is not None})
    checks = {
        "models": isinstance(options["models"], list)
        and bool(options["models"])
        and set(options["models"]) <= set(MODELS),
        "batch_sizes": isinstance(options["batch_sizes"], list)
        and bool(options["batch_sizes"])
        and all(isinstance(b, int) and b >= 1 for b in options["batch_sizes"]),
        "methods": isinstance(options["methods"], list) and set(options["methods"]) <= set(OUR_METHODS),
        "paths": isinstance(options["paths"], list) and set(options["paths"]) <= set(PATHS),
        "baselines": isinstance(options["baselines"], list) and set(options["baselines"]) <= set(BASELINES),
        "repeats": isinstance(options["repeats"], int) and options["repeats"] >= 1,
        "runs": isinstance(options["runs"], int) and options["runs"] >= 1,
        "warmup": isinstance(options["warmup"], int) and options["warmup"] >= 0,
        "threads": isinstance(options["threads"], int) and options["threads"] >= 1,
        "device": _device_type(options["device"]) in ("cpu", "cuda"),
        "max_per_example_gib": isinstance(options["max_per_example_gib"], (int, float))
        and options["max_per_example_gib"] > 0,
    }
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        raise SystemExit(
            f"error: invalid {', '.join(f'{k}={options[k]!r}' for k in bad)}: models from {sorted(MODELS)}, "
            f"batch sizes, repeats, runs and threads >= 1, warmup >= 0, methods from {list(OUR_METHODS)}, "
            f"paths from {list(PATHS)}, baselines from {list(BASELINES)}, device cpu or cuda[:i], "
            f"max_per_example_gib > 0"
        )
    if _device_type(options["device"]) == "cuda":
        index = torch.device(options["device"]).index or 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise SystemExit(
                f"error: device {options['device']} but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return options


def _device_type(device: Any) -> str | None:
    """``"cpu"``, ``"cuda"`` (for ``cuda`` or ``cuda:i``) or another torch device type.

    ``None`` if not a device name.
    """
    try:
        return torch.device(device).type if isinstance(device, str) else None
    except RuntimeError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    options = resolve_options(args)
    torch.set_num_threads(options["threads"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's and torch's hook warnings, once per setup
        records, skipped = measure(
            options["models"],
            options["batch_sizes"],
            options["methods"],
            options["paths"],
            options["baselines"],
            options["repeats"],
            options["warmup"],
            options["runs"],
            options["device"],
            max_per_example_bytes=options["max_per_example_gib"] * 2**30,
            progress=not args.quiet,
        )
    device = _device_label(options["device"])
    on_cuda = options["device"].startswith("cuda")
    # on CUDA the host thread launches kernels and waits in torch.cuda.synchronize, which may spin
    cpu_time_note = " (on CUDA: launching and waiting on the host, not GPU work)" if on_cuda else ""
    note = (
        f"Step time relative to non-private training, same process ({device}; torch {torch.__version__}; "
        f"sigma = {NOISE_MULTIPLIER}, timing only, no privacy claim). "
        f"{options['repeats']} rounds per run, {options['runs']} run(s); a round times every setup once, "
        "round-robin, and a per-round ratio divides a setup's sample by the non-private sample of the same round. "
        "'x non-private': the median of the per-round ratios of every run; 'spread': (Q3 - Q1) / median of those "
        f"ratios (interquartile range over the median); 'stable?': unstable when the spread exceeds "
        f"{100 * UNSTABLE_SPREAD:.0f} % or there is a single round (do not quote an unstable ratio); "
        "'run k' columns: the median of run k's per-round ratios. "
        f"'x CPU time (run k)': the same median with this thread's CPU time{cpu_time_note}. "
        "Peak memory: torch allocations during a step above those before it "
        f"({'CUDA max_memory_allocated' if on_cuda else 'profiler allocation events'}); "
        "largest tensor: the largest tensor any operation of a step returns; "
        "[B, d]: size of the per-example gradient matrix (float32)."
    )
    for record in records:
        record["device_name"] = device
    write_text_atomic(args.json, json.dumps(records, indent=1) + "\n")
    scaling = (
        "\n## Scaling with batch size and width\n\n"
        "Step time relative to non-private (median over the rounds of every run, its spread in brackets; the "
        "non-private row: its step time in the last run) and peak memory of a step, per batch size "
        f"(same process and setting as above).\n\n{scaling_table(records)}"
    )
    write_text_atomic(args.table, table(records, note, skipped) + scaling)
    figure(records, args.figure, f"Private step time / non-private step time ({device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
