"""GeoClip against closed forms, AdaCliP, dense linear algebra and privacy identities."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.stats import ortho_group
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import make_private
from adaclip.methods import AdaCliP, AdaCliPState, FixedClip
from adaclip.methods.adaclip import optimal_scale
from adaclip.methods.geoclip import FULL_MATRIX_MAX_DIM, GeoClip, GeoClipState
from adaclip.privacy.accounting import epsilon
from adaclip.research.cli import main

pytestmark = pytest.mark.usefixtures("float64_by_default")


def make_state(mean, basis, eigenvalues, residual=1.0) -> GeoClipState:
    """A state whose transform uses the given eigenvalues as they are (no clamping)."""
    residual = torch.tensor(float(residual))
    return GeoClipState(
        mean=mean,
        basis=basis,
        eigenvalues=eigenvalues,
        residual=residual,
        transform_eigenvalues=eigenvalues,
        transform_residual=residual,
    )


def covariance_of(state: GeoClipState) -> np.ndarray:
    """``Sigma = U diag(lambda) U^T + lambda_rest (I - U U^T)`` as a dense matrix."""
    U = state.basis.numpy()
    rest = np.eye(U.shape[0]) - U @ U.T
    return U @ np.diag(state.eigenvalues.numpy()) @ U.T + state.residual.item() * rest


def transform_of(state: GeoClipState, gamma: float) -> np.ndarray:
    """The paper's ``M = (gamma / tr Sigma^1/2)^1/2 Sigma^-1/4`` (symmetric form), from the dense clamped ``Sigma``."""
    U = state.basis.numpy()
    rest = np.eye(U.shape[0]) - U @ U.T
    sigma = U @ np.diag(state.transform_eigenvalues.numpy()) @ U.T + state.transform_residual.item() * rest
    eigenvalues, vectors = np.linalg.eigh(sigma)
    return math.sqrt(gamma / np.sqrt(eigenvalues).sum()) * (vectors * eigenvalues**-0.25) @ vectors.T


def random_state(dim: int, rank: int | None, seed: int) -> GeoClipState:
    rng = np.random.default_rng(seed)
    basis = torch.from_numpy(ortho_group.rvs(dim, random_state=rng)[:, : rank or dim])
    eigenvalues = torch.from_numpy(10 ** rng.uniform(-4, 1, rank or dim))
    return make_state(torch.from_numpy(rng.normal(size=dim)), basis, eigenvalues, residual=10 ** rng.uniform(-4, 0))


def released_by_hand(grads, state, gamma, sigma, batch, noise) -> torch.Tensor:
    """``g~ = M^-1 (sum_i clip(M (g_i - a)) + sigma z) / B + a`` with a dense ``M``."""
    M = transform_of(state, gamma)
    deviations = (grads - state.mean).numpy()
    omega = deviations @ M.T
    clipped = omega * np.minimum(1.0, 1.0 / np.maximum(np.linalg.norm(omega, axis=1, keepdims=True), 1e-300))
    return torch.from_numpy(np.linalg.solve(M, clipped.sum(0) + sigma * noise.numpy()) / batch) + state.mean


# --- the transform: AdaCliP's in the diagonal case, the closed-form optimum in general -------------


def test_diagonal_covariance_gives_adaclips_transform():
    """For Sigma = diag(v): M = sqrt(gamma / sum_k s_k) diag(s^-1/2), s = sqrt(v), which is diag(1 / b) for
    AdaCliP's b_j = kappa sqrt(s_j) sqrt(sum_k s_k) exactly when gamma = 1 / kappa^2."""
    gen = torch.Generator().manual_seed(0)
    dim, kappa, sigma, batch = 5, 1.7, 1.3, 8.0
    variance = torch.rand(dim, generator=gen) + 0.01
    mean = torch.randn(dim, generator=gen)
    geo_state = make_state(mean, torch.eye(dim), variance)
    ada_state = AdaCliPState(mean=mean, variance=variance, scale=optimal_scale(variance.sqrt(), kappa))
    np.testing.assert_allclose(
        transform_of(geo_state, kappa**-2), np.diag(1 / ada_state.scale.numpy()), rtol=1e-10, atol=1e-12
    )

    geoclip = GeoClip(noise_multiplier=sigma, expected_batch_size=batch, gamma=kappa**-2)
    adaclip = AdaCliP(noise_multiplier=sigma, expected_batch_size=batch, kappa=kappa, estimator="per_example")
    grads = 2 * torch.randn(10, dim, generator=gen)
    noise = torch.randn(dim, generator=gen)
    geo_out, _, geo_stats = geoclip.step(grads, geo_state, noise)
    ada_out, _, ada_stats = adaclip.step(grads, ada_state, noise)
    torch.testing.assert_close(geo_out, ada_out)
    assert 0 < geo_stats["clipped_fraction"] == ada_stats["clipped_fraction"] < 1
    assert geo_stats["noise_power"] == pytest.approx(ada_stats["noise_power"])

    # a rotated covariance rotates the result: GeoClip is AdaCliP in the covariance's eigenbasis
    rotation = torch.from_numpy(ortho_group.rvs(dim, random_state=1))
    rotated_state = make_state(rotation @ mean, rotation, variance)
    rotated_out, _, _ = geoclip.step(grads @ rotation.T, rotated_state, rotation @ noise)
    torch.testing.assert_close(rotated_out, rotation @ ada_out)


CORRELATED = np.array([[1.0, 0.9], [0.9, 1.0]])


def test_closed_form_noise_powers_for_a_correlated_covariance():
    """Sigma = [[1, .9], [.9, 1]] has eigenvalues 1.9 and 0.1.  With gamma = 1 the optimal noise powers are:
    full matrix (tr Sigma^1/2)^2 = (sqrt(1.9) + sqrt(0.1))^2 = 2 + 2 sqrt(0.19) = 2.871779;
    diagonal (AdaCliP) (sqrt(Sigma_11) + sqrt(Sigma_22))^2 = 4; isotropic (DP-SGD) d tr(Sigma) = 4."""
    rule = GeoClip(noise_multiplier=2.0, expected_batch_size=4.0)
    eigenvalues, basis = np.linalg.eigh(CORRELATED)
    state = make_state(torch.zeros(2), torch.from_numpy(basis), torch.from_numpy(eigenvalues))
    stats = rule.step(torch.zeros(0, 2), state, torch.zeros(2))[2]
    full = stats["noise_power"] / (2.0 / 4.0) ** 2
    assert full == pytest.approx(2 + 2 * math.sqrt(0.19), rel=1e-12)
    assert full == pytest.approx(2.871779, abs=1e-6)
    assert optimal_scale(torch.from_numpy(np.sqrt(np.diag(CORRELATED)))).square().sum().item() == pytest.approx(4.0)
    assert 2 * np.trace(CORRELATED) == pytest.approx(4.0)
    # the transform meets the constraint E||M g||^2 = tr(M Sigma M^T) = gamma with equality
    M = transform_of(state, 1.0)
    assert np.trace(M @ CORRELATED @ M.T) == pytest.approx(1.0, rel=1e-12)


def test_transform_is_the_numerical_optimum():
    """Minimise tr(P^-1) over P = M^T M = L L^T (L lower triangular)
    subject to tr(M Sigma M^T) = tr(P Sigma) <= gamma.
    """
    rng = np.random.default_rng(3)
    root = rng.normal(size=(3, 3))
    sigma, gamma = root @ root.T + 0.1 * np.eye(3), 0.5
    rows, cols = np.tril_indices(3)

    def gram(entries):
        lower = np.zeros((3, 3))
        lower[rows, cols] = entries
        return lower @ lower.T

    start = np.sqrt(gamma / np.trace(sigma)) * np.eye(3)[rows, cols]  # the isotropic (DP-SGD) transform
    result = minimize(
        lambda entries: np.trace(np.linalg.inv(gram(entries))),
        x0=start,
        constraints=[{"type": "ineq", "fun": lambda entries: gamma - np.trace(gram(entries) @ sigma)}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 2000},
    )
    assert result.success
    best = result.fun
    eigenvalues, basis = np.linalg.eigh(sigma)
    closed_form = np.sqrt(eigenvalues).sum() ** 2 / gamma
    assert best == pytest.approx(closed_form, rel=1e-5)
    rule = GeoClip(noise_multiplier=1.0, expected_batch_size=1.0, gamma=gamma)
    state = make_state(torch.zeros(3), torch.from_numpy(basis), torch.from_numpy(eigenvalues))
    assert rule.step(torch.zeros(0, 3), state, torch.zeros(3))[2]["noise_power"] == pytest.approx(
        closed_form, rel=1e-12
    )
    assert closed_form < np.sqrt(np.diag(sigma)).sum() ** 2 / gamma < 3 * np.trace(sigma) / gamma


# --- steps by hand --------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [None, 2])
def test_step_matches_the_dense_computation(rank):
    sigma, batch, gamma, beta1, beta2 = 1.1, 6.0, 0.8, 0.6, 0.7
    rule = GeoClip(
        noise_multiplier=sigma,
        expected_batch_size=batch,
        gamma=gamma,
        beta1=beta1,
        beta2=beta2,
        h1=1e-3,
        h2=2.0,
        rank=rank,
        noise_correction=True,
    )
    state = random_state(4, rank, seed=5)
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(7, 4, generator=gen) * 3
    noise = torch.randn(4, generator=gen)
    out, new_state, stats = rule.step(grads, state, noise)
    torch.testing.assert_close(out, released_by_hand(grads, state, gamma, sigma, batch, noise))
    torch.testing.assert_close(new_state.mean, beta1 * state.mean + (1 - beta1) * out)
    x = (out - state.mean).numpy()
    M = transform_of(state, gamma)
    noise_covariance = (sigma / batch) ** 2 * np.linalg.inv(M.T @ M)
    expected = beta2 * covariance_of(state) + (1 - beta2) * batch * (np.outer(x, x) - noise_covariance)
    if rank is None:
        np.testing.assert_allclose(covariance_of(new_state), expected, atol=1e-12)
    else:  # the projection keeps the trace, and the kept pairs are eigenpairs of the exact update
        assert np.trace(covariance_of(new_state)) == pytest.approx(np.trace(expected), rel=1e-12)
        U, eigenvalues = new_state.basis.numpy(), new_state.eigenvalues.numpy()
        np.testing.assert_allclose(expected @ U, U * eigenvalues, atol=1e-12)
    torch.testing.assert_close(new_state.transform_eigenvalues, new_state.eigenvalues.clamp(1e-3, 2.0))
    assert stats["noise_power"] == pytest.approx((sigma / batch) ** 2 * np.trace(np.linalg.inv(M.T @ M)), rel=1e-10)


def test_variance_options_by_hand():
    common = dict(noise_multiplier=0.9, expected_batch_size=5.0, beta2=0.5)
    state = random_state(3, None, seed=6)
    gen = torch.Generator().manual_seed(6)
    grads, noise = torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)
    out = GeoClip(**common).step(grads, state, noise)[0]
    x = (out - state.mean).numpy()
    M = transform_of(state, 1.0)
    noise_covariance = (0.9 / 5.0) ** 2 * np.linalg.inv(M.T @ M)
    previous = covariance_of(state)
    for options, estimate in [
        ({"noise_correction": True}, 5.0 * (np.outer(x, x) - noise_covariance)),
        ({}, 5.0 * np.outer(x, x)),  # the defaults: per example, no noise correction
        ({"variance_target": "batch_mean", "noise_correction": True}, np.outer(x, x) - noise_covariance),
        ({"variance_target": "batch_mean"}, np.outer(x, x)),
    ]:
        new_state = GeoClip(**common, **options).step(grads, state, noise)[1]
        np.testing.assert_allclose(covariance_of(new_state), 0.5 * previous + 0.5 * estimate, atol=1e-12)


@pytest.mark.parametrize("rank", [None, 3])
def test_first_step_is_dp_sgd_with_the_initial_clip(rank):
    gen = torch.Generator().manual_seed(7)
    grads, noise = 2 * torch.randn(9, 6, generator=gen), torch.randn(6, generator=gen)
    fixed = FixedClip(clip_norm=0.7, noise_multiplier=1.4, expected_batch_size=8)
    # the clamp range excludes lambda_0 = C0^2 gamma / d: M_0 = I / C0 all the same
    rule = GeoClip(noise_multiplier=1.4, expected_batch_size=8, initial_clip=0.7, gamma=2.0, h1=1.0, h2=2.0, rank=rank)
    state = rule.init_state(6)
    torch.testing.assert_close(state.eigenvalues, torch.full((rank or 6,), 0.7**2 * 2.0 / 6))
    out, _, stats = rule.step(grads, state, noise)
    expected, _, fixed_stats = fixed.step(grads, None, noise)
    torch.testing.assert_close(out, expected)
    assert stats["clipped_fraction"] == fixed_stats["clipped_fraction"]
    assert stats["noise_power"] == pytest.approx(fixed_stats["noise_power"])


@pytest.mark.parametrize("rank", [None, 2])
def test_empty_batch_returns_the_shift_plus_noise_only(rank):
    rule = GeoClip(noise_multiplier=2.0, expected_batch_size=8.0, rank=rank)
    state = random_state(4, rank, seed=8)
    noise = torch.randn(4, generator=torch.Generator().manual_seed(8))
    out, _, stats = rule.step(torch.zeros(0, 4), state, noise)
    M = transform_of(state, 1.0)
    torch.testing.assert_close(out, state.mean + torch.from_numpy(np.linalg.solve(M, 2.0 * noise.numpy())) / 8)
    assert stats["clipped_fraction"] == 0.0 and stats["batch_size"] == 0.0


@pytest.mark.parametrize("rank", [None, 2])
def test_zero_noise_is_deterministic(rank):
    rule = GeoClip(noise_multiplier=0.0, expected_batch_size=5.0, rank=rank)
    state = random_state(4, rank, seed=9)
    grads = torch.randn(6, 4, generator=torch.Generator().manual_seed(9))
    first = rule.step(grads, state, torch.zeros(4))
    second = rule.step(grads, state, torch.randn(4))  # sigma = 0: the draws do not matter
    assert torch.equal(first[0], second[0])
    for name in ("mean", "basis", "eigenvalues", "residual", "transform_eigenvalues", "transform_residual"):
        assert torch.equal(getattr(first[1], name), getattr(second[1], name))
    torch.testing.assert_close(first[0], released_by_hand(grads, state, 1.0, 0.0, 5.0, torch.zeros(4)))


# --- privacy: sensitivity and released-only statistics ---------------------------------------------


@pytest.mark.parametrize("rank", [None, 2])
def test_removing_one_example_moves_the_transformed_sum_by_at_most_one(rank):
    gen = torch.Generator().manual_seed(10)
    rule = GeoClip(noise_multiplier=1.0, expected_batch_size=16.0, rank=rank)
    worst = 0.0
    for trial in range(200):
        state = random_state(5, rank, seed=trial)
        M = torch.from_numpy(transform_of(state, 1.0))
        grads = torch.randn(12, 5, generator=gen) * 10 ** (4 * torch.rand(1, generator=gen).item() - 2)
        k = trial % 12
        with_k = rule.step(grads, state, torch.zeros(5))[0]
        without_k = rule.step(torch.cat([grads[:k], grads[k + 1 :]]), state, torch.zeros(5))[0]
        worst = max(worst, torch.linalg.vector_norm(M @ (with_k - without_k) * 16.0).item())
    assert worst <= 1 + 1e-9
    assert worst > 0.9  # attained by large gradients: the check is not vacuous


@pytest.mark.parametrize("rank", [None, 2])
def test_next_state_depends_only_on_the_released_gradient(rank):
    """Two different batches whose noisy releases coincide must lead to the same next state."""
    gen = torch.Generator().manual_seed(11)
    sigma, batch = 1.5, 8.0
    rule = GeoClip(
        noise_multiplier=sigma,
        expected_batch_size=batch,
        beta1=0.7,
        beta2=0.6,
        h1=1e-4,
        h2=5.0,
        rank=rank,
        noise_correction=True,
    )
    state = random_state(5, rank, seed=11)
    first, second = torch.randn(8, 5, generator=gen), 5 * torch.randn(6, 5, generator=gen)
    out, next_state, _ = rule.step(first, state, torch.randn(5, generator=gen))
    M = transform_of(state, 1.0)
    omega = (second - state.mean).numpy() @ M.T
    clipped_sum = (omega / np.maximum(1.0, np.linalg.norm(omega, axis=1, keepdims=True))).sum(0)
    matching_noise = torch.from_numpy((M @ ((out - state.mean).numpy() * batch) - clipped_sum) / sigma)
    out2, next_state2, _ = rule.step(second, state, matching_noise)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(next_state2.mean, next_state.mean)
    np.testing.assert_allclose(covariance_of(next_state2), covariance_of(next_state), atol=1e-10)
    np.testing.assert_allclose(transform_of(next_state2, 1.0), transform_of(next_state, 1.0), atol=1e-8)


# --- the streaming low-rank variant ----------------------------------------------------------------


def test_low_rank_with_rank_d_equals_the_full_matrix():
    gen = torch.Generator().manual_seed(12)
    common = dict(
        noise_multiplier=1.2, expected_batch_size=10.0, beta1=0.5, beta2=0.7, h1=1e-4, h2=10.0, noise_correction=True
    )
    full, low = GeoClip(**common), GeoClip(**common, rank=6)
    full_state, low_state = full.init_state(6), low.init_state(6)
    for _ in range(25):
        grads = torch.randn(12, 6, generator=gen) * torch.tensor([3.0, 1.0, 0.3, 0.1, 0.1, 0.01]) + 0.5
        noise = torch.randn(6, generator=gen)
        full_out, full_state, _ = full.step(grads, full_state, noise)
        low_out, low_state, _ = low.step(grads, low_state, noise)
        torch.testing.assert_close(low_out, full_out, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(covariance_of(low_state), covariance_of(full_state), atol=1e-12)


def test_low_rank_is_exact_when_releases_span_fewer_than_k_directions():
    """Without noise and with gradients in a 2-dimensional subspace, Sigma_t = beta2^t lambda_0 I + (a matrix on
    that subspace): rank 3 holds it exactly (the subspace plus one direction of the isotropic rest)."""
    gen = torch.Generator().manual_seed(13)
    span = torch.from_numpy(ortho_group.rvs(8, random_state=13)[:, :2])
    common = dict(noise_multiplier=0.0, expected_batch_size=10.0, beta1=0.8, beta2=0.8, h1=1e-12, h2=10.0)
    full, low = GeoClip(**common), GeoClip(**common, rank=3)
    full_state, low_state = full.init_state(8), low.init_state(8)
    for _ in range(20):
        grads = (torch.randn(10, 2, generator=gen) * torch.tensor([2.0, 0.2]) + 0.3) @ span.T
        full_out, full_state, _ = full.step(grads, full_state, torch.zeros(8))
        low_out, low_state, _ = low.step(grads, low_state, torch.zeros(8))
        torch.testing.assert_close(low_out, full_out, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(covariance_of(low_state), covariance_of(full_state), atol=1e-12)


def test_low_rank_handles_a_million_parameters_without_a_dense_matrix():
    """A d x d matrix here would need 8 TB: the step must work from the d x k basis only."""
    rule = GeoClip(noise_multiplier=1.0, expected_batch_size=4.0, rank=3)
    state = rule.init_state(1_000_000, dtype=torch.float32)
    gen = torch.Generator().manual_seed(14)
    for _ in range(2):
        out, state, _stats = rule.step(
            torch.randn(3, 1_000_000, generator=gen, dtype=torch.float32),
            state,
            torch.randn(1_000_000, generator=gen, dtype=torch.float32),
        )
    assert out.shape == (1_000_000,) and state.basis.shape == (1_000_000, 3)
    gram = state.basis.double().T @ state.basis.double()  # in double: a float32 sum of 10^6 products errs ~1e-4
    torch.testing.assert_close(gram, torch.eye(3), atol=1e-4, rtol=0)


def test_full_matrix_is_refused_for_large_models_and_names_rank():
    rule = GeoClip(noise_multiplier=1.0, expected_batch_size=4.0)
    with pytest.raises(ValueError, match="rank"):
        rule.init_state(FULL_MATRIX_MAX_DIM + 1)
    assert GeoClip(noise_multiplier=1.0, expected_batch_size=4.0, rank=8).init_state(
        FULL_MATRIX_MAX_DIM + 1
    ).basis.shape == (FULL_MATRIX_MAX_DIM + 1, 8)
    assert GeoClip(noise_multiplier=1.0, expected_batch_size=4.0, rank=64).init_state(10).basis.shape == (10, 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gamma=0.0), "gamma"),
        (dict(beta2=1.0), "beta2"),
        (dict(h1=1.0, h2=0.5), "h1"),
        (dict(variance_target="batch"), "variance_target"),
        (dict(noise_correction="yes"), "noise_correction"),
        (dict(rank=0), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(initial_clip=-1.0), "initial_clip"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GeoClip(noise_multiplier=1.0, expected_batch_size=4.0, **kwargs)


def test_state_for_another_model_is_rejected():
    rule = GeoClip(noise_multiplier=1.0, expected_batch_size=4.0)
    with pytest.raises(ValueError, match="state"):
        rule.step(torch.zeros(2, 3), rule.init_state(5), torch.zeros(3))


# --- statistics (fixed seeds, tolerances from the variance) ----------------------------------------


def test_noise_corrected_estimate_is_unbiased():
    """With beta2 = 0 the next Sigma is one estimate S_t = B ((g~ - a)(g~ - a)^T - sigma^2/B^2 M^-1 M^-T); its mean
    over the noise is B m m^T for the clipped batch mean m (computed here independently)."""
    gen = torch.Generator().manual_seed(15)
    sigma, batch, draws = 1.5, 6.0, 4000
    rule = GeoClip(noise_multiplier=sigma, expected_batch_size=batch, beta2=0.0, noise_correction=True)
    state = random_state(3, None, seed=15)
    grads = torch.randn(6, 3, generator=gen) * 2
    estimates = np.stack(
        [covariance_of(rule.step(grads, state, torch.randn(3, generator=gen))[1]) / batch for _ in range(draws)]
    )
    M = transform_of(state, 1.0)
    m = released_by_hand(grads, state, 1.0, 0.0, batch, torch.zeros(3)).numpy() - state.mean.numpy()
    C = (sigma / batch) ** 2 * np.linalg.inv(M.T @ M)  # covariance of the injected noise e
    # x x^T - C - m m^T = m e^T + e m^T + e e^T - C:
    # variance m_i^2 C_jj + m_j^2 C_ii + 2 m_i m_j C_ij + C_ii C_jj + C_ij^2
    variance = (
        np.outer(m**2, np.diag(C))
        + np.outer(np.diag(C), m**2)
        + 2 * np.outer(m, m) * C
        + np.outer(np.diag(C), np.diag(C))
        + C**2
    )
    assert (np.abs(estimates.mean(0) - np.outer(m, m)) <= 5 * np.sqrt(variance / draws)).all()


def test_covariance_converges_to_the_per_example_covariance():
    """Without noise and with little clipping (gamma small), Sigma_t tends to the per-example covariance, so
    M_t tends to the optimal transform for the true covariance."""
    gen = torch.Generator().manual_seed(16)
    dim, batch = 3, 64
    basis = torch.from_numpy(ortho_group.rvs(dim, random_state=16))
    true_covariance = basis @ torch.diag(torch.tensor([1.0, 0.1, 0.01])) @ basis.T
    root = torch.linalg.cholesky(true_covariance)
    true_mean = torch.tensor([1.0, -0.5, 0.2])
    rule = GeoClip(
        noise_multiplier=0.0, expected_batch_size=batch, gamma=1 / 16, beta1=0.99, beta2=0.995, h1=1e-12, h2=100.0
    )
    state = rule.init_state(dim)
    covariances, clipped = [], []
    for t in range(5000):
        grads = true_mean + torch.randn(batch, dim, generator=gen) @ root.T
        _, state, stats = rule.step(grads, state, torch.zeros(dim))
        if t >= 1000:
            covariances.append(covariance_of(state))
            clipped.append(stats["clipped_fraction"])
    # E[B (g~ - a)(g~ - a)^T] = Sigma (1 + (1 - beta1) / (1 + beta1)): the lag of a adds 0.5 %.  The average of
    # 4000 rank-one estimates B x x^T (variance about 2 Sigma^2 each) has relative error about sqrt(2 / 4000) = 2.2 %
    # per entry; 10 % is about 4 standard errors.
    average = np.mean(covariances, axis=0)
    assert np.linalg.norm(average - true_covariance.numpy()) <= 0.1 * np.linalg.norm(true_covariance.numpy())
    torch.testing.assert_close(state.mean, true_mean, atol=0.05, rtol=0)
    assert np.mean(clipped) < 0.01


# --- end to end ------------------------------------------------------------------------------------


def test_make_private_refuses_full_matrix_for_a_large_model_up_front():
    torch.set_default_dtype(torch.float32)  # a model as users build it (the fixture restores double afterwards)
    dataset = TensorDataset(torch.randn(100, 2500), torch.zeros(100, dtype=torch.long))
    model = nn.Linear(2500, 2)  # 5002 parameters
    with pytest.raises(ValueError, match=r"5002 parameters .* rank=k"):
        make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(dataset, batch_size=10),
            method="geoclip",
            noise_multiplier=1.0,
            delta=1e-5,
            seed=0,
        )


def test_cli_trains_with_geoclip_and_reports_the_accountants_epsilon(tmp_path):
    torch.set_default_dtype(torch.float32)
    out = tmp_path / "run.json"
    code = main(
        [
            "train",
            "--dataset",
            "synthetic",
            "--method",
            "geoclip",
            "--epsilon",
            "2",
            "--epochs",
            "2",
            "--train-size",
            "400",
            "--batch-size",
            "40",
            "--param",
            "rank=4",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    record = json.loads(out.read_text())
    assert record["method"] == "geoclip" and record["method_params"]["rank"] == 4
    assert record["per_epoch"][-1]["train_loss"] < record["per_epoch"][0]["train_loss"]
    expected = epsilon(
        noise_multiplier=record["noise_multiplier"],
        sample_rate=record["sample_rate"],
        steps=record["steps"],
        delta=record["delta"],
        accountant="prv",
    )
    assert record["epsilon"] == pytest.approx(expected, rel=1e-12) and record["epsilon"] <= 2.0
