"""Per-example norms and reweighted sums over all parameters, from factors or per-layer gradients.

All parameters are flattened, in the optimizer's order, into one vector of length ``d`` (the
layout the clipping rules and their state use).  Each parameter contributes one *part*:

* :class:`LinearWeightPart` and :class:`LinearBiasPart` for a book-keeping ``nn.Linear`` layer
  (:mod:`adaclip.engine.bookkeeping`), from the layer inputs ``x`` ``[n, P, in]`` and per-example output
  gradients ``delta`` ``[n, P, out]`` over ``P`` positions (:class:`LinearFactors`):
  ``g_i(W) = sum_p delta_ip x_ip^T`` and ``g_i(b) = sum_p delta_ip``;
* :class:`EmbeddingPart` for a book-keeping ``nn.Embedding``, from its token ids and per-example
  output gradients (never the ``[n, vocab x dim]`` gradients);
* :class:`MaterialisedPart` for everything else: a per-example gradient ``[n, k]`` of one layer
  (a book-keeping convolution's, :func:`conv2d_per_example_grads`, or Opacus's ``p.grad_sample``).

Squared norms, transformed squared norms and weighted sums add up over parts, so a rule gets
``||g_i||`` (or ``||(g_i - a) / b||``) and ``sum_i c_i g_i`` without the ``[n, d]`` matrix.

Norms of a linear weight (one position, ``g_i = delta_i x_i^T``):

* ``||g_i||^2 = ||delta_i||^2 ||x_i||^2``; over ``P`` positions, the Gram form
  ``||g_i||^2 = sum_pq (delta_ip . delta_iq)(x_ip . x_iq)`` (used when ``P (in + out) <= in out``,
  otherwise the layer's ``g_i`` are materialised).
* AdaCliP's transformed norm with shift ``A`` and scale ``S`` (this layer's slices of ``a`` and
  ``b``, shaped ``[out, in]``): expanding ``sum_oj (delta_io x_ij - A_oj)^2 / S_oj^2`` gives

      ||(g_i - A) / S||^2 = (delta_i^2)^T (1/S^2) (x_i^2) - 2 delta_i^T (A/S^2) x_i + sum_oj A_oj^2 / S_oj^2,

  two products of the size of the forward pass (contracting over the wider side).  In floating
  point the three terms can cancel: the sum is clamped at 0, and where the estimated rounding error
  (:func:`_needs_float64`, with TF32's precision where CUDA products use it) exceeds
  ``NORM_ERROR_TOLERANCE`` against the clipping threshold the layer is recomputed in float64, so
  clipping, and with it the sensitivity, stays exact to about 0.05 %.
  For ``P > 1`` the transformed norm has no cheap form and the layer's ``g_i`` are materialised.
  Both products read the layer input in chunks of rows (:data:`CHUNK_ENTRIES`): each chunk's square is
  formed in a reused buffer while the chunk is in cache, so the input is read from memory once and no
  temporary of its size is allocated.  The float64 checks of all layers are read in one host
  synchronisation (:func:`per_example_norms`).
* GeoClip's norm ``||M (g_i - a)||^2 = r ||g_i - a||^2 + sum_j w_j (u_j . (g_i - a))^2`` (a rank-``k``
  projection plus an isotropic rest; :class:`~adaclip.methods.base.SubspaceNorm`): the rest term is the
  transformed norm above with the uniform scale ``r^(-1/2)``, and the projections ``u_j . g_i`` of a linear
  weight are ``delta_i^T U_j x_i``, one product of the layer's output gradients with the basis
  (:func:`subspace_norms`; ``O(n d k)``, never ``[n, d]``).

Weighted sum of a linear weight: ``sum_i c_i g_i = sum_ip (c_i delta_ip) x_ip^T``, one product.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from opacus.utils.tensor_utils import unfold2d
from torch import Tensor, nn

from adaclip.engine.bookkeeping import LayerCapture, layer_capture, parameter_name
from adaclip.methods import ClippedSum, PerLayerClip, PerLayerQuantileState
from adaclip.methods.base import SubspaceNorm


@dataclass(frozen=True)
class Transform:
    """The flat shift ``a`` and scale ``b`` of a transformed norm, with ``1/b^2`` and ``a/b^2`` precomputed."""

    shift: Tensor
    scale: Tensor
    inv_scale_sq: Tensor
    shift_inv_scale_sq: Tensor

    @classmethod
    def of(cls, shift: Tensor, scale: Tensor) -> Transform:
        inv_scale_sq = scale.pow(-2)
        return cls(shift=shift, scale=scale, inv_scale_sq=inv_scale_sq, shift_inv_scale_sq=shift * inv_scale_sq)


@dataclass(frozen=True)
class UncheckedSquaredNorms:
    """Squared norms computed in the parameters' precision, and what the float64 check needs.

    ``magnitude`` is the size of the terms that were added up (``None`` where nothing cancels: the values are
    accurate to the rounding of the result) and ``terms`` the number of products in each sum
    (:func:`_float64_flag`).
    """

    value: Tensor
    magnitude: Tensor | None = None
    terms: int = 1


class Part(ABC):
    """One parameter's per-example gradients, occupying ``[offset, offset + numel)`` of the flat vector."""

    def __init__(self, param: nn.Parameter, offset: int) -> None:
        self.param = param
        self.span = slice(offset, offset + param.numel())

    @property
    @abstractmethod
    def num_examples(self) -> int: ...

    @abstractmethod
    def squared_norms(self) -> Tensor:
        """``||g_i||^2`` of this parameter's part, shape ``[n]`` (callers must not modify it in place)."""

    @abstractmethod
    def transformed_squared_norms(self, transform: Transform) -> Tensor:
        """``||(g_i - a) / b||^2`` restricted to this parameter, shape ``[n]``."""

    def unchecked_transformed_squared_norms(self, transform: Transform) -> UncheckedSquaredNorms:
        """:meth:`transformed_squared_norms` with the float64 check left to the caller, who reads the checks of
        every part in one host synchronisation and calls :meth:`transformed_squared_norms_float64` where needed."""
        return UncheckedSquaredNorms(self.transformed_squared_norms(transform))

    def transformed_squared_norms_float64(self, transform: Transform) -> Tensor:
        """:meth:`transformed_squared_norms` in float64 (for norms whose rounding error may be too large)."""
        return self.transformed_squared_norms(transform).double()

    def projections(self, columns: Tensor) -> Tensor:
        """``g_i . c`` for every example and every column ``c`` of ``columns`` (this parameter's rows of a
        ``[d, m]`` matrix), shape ``[n, m]``, computed in ``columns``' dtype."""
        return self.materialise().to(columns.dtype) @ columns

    @abstractmethod
    def weighted_sum_into(self, weights: Tensor, out: Tensor) -> None:
        """Write ``sum_i weights_i g_i`` into ``out`` (a view shaped like the parameter)."""

    @abstractmethod
    def materialise(self) -> Tensor:
        """The per-example gradients ``[n, numel]``."""

    def coordinate_square_sums(self) -> Tensor:
        """``sum_i g_ij^2`` for every coordinate ``j`` of this parameter, shape ``[numel]`` (for diagnostics)."""
        return self.materialise().square().sum(0)

    @abstractmethod
    def zero_examples(self, dropped: Tensor) -> None:
        """Set the per-example data of the ``dropped`` examples (a boolean mask ``[n]``) to 0.

        The non-finite policy gives them weight 0, but ``0 * NaN`` is NaN: the weighted sum needs zeros.
        """


def _zeroed(tensor: Tensor, dropped: Tensor) -> Tensor:
    """``tensor`` (examples first) with the ``dropped`` examples' entries set to 0."""
    return tensor.masked_fill(dropped.view(-1, *[1] * (tensor.dim() - 1)), 0.0)


class MaterialisedPart(Part):
    """Per-example gradients held explicitly, ``[n, *param.shape]``, in the parameter's dtype.

    (Under ``torch.autocast`` Opacus's hooks may give them in the compute dtype, e.g. bfloat16.)
    """

    def __init__(self, param: nn.Parameter, offset: int, grad_sample: Tensor) -> None:
        super().__init__(param, offset)
        self.grads = grad_sample.reshape(grad_sample.shape[0], param.numel()).to(param.dtype)

    @property
    def num_examples(self) -> int:
        return self.grads.shape[0]

    def squared_norms(self) -> Tensor:
        norms: Tensor = torch.linalg.vector_norm(self.grads, dim=1)
        return norms.square_()

    def transformed_squared_norms(self, transform: Transform) -> Tensor:
        return ((self.grads - transform.shift[self.span]) / transform.scale[self.span]).square_().sum(1)

    def weighted_sum_into(self, weights: Tensor, out: Tensor) -> None:
        torch.mv(self.grads.t(), weights, out=out.view(-1))

    def materialise(self) -> Tensor:
        return self.grads

    def projections(self, columns: Tensor) -> Tensor:
        return self.grads.to(columns.dtype) @ columns

    def coordinate_square_sums(self) -> Tensor:
        return self.grads.square().sum(0)

    def zero_examples(self, dropped: Tensor) -> None:
        self.grads = _zeroed(self.grads, dropped)


class LinearFactors:
    """A book-keeping layer's inputs ``x`` and per-example output gradients ``delta``.

    ``[n, in]`` and ``[n, out]`` when every example has one position (``single``), else
    ``[n, P, in]`` and ``[n, P, out]``.  Quantities that the weight and the bias share are computed
    once per step: ``||delta_i||^2`` and ``c_i delta_i`` for the step's weights.
    """

    def __init__(self, activations: Tensor, backprops: Tensor) -> None:
        if activations.dim() == 3 and activations.shape[1] == 1:
            activations, backprops = activations[:, 0], backprops[:, 0]
        self.x, self.delta = activations, backprops
        self.single = activations.dim() == 2
        self._delta_squared_norms: Tensor | None = None
        self._scaled: tuple[Tensor, Tensor] | None = None

    @property
    def num_examples(self) -> int:
        return self.x.shape[0]

    def bias_grads(self) -> Tensor:
        """The bias's per-example gradients ``sum_p delta_ip``, ``[n, out]``."""
        return self.delta if self.single else self.delta.sum(1)

    def delta_squared_norms(self) -> Tensor:
        """``||sum_p delta_ip||^2`` (the bias's squared norms; with ``||x_i||^2``, the weight's for one position)."""
        if self._delta_squared_norms is None:
            self._delta_squared_norms = torch.linalg.vector_norm(self.bias_grads(), dim=1).square_()
        return self._delta_squared_norms

    def scaled_delta(self, weights: Tensor) -> Tensor:
        """``c_i delta_i`` for ``weights = c``."""
        if self._scaled is None or self._scaled[0] is not weights:
            self._scaled = (weights, self.delta * (weights.unsqueeze(1) if self.single else weights.view(-1, 1, 1)))
        return self._scaled[1]

    def zero_examples(self, dropped: Tensor) -> None:
        """Inputs and output gradients of the ``dropped`` examples set to 0 (cached products forgotten)."""
        self.x, self.delta = _zeroed(self.x, dropped), _zeroed(self.delta, dropped)
        self._delta_squared_norms, self._scaled = None, None


class LinearWeightPart(Part):
    """The weight ``[out, in]`` of a book-keeping linear layer, from its :class:`LinearFactors`."""

    def __init__(self, param: nn.Parameter, offset: int, factors: LinearFactors) -> None:
        super().__init__(param, offset)
        self.factors = factors
        self._materialised: MaterialisedPart | None = None

    @property
    def num_examples(self) -> int:
        return self.factors.num_examples

    def _as_materialised(self) -> MaterialisedPart:
        if self._materialised is None:
            self._materialised = MaterialisedPart(self.param, self.span.start, self.materialise())
        return self._materialised

    def squared_norms(self) -> Tensor:
        factors = self.factors
        if factors.single:
            input_norms: Tensor = torch.linalg.vector_norm(factors.x, dim=1)
            return input_norms.square_().mul_(factors.delta_squared_norms())
        positions, fan_in = factors.x.shape[1:]
        fan_out = factors.delta.shape[2]
        if positions * (fan_in + fan_out) <= fan_in * fan_out:
            value, magnitude = _gram_norms(factors.x, factors.delta)
            if _needs_float64(
                value, magnitude, positions * positions * (fan_in + fan_out), floor=torch.finfo(value.dtype).tiny
            ):
                value = _gram_norms(factors.x.double(), factors.delta.double())[0].to(value.dtype)
            return value.clamp_min_(0)
        return self._as_materialised().squared_norms()

    def transformed_squared_norms(self, transform: Transform) -> Tensor:
        unchecked = self.unchecked_transformed_squared_norms(transform)
        if unchecked.magnitude is not None and _needs_float64(
            unchecked.value, unchecked.magnitude, unchecked.terms, floor=1.0
        ):
            return self.transformed_squared_norms_float64(transform).to(unchecked.value.dtype).clamp_min_(0)
        return unchecked.value.clamp_min_(0) if unchecked.magnitude is not None else unchecked.value

    def unchecked_transformed_squared_norms(self, transform: Transform) -> UncheckedSquaredNorms:
        if not self.factors.single:
            return UncheckedSquaredNorms(self._as_materialised().transformed_squared_norms(transform))
        value, magnitude = _transformed_linear_norms(*self._transform_operands(transform, self.factors.x.dtype))
        return UncheckedSquaredNorms(value, magnitude, self.param.numel())

    def transformed_squared_norms_float64(self, transform: Transform) -> Tensor:
        if not self.factors.single:
            return super().transformed_squared_norms_float64(transform)
        return _transformed_linear_norms(*self._transform_operands(transform, torch.float64))[0].clamp_min_(0)

    def _transform_operands(self, transform: Transform, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """``x``, ``delta``, ``1/S^2``, ``A/S^2`` (``[out, in]``) and ``sum A^2/S^2`` of this layer, in ``dtype``."""
        shape, span = self.param.shape, self.span
        if dtype != transform.shift.dtype:  # the float64 recomputation: 1/S^2 and A/S^2 from a and b in float64
            transform = Transform.of(transform.shift[span].to(dtype), transform.scale[span].to(dtype))
            span = slice(0, self.param.numel())
        return (
            self.factors.x.to(dtype),
            self.factors.delta.to(dtype),
            transform.inv_scale_sq[span].view(shape),  # [out, in]: 1/S^2
            transform.shift_inv_scale_sq[span].view(shape),  # [out, in]: A/S^2
            torch.dot(transform.shift[span], transform.shift_inv_scale_sq[span]),  # sum A^2/S^2
        )

    def projections(self, columns: Tensor) -> Tensor:
        """``u . g_i = delta_i^T U x_i`` for each column ``u`` (``U``: the column as ``[out, in]``).

        One product ``delta @ columns`` viewed ``[out, in m]`` (in chunks of rows) and a batched product with
        ``x``: the intermediate is ``[rows, in m]``, smaller than the layer's per-example gradients
        ``[rows, in out]`` when ``m < out``; otherwise (and for several positions) the layer's gradients are
        materialised and projected.
        """
        fan_out, fan_in = self.param.shape
        width = columns.shape[1]
        if not self.factors.single or width >= fan_out:
            return self._as_materialised().projections(columns)
        x, delta = self.factors.x.to(columns.dtype), self.factors.delta.to(columns.dtype)
        n = x.shape[0]
        result = columns.new_empty(n, width)
        rows = max(1, min(n, CHUNK_ENTRIES // max(1, fan_in * width)))
        stacked = columns.reshape(fan_out, fan_in * width)
        for start in range(0, n, rows):
            chunk = slice(start, start + rows)
            inner = torch.mm(delta[chunk], stacked).view(-1, fan_in, width)  # [rows, in, m]: delta_i^T U
            torch.bmm(x[chunk].unsqueeze(1), inner, out=result[chunk].unsqueeze(1))
        return result

    def weighted_sum_into(self, weights: Tensor, out: Tensor) -> None:
        scaled, x = self.factors.scaled_delta(weights), self.factors.x
        if self.factors.single:
            torch.mm(scaled.t(), x, out=out)
        else:
            torch.mm(scaled.reshape(-1, out.shape[0]).t(), x.reshape(-1, out.shape[1]), out=out)

    def coordinate_square_sums(self) -> Tensor:
        """``sum_i delta_io^2 x_ij^2 = (delta^2)^T (x^2)``: one product the size of the weight (one position)."""
        if not self.factors.single:
            return super().coordinate_square_sums()
        return torch.mm(self.factors.delta.square().t(), self.factors.x.square()).reshape(-1)

    def materialise(self) -> Tensor:
        x, delta = self.factors.x, self.factors.delta
        grads = torch.einsum("no,ni->noi", delta, x) if self.factors.single else torch.einsum("npo,npi->noi", delta, x)
        return grads.reshape(self.num_examples, self.param.numel())

    def zero_examples(self, dropped: Tensor) -> None:
        self.factors.zero_examples(dropped)  # shared with the bias part: zeroing twice is harmless
        self._materialised = None


def _gram_norms(x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """``||sum_p delta_ip x_ip^T||^2 = sum_pq (x_ip . x_iq)(delta_ip . delta_iq)`` and the size of its terms."""
    products = torch.bmm(x, x.transpose(1, 2)).mul_(torch.bmm(delta, delta.transpose(1, 2)))
    return products.sum((1, 2)), products.abs_().sum((1, 2))


CHUNK_ENTRIES = 2**20
"""Entries of a layer input (4 MiB in float32) processed at once by the factor products of
:func:`_transformed_linear_norms` and :meth:`LinearWeightPart.projections`: small enough to stay in cache
between the products that read it, large enough that the loop over chunks costs little."""


def _transformed_linear_norms(
    x: Tensor, delta: Tensor, inv_scale_sq: Tensor, shift_inv_scale_sq: Tensor, constant: Tensor
) -> tuple[Tensor, Tensor]:
    """``||(delta_i x_i^T - A) / S||^2`` by the three-term expansion, and the size of its terms.

    Returns the (unclamped) values and ``sum_oj (delta_io x_ij)^2 / S_oj^2 + sum_oj A_oj^2 / S_oj^2``,
    which bounds each term (the cross term by Cauchy-Schwarz) and so the rounding error.

    Both products contract over the wider side of the layer; its rows are taken in chunks of about
    :data:`CHUNK_ENTRIES` entries, squared into one reused buffer and multiplied while in cache, so that
    the wide factor is read from memory once and no temporary of its size is allocated.  Results are laid
    out ``[features of the other side, n]``, the orientation in which BLAS handles a narrow layer fastest.
    """
    if x.shape[1] >= delta.shape[1]:
        wide, narrow, quadratic_weights, linear_weights = x, delta, inv_scale_sq, shift_inv_scale_sq
    else:
        wide, narrow, quadratic_weights, linear_weights = delta, x, inv_scale_sq.t(), shift_inv_scale_sq.t()
    n, width = wide.shape
    # [0]: (1/S^2) wide_i^2, [1]: (A/S^2) wide_i, one column per example
    products = wide.new_empty(2, narrow.shape[1], n)
    rows = max(1, min(n, CHUNK_ENTRIES // max(1, width)))
    squares = wide.new_empty(rows, width)
    for start in range(0, n, rows):
        chunk = wide[start : start + rows]
        square = squares[: chunk.shape[0]]
        torch.square(chunk, out=square)
        torch.mm(quadratic_weights, square.t(), out=products[0, :, start : start + rows])
        torch.mm(linear_weights, chunk.t(), out=products[1, :, start : start + rows])
    other = narrow.t()
    products.mul_(other)
    products[0].mul_(other)
    quadratic_term, cross_term = products.sum(1)  # sum_k other_k^2 quadratic_k, sum_k other_k linear_k
    return quadratic_term - 2 * cross_term + constant, quadratic_term.add_(constant)


# Rounding error allowed in a squared norm compared with the clipping threshold 1 of a transformed
# norm (0.05 % in the norm): beyond it the part is recomputed in float64.
NORM_ERROR_TOLERANCE = 1e-3


def _float64_flag(value: Tensor, magnitude: Tensor, terms: int, floor: float) -> Tensor | None:
    """A 0-dim boolean tensor: whether cancellation may have cost more than ``NORM_ERROR_TOLERANCE`` relative to
    ``max(value, floor)`` (``None`` for float64 values, which are not checked).

    ``floor`` is the clipping threshold when it is known (1 for a transformed norm); plain norms,
    whose threshold the part does not know, use a relative test (``floor`` tiny).

    The rounding error of a sum of ``terms`` products whose sizes add up to ``magnitude`` is
    typically ``sqrt(terms) * eps * magnitude`` (Higham, Accuracy and Stability of Numerical
    Algorithms, 2002, §2.8: the rule of thumb for random rounding errors); that estimate is compared
    with the tolerance.
    """
    if value.dtype == torch.float64 or value.numel() == 0:
        return None
    estimate = math.sqrt(terms) * product_epsilon(value.dtype, value.device) * magnitude
    return (estimate > NORM_ERROR_TOLERANCE * value.abs().clamp_min(floor)).any()


def _needs_float64(value: Tensor, magnitude: Tensor, terms: int, floor: float) -> bool:
    """:func:`_float64_flag` read on the host (one synchronisation)."""
    flag = _float64_flag(value, magnitude, terms, floor)
    return flag is not None and bool(flag)


def product_epsilon(dtype: torch.dtype, device: torch.device) -> float:
    """Machine epsilon of matrix products in ``dtype`` on ``device``.

    float32 products on CUDA run in TF32 (10 mantissa bits: ``2^-10``) when the user enabled it
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, or ``torch.set_float32_matmul_precision``
    below ``"highest"``); torch's default is full float32.
    """
    if dtype == torch.float32 and device.type == "cuda" and _cuda_matmul_uses_tf32():
        return 2.0**-10
    return torch.finfo(dtype).eps


def _cuda_matmul_uses_tf32() -> bool:
    try:
        return bool(torch.backends.cuda.matmul.fp32_precision == "tf32")
    except AttributeError:  # torch before 2.9: only the legacy flag
        return bool(torch.backends.cuda.matmul.allow_tf32)


class LinearBiasPart(MaterialisedPart):
    """The bias of a book-keeping linear layer.

    Per-example gradients ``sum_p delta_ip``, sharing the layer's factors.
    """

    def __init__(self, param: nn.Parameter, offset: int, factors: LinearFactors) -> None:
        super().__init__(param, offset, factors.bias_grads())
        self.factors = factors

    def squared_norms(self) -> Tensor:
        return self.factors.delta_squared_norms()

    def weighted_sum_into(self, weights: Tensor, out: Tensor) -> None:
        torch.sum(self.factors.scaled_delta(weights), 0 if self.factors.single else (0, 1), out=out)

    def zero_examples(self, dropped: Tensor) -> None:
        super().zero_examples(dropped)
        self.factors.zero_examples(dropped)


class EmbeddingPart(Part):
    """The weight ``[V, D]`` of a book-keeping ``nn.Embedding``, from its token ids and output gradients.

    ``ids`` ``[n, P]`` and ``delta`` ``[n, P, D]`` hold the ``P`` positions of every use (``delta`` is 0
    at ``padding_idx``, whose row gets no gradient).  Row ``r`` of ``g_i`` is the sum of ``delta_ip``
    over the positions ``p`` holding token ``r``.  With ``M_ipq = 1[id_ip = id_iq]`` (the Gram form over
    positions), each position's row sum ``s_ip = sum_q M_ipq delta_iq`` and the number
    ``k_ip = sum_q M_ipq`` of positions holding its token, every distinct token counts once in
    ``sum_p (.) / k_ip``:

    * ``||g_i||^2 = sum_pq M_ipq (delta_ip . delta_iq) = sum_p ||s_ip||^2 / k_ip`` (the latter a sum of
      non-negative terms, computed so);
    * ``||(g_i - A) / S||^2 = sum_r ||A_r / S_r||^2 + sum_p sum_j s_ipj (s_ipj - 2 A_rj) / S_rj^2 / k_ip``
      with ``r = id_ip`` (AdaCliP's transformed norm: rows the example does not touch keep
      ``||A_r / S_r||^2``); recomputed in float64 where cancellation could cost more than
      ``NORM_ERROR_TOLERANCE``, as for linear layers;
    * ``sum_i c_i g_i``: ``c_i delta_ip`` added into row ``id_ip`` (``index_add``).

    Memory ``O(n P (P + D))`` and time ``O(n P^2 D)``; the ``[n, V D]`` matrix only by :meth:`materialise`.
    """

    def __init__(self, param: nn.Parameter, offset: int, ids: Tensor, delta: Tensor) -> None:
        super().__init__(param, offset)
        self.ids, self.delta = ids, delta
        self._row_sums: tuple[Tensor, Tensor] | None = None

    @property
    def num_examples(self) -> int:
        return self.ids.shape[0]

    def row_sums(self) -> tuple[Tensor, Tensor]:
        """``s_ip`` ``[n, P, D]`` and ``k_ip`` ``[n, P]`` (see the class docstring)."""
        if self._row_sums is None:
            same = (self.ids.unsqueeze(2) == self.ids.unsqueeze(1)).to(self.delta.dtype)
            self._row_sums = torch.bmm(same, self.delta), same.sum(2)
        return self._row_sums

    def squared_norms(self) -> Tensor:
        sums, counts = self.row_sums()
        return sums.square().sum(2).div_(counts).sum(1)

    def transformed_squared_norms(self, transform: Transform) -> Tensor:
        shape = self.param.shape
        inv_scale_sq = transform.inv_scale_sq[self.span].view(shape)
        shift_inv_scale_sq = transform.shift_inv_scale_sq[self.span].view(shape)
        constant = torch.dot(transform.shift[self.span], transform.shift_inv_scale_sq[self.span])
        value, magnitude = self._transformed(inv_scale_sq, shift_inv_scale_sq, constant, *self.row_sums())
        if _needs_float64(value, magnitude, self.param.numel() + self.delta[0].numel(), floor=1.0):
            exact = Transform.of(transform.shift[self.span].double(), transform.scale[self.span].double())
            sums, counts = self.row_sums()
            value = self._transformed(
                exact.inv_scale_sq.view(shape),
                exact.shift_inv_scale_sq.view(shape),
                torch.dot(exact.shift, exact.shift_inv_scale_sq),
                sums.double(),
                counts.double(),
            )[0].to(value.dtype)
        return value.clamp_min_(0)

    def _transformed(
        self, inv_scale_sq: Tensor, shift_inv_scale_sq: Tensor, constant: Tensor, sums: Tensor, counts: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The transformed squared norms and the size of their terms (for the rounding-error estimate)."""
        inv, shifted = inv_scale_sq[self.ids], shift_inv_scale_sq[self.ids]  # [n, P, D]: rows of each position
        quadratic = sums.square().mul_(inv).sum(2).div_(counts).sum(1)
        cross = sums.mul(shifted).sum(2).div_(counts).sum(1)
        cross_size = sums.mul(shifted).abs_().sum(2).div_(counts).sum(1)
        return quadratic - 2 * cross + constant, quadratic + 2 * cross_size + constant

    def weighted_sum_into(self, weights: Tensor, out: Tensor) -> None:
        scaled = self.delta * weights.view(-1, 1, 1)
        out.zero_().index_add_(0, self.ids.flatten(), scaled.reshape(-1, out.shape[1]))

    def projections(self, columns: Tensor) -> Tensor:
        """``g_i . c = sum_p delta_ip . c[id_ip]`` (each position's row of ``c``), never ``[n, V D]``."""
        rows = columns.view(*self.param.shape, columns.shape[1])[self.ids]  # [n, P, D, m]
        return torch.einsum("npd,npdm->nm", self.delta.to(columns.dtype), rows)

    def materialise(self) -> Tensor:
        n, (vocabulary, dim) = self.num_examples, self.param.shape
        rows = (torch.arange(n, device=self.ids.device).unsqueeze(1) * vocabulary + self.ids).flatten()
        grads = torch.zeros(n * vocabulary, dim, dtype=self.delta.dtype, device=self.delta.device)
        return grads.index_add_(0, rows, self.delta.reshape(-1, dim)).view(n, vocabulary * dim)

    def coordinate_square_sums(self) -> Tensor:
        """``sum_i g_i[r]^2`` row by row: each example's distinct rows ``s_ip^2`` added into row ``id_ip``."""
        sums, counts = self.row_sums()
        out = torch.zeros(self.param.shape, dtype=self.delta.dtype, device=self.delta.device)
        squares = sums.square().div_(counts.unsqueeze(2))
        return out.index_add_(0, self.ids.flatten(), squares.reshape(-1, out.shape[1])).flatten()

    def zero_examples(self, dropped: Tensor) -> None:
        self.delta = _zeroed(self.delta, dropped)
        self._row_sums = None


def _embedding_factors(capture: LayerCapture) -> tuple[Tensor, Tensor]:
    """An embedding's token ids ``[n, P]`` and output gradients ``[n, P, D]`` over every use (0 at padding)."""
    layer, pairs = capture.layer, capture.pairs
    n = _batch_size(capture)
    ids = torch.cat([x.reshape(n, math.prod(x.shape[1:])) for x, _ in pairs], 1)
    delta = torch.cat([d.reshape(n, math.prod(d.shape[1:-1]), d.shape[-1]) for _, d in pairs], 1)
    padding = getattr(layer, "padding_idx", None)
    if padding is not None:
        delta = delta.masked_fill((ids == padding).unsqueeze(2), 0.0)
    return ids, delta


def _batch_size(capture: LayerCapture) -> int:
    """The number of examples every use of the capture's layer saw (``RuntimeError`` naming it if they differ)."""
    sizes = {x.shape[0] for x, _ in capture.pairs}
    if len(sizes) != 1:
        raise RuntimeError(
            f"layer {capture.name!r} saw batches of different sizes {sorted(sizes)} in one step; "
            "call optimizer.zero_grad() after every step"
        )
    return sizes.pop()


def _factors(capture: LayerCapture) -> LinearFactors:
    """The capture's inputs and output gradients over every position of every use."""
    pairs = capture.pairs
    if len(pairs) == 1 and pairs[0][0].dim() == 2:
        return LinearFactors(*pairs[0])
    n = _batch_size(capture)
    xs = [x.reshape(n, math.prod(x.shape[1:-1]), x.shape[-1]) for x, _ in pairs]
    deltas = [delta.reshape(n, math.prod(delta.shape[1:-1]), delta.shape[-1]) for _, delta in pairs]
    return LinearFactors(torch.cat(xs, 1), torch.cat(deltas, 1))


def conv2d_per_example_grads(layer: nn.Conv2d, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example weight ``[n, *weight.shape]`` and bias ``[n, out]`` gradients of one use of a ``Conv2d``.

    With the input unfolded into patches ``u_il`` (one column per output position ``l``), the
    layer is linear per position, so ``g_i(W) = sum_l delta_il u_il^T`` per group and
    ``g_i(b) = sum_l delta_il``.
    """
    n, groups = x.shape[0], layer.groups
    # [n, C k k, L]; Opacus's strided unfold, several times faster than F.unfold (im2col) on CPU
    patches = unfold2d(
        x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride, dilation=layer.dilation
    )
    delta = delta.flatten(2)  # [n, out, L]
    if groups == 1:
        weight = torch.bmm(delta, patches.transpose(1, 2))
    else:
        positions = delta.shape[2]
        weight = torch.einsum(
            "ngol,ngpl->ngop", delta.view(n, groups, -1, positions), patches.view(n, groups, -1, positions)
        )
    return weight.reshape(n, *layer.weight.shape), delta.sum(2)


def _conv_grads(layer: nn.Conv2d, capture: LayerCapture) -> tuple[Tensor, Tensor]:
    """A convolution's per-example weight and bias gradients, summed over its uses."""
    _batch_size(capture)
    weight, bias = conv2d_per_example_grads(layer, *capture.pairs[0])
    for x, delta in capture.pairs[1:]:
        more_weight, more_bias = conv2d_per_example_grads(layer, x, delta)
        weight, bias = weight + more_weight, bias + more_bias
    return weight, bias


@dataclass
class _LayerCache:
    """Per-layer work shared by a layer's weight and bias parts within one step (keyed by the capture's id)."""

    linear: dict[int, LinearFactors] = field(default_factory=dict)
    conv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


def _capture_part(p: nn.Parameter, offset: int, capture: LayerCapture, cache: _LayerCache) -> Part:
    """The part of a book-keeping layer's parameter.

    It shares the layer's factors or gradients with the layer's other parameter.
    """
    layer, is_weight = capture.layer, p is capture.layer.weight
    if isinstance(layer, nn.Embedding):
        return EmbeddingPart(p, offset, *_embedding_factors(capture))
    if isinstance(layer, nn.Conv2d):
        grads = cache.conv.get(id(capture))
        if grads is None:
            grads = cache.conv[id(capture)] = _conv_grads(layer, capture)
        return MaterialisedPart(p, offset, grads[0] if is_weight else grads[1])
    factors = cache.linear.get(id(capture))
    if factors is None:
        factors = cache.linear[id(capture)] = _factors(capture)
    return (LinearWeightPart if is_weight else LinearBiasPart)(p, offset, factors)


def collect_parts(params: list[nn.Parameter]) -> list[Part]:
    """One part per parameter, in order, from ``p.grad_sample`` or a book-keeping ``p.layer_capture``.

    Raises ``RuntimeError`` naming the problem and the parameters (by name where ``make_private``
    named them, :func:`~adaclip.engine.bookkeeping.name_parameters`) when a parameter got no per-example
    gradient, gradients of several backward passes are pending, or layers disagree on the batch size.
    """
    parts: list[Part] = []
    missing, accumulated = [], []
    cache = _LayerCache()
    offset = 0
    for index, p in enumerate(params):
        capture = layer_capture(p)
        grad_sample = getattr(p, "grad_sample", None)
        if capture is not None and capture.pairs:
            if capture.completed_passes != 1:
                accumulated.append(index)
            else:
                parts.append(_capture_part(p, offset, capture, cache))
        elif isinstance(grad_sample, Tensor):
            parts.append(MaterialisedPart(p, offset, grad_sample))
        elif isinstance(grad_sample, list):
            accumulated.append(index)
        else:
            missing.append(index)
        offset += p.numel()
    if missing and len(missing) == len(params):
        raise RuntimeError("no per-example gradient for any parameter: call loss.backward() before optimizer.step()")
    if missing:
        names = _listed([parameter_name(params[i], i) for i in missing])
        raise RuntimeError(
            f"parameters {names} got no per-example gradient: the forward pass did not use them. Every parameter "
            "the optimizer trains must be used in every forward pass; freeze a layer the forward pass skips "
            "(requires_grad_(False)) or leave it out of the optimizer"
        )
    if accumulated:
        raise RuntimeError(
            "per-example gradients from several backward passes are pending: call optimizer.zero_grad() "
            "after every optimizer.step(); accumulating Poisson batches is not supported"
        )
    sizes: dict[int, list[str]] = {}
    for index, part in enumerate(parts):
        sizes.setdefault(part.num_examples, []).append(parameter_name(part.param, index))
    if len(sizes) > 1:
        listed = "; ".join(f"{size} for {_listed(names)}" for size, names in sorted(sizes.items()))
        raise RuntimeError(
            f"parameters got per-example gradients for different batch sizes ({listed}): some layer reads its "
            "examples from the wrong dimension of its input. batch_first=True (the default) needs inputs "
            "[B, ...] in every layer, batch_first=False needs [T, B, ...] in every layer (a layer after pooling "
            "over T sees [B, ...]); a DPMultiheadAttention follows its own batch_first and DPLSTM its own layout"
        )
    return parts


def _listed(names: list[str], shown: int = 4) -> str:
    """``names`` for a message: the first ``shown``, then how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def per_example_norms(parts: list[Part], transform: Transform | None = None) -> Tensor:
    """``||g_i||`` (or ``||(g_i - a) / b||`` under ``transform``) over all parts, shape ``[n]``.

    Under a transform the float64 checks of all parts are read in one host synchronisation.
    """
    if transform is None:
        squared = [part.squared_norms() for part in parts]
    else:
        squared = _float64_checked(
            parts, [part.unchecked_transformed_squared_norms(transform) for part in parts], transform
        )
    if len(squared) == 1:
        return squared[0].sqrt()
    total = squared[0] + squared[1]
    for more in squared[2:]:
        total.add_(more)
    return total.sqrt_()


def per_layer_clipped_sum(
    rule: PerLayerClip, parts: list[Part], state: PerLayerQuantileState | None, dim: int
) -> ClippedSum:
    """Per-layer clipping's clipped sum from the parts (one per layer): ``sum_i sum_k c_ik g_i^k``, never ``[n, d]``.

    The layer norms ``[n, K]`` are the parts' own; each part's weighted sum takes its column of the
    weights (:class:`~adaclip.methods.per_layer.PerLayerClip`).  Non-finite examples get weight 0 in every
    layer and their data is zeroed before the weighted sums.
    """
    if [part.param.numel() for part in parts] != list(rule.layer_sizes):
        raise ValueError(
            f"per-layer clipping was set up for layers of sizes {list(rule.layer_sizes)} but the optimizer's "
            f"parameters have sizes {[part.param.numel() for part in parts]}"
        )
    norms = torch.stack([part.squared_norms() for part in parts], dim=1).sqrt_()
    weights, dropped = rule.layer_weights(norms, state)
    if dropped is not None:
        zero_examples(parts, dropped)
    flat = torch.empty(dim, dtype=weights.dtype, device=weights.device)
    for k, part in enumerate(parts):
        part.weighted_sum_into(weights[:, k].contiguous(), flat[part.span].view(part.param.shape))
    return rule.clipped_sum_from_layer_weights(flat, weights, dropped)


def _float64_checked(parts: list[Part], pending: list[UncheckedSquaredNorms], transform: Transform) -> list[Tensor]:
    """The parts' squared norms, recomputed in float64 where their checks (read in one synchronisation) ask for it."""
    values = [unchecked.value for unchecked in pending]
    checked = [i for i, unchecked in enumerate(pending) if unchecked.magnitude is not None]
    flags = {}
    for i in checked:
        unchecked = pending[i]
        assert unchecked.magnitude is not None
        flag = _float64_flag(unchecked.value, unchecked.magnitude, unchecked.terms, floor=1.0)
        if flag is not None:
            flags[i] = flag
    if flags:
        for i, needed in zip(flags, torch.stack(list(flags.values())).tolist(), strict=True):
            if needed:
                values[i] = parts[i].transformed_squared_norms_float64(transform).to(values[i].dtype)
    for i in checked:
        values[i] = values[i].clamp_min_(0)
    return values


def subspace_norms(parts: list[Part], subspace: SubspaceNorm) -> Tensor:
    """``||M (g_i - a)||`` for ``||M x||^2 = r ||x||^2 + sum_j w_j (u_j . x)^2`` (GeoClip's), shape ``[n]``.

    The rest term is the transformed norm with the uniform scale ``r^(-1/2)``; the projections come from
    :meth:`Part.projections`.  Both can cancel (``g_i`` close to ``a``; ``w_j < 0`` where the basis holds the
    larger eigenvalues), so the whole sum is checked once and recomputed in float64 where its estimated
    rounding error (:func:`_float64_flag`) exceeds the tolerance against the clipping threshold 1.
    """
    value, magnitude = _subspace_squared_norms(parts, subspace, parts[0].param.dtype if parts else torch.float64)
    if _needs_float64(value, magnitude, subspace.shift.numel(), floor=1.0):
        value = _subspace_squared_norms(parts, subspace, torch.float64)[0].to(value.dtype)
    return value.clamp_min_(0).sqrt_()


def _subspace_squared_norms(parts: list[Part], subspace: SubspaceNorm, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The unclamped ``||M (g_i - a)||^2`` in ``dtype`` and the size of its terms (see :func:`subspace_norms`).

    ``p_ij = u_j . g_i - u_j . a`` is computed to about ``eps sqrt(d) (||g_i|| + ||a||)`` (``||u_j|| = 1``), so
    ``w_j p_ij^2`` to ``2 |w_j| |p_ij|`` times that; the rest term's unchecked squared norms carry their own sizes.
    """
    shift, basis = subspace.shift.to(dtype), subspace.basis.to(dtype)
    weights = subspace.basis_weights.to(dtype)
    projections = parts[0].projections(basis[parts[0].span])
    for part in parts[1:]:
        projections.add_(part.projections(basis[part.span]))
    deviations = projections.sub_(shift @ basis)  # u_j . (g_i - a), [n, k]
    sizes = per_example_norms(parts).to(dtype).add_(torch.linalg.vector_norm(shift))  # ||g_i|| + ||a||
    value = deviations.square() @ weights
    magnitude = deviations.square() @ weights.abs() + 2 * sizes * (deviations.abs() @ weights.abs())
    if subspace.rest_weight is not None:
        rest = Transform.of(shift, subspace.rest_weight.to(dtype).rsqrt().expand_as(shift))
        for part in parts:
            if dtype == torch.float64 and part.param.dtype != torch.float64:
                term = part.transformed_squared_norms_float64(rest)
                value.add_(term)
                magnitude.add_(term)
                continue
            unchecked = part.unchecked_transformed_squared_norms(rest)
            value.add_(unchecked.value)
            magnitude.add_(unchecked.value.abs() if unchecked.magnitude is None else unchecked.magnitude)
    return value, magnitude


def zero_examples(parts: list[Part], dropped: Tensor) -> None:
    """Set the ``dropped`` examples' data to 0 in every part, once their norms are taken (see ``Part``)."""
    for part in parts:
        part.zero_examples(dropped)


def weighted_sum(parts: list[Part], weights: Tensor, dim: int) -> Tensor:
    """``sum_i weights_i g_i`` as one flat vector of length ``dim``."""
    flat = torch.empty(dim, dtype=weights.dtype, device=weights.device)
    for part in parts:
        part.weighted_sum_into(weights, flat[part.span].view(part.param.shape))
    return flat


def materialise(parts: list[Part]) -> Tensor:
    """The ``[n, d]`` matrix of per-example gradients (for rules without the norm interface)."""
    return torch.cat([part.materialise() for part in parts], dim=1)
