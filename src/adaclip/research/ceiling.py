"""Trained non-private ceilings for linear models: L2-regularised ERM solved to convergence.

A private linear model (multinomial logistic regression, least-squares regression) is bounded above by the
non-private empirical risk minimiser of the same model.  Here it is solved, not approximated by a few epochs
of SGD: full-batch L-BFGS (Nocedal & Wright 2006, Algorithm 7.5) with a strong-Wolfe line search, in float64 by
default, on the objective

    ``F(W, b) = (1/n) Σ_i ℓ(W x_i + b, y_i) + (λ/2) ||W||_F²``

with ``ℓ`` the cross-entropy of the softmax (classification) or ``½ (y − ŷ)²`` (regression); the bias is not
penalised.  In scikit-learn's terms, ``LogisticRegression(C)`` minimises ``C Σ_i ℓ_i + ½ ||W||²``, which is
``n C · F`` for ``C = 1 / (n λ)``, and ``Ridge(alpha)`` minimises ``Σ_i (y_i − ŷ_i)² + alpha ||w||²``, which is
``2 n · F`` for ``alpha = n λ``.

``λ`` is picked on the validation split from a log grid (classification: highest accuracy, then the lowest
cross-entropy; regression: lowest mean squared error; losses within a relative :data:`TIE` of the lowest are ties,
which go to the stronger regularisation).  A pick on an edge of the grid widens the grid on that side and fits
again, up to ``max_widenings`` times; a pick still on an edge after that is reported in :attr:`Ceiling.edge`.

L-BFGS runs in standardised variables (each feature centred and scaled by the training split's statistics, a
change of variables that leaves ``F`` and its minimiser unchanged), so unscaled features do not stall it.  Each
fit carries its certificate, the Euclidean norm of ``∇F`` at the solution in those variables; a picked fit whose
norm is above ``gradient_tolerance`` raises :class:`CeilingNotConverged` (a ceiling that was not trained is no
ceiling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from numpy.typing import ArrayLike

from adaclip._validate import require_int, require_one_of, require_positive

Task = Literal["classification", "regression"]
TASKS = ("classification", "regression")
Edge = Literal["low", "high"]
TIE = 1e-6
"""Validation losses within this relative distance of the best are ties (they go to the stronger regularisation)."""
HISTORY = 100
"""L-BFGS's memory (curvature pairs): with 20, unscaled, collinear features (Breast Cancer) need thousands of
iterations at weak regularisation; with 100, a few hundred."""


class CeilingNotConverged(RuntimeError):
    """L-BFGS stopped with ``||∇F||`` above the tolerance at the picked regularisation strength."""


@dataclass(frozen=True)
class Split:
    """Features ``[n, d]`` and targets ``[n]`` (class indices ``0..K−1``, or real values) as tensors."""

    features: torch.Tensor
    targets: torch.Tensor


@dataclass(frozen=True)
class Fit:
    """The minimiser of ``F`` at ``regularisation`` (``weight [outputs, d]``, ``bias [outputs]``) and its
    certificate: ``objective`` ``F`` and ``gradient_norm`` ``||∇F||₂`` there (in the standardised variables of
    :func:`standardisation`), after ``iterations`` L-BFGS steps."""

    regularisation: float
    weight: torch.Tensor
    bias: torch.Tensor
    objective: float
    gradient_norm: float
    iterations: int


@dataclass(frozen=True)
class Metrics:
    """``loss`` (mean cross-entropy, or mean squared error) on ``n`` examples, with ``correct`` and ``accuracy``
    (a fraction) for classification (``None`` for regression)."""

    loss: float
    n: int
    correct: int | None = None
    accuracy: float | None = None


@dataclass(frozen=True)
class Ceiling:
    """The picked fit, its validation and test metrics, the final ``grid`` with each strength's validation
    metrics and certificate (``||∇F||₂``), how often the grid was widened, and ``edge``: where the pick still sits
    on the grid's edge, else None."""

    fit: Fit
    validation: Metrics
    test: Metrics
    grid: tuple[float, ...]
    validation_by_strength: tuple[Metrics, ...]
    gradient_norm_by_strength: tuple[float, ...]
    widenings: int
    edge: Edge | None


def as_split(
    name: str,
    features: ArrayLike | torch.Tensor,
    targets: ArrayLike | torch.Tensor,
    task: Task,
    dtype: torch.dtype = torch.float64,
) -> Split:
    """Checked tensors: ``features [n, d]`` finite in ``dtype``, ``targets [n]`` (``int64`` class indices >= 0, or
    finite reals in ``dtype``)."""
    require_one_of("task", task, TASKS)
    x = (features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))).to(dtype)
    y = targets if isinstance(targets, torch.Tensor) else torch.as_tensor(np.asarray(targets))
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"{name} must hold features [n, d] and targets [n] with n >= 1, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} features must be finite, got a NaN or an infinity")
    if task == "classification":
        if y.dtype.is_floating_point or y.dtype == torch.bool or (y < 0).any():
            raise ValueError(f"{name} targets must be integer class indices >= 0 for classification, got {y.dtype}")
        return Split(x, y.to(torch.int64))
    if not torch.isfinite(y.to(dtype)).all():
        raise ValueError(f"{name} targets must be finite for regression, got a NaN or an infinity")
    return Split(x, y.to(dtype))


def _data_loss(split: Split, weight: torch.Tensor, bias: torch.Tensor, task: Task) -> torch.Tensor:
    """``(1/n) Σ ℓ``: mean softmax cross-entropy, or half the mean squared error."""
    outputs = split.features @ weight.T + bias
    if task == "classification":
        return torch.nn.functional.cross_entropy(outputs, split.targets)
    return 0.5 * torch.mean((outputs[:, 0] - split.targets) ** 2)


def objective(
    split: Split, weight: torch.Tensor, bias: torch.Tensor, task: Task, regularisation: float
) -> torch.Tensor:
    """``F(W, b) = (1/n) Σ ℓ(W x + b, y) + (λ/2) ||W||²`` (the module docstring gives its scikit-learn scaling)."""
    return _data_loss(split, weight, bias, task) + 0.5 * regularisation * torch.sum(weight**2)


def standardisation(train: Split, regularisation: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The training features' mean ``μ`` and ``s = sqrt(variance + λ)``, per feature: L-BFGS works on
    ``V = W ∘ s`` (each column scaled) and ``c = b + W μ``, where ``F``'s diagonal curvature is about 1 for every
    feature, whatever its scale (Nocedal & Wright 2006, §7.2: a change of variables, the same minimiser)."""
    mean = train.features.mean(dim=0)
    return mean, torch.sqrt(train.features.var(dim=0, unbiased=False) + regularisation)


def fit_regularised(
    train: Split,
    *,
    task: Task,
    regularisation: float,
    outputs: int,
    max_iterations: int = 2000,
    gradient_tolerance: float = 1e-7,
) -> Fit:
    """Minimise ``F`` at ``λ = regularisation`` with full-batch L-BFGS (strong-Wolfe line search) in the
    standardised variables ``(V, c)`` of :func:`standardisation`, from zero, keeping :data:`HISTORY` pairs; stops once
    ``max|∂F/∂(V, c)| <= gradient_tolerance / sqrt(parameters)`` (so ``||∇_{V,c} F||₂ <= gradient_tolerance``) or
    after ``max_iterations`` steps.  The certificate, ``||∇_{V,c} F||₂``, is computed afresh at the solution."""
    strength = require_positive("regularisation", regularisation)
    mean, scale = standardisation(train, strength)
    dtype, width = train.features.dtype, train.features.shape[1]
    scaled = torch.zeros(outputs, width, dtype=dtype, requires_grad=True)
    shifted = torch.zeros(outputs, dtype=dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [scaled, shifted],
        lr=1.0,
        max_iter=require_int("max_iterations", max_iterations),
        max_eval=2 * max_iterations,
        tolerance_grad=require_positive("gradient_tolerance", gradient_tolerance)
        / math.sqrt(scaled.numel() + shifted.numel()),
        tolerance_change=1e-15,
        history_size=HISTORY,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        weight = scaled / scale
        value = objective(train, weight, shifted - weight @ mean, task, strength)
        value.backward()  # type: ignore[no-untyped-call]
        return value

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    value = closure()
    norm = math.sqrt(float(scaled.grad.pow(2).sum() + shifted.grad.pow(2).sum()))  # type: ignore[union-attr]
    iterations = int(optimizer.state[scaled].get("n_iter", 0))
    with torch.no_grad():
        weight = scaled / scale
        return Fit(strength, weight, shifted - weight @ mean, float(value), norm, iterations)


def evaluate(fit: Fit, split: Split, task: Task) -> Metrics:
    """Unregularised metrics of ``fit`` on ``split``: cross-entropy and accuracy, or mean squared error."""
    with torch.no_grad():
        outputs = split.features @ fit.weight.T + fit.bias
        if task == "regression":
            return Metrics(loss=float(torch.mean((outputs[:, 0] - split.targets) ** 2)), n=len(split.targets))
        correct = int((outputs.argmax(dim=1) == split.targets).sum())
        loss = float(torch.nn.functional.cross_entropy(outputs, split.targets))
        return Metrics(loss=loss, n=len(split.targets), correct=correct, accuracy=correct / len(split.targets))


def _pick(scores: dict[float, Metrics], task: Task) -> float:
    """The strength with the best validation metrics: the highest accuracy (classification), then the lowest loss;
    losses within a relative :data:`TIE` of the lowest are ties, and ties go to the strongest regularisation."""
    pool = list(scores)
    if task == "classification":
        best_accuracy = max(scores[s].accuracy or 0.0 for s in pool)
        pool = [s for s in pool if scores[s].accuracy == best_accuracy]
    lowest = min(scores[s].loss for s in pool)
    return max(s for s in pool if scores[s].loss <= lowest * (1 + TIE))


def log_grid(low: float, high: float, points_per_decade: int) -> tuple[float, ...]:
    """``points_per_decade`` log-spaced strengths per decade from ``low`` to ``high`` (both included)."""
    bottom, top = require_positive("low", low), require_positive("high", high)
    if not bottom < top:
        raise ValueError(f"the regularisation grid needs low < high, got low={low!r}, high={high!r}")
    per_decade = require_int("points_per_decade", points_per_decade)
    count = max(2, round(math.log10(top / bottom) * per_decade) + 1)
    return tuple(_tidy(v) for v in np.logspace(math.log10(bottom), math.log10(top), count))


def _tidy(strength: float) -> float:
    """A strength rounded to 12 significant digits (``1e-07``, not ``1.0000000000000001e-07``)."""
    return float(f"{strength:.12g}")


def _widened(grid: tuple[float, ...], side: Edge, decades: float, per_decade: int) -> tuple[float, ...]:
    """The strengths that extend ``grid`` by ``decades`` on ``side``."""
    count = max(1, round(decades * per_decade))
    edge, sign = (grid[0], -1) if side == "low" else (grid[-1], 1)
    return tuple(_tidy(10 ** (math.log10(edge) + sign * i / per_decade)) for i in range(1, count + 1))


def trained_ceiling(
    train: Split,
    validation: Split,
    test: Split,
    *,
    task: Task,
    grid: tuple[float, float] = (1e-6, 1e-1),
    points_per_decade: int = 1,
    widen_decades: float = 2.0,
    max_widenings: int = 2,
    max_iterations: int = 2000,
    gradient_tolerance: float = 1e-7,
) -> Ceiling:
    """The L2-regularised ERM ceiling: fit every strength of ``log_grid(*grid, points_per_decade)``, pick on
    ``validation``, widen an edge pick (module docstring), evaluate on ``test``."""
    require_one_of("task", task, TASKS)
    outputs = _outputs(train, validation, test, task)
    require_positive("widen_decades", widen_decades)
    widenings_allowed = require_int("max_widenings", max_widenings, minimum=0)

    def fitted(strengths: tuple[float, ...]) -> dict[float, Fit]:
        return {
            strength: fit_regularised(
                train,
                task=task,
                regularisation=strength,
                outputs=outputs,
                max_iterations=max_iterations,
                gradient_tolerance=gradient_tolerance,
            )
            for strength in strengths
        }

    fits = fitted(log_grid(*grid, points_per_decade))
    scores = {strength: evaluate(fit, validation, task) for strength, fit in fits.items()}
    widenings = 0
    while True:
        strengths = sorted(fits)
        picked = _pick(scores, task)
        edge: Edge | None = "low" if picked == strengths[0] else "high" if picked == strengths[-1] else None
        if edge is None or widenings == widenings_allowed:
            break
        extension = _widened(tuple(strengths), edge, widen_decades, points_per_decade)
        new = fitted(extension)
        scores.update({strength: evaluate(fit, validation, task) for strength, fit in new.items()})
        fits.update(new)
        widenings += 1
    return _ceiling(fits, scores, picked, edge, widenings, test, task, gradient_tolerance, max_iterations)


def _ceiling(
    fits: dict[float, Fit],
    scores: dict[float, Metrics],
    picked: float,
    edge: Edge | None,
    widenings: int,
    test: Split,
    task: Task,
    gradient_tolerance: float,
    max_iterations: int,
) -> Ceiling:
    fit = fits[picked]
    if not fit.gradient_norm <= gradient_tolerance:
        raise CeilingNotConverged(
            f"L-BFGS stopped at ||grad F|| = {fit.gradient_norm:.3g} > gradient_tolerance={gradient_tolerance:g} "
            f"after {fit.iterations} of max_iterations={max_iterations} at regularisation={picked:.3g}: raise "
            "max_iterations, or gradient_tolerance if it stopped early (float64 precision)"
        )
    strengths = tuple(sorted(fits))
    return Ceiling(
        fit=fit,
        validation=scores[picked],
        test=evaluate(fit, test, task),
        grid=strengths,
        validation_by_strength=tuple(scores[s] for s in strengths),
        gradient_norm_by_strength=tuple(fits[s].gradient_norm for s in strengths),
        widenings=widenings,
        edge=edge,
    )


def _outputs(train: Split, validation: Split, test: Split, task: Task) -> int:
    """1 for regression; for classification ``K``, every class ``0..K−1`` seen in training (an unseen class's
    unpenalised bias would run to minus infinity) and no other class in validation or test."""
    widths = {split.features.shape[1] for split in (train, validation, test)}
    if len(widths) != 1:
        raise ValueError(f"train, validation and test must have the same number of features, got {sorted(widths)}")
    if task == "regression":
        return 1
    classes, seen = int(train.targets.max()) + 1, len(torch.unique(train.targets))
    if seen != classes:
        raise ValueError(f"train targets must contain every class 0..{classes - 1}, got {seen} distinct classes")
    for name, split in (("validation", validation), ("test", test)):
        if int(split.targets.max()) >= classes:
            raise ValueError(f"{name} targets must be classes seen in training (0..{classes - 1}), got a larger one")
    return classes
