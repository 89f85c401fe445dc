"""Injected faults through ``make_private``: non-finite examples, broken custom rules, and checkpoints.

* One example with a NaN or infinite feature among 200 (the issue's case, where every parameter became
  NaN and ``clipped_fraction`` said 0): every registered method, on both per-example paths, keeps every
  parameter finite, counts the example whenever it is sampled, and the two paths agree.
* ``nonfinite="raise"`` stops before anything is applied; a custom rule that ignores the policy cannot
  write a non-finite gradient into the parameters.
* The optimizer's ``state_dict`` (with the loader's sampling state) resumes a run bitwise and keeps the
  total epsilon (the issue: epsilon went from 2.773 to 0.000 after a reload).
"""

import copy
import io

import pytest
import torch
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from adaclip import epsilon, make_private
from adaclip.engine import AdaptiveClipDPOptimizer
from adaclip.engine.sampling import TensorPoissonLoader, load_loader_state_dict, loader_state_dict
from adaclip.methods import METHODS, ClippedSum, FixedClip
from adaclip.methods.base import NonFiniteGradientError

POISONED_ROW = 17


def dataset(poison: float | None = None, n: int = 200, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 5, generator=generator)
    labels = (features.sum(1) > 0).long()
    if poison is not None:
        features[POISONED_ROW, 3] = poison
    return TensorDataset(features, labels)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))


def setup(method: str, data: TensorDataset, *, per_example: str = "fast", seed: int = 0, **kwargs):
    model = mlp(seed)
    # a rule that releases an Adam step wants plain SGD with a small rate (see adaclip.methods.Method)
    releases_step = METHODS[method].releases_step
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.01 if releases_step else 0.3, momentum=0.0 if releases_step else 0.5
    )
    params = {"rank": 8} if method == "geoclip" else {}
    return make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(data, batch_size=20),
        method=method,
        noise_multiplier=1.0,
        delta=1e-5,
        seed=seed,
        per_example=per_example,
        **params,
        **kwargs,
    )


def train_epoch(model, optimizer, loader) -> list[tuple[bool, float]]:
    """One epoch; per step, whether the batch held a non-finite feature and the step's ``nonfinite_dropped``."""
    seen = []
    for features, labels in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()
        seen.append((bool((~torch.isfinite(features)).any()), optimizer.last_stats["nonfinite_dropped"]))
    return seen


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_nonfinite_example_never_reaches_the_parameters(method, poison):
    results = {}
    for path in ("fast", "materialise"):
        model, optimizer, loader = setup(method, dataset(poison), per_example=path)
        seen = []
        for _ in range(3):
            seen += train_epoch(model, optimizer, loader)
        assert torch.isfinite(flat(model)).all(), path
        assert any(poisoned for poisoned, _ in seen)  # the example was sampled, so the test means something
        assert [dropped for _, dropped in seen] == [float(poisoned) for poisoned, _ in seen]
        assert all(torch.isfinite(t).all() for t in _state_tensors(optimizer.rule_state))
        results[path] = flat(model)
    torch.testing.assert_close(results["fast"], results["materialise"], rtol=1e-4, atol=1e-5)


def _state_tensors(state) -> list[torch.Tensor]:
    if state is None:
        return []
    return [torch.as_tensor(value) for value in vars(state).values()]


def test_nonfinite_raise_stops_before_anything_is_applied():
    model, optimizer, loader = setup("adaclip", dataset(float("nan")), nonfinite="raise")
    with pytest.raises(NonFiniteGradientError, match=r"non-finite per-example gradient .* nonfinite='raise'"):
        for features, labels in (batch for _ in range(10) for batch in loader):  # until the example is sampled
            before = (flat(model).clone(), optimizer.steps_taken)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(features), labels).backward()
            optimizer.step()
    assert torch.equal(flat(model), before[0]) and optimizer.steps_taken == before[1]


def test_nonfinite_policy_is_checked():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        setup("fixed", dataset(), nonfinite="ignore")


class IgnoresThePolicy(FixedClip):
    """A user rule that clips by hand and forgets non-finite examples (``0 * NaN`` is NaN)."""

    def clipped_sum(self, per_example_grads, state):
        weights = (self.clip_norm / torch.linalg.vector_norm(per_example_grads, dim=1)).clamp(max=1.0)
        return ClippedSum.of(weights @ per_example_grads, weights)


def test_a_custom_rule_that_ignores_the_policy_cannot_poison_the_parameters():
    model = GradSampleModule(mlp())
    rule = IgnoresThePolicy(noise_multiplier=1.0, expected_batch_size=20)
    optimizer = AdaptiveClipDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.3), rule=rule, sample_rate=0.1, per_example="materialise"
    )
    features, labels = dataset(float("nan")).tensors
    before = flat(model).clone()
    nn.functional.cross_entropy(model(features[:20]), labels[:20]).backward()
    with pytest.raises(FloatingPointError, match=r"non-finite the released gradient .* nothing was applied"):
        optimizer.step()
    assert torch.equal(flat(model), before) and optimizer.steps_taken == 0


def test_a_finite_release_whose_sum_overflows_is_applied():
    """The release check clears finite tensors by their sum; a sum that overflows is checked entry by entry."""
    model = GradSampleModule(mlp())
    optimizer = AdaptiveClipDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.3),
        rule=FixedClip(noise_multiplier=1.0, expected_batch_size=20),
        sample_rate=0.1,
    )
    huge = torch.full((4,), 1e308, dtype=torch.float64)
    assert not torch.isfinite(huge.sum())
    optimizer._check_finite(huge, None)  # finite: no error
    with pytest.raises(FloatingPointError, match="non-finite the released gradient"):
        optimizer._check_finite(torch.cat([huge, torch.tensor([float("inf")], dtype=torch.float64)]), None)


# --- checkpoints ------------------------------------------------------------------------------------------


def saved(model, optimizer, loader) -> dict:
    """What a checkpoint holds, through a real save and a weights-only load."""
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loader": loader_state_dict(loader)}, buffer
    )
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("method", ["fixed", "adaclip", "quantile", "geoclip"])
def test_a_resumed_run_ends_bitwise_equal_with_the_total_epsilon(method):
    model, optimizer, loader = setup(method, dataset())
    train_epoch(model, optimizer, loader)
    checkpoint = saved(model, optimizer, loader)
    train_epoch(model, optimizer, loader)
    uninterrupted, total = flat(model), optimizer.get_epsilon()

    model, optimizer, loader = setup(method, dataset(), seed=0)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    load_loader_state_dict(loader, checkpoint["loader"])
    assert optimizer.steps_taken == len(loader)
    train_epoch(model, optimizer, loader)
    assert torch.equal(flat(model), uninterrupted)
    assert optimizer.get_epsilon() == total
    assert total == epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=2 * len(loader), delta=1e-5)


def test_without_the_privacy_state_a_resume_would_restart_epsilon_so_it_is_refused():
    model, optimizer, loader = setup("adaclip", dataset())
    train_epoch(model, optimizer, loader)
    plain = optimizer.original_optimizer.state_dict()  # what Opacus's DPOptimizer.state_dict() used to give
    fresh = setup("adaclip", dataset())[1]
    with pytest.raises(ValueError, match=r"no privacy state .* restart epsilon at 0"):
        fresh.load_state_dict(plain)
    assert fresh.steps_taken == 0


def test_a_checkpoint_of_another_privacy_setting_is_refused_by_name():
    model, optimizer, loader = setup("adaclip", dataset())
    train_epoch(model, optimizer, loader)
    state = optimizer.state_dict()
    model2 = mlp()
    _, optimizer2, _ = make_private(
        module=model2,
        optimizer=torch.optim.SGD(model2.parameters(), lr=0.3, momentum=0.5),
        data_loader=DataLoader(dataset(), batch_size=20),
        method="adaclip",
        noise_multiplier=2.0,
        delta=1e-5,
        seed=0,
    )
    with pytest.raises(ValueError, match=r"another privacy setting \(.*noise_multiplier: saved 1.0, here 2.0\)"):
        optimizer2.load_state_dict(state)


class Indexed(Dataset):
    """A map-style dataset that is not a TensorDataset, so make_private uses Opacus's DPDataLoader."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index]


@pytest.mark.parametrize("kind", ["tensor", "opacus"])
def test_loader_sampling_state_fixes_the_next_epoch(kind):
    data = dataset() if kind == "tensor" else Indexed(dataset())
    loader = setup("fixed", data)[2]
    assert isinstance(loader, TensorPoissonLoader) == (kind == "tensor")
    list(loader)
    state = copy.deepcopy(loader_state_dict(loader))
    expected = [labels.tolist() for _, labels in loader]
    other = setup("fixed", data, seed=5)[2]
    load_loader_state_dict(other, state)
    assert [labels.tolist() for _, labels in other] == expected
    with pytest.raises(ValueError, match="sample_rate"):
        load_loader_state_dict(setup("fixed", data)[2], {**state, "sample_rate": 0.5})
