"""DP-PSAC against the paper's formula, its sensitivity bound and leave-one-out checks."""

import math

import pytest
import torch

from adaclip.methods import AutoClip, PerSampleAdaptiveClip
from adaclip.methods.psac import psac_weights

pytestmark = pytest.mark.usefixtures("float64_by_default")


def paper_weight(norm: float, clip: float, r: float) -> float:
    """Xia et al. 2023: the per-example factor C / (||g|| + r / (||g|| + r)), in plain floats."""
    return clip / (norm + r / (norm + r))


def test_step_by_hand_for_a_few_norms():
    clip, r, sigma, batch = 2.0, 0.1, 1.5, 8.0
    norms = [0.0, 0.05, 0.3, 1.0, 10.0]
    direction = torch.tensor([0.6, 0.8])  # unit vector
    rows = torch.stack([n * direction for n in norms])
    noise = torch.tensor([0.3, -1.2])
    rule = PerSampleAdaptiveClip(noise_multiplier=sigma, expected_batch_size=batch, clip_norm=clip, r=r)
    out, state, stats = rule.step(rows, None, noise)
    weighted_sum = sum(n * paper_weight(n, clip, r) for n in norms)
    torch.testing.assert_close(out, (weighted_sum * direction + sigma * clip * noise) / batch)
    # e.g. ||g|| = 1: weight 2 / (1 + 0.1 / 1.1) = 1.8333..., so that example is amplified, not shrunk
    assert paper_weight(1.0, clip, r) == pytest.approx(2 / (1 + 0.1 / 1.1))
    assert state is None
    assert stats["clipped_fraction"] == pytest.approx(1 / 5)  # only ||g|| = 10 gets weight < 1
    assert stats["noise_power"] == pytest.approx(2 * (sigma * clip / batch) ** 2)
    assert stats["clip_norm"] == clip and stats["batch_size"] == 5.0


def test_weights_match_the_paper_over_a_grid():
    norms = torch.logspace(-8, 8, 161)
    for clip, r in [(1.0, 0.1), (0.5, 0.01), (3.0, 2.0)]:
        expected = torch.tensor([paper_weight(n, clip, r) for n in norms.tolist()])
        torch.testing.assert_close(psac_weights(norms, clip, r), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("clip, r", [(1.0, 0.1), (0.5, 0.01), (3.0, 1e-6), (2.0, 5.0)])
def test_weighted_norm_never_exceeds_the_clip_norm(clip, r):
    """phi(x) = C x / (x + r / (x + r)) = C (x^2 + r x) / (x^2 + r x + r) < C, increasing, -> C as x -> inf."""
    norms = torch.cat([torch.zeros(1), torch.logspace(-300, 300, 6001)])
    weighted = norms * psac_weights(norms, clip, r)
    assert (
        weighted <= clip * (1 + 2 * torch.finfo(norms.dtype).eps)
    ).all()  # < C exactly; an ulp of rounding, as for clip_rows
    # monotone in the norm (up to one rounding step once phi is within 1e-16 of C): the supremum is the limit
    assert (weighted[1:] >= weighted[:-1] - 2 * torch.finfo(norms.dtype).eps * clip).all()
    assert weighted[-1].item() == pytest.approx(clip, rel=1e-12)
    x = norms[(norms > 1e-3) & (norms < 1e3)]
    torch.testing.assert_close(x * psac_weights(x, clip, r), clip * (x**2 + r * x) / (x**2 + r * x + r))


def test_weight_is_non_monotonic_with_the_derived_maximum():
    """h(x) = x + r / (x + r) is smallest at x = sqrt(r) - r, where the weight C / h peaks at C / (2 sqrt(r) - r)."""
    clip, r = 1.0, 0.1
    norms = torch.linspace(0, 2, 200001)
    weights = psac_weights(norms, clip, r)
    peak = int(weights.argmax())
    assert norms[peak].item() == pytest.approx(math.sqrt(r) - r, abs=1e-4)
    assert weights[peak].item() == pytest.approx(clip / (2 * math.sqrt(r) - r), rel=1e-8)
    assert weights[0].item() == pytest.approx(clip)  # small gradients: weight C, not AUTO-S's C / r
    assert weights[-1] < weights[0] < weights[peak]


def test_removing_one_example_moves_the_sum_by_less_than_the_clip_norm():
    gen = torch.Generator().manual_seed(0)
    clip, batch = 0.7, 16.0
    rule = PerSampleAdaptiveClip(noise_multiplier=1.0, expected_batch_size=batch, clip_norm=clip)
    worst = 0.0
    for trial in range(300):
        grads = torch.randn(16, 6, generator=gen) * 10 ** (8 * torch.rand(1, generator=gen).item() - 4)
        k = trial % 16
        with_k = rule.step(grads, None, torch.zeros(6))[0]
        without_k = rule.step(torch.cat([grads[:k], grads[k + 1 :]]), None, torch.zeros(6))[0]
        worst = max(worst, torch.linalg.vector_norm(with_k - without_k).item() * batch / clip)
    assert worst < 1
    assert worst > 0.99  # large gradients come close to the bound: the check is not vacuous


def test_empty_batch_returns_noise_only():
    rule = PerSampleAdaptiveClip(noise_multiplier=2.0, expected_batch_size=8.0, clip_norm=0.5)
    noise = torch.randn(3, generator=torch.Generator().manual_seed(1))
    out, _, stats = rule.step(torch.zeros(0, 3), None, noise)
    torch.testing.assert_close(out, 2.0 * 0.5 * noise / 8.0)
    assert stats["clipped_fraction"] == 0.0 and stats["batch_size"] == 0.0


def test_large_gradients_are_normalised_like_auto_s():
    """For ||g|| >> 1 both rules give C g / ||g|| (PSAC) and g / ||g|| (AUTO-S): the same direction, scale C."""
    gen = torch.Generator().manual_seed(2)
    grads = 1e6 * torch.randn(5, 4, generator=gen)
    psac = PerSampleAdaptiveClip(noise_multiplier=1.0, expected_batch_size=5.0, clip_norm=3.0)
    auto = AutoClip(noise_multiplier=1.0, expected_batch_size=5.0)
    torch.testing.assert_close(
        psac.step(grads, None, torch.zeros(4))[0], 3.0 * auto.step(grads, None, torch.zeros(4))[0], rtol=1e-6, atol=0
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(r=0.0), "r"), (dict(clip_norm=-1.0), "clip_norm"), (dict(noise_multiplier=-1.0), "noise_multiplier")],
)
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerSampleAdaptiveClip(**{"noise_multiplier": 1.0, "expected_batch_size": 4.0, **kwargs})
