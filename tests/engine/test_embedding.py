"""Book-keeping for ``nn.Embedding``: norms, transformed norms and sums from token ids, never ``[n, V x D]``.

The part is checked in float64 against per-example gradients written out row by row (a loop that adds
each position's output gradient to its token's row), with tokens repeated within an example; the engine
against the materialised path (Opacus's embedding hook) for every rule.
"""

import copy

import pytest
import torch
from tensor_sizes import LargestTensor
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip.engine import make_private
from adaclip.engine import per_example as per_example_module
from adaclip.engine.bookkeeping import BookkeepingGradSampleModule
from adaclip.engine.per_example import EmbeddingPart, Transform, collect_parts
from adaclip.methods import METHODS

pytestmark = pytest.mark.usefixtures("float64_by_default")


def explicit_grads(ids: torch.Tensor, delta: torch.Tensor, vocabulary: int) -> torch.Tensor:
    """``[n, V * D]``: row ``id_ip`` of example ``i``'s gradient gets ``delta_ip``, position by position."""
    n, positions, dim = delta.shape
    grads = torch.zeros(n, vocabulary, dim)
    for i in range(n):
        for p in range(positions):
            grads[i, ids[i, p]] += delta[i, p]
    return grads.reshape(n, -1)


def factors(n=7, positions=6, vocabulary=9, dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (n, positions), generator=generator)  # 4 tokens over 6 positions: repeats
    ids[0] = 2  # one example with a single token at every position
    delta = torch.randn(n, positions, dim, generator=generator)
    return ids, delta, nn.Parameter(torch.zeros(vocabulary, dim))


def test_repeated_tokens_are_one_row_by_hand():
    """Tokens (1, 1, 2), gradients (1, 0), (2, 1), (0, 3): row 1 is (3, 1), row 2 is (0, 3); ||g||^2 = 19.

    The Gram form over positions gives the same: 1 + 5 + 9 + 2 * (1 . 2-1 cross) = 1 + 5 + 9 + 2 * 2 = 19.
    """
    weight = nn.Parameter(torch.zeros(3, 2))
    part = EmbeddingPart(weight, 0, torch.tensor([[1, 1, 2]]), torch.tensor([[[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]]]))
    assert part.squared_norms().item() == pytest.approx(19.0, rel=1e-15)
    torch.testing.assert_close(part.materialise(), torch.tensor([[0.0, 0.0, 3.0, 1.0, 0.0, 3.0]]))


def test_embedding_part_against_explicit_gradients():
    ids, delta, weight = factors()
    offset, vocabulary = 3, weight.shape[0]
    part = EmbeddingPart(weight, offset, ids, delta)
    grads = explicit_grads(ids, delta, vocabulary)
    torch.testing.assert_close(part.materialise(), grads)
    torch.testing.assert_close(part.squared_norms(), grads.square().sum(1))
    assert part.squared_norms()[0] == pytest.approx(delta[0].sum(0).square().sum().item(), rel=1e-12)

    generator = torch.Generator().manual_seed(1)
    d = offset + weight.numel() + 2
    shift, scale = torch.randn(d, generator=generator), torch.rand(d, generator=generator) + 0.1
    span = slice(offset, offset + weight.numel())
    expected = ((grads - shift[span]) / scale[span]).square().sum(1)
    torch.testing.assert_close(part.transformed_squared_norms(Transform.of(shift, scale)), expected)

    weights = torch.rand(len(ids), generator=generator)
    out = torch.full(weight.shape, float("nan"))  # every entry must be written
    part.weighted_sum_into(weights, out)
    torch.testing.assert_close(out.flatten(), weights @ grads)
    torch.testing.assert_close(part.coordinate_square_sums(), grads.square().sum(0))
    columns = torch.randn(weight.numel(), 3, dtype=torch.float64, generator=generator)  # GeoClip's basis rows
    torch.testing.assert_close(part.projections(columns), grads.double() @ columns)

    dropped = torch.zeros(len(ids), dtype=torch.bool)
    dropped[[1, 4]] = True
    part.zero_examples(dropped)
    kept = grads.masked_fill(dropped.unsqueeze(1), 0.0)
    torch.testing.assert_close(part.squared_norms(), kept.square().sum(1))
    part.weighted_sum_into(weights, out)
    torch.testing.assert_close(out.flatten(), weights @ kept)


def test_float32_transformed_norms_are_recomputed_in_float64_under_cancellation(monkeypatch):
    """The shift equals example 0's gradient on its rows and the scale is small: the float32 terms cancel."""
    torch.set_default_dtype(torch.float32)
    ids, delta, weight = factors()
    delta = delta * 10
    grads = explicit_grads(ids, delta, weight.shape[0]).double()
    generator = torch.Generator().manual_seed(2)
    shift = grads[0].float() + 0.01 * torch.randn(weight.numel(), generator=generator)
    scale = torch.full((weight.numel(),), 1e-3) * (1 + torch.rand(weight.numel(), generator=generator))
    reference = ((grads - shift.double()) / scale.double()).square().sum(1)
    recomputed = []
    original = per_example_module._needs_float64
    monkeypatch.setattr(
        per_example_module, "_needs_float64", lambda *a, **k: recomputed.append(original(*a, **k)) or recomputed[-1]
    )
    squared = EmbeddingPart(weight, 0, ids, delta).transformed_squared_norms(Transform.of(shift, scale))
    assert squared.dtype == torch.float32 and recomputed == [True]
    tolerance = per_example_module.NORM_ERROR_TOLERANCE * reference.clamp_min(1.0)
    assert torch.all((squared.double() - reference).abs() <= tolerance)


class TwoUses(nn.Module):
    """One embedding read twice (a title and a body), padding index 0, sequence inputs of two lengths."""

    def __init__(self, vocabulary: int = 12, dim: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, dim, padding_idx=0)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        title, body = ids[:, :3], ids[:, 3:]
        return self.head(torch.tanh(self.embed(title).sum(1) + self.embed(body).mean(1)))


def token_data(n: int = 40, positions: int = 8, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randint(0, 5, (n, positions), generator=generator), torch.randint(0, 3, (n,), generator=generator)
    )


RULE_PARAMS = {"quantile": {"count_noise_std": 2.0}}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_embedding_used_twice_trains_like_the_materialised_path(method):
    torch.manual_seed(0)
    initial, results = TwoUses(), []
    for per_example in ("fast", "materialise"):
        model = copy.deepcopy(initial)
        module, optimizer, loader = make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
            data_loader=DataLoader(token_data(), batch_size=10),
            method=method,
            noise_multiplier=0.5,
            seed=3,
            per_example=per_example,
            **RULE_PARAMS.get(method, {}),
        )
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            optimizer.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-12)


def test_which_embeddings_are_bookkeeping():
    plain, by_frequency = nn.Embedding(5, 2), nn.Embedding(5, 2, scale_grad_by_freq=True)
    tied_input, tied_output = nn.Embedding(5, 2), nn.Linear(2, 5, bias=False)
    tied_output.weight = tied_input.weight
    model = nn.ModuleList([plain, by_frequency, tied_input, tied_output])
    assert BookkeepingGradSampleModule(model).bookkeeping_layers() == [plain]


@pytest.mark.parametrize("method, params", [("fixed", {}), ("adaclip", {}), ("geoclip", {"rank": 4})])
def test_a_large_vocabulary_never_forms_per_example_gradients(method, params):
    """V = 5000, D = 8, n = 16: [n, V x D] would be 640,000 numbers; the step stays parameter-sized."""
    vocabulary, dim, n = 5000, 8, 16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(vocabulary, dim), nn.Flatten(), nn.Linear(4 * dim, 3))
    ids = torch.randint(0, vocabulary, (n, 4))
    module, optimizer, _ = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(ids, torch.randint(0, 3, (n,))), batch_size=4),
        method=method,
        noise_multiplier=1.0,
        **params,
    )
    for _ in range(2):  # the second step has a non-trivial AdaCliP (GeoClip) state
        with LargestTensor() as tracker:
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(ids), torch.zeros(n, dtype=torch.long)).backward()
            optimizer.step()
        assert optimizer.steps_taken > 0
        # parameter-sized: a few flat vectors (GeoClip: its rank-k basis and one more column)
        state = (params.get("rank", 1) + 1) * sum(p.numel() for p in model.parameters())
        assert tracker.largest <= state < n * vocabulary * dim


def test_sequence_first_token_ids_read_the_batch_from_dimension_one():
    """``[T, B]`` ids with batch_first=False: the part's ids and gradients come examples first."""
    torch.manual_seed(0)
    model = nn.Embedding(6, 3)
    module = BookkeepingGradSampleModule(model, batch_first=False)
    ids = torch.randint(0, 6, (4, 5))  # T = 4 positions, B = 5 examples
    module(ids).sum().backward()
    (part,) = collect_parts([model.weight])
    assert isinstance(part, EmbeddingPart) and part.num_examples == 5
    torch.testing.assert_close(part.materialise(), explicit_grads(ids.t(), torch.full((5, 4, 3), 5.0), 6))
