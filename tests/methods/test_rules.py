"""The clipping rules against closed forms, hand computations and statistical identities."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from adaclip.methods import (
    METHODS,
    AdaCliP,
    AdaCliPState,
    AutoClip,
    ClippedSum,
    FixedClip,
    QuantileClip,
    QuantileClipState,
    build_rule,
    clip_factors,
    method_parameters,
)
from adaclip.methods.adaclip import optimal_scale

pytestmark = pytest.mark.usefixtures("float64_by_default")


def clip_rows(rows: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference clipping, written out (Abadi et al. 2016, Alg. 1): each row times ``min(1, bound / ||row||)``."""
    norms = torch.linalg.vector_norm(rows, dim=1)
    factors = torch.where(norms > bound, bound / norms.clamp_min(1e-300), torch.ones_like(norms))
    return rows * factors.unsqueeze(1), norms


def noise_corrected_second_moment(released, mean, scale, sigma, batch):
    """AdaCliP's ``r_t = (g~ - a_t)^2 - b_t^2 sigma^2 / B^2`` (Pichapati et al. 2019, Alg. 1)."""
    return (released - mean) ** 2 - (scale * sigma / batch) ** 2


# A heterogeneous example: per-coordinate standard deviations spread over two decades, zero mean.
STD = torch.tensor([1.0, 0.25, 0.04, 0.01], dtype=torch.float64)


def make_rules(sigma: float = 1.0, batch: float = 4.0) -> dict:
    return {
        "fixed": FixedClip(clip_norm=1.0, noise_multiplier=sigma, expected_batch_size=batch),
        "adaclip": AdaCliP(
            estimator="per_example", noise_multiplier=sigma, expected_batch_size=batch, initial_clip=1.0
        ),
        "quantile": QuantileClip(
            noise_multiplier=sigma, expected_batch_size=batch, initial_clip=1.0, count_noise_std=batch
        ),
        "auto": AutoClip(noise_multiplier=sigma, expected_batch_size=batch),
    }


# --- the optimal transform (Pichapati et al. 2019, Thm. 2) -------------------------------------


def test_optimal_scale_matches_closed_form_example():
    b = optimal_scale(STD)
    torch.testing.assert_close(b, torch.tensor([1.14018, 0.57009, 0.22804, 0.11402]), atol=1e-5, rtol=0)
    assert b.square().sum().item() == pytest.approx(1.69, abs=1e-12)
    # the constraint sum s^2 / b^2 <= 1 is tight at the optimum
    assert (STD.square() / b.square()).sum().item() == pytest.approx(1.0, abs=1e-12)
    # DP-SGD's noise power for the same per-example second moment: d * sum(s^2 + mu^2)
    assert len(STD) * STD.square().sum().item() == pytest.approx(4.2568, abs=1e-12)


def test_optimal_scale_agrees_with_numerical_minimisation():
    s = STD.numpy()
    result = minimize(
        lambda b: np.sum(b**2),
        x0=np.ones(4),
        constraints=[{"type": "ineq", "fun": lambda b: 1 - np.sum(s**2 / b**2)}],
        bounds=[(1e-6, None)] * 4,
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert result.success
    assert result.fun == pytest.approx(1.69, rel=1e-6)
    np.testing.assert_allclose(result.x, optimal_scale(STD).numpy(), rtol=1e-3)


def test_shifting_by_the_mean_removes_the_mean_term():
    mean = torch.tensor([2.0, -1.0, 0.5, 0.0])
    # with shift a, the per-coordinate second moment is s^2 + (mu - a)^2: optimal noise (sum_j sqrt(.))^2
    noise_at_zero_shift = optimal_scale((STD.square() + mean.square()).sqrt()).square().sum().item()
    noise_at_mean_shift = optimal_scale((STD.square() + (mean - mean).square()).sqrt()).square().sum().item()
    assert noise_at_mean_shift == pytest.approx(STD.sum().item() ** 2)
    assert noise_at_zero_shift == pytest.approx(torch.sqrt(STD.square() + mean.square()).sum().item() ** 2)
    assert noise_at_zero_shift > 4 * noise_at_mean_shift


# --- exact, hand-computed steps with zero noise -----------------------------------------------

ROWS = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.5]], dtype=torch.float64)  # norms 5, 0.5, 0.5


def test_fixed_clip_by_hand():
    rule = FixedClip(clip_norm=1.0, noise_multiplier=2.0, expected_batch_size=4)
    out, state, stats = rule.step(ROWS, None, torch.zeros(2))
    torch.testing.assert_close(out, torch.tensor([0.6 + 0.3 + 0.0, 0.8 + 0.4 + 0.5]) / 4)
    assert state is None
    assert stats["clipped_fraction"] == pytest.approx(1 / 3)
    assert stats["clip_norm"] == 1.0
    assert stats["noise_power"] == pytest.approx(2 * (2.0 * 1.0 / 4) ** 2)


def test_auto_clip_by_hand():
    rule = AutoClip(noise_multiplier=1.0, expected_batch_size=4, r=0.01)
    out, _, stats = rule.step(ROWS, None, torch.zeros(2))
    expected = (torch.tensor([3.0, 4.0]) / 5.01 + torch.tensor([0.3, 0.4]) / 0.51 + torch.tensor([0.0, 0.5]) / 0.51) / 4
    torch.testing.assert_close(out, expected)
    assert stats["clipped_fraction"] == pytest.approx(1 / 3)
    assert stats["noise_power"] == pytest.approx(2 / 16)


def test_quantile_clip_by_hand():
    rule = QuantileClip(
        noise_multiplier=1.0,
        expected_batch_size=4,
        initial_clip=1.0,
        target_quantile=0.5,
        clip_lr=0.2,
        count_noise_std=1.0,
    )
    state = rule.init_state(2)
    out, new_state, stats = rule.step(ROWS, state, torch.zeros(3))
    torch.testing.assert_close(out, torch.tensor([0.9, 1.7]) / 4)
    # centred bits -1/2, +1/2, +1/2: sum 1/2, so b~ = 0.5/4 + 0.5 = 0.625
    assert stats["unclipped_estimate"] == pytest.approx(0.625)
    assert new_state.clip_norm == pytest.approx(math.exp(-0.2 * (0.625 - 0.5)))
    assert stats["clip_norm"] == 1.0


def test_quantile_count_noise_uses_the_last_draw():
    rule = QuantileClip(noise_multiplier=1.0, expected_batch_size=4, count_noise_std=2.0)
    noise = torch.tensor([0.0, 0.0, 1.5])
    out, _, stats = rule.step(ROWS, rule.init_state(2), noise)
    clipped_sum = clip_rows(ROWS, 0.1)[0].sum(0)
    torch.testing.assert_close(out, clipped_sum / 4)  # gradient noise untouched
    assert stats["unclipped_estimate"] == pytest.approx((-1.5 + 2.0 * 1.5) / 4 + 0.5)


def test_adaclip_by_hand():
    sigma, batch, beta1, beta2 = 1.0, 4.0, 0.5, 0.5
    rule = AdaCliP(
        estimator="per_example",
        noise_multiplier=sigma,
        expected_batch_size=batch,
        initial_clip=1.0,
        beta1=beta1,
        beta2=beta2,
        h1=1e-12,
        h2=10.0,
    )
    state = rule.init_state(2)
    out, new_state, stats = rule.step(ROWS, state, torch.zeros(2))
    released = [0.9 / 4, 1.7 / 4]  # a = 0, b = 1: DP-SGD with C = 1
    torch.testing.assert_close(out, torch.tensor(released))
    v0 = 1.0 / 2  # b_0 = 1 = sqrt(s) sqrt(2 s)  =>  s = 1/sqrt(2), v0 = s^2
    r = [max(batch * (g**2 - (sigma / batch) ** 2), 1e-12) for g in released]
    v1 = [beta2 * v0 + (1 - beta2) * r_j for r_j in r]
    sd = [math.sqrt(v) for v in v1]
    b1 = [math.sqrt(s) * math.sqrt(sum(sd)) for s in sd]
    torch.testing.assert_close(new_state.mean, (1 - beta1) * torch.tensor(released))
    torch.testing.assert_close(new_state.variance, torch.tensor(v1))
    torch.testing.assert_close(new_state.scale, torch.tensor(b1))
    assert stats["clipped_fraction"] == pytest.approx(1 / 3)
    assert stats["noise_power"] == pytest.approx(2 * (sigma / batch) ** 2)


def test_adaclip_paper_and_per_example_estimators_by_hand():
    """``"paper"`` averages the batch-mean variance ``r``, ``"per_example"`` ``B r``; both clamp before averaging."""
    common = dict(noise_multiplier=0.0, expected_batch_size=4, beta2=0.5, h1=1e-12, h2=0.01)
    state = AdaCliP(**common, estimator="per_example").init_state(2)
    released = torch.tensor([0.9, 1.7]) / 4
    r_batch = released.square()
    per_example = AdaCliP(**common, estimator="per_example").step(ROWS, state, torch.zeros(2))[1].variance
    paper = AdaCliP(**common, estimator="paper").step(ROWS, state, torch.zeros(2))[1].variance
    torch.testing.assert_close(per_example, 0.5 * state.variance + 0.5 * (4 * r_batch).clamp(max=0.01))
    torch.testing.assert_close(paper, 0.5 * state.variance + 0.5 * r_batch.clamp(max=0.01))


@pytest.mark.parametrize("name", ["fixed", "adaclip", "quantile", "auto"])
def test_empty_batch_returns_noise_only(name):
    rule = make_rules(sigma=2.0, batch=8)[name]
    dim = 3
    state = rule.init_state(dim)
    noise = torch.randn(rule.noise_size(dim), generator=torch.Generator().manual_seed(1))
    out, _, stats = rule.step(torch.zeros(0, dim), state, noise)
    scale = rule.grad_noise_multiplier if name == "quantile" else 2.0  # sigma times a unit bound
    torch.testing.assert_close(out, scale * noise[:dim] / 8)
    assert stats["clipped_fraction"] == 0.0
    assert stats["batch_size"] == 0.0


# --- identities -------------------------------------------------------------------------------


def test_adaclip_with_zero_shift_and_constant_scale_equals_fixed_clip():
    gen = torch.Generator().manual_seed(0)
    grads = 3 * torch.randn(32, 10, generator=gen)
    noise = torch.randn(10, generator=gen)
    clip, sigma, batch = 2.5, 1.3, 30.0
    adaclip = AdaCliP(estimator="per_example", noise_multiplier=sigma, expected_batch_size=batch, initial_clip=clip)
    fixed = FixedClip(clip_norm=clip, noise_multiplier=sigma, expected_batch_size=batch)
    held = AdaCliPState(mean=torch.zeros(10), variance=torch.rand(10, generator=gen), scale=torch.full((10,), clip))
    torch.testing.assert_close(adaclip.step(grads, held, noise)[0], fixed.step(grads, None, noise)[0])
    # and its initial state gives the same first step
    torch.testing.assert_close(adaclip.step(grads, adaclip.init_state(10), noise)[0], fixed.step(grads, None, noise)[0])
    torch.testing.assert_close(adaclip.init_state(10).scale, torch.full((10,), clip))


def test_clip_factors_bound_every_norm_and_leave_short_rows_alone():
    """The library's clipping against ``min(1, C / ||g||)``.

    Both ``clip_factors`` and FixedClip's clipped sum, row by row.
    """
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(200, 7, generator=gen) * torch.logspace(-3, 2, 200).unsqueeze(1)
    rows[0] = 0.0
    norms = torch.linalg.vector_norm(rows, dim=1)
    for bound in (0.01, 1.0, 30.0):
        clipped = rows * clip_factors(norms, bound).unsqueeze(1)
        assert (torch.linalg.vector_norm(clipped, dim=1) <= bound * (1 + 1e-12)).all()
        small = norms <= bound
        torch.testing.assert_close(clipped[small], rows[small])  # short rows untouched
        torch.testing.assert_close(clipped, clip_rows(rows, bound)[0])
        rule = FixedClip(clip_norm=bound, noise_multiplier=1.0, expected_batch_size=4.0)
        one_by_one = torch.stack([rule.clipped_sum(row[None], None).vector for row in rows])
        torch.testing.assert_close(one_by_one, clip_rows(rows, bound)[0])
        assert rule.clipped_sum(rows, None).counts.tolist() == [200.0, float((norms > bound).sum()), 0.0]
    assert torch.equal(clipped[0], torch.zeros(7))


def test_counts_stay_exact_with_bfloat16_parameters():
    """Counts are float64 whatever the parameters' dtype: in bfloat16 257 would round to 256, and the
    quantile rule's count would then move by 0 or 1 per added example instead of 1/2."""
    weights = torch.ones(257, dtype=torch.bfloat16)
    clipped = ClippedSum.of(torch.zeros(3, dtype=torch.bfloat16), weights)
    assert clipped.counts.dtype == torch.float64 and clipped.counts.tolist() == [257.0, 0.0, 0.0]
    rule = QuantileClip(noise_multiplier=1.0, expected_batch_size=256.0, initial_clip=1.0)
    stats = rule.release(clipped, rule.init_state(3), torch.zeros(4, dtype=torch.bfloat16))[2]
    assert stats["unclipped_estimate"] == 128.5 / 256 + 0.5  # sum of centred bits 257 - 257 / 2, no noise


def _sum_in_clip_space(name, rule, grads, state):
    """The pre-noise sum of clipped vectors (zero noise) and that sum's sensitivity bound."""
    out, _, _stats = rule.step(grads, state, torch.zeros(rule.noise_size(grads.shape[1])))
    batch = rule.expected_batch_size
    if name == "adaclip":
        return (out - state.mean) / state.scale * batch, 1.0
    if name == "quantile":
        return out * batch, state.clip_norm
    if name == "fixed":
        return out * batch, rule.clip_norm
    return out * batch, 1.0


@pytest.mark.parametrize("name", ["fixed", "adaclip", "quantile", "auto"])
def test_removing_one_example_moves_the_sum_by_at_most_the_sensitivity(name):
    gen = torch.Generator().manual_seed(2)
    rule = make_rules(batch=16)[name]
    dim = 6
    state = rule.init_state(dim)
    if name == "adaclip":  # an arbitrary adapted state, not just the initial one
        state = AdaCliPState(
            mean=torch.randn(dim, generator=gen), variance=torch.ones(dim), scale=torch.rand(dim, generator=gen) + 0.1
        )
    worst = 0.0
    for trial in range(200):
        grads = torch.randn(16, dim, generator=gen) * 10 ** (4 * torch.rand(1, generator=gen).item() - 2)
        k = trial % 16
        with_k, bound = _sum_in_clip_space(name, rule, grads, state)
        without_k, _ = _sum_in_clip_space(name, rule, torch.cat([grads[:k], grads[k + 1 :]]), state)
        worst = max(worst, torch.linalg.vector_norm(with_k - without_k).item() / bound)
    assert worst <= 1 + 1e-9
    assert worst > 0.9  # the bound is attained by large gradients: the check is not vacuous


def test_quantile_count_sensitivity_is_one_half():
    rule = QuantileClip(noise_multiplier=1.0, expected_batch_size=10, count_noise_std=1.0)
    state = QuantileClipState(clip_norm=1.0)
    grads = torch.tensor([[0.5], [2.0], [0.1]])
    full = rule.step(grads, state, torch.zeros(2))[2]["unclipped_estimate"]
    for k in range(3):
        less = rule.step(torch.cat([grads[:k], grads[k + 1 :]]), state, torch.zeros(2))[2]["unclipped_estimate"]
        assert abs(full - less) * 10 == pytest.approx(0.5)


# --- statistical checks (fixed seeds, tolerances from the variance) ----------------------------


def test_noise_variance_subtraction_is_unbiased():
    gen = torch.Generator().manual_seed(3)
    batch, dim, sigma, draws = 16, 5, 1.7, 20000
    grads = torch.randn(batch, dim, generator=gen) * torch.tensor([3.0, 1.0, 0.3, 0.1, 0.01])
    mean = 0.2 * torch.randn(dim, generator=gen)
    scale = torch.rand(dim, generator=gen) + 0.2
    state = AdaCliPState(mean=mean, variance=torch.ones(dim), scale=scale)
    rule = AdaCliP(estimator="per_example", noise_multiplier=sigma, expected_batch_size=batch)
    noise = torch.randn(draws, dim, generator=gen)
    estimates = torch.stack(
        [noise_corrected_second_moment(rule.step(grads, state, z)[0], mean, scale, sigma, batch) for z in noise]
    )
    # independent computation of the clipped batch mean, centred at a, in gradient space
    whitened = (grads - mean) / scale
    clipped = whitened * torch.clamp(1 / whitened.norm(dim=1, keepdim=True), max=1.0)
    clipped_mean = scale * clipped.sum(0) / batch
    truth = clipped_mean.square()
    # Var[(m + c z)^2] = 4 m^2 c^2 + 2 c^4 with c = b sigma / B
    c = scale * sigma / batch
    tolerance = 5 * torch.sqrt((4 * truth * c**2 + 2 * c**4) / draws)
    assert ((estimates.mean(0) - truth).abs() <= tolerance).all()


def test_adaclip_scale_converges_to_the_optimal_transform():
    """Without noise and with little clipping, b / kappa tends to sqrt(s) sqrt(sum s) of the per-example std."""
    gen = torch.Generator().manual_seed(4)
    batch, kappa = 64, 4.0
    true_mean = torch.tensor([1.0, -0.5, 0.2, 0.0])
    rule = AdaCliP(
        estimator="per_example",
        noise_multiplier=0.0,
        expected_batch_size=batch,
        kappa=kappa,
        beta1=0.9,
        beta2=0.995,
        h1=1e-12,
        h2=100.0,
    )
    state = rule.init_state(4)
    scales = []
    for t in range(3000):
        grads = true_mean + STD * torch.randn(batch, 4, generator=gen)
        _, state, stats = rule.step(grads, state, torch.zeros(4))
        if t >= 2000:
            scales.append(state.scale)
    torch.testing.assert_close(state.mean, true_mean, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.stack(scales).mean(0) / kappa, optimal_scale(STD), rtol=0.1, atol=0)
    assert stats["clipped_fraction"] < 0.01


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_quantile_clip_tracks_the_target_quantile(quantile):
    gen = torch.Generator().manual_seed(5)
    batch = 200
    rule = QuantileClip(noise_multiplier=1.0, expected_batch_size=batch, initial_clip=0.1, target_quantile=quantile)
    state = rule.init_state(1)
    history = []
    for t in range(1500):
        norms = torch.empty(batch, 1).exponential_(1.0, generator=gen)  # Exp(1): quantile q is -ln(1 - q)
        _, state, _ = rule.step(norms, state, torch.randn(2, generator=gen))
        if t >= 1000:
            history.append(state.clip_norm)
    assert np.mean(history) == pytest.approx(-math.log(1 - quantile), rel=0.05)


# --- the quantile rule's noise split and input validation -------------------------------------


def test_quantile_noise_split_composes_to_the_total_multiplier():
    rule = QuantileClip(noise_multiplier=1.0, expected_batch_size=100, count_noise_std=1.0)
    assert rule.grad_noise_multiplier == pytest.approx((1 - 0.25) ** -0.5)
    # two Gaussian mechanisms compose like one with sigma^-2 = sigma_delta^-2 + (2 sigma_b)^-2
    assert rule.grad_noise_multiplier**-2 + (2 * 1.0) ** -2 == pytest.approx(1.0)
    assert QuantileClip(noise_multiplier=1.0, expected_batch_size=100).count_noise_std == 5.0


def test_quantile_default_count_noise_is_raised_to_sigma_for_small_batches():
    # B / 20 = 1 would need sigma < 2; the default takes max(B / 20, sigma) = 2, so sigma_delta = 2 / sqrt(3/4)
    rule = QuantileClip(noise_multiplier=2.0, expected_batch_size=20)
    assert rule.count_noise_std == 2.0
    assert rule.grad_noise_multiplier == pytest.approx(2.0 / 0.75**0.5)


def test_quantile_split_infeasible_fails_early_and_names_the_fix():
    with pytest.raises(ValueError, match="count_noise_std"):
        QuantileClip(noise_multiplier=1.0, expected_batch_size=100, count_noise_std=0.5)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: FixedClip(clip_norm=0.0, noise_multiplier=1.0, expected_batch_size=4), "clip_norm"),
        (lambda: FixedClip(clip_norm=1.0, noise_multiplier=-1.0, expected_batch_size=4), "noise_multiplier"),
        (lambda: AutoClip(noise_multiplier=1.0, expected_batch_size=0), "expected_batch_size"),
        (lambda: AdaCliP(noise_multiplier=1.0, expected_batch_size=4, beta1=1.0), "beta1"),
        (lambda: AdaCliP(noise_multiplier=1.0, expected_batch_size=4, h1=2.0, h2=1.0), "h1"),
        (lambda: AdaCliP(noise_multiplier=1.0, expected_batch_size=4, estimator="batch"), "estimator"),
        (lambda: QuantileClip(noise_multiplier=1.0, expected_batch_size=4, target_quantile=1.5), "target_quantile"),
    ],
)
def test_bad_hyperparameters_are_named(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_step_inputs_are_named():
    rule = FixedClip(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match="per_example_grads"):
        rule.step(torch.zeros(3), None, torch.zeros(3))
    with pytest.raises(ValueError, match="noise"):
        rule.step(torch.zeros(2, 3), None, torch.zeros(4))
    adaclip = AdaCliP(estimator="per_example", noise_multiplier=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match="state"):
        adaclip.step(torch.zeros(2, 3), adaclip.init_state(5), torch.zeros(3))


# --- clipping statistics depend on released values only ---------------------------------------


def test_adaclip_next_state_depends_only_on_the_released_gradient():
    """Two different batches whose noisy releases coincide must lead to the same next state."""
    gen = torch.Generator().manual_seed(6)
    sigma, batch, dim = 1.5, 8.0, 5
    rule = AdaCliP(
        estimator="per_example",
        noise_multiplier=sigma,
        expected_batch_size=batch,
        beta1=0.7,
        beta2=0.6,
        h1=1e-6,
        h2=50.0,
    )
    state = AdaCliPState(
        mean=torch.randn(dim, generator=gen),
        variance=torch.rand(dim, generator=gen),
        scale=torch.rand(dim, generator=gen) + 0.5,
    )
    first, second = torch.randn(8, dim, generator=gen), 5 * torch.randn(6, dim, generator=gen)
    noise = torch.randn(dim, generator=gen)
    out, next_state, _ = rule.step(first, state, noise)
    # the noise that makes the second batch release exactly the same vector
    whitened_sum = clip_rows((second - state.mean) / state.scale, 1.0)[0].sum(0)
    matching_noise = ((out - state.mean) / state.scale * batch - whitened_sum) / sigma
    out2, next_state2, _ = rule.step(second, state, matching_noise)
    torch.testing.assert_close(out2, out)
    for name in ("mean", "variance", "scale"):
        torch.testing.assert_close(getattr(next_state2, name), getattr(next_state, name))
    # and the update is the paper's formula applied to that released vector
    torch.testing.assert_close(next_state.mean, 0.7 * state.mean + 0.3 * out)
    r = batch * ((out - state.mean) ** 2 - (state.scale * sigma / batch) ** 2)
    torch.testing.assert_close(next_state.variance, 0.6 * state.variance + 0.4 * r.clamp(1e-6, 50.0))


def test_quantile_next_clip_depends_only_on_the_noisy_count():
    gen = torch.Generator().manual_seed(7)
    rule = QuantileClip(
        noise_multiplier=1.0, expected_batch_size=10, count_noise_std=2.0, target_quantile=0.7, clip_lr=0.3
    )
    state = QuantileClipState(clip_norm=1.0)
    grads = torch.randn(10, 3, generator=gen)
    noise = torch.randn(4, generator=gen)
    _, next_state, stats = rule.step(grads, state, noise)
    bits = (grads.norm(dim=1) <= 1.0).double() - 0.5
    noisy_fraction = (bits.sum().item() + 2.0 * noise[3].item()) / 10 + 0.5
    assert stats["unclipped_estimate"] == pytest.approx(noisy_fraction)
    assert next_state.clip_norm == pytest.approx(math.exp(-0.3 * (noisy_fraction - 0.7)))
    # a batch with a different true count but the same noisy count gives the same next clip
    other = grads * 0.01  # all unclipped
    shifted = noise.clone()
    shifted[3] = noise[3] - (5.0 - bits.sum().item()) / 2.0
    assert rule.step(other, state, shifted)[1].clip_norm == pytest.approx(next_state.clip_norm)


@pytest.mark.parametrize("name", list(METHODS))
def test_hyperparameters_report_every_resolved_constructor_parameter(name):
    rule = build_rule(name, noise_multiplier=1.0, expected_batch_size=40)
    assert set(rule.hyperparameters()) == set(method_parameters(name))
    assert build_rule(
        name, noise_multiplier=1.0, expected_batch_size=40, **rule.hyperparameters()
    ).hyperparameters() == (rule.hyperparameters())
