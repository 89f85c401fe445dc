"""A dispatch mode that records the largest tensor a block of torch code creates.

Shared by the engine tests, ``benchmarks/bench.py`` and ``probes/embedding_bookkeeping.py`` (which put this
folder on ``sys.path``).
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation returns: ``largest`` in elements, ``largest_bytes`` in bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
                self.largest_bytes = max(self.largest_bytes, tensor.numel() * tensor.element_size())
        return out
