"""Where a training step's time goes: torch operations per step, and the operations that take the most CPU time.

For one model and batch size, builds the benchmark's setups (:func:`bench.build_setups`: the non-private step
and each method's fast path, the same fixed batch) and prints, per setup, the number of torch operations one
step dispatches (counted by a ``TorchDispatchMode``, as the benchmark's largest-tensor probe does; a composite
operation counts with the operations it dispatches) and the torch profiler's ``--top`` operations by CPU time
over ``--steps`` steps, with the CPU time per step.  ``--compile`` instead times the plain-norm clipped sum of
an MLP 784-100-10 (norms, clip factors, weighted sum, counts) compiled into one graph with ``torch.compile``
against the same code run eagerly, and reports the compile time and whether the results are bitwise equal.

Run with one torch thread on one core, e.g. ``taskset -c 0 python benchmarks/step_profile.py --model mlp
--batch-size 64 --methods fixed adaclip``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench


class OperationCount(TorchDispatchMode):
    """Counts the torch operations dispatched while it is active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def profile_setups(model: str, batch_size: int, methods: list[str], steps: int, top: int) -> None:
    for setup in bench.build_setups(model, batch_size, methods, ["fast"], [], "cpu"):
        for _ in range(5):
            setup.step()
        counter = OperationCount()
        with counter:
            setup.step()
        with profile(activities=[ProfilerActivity.CPU]) as recorded:
            for _ in range(steps):
                setup.step()
        events = sorted(recorded.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / steps
        label = "nonprivate" if setup.method == "nonprivate" else f"{setup.method}/{setup.path}"
        print(f"{label}: {sum(counter.counts.values())} operations per step, {total:.0f} us CPU time per step")
        for event in events[:top]:
            print(
                f"    {event.key:40s} {event.self_cpu_time_total / steps:8.1f} us/step  "
                f"{event.count / steps:5.1f} calls/step"
            )


def plain_norm_clipped_sum(
    x1: torch.Tensor, d1: torch.Tensor, x2: torch.Tensor, d2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DP-SGD's clipped sum (bound 1) of a two-layer MLP from its layer inputs and output gradients."""
    dsq1 = torch.linalg.vector_norm(d1, dim=1).square()
    dsq2 = torch.linalg.vector_norm(d2, dim=1).square()
    squared = torch.linalg.vector_norm(x1, dim=1).square() * dsq1 + dsq1
    squared = squared + torch.linalg.vector_norm(x2, dim=1).square() * dsq2 + dsq2
    norms = squared.sqrt()
    weights = norms.reciprocal().clamp(max=1.0)
    s1, s2 = d1 * weights.unsqueeze(1), d2 * weights.unsqueeze(1)
    flat = torch.cat([(s1.t() @ x1).reshape(-1), s1.sum(0), (s2.t() @ x2).reshape(-1), s2.sum(0)])
    return flat, (norms + weights).sum(), (weights < 1).sum()


def compile_probe(batch_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch_size, width, generator=generator) for width in (784, 100, 100, 10)]
    start = time.perf_counter()
    compiled = torch.compile(plain_norm_clipped_sum, dynamic=True)
    compiled(*inputs)
    print(f"compile (first call): {time.perf_counter() - start:.1f} s")
    compiled(*(t[: batch_size // 2] for t in inputs))  # another batch size: dynamic shapes, no recompilation
    equal = torch.equal(compiled(*inputs)[0], plain_norm_clipped_sum(*inputs)[0])
    print(f"weighted sum bitwise equal to eager: {equal}")
    for name, function in (("eager", plain_norm_clipped_sum), ("compiled", compiled)):
        blocks = []
        for _ in range(7):
            start = time.thread_time()
            for _ in range(200):
                function(*inputs)
            blocks.append((time.thread_time() - start) / 200)
        print(f"{name}: {1e6 * statistics.median(blocks):.0f} us per call (median CPU time of 7 blocks of 200)")


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--model", choices=sorted(bench.MODELS), default="mlp")
    cli.add_argument("--batch-size", type=int, default=64)
    cli.add_argument("--methods", nargs="+", choices=bench.OUR_METHODS, default=["fixed", "adaclip"])
    cli.add_argument("--steps", type=int, default=50)
    cli.add_argument("--top", type=int, default=8)
    cli.add_argument("--compile", action="store_true", help="time a compiled clipped sum against eager instead")
    args = cli.parse_args()
    torch.set_num_threads(1)
    if args.compile:
        compile_probe(args.batch_size)
    else:
        profile_setups(args.model, args.batch_size, args.methods, args.steps, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
