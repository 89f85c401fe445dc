"""The fast per-example path: book-keeping norms and sums against explicit per-example gradients.

Every comparison is in float64, against per-example gradients computed independently (``torch.func``
or explicit outer products) or against the materialised path (Opacus's per-layer gradients and
``rule.step`` on the ``[n, d]`` matrix) with the same seed, so the same noise.
"""

import copy
import dataclasses
import math

import pytest
import torch
from tensor_sizes import LargestTensor
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from adaclip.engine import AdaptiveClipDPOptimizer, make_private
from adaclip.engine import per_example as per_example_module
from adaclip.engine.bookkeeping import BookkeepingGradSampleModule, LayoutGradSampleModule
from adaclip.engine.per_example import (
    LinearBiasPart,
    LinearFactors,
    LinearWeightPart,
    MaterialisedPart,
    Transform,
    collect_parts,
    per_example_norms,
    weighted_sum,
)
from adaclip.methods import METHODS, ClippedSum, ClipRule, FixedClip, clip_factors, supports_norm_path

pytestmark = pytest.mark.usefixtures("float64_by_default")


# --- models covering every kind of layer the fast path sees -------------------------------------


class LinearUsedTwice(nn.Module):
    """One ``nn.Linear`` applied twice per example: its gradient sums over both uses."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class SequenceModel(nn.Module):
    """A linear layer over 4 positions per example (``[n, 4, in]`` input; Gram form of the norm)."""

    def __init__(self, positions: int = 4) -> None:
        super().__init__()
        self.positions = positions
        self.token = nn.Linear(6, 5)
        self.head = nn.Linear(5 * positions, 3)

    def forward(self, x):
        tokens = torch.stack([x * (k + 1) / self.positions - k for k in range(self.positions)], dim=1)
        return self.head(torch.tanh(self.token(tokens)).flatten(1))


class ConvModel(nn.Module):
    """Conv2d and GroupNorm (materialised per layer) feeding linear layers (book-keeping)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 2 * 2, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x.view(-1, 1, 6, 1).expand(-1, 1, 6, 6)))))


class ConvVariants(nn.Module):
    """Padding, dilation, groups, no bias, a convolution used twice, and 'same' padding (left to Opacus's hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(1, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.same = nn.Conv2d(4, 2, 3, padding="same")
        self.head = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        image = x.view(-1, 1, 6, 1) * x.view(-1, 1, 1, 6) / 3
        hidden = torch.tanh(self.shared(image) + self.shared(image.flip(3)))
        return self.head(torch.tanh(self.same(torch.tanh(self.grouped(hidden)))).flatten(1))


class EmbeddingModel(nn.Module):
    """Embedding (book-keeping) and LayerNorm (materialised per layer) with a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6 + 4, 3)

    def forward(self, x):
        tokens = (x[:, 0].abs() * 3).long().clamp(max=9)
        return self.head(torch.cat([self.norm(x), self.embed(tokens)], dim=1))


class TiedLinear(nn.Module):
    """Two linear layers sharing a weight: the shared layers stay with Opacus's hooks, the head is book-keeping."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)
        self.second.weight = self.first.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


MODELS = {
    "mlp": lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)),
    "linear_used_twice": LinearUsedTwice,
    "sequence": SequenceModel,
    "conv_groupnorm": ConvModel,
    "conv_variants": ConvVariants,
    "embedding_layernorm": EmbeddingModel,
    "tied_weights": TiedLinear,
    "frozen_bias": lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)),
}
RULE_PARAMS = {
    "fixed": {"clip_norm": 0.5},
    "quantile": {"count_noise_std": 2.0, "initial_clip": 0.5},
    "auto": {},
    "adaclip": {"initial_clip": 0.5, "h2": 1.0},
}


def data(n: int = 40, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(3 * torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator))


def train_steps(model, per_example: str, method: str, steps: int = 4, loss_reduction: str = "mean", **params):
    dataset = data()
    module, optimizer, _ = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
        data_loader=DataLoader(dataset, batch_size=10),
        method=method,
        noise_multiplier=0.5,
        delta=1e-5,
        seed=3,
        per_example=per_example,
        loss_reduction=loss_reduction,
        **{**RULE_PARAMS.get(method, {}), **params},
    )
    features, labels = dataset.tensors
    stats = []
    for step in range(steps):
        rows = slice(
            7 * step, 7 * step + 7 + step
        )  # realised batch sizes differ from B = 10, as under Poisson sampling
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(features[rows]), labels[rows], reduction=loss_reduction).backward()
        optimizer.step()
        stats.append(optimizer.last_stats)
    return module, optimizer, torch.cat([p.detach().flatten() for p in model.parameters()]), stats


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fast_path_equals_the_materialised_path(method, model_name):
    torch.manual_seed(0)
    initial = MODELS[model_name]()
    fast_module, fast_optimizer, fast_params, fast_stats = train_steps(copy.deepcopy(initial), "fast", method)
    slow_module, slow_optimizer, slow_params, slow_stats = train_steps(copy.deepcopy(initial), "materialise", method)
    fast = supports_norm_path(fast_optimizer.rule)  # rules without the norm interface stay materialised
    assert (type(fast_module) is BookkeepingGradSampleModule) is fast and type(slow_module) is LayoutGradSampleModule
    assert fast_optimizer.uses_norm_path is fast and not slow_optimizer.uses_norm_path
    torch.testing.assert_close(fast_params, slow_params, rtol=1e-10, atol=1e-12)
    for fast, slow in zip(fast_stats, slow_stats, strict=True):
        assert fast.keys() == slow.keys()
        for key in fast:  # rel 1e-6: step() averages clipped_fraction in float32
            assert fast[key] == pytest.approx(slow[key], rel=1e-6, abs=1e-12), key
    if method == "adaclip":
        for field in ("mean", "variance", "scale"):
            torch.testing.assert_close(
                getattr(fast_optimizer.rule_state, field),
                getattr(slow_optimizer.rule_state, field),
                rtol=1e-9,
                atol=1e-12,
            )
    elif method == "quantile":
        assert fast_optimizer.rule_state.clip_norm == pytest.approx(slow_optimizer.rule_state.clip_norm, rel=1e-12)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fast_path_equals_the_materialised_path_with_sum_reduction(method):
    torch.manual_seed(0)
    initial = MODELS["conv_groupnorm"]()
    fast = train_steps(copy.deepcopy(initial), "fast", method, loss_reduction="sum")[2]
    slow = train_steps(copy.deepcopy(initial), "materialise", method, loss_reduction="sum")[2]
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


VARIANTS = [
    ("adaclip", {"estimator": "paper"}),
    ("adaclip", {"estimator": "per_example"}),
    ("adaclip", {"estimator": "bias_free"}),
    ("adaclip", {"estimator": "quantile_scale", "count_noise_std": 0.5}),
    ("geoclip", {"rank": 2}),
    ("geoclip", {"rank": 3, "noise_correction": True, "variance_target": "batch_mean"}),
    ("macadam", {}),
    ("adambc", {}),
]


def flat_state(state) -> dict:
    """Every field of a rule state (tensors flattened, numbers as they are)."""
    return {} if state is None else {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


@pytest.mark.parametrize("model_name", ["mlp", "conv_groupnorm", "sequence"])
@pytest.mark.parametrize("method, params", VARIANTS, ids=[f"{m}-{'-'.join(map(str, p.values()))}" for m, p in VARIANTS])
def test_every_rule_variant_takes_the_fast_path_and_equals_the_materialised_path(method, params, model_name):
    """AdaCliP's estimators (incl. the quantile scale), GeoClip's rank-k form, DP-MacAdam and DP-AdamBC, float64."""
    torch.manual_seed(0)
    initial = MODELS[model_name]()
    fast_module, fast_optimizer, fast_params, fast_stats = train_steps(copy.deepcopy(initial), "fast", method, **params)
    _, slow_optimizer, slow_params, slow_stats = train_steps(copy.deepcopy(initial), "materialise", method, **params)
    assert fast_optimizer.uses_norm_path and type(fast_module) is BookkeepingGradSampleModule
    assert not slow_optimizer.uses_norm_path
    torch.testing.assert_close(fast_params, slow_params, rtol=1e-10, atol=1e-12)
    for fast, slow in zip(fast_stats, slow_stats, strict=True):
        assert fast.keys() == slow.keys()
        for key in fast:
            assert fast[key] == pytest.approx(slow[key], rel=1e-6, abs=1e-12), key
    fast_state, slow_state = flat_state(fast_optimizer.rule_state), flat_state(slow_optimizer.rule_state)
    assert fast_state.keys() == slow_state.keys() and fast_state
    for name, value in fast_state.items():
        if isinstance(value, torch.Tensor):
            if name == "basis":  # eigenvectors are defined up to sign
                value, other = value.abs(), slow_state[name].abs()
            else:
                other = slow_state[name]
            torch.testing.assert_close(value, other, rtol=1e-9, atol=1e-12, msg=name)
        else:
            assert value == pytest.approx(slow_state[name], rel=1e-12), name


def test_which_layers_are_bookkeeping():
    variants, tied = ConvVariants(), TiedLinear()
    assert BookkeepingGradSampleModule(variants).bookkeeping_layers() == [
        variants.shared,
        variants.grouped,
        variants.head,
    ]
    assert BookkeepingGradSampleModule(tied).bookkeeping_layers() == [tied.head]


# --- the parts against explicit per-example gradients --------------------------------------------


def explicit_linear_grads(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """g_i = sum_p delta_ip x_ip^T, flattened: an explicit loop over examples and positions."""
    rows = []
    for i in range(x.shape[0]):
        g = sum(torch.outer(delta[i, p], x[i, p]) for p in range(x.shape[1]))
        rows.append(g.flatten())
    return torch.stack(rows)


@pytest.mark.parametrize("positions, fan_in, fan_out", [(1, 7, 3), (1, 3, 7), (3, 8, 6), (5, 2, 3)])
def test_linear_weight_part_against_explicit_gradients(positions, fan_in, fan_out):
    """(3, 8, 6) takes the Gram form, (5, 2, 3) materialises; one position uses the closed forms."""
    generator = torch.Generator().manual_seed(positions + fan_in)
    n = 9
    weight = nn.Parameter(torch.zeros(fan_out, fan_in))
    x = torch.randn(n, positions, fan_in, generator=generator)
    delta = torch.randn(n, positions, fan_out, generator=generator)
    part = LinearWeightPart(weight, 2, LinearFactors(x, delta))
    grads = explicit_linear_grads(x, delta)
    d = 2 + weight.numel() + 1
    shift = torch.randn(d, generator=generator)
    scale = torch.rand(d, generator=generator) + 0.1
    torch.testing.assert_close(part.squared_norms(), grads.square().sum(1))
    span = slice(2, 2 + weight.numel())
    expected = ((grads - shift[span]) / scale[span]).square().sum(1)
    torch.testing.assert_close(part.transformed_squared_norms(Transform.of(shift, scale)), expected)
    weights = torch.rand(n, generator=generator)
    out = torch.empty(fan_out, fan_in)
    part.weighted_sum_into(weights, out)
    torch.testing.assert_close(out.flatten(), weights @ grads)
    torch.testing.assert_close(part.materialise(), grads)


def test_transformed_norm_by_hand():
    """x = (1, 2), delta = (3): g = (3, 6); a = (1, 1), b = (2, 5): ((3-1)/2)^2 + ((6-1)/5)^2 = 2."""
    weight = nn.Parameter(torch.zeros(1, 2))
    part = LinearWeightPart(weight, 0, LinearFactors(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])))
    value = part.transformed_squared_norms(Transform.of(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 5.0])))
    assert value.item() == pytest.approx(2.0, rel=1e-15)
    assert part.squared_norms().item() == pytest.approx(45.0, rel=1e-15)


@pytest.mark.parametrize("scale_value, expect_float64", [(1e-3, True), (300.0, False)])
def test_float32_transformed_norms_stay_accurate_under_cancellation(monkeypatch, scale_value, expect_float64):
    """The shift equals example 0's gradient: the three float32 terms (about 1e12 each with scale 1e-3) cancel.

    The result must still match a float64 computation to the tolerance (relative to max(value, 1)),
    by recomputing in float64 where the error estimate says float32 is not enough, and only there.
    """
    torch.set_default_dtype(torch.float32)
    generator = torch.Generator().manual_seed(0)
    x, delta = torch.randn(50, 30, generator=generator) * 10, torch.randn(50, 20, generator=generator) * 10
    weight = nn.Parameter(torch.zeros(20, 30))
    shift = torch.outer(delta[0], x[0]).flatten() + 0.5 * torch.randn(600, generator=generator)
    scale = torch.full((600,), scale_value) * (1 + torch.rand(600, generator=generator))
    grads = torch.einsum("no,ni->noi", delta.double(), x.double()).flatten(1)
    reference = ((grads - shift.double()) / scale.double()).square().sum(1)

    recomputed = []
    original = per_example_module._needs_float64
    monkeypatch.setattr(
        per_example_module, "_needs_float64", lambda *a, **k: recomputed.append(original(*a, **k)) or recomputed[-1]
    )
    squared = LinearWeightPart(weight, 0, LinearFactors(x, delta)).transformed_squared_norms(Transform.of(shift, scale))
    assert squared.dtype == torch.float32 and recomputed == [expect_float64]
    tolerance = per_example_module.NORM_ERROR_TOLERANCE * reference.clamp_min(1.0)
    assert torch.all((squared.double() - reference).abs() <= tolerance)


def per_example_grads_by_torch_func(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[n, d] per-example gradients of the per-example cross-entropy, computed independently of Opacus."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return nn.functional.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, features, labels)
    return torch.cat([grads[k].reshape(len(features), -1) for k, _ in model.named_parameters()], dim=1)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_norms_and_weighted_sums_match_torch_func(model_name):
    torch.manual_seed(1)
    model = MODELS[model_name]()
    reference = per_example_grads_by_torch_func(model, *data(12).tensors)
    module = BookkeepingGradSampleModule(model)
    features, labels = data(12).tensors
    nn.functional.cross_entropy(module(features), labels).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    parts = collect_parts(params)
    torch.testing.assert_close(per_example_norms(parts), reference.norm(dim=1))
    weights = torch.rand(12)
    torch.testing.assert_close(weighted_sum(parts, weights, reference.shape[1]), weights @ reference)
    shift, scale = torch.randn(reference.shape[1]), torch.rand(reference.shape[1]) + 0.5
    torch.testing.assert_close(
        per_example_norms(parts, Transform.of(shift, scale)), ((reference - shift) / scale).norm(dim=1)
    )
    bookkeeping = module.bookkeeping_layers()
    linear_weights = {id(m.weight) for m in bookkeeping if type(m) is nn.Linear}
    linear_biases = {id(m.bias) for m in bookkeeping if type(m) is nn.Linear and m.bias is not None}
    assert all(isinstance(part, LinearWeightPart) == (id(part.param) in linear_weights) for part in parts)
    assert all(isinstance(part, LinearBiasPart) == (id(part.param) in linear_biases) for part in parts)
    for layer in bookkeeping:  # per-example gradients never stored, weight gradients never computed by autograd
        assert all(p.grad_sample is None and p.grad is None for p in layer.parameters())


# --- what the fast path never does ---------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fast_path_never_forms_a_per_example_gradient_of_a_linear_layer(method):
    """MLP 64-48-10 at n = 32: the first layer's per-example gradients are [32, 48 * 64] = 98,304 numbers.

    GeoClip runs its rank-4 variant, whose state holds a ``[d, 4]`` basis (the full matrix is ``d x d``).
    """
    n, largest = 32, {}
    rank = 4
    params = {"quantile": {"count_noise_std": 2.0}, "geoclip": {"rank": rank}}.get(method, {})
    for per_example in ("fast", "materialise"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
        features, labels = torch.randn(n, 64), torch.randint(0, 10, (n,))
        module, optimizer, _ = make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(features, labels), batch_size=n // 4),
            method=method,
            noise_multiplier=1.0,
            delta=1e-5,
            per_example=per_example,
            **params,
        )
        assert supports_norm_path(optimizer.rule)  # every registered method has the fast path
        for _ in range(2):  # the second step has a non-trivial AdaCliP state
            with LargestTensor() as tracker:
                optimizer.zero_grad()
                nn.functional.cross_entropy(module(features), labels).backward()
                optimizer.step()
        largest[per_example] = tracker.largest
    dim = 64 * 48 + 48 + 48 * 10 + 10
    assert largest["materialise"] >= n * 48 * 64  # the check can fail: the materialised path forms it
    # inputs, or parameter-sized vectors (and the quantile count draw); GeoClip's basis and its extension by one
    assert largest["fast"] <= (dim * (rank + 1) if method == "geoclip" else max(n * 64, dim + 1))


# --- rules with and without the norm interface ---------------------------------------------------


class PsacLike(ClipRule):
    """A user-written norm-only rule: its own ``clipped_sum`` on ``[n, d]`` plus one method.

    The method is DP-PSAC's weight (Xia et al. 2023); the release is the default one.
    """

    def __init__(
        self, *, clip_norm: float, noise_multiplier: float, expected_batch_size: float, r: float = 0.1
    ) -> None:
        self.clip_norm, self.noise_multiplier, self.expected_batch_size, self.r = (
            clip_norm,
            noise_multiplier,
            expected_batch_size,
            r,
        )

    def _weights(self, norms):
        return self.clip_norm / (norms + self.r / (norms + self.r))

    def clipped_sum(self, per_example_grads, state):
        weights = self._weights(per_example_grads.norm(dim=1))
        return ClippedSum.of((weights.unsqueeze(1) * per_example_grads).sum(0), weights)

    def example_weights(self, norms, state):
        return self._weights(norms)


class StepOnly(PsacLike):
    example_weights = ClipRule.example_weights  # no norm interface


@pytest.mark.parametrize("rule_class, fast", [(PsacLike, True), (StepOnly, False)])
def test_norm_interface_is_opt_in_and_rules_without_it_stay_materialised(monkeypatch, rule_class, fast):
    monkeypatch.setitem(METHODS, "psac_like", dataclasses.replace(METHODS["psac"], rule=rule_class))
    assert supports_norm_path(rule_class(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=10)) is fast
    torch.manual_seed(0)
    initial = MODELS["conv_groupnorm"]()
    module, optimizer, params, stats = train_steps(copy.deepcopy(initial), "fast", "psac_like", clip_norm=0.3)
    assert (type(module) is BookkeepingGradSampleModule) is fast and optimizer.uses_norm_path is fast
    reference_params, reference_stats = train_steps(copy.deepcopy(initial), "materialise", "psac_like", clip_norm=0.3)[
        2:
    ]
    torch.testing.assert_close(params, reference_params, rtol=1e-10, atol=1e-12)
    assert stats[-1] == pytest.approx(reference_stats[-1])


def test_bookkeeping_module_with_a_step_only_rule_materialises_from_the_captures(monkeypatch):
    """A user may wrap the module themselves: the optimizer then forms [n, d] from the captured factors."""
    monkeypatch.setitem(METHODS, "step_only", dataclasses.replace(METHODS["psac"], rule=StepOnly))
    torch.manual_seed(0)
    initial = MODELS["sequence"]()
    wrapped = BookkeepingGradSampleModule(copy.deepcopy(initial))
    module, optimizer, params, _ = train_steps(wrapped, "fast", "step_only", clip_norm=0.3)
    assert module is wrapped and not optimizer.uses_norm_path
    reference = train_steps(copy.deepcopy(initial), "materialise", "step_only", clip_norm=0.3)[2]
    torch.testing.assert_close(params, reference, rtol=1e-10, atol=1e-12)


def test_clip_factors_match_the_materialised_clipping():
    norms = torch.tensor([0.0, 0.5, 1.0, 2.0, 1e-300])
    torch.testing.assert_close(clip_factors(norms, 1.0), torch.tensor([1.0, 1.0, 1.0, 0.5, 1.0]))


# --- misuse is named -------------------------------------------------------------------------------


def private_mlp(per_example: str = "fast"):
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    return make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data(), batch_size=10),
        method="fixed",
        noise_multiplier=1.0,
        delta=1e-5,
        per_example=per_example,
    )


def test_two_backward_passes_without_the_module_attached_are_rejected():
    """An optimizer built by hand does not see forward passes: pending passes are named, with the fix."""
    torch.manual_seed(0)
    module = BookkeepingGradSampleModule(MODELS["mlp"]())
    optimizer = AdaptiveClipDPOptimizer(
        torch.optim.SGD(module.parameters(), lr=0.1),
        rule=FixedClip(noise_multiplier=1.0, expected_batch_size=10),
        sample_rate=0.1,
    )
    features, labels = data().tensors
    for _ in range(2):
        nn.functional.cross_entropy(module(features[:10]), labels[:10]).backward()
    with pytest.raises(RuntimeError, match=r"2 backward passes .*attach_module"):
        optimizer.step()
    optimizer.zero_grad()  # clears the captures: a fresh step works
    nn.functional.cross_entropy(module(features[:10]), labels[:10]).backward()
    optimizer.step()


def test_step_without_backward_is_named():
    _, optimizer, _ = private_mlp()
    with pytest.raises(RuntimeError, match="no per-example gradient"):
        optimizer.step()


def test_unknown_per_example_path_is_named():
    with pytest.raises(ValueError, match="per_example"):
        private_mlp("vectorised")


def test_evaluation_without_grad_records_nothing():
    module, optimizer, _ = private_mlp()
    features, labels = data().tensors
    with torch.no_grad():
        module(features)
    module.eval()
    module(features)
    module.train()
    nn.functional.cross_entropy(module(features[:10]), labels[:10]).backward()
    optimizer.step()
    assert math.isfinite(optimizer.last_stats["clipped_fraction"])


def test_materialised_part_is_the_per_layer_gradient():
    param = nn.Parameter(torch.zeros(2, 3))
    grads = torch.randn(4, 2, 3)
    part = MaterialisedPart(param, 0, grads)
    torch.testing.assert_close(part.squared_norms(), grads.flatten(1).square().sum(1))
    out = torch.empty(2, 3)
    weights = torch.rand(4)
    part.weighted_sum_into(weights, out)
    torch.testing.assert_close(out, torch.einsum("n,nij->ij", weights, grads))
