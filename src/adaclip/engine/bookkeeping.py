"""Book-keeping capture for ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding`` layers: per-example gradients
without ``[B, d]``.

For a linear layer ``y = x W^T + b`` the per-example gradient of example ``i`` is
``g_i(W) = sum_t delta_it x_it^T`` and ``g_i(b) = sum_t delta_it`` (``t`` runs over positions:
one for a plain ``[n, in]`` input, ``T`` for a sequence ``[n, T, in]``, and over every use of a layer
called more than once), where ``x_it`` is the layer input and ``delta_it`` the gradient of the
per-example loss with respect to the layer output.  The pair ``(x, delta)`` is all a clipping rule
needs: norms and the reweighted sum ``sum_i c_i g_i`` follow from it in one product per layer
(:mod:`adaclip.engine.per_example`; Bu et al. 2023, "Differentially private optimization on large model
at small cost", book-keeping).  A convolution is the same with ``x`` unfolded into patches; its
per-example gradients are small and are formed one layer at a time.  An embedding's input is the
token ids: ``g_i`` adds ``delta_it`` to row ``id_it`` (:class:`~adaclip.engine.per_example.EmbeddingPart`
never forms the ``[B, vocab x dim]`` gradients).  So a book-keeping layer

* records ``(x, delta)`` in one backward pass and never forms ``g_i(W)`` of a linear layer;
* lets autograd compute only the input gradient of the layer, not its weight gradient
  (``p.grad`` stays ``None`` until the optimizer writes the private gradient): the layer's output
  is routed through :class:`_Tap`, whose backward returns no gradient for the parameters.

:class:`BookkeepingGradSampleModule` is an Opacus ``GradSampleModule`` that does this for every
``nn.Linear``, zero-padded ``nn.Conv2d`` and ``nn.Embedding`` whose parameters no other layer shares, and
keeps Opacus's per-layer hooks (which materialise ``p.grad_sample`` for that layer alone) for every other
trainable layer (``GroupNorm``, ``LayerNorm``, ``DPLSTM``'s cells, ...).  Each trainable parameter of a
book-keeping layer carries the layer's :class:`LayerCapture` in ``p.layer_capture``.

**Layouts.**  Opacus reads every hooked layer's batch from one dimension, ``batch_first`` (0) or
sequence-first (1, inputs ``[T, B, ...]``), except its ``RNNLinear`` (0).  A ``DPMultiheadAttention``
whose own ``batch_first`` differs from the model's (its default is sequence-first) feeds its
projections the other layout; read with the model's, per-example gradients would mix examples or
positions.  :func:`layer_batch_dims` gives every layer its own batch dimension, and
:class:`LayoutGradSampleModule`, Opacus's ``GradSampleModule`` with its hooks reading it, is the
materialised path's module and the book-keeping module's base.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeGuard

import torch
from opacus import GradSampleModule
from opacus.layers import DPMultiheadAttention
from opacus.layers.dp_rnn import RNNLinear
from opacus.utils.module_utils import requires_grad
from torch import Tensor, nn
from torch.nn.grad import conv2d_input as _untyped_conv2d_input

_conv2d_input: Callable[..., Tensor] = _untyped_conv2d_input
"""``torch.nn.grad.conv2d_input`` (untyped in torch)."""

CAPTURE = "layer_capture"
"""The attribute under which a book-keeping layer's trainable parameters carry its :class:`LayerCapture`."""

NAME = "adaclip_name"
"""The attribute under which a wrapped module's trainable parameters carry their name (for error messages)."""

BookkeepingLayer = nn.Linear | nn.Conv2d | nn.Embedding
"""The layer types book-keeping handles (exact types: subclasses may compute otherwise)."""


def name_parameters(module: nn.Module) -> None:
    """Give every parameter of ``module`` its name in ``module.named_parameters()`` as ``p.adaclip_name``.

    Errors about a parameter then name it (``"encoder.attn.qlinear.weight"``) rather than give its index.
    """
    for name, p in module.named_parameters():
        setattr(p, NAME, name)


def parameter_name(p: Tensor, index: int) -> str:
    """``p``'s name (:func:`name_parameters`), or its index in the optimizer when it has none."""
    name = getattr(p, NAME, None)
    return name if isinstance(name, str) else f"parameter {index} (in optimizer order)"


def layer_batch_dims(module: nn.Module, batch_first: bool) -> dict[int, int]:
    """The dimension of each layer's input that holds the examples, by ``id(layer)`` (see the module docstring).

    ``0`` for ``batch_first`` and ``1`` otherwise (Opacus's rule), except inside a
    ``DPMultiheadAttention`` (its own ``batch_first`` decides, for its projections and sequence biases)
    and for Opacus's ``RNNLinear`` (always ``0``: ``DPLSTM`` feeds its cells one time step ``[B, in]``).
    """
    dims: dict[int, int] = {}

    def visit(layer: nn.Module, dim: int) -> None:
        if isinstance(layer, DPMultiheadAttention):
            dim = 0 if layer.batch_first else 1
        dims[id(layer)] = 0 if type(layer) is RNNLinear else dim
        for child in layer.children():
            visit(child, dim)

    visit(module, 0 if batch_first else 1)
    return dims


class LayoutGradSampleModule(GradSampleModule):
    """Opacus's ``GradSampleModule`` with each layer's batch read from its own dimension (:func:`layer_batch_dims`).

    Arguments as for ``opacus.GradSampleModule``.  Also gives an ``nn.Embedding`` with a ``padding_idx``
    the per-example gradients torch's own backward gives it: none for the padding row (Opacus's
    embedding hook would add the output gradients at padding positions to that row).
    """

    def __init__(
        self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean", strict: bool = True
    ) -> None:
        self._batch_dims: dict[int, int] = layer_batch_dims(m, batch_first)
        self._default_batch_dim = 0 if batch_first else 1
        self._layer_names: dict[int, str] = {id(layer): name for name, layer in m.named_modules()}
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict)

    def layer_batch_dim(self, layer: nn.Module) -> int:
        """The dimension of ``layer``'s input that holds the examples."""
        return self._batch_dims.get(id(layer), self._default_batch_dim)

    def layer_name(self, layer: nn.Module) -> str:
        """``layer``'s name in the wrapped module."""
        return self._layer_names.get(id(layer), type(layer).__name__)

    def check_layout(self, layer: nn.Module, x: Tensor) -> None:
        """Refuse an input with no room for the examples in ``layer``'s batch dimension (a sequence-first model's
        layer that sees ``[B, features]``, e.g. after pooling over time), naming the layer."""
        dim = self.layer_batch_dim(layer)
        if dim != 0 and x.dim() < (2 if type(layer) is nn.Embedding else 3):
            raise ValueError(
                f"layer {self.layer_name(layer)!r} ({type(layer).__name__}) reads its examples from dimension {dim} "
                f"(batch_first=False) but its input has shape {list(x.shape)}: with batch_first=False every layer "
                "must see [T, B, ...]; apply it before pooling over T, or make the model batch-first"
            )

    def capture_activations_hook(self, module: nn.Module, forward_input: Any, _forward_output: Any) -> None:
        """Opacus's hook (it keeps the layer's input for backward), after :meth:`check_layout`."""
        if self.hooks_enabled and forward_input and isinstance(forward_input[0], Tensor):
            self.check_layout(module, forward_input[0])
        super().capture_activations_hook(module, forward_input, _forward_output)

    def rearrange_grad_samples(
        self, *, module: nn.Module, backprops: Tensor, loss_reduction: str, batch_first: bool
    ) -> tuple[list[Tensor], Tensor]:
        """Opacus's rearrangement (examples first, ``backprops`` scaled for ``"mean"``) with the layer's own layout."""
        activations, backprops = super().rearrange_grad_samples(
            module=module,
            backprops=backprops,
            loss_reduction=loss_reduction,
            batch_first=self.layer_batch_dim(module) == 0,
        )
        if type(module) is nn.Embedding and module.padding_idx is not None:
            backprops = backprops.masked_fill((activations[0] == module.padding_idx).unsqueeze(-1), 0.0)
        return activations, backprops


class LayerCapture:
    """What one book-keeping layer recorded since it was last reset.

    ``pairs`` holds ``(x, delta)`` per forward use whose backward has run: the layer input and the
    per-example output gradient (already multiplied by the batch size for ``loss_reduction="mean"``,
    as Opacus does, so that ``delta_i`` is the gradient of example ``i``'s own loss).
    ``completed_passes`` counts backward passes that finished every pending use (more than one
    means gradients of several batches are mixed, which Poisson sampling forbids).  ``batch_dim`` is
    the dimension of the layer's input that holds the examples (:func:`layer_batch_dims`); pairs are
    recorded with the examples first.  ``name`` is the layer's name in the model (for error messages).
    """

    def __init__(self, layer: BookkeepingLayer, batch_dim: int = 0, name: str = "") -> None:
        self.layer = layer
        self.batch_dim = batch_dim
        self.name = name or type(layer).__name__
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.pending_uses = 0
        self.completed_passes = 0

    def reset(self) -> None:
        self.pairs = []
        self.pending_uses = 0
        self.completed_passes = 0

    def record(self, activations: Tensor, backprops: Tensor) -> None:
        if self.batch_dim != 0:
            activations, backprops = activations.movedim(self.batch_dim, 0), backprops.movedim(self.batch_dim, 0)
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
        x = ctx.x.to(dtype) if ctx.x.is_floating_point() else ctx.x  # an embedding's token ids stay integers
        ctx.capture.record(x, delta * ctx.scale if ctx.scale != 1 else delta)
        grad_x = _input_gradient(ctx.capture.layer, ctx.x, grad_output) if ctx.needs_input_grad[1] else None
        return None, grad_x, None, None, None, None


_tap: Callable[..., Tensor] = _Tap.apply
"""``_Tap.apply`` (torch leaves ``Function.apply`` untyped)."""


def layer_capture(p: Tensor) -> LayerCapture | None:
    """The :class:`LayerCapture` a book-keeping parameter carries (``None`` for any other parameter)."""
    capture = getattr(p, CAPTURE, None)
    return capture if isinstance(capture, LayerCapture) else None


def _is_bookkeeping_type(module: nn.Module) -> TypeGuard[BookkeepingLayer]:
    """``nn.Linear``, ``nn.Conv2d`` with zero padding given as numbers, or ``nn.Embedding`` (exact types).

    Not an embedding with ``scale_grad_by_freq`` (its gradient depends on the other examples' tokens).
    """
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Embedding:
        return not module.scale_grad_by_freq
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)


class BookkeepingGradSampleModule(LayoutGradSampleModule):
    """A ``GradSampleModule`` whose unshared linear, convolution and embedding layers are book-keeping.

    See the module docstring.  Arguments as for ``opacus.GradSampleModule``; each layer's batch is
    read from its own dimension (:class:`LayoutGradSampleModule`).  Other layers get Opacus's hooks, so
    ``p.grad_sample`` appears for their parameters after backward; book-keeping parameters keep
    ``p.grad_sample = None`` and hold ``p.layer_capture`` instead.
    :class:`adaclip.engine.optimizer.AdaptiveClipDPOptimizer` reads both.
    """

    def __init__(
        self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean", strict: bool = True
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self._bookkeeping_layers: list[BookkeepingLayer] | None = None
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict)

    def bookkeeping_layers(self) -> list[BookkeepingLayer]:
        """The linear, convolution and embedding layers handled by book-keeping.

        Those that are trainable and whose parameters are not shared with another layer (and, for a
        convolution, whose batch is in dimension 0, as ``nn.Conv2d`` requires).
        """
        if self._bookkeeping_layers is None:
            owners = Counter(id(p) for module in self._module.modules() for p in module.parameters(recurse=False))
            self._bookkeeping_layers = [
                module
                for module in self._module.modules()
                if _is_bookkeeping_type(module)
                and requires_grad(module)
                and all(owners[id(p)] == 1 for p in module.parameters(recurse=False))
                and not (isinstance(module, nn.Conv2d) and self.layer_batch_dim(module) != 0)
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
        names = {id(module): name for name, module in self._module.named_modules()}
        for layer in self.bookkeeping_layers():
            capture = LayerCapture(layer, self.layer_batch_dim(layer), names.get(id(layer), ""))
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
            self.check_layout(layer, x)
            capture.pending_uses += 1
            scale = float(x.shape[capture.batch_dim]) if loss_reduction == "mean" else 1.0
            return _tap(output.detach(), x, capture, scale, layer.weight, getattr(layer, "bias", None))

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
