"""Non-finite per-example gradients are dropped by every rule, and a state of another dtype is refused.

The policy (``adaclip.methods.base``): an example whose gradient has a NaN or an infinite entry gets weight 0
and is not counted in the batch; dropping it is removing it from the batch, so the release must equal the
release of the batch without it (same noise), and neither the release nor the next state can be non-finite.
"""

import dataclasses

import pytest
import torch

from adaclip.methods import METHODS, ClippedSum, build_rule
from adaclip.methods.base import drop_nonfinite

pytestmark = pytest.mark.usefixtures("float64_by_default")

DIM, BATCH, SIGMA = 6, 4.0, 0.7
POISON = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def rule_of(method: str):
    params = {"count_noise_std": 4.0} if method == "quantile" else {}
    return build_rule(method, noise_multiplier=SIGMA, expected_batch_size=BATCH, **params)


def clean_batch(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    spread = torch.logspace(0, -1.5, DIM)
    return 0.3 * spread + spread * torch.randn(4, DIM, generator=generator)


def poisoned(grads: torch.Tensor, value: float, row: int = 2, column: int = 1) -> torch.Tensor:
    grads = grads.clone()
    grads[row, column] = value
    return grads


def noise_for(rule, seed: int) -> torch.Tensor:
    return torch.randn(rule.noise_size(DIM), generator=torch.Generator().manual_seed(seed))


def state_tensors(state) -> dict[str, torch.Tensor]:
    if state is None:
        return {}
    return {f.name: torch.as_tensor(getattr(state, f.name), dtype=torch.float64) for f in dataclasses.fields(state)}


@pytest.mark.parametrize("poison", sorted(POISON))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_nonfinite_example_is_dropped_like_a_removed_one(method, poison):
    rule = rule_of(method)
    state = rule.init_state(DIM)
    grads, noise = clean_batch(0), noise_for(rule, 1)
    released, new_state, stats = rule.step(poisoned(grads, POISON[poison]), state, noise)
    without, without_state, without_stats = rule.step(grads[[0, 1, 3]], state, noise)

    assert torch.isfinite(released).all()
    torch.testing.assert_close(released, without, rtol=1e-12, atol=1e-12)
    for name, value in state_tensors(new_state).items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, state_tensors(without_state)[name], rtol=1e-10, atol=1e-12)
    assert stats["nonfinite_dropped"] == 1.0 and without_stats["nonfinite_dropped"] == 0.0
    assert stats["batch_size"] == 3.0 and stats["clipped_fraction"] == without_stats["clipped_fraction"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_clipped_sum_counts_dropped_examples_apart_and_stays_additive(method):
    rule = rule_of(method)
    state = rule.init_state(DIM)
    grads = poisoned(poisoned(clean_batch(2), float("nan"), row=0), float("inf"), row=3)
    whole = rule.clipped_sum(grads, state)
    assert torch.isfinite(whole.vector).all()
    assert whole.counts.tolist()[0] == 2.0 and whole.counts.tolist()[2] == 2.0 and whole.nonfinite_dropped == 2.0
    halves = [rule.clipped_sum(grads[:2], state), rule.clipped_sum(grads[2:], state)]
    torch.testing.assert_close(halves[0].counts + halves[1].counts, whole.counts)
    torch.testing.assert_close(halves[0].vector + halves[1].vector, whole.vector)


@pytest.mark.parametrize("method", ["adaclip", "geoclip", "quantile"])
def test_adaptive_states_stay_finite_on_later_clean_steps(method):
    """The issue's failure: one NaN example left AdaCliP's mean, variance and scale NaN for every later step, and
    GeoClip's eigen-decomposition raised ``torch._LinAlgError``."""
    rule = rule_of(method)
    state = rule.init_state(DIM)
    for step in range(6):
        grads = clean_batch(10 + step)
        if step == 1:
            grads = poisoned(grads, float("nan"))
        if step == 2:
            grads = poisoned(grads, float("inf"), row=0, column=0)
        released, state, stats = rule.step(grads, state, noise_for(rule, 20 + step))
        assert torch.isfinite(released).all()
        assert all(torch.isfinite(value).all() for value in state_tensors(state).values())
        assert stats["nonfinite_dropped"] == (1.0 if step in (1, 2) else 0.0)


def test_every_example_nonfinite_releases_pure_noise():
    rule = rule_of("fixed")
    grads = torch.full((3, DIM), float("nan"))
    noise = noise_for(rule, 3)
    released, _, stats = rule.step(grads, None, noise)
    torch.testing.assert_close(released, SIGMA * rule.clip_norm * noise / BATCH)
    assert stats["batch_size"] == 0.0 and stats["nonfinite_dropped"] == 3.0 and stats["clipped_fraction"] == 0.0


def test_drop_nonfinite_marks_bad_norms_and_bad_weights():
    norms = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    weights = torch.tensor([1.0, 0.5, 0.0, float("inf")])
    kept, dropped = drop_nonfinite(norms, weights)
    assert dropped.tolist() == [False, True, True, True] and kept.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert drop_nonfinite(torch.ones(3), torch.ones(3))[1] is None
    counts = ClippedSum.of(torch.zeros(2), kept, dropped).counts.tolist()
    assert counts == [1.0, 0.0, 3.0]


def test_a_finite_batch_whose_sum_overflows_keeps_every_example():
    """The policy clears a batch by one sum; a sum that overflows (every example finite) must drop nothing."""
    norms = torch.tensor([3e38, 3e38, 1.0], dtype=torch.float32)  # their float32 sum is inf
    weights = torch.tensor([1e-38, 1e-38, 1.0], dtype=torch.float32)
    assert not torch.isfinite((norms + weights).sum())
    kept, dropped = drop_nonfinite(norms, weights)
    assert dropped is None and kept is weights


def test_counts_without_drops_are_the_batch_size_and_the_shrunk_examples():
    weights = torch.tensor([1.0, 0.5, 1.0, 0.2, 0.999])
    counts = ClippedSum.of(torch.zeros(2, dtype=torch.float32), weights).counts
    assert counts.dtype == torch.float64 and counts.tolist() == [5.0, 3.0, 0.0]
    assert ClippedSum.of(torch.zeros(2), torch.ones(0)).counts.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("method", ["adaclip", "geoclip"])
def test_a_state_of_another_dtype_is_refused_by_name(method):
    """The issue's case: ``init_state(d)`` in float32 with float64 gradients failed inside ``torch.lerp``."""
    rule = rule_of(method)
    state = rule.init_state(DIM, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"state\.mean is torch\.float32 .* but the gradients are torch\.float64"):
        rule.step(clean_batch(0), state, noise_for(rule, 1))


@pytest.mark.parametrize("method", ["fixed", "auto", "psac", "quantile"])
def test_rules_without_tensor_state_accept_any_dtype(method):
    rule = rule_of(method)
    released, _, _ = rule.step(clean_batch(0).float(), rule.init_state(DIM), noise_for(rule, 1).float())
    assert released.dtype == torch.float32 and torch.isfinite(released).all()
