"""The model matrix: the models Opacus users train, on both per-example paths, in float64.

For every model: the per-example gradient norms and a weighted sum ``sum_i c_i g_i`` of one batch, from
the fast path's parts and from the materialised path's, equal those of gradients computed one example at
a time by plain autograd on an unwrapped copy of the model (independent of Opacus and of book-keeping);
and a few private steps on each path, with the same seed (so the same batches and noise), end at the same
parameters.  Then the errors: a layer the forward pass skips, a wrong layout and a module that cannot give
per-example gradients are reported by name, with the fix for that problem.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from opacus.layers import DPLSTM, DPMultiheadAttention
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip.engine import make_private
from adaclip.engine.bookkeeping import BookkeepingGradSampleModule, LayoutGradSampleModule
from adaclip.engine.per_example import EmbeddingPart, LinearWeightPart, collect_parts, per_example_norms, weighted_sum
from adaclip.research.models import tanh_cnn

pytestmark = pytest.mark.usefixtures("float64_by_default")

CLASSES = 3


# --- the models -----------------------------------------------------------------------------------------


class TextModel(nn.Module):
    """Embedding (padding index 0) and LayerNorm, averaged over positions, with a linear head."""

    def __init__(self, vocabulary: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)).mean(1))


class LSTMModel(nn.Module):
    """Embedding, Opacus's DPLSTM and a head on the last output.

    ``batch_first=False``: ids ``[T, B]``, a sequence-first DPLSTM, and the head on every position's
    output ``[T, B, 6]`` before the last is taken (every layer of a sequence-first model sees ``[T, B, ...]``).
    """

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(11, 5)
        self.lstm = DPLSTM(5, 6, batch_first=batch_first)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, ids):
        outputs = self.lstm(self.embed(ids))[0]
        return self.head(outputs[:, -1]) if self.batch_first else self.head(outputs)[-1]


class PreLNTransformer(nn.Module):
    """A pre-LN transformer block with Opacus's DPMultiheadAttention and a per-position head, averaged.

    ``attention_batch_first`` is the attention's own layout; ``model_batch_first`` the model's inputs
    (``[B, T, F]`` or ``[T, B, F]``).  When they differ the block transposes around the attention.
    """

    def __init__(self, *, attention_batch_first: bool, model_batch_first: bool = True, dim: int = 8) -> None:
        super().__init__()
        self.model_batch_first = model_batch_first
        self.embed = nn.Linear(4, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = DPMultiheadAttention(dim, 2, batch_first=attention_batch_first)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
        self.ln3 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x):
        h = self.embed(x)
        a = self.ln1(h)
        if self.attn.batch_first == self.model_batch_first:
            h = h + self.attn(a, a, a, need_weights=False)[0]
        else:
            a = a.transpose(0, 1)
            h = h + self.attn(a, a, a, need_weights=False)[0].transpose(0, 1)
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln3(h)).mean(1 if self.model_batch_first else 0)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``up(down(x)) * alpha / rank`` (Hu et al. 2021)."""

    def __init__(self, fan_in: int, fan_out: int, rank: int = 2, alpha: float = 4.0) -> None:
        super().__init__()
        self.base = nn.Linear(fan_in, fan_out).requires_grad_(False)
        self.down = nn.Linear(fan_in, rank, bias=False)
        self.up = nn.Linear(rank, fan_out, bias=False)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


class LoRAModel(nn.Module):
    """Two LoRA layers over a frozen base (and a frozen LayerNorm between them)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = LoRALinear(6, 8)
        self.norm = nn.LayerNorm(8).requires_grad_(False)
        self.second = LoRALinear(8, CLASSES)

    def forward(self, x):
        return self.second(torch.tanh(self.norm(self.first(x))))


def groupnorm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, CLASSES),
    )


class GroupNormResidual(nn.Module):
    """A ResNet-style block with GroupNorm: stem, conv-GN-ReLU-conv-GN plus the skip, pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1, bias=False),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False),
            nn.GroupNorm(2, 4),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(h + self.block(h)))


def tokens(generator: torch.Generator, n: int) -> torch.Tensor:
    """Ids in [0, 6) over 7 positions: tokens repeat within an example, and 0 (padding) appears."""
    return torch.randint(0, 6, (n, 7), generator=generator)


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, int], torch.Tensor]
    batch_first: bool = True


CASES = {
    "mlp": Case(
        lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, CLASSES)),
        lambda g, n: torch.randn(n, 6, generator=g),
    ),
    "tanh_cnn": Case(lambda: tanh_cnn(CLASSES), lambda g, n: torch.randn(n, 1, 28, 28, generator=g)),
    "embedding_layernorm": Case(TextModel, tokens),
    "dplstm": Case(LSTMModel, tokens),
    "dplstm_sequence_first_model": Case(lambda: LSTMModel(batch_first=False), tokens, batch_first=False),
    "transformer_attention_batch_first": Case(
        lambda: PreLNTransformer(attention_batch_first=True), lambda g, n: torch.randn(n, 5, 4, generator=g)
    ),
    "transformer_attention_sequence_first": Case(
        lambda: PreLNTransformer(attention_batch_first=False), lambda g, n: torch.randn(n, 5, 4, generator=g)
    ),
    "transformer_sequence_first_model": Case(
        lambda: PreLNTransformer(attention_batch_first=False, model_batch_first=False),
        lambda g, n: torch.randn(n, 5, 4, generator=g),
        batch_first=False,
    ),
    "lora_frozen_base": Case(LoRAModel, lambda g, n: torch.randn(n, 6, generator=g)),
    "groupnorm_cnn": Case(groupnorm_cnn, lambda g, n: torch.randn(n, 1, 8, 8, generator=g)),
    "groupnorm_residual": Case(GroupNormResidual, lambda g, n: torch.randn(n, 1, 8, 8, generator=g)),
}


def dataset(case: Case, n: int = 36) -> TensorDataset:
    generator = torch.Generator().manual_seed(5)
    return TensorDataset(case.inputs(generator, n), torch.randint(0, CLASSES, (n,), generator=generator))


def model_input(case: Case, x: torch.Tensor) -> torch.Tensor:
    """The loader's batch ``[B, ...]`` as the model takes it (``[T, B, ...]`` for a sequence-first model)."""
    return x if case.batch_first else x.transpose(0, 1)


def private(case: Case, model: nn.Module, per_example: str, method: str = "fixed", **params):
    return make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(dataset(case), batch_size=9),
        method=method,
        noise_multiplier=0.3,
        seed=7,
        per_example=per_example,
        batch_first=case.batch_first,
        **params,
    )


def reference_grads(case: Case, model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[n, d]``: each example's gradient by plain autograd on the unwrapped model, one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for x, y in zip(features, labels, strict=True):
        loss = nn.functional.cross_entropy(model(model_input(case, x.unsqueeze(0))), y.unsqueeze(0))
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


# --- every model on both paths --------------------------------------------------------------------------


@pytest.mark.parametrize("per_example", ["fast", "materialise"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_per_example_norms_and_sums_equal_plain_autograd_one_example_at_a_time(name, per_example):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    reference_model = copy.deepcopy(model)
    module, optimizer, _ = private(case, model, per_example)
    assert isinstance(module, BookkeepingGradSampleModule if per_example == "fast" else LayoutGradSampleModule)
    features, labels = dataset(case).tensors
    features, labels = features[:9], labels[:9]
    nn.functional.cross_entropy(module(model_input(case, features)), labels).backward()
    parts = collect_parts(optimizer.params)
    expected = reference_grads(case, reference_model, features, labels)
    torch.testing.assert_close(per_example_norms(parts), expected.norm(dim=1), rtol=1e-10, atol=1e-12)
    weights = torch.linspace(0.2, 1.5, len(labels))
    dim = expected.shape[1]
    torch.testing.assert_close(weighted_sum(parts, weights, dim), weights @ expected, rtol=1e-10, atol=1e-12)
    if per_example == "fast" and name.startswith(("embedding_layernorm", "dplstm")):
        assert any(isinstance(part, EmbeddingPart) for part in parts)  # never [n, vocabulary x dim]
    if per_example == "fast" and name.startswith("transformer"):
        assert sum(isinstance(part, LinearWeightPart) for part in parts) == 8  # embed, q, k, v, out, mlp x2, head


@pytest.mark.parametrize("method, params", [("fixed", {"clip_norm": 0.5}), ("adaclip", {"initial_clip": 0.5})])
@pytest.mark.parametrize("name", sorted(CASES))
def test_training_on_the_fast_path_equals_the_materialised_path(name, method, params):
    case = CASES[name]
    torch.manual_seed(0)
    initial = case.build()
    results = []
    for per_example in ("fast", "materialise"):
        model = copy.deepcopy(initial)
        module, optimizer, loader = private(case, model, per_example, method, **params)
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(model_input(case, x)), y).backward()
            optimizer.step()
        assert optimizer.steps_taken == 4
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(results[0], torch.cat([p.detach().flatten() for p in initial.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-12)


def test_the_padding_row_gets_no_gradient_on_either_path():
    """torch's backward gives ``padding_idx`` no gradient (Opacus's embedding hook alone would give it one).

    The clipped sum's padding row is exactly 0 (the release adds noise to every coordinate, as Opacus does).
    """
    case = CASES["embedding_layernorm"]
    for per_example in ("fast", "materialise"):
        torch.manual_seed(0)
        model = case.build()
        module, optimizer, loader = private(case, model, per_example)
        x, y = next(iter(loader))
        assert (x == 0).any()
        nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
        rows = optimizer.last_clipped.vector[: model.embed.weight.numel()].view_as(model.embed.weight)
        assert torch.count_nonzero(rows[0]) == 0 and torch.count_nonzero(rows[1]) == model.embed.embedding_dim


# --- errors that name the layer and the fix -----------------------------------------------------------------


class SkipsALayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(6, CLASSES)
        self.unused = nn.Linear(6, CLASSES)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("per_example", ["fast", "materialise"])
def test_a_layer_the_forward_pass_skips_is_named(per_example):
    case = CASES["mlp"]
    model = SkipsALayer()
    module, optimizer, loader = private(case, model, per_example)
    x, y = next(iter(loader))
    nn.functional.cross_entropy(module(x), y).backward()
    with pytest.raises(
        RuntimeError, match=r"parameters unused\.weight, unused\.bias got no per-example gradient"
    ) as error:
        optimizer.step()
    assert "requires_grad_(False)" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("per_example", ["fast", "materialise"])
def test_a_sequence_first_model_run_as_batch_first_names_the_layers_that_disagree(per_example):
    case = CASES["transformer_sequence_first_model"]
    torch.manual_seed(0)
    module, optimizer, loader = private(Case(case.build, case.inputs), case.build(), per_example)
    x, y = next(iter(loader))
    nn.functional.cross_entropy(module(x.transpose(0, 1)), y).backward()  # [T, B, F] with batch_first=True
    with pytest.raises(
        RuntimeError, match=r"different batch sizes \(5 for embed\.weight.*attn\.qlinear\.weight"
    ) as error:
        optimizer.step()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("per_example", ["fast", "materialise"])
def test_a_layer_after_pooling_in_a_sequence_first_model_is_named(per_example):
    class PooledHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode, self.head = nn.Linear(4, 5), nn.Linear(5, CLASSES)

        def forward(self, x):  # [T, B, F] -> [B, 5] -> head
            return self.head(torch.tanh(self.encode(x)).mean(0))

    case = Case(PooledHead, lambda g, n: torch.randn(n, 5, 4, generator=g), batch_first=False)
    module, _, loader = private(case, PooledHead(), per_example)
    x, _ = next(iter(loader))
    with pytest.raises(ValueError, match=r"layer 'head' \(Linear\) reads its examples from dimension 1"):
        module(x.transpose(0, 1))


@pytest.mark.parametrize(
    "model, match, absent",
    [
        (
            nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
            r"^module cannot give .*: 1 \(BatchNorm1d\) normalises .*GroupNorm",
            "DPLSTM",
        ),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False)), r"1 \(BatchNorm1d\) normalises", "DPLSTM"),
        (
            nn.LSTM(4, 4),
            r"module \(LSTM\) computes its gradient .*opacus\.layers\.DPLSTM.*ModuleValidator\.fix",
            "BatchNorm",
        ),
        (nn.GRU(4, 4), r"opacus\.layers\.DPGRU", "BatchNorm"),
        (nn.RNN(4, 4), r"opacus\.layers\.DPRNN, the same interface$", "BatchNorm"),
        (nn.MultiheadAttention(8, 2), r"opacus\.layers\.DPMultiheadAttention", "BatchNorm"),
        (nn.TransformerEncoderLayer(8, 2, 16), r"self_attn \(MultiheadAttention\) .*DPMultiheadAttention", "BatchNorm"),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, track_running_stats=True)),
            r"1 \(InstanceNorm2d\) tracks running statistics",
            "DPLSTM",
        ),
        (nn.Linear(4, 2).eval(), r"training mode", "BatchNorm"),
    ],
)
def test_a_module_that_cannot_give_per_example_gradients_gets_advice_for_its_problem(model, match, absent):
    with pytest.raises(ValueError, match=match) as error:
        make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.randn(20, 4)), batch_size=5),
            noise_multiplier=1.0,
        )
    assert absent not in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("model", [nn.LSTM(4, 4), nn.MultiheadAttention(8, 2), nn.TransformerEncoderLayer(8, 2, 16)])
def test_the_advised_fix_gives_a_module_make_private_accepts(model):
    fixed = ModuleValidator.fix(model)
    make_private(
        module=fixed,
        optimizer=torch.optim.SGD(fixed.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(20, 4)), batch_size=5),
        noise_multiplier=1.0,
    )
