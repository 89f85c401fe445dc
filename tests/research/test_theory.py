"""AdaCliP's optimal noise power against DP-SGD (Pichapati et al. 2019, Thm. 2) and the simulation check."""

import itertools

import pytest
import torch

from adaclip.research.theory import dpsgd_noise_power, learned_noise_power, log_spaced_std, optimal_noise_power


def test_closed_forms_on_the_design_example():
    std = torch.tensor([1.0, 0.25, 0.04, 0.01], dtype=torch.float64)
    assert optimal_noise_power(std) == pytest.approx(1.3**2)  # (1 + .25 + .04 + .01)^2
    assert dpsgd_noise_power(std) == pytest.approx(4 * (1 + 0.0625 + 0.0016 + 0.0001))
    assert dpsgd_noise_power(std, mean=torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)) == pytest.approx(4 * 2.0642)


def test_ratio_is_one_at_equal_spread_and_falls_as_spread_grows():
    ratios = [
        optimal_noise_power(s) / dpsgd_noise_power(s) for s in (log_spaced_std(50, x) for x in (1, 10, 100, 1000))
    ]
    assert ratios[0] == pytest.approx(1.0)
    assert all(later < earlier for earlier, later in itertools.pairwise(ratios))
    std = log_spaced_std(50, 100)
    assert float(std.max() / std.min()) == pytest.approx(100)


def test_adaclip_learns_the_optimal_noise_power_without_noise():
    """b / kappa averaged over the second half of 1200 steps lands within 10 % of (sum s)^2."""
    std = log_spaced_std(20, 100)
    learned = learned_noise_power(std, batch_size=128, steps=1200, noise_multiplier=0.0, seed=0)
    assert learned == pytest.approx(optimal_noise_power(std), rel=0.1)


def test_spread_below_one_is_rejected():
    with pytest.raises(ValueError, match="spread must be >= 1"):
        log_spaced_std(10, 0.5)
