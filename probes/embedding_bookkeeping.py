"""An embedding's private step on the fast path (book-keeping) and on the materialised path, by vocabulary size.

A text model (``nn.Embedding(V, D)``, mean over positions, ``nn.Linear(D, 10)``), DP-SGD, one batch of
``B`` examples of ``P`` positions, float32 on CPU.  For each vocabulary size and path: the largest tensor
any operation of one step (forward, backward, ``optimizer.step()``) returns, in elements (the
materialised path forms ``[B, V x D]``), and the median wall time of the steps after a warm-up.

    PYTHONPATH=src .venv/bin/python probes/embedding_bookkeeping.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import make_private
from adaclip.research.io import markdown_table, write_text_atomic


def largest_tensor_mode() -> Any:
    """A fresh ``LargestTensor`` dispatch mode, the one of ``tests/engine/tensor_sizes.py`` (loaded from its file)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "engine" / "tensor_sizes.py"
    spec = importlib.util.spec_from_file_location("tensor_sizes", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LargestTensor()


class TextModel(nn.Module):
    def __init__(self, vocabulary: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


def measure(vocabulary: int, dim: int, batch: int, positions: int, per_example: str, steps: int) -> tuple[int, float]:
    """The largest tensor of one step (elements) and the median step time (s) over ``steps`` after a warm-up."""
    torch.manual_seed(0)
    model = TextModel(vocabulary, dim)
    ids = torch.randint(0, vocabulary, (batch, positions))
    labels = torch.randint(0, 10, (batch,))
    module, optimizer, _ = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(ids, labels), batch_size=batch),
        method="fixed",
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        per_example=per_example,
    )

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(ids), labels).backward()
        optimizer.step()

    with largest_tensor_mode() as tracker:
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return tracker.largest, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vocabularies", type=int, nargs="+", default=[1_000, 10_000, 30_000])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("reports/probes/embedding_bookkeeping.md"))
    args = parser.parse_args()
    rows = []
    for vocabulary in args.vocabularies:
        for per_example in ("fast", "materialise"):
            largest, seconds = measure(vocabulary, args.dim, args.batch, args.positions, per_example, args.steps)
            rows.append([vocabulary, per_example, largest, f"{largest * 4 / 2**20:.1f}", f"{seconds * 1000:.1f}"])
            print(rows[-1], flush=True)
    header = ["V", "per_example", "largest tensor (elements)", "largest tensor (MiB, float32)", "median step (ms)"]
    text = (
        f"Text model nn.Embedding(V, {args.dim}) -> mean over {args.positions} positions -> nn.Linear({args.dim}, 10), "
        f"DP-SGD, one batch of B = {args.batch}, float32, CPU (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, a shared 2-core machine: compare times only roughly). "
        f"Largest tensor of one step (forward, backward, optimizer.step()); median of {args.steps} steps after "
        "a warm-up. `[B, V x D]` would be B V D elements.\n\n"
        + markdown_table(header, rows)
        + "\n\n`python probes/embedding_bookkeeping.py` (defaults).\n"
    )
    write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()
