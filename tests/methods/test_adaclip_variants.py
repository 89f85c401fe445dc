"""AdaCliP's estimators against the papers' equations written out, closed forms and statistical identities.

The references below are scalar Python over coordinates, written from the equations in the docstring of
:class:`adaclip.methods.adaclip.AdaCliP` (Pichapati et al. 2019, Alg. 1; Tasnim et al. 2026, Alg. 1;
Andrew et al. 2021, Alg. 1), not from the vectorised code.
"""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import make_private
from adaclip.methods import AdaCliP, AdaCliPState, QuantileScaleState
from adaclip.methods.adaclip import ESTIMATORS, optimal_scale, variance_correction

pytestmark = pytest.mark.usefixtures("float64_by_default")

ROWS = [[3.0, 4.0], [0.3, 0.4], [0.0, 0.5]]  # norms 5, 0.5, 0.5
B = 4.0


def clipped_release(rows, a, b, sigma_z=(0.0, 0.0)):
    """``g~ = b (sum_i w_i / max(1, ||w_i||) + sigma z) / B + a``, ``w_i = (g_i - a) / b``; and the clipped count."""
    total, clipped = [0.0, 0.0], 0
    for row in rows:
        w = [(g - aj) / bj for g, aj, bj in zip(row, a, b, strict=True)]
        norm = math.sqrt(sum(x * x for x in w))
        factor = min(1.0, 1.0 / norm)
        clipped += factor < 1
        total = [t + factor * x for t, x in zip(total, w, strict=True)]
    return [bj * (t + s) / B + aj for bj, t, s, aj in zip(b, total, sigma_z, a, strict=True)], clipped


def optimal(std):
    """``b_j = sqrt(s_j) sqrt(sum_k s_k)`` (Thm. 2)."""
    total = sum(std)
    return [math.sqrt(s) * math.sqrt(total) for s in std]


def run_steps(rule, steps, noise_rows=None):
    state = rule.init_state(2)
    history = []
    for t in range(steps):
        noise = torch.zeros(rule.noise_size(2)) if noise_rows is None else torch.tensor(noise_rows[t])
        released, state, stats = rule.step(torch.tensor(ROWS), state, noise)
        history.append((released, state, stats))
    return history


# --- "paper" and "per_example": two steps by hand ----------------------------------------------------------


@pytest.mark.parametrize("estimator, factor", [("paper", 1.0), ("per_example", B)])
def test_paper_and_per_example_two_steps_by_hand(estimator, factor):
    sigma, beta1, beta2, h1, h2 = 1.0, 0.5, 0.5, 1e-12, 10.0
    rule = AdaCliP(
        noise_multiplier=sigma,
        expected_batch_size=B,
        initial_clip=1.0,
        beta1=beta1,
        beta2=beta2,
        h1=h1,
        h2=h2,
        estimator=estimator,
    )
    history = run_steps(rule, 2)
    a, b, v = [0.0, 0.0], [1.0, 1.0], [0.5, 0.5]  # v_0 = (C0 / sqrt(d))^2 gives b_0 = C0 = 1
    for released, state, _ in history:
        g, _ = clipped_release(ROWS, a, b)
        r = [factor * ((gj - aj) ** 2 - bj**2 * sigma**2 / B**2) for gj, aj, bj in zip(g, a, b, strict=True)]
        v = [beta2 * vj + (1 - beta2) * min(max(rj, h1), h2) for vj, rj in zip(v, r, strict=True)]
        a = [beta1 * aj + (1 - beta1) * gj for aj, gj in zip(a, g, strict=True)]
        b = optimal([math.sqrt(vj) for vj in v])
        torch.testing.assert_close(released, torch.tensor(g))
        torch.testing.assert_close(state.mean, torch.tensor(a))
        torch.testing.assert_close(state.variance, torch.tensor(v))
        torch.testing.assert_close(state.scale, torch.tensor(b))
    # the first step's numbers: g~ = (0.6 + 0.3, 0.8 + 0.4 + 0.5) / 4, r_0 = factor (g~^2 - 1/16), clamped at h1
    first = history[0]
    torch.testing.assert_close(first[0], torch.tensor([0.225, 0.425]))
    torch.testing.assert_close(first[1].variance, torch.tensor([0.25 + 0.5 * h1, 0.25 + 0.5 * factor * 0.118125]))


# --- "bias_free": DP-MacAdam's estimator ---------------------------------------------------------------------


def test_bias_free_two_steps_by_hand():
    """DP-MacAdam's equations (Tasnim et al. 2026, Alg. 1) with u_t = (g~ - m^_t-1)(g~ - m^_t), written out."""
    sigma, beta1, h1, h2 = 1.0, 0.5, 1e-12, 10.0
    noise = [[0.3, -0.2], [1.1, 0.4], [-0.7, 0.9]]
    rule = AdaCliP(
        noise_multiplier=sigma,
        expected_batch_size=B,
        initial_clip=1.0,
        beta1=beta1,
        h1=h1,
        h2=h2,
        estimator="bias_free",
    )
    history = run_steps(rule, 3, noise)
    m, s, b = [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]
    for t, ((released, state, _), z) in enumerate(zip(history, noise, strict=True), start=1):
        g, _ = clipped_release(ROWS, m, b, [sigma * zj for zj in z])
        previous = m
        m = [mj + (1 - beta1) / (1 - beta1**t) * (gj - mj) for mj, gj in zip(m, g, strict=True)]
        u = [(gj - pj) * (gj - mj) for gj, pj, mj in zip(g, previous, m, strict=True)]
        s = [beta1 * sj + (1 - beta1) * uj for sj, uj in zip(s, u, strict=True)]
        kappa = 2 * (beta1 - beta1**t) / (1 + beta1)
        if t > 1:  # s_1 = kappa_1 = 0: b stays b_0
            estimate = [min(max(sj / kappa - bj**2 * sigma**2 / B**2, h1), h2) for sj, bj in zip(s, b, strict=True)]
            b = optimal([math.sqrt(e) for e in estimate])
        torch.testing.assert_close(released, torch.tensor(g))
        torch.testing.assert_close(state.mean, torch.tensor(m))
        torch.testing.assert_close(state.variance, torch.tensor(s))
        torch.testing.assert_close(state.scale, torch.tensor(b))
        assert state.steps == t
    # t = 1: m^_1 = g~_1 and s_1 = 0 exactly
    assert history[0][1].variance.abs().max() == 0.0
    torch.testing.assert_close(history[0][1].mean, history[0][0])
    assert [variance_correction(0.5, t) for t in (1, 2, 3)] == pytest.approx([0.0, 1 / 3, 0.5])


@pytest.mark.parametrize("beta1", [0.5, 0.9])
def test_bias_free_average_is_exactly_kappa_t_times_the_variance(beta1):
    """``E[s_t] = kappa_t Var(g~)`` for releases with a common mean and variance, at every ``t`` (start-up included).

    Each of 200,000 coordinates is an independent chain of releases ``N(mu, V)`` fed to the rule's own state
    update; the relative standard error of the mean of ``s_t`` is below 0.5 %, the tolerance is 2.5 %.
    """
    chains, mu, variance = 200_000, 3.0, 2.0
    rule = AdaCliP(noise_multiplier=1.0, expected_batch_size=B, beta1=beta1, estimator="bias_free", h2=1e6)
    state = rule.init_state(chains)
    generator = torch.Generator().manual_seed(0)
    for t in range(1, 13):
        released = mu + math.sqrt(variance) * torch.randn(chains, generator=generator)
        state = rule.next_state(released, state)
        if t > 1:
            assert float(state.variance.mean()) == pytest.approx(variance_correction(beta1, t) * variance, rel=0.025)
    # the transcription's u_t = (g~ - m^_t)^2 would give beta1 V at stationarity, not V: the test tells them apart
    assert abs(beta1 - 1) > 0.025


def test_bias_free_shrinks_the_scale_without_noise_as_the_argument_says():
    """Clipped contributions carry at most what ``b`` allows: with every example clipped the estimate shrinks ``b``."""
    rule = AdaCliP(noise_multiplier=0.0, expected_batch_size=B, beta1=0.5, estimator="bias_free")
    generator = torch.Generator().manual_seed(1)
    state = rule.init_state(2)
    for _ in range(30):
        grads = 100 * torch.randn(4, 2, generator=generator)
        _, state, stats = rule.step(grads, state, torch.zeros(2))
    assert stats["clipped_fraction"] == 1.0
    assert float(state.scale.max()) < 0.5  # from b_0 = 1, although the gradients' spread is about 100


# --- "quantile_scale" ----------------------------------------------------------------------------------------


def test_quantile_scale_two_steps_by_hand():
    """Shape from the per-example estimate, normalised to RMS 1; scale C_t from the noisy unclipped count."""
    sigma, sigma_b, beta1, beta2, h1, h2, target, eta = 1.0, 2.0, 0.5, 0.5, 1e-12, 10.0, 0.5, 0.2
    sigma_g = (sigma**-2 - (2 * sigma_b) ** -2) ** -0.5
    noise = [[0.5, -1.0, 0.8], [0.2, 0.3, -1.5]]
    rule = AdaCliP(
        noise_multiplier=sigma,
        expected_batch_size=B,
        initial_clip=0.8,
        beta1=beta1,
        beta2=beta2,
        h1=h1,
        h2=h2,
        estimator="quantile_scale",
        target_quantile=target,
        clip_lr=eta,
        count_noise_std=sigma_b,
    )
    assert rule.noise_size(2) == 3 and rule.grad_noise_multiplier == pytest.approx(sigma_g)
    history = run_steps(rule, 2, noise)
    a, v, clip = [0.0, 0.0], [0.32, 0.32], 0.8  # v_0 = (C0 / sqrt(2))^2
    b = [clip, clip]
    for (released, state, stats), z in zip(history, noise, strict=True):
        g, n_clipped = clipped_release(ROWS, a, b, [sigma_g * z[0], sigma_g * z[1]])
        unclipped = (3 - n_clipped - 3 / 2 + sigma_b * z[2]) / B + 0.5
        assert stats["unclipped_estimate"] == pytest.approx(unclipped) and stats["clip_norm"] == pytest.approx(clip)
        r = [B * ((gj - aj) ** 2 - bj**2 * sigma_g**2 / B**2) for gj, aj, bj in zip(g, a, b, strict=True)]
        v = [beta2 * vj + (1 - beta2) * min(max(rj, h1), h2) for vj, rj in zip(v, r, strict=True)]
        a = [beta1 * aj + (1 - beta1) * gj for aj, gj in zip(a, g, strict=True)]
        shape = optimal([math.sqrt(vj) for vj in v])
        rms = math.sqrt(sum(x * x for x in shape) / 2)
        clip = clip * math.exp(-eta * (unclipped - target))
        b = [clip * x / rms for x in shape]
        torch.testing.assert_close(released, torch.tensor(g))
        assert isinstance(state, QuantileScaleState) and state.clip_norm == pytest.approx(clip)
        torch.testing.assert_close(state.scale, torch.tensor(b))
        torch.testing.assert_close(state.variance, torch.tensor(v))
    # the first step clips the norm-5 row only (b_0 = 0.8): centred bits -1/2, +1/2, +1/2, plus 2 * 0.8
    assert history[0][2]["unclipped_estimate"] == pytest.approx((0.5 + 1.6) / 4 + 0.5)


def test_quantile_scale_noise_power_is_dp_sgds_at_its_clip_norm():
    """A unit-RMS shape gives ``sum_j b_j^2 = d C^2``: DP-SGD's noise power at clip ``C``, with the gradient's sigma."""
    rule = AdaCliP(noise_multiplier=1.0, expected_batch_size=8, estimator="quantile_scale", count_noise_std=2.0)
    state = QuantileScaleState(
        mean=torch.zeros(3),
        variance=torch.tensor([4.0, 1.0, 0.01]),
        scale=torch.full((3,), 0.7),
        clip_norm=0.7,
    )
    state = rule.next_state(torch.tensor([0.1, -0.2, 0.3]), state, unclipped_fraction=0.5)
    assert float(state.scale.square().sum()) == pytest.approx(3 * state.clip_norm**2)
    stats = rule.step(torch.zeros(0, 3), state, torch.zeros(4))[2]
    assert stats["noise_power"] == pytest.approx(3 * (rule.grad_noise_multiplier * state.clip_norm / 8) ** 2)


def test_quantile_scale_splits_sigma_like_the_quantile_rule_and_refuses_an_infeasible_split():
    rule = AdaCliP(noise_multiplier=1.0, expected_batch_size=100, estimator="quantile_scale", count_noise_std=1.0)
    # two Gaussian mechanisms compose like one with sigma^-2 = sigma_g^-2 + (2 sigma_b)^-2 (Andrew et al. 2021, Thm. 1)
    assert rule.grad_noise_multiplier**-2 + (2 * 1.0) ** -2 == pytest.approx(1.0)
    assert AdaCliP(noise_multiplier=1.0, expected_batch_size=100, estimator="quantile_scale").count_noise_std == 5.0
    assert AdaCliP(noise_multiplier=2.0, expected_batch_size=20, estimator="quantile_scale").count_noise_std == 2.0
    with pytest.raises(ValueError, match=r"count_noise_std above 0\.5"):
        AdaCliP(noise_multiplier=1.0, expected_batch_size=100, estimator="quantile_scale", count_noise_std=0.4)


def test_quantile_scale_count_has_sensitivity_one_half():
    rule = AdaCliP(noise_multiplier=1.0, expected_batch_size=10, estimator="quantile_scale", count_noise_std=1.0)
    state = rule.init_state(1)
    grads = torch.tensor([[0.5], [2.0], [0.1]])
    full = rule.step(grads, state, torch.zeros(2))[2]["unclipped_estimate"]
    for k in range(3):
        less = rule.step(torch.cat([grads[:k], grads[k + 1 :]]), state, torch.zeros(2))[2]["unclipped_estimate"]
        assert abs(full - less) * 10 == pytest.approx(0.5)


# --- every estimator ----------------------------------------------------------------------------------------


def rule_for(estimator, sigma=1.5, batch=8.0, **params):
    extra = {"count_noise_std": 4.0} if estimator == "quantile_scale" else {}
    return AdaCliP(noise_multiplier=sigma, expected_batch_size=batch, estimator=estimator, **extra, **params)


def adapted_state(rule, dim, generator):
    state = rule.init_state(dim)
    for _ in range(5):
        grads = torch.randn(8, dim, generator=generator) * torch.logspace(0, -2, dim)
        state = rule.step(grads, state, torch.randn(rule.noise_size(dim), generator=generator))[1]
    return state


def centred_bits(counts):
    """``sum_i (1[unclipped] - 1/2) = n - n_clipped - n / 2``."""
    return float(counts[0] - counts[1] - counts[0] / 2)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_next_state_depends_only_on_the_released_values(estimator):
    """Two different batches whose noisy releases coincide lead to the same next state (and the same release)."""
    generator = torch.Generator().manual_seed(6)
    rule, dim = rule_for(estimator), 5
    state = adapted_state(rule, dim, generator)
    first, second = torch.randn(8, dim, generator=generator), 5 * torch.randn(6, dim, generator=generator)
    noise = torch.randn(rule.noise_size(dim), generator=generator)
    out, next_state, _ = rule.step(first, state, noise)
    # the noise that makes the second batch release exactly the same vector (and the same noisy count)
    other = rule.clipped_sum(second, state)
    matching = noise.clone()
    matching[:dim] = ((out - state.mean) * rule.expected_batch_size - other.vector) / (
        rule.grad_noise_multiplier * state.scale
    )
    if estimator == "quantile_scale":
        mine = rule.clipped_sum(first, state).counts
        matching[dim] = noise[dim] + (centred_bits(mine) - centred_bits(other.counts)) / rule.count_noise_std
    out2, next_state2, _ = rule.step(second, state, matching)
    torch.testing.assert_close(out2, out)
    for name in ("mean", "variance", "scale"):
        torch.testing.assert_close(getattr(next_state2, name), getattr(next_state, name))
    assert getattr(next_state2, "clip_norm", None) == pytest.approx(getattr(next_state, "clip_norm", None))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_removing_one_example_moves_the_transformed_sum_by_at_most_one(estimator):
    """The sensitivity the accountant assumes: ``||sum w_i - sum_(i != k) w_i|| <= 1`` in ``w = (g - a) / b`` space."""
    generator = torch.Generator().manual_seed(2)
    rule, dim = rule_for(estimator, batch=16.0), 6
    state = adapted_state(rule, dim, generator)
    worst = 0.0
    for trial in range(100):
        grads = torch.randn(16, dim, generator=generator) * 10 ** (4 * torch.rand(1, generator=generator).item() - 2)
        k = trial % 16
        with_k = rule.clipped_sum(grads, state).vector / state.scale
        without_k = rule.clipped_sum(torch.cat([grads[:k], grads[k + 1 :]]), state).vector / state.scale
        worst = max(worst, float(torch.linalg.vector_norm(with_k - without_k)))
    assert 0.9 < worst <= 1 + 1e-9  # attained by large gradients: the check is not vacuous


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_empty_batch_releases_the_shift_plus_noise(estimator):
    rule = rule_for(estimator, sigma=2.0)
    generator = torch.Generator().manual_seed(3)
    state = adapted_state(rule, 3, generator)
    noise = torch.randn(rule.noise_size(3), generator=generator)
    out, _, stats = rule.step(torch.zeros(0, 3), state, noise)
    torch.testing.assert_close(out, state.mean + rule.grad_noise_multiplier * state.scale * noise[:3] / 8)
    assert stats["clipped_fraction"] == 0.0 and stats["batch_size"] == 0.0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_runs_on_the_fast_path_and_matches_the_materialised_one(estimator):
    results = {}
    for path in ("fast", "materialise"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        features, labels = torch.randn(64, 6), torch.randint(0, 3, (64,))
        extra = {"count_noise_std": 4.0} if estimator == "quantile_scale" else {}
        module, optimizer, loader = make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(features, labels), batch_size=16),
            method="adaclip",
            noise_multiplier=1.0,
            delta=1e-5,
            seed=3,
            per_example=path,
            estimator=estimator,
            **extra,
        )
        assert optimizer.uses_norm_path is (path == "fast")
        for inputs, targets in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(inputs), targets).backward()
            optimizer.step()
        results[path] = (torch.cat([p.detach().flatten() for p in model.parameters()]), optimizer.rule_state)
    torch.testing.assert_close(results["fast"][0], results["materialise"][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results["fast"][1].scale, results["materialise"][1].scale, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"estimator": "bias_free", "beta2": 0.5}, r"beta2 has no effect with estimator='bias_free'"),
        ({"estimator": "quantile_scale", "kappa": 2.0}, r"kappa has no effect with estimator='quantile_scale'"),
        ({"estimator": "per_example", "target_quantile": 0.9}, "target_quantile has no effect"),
        ({"estimator": "paper", "count_noise_std": 3.0}, "count_noise_std has no effect"),
        ({"estimator": "bias_free", "beta1": 0.0}, "beta1 must be > 0"),
        ({"estimator": "quantile_scale", "clip_lr": -1.0}, "clip_lr"),
        ({"estimator": "batch_mean"}, "estimator must be one of"),
    ],
)
def test_parameters_an_estimator_does_not_use_are_refused(params, match):
    with pytest.raises(ValueError, match=match):
        AdaCliP(noise_multiplier=1.0, expected_batch_size=8, **params)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_unused_parameters_report_none_and_round_trip(estimator):
    rule = rule_for(estimator)
    hyper = rule.hyperparameters()
    assert hyper["estimator"] == estimator
    assert (hyper["beta2"] is None) is (estimator == "bias_free")
    assert (hyper["kappa"] is None) is (estimator == "quantile_scale")
    assert (hyper["target_quantile"] is None) is (estimator != "quantile_scale")
    assert AdaCliP(noise_multiplier=1.5, expected_batch_size=8.0, **hyper).hyperparameters() == hyper


def test_quantile_scale_state_needs_its_count():
    rule = rule_for("quantile_scale")
    with pytest.raises(ValueError, match="noisy unclipped fraction"):
        rule.next_state(torch.zeros(2), rule.init_state(2))
    with pytest.raises(ValueError, match="its own state"):
        rule.next_state(torch.zeros(2), AdaCliPState(torch.zeros(2), torch.ones(2), torch.ones(2)), 0.5)


def test_optimal_scale_of_a_uniform_variance_is_the_initial_clip():
    """``init_state`` picks ``v_0`` so that ``b_0 = C0``: the first step is DP-SGD with clip ``C0``."""
    for estimator in ("paper", "per_example", "quantile_scale"):
        rule = rule_for(estimator, initial_clip=0.3)
        state = rule.init_state(7)
        torch.testing.assert_close(optimal_scale(state.variance.sqrt(), rule._kappa), torch.full((7,), 0.3))
