"""DP-MacAdam and DP-AdamBC against their papers' equations written out, torch's Adam and DP-SGD's accountant."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import epsilon, make_private
from adaclip.methods import AdamBC, MacAdam, build_rule
from adaclip.methods.adambc import released_gradient

pytestmark = pytest.mark.usefixtures("float64_by_default")

ROWS = [[3.0, 4.0], [0.3, 0.4], [0.0, 0.5]]
B = 4.0


def clip_sum(rows, shift, scale):
    """``sum_i scale * w_i / max(1, ||w_i||)`` with ``w_i = (g_i - shift) / scale``."""
    total = [0.0, 0.0]
    for row in rows:
        w = [(g - a) / b for g, a, b in zip(row, shift, scale, strict=True)]
        factor = min(1.0, 1.0 / math.sqrt(sum(x * x for x in w)))
        total = [t + factor * b * x for t, b, x in zip(total, scale, w, strict=True)]
    return total


def optimal(values):
    """``b_j = s^_j^(1/4) (sum_k s^_k^(1/2))^(1/2)``."""
    roots = [math.sqrt(v) for v in values]
    return [math.sqrt(r) * math.sqrt(sum(roots)) for r in roots]


# --- DP-MacAdam ----------------------------------------------------------------------------------------------


def test_macadam_three_steps_by_hand():
    """Tasnim, Sankar, Kosut 2026, Alg. 1 (u_t = (g~ - m^_t-1)(g~ - m^_t), see AdaCliP's docstring), written out."""
    sigma, beta1, beta2, h1, h2, gamma = 1.0, 0.5, 0.8, 1e-12, 10.0, 1e-3
    noise = [[0.3, -0.2], [1.1, 0.4], [-0.7, 0.9]]
    rule = MacAdam(
        noise_multiplier=sigma,
        expected_batch_size=B,
        initial_clip=1.0,
        beta1=beta1,
        beta2=beta2,
        h1=h1,
        h2=h2,
        gamma=gamma,
    )
    state = rule.init_state(2)
    m_hat, s, v, b = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]
    for t, z in enumerate(noise, start=1):
        step, state, stats = rule.step(torch.tensor(ROWS), state, torch.tensor(z))
        g = [
            (c + sigma * bj * zj) / B + mj for c, bj, zj, mj in zip(clip_sum(ROWS, m_hat, b), b, z, m_hat, strict=True)
        ]
        previous = m_hat
        m_hat = [mj + (1 - beta1) / (1 - beta1**t) * (gj - mj) for mj, gj in zip(m_hat, g, strict=True)]
        s = [
            beta1 * sj + (1 - beta1) * (gj - pj) * (gj - mj)
            for sj, gj, pj, mj in zip(s, g, previous, m_hat, strict=True)
        ]
        v = [beta2 * vj + (1 - beta2) * gj**2 for vj, gj in zip(v, g, strict=True)]
        assert stats["noise_power"] == pytest.approx(sum(bj**2 for bj in b) * sigma**2 / B**2)
        if t > 1:
            kappa = 2 * (beta1 - beta1**t) / (1 + beta1)
            b = optimal([min(max(sj / kappa - bj**2 * sigma**2 / B**2, h1), h2) for sj, bj in zip(s, b, strict=True)])
        expected = [mj / (math.sqrt(vj / (1 - beta2**t)) + gamma) for mj, vj in zip(m_hat, v, strict=True)]
        torch.testing.assert_close(step, torch.tensor(expected))
        torch.testing.assert_close(state.mean, torch.tensor(m_hat))
        torch.testing.assert_close(state.second_moment, torch.tensor(v))
        torch.testing.assert_close(state.scale, torch.tensor(b))


def test_macadam_without_noise_or_clipping_is_torch_adam():
    """sigma = 0 and a scale floor far above the gradients (nothing clipped): the released g~ is the batch mean,
    and the parameters follow ``torch.optim.Adam(eps=gamma)`` on it step for step."""
    generator = torch.Generator().manual_seed(0)
    rule = MacAdam(
        noise_multiplier=0.0, expected_batch_size=8, initial_clip=1e6, beta1=0.9, beta2=0.99, h1=1e6, h2=1e7, gamma=1e-6
    )
    theta = torch.randn(5, generator=generator)
    reference = nn.Parameter(theta.clone())
    adam = torch.optim.Adam([reference], lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    state = rule.init_state(5)
    for _ in range(20):
        grads = torch.randn(8, 5, generator=generator) + theta  # a drifting quadratic's per-example gradients
        step, state, stats = rule.step(grads, state, torch.zeros(5))
        assert stats["clipped_fraction"] == 0.0
        theta = theta - 0.01 * step
        reference.grad = grads.mean(0)
        adam.step()
        torch.testing.assert_close(theta, reference.detach(), rtol=1e-9, atol=1e-12)


def test_macadam_step_and_state_depend_only_on_the_released_gradient():
    generator = torch.Generator().manual_seed(4)
    rule, dim = MacAdam(noise_multiplier=1.3, expected_batch_size=8, beta1=0.7), 4
    state = rule.init_state(dim)
    for _ in range(4):
        state = rule.step(torch.randn(8, dim, generator=generator), state, torch.randn(dim, generator=generator))[1]
    first, second = torch.randn(8, dim, generator=generator), 7 * torch.randn(5, dim, generator=generator)
    noise = torch.randn(dim, generator=generator)
    step, next_state, _ = rule.step(first, state, noise)
    weight = (1 - 0.7) / (1 - 0.7**next_state.steps)  # g~ read back as the audit does: m^_t-1 + (m^_t - m^_t-1) / w_t
    released = state.mean + (next_state.mean - state.mean) / weight
    matching = ((released - state.mean) * 8 - rule.clipped_sum(second, state).vector) / (1.3 * state.scale)
    step2, next_state2, _ = rule.step(second, state, matching)
    torch.testing.assert_close(step2, step)
    for name in ("mean", "variance", "scale", "second_moment"):
        torch.testing.assert_close(getattr(next_state2, name), getattr(next_state, name))


# --- DP-AdamBC -----------------------------------------------------------------------------------------------


def test_adambc_three_steps_by_hand():
    """Tang, Shpilevskiy, Lécuyer 2024, Alg. 1: DP-SGD's g~, Adam's moments, ``m^ / sqrt(max(v^ - Phi, gamma'))``."""
    sigma, clip, beta1, beta2, gamma = 1.0, 1.0, 0.5, 0.8, 1e-4
    noise = [[-0.1, -0.2], [1.1, 0.4], [-0.7, 0.02]]
    rule = AdamBC(noise_multiplier=sigma, expected_batch_size=B, clip_norm=clip, beta1=beta1, beta2=beta2, gamma=gamma)
    phi = (sigma * clip / B) ** 2
    assert rule.noise_variance() == pytest.approx(1 / 16)
    state = rule.init_state(2)
    m, v = [0.0, 0.0], [0.0, 0.0]
    for t, z in enumerate(noise, start=1):
        step, state, stats = rule.step(torch.tensor(ROWS), state, torch.tensor(z))
        g = [(c + sigma * clip * zj) / B for c, zj in zip(clip_sum(ROWS, [0.0, 0.0], [clip, clip]), z, strict=True)]
        m = [beta1 * mj + (1 - beta1) * gj for mj, gj in zip(m, g, strict=True)]
        v = [beta2 * vj + (1 - beta2) * gj**2 for vj, gj in zip(v, g, strict=True)]
        corrected = [max(vj / (1 - beta2**t) - phi, gamma) for vj in v]
        expected = [mj / (1 - beta1**t) / math.sqrt(c) for mj, c in zip(m, corrected, strict=True)]
        torch.testing.assert_close(step, torch.tensor(expected))
        torch.testing.assert_close(state.first_moment, torch.tensor(m))
        assert stats["noise_power"] == pytest.approx(2 * phi)
        assert stats["corrected_fraction"] == sum(c > gamma for c in corrected) / 2
    # the first step: g~ = (0.9 - 0.1, 1.7 - 0.2) / 4 = (0.2, 0.375); v^_1 = g~^2 < Phi = 1/16 in coordinate 0, which
    # takes the floor gamma'
    first = rule.step(torch.tensor(ROWS), rule.init_state(2), torch.tensor(noise[0]))[0]
    torch.testing.assert_close(first, torch.tensor([0.2 / math.sqrt(1e-4), 0.375 / math.sqrt(0.375**2 - 1 / 16)]))


def test_adambc_without_noise_is_torch_adam():
    """sigma = 0 gives Phi = 0: with nothing clipped and v^ above gamma', DP-AdamBC is ``torch.optim.Adam(eps=0)``."""
    generator = torch.Generator().manual_seed(1)
    rule = AdamBC(noise_multiplier=0.0, expected_batch_size=8, clip_norm=1e6, beta1=0.9, beta2=0.99, gamma=1e-30)
    theta = torch.randn(5, generator=generator)
    reference = nn.Parameter(theta.clone())
    adam = torch.optim.Adam([reference], lr=0.01, betas=(0.9, 0.99), eps=0.0)
    state = rule.init_state(5)
    for _ in range(20):
        grads = torch.randn(8, 5, generator=generator) + theta
        step, state, _ = rule.step(grads, state, torch.zeros(5))
        theta = theta - 0.01 * step
        reference.grad = grads.mean(0)
        adam.step()
        torch.testing.assert_close(theta, reference.detach(), rtol=1e-9, atol=1e-12)


def test_adambc_corrected_second_moment_is_unbiased_for_the_signal():
    """Releases ``g + N(0, Phi)``: ``E[v^_t] - Phi = g^2`` at every ``t`` (200,000 coordinates as independent chains).

    ``g = 2`` and ``Phi = 1/16``: the floor ``gamma'`` is never reached, ``v^_t - Phi`` has standard deviation
    about 1 at ``t = 1`` (less later), so the mean's standard error is about 0.002; without the
    correction the mean would be off by ``Phi = 0.0625``.
    """
    chains, signal = 200_000, 2.0
    rule = AdamBC(noise_multiplier=2.0, expected_batch_size=8, clip_norm=1.0, beta2=0.9, gamma=1e-30)
    state = rule.init_state(chains)
    generator = torch.Generator().manual_seed(2)
    for _ in range(10):
        released = signal + math.sqrt(rule.noise_variance()) * torch.randn(chains, generator=generator)
        state = rule.next_state(released, state)
        assert float(rule.corrected_second_moment(state).mean()) == pytest.approx(signal**2, abs=0.015)


def test_adambc_released_gradient_is_read_back_from_the_moments():
    rule = AdamBC(noise_multiplier=1.0, expected_batch_size=B, beta1=0.9)
    state = rule.init_state(2)
    noise = torch.tensor([0.4, -1.2])
    _, next_state, _ = rule.step(torch.tensor(ROWS), state, noise)
    expected = (torch.tensor(clip_sum(ROWS, [0.0, 0.0], [1.0, 1.0])) + noise) / B
    torch.testing.assert_close(released_gradient(state.first_moment, next_state.first_moment, 0.9), expected)


# --- both: post-processing of DP-SGD's release ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["macadam", "adambc"])
def test_privacy_is_dp_sgds_for_the_same_sigma_q_and_steps(method):
    """make_private accounts the Adam rules exactly as DP-SGD: the same epsilon for the same (sigma, q, T)."""
    torch.manual_seed(0)
    features, labels = torch.randn(200, 6), torch.randint(0, 2, (200,))
    spent = {}
    for name in (method, "fixed"):
        model = nn.Linear(6, 2)
        module, optimizer, loader = make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
            data_loader=DataLoader(TensorDataset(features, labels), batch_size=20),
            method=name,
            noise_multiplier=1.1,
            delta=1e-5,
            seed=0,
        )
        for inputs, targets in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(inputs), targets).backward()
            optimizer.step()
        assert optimizer.uses_norm_path  # both run on the fast path
        spent[name] = optimizer.get_epsilon()
    assert spent[method] == spent["fixed"]
    assert spent[method] == pytest.approx(epsilon(noise_multiplier=1.1, sample_rate=0.1, steps=10, delta=1e-5))


@pytest.mark.parametrize(
    "method, params, match",
    [
        ("macadam", {"beta1": 0.0}, "beta1 must be > 0"),
        ("macadam", {"gamma": 0.0}, "gamma"),
        ("macadam", {"h1": 1.0, "h2": 0.5}, "h1 must be <= h2"),
        ("adambc", {"beta2": 1.0}, "beta2"),
        ("adambc", {"gamma": -1.0}, "gamma"),
        ("adambc", {"clip_norm": 0.0}, "clip_norm"),
    ],
)
def test_bad_hyperparameters_are_named(method, params, match):
    with pytest.raises(ValueError, match=match):
        build_rule(method, noise_multiplier=1.0, expected_batch_size=8, **params)
