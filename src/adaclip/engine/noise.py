"""The private optimizer's noise: one fresh standard-normal draw per step from its seeded generator, drawn ahead.

Drawing ``d`` Gaussian numbers on a CPU with torch's generator (Mersenne Twister and Box-Muller) costs time
linear in ``d``, a large share of a private step of a small model at a small batch (the step times are in
the report: 5. What does it cost in compute?).  :class:`NoiseDraws`
therefore draws the next step's noise in a worker thread as soon as a step has released its own, so
that the draw overlaps what the caller does before the next step (the parameter update, the next
forward and backward pass); torch releases the GIL while it draws.

The numbers are exactly those of drawing at each step: every step's noise is one call
``torch.randn(size, generator=g)``, in step order, and nothing else draws from ``g`` in between (a draw
made ahead for a generator that was replaced, or for another size, dtype or device, is discarded and
the generator is put back to its state before it).  A checkpoint saves :meth:`NoiseDraws.generator_state`,
the state before a draw that is still ahead, so a resumed run draws the same noise again.

Only CPU generators draw ahead: on a GPU ``randn`` is an asynchronous kernel that already overlaps the host.
Only draws of at least :data:`AHEAD_MIN_SIZE` numbers go to the worker: handing a draw to another thread
and taking its result back costs a fixed amount (waking the thread, the GIL) that a small draw does not
repay.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

AHEAD_MIN_SIZE = 2**18
"""The smallest draw made ahead (smaller ones are drawn when the step asks for them)."""

_worker: ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def _noise_worker() -> ThreadPoolExecutor:
    """The one worker thread that draws noise ahead (shared by every optimizer of the process; started on first use)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaclip-noise")
        return _worker


def _standard_normal(size: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """One call ``torch.randn(size, generator=generator)``: the draw of one step."""
    return torch.randn(size, generator=generator, dtype=dtype, device=device)


@dataclass(frozen=True)
class _Ahead:
    """A draw made ahead: its result, the generator it came from, what was drawn and the generator's state before."""

    draw: Future[Tensor]
    generator: torch.Generator
    key: tuple[int, torch.dtype, torch.device]
    state_before: Tensor

    def rewind(self) -> None:
        """Wait for the draw and put its generator back to the state before it, as if it had never been made."""
        self.draw.result()
        self.generator.set_state(self.state_before)


class NoiseDraws:
    """Standard-normal noise for each step, drawn one step ahead (see the module docstring).

    ``ahead=False`` draws every step's noise when the step asks for it; so are draws smaller than ``min_size``.
    """

    def __init__(self, ahead: bool = True, min_size: int = AHEAD_MIN_SIZE) -> None:
        self.ahead = ahead
        self.min_size = min_size
        self._pending: _Ahead | None = None

    def draw(self, generator: torch.Generator | None, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """This step's ``size`` standard normals from ``generator`` (torch's global generator if ``None``)."""
        pending, self._pending = self._pending, None
        key = (size, dtype, torch.device(device))
        if pending is not None:
            if pending.generator is generator and pending.key == key:
                return pending.draw.result()
            pending.rewind()
        return torch.randn(size, generator=generator, dtype=dtype, device=device)

    def draw_next(self, generator: torch.Generator | None, size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Start drawing the next step's noise in the worker thread (only for a CPU generator of the caller's own,
        and at least ``min_size`` numbers).

        Torch's global generator is never drawn from ahead: other code draws from it between steps.
        """
        if not self.ahead or size < self.min_size or self._pending is not None:
            return
        if generator is None or generator.device.type != "cpu":
            return
        state_before = generator.get_state()
        draw = _noise_worker().submit(_standard_normal, size, generator, dtype, device)
        self._pending = _Ahead(draw, generator, (size, dtype, torch.device(device)), state_before)

    def generator_state(self, generator: torch.Generator) -> Tensor:
        """``generator``'s state as a checkpoint must save it: before a draw that is still ahead."""
        pending = self._pending
        if pending is not None and pending.generator is generator:
            return pending.state_before.clone()
        return generator.get_state()

    def discard(self) -> None:
        """Forget a draw made ahead and put its generator back (before the generator's state is set from outside)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.rewind()
