"""Per-layer clipping (Opacus's ``clipping="per_layer"``): the rule by hand, its sensitivity, noise and accounting.

The sensitivity ``S = sqrt(sum_k C_k^2)`` and the noise ``sigma S`` are measured on the engine (the release of
two neighbouring batches with the same noise, and the release of zero gradients), and the epsilon the
optimizer reports is checked against the Gaussian mechanism's exact privacy profile (Balle & Wang 2018,
Thm. 8) at the measured ``mu = sensitivity / noise``.  Both per-example paths are compared with per-layer
clipping written out on per-example gradients from ``torch.func``.
"""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from adaclip import PrivacyEngine, make_private
from adaclip.engine.bookkeeping import BookkeepingGradSampleModule, LayoutGradSampleModule
from adaclip.engine.optimizer import AdaptiveClipDPOptimizer
from adaclip.methods import (
    AutoClip,
    FixedClip,
    PerLayerClip,
    PerSampleAdaptiveClip,
    QuantileClip,
    build_rule,
    per_layer_methods,
    per_layer_refusals,
)

pytestmark = pytest.mark.usefixtures("float64_by_default")


# --- the rule by hand ---------------------------------------------------------------------------------------


def test_fixed_per_layer_step_by_hand():
    """Layers of sizes 2 and 1 with bounds 3 and 4; sigma = 2, B = 4.

    g_1 = ((3, 4), (1)): norms (5, 1), weights (3/5, 1): ((1.8, 2.4), (1)).
    g_2 = ((0, 1), (-8)): norms (1, 8), weights (1, 1/2): ((0, 1), (-4)).
    Sum (1.8, 3.4, -3); S = sqrt(9 + 16) = 5; noise (1, 0, -1) enters as 2 * 5 * (1, 0, -1).
    """
    rule = PerLayerClip(
        base=FixedClip(noise_multiplier=2.0, expected_batch_size=4), layer_sizes=[2, 1], layer_bounds=[3.0, 4.0]
    )
    grads = torch.tensor([[3.0, 4.0, 1.0], [0.0, 1.0, -8.0]])
    released, state, stats = rule.step(grads, None, torch.tensor([1.0, 0.0, -1.0]))
    torch.testing.assert_close(released, torch.tensor([1.8 + 10.0, 3.4, -3.0 - 10.0]) / 4)
    assert state is None and stats["clip_norm"] == 5.0 and stats["clipped_fraction"] == 1.0
    assert stats["noise_power"] == pytest.approx(3 * (2 * 5 / 4) ** 2)
    clipped = rule.clipped_sum(grads, None)
    assert clipped.counts.tolist() == [2.0, 2.0, 0.0, 1.0, 1.0]  # n, clipped in any layer, dropped, per layer


@pytest.mark.parametrize(
    "base, weight",
    [
        (FixedClip(noise_multiplier=1.0, expected_batch_size=1), lambda x, c: min(1.0, c / x)),
        (AutoClip(noise_multiplier=1.0, expected_batch_size=1, r=0.01), lambda x, c: c / (x + 0.01)),
        (
            PerSampleAdaptiveClip(noise_multiplier=1.0, expected_batch_size=1, r=0.1),
            lambda x, c: c / (x + 0.1 / (x + 0.1)),
        ),
    ],
)
def test_each_layer_gets_the_flat_rules_weight_at_its_own_bound(base, weight):
    rule = PerLayerClip(base=base, layer_sizes=[3, 2], layer_bounds=[0.5, 2.0])
    grads = torch.tensor([[1.0, 2.0, 2.0, 0.3, 0.4], [0.1, 0.0, 0.0, 30.0, 40.0]])
    expected = []
    for row in grads:
        first, second = row[:3], row[3:]
        expected.append(
            torch.cat([first * weight(first.norm().item(), 0.5), second * weight(second.norm().item(), 2.0)])
        )
    torch.testing.assert_close(rule.clipped_sum(grads, None).vector, torch.stack(expected).sum(0))


def test_one_bound_is_split_equally():
    """C = 1.2 over K = 4 layers: C_k = 0.6 each, S = 1.2; AUTO-S (sensitivity 1) gets 1/2 each."""
    rule = PerLayerClip(base=FixedClip(noise_multiplier=1.0, expected_batch_size=1, clip_norm=1.2), layer_sizes=[1] * 4)
    assert rule.layer_bounds == pytest.approx((0.6,) * 4) and rule.clip_norm == pytest.approx(1.2)
    auto = PerLayerClip(base=AutoClip(noise_multiplier=1.0, expected_batch_size=1), layer_sizes=[1] * 4)
    assert auto.layer_bounds == pytest.approx((0.5,) * 4) and auto.weight_bound(None) == pytest.approx(1.0)


def test_quantile_per_layer_release_by_hand():
    """K = 2 layers, bounds (1, 2); sigma = 1, sigma_b = 2, B = 4, clip_lr = 0.5, target 0.5.

    Examples (norms per layer): (0.5, 3), (2, 1), (4, 5): layer 1 clips 2 of 3, layer 2 clips 2 of 3.
    sigma_delta = (1 - 1/16)^(-1/2); gradient noise sigma_delta * sqrt(1 + 4); count noise sqrt(2) * 2 per layer.
    b~_1 = (1 - 3/2 + sqrt(2) * 2 * 0.5) / 4 + 1/2 with z_1 = 0.5; b~_2 with z_2 = -1.
    """
    base = QuantileClip(noise_multiplier=1.0, expected_batch_size=4, count_noise_std=2.0, clip_lr=0.5)
    rule = PerLayerClip(base=base, layer_sizes=[1, 1], layer_bounds=[1.0, 2.0])
    state = rule.init_state(2, dtype=torch.float64)
    grads = torch.tensor([[0.5, 3.0], [2.0, 1.0], [4.0, 5.0]])
    noise = torch.tensor([1.0, 0.0, 0.5, -1.0])  # two for the gradient, two for the counts
    released, new_state, stats = rule.step(grads, state, noise)

    sigma_delta = (1.0 - 1.0 / 16) ** -0.5
    clipped = torch.tensor(
        [0.5 + 1.0 + 1.0, 2.0 + 1.0 + 2.0]
    )  # layer 1: 0.5, 2*(1/2), 4*(1/4); layer 2: 3*(2/3), 1, 5*(2/5)
    expected = (clipped + sigma_delta * math.sqrt(5) * torch.tensor([1.0, 0.0])) / 4
    torch.testing.assert_close(released, expected)
    estimates = [(1 - 1.5 + math.sqrt(2) * 2 * 0.5) / 4 + 0.5, (1 - 1.5 + math.sqrt(2) * 2 * -1.0) / 4 + 0.5]
    bounds = [c * math.exp(-0.5 * (b - 0.5)) for c, b in zip([1.0, 2.0], estimates, strict=True)]
    torch.testing.assert_close(new_state.clip_norms, torch.tensor(bounds))
    assert stats["clip_norm"] == pytest.approx(math.sqrt(5)) and new_state.clip_norm == pytest.approx(
        math.hypot(*bounds)
    )
    # the gradient (sensitivity S in units of its noise sigma_delta S) and the K counts (sensitivity sqrt(K)/2 in
    # units of their noise sqrt(K) sigma_b) compose to one Gaussian mechanism with noise multiplier sigma = 1
    assert math.hypot(1 / sigma_delta, (math.sqrt(2) / 2) / (math.sqrt(2) * 2.0)) == pytest.approx(1.0)


def test_a_non_finite_example_is_dropped_from_every_layer():
    rule = PerLayerClip(base=FixedClip(noise_multiplier=1.0, expected_batch_size=2), layer_sizes=[1, 1])
    clipped = rule.clipped_sum(torch.tensor([[0.1, float("nan")], [0.2, 0.3]]), None)
    torch.testing.assert_close(clipped.vector, torch.tensor([0.2, 0.3]))
    assert clipped.counts.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]


# --- the engine: sensitivity, noise and accounting measured -----------------------------------------------------


def private_linear(per_example: str, fan_out: int = 4, bounds=(0.3, 0.4), method: str = "fixed", **kwargs):
    """``nn.Linear(5, fan_out)`` made private at q = 1 (8 examples, batch size 8), a bound for weight and bias."""
    torch.manual_seed(0)
    model = nn.Linear(5, fan_out)
    dataset = TensorDataset(torch.randn(8, 5, generator=torch.Generator().manual_seed(1)))
    module, optimizer, _ = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset, batch_size=8),
        method=method,
        noise_multiplier=2.0,
        max_grad_norm=list(bounds),
        clipping="per_layer",
        seed=11,
        per_example=per_example,
        **kwargs,
    )
    return module, optimizer, dataset.tensors[0]


def step(module, optimizer, x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """One step on the loss ``mean_i <f(x_i), v_i>``: example i's gradient is ``(v_i x_i^T, v_i)``; the release."""
    optimizer.zero_grad()
    (module(x) * directions).sum().div(len(x)).backward()
    optimizer.step()
    return torch.cat([p.grad.flatten() for p in optimizer.params])


@pytest.mark.parametrize("method", ["fixed", "psac"])
@pytest.mark.parametrize("per_example", ["fast", "materialise"])
def test_the_engine_releases_with_sensitivity_sqrt_sum_of_squared_bounds_and_noise_sigma_times_it(per_example, method):
    """Neighbouring batches with the same noise differ by S / B; zero gradients release noise of std sigma S / B.

    S = sqrt(0.3^2 + 0.4^2) = 0.5, sigma = 2, B = 8.  The extra example's gradient is huge in both layers,
    so each is clipped to its bound (DP-PSAC: to within r / 1e8 of it).
    """
    directions = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    module, optimizer, x = private_linear(per_example, method=method)
    without = step(module, optimizer, x, directions)
    module, optimizer, x = private_linear(per_example, method=method)
    huge = torch.full((1, 4), 1e8)
    with_extra = step(module, optimizer, torch.cat([x, torch.ones(1, 5)]), torch.cat([directions, huge]))
    assert torch.linalg.vector_norm(with_extra - without).item() * 8 == pytest.approx(0.5, rel=1e-7)

    module, optimizer, x = private_linear(per_example, fan_out=4000, method=method)
    noise = step(module, optimizer, x, torch.zeros(8, 4000))  # every per-example gradient is 0: pure noise
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 8, rel=0.03)


def gaussian_delta(eps: float, mu: float) -> float:
    """delta(eps) of the Gaussian mechanism with ``mu = sensitivity / noise std`` (Balle & Wang 2018, Thm. 8)."""
    return float(ndtr(mu / 2 - eps / mu) - math.exp(eps + log_ndtr(-mu / 2 - eps / mu)))


@pytest.mark.parametrize("method", ["fixed", "psac"])
def test_epsilon_is_the_gaussian_mechanisms_at_mu_sqrt_steps_over_sigma(method):
    """At q = 1, T releases of sensitivity S with noise sigma S compose to one Gaussian with mu = sqrt(T) / sigma.

    mu per release is the measured S / (sigma S) = 1 / 2 (the test above); three releases give sqrt(3) / 2.
    """
    module, optimizer, x = private_linear("fast", method=method, accountant="pld")
    directions = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        step(module, optimizer, x, directions)
    mu, delta = math.sqrt(3) / 2.0, 1e-5
    exact = brentq(lambda eps: gaussian_delta(eps, mu) - delta, 0.0, 100.0, xtol=1e-12)
    assert optimizer.steps_taken == 3 and optimizer.get_epsilon(delta) == pytest.approx(exact, abs=1e-3)


# --- both paths against per-layer clipping written out ---------------------------------------------------------


class TextModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.conv = nn.Conv1d(4, 3, 2)
        self.head = nn.Linear(3, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.conv(self.embed(ids).transpose(1, 2))).mean(2))


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return [grads[k].reshape(len(x), -1) for k, _ in model.named_parameters()]


PARAMS = {"fixed": {}, "quantile": {"count_noise_std": 3.0}, "auto": {}, "psac": {"r": 0.2}}


@pytest.mark.parametrize("per_example", ["fast", "materialise"])
@pytest.mark.parametrize("method", per_layer_methods())
def test_both_paths_clip_each_layer_as_written_out(method, per_example):
    torch.manual_seed(0)
    model = TextModel()
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(2)
    ids, labels = torch.randint(0, 9, (6, 5), generator=generator), torch.randint(0, 3, (6,), generator=generator)
    bounds = [0.05, 0.02, 0.01, 0.03, 0.04] if method != "auto" else None
    module, optimizer, _ = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(ids, labels), batch_size=4),
        method=method,
        noise_multiplier=1.0,
        clipping="per_layer",
        per_example=per_example,
        **({"max_grad_norm": bounds} if bounds else {}),
        **PARAMS[method],
    )
    nn.functional.cross_entropy(module(ids), labels).backward()
    optimizer.step()
    layers = per_example_grads(reference, ids, labels)
    bounds = bounds or [1 / math.sqrt(5)] * 5
    r = {"auto": 0.01, "psac": 0.2}.get(method)
    expected = []
    for grads, bound in zip(layers, bounds, strict=True):
        norms = grads.norm(dim=1, keepdim=True)
        if method == "auto":
            weights = bound / (norms + r)
        elif method == "psac":
            weights = bound / (norms + r / (norms + r))
        else:
            weights = torch.clamp(bound / norms, max=1.0)
        expected.append((weights * grads).sum(0))
    torch.testing.assert_close(optimizer.last_clipped.vector, torch.cat(expected), rtol=1e-10, atol=1e-13)


def text_data(n: int = 40) -> TensorDataset:
    generator = torch.Generator().manual_seed(4)
    return TensorDataset(
        torch.randint(0, 9, (n, 5), generator=generator), torch.randint(0, 3, (n,), generator=generator)
    )


def train_per_layer(method: str, per_example: str, model: nn.Module, pieces: int = 1, **kwargs):
    """One epoch of per-layer clipping, each batch's backward pass split into ``pieces`` before one step."""
    module, optimizer, loader = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(text_data(), batch_size=8),
        method=method,
        noise_multiplier=0.7,
        seed=9,
        clipping="per_layer",
        per_example=per_example,
        **({} if method == "auto" else {"max_grad_norm": 0.1}),
        **PARAMS[method],
        **kwargs,
    )
    for x, y in loader:
        optimizer.zero_grad()
        for rows in torch.arange(len(y)).tensor_split(pieces):
            nn.functional.cross_entropy(module(x[rows]), y[rows]).backward()  # each piece its own mean
        optimizer.step()
    return optimizer, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("method", per_layer_methods())
def test_per_layer_training_is_the_same_on_both_paths_and_in_pieces(method):
    """Fast and materialised paths, and each batch's backward pass in three pieces, end at the same parameters."""
    torch.manual_seed(0)
    initial = TextModel()
    runs = [
        train_per_layer(method, "fast", copy.deepcopy(initial)),
        train_per_layer(method, "materialise", copy.deepcopy(initial)),
        train_per_layer(method, "fast", copy.deepcopy(initial), pieces=3),
    ]
    for optimizer, params in runs[1:]:
        torch.testing.assert_close(params, runs[0][1], rtol=1e-9, atol=1e-12)
        if method == "quantile":
            torch.testing.assert_close(optimizer.rule_state.clip_norms, runs[0][0].rule_state.clip_norms)
    if method == "quantile":  # the bounds moved, each layer its own way
        moved = runs[0][0].rule_state.clip_norms / torch.tensor(runs[0][0].rule.layer_bounds)
        assert len(set(moved.tolist())) == len(moved) and not torch.allclose(moved, torch.ones(5))


def test_a_per_layer_checkpoint_restores_the_bounds():
    torch.manual_seed(0)
    optimizer, _ = train_per_layer("quantile", "fast", TextModel())
    saved = optimizer.state_dict()
    torch.manual_seed(0)
    fresh, _ = train_per_layer("quantile", "fast", TextModel())
    fresh.rule_state = None
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh.rule_state.clip_norms, optimizer.rule_state.clip_norms)
    assert fresh.max_grad_norm == pytest.approx(optimizer.rule_state.clip_norm)


# --- Opacus's interface and the refusals -------------------------------------------------------------------------


def test_opacus_style_per_layer_port_trains():
    """Opacus: PrivacyEngine().make_private(..., clipping="per_layer", max_grad_norm=[one bound per parameter])."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    engine = PrivacyEngine()
    module, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(40, 5), torch.randint(0, 3, (40,))), batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=[1.0, 0.5, 1.0, 0.5],
        clipping="per_layer",
    )
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
    assert optimizer.max_grad_norm == pytest.approx(math.sqrt(2.5)) and engine.get_epsilon(1e-5) > 0
    optimizer.max_grad_norm = math.sqrt(2.5) / 2  # an Opacus clip scheduler: every bound halves
    assert optimizer.rule.layer_bounds == pytest.approx((0.5, 0.25, 0.5, 0.25))


def refusal(method: str = "fixed", model=None, **kwargs) -> str:
    model = model or nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    arguments = {"noise_multiplier": 1.0, "clipping": "per_layer", **kwargs}
    with pytest.raises(ValueError) as error:
        make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.randn(40, 5)), batch_size=8),
            method=method,
            **arguments,
        )
    assert "\n" not in str(error.value)
    return str(error.value)


def test_the_registry_offers_per_layer_clipping_for_the_four_rules_with_a_per_layer_weight():
    assert per_layer_methods() == ("fixed", "quantile", "auto", "psac")
    assert sorted(per_layer_refusals()) == ["adaclip", "adambc", "geoclip", "macadam"]


@pytest.mark.parametrize("method", sorted(per_layer_refusals()))
def test_the_other_methods_refuse_per_layer_clipping_with_the_reason(method):
    message = refusal(method)
    assert message.startswith(f"clipping='per_layer' is not offered for method {method!r}: ")
    assert per_layer_refusals()[method] in message and "clipping='flat'" in message


def test_bad_per_layer_bounds_are_named():
    assert (
        "max_grad_norm lists 3 per-layer bounds but the optimizer trains 4 parameters; give one bound per "
        "parameter, in this order: 0.weight, 0.bias, 2.weight, 2.bias" in refusal(max_grad_norm=[1.0, 1.0, 1.0])
    )
    assert "max_grad_norm[1] must be" in refusal(max_grad_norm=[1.0, -1.0, 1.0, 1.0])
    assert "max_grad_norm means nothing for method 'auto'" in refusal("auto", max_grad_norm=[1.0] * 4)
    assert "needs clipping='per_layer'" in refusal(max_grad_norm=[1.0] * 4, clipping="flat")
    frozen = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    frozen[0].requires_grad_(False)
    assert "in this order: 2.weight, 2.bias" in refusal(model=frozen, max_grad_norm=[1.0] * 4)


def test_the_total_bound_of_an_adaptive_per_layer_rule_cannot_be_scheduled():
    optimizer, _ = train_per_layer("quantile", "fast", TextModel())
    with pytest.raises(ValueError, match="cannot be set: only DP-SGD's and DP-PSAC's per-layer bounds are fixed"):
        optimizer.max_grad_norm = 1.0


# --- data-parallel steps --------------------------------------------------------------------------------------

WORLD = 2
STEPS = [list(range(16)), [1, 2, 3, 5, 8, 13, 14], [0, 2, 4]]  # the third leaves rank 1 an empty share


def distributed_steps(method: str, per_example: str, sigma: float, rank: int | None = None) -> list[torch.Tensor]:
    """Three per-layer steps on STEPS; ``rank=None``: one process on whole batches, else this rank's share."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    base = build_rule(method, noise_multiplier=sigma, expected_batch_size=8.0, **PARAMS[method])
    rule = PerLayerClip(base=base, layer_sizes=[20, 4, 12, 3], layer_bounds=[0.3, 0.1, 0.2, 0.05])
    module = BookkeepingGradSampleModule(model) if per_example == "fast" else LayoutGradSampleModule(model)
    optimizer = AdaptiveClipDPOptimizer(
        torch.optim.SGD(module.parameters(), lr=0.5),
        rule=rule,
        sample_rate=0.5,
        generator=torch.Generator().manual_seed(7),
        per_example=per_example,
        distributed=rank is not None,
        check_replicas=rank is not None,
    )
    generator = torch.Generator().manual_seed(1)
    features, labels = torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    params = []
    for batch in STEPS:
        local = batch if rank is None else batch[rank::WORLD]
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(features[local]), labels[local]).backward()
        optimizer.step()
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return params


def distributed_worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for method in ("fixed", "quantile"):
            for per_example in ("fast", "materialise"):
                for sigma in (0.0, 1.0):
                    single = distributed_steps(method, per_example, sigma)
                    split = distributed_steps(method, per_example, sigma, rank)
                    for expected, actual in zip(single, split, strict=True):
                        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_a_data_parallel_per_layer_step_equals_the_single_process_step(tmp_path):
    """2 gloo ranks with half the examples each give the single-process parameters after each of 3 steps
    (DP-SGD and quantile clipping per layer, both paths, without and with noise of the same seed)."""
    mp.spawn(distributed_worker, args=(str(tmp_path / "process_group"),), nprocs=WORLD, join=True)
