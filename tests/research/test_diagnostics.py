"""The release probe against per-example gradients computed independently (torch.func), and its closed forms.

Every expected value is computed here from the per-example gradients of the sampled batch, obtained with
``torch.func.vmap(torch.func.grad(...))`` on a plain copy of the model (not the engine's book-keeping), and
from the rules' equations written out: DP-SGD's release ``sum_i min(1, C / ||g_i||) g_i / B`` with noise
power ``d (sigma C / B)^2``; AdaCliP's ``sum_i m_i (g_i - a) / B + a`` with ``m_i = min(1, 1 / ||(g_i - a) / b||)``
and noise power ``sigma^2 sum_j b_j^2 / B^2`` (Pichapati et al. 2019, Alg. 1).
"""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from adaclip import make_private
from adaclip.methods import AdaCliPState
from adaclip.research.diagnostics import ReleaseProbe, heterogeneity, shape_saving

SIGMA, BATCH, LR, CLIP = 0.7, 16, 0.3, 0.5


def test_heterogeneity_and_shape_saving_closed_forms(float64_by_default):
    s = torch.tensor([4.0, 1.0, 0.25, 0.0625])
    h = heterogeneity(s)
    assert h == pytest.approx(5.3125**2 / (4 * (16 + 1 + 1 / 16 + 1 / 256)))
    assert heterogeneity(torch.full((7,), 0.3)) == pytest.approx(1.0)  # equal spreads: nothing to gain
    assert heterogeneity(torch.tensor([2.0, 0.0, 0.0, 0.0])) == pytest.approx(1 / 4)  # one coordinate: 1 / d
    assert heterogeneity(torch.zeros(3)) is None
    # b constant is the isotropic transform: no saving; b proportional to sqrt(s) reaches 1 - h (Thm. 2)
    assert shape_saving(torch.full((4,), 3.0), s) == pytest.approx(0.0, abs=1e-15)
    assert shape_saving(2.5 * s.sqrt(), s) == pytest.approx(1 - h, abs=1e-15)
    b = torch.tensor([1.0, 2.0, 0.5, 0.1])
    by_hand = 1 - (1 + 4 + 0.25 + 0.01) * (16 / 1 + 1 / 4 + 1 / 16 / 0.25 + 1 / 256 / 0.01) / (
        4 * (16 + 1 + 1 / 16 + 1 / 256)
    )
    assert shape_saving(b, s) == pytest.approx(by_hand)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # Cauchy-Schwarz: no shape of b saves more than 1 - h
        b = torch.rand(4, generator=generator) + 0.01
        assert shape_saving(b, s) <= 1 - h + 1e-12
    assert shape_saving(b, torch.zeros(4)) is None


def _data():
    generator = torch.Generator().manual_seed(1)
    # features on very different scales: heterogeneous per-coordinate gradient spreads
    x = torch.randn(96, 4, generator=generator) * torch.tensor([3.0, 1.0, 0.3, 0.05])
    y = torch.randint(0, 3, (96,), generator=generator)
    return TensorDataset(x, y)


def _per_example_grads(module, x, y):
    """``[n, d]`` per-example gradients of the per-example loss at ``module``'s current parameters, in the
    optimizer's parameter order, through a plain ``nn.Linear`` that the engine never touched."""
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    plain = nn.Linear(module.in_features, module.out_features)

    def loss(values, xi, yi):
        return nn.functional.cross_entropy(functional_call(plain, values, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[name].reshape(len(x), -1) for name in params], dim=1)


def _private(method, loss_reduction="mean", **params):
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(module.parameters(), lr=LR, momentum=0.9)
    model, optimizer, loader = make_private(
        module=module,
        optimizer=optimizer,
        data_loader=DataLoader(_data(), batch_size=BATCH),
        method=method,
        noise_multiplier=SIGMA,
        delta=1e-5,
        seed=0,
        loss_reduction=loss_reduction,
        **params,
    )
    return module, model, optimizer, loader


def _cosine(a, b):
    return float(a @ b) / float(a.norm() * b.norm())


def _noise_free_by_hand(method, grads, state):
    """The rule's release with zero noise, from the per-example gradients and the paper's equations."""
    if method == "fixed":
        factors = (CLIP / grads.norm(dim=1)).clamp(max=1.0)
        return (factors[:, None] * grads).sum(0) / BATCH
    a, b = state.mean, state.scale
    factors = (1 / ((grads - a) / b).norm(dim=1)).clamp(max=1.0)
    return (factors[:, None] * (grads - a)).sum(0) / BATCH + a


def _noise_power_by_hand(method, dim, state):
    if method == "fixed":
        return dim * (SIGMA * CLIP / BATCH) ** 2
    return SIGMA**2 * float(state.scale.square().sum()) / BATCH**2


@pytest.mark.parametrize(
    ("method", "loss_reduction", "params"),
    [
        ("fixed", "mean", {"clip_norm": CLIP}),
        ("fixed", "sum", {"clip_norm": CLIP}),
        ("adaclip", "mean", {"initial_clip": 0.2, "h2": 1.0, "estimator": "per_example"}),
    ],
)
def test_probe_matches_a_hand_computation_from_independent_per_example_gradients(
    float64_by_default, method, loss_reduction, params
):
    module, model, optimizer, loader = _private(method, loss_reduction, **params)
    probe = ReleaseProbe(optimizer, LR)
    dim = sum(p.numel() for p in module.parameters())
    checked = 0
    for x, y in loader:
        grads = _per_example_grads(module, x, y)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y, reduction=loss_reduction)
        loss.backward()
        state = optimizer.rule_state if optimizer.rule_state is not None else optimizer.rule.init_state(dim)
        probe.before_step()
        optimizer.step()
        result = probe.after_step()
        if len(x) < 2:
            continue
        clean = grads.mean(0)
        std = grads.std(0, unbiased=False)
        released = torch.cat([p.grad.reshape(-1) for p in optimizer.params])
        released = released / BATCH if loss_reduction == "sum" else released
        noise_free = _noise_free_by_hand(method, grads, state)
        zeros = torch.zeros(optimizer.rule.noise_size(dim))
        assert torch.allclose(noise_free, optimizer.rule.release(optimizer.last_clipped, state, zeros)[0])
        noise_power = _noise_power_by_hand(method, dim, state)
        assert result["heterogeneity"] == pytest.approx(float(std.sum()) ** 2 / (dim * float(std.square().sum())))
        assert result["snr"] == pytest.approx(float(noise_free.square().sum()) / noise_power)
        assert result["cosine_noise_free"] == pytest.approx(_cosine(noise_free, clean))
        assert result["cosine_release"] == pytest.approx(_cosine(released, clean))
        assert result["parameter_noise"] == pytest.approx(LR**2 * noise_power)
        assert result["clean_norm"] == pytest.approx(float(clean.norm()))
        if method == "adaclip":
            assert result["shape_saving"] == pytest.approx(shape_saving(state.scale, std))
        else:
            assert "shape_saving" not in result
        checked += 1
    assert checked >= 4


def test_shape_saving_reaches_one_minus_h_when_b_is_proportional_to_sqrt_s(float64_by_default):
    module, model, optimizer, loader = _private("adaclip", initial_clip=0.2, h2=1.0, estimator="per_example")
    probe = ReleaseProbe(optimizer, LR)
    x, y = next(iter(loader))
    shapes = {
        "optimal": lambda std: 3.0 * std.sqrt(),  # b proportional to sqrt(s) (Thm. 2): saves 1 - h
        "isotropic": lambda std: torch.full_like(std, 0.7),  # saves nothing
        "proportional to s": lambda std: std,  # worse than optimal
    }
    for name, shape in shapes.items():
        grads = _per_example_grads(module, x, y)  # the parameters moved: this step's gradients
        std = grads.std(0, unbiased=False)
        h = float(std.sum()) ** 2 / (len(std) * float(std.square().sum()))
        assert h < 0.9  # heterogeneous enough that 1 - h is not a trivial 0
        scale = shape(std)
        optimizer.rule_state = AdaCliPState(mean=grads.mean(0) * 0.5, variance=torch.ones_like(std), scale=scale)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        probe.before_step()
        optimizer.step()
        saving = probe.after_step()["shape_saving"]
        closed = 1 - float(scale.square().sum()) * float((std / scale).square().sum()) / (
            len(std) * float(std.square().sum())
        )
        assert saving == pytest.approx(closed, abs=1e-12), name
        if name == "optimal":
            assert saving == pytest.approx(1 - h, abs=1e-12)
        elif name == "isotropic":
            assert saving == pytest.approx(0.0, abs=1e-12)
        else:
            assert saving < 1 - h - 1e-3


def test_probe_needs_before_step_and_an_optimizer_step():
    _, _, optimizer, _ = _private("fixed", clip_norm=CLIP)
    with pytest.raises(RuntimeError, match="needs before_step"):
        ReleaseProbe(optimizer, LR).after_step()


def test_probe_values_are_finite_or_none(float64_by_default):
    _, model, optimizer, loader = _private("fixed", clip_norm=CLIP)
    probe = ReleaseProbe(optimizer, LR)
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    probe.before_step()
    optimizer.step()
    assert all(v is None or math.isfinite(v) for v in probe.after_step().values())
