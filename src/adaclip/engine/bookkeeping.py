"""Book-keeping capture for ``nn.Linear`` and ``nn.Conv2d`` layers: per-example gradients without ``[B, d]``.

For a linear layer ``y = x W^T + b`` the per-example gradient of example ``i`` is
``g_i(W) = sum_t delta_it x_it^T`` and ``g_i(b) = sum_t delta_it`` (``t`` runs over positions:
one for a plain ``[n, in]`` input, ``T`` for a sequence ``[n, T, in]``, and over every use of a layer
called more than once), where ``x_it`` is the layer input and ``delta_it`` the gradient of the
per-example loss with respect to the layer output.  The pair ``(x, delta)`` is all a clipping rule
needs: norms and the reweighted sum ``sum_i c_i g_i`` follow from it in one product per layer
(:mod:`adaclip.engine.per_example`; Bu et al. 2023, "Differentially private optimization on large model
at small cost", book-keeping).  A convolution is the same with ``x`` unfolded into patches; its
per-example gradients are small and are formed one layer at a time.  So a book-keeping layer

* records ``(x, delta)`` in one backward pass and never forms ``g_i(W)`` of a linear layer;
* lets autograd compute only the input gradient of the layer, not its weight gradient
  (``p.grad`` stays ``None`` until the optimizer writes the private gradient): the layer's output
  is routed through :class:`_Tap`, whose backward returns no gradient for the parameters.

:class:`BookkeepingGradSampleModule` is an Opacus ``GradSampleModule`` that does this for every
``nn.Linear`` and zero-padded ``nn.Conv2d`` whose parameters no other layer shares, and keeps
Opacus's per-layer hooks (which materialise ``p.grad_sample`` for that layer alone) for every other
trainable layer (``GroupNorm``, ``Embedding``, ...).  Each trainable parameter of a book-keeping
layer carries the layer's :class:`LayerCapture` in ``p.layer_capture``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeGuard

import torch
from opacus import GradSampleModule
from opacus.utils.module_utils import requires_grad
from torch import Tensor, nn
from torch.nn.grad import conv2d_input as _untyped_conv2d_input

_conv2d_input: Callable[..., Tensor] = _untyped_conv2d_input
"""``torch.nn.grad.conv2d_input`` (untyped in torch)."""

CAPTURE = "layer_capture"
"""The attribute under which a book-keeping layer's trainable parameters carry its :class:`LayerCapture`."""


class LayerCapture:
    """What one book-keeping layer recorded since it was last reset.

    ``pairs`` holds ``(x, delta)`` per forward use whose backward has run: the layer input and the
    per-example output gradient (already multiplied by the batch size for ``loss_reduction="mean"``,
    as Opacus does, so that ``delta_i`` is the gradient of example ``i``'s own loss).
    ``completed_passes`` counts backward passes that finished every pending use (more than one
    means gradients of several batches are mixed, which Poisson sampling forbids).
    """

    def __init__(self, layer: nn.Linear | nn.Conv2d) -> None:
        self.layer = layer
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.pending_uses = 0
        self.completed_passes = 0

    def reset(self) -> None:
        self.pairs = []
        self.pending_uses = 0
        self.completed_passes = 0

    def record(self, activations: Tensor, backprops: Tensor) -> None:
        self.pairs.append((activations, backprops))
        self.pending_uses -= 1
        if self.pending_uses == 0:
            self.completed_passes += 1


def _input_gradient(layer: nn.Linear | nn.Conv2d, x: Tensor, grad_output: Tensor) -> Tensor:
    """The gradient with respect to the layer input (what autograd would pass on).

    Computed in ``grad_output``'s dtype, as autograd would under ``torch.autocast`` (whose forward
    ran the layer with the weight cast to that dtype); autograd casts the result to ``x``'s dtype.
    """
    weight = layer.weight.to(grad_output.dtype)
    if isinstance(layer, nn.Conv2d):
        return _conv2d_input(x.shape, weight, grad_output, layer.stride, layer.padding, layer.dilation, layer.groups)
    return grad_output.matmul(weight)


class _Tap(torch.autograd.Function):
    """Identity on the layer output whose backward records ``(x, delta)`` and returns only the input gradient.

    Inputs: the already computed output (detached: the original graph node, which would compute
    the weight gradient, is dropped), the layer input ``x``, the capture, the factor that turns
    the batch gradient into per-example gradients, and the weight and bias (so that the output
    requires grad whenever a parameter does, even when ``x`` does not, as for a first layer).
    """

    @staticmethod
    def forward(
        ctx: Any, output: Tensor, x: Tensor, capture: LayerCapture, scale: float, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        ctx.x, ctx.capture, ctx.scale = x.detach(), capture, scale
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[None, Tensor | None, None, None, None, None]:
        # Under torch.autocast the input, the output gradient and the parameters may differ in dtype:
        # per-example gradients are recorded in the parameters' dtype (no-op casts otherwise).
        dtype = ctx.capture.layer.weight.dtype
        delta = grad_output.to(dtype)
        ctx.capture.record(ctx.x.to(dtype), delta * ctx.scale if ctx.scale != 1 else delta)
        grad_x = _input_gradient(ctx.capture.layer, ctx.x, grad_output) if ctx.needs_input_grad[1] else None
        return None, grad_x, None, None, None, None


_tap: Callable[..., Tensor] = _Tap.apply
"""``_Tap.apply`` (torch leaves ``Function.apply`` untyped)."""


def layer_capture(p: Tensor) -> LayerCapture | None:
    """The :class:`LayerCapture` a book-keeping parameter carries (``None`` for any other parameter)."""
    capture = getattr(p, CAPTURE, None)
    return capture if isinstance(capture, LayerCapture) else None


def _is_bookkeeping_type(module: nn.Module) -> TypeGuard[nn.Linear | nn.Conv2d]:
    """``nn.Linear``, or ``nn.Conv2d`` with zero padding given as numbers (exact types: subclasses may differ)."""
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)


class BookkeepingGradSampleModule(GradSampleModule):
    """A ``GradSampleModule`` whose unshared linear and convolution layers are book-keeping (see the module docstring).

    Arguments as for ``opacus.GradSampleModule`` (``batch_first`` must be true).  Other layers get
    Opacus's hooks unchanged, so ``p.grad_sample`` appears for their parameters after backward;
    book-keeping parameters keep ``p.grad_sample = None`` and hold ``p.layer_capture`` instead.
    :class:`adaclip.engine.optimizer.AdaptiveClipDPOptimizer` reads both.
    """

    def __init__(
        self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean", strict: bool = True
    ) -> None:
        if not batch_first:
            raise ValueError("BookkeepingGradSampleModule needs batch_first=True (batch dimension first)")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self._bookkeeping_layers: list[nn.Linear | nn.Conv2d] | None = None
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict)

    def bookkeeping_layers(self) -> list[nn.Linear | nn.Conv2d]:
        """The linear and convolution layers handled by book-keeping.

        Those that are trainable and whose parameters are not shared with another layer.
        """
        if self._bookkeeping_layers is None:
            owners = Counter(id(p) for module in self._module.modules() for p in module.parameters(recurse=False))
            self._bookkeeping_layers = [
                module
                for module in self._module.modules()
                if _is_bookkeeping_type(module)
                and requires_grad(module)
                and all(owners[id(p)] == 1 for p in module.parameters(recurse=False))
            ]
        return self._bookkeeping_layers

    def iterate_submodules(self, module: nn.Module) -> Iterator[nn.Module]:
        """Opacus's hooked layers: every trainable layer except the book-keeping ones."""
        bookkeeping = {id(layer) for layer in self.bookkeeping_layers()}
        return (m for m in super().iterate_submodules(module) if id(m) not in bookkeeping)

    def add_hooks(
        self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch: bool = False
    ) -> None:
        super().add_hooks(loss_reduction=loss_reduction, batch_first=batch_first, force_functorch=force_functorch)
        for layer in self.bookkeeping_layers():
            capture = LayerCapture(layer)
            for p in layer.parameters(recurse=False):
                if p.requires_grad:
                    setattr(p, CAPTURE, capture)
            self.autograd_grad_sample_hooks.append(
                layer.register_forward_hook(self._make_tap_hook(capture, loss_reduction))
            )

    def _make_tap_hook(
        self, capture: LayerCapture, loss_reduction: str
    ) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor | None]:
        def tap(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            if not (self.hooks_enabled and layer.training and torch.is_grad_enabled()):
                return None
            x = inputs[0]
            capture.pending_uses += 1
            scale = float(x.shape[0]) if loss_reduction == "mean" else 1.0
            return _tap(output.detach(), x, capture, scale, layer.weight, layer.bias)

        return tap

    def captures(self) -> list[LayerCapture]:
        """The capture of every book-keeping layer."""
        captures = []
        for layer in self.bookkeeping_layers():
            capture = layer_capture(next(p for p in layer.parameters(recurse=False) if p.requires_grad))
            if capture is None:
                raise RuntimeError(
                    "book-keeping hooks are not installed (add_hooks was not called, or remove_hooks was)"
                )
            captures.append(capture)
        return captures

    def set_grad_sample_to_none(self) -> None:
        """Clear ``p.grad_sample`` (Opacus) and every book-keeping capture."""
        super().set_grad_sample_to_none()
        for capture in self.captures():
            capture.reset()

    def remove_hooks(self) -> None:
        super().remove_hooks()
        for layer in self.bookkeeping_layers():
            for p in layer.parameters(recurse=False):
                if hasattr(p, CAPTURE):
                    delattr(p, CAPTURE)
