"""GeoClip: geometry-aware clipping, the full-matrix generalisation of AdaCliP.

Gilani, Tasnim, Sankar, Kosut, "GeoClip: Geometry-Aware Clipping for Differentially Private SGD",
NeurIPS 2025, arXiv 2506.06549.  Per step ``t``, with shift ``a_t`` and the eigen-decomposition
``U Lambda U^T`` of the moving covariance ``Sigma_t`` (eigenvalues clamped to ``[h1, h2]``)::

    M_t     = (gamma / sum_i sqrt(lambda_i))^(1/2) Lambda^(-1/4) U^T          (the transform)
    w_i     = M_t (g_i - a_t),   w_i <- w_i min(1, 1/||w_i||)                 (clip to norm 1)
    w~      = (sum_i w_i + N(0, sigma^2 I)) / B;   g~ = M_t^-1 w~ + a_t        (noise once, map back)
    a_t+1   = beta1 a_t + (1 - beta1) g~
    S_t     = s ((g~ - a_t)(g~ - a_t)^T - nu sigma^2 / B^2 M_t^-1 M_t^-T)     (released values only)
    Sigma_t+1 = beta2 Sigma_t + (1 - beta2) S_t

``M_t`` minimises the noise power ``tr(M^-1 M^-T)`` (the injected noise in gradient space is
``N(0, sigma^2 / B^2 M^-1 M^-T)``) subject to ``E||M (g - a)||^2 = tr(M Sigma M^T) <= gamma``; the
minimum is ``(tr Sigma^(1/2))^2 / gamma`` (see :class:`GeoClip`).  With a diagonal ``Sigma`` it is
AdaCliP's coordinate scale: ``M = diag(1 / b)`` with ``b_j = kappa sqrt(s_j) sqrt(sum_k s_k)``,
``s_j = sqrt(Sigma_jj)`` and ``gamma = 1 / kappa^2``.

This module uses the symmetric square root ``M = c U Lambda^(-1/4) U^T`` (the paper's ``M`` times the
rotation ``U``): the clipped norms, the noise distribution and the released gradient are the same,
and the transform does not depend on the sign or order of the eigenvectors.

Two ways to keep ``Sigma``: the full ``d x d`` matrix (``rank=None``: one ``O(d^3)`` eigen-decomposition
per step, refused above :data:`FULL_MATRIX_MAX_DIM` parameters), or a streaming rank-``k`` form
``Sigma = U diag(lambda) U^T + lambda_rest (I - U U^T)`` that keeps the top ``k`` eigenpairs and treats
the other ``d - k`` directions as one isotropic eigenvalue (``O(n d k)`` per step; never forms a
``d x d`` matrix).

**Fast path.**  ``||M (g - a)||^2 = c^2 (lambda_rest^-1/2 ||g - a||^2 + sum_j (lambda_j^-1/2 - lambda_rest^-1/2)
(u_j . (g - a))^2)`` is a rank-``k`` projection plus an isotropic rest (:meth:`GeoClip.subspace_norm`), so the
per-example norms come from layer factors without the ``[n, d]`` matrix
(:func:`adaclip.engine.per_example.subspace_norms`, ``O(n d k)``), and the clipped sum is
``sum_i f_i g_i - a sum_i f_i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from adaclip._validate import require_bool, require_in_range, require_int, require_one_of, require_positive
from adaclip.methods.base import (
    ClippedSum,
    ClipRule,
    Stats,
    SubspaceNorm,
    check_dim,
    clip_factors,
    drop_nonfinite,
    zero_rows,
)
from adaclip.methods.canary import CANARY_SCALE, DTYPE, CanaryAdapter

VarianceTarget = Literal["per_example", "batch_mean"]

FULL_MATRIX_MAX_DIM = 4096
"""Largest parameter count for the full-matrix variant: it stores two ``d x d`` matrices and runs one
``O(d^3)`` eigen-decomposition per step (about 1 s at ``d = 2000`` on one CPU core); set ``rank`` above."""


def _symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs (ascending) of the symmetric part of ``matrix``, in its dtype; computed in at least float32
    (``torch.linalg.eigh`` has no half-precision kernels)."""
    work = torch.promote_types(matrix.dtype, torch.float32)
    eigenvalues, vectors = torch.linalg.eigh(((matrix + matrix.T) / 2).to(work))
    return eigenvalues.to(matrix.dtype), vectors.to(matrix.dtype)


@dataclass(frozen=True)
class GeoClipState:
    """GeoClip's running statistics.

    ``mean`` is the shift ``a_t`` (length ``d``).  The moving covariance is
    ``Sigma_t = basis diag(eigenvalues) basis^T + residual (I - basis basis^T)``: ``basis`` holds ``k``
    orthonormal eigenvectors (``k = d`` for the full matrix, where ``residual`` is unused) and
    ``residual`` (a 0-dim tensor) is the shared eigenvalue of the other ``d - k`` directions.  These
    are moving averages of noise-corrected estimates and may be negative.  ``transform_eigenvalues``
    and ``transform_residual`` are the clamped values the next step's transform ``M_t`` uses (kept
    apart so that ``M_0 = I / initial_clip`` exactly, whatever ``h1`` and ``h2``).
    """

    mean: Tensor
    basis: Tensor
    eigenvalues: Tensor
    residual: Tensor
    transform_eigenvalues: Tensor
    transform_residual: Tensor


@dataclass(frozen=True)
class _Transform:
    """``M = c (U diag(lambda^-1/4) U^T + lambda_rest^-1/4 (I - U U^T))``, ``c = sqrt(gamma / tr Sigma^1/2)``."""

    basis: Tensor
    eigenvalues: Tensor
    residual: Tensor
    rest_dim: int
    gamma: float

    @property
    def trace_sqrt(self) -> Tensor:
        """``tr Sigma^(1/2) = sum_i sqrt(lambda_i) + (d - k) sqrt(lambda_rest)``."""
        return self.eigenvalues.sqrt().sum() + self.rest_dim * self.residual.sqrt()

    @property
    def scale_squared(self) -> Tensor:
        return self.gamma / self.trace_sqrt

    def norms(self, rows: Tensor) -> Tensor:
        """``||M x||`` for every row ``x`` of ``rows``, from the projections on the basis (no ``n x d`` transform)."""
        coords = rows @ self.basis
        squared = coords.square() @ self.eigenvalues.rsqrt()
        if self.rest_dim:
            outside = rows - coords @ self.basis.T
            squared = squared + outside.square().sum(1) * self.residual.rsqrt()
        return (self.scale_squared * squared).sqrt()

    def inverse(self, vector: Tensor) -> Tensor:
        """``M^-1 v = c^-1 (U diag(lambda^1/4) U^T v + lambda_rest^1/4 (I - U U^T) v)``.

        With a rest, computed as ``c^-1 (lambda_rest^1/4 v + U diag(lambda^1/4 - lambda_rest^1/4) U^T v)``: one
        pass over ``U`` each way.
        """
        coords = self.basis.T @ vector
        if not self.rest_dim:
            return self.basis @ (coords * self.eigenvalues.pow(0.25)) / self.scale_squared.sqrt()
        rest_root = self.residual.pow(0.25)
        mapped = torch.addmv(rest_root * vector, self.basis, coords * (self.eigenvalues.pow(0.25) - rest_root))
        return mapped / self.scale_squared.sqrt()

    def noise_covariance(self) -> tuple[Tensor, Tensor]:
        """The basis and rest eigenvalues of ``M^-1 M^-T``.

        ``M^-1 M^-T = c^-2 (U diag(sqrt(lambda)) U^T + sqrt(lambda_rest) (I - U U^T))``.
        """
        return self.eigenvalues.sqrt() / self.scale_squared, self.residual.sqrt() / self.scale_squared


class GeoClip(ClipRule):
    """GeoClip (Gilani et al. 2025, arXiv 2506.06549): clip in the space that whitens the gradient covariance.

    See the module docstring for the update.  ``a`` and ``Sigma`` depend on released noisy gradients
    only, so the privacy cost equals DP-SGD's with the same (sigma, q, T): the clipped vectors have
    norm <= 1 in the transformed space and ``N(0, sigma^2 I)`` is added there once, to their sum.
    ``a_0 = 0`` and ``Sigma_0 = initial_clip^2 gamma / d I``, so ``M_0 = I / initial_clip`` and the
    first step is DP-SGD with clip ``initial_clip``.

    The optimal transform.  For ``P = M^T M`` the noise power is ``tr(P^-1)`` and the constraint
    ``tr(P Sigma) <= gamma``; the Lagrangian gives ``P^-2 = mu Sigma``, so ``P ∝ Sigma^(-1/2)``; the tight
    constraint fixes ``P = gamma / tr(Sigma^(1/2)) Sigma^(-1/2)`` and the noise power
    ``(tr Sigma^(1/2))^2 / gamma``.  The diagonal (AdaCliP) optimum is ``(sum_j sqrt(Sigma_jj))^2 / gamma``
    and the isotropic (DP-SGD) one ``d tr(Sigma) / gamma``; ``tr Sigma^(1/2) <= sum_j sqrt(Sigma_jj)``
    because ``sqrt`` is concave and ``Sigma_jj = sum_i U_ji^2 lambda_i``.

    Parameters (AdaCliP's names where they mean the same):

    * ``gamma``: target ``E||M (g - a)||^2`` (AdaCliP's ``kappa = gamma^(-1/2)``).
    * ``beta1``, ``beta2``: moving-average rates of ``a`` and ``Sigma``; ``h1 <= h2``: the eigenvalue clamp.
    * ``variance_target="per_example"`` multiplies ``S_t`` by ``s = B``: the released deviation
      estimates the covariance of the *batch mean*, ``B`` times smaller than the per-example covariance
      the optimal transform needs (as AdaCliP's option of the same name); ``"batch_mean"`` uses ``s = 1``.
    * ``noise_correction=True`` subtracts the injected noise covariance ``sigma^2 / B^2 M_t^-1 M_t^-T``
      (``nu = 1``, the analogue of AdaCliP's ``r_t``), so ``S_t`` is unbiased for
      ``s (clipped batch mean - a_t)(...)^T``; ``False`` (default) keeps it (``nu = 0``), which adds
      ``s sigma^2 / B^2 M^-1 M^-T`` to ``Sigma`` in expectation.  The clamp acts on the eigenvalues of
      the averaged ``Sigma`` (as in the paper); AdaCliP's clamp-before-averaging has no useful analogue
      here (the per-step ``S_t`` is rank one minus a positive matrix: clamping it keeps only its one
      positive eigenvalue, which discards the noise correction).
    * ``rank``: ``None`` for the full matrix (refused above :data:`FULL_MATRIX_MAX_DIM` parameters),
      or ``k`` for the streaming low-rank variant (``min(k, d)`` eigenpairs are kept; ``k >= d`` is the
      full matrix computed in its eigenbasis).

    Defaults (``noise_correction=False``, ``h1 = 1e-3``, ``h2 = 0.1``).  ``Sigma`` is a moving average of
    about ``1 / (1 - beta2)`` rank-one estimates, so it is rank-deficient whenever ``d`` exceeds that
    window: the eigenvalues outside the span of recent releases decay towards 0 and ``h1`` sets the
    transform there (in the rank-``k`` variant the isotropic rest sits at ``h1``).  With the noise
    correction those eigenvalues even turn negative, and with a tiny ``h1`` the transform then blows
    up off the recent span: nearly every example is clipped and training stalls.  So ``h1`` works
    like a clip-norm scale (about ``sqrt(d h1)`` for a gradient spread over the rest directions), and
    the learning rate is in gradient units, as for AdaCliP.  GeoClip at these defaults, tuned, is
    measured in the report (report: 3. Better accuracy at the same (ε, δ)?).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        expected_batch_size: float,
        initial_clip: float = 1.0,
        gamma: float = 1.0,
        beta1: float = 0.99,
        beta2: float = 0.9,
        h1: float = 1e-3,
        h2: float = 0.1,
        variance_target: VarianceTarget = "per_example",
        noise_correction: bool = False,
        rank: int | None = None,
    ) -> None:
        self.noise_multiplier = require_in_range("noise_multiplier", noise_multiplier, 0.0, math.inf)
        self.expected_batch_size = require_positive("expected_batch_size", expected_batch_size)
        self.initial_clip = require_positive("initial_clip", initial_clip)
        self.gamma = require_positive("gamma", gamma)
        self.beta1 = require_in_range("beta1", beta1, 0.0, 1.0)
        self.beta2 = require_in_range("beta2", beta2, 0.0, 1.0)
        self.h1 = require_positive("h1", h1)
        self.h2 = require_positive("h2", h2)
        if self.h1 > self.h2:
            raise ValueError(f"h1 must be <= h2 (clamp range for the eigenvalues), got h1={h1}, h2={h2}")
        require_one_of("variance_target", variance_target, ("per_example", "batch_mean"))
        require_bool("noise_correction", noise_correction)
        if rank is not None:
            rank = require_int("rank (eigenpairs kept; None for the full matrix)", rank)
        self.variance_target: VarianceTarget = variance_target
        self.noise_correction = noise_correction
        self.rank = rank

    def kept_eigenpairs(self, dim: int) -> int:
        """``k``: how many eigenpairs the state keeps for ``dim`` parameters."""
        check_dim(dim)
        if self.rank is None:
            if dim > FULL_MATRIX_MAX_DIM:
                raise ValueError(
                    f"GeoClip's full matrix needs {dim} x {dim} entries and an O(d^3) eigen-decomposition per step "
                    f"for this model's {dim} parameters (limit {FULL_MATRIX_MAX_DIM}); set rank=k (e.g. rank=64) "
                    "for the streaming low-rank variant"
                )
            return dim
        return min(self.rank, dim)

    def init_state(
        self, dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> GeoClipState:
        """``a_0 = 0``; ``Sigma_0 = lambda_0 I`` with ``lambda_0 = initial_clip^2 gamma / d``,
        so ``M_0 = I / initial_clip``.
        """
        k = self.kept_eigenpairs(dim)
        initial = self.initial_clip**2 * self.gamma / dim
        eigenvalues = torch.full((k,), initial, device=device, dtype=dtype)
        residual = torch.tensor(initial, device=device, dtype=dtype)
        return GeoClipState(
            mean=torch.zeros(dim, device=device, dtype=dtype),
            basis=torch.eye(dim, k, device=device, dtype=dtype),
            eigenvalues=eigenvalues,
            residual=residual,
            transform_eigenvalues=eigenvalues,
            transform_residual=residual,
        )

    def _transform(self, state: GeoClipState, dim: int) -> _Transform:
        """The transform ``M_t`` of ``state`` for ``dim`` parameters (checks the state fits)."""
        k = self.kept_eigenpairs(dim)
        if state.basis.shape != (dim, k):
            raise ValueError(
                f"state holds a basis of shape {tuple(state.basis.shape)}, but {dim} parameters need ({dim}, {k})"
            )
        return _Transform(state.basis, state.transform_eigenvalues, state.transform_residual, dim - k, self.gamma)

    def example_weights(self, norms: Tensor, state: GeoClipState) -> Tensor:
        """``f_i = min(1, 1 / ||M (g_i - a)||)``: clipping to norm 1 in the transformed space."""
        return clip_factors(norms, 1.0)

    def subspace_norm(self, state: GeoClipState) -> SubspaceNorm:
        """``||M x||^2 = c^2 (rho ||x||^2 + sum_j (lambda_j^-1/2 - rho) (u_j . x)^2)``, ``rho = lambda_rest^-1/2``.

        From ``M = c (U Lambda^-1/4 U^T + lambda_rest^-1/4 (I - U U^T))`` with orthonormal ``U``; the full matrix
        (no rest) is ``c^2 sum_j lambda_j^-1/2 (u_j . x)^2``.
        """
        transform = self._transform(state, state.mean.shape[0])
        scale_squared = transform.scale_squared
        basis_weights = transform.eigenvalues.rsqrt() * scale_squared
        if transform.rest_dim == 0:
            return SubspaceNorm(shift=state.mean, basis=state.basis, basis_weights=basis_weights, rest_weight=None)
        rest_weight = transform.residual.rsqrt() * scale_squared
        return SubspaceNorm(
            shift=state.mean, basis=state.basis, basis_weights=basis_weights - rest_weight, rest_weight=rest_weight
        )

    def clipped_sum(self, per_example_grads: Tensor, state: GeoClipState) -> ClippedSum:
        """``M^-1 sum_i clip(M (g_i - a)) = sum_i f_i (g_i - a)``, ``f_i = min(1, 1 / ||M (g_i - a)||)``.

        No ``M^-1`` needed.  Non-finite examples are dropped (:func:`~adaclip.methods.base.drop_nonfinite`).
        """
        transform = self._transform(state, per_example_grads.shape[1])
        deviations = per_example_grads - state.mean
        norms = transform.norms(deviations)
        factors, dropped = drop_nonfinite(norms, clip_factors(norms))
        return ClippedSum.of(factors @ zero_rows(deviations, dropped), factors, dropped)

    def release(self, clipped: ClippedSum, state: GeoClipState, noise: Tensor) -> tuple[Tensor, GeoClipState, Stats]:
        """``g~ = a + (sum_i f_i (g_i - a) + M^-1 sigma z) / B``, then ``a`` and ``Sigma`` from ``g~``."""
        dim = self._check_release_inputs(clipped, noise)
        transform = self._transform(state, dim)
        B = self.expected_batch_size
        released = state.mean + (clipped.vector + transform.inverse(self.noise_multiplier * noise)) / B
        spectrum = (
            transform.eigenvalues
            if transform.rest_dim == 0
            else torch.cat([transform.eigenvalues, transform.residual.reshape(1)])
        )
        deviation = released - state.mean
        split = None if self._is_full(transform) else _Split.of(state.basis, deviation)
        scalars = [transform.trace_sqrt, spectrum.min(), spectrum.max()]
        if split is not None:
            scalars += [split.rho, torch.linalg.vector_norm(deviation)]
        values = clipped.read(*scalars)  # one host synchronisation: counts, statistics and the update's branch
        # a new direction joins the basis unless the release lies in its span (up to rounding)
        extend = (
            split is not None
            and transform.rest_dim > 0
            and values[3] > 1e3 * torch.finfo(released.dtype).eps * values[4]
        )
        new_state = self._update(state, transform, released, deviation, split, extend)
        stats = {
            "clipped_fraction": clipped.clipped_fraction,
            "noise_power": (self.noise_multiplier / B) ** 2 * values[0] ** 2 / self.gamma,
            "eigenvalue_min": values[1],
            "eigenvalue_max": values[2],
            "batch_size": clipped.examples,
        }
        return released, new_state, stats

    def _is_full(self, transform: _Transform) -> bool:
        """Whether the state is the full ``d x d`` matrix (updated densely) rather than the rank-``k`` form."""
        return transform.rest_dim == 0 and self.rank is None

    def _update(
        self,
        state: GeoClipState,
        transform: _Transform,
        released: Tensor,
        deviation: Tensor,
        split: _Split | None,
        extend: bool,
    ) -> GeoClipState:
        """``a_t+1`` and ``Sigma_t+1`` from the released gradient ``g~`` (and public constants) only.

        ``deviation`` is ``g~ - a_t``; ``split`` its parts along and outside the basis (rank-``k`` form), and
        ``extend`` whether the outside part is large enough to join the basis.
        """
        B = self.expected_batch_size
        weight = (1 - self.beta2) * (B if self.variance_target == "per_example" else 1.0)
        noise_basis, noise_rest = transform.noise_covariance()
        correction = (self.noise_multiplier / B) ** 2 if self.noise_correction else 0.0
        noise_basis, noise_rest = correction * noise_basis, correction * noise_rest
        if split is None:
            basis, eigenvalues, residual = self._full_update(state, deviation, weight, noise_basis)
        else:
            basis, eigenvalues, residual = self._low_rank_update(state, split, extend, weight, noise_basis, noise_rest)
        return GeoClipState(
            mean=self.beta1 * state.mean + (1 - self.beta1) * released,
            basis=basis,
            eigenvalues=eigenvalues,
            residual=residual,
            transform_eigenvalues=eigenvalues.clamp(self.h1, self.h2),
            transform_residual=residual.clamp(self.h1, self.h2),
        )

    def _full_update(
        self, state: GeoClipState, x: Tensor, weight: float, noise_basis: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The paper's update on the dense ``d x d`` matrix, then its eigen-decomposition."""
        U = state.basis
        covariance = (U * state.eigenvalues) @ U.T
        estimate = torch.outer(x, x) - (U * noise_basis) @ U.T
        covariance = self.beta2 * covariance + weight * estimate
        eigenvalues, basis = _symmetric_eigh(covariance)
        return basis, eigenvalues, state.residual

    def _low_rank_update(
        self,
        state: GeoClipState,
        split: _Split,
        extend: bool,
        weight: float,
        noise_basis: Tensor,
        noise_rest: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Rank-``k`` streaming update: exact on ``span(U, x)``, then the smallest eigenpair joins the isotropic rest.

        With ``x = U p + rho q`` (``q`` orthogonal to ``U``; ``split``), the new ``Sigma`` restricted to ``[U, q]`` is
        ``beta2 diag(lambda, lambda_rest) + w ((p, rho)(p, rho)^T - diag(n, n_rest))`` and equals
        ``beta2 lambda_rest - w n_rest`` on the other ``d - k - 1`` directions.  Its top ``k`` eigenpairs
        are kept; the smallest is averaged into the rest, which keeps the trace.  Without ``extend`` (``x``
        in the span of ``U``, or no rest) the update stays on ``U``.
        """
        U, dim, k = state.basis, state.basis.shape[0], state.basis.shape[1]
        rest_dim = dim - k
        rest_value = self.beta2 * state.residual - weight * noise_rest
        if extend:
            along = torch.cat([split.coords, split.rho.reshape(1)])
            previous = torch.cat([state.eigenvalues, state.residual.reshape(1)])
            noise = torch.cat([noise_basis, noise_rest.reshape(1)])
        else:
            along, previous, noise = split.coords, state.eigenvalues, noise_basis
        small = torch.diag(self.beta2 * previous - weight * noise) + weight * torch.outer(along, along)
        eigenvalues, rotation = _symmetric_eigh(small)  # ascending
        if not extend:
            return _rotate(U, rotation), eigenvalues, rest_value
        dropped = eigenvalues[0]
        residual = ((rest_dim - 1) * rest_value + dropped) / rest_dim
        new_direction = (split.outside / split.rho, rotation[k, 1:])
        return _rotate(U, rotation[:k, 1:], new_direction), eigenvalues[1:], residual


def _rotate(basis: Tensor, rotation: Tensor, new_direction: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``basis @ rotation``, plus ``outer(q, r)`` for ``new_direction = (q, r)``: ``[basis, q] @ [rotation; r]``.

    The product is formed as ``rotation^T basis^T`` (``[k, d]``, one row per new vector) and transposed once,
    without concatenating ``[basis, q]``: on CPU a ``[d, k] @ [k, k]`` product written row-major ``[d, k]``
    is several times slower for small ``k``.
    """
    rows = torch.mm(rotation.T.contiguous(), basis.T)
    if new_direction is not None:
        vector, coefficients = new_direction
        rows.addr_(coefficients, vector)
    return rows.T.contiguous()


@dataclass(frozen=True)
class _Split:
    """``x = U coords + outside`` with ``outside`` orthogonal to the basis ``U``, and ``rho = ||outside||``."""

    coords: Tensor
    outside: Tensor
    rho: Tensor

    @classmethod
    def of(cls, basis: Tensor, x: Tensor) -> _Split:
        coords = basis.T @ x
        outside = x - basis @ coords
        return cls(coords=coords, outside=outside, rho=torch.linalg.vector_norm(outside))


class GeoClipAdapter(CanaryAdapter[GeoClip]):
    """Audit view: ``w = M (g - a)`` clipped to norm 1, ``g~ = a + M^-1 (sum w + sigma z) / B``.

    ``M = c (U Lambda^-1/4 U^T + lambda_rest^-1/4 (I - U U^T))`` with ``c = sqrt(gamma / tr Sigma^1/2)``, from the
    public state (basis ``U``, the clamped eigenvalues the transform uses and the rest eigenvalue).  The
    canary is ``a + M^-1 (L e_0)``, so that ``M (g - a) = L e_0`` is clipped to ``e_0``; the implied noise is
    ``B M (g~ - g~_null) / sigma`` and the canary shifts coordinate 0 by ``1 / sigma``.
    """

    @staticmethod
    def _apply(rule: GeoClip, state: GeoClipState, vector: Tensor, power: float) -> Tensor:
        """``M^p v`` for ``p = 1`` or ``-1`` in the eigenbasis of the state's covariance."""
        basis, eigenvalues, rest = state.basis, state.transform_eigenvalues, state.transform_residual
        dim, kept = basis.shape
        trace_sqrt = eigenvalues.sqrt().sum() + (dim - kept) * rest.sqrt()
        scale: Tensor = (rule.gamma / trace_sqrt) ** (power / 2)
        coords = basis.T @ vector
        mapped: Tensor = basis @ (coords * eigenvalues.pow(-power / 4))
        if kept < dim:
            mapped = mapped + rest.pow(-power / 4) * (vector - basis @ coords)
        return scale * mapped

    def _extreme(self, rule: GeoClip, state: GeoClipState, dim: int, sign: float) -> Tensor:
        direction = torch.zeros(dim, dtype=state.mean.dtype)
        direction[0] = sign * CANARY_SCALE
        return state.mean + self._apply(rule, state, direction, -1.0)

    def canary(self, rule: GeoClip, state: GeoClipState, dim: int) -> Tensor:
        return self._extreme(rule, state, dim, 1.0)

    def background(self, rule: GeoClip, state: GeoClipState, dim: int, size: int) -> Tensor:
        return self._extreme(rule, state, dim, -1.0).expand(size, dim)

    def gradient_noise(self, rule: GeoClip, state: GeoClipState, difference: Tensor) -> Tensor:
        return rule.expected_batch_size * self._apply(rule, state, difference, 1.0) / rule.noise_multiplier

    def canary_shift(self, rule: GeoClip, state: GeoClipState, dim: int) -> Tensor:
        shift = torch.zeros(dim, dtype=DTYPE)
        shift[0] = 1 / rule.noise_multiplier
        return shift
