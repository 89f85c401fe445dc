"""The fused clipped sum (:mod:`adaclip.engine.fused`) gives the general fast path's steps bit for bit.

Each rule in the registry trains the same float64 model twice on the same batches with the same noise:
once as the optimizer runs (fused where it applies), once with the fused path switched off.  Parameters,
rule state and step statistics must be equal, including an empty batch and a batch with a NaN example.
"""

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip.engine import fused, make_private
from adaclip.engine import optimizer as optimizer_module
from adaclip.methods import METHODS

pytestmark = pytest.mark.usefixtures("float64_by_default")

FEATURES, CLASSES = 12, 3
PLAIN_NORM = ("adambc", "auto", "fixed", "psac", "quantile")
"""The registered rules that clip the plain norm ``||g_i||``: the fused path applies to them."""
BATCH_SIZES = (8, 5, 0, 7, 8)
POISONED_STEP = 4


def models() -> dict[str, nn.Module]:
    return {
        "mlp": nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, 6), nn.Tanh(), nn.Linear(6, CLASSES)),
        "logistic": nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, CLASSES)),
        "no_bias": nn.Sequential(nn.Linear(FEATURES, 5, bias=False), nn.ReLU(), nn.Linear(5, CLASSES)),
    }


def batches(poison: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    out = []
    for step, size in enumerate(BATCH_SIZES):
        features = torch.randn(size, FEATURES, generator=generator)
        labels = torch.randint(0, CLASSES, (size,), generator=generator)
        if poison and step == POISONED_STEP:
            features[2, 3] = float("nan")
        out.append((features, labels))
    return out


def train(method: str, model_name: str, *, use_fused: bool, poison: bool, monkeypatch, nonfinite: str = "drop"):
    """Parameters, rule states and statistics after each step, and how many steps the fused path computed."""
    torch.manual_seed(0)
    model = models()[model_name]
    params = {"count_noise_std": 2.0} if method == "quantile" else {}
    loader = DataLoader(TensorDataset(torch.zeros(80, FEATURES), torch.zeros(80)), batch_size=8)
    module, optimizer, _ = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=loader,
        method=method,
        noise_multiplier=0.8,
        delta=1e-3,
        seed=11,
        nonfinite=nonfinite,
        **params,
    )
    fused_steps = []

    def counted(*args):
        result = fused.fused_clipped_sum(*args) if use_fused else None
        fused_steps.append(result is not None)
        return result

    monkeypatch.setattr(optimizer_module, "fused_clipped_sum", counted)
    history = []
    for features, labels in batches(poison):
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(features), labels).backward()
        optimizer.step()
        state = optimizer.rule_state
        history.append(
            (
                [p.detach().clone() for p in module.parameters()],
                {} if state is None else {f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
                dict(optimizer.last_stats),
            )
        )
    return history, fused_steps


def assert_same(first, second):
    assert len(first) == len(second)
    for (params_a, state_a, stats_a), (params_b, state_b, stats_b) in zip(first, second, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))
        assert state_a.keys() == state_b.keys()
        for name in state_a:
            a, b = state_a[name], state_b[name]
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
        assert stats_a == stats_b


@pytest.mark.parametrize("poison", [False, True], ids=["finite", "nan_example"])
@pytest.mark.parametrize("model_name", ["mlp", "logistic", "no_bias"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fused_steps_equal_the_general_path(method, model_name, poison, monkeypatch):
    fused_run, fused_steps = train(method, model_name, use_fused=True, poison=poison, monkeypatch=monkeypatch)
    general_run, _ = train(method, model_name, use_fused=False, poison=poison, monkeypatch=monkeypatch)

    assert_same(fused_run, general_run)
    assert fused_steps == [method in PLAIN_NORM] * len(BATCH_SIZES)  # the comparison is not vacuous
    if poison:
        assert fused_run[POISONED_STEP][2]["nonfinite_dropped"] == 1
        assert fused_run[POISONED_STEP][2]["batch_size"] == BATCH_SIZES[POISONED_STEP] - 1
    assert fused_run[2][2]["batch_size"] == 0  # the empty batch still stepped


@pytest.mark.parametrize("use_fused", [True, False])
def test_a_nan_example_stops_training_under_raise_on_both_paths(use_fused, monkeypatch):
    with pytest.raises(ValueError, match="non-finite per-example gradient"):
        train("fixed", "mlp", use_fused=use_fused, poison=True, monkeypatch=monkeypatch, nonfinite="raise")


def test_clip_counts_are_the_closed_form():
    """One linear layer, hand-built inputs: the norms are ``|delta_i| * sqrt(||x_i||^2 + 1)``, the counts follow."""
    model = nn.Linear(2, 1)
    loader = DataLoader(TensorDataset(torch.zeros(40, 2), torch.zeros(40)), batch_size=4)
    module, optimizer, _ = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader,
        method="fixed",
        clip_norm=1.0,
        noise_multiplier=1e-3,
        loss_reduction="sum",
        delta=1e-3,
        seed=0,
    )
    features = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.1, 0.0], [0.0, 2.0]])
    scales = torch.tensor([1.0, 0.5, 2.0, 0.25])  # d loss_i / d output_i
    optimizer.zero_grad()
    (module(features).squeeze(1) * scales).sum().backward()
    optimizer.step()
    norms = scales * torch.sqrt(features.square().sum(1) + 1)  # sqrt(26), 0.5, 2.01, sqrt(5)/4
    assert optimizer.last_stats["batch_size"] == 4
    assert optimizer.last_stats["clipped_fraction"] == float((norms > 1).sum()) / 4
    assert optimizer.last_clipped is not None
    per_example = scales.unsqueeze(1) * torch.cat([features, torch.ones(4, 1)], dim=1)  # [dW, db] per example
    expected = (torch.clamp(1 / norms, max=1.0).unsqueeze(1) * per_example).sum(0)
    torch.testing.assert_close(optimizer.last_clipped.vector, expected, rtol=1e-14, atol=1e-14)
