"""Trained ceilings against scikit-learn's solvers and the ridge closed form, and the grid's widening."""

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression, Ridge

from adaclip.research.ceiling import (
    CeilingNotConverged,
    as_split,
    evaluate,
    fit_regularised,
    log_grid,
    trained_ceiling,
)


def _classification(n: int = 300, seed: int = 0):
    return make_classification(
        n_samples=n, n_features=6, n_informative=4, n_redundant=0, n_classes=3, random_state=seed
    )


def _regression(noise: float, n: int = 400, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    return x, x @ rng.normal(size=5) + 2.0 + noise * rng.normal(size=n)


def _splits(x, y, task):
    # 50 % train, 25 % validation, 25 % test
    n = len(x)
    cuts = [(0, n // 2, "train"), (n // 2, 3 * n // 4, "validation"), (3 * n // 4, n, "test")]
    return [as_split(name, x[a:b], y[a:b], task) for a, b, name in cuts]


@pytest.mark.parametrize("strength", [1e-3, 1e-1])
def test_logistic_regression_matches_scikit_learn(strength):
    x, y = _classification()
    fit = fit_regularised(
        as_split("train", x, y, "classification"), task="classification", regularisation=strength, outputs=3
    )
    assert fit.gradient_norm <= 1e-7
    reference = LogisticRegression(C=1 / (len(x) * strength), tol=1e-12, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(fit.weight.numpy(), reference.coef_, atol=1e-5)
    # the softmax is invariant to a common shift of the unpenalised biases: compare them centred
    np.testing.assert_allclose(
        fit.bias.numpy() - fit.bias.numpy().mean(), reference.intercept_ - reference.intercept_.mean(), atol=1e-5
    )
    logits = torch.as_tensor(x) @ fit.weight.T + fit.bias
    np.testing.assert_allclose(torch.softmax(logits, dim=1).numpy(), reference.predict_proba(x), atol=1e-6)


def test_least_squares_matches_ridge_and_its_closed_form():
    x, y = _regression(noise=0.5, n=100)
    strength = 0.05
    fit = fit_regularised(as_split("train", x, y, "regression"), task="regression", regularisation=strength, outputs=1)
    reference = Ridge(alpha=len(x) * strength, solver="cholesky").fit(x, y)
    np.testing.assert_allclose(fit.weight.numpy()[0], reference.coef_, atol=1e-7)
    assert float(fit.bias[0]) == pytest.approx(reference.intercept_, abs=1e-7)
    # closed form of F: the bias absorbs the means, then (X_c^T X_c / n + lambda I) w = X_c^T y_c / n
    centred_x, centred_y = x - x.mean(axis=0), y - y.mean()
    w = np.linalg.solve(centred_x.T @ centred_x / len(x) + strength * np.eye(5), centred_x.T @ centred_y / len(x))
    np.testing.assert_allclose(fit.weight.numpy()[0], w, atol=1e-7)


def test_the_certificate_is_the_gradient_norm_at_the_solution():
    x, y = _regression(noise=0.5, n=100)
    x = x * np.array([1e-3, 1.0, 10.0, 300.0, 1.0]) + np.array([0.0, 50.0, 0.0, -700.0, 0.0])  # unscaled features
    split = as_split("train", x, y, "regression")
    strength = 0.05
    fit = fit_regularised(split, task="regression", regularisation=strength, outputs=1)
    assert fit.gradient_norm <= 1e-7
    # the gradient of F by hand, in (W, b): (1/n) X^T r + lambda w and mean(r), with r the residuals
    w = fit.weight.numpy()[0]
    residuals = x @ w + float(fit.bias[0]) - y
    grad_w, grad_b = x.T @ residuals / len(x) + strength * w, residuals.mean()
    # in the standardised variables V = W s, c = b + W mu (so b = c - V mu / s): dF/dV = (dF/dW - dF/db mu) / s
    mu, s = x.mean(axis=0), np.sqrt(x.var(axis=0) + strength)
    by_hand = np.append((grad_w - grad_b * mu) / s, grad_b)
    assert fit.gradient_norm == pytest.approx(np.linalg.norm(by_hand), rel=1e-5, abs=1e-12)
    centred_x, centred_y = x - mu, y - y.mean()
    exact = np.linalg.solve(centred_x.T @ centred_x / len(x) + strength * np.eye(5), centred_x.T @ centred_y / len(x))
    np.testing.assert_allclose(w, exact, rtol=1e-6)


def test_a_ceiling_is_picked_on_validation_and_evaluated_on_test():
    x, y = _classification(n=400, seed=3)
    train, validation, test = _splits(x, y, "classification")
    ceiling = trained_ceiling(train, validation, test, task="classification", grid=(1e-4, 1e0))
    best = max(m.accuracy for m in ceiling.validation_by_strength)
    assert ceiling.validation.accuracy == best
    assert ceiling.test == evaluate(ceiling.fit, test, "classification")
    assert ceiling.test.correct == round(ceiling.test.accuracy * 100) and ceiling.test.n == 100
    assert ceiling.fit.regularisation in ceiling.grid and ceiling.fit.gradient_norm <= 1e-7
    assert len(ceiling.gradient_norm_by_strength) == len(ceiling.grid)
    assert max(ceiling.gradient_norm_by_strength) <= 1e-7


def test_an_edge_pick_widens_the_grid_until_it_is_inside():
    # noisy targets: the validation optimum lies well above the initial grid
    x, y = _regression(noise=3.0)
    train, validation, test = _splits(x, y, "regression")
    ceiling = trained_ceiling(train, validation, test, task="regression", grid=(1e-6, 1e-4), max_widenings=5)
    assert ceiling.widenings >= 1 and ceiling.edge is None
    assert ceiling.grid[-1] > 1e-4 and ceiling.fit.regularisation > 1e-4
    assert ceiling.fit.regularisation not in (ceiling.grid[0], ceiling.grid[-1])
    losses = [m.loss for m in ceiling.validation_by_strength]
    assert ceiling.validation.loss == min(losses)


def test_an_edge_that_remains_is_reported():
    # nearly noiseless targets: less regularisation is always better on validation, so the low edge remains
    x, y = _regression(noise=0.01)
    train, validation, test = _splits(x, y, "regression")
    ceiling = trained_ceiling(train, validation, test, task="regression", grid=(1e-3, 1e-1), max_widenings=2)
    assert ceiling.edge == "low" and ceiling.widenings == 2
    assert ceiling.grid == log_grid(1e-7, 1e-1, 1)
    assert ceiling.fit.regularisation == ceiling.grid[0]
    # and without widening the edge is reported at once
    assert trained_ceiling(train, validation, test, task="regression", grid=(1e-3, 1e-1), max_widenings=0).edge == "low"


def test_a_ceiling_that_did_not_converge_is_refused():
    x, y = _classification()
    train, validation, test = _splits(x, y, "classification")
    with pytest.raises(CeilingNotConverged, match="raise max_iterations"):
        trained_ceiling(train, validation, test, task="classification", grid=(1e-3, 1e-2), max_iterations=1)


def test_log_grid():
    assert log_grid(1e-6, 1e-1, 1) == (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    assert log_grid(1e-2, 1e0, 2) == pytest.approx((1e-2, 10**-1.5, 1e-1, 10**-0.5, 1.0))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: as_split("train", np.ones((3, 2)), np.ones(4), "regression"), "train must hold features"),
        (lambda: as_split("train", np.ones(3), np.ones(3), "regression"), "train must hold features"),
        (lambda: as_split("train", np.full((2, 2), np.nan), np.ones(2), "regression"), "features must be finite"),
        (lambda: as_split("train", np.ones((2, 2)), [np.nan, 1.0], "regression"), "targets must be finite"),
        (lambda: as_split("train", np.ones((2, 2)), [0.5, 1.0], "classification"), "integer class indices"),
        (lambda: as_split("train", np.ones((2, 2)), [-1, 1], "classification"), "integer class indices"),
        (lambda: as_split("train", np.ones((2, 2)), [0, 1], "ranking"), "task must be one of"),
        (lambda: log_grid(1e-1, 1e-3, 1), "low < high"),
        (lambda: log_grid(0.0, 1e-3, 1), "low must be"),
        (
            lambda: fit_regularised(
                as_split("train", np.ones((2, 2)), [1.0, 2.0], "regression"),
                task="regression",
                regularisation=0.0,
                outputs=1,
            ),
            "regularisation must be",
        ),
    ],
)
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_classes_must_be_seen_in_training():
    x = np.random.default_rng(0).normal(size=(12, 2))
    train = as_split("train", x[:6], [0, 2, 0, 2, 0, 2], "classification")
    other = as_split("validation", x[6:], [0, 1, 0, 1, 0, 1], "classification")
    with pytest.raises(ValueError, match=r"every class 0\.\.2"):
        trained_ceiling(train, other, other, task="classification")
    train = as_split("train", x[:6], [0, 1, 0, 1, 0, 1], "classification")
    unseen = as_split("test", x[6:], [0, 2, 0, 1, 0, 1], "classification")
    with pytest.raises(ValueError, match="test targets must be classes seen in training"):
        trained_ceiling(train, other, unseen, task="classification")
    narrow = as_split("test", x[6:, :1], [0, 1, 0, 1, 0, 1], "classification")
    with pytest.raises(ValueError, match="same number of features"):
        trained_ceiling(train, other, narrow, task="classification")
