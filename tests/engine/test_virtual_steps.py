"""A logical (Poisson) batch in pieces: BatchMemoryManager's virtual steps and several backward passes per step.

Clipped sums are sums over examples, so releasing the sum of the pieces' clipped sums once, with the
whole batch's noise and normaliser ``B``, is the one-big-batch step: the tests compare parameters,
rule state and accounting with the plain run, in float64, for every registered rule and both paths.
"""

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.utils.batch_memory_manager import BatchMemoryManager
from tensor_sizes import LargestTensor
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import epsilon, make_private
from adaclip.methods import METHODS

N, B, PHYSICAL = 120, 24, 5
PATHS = ("fast", "materialise")


def images(n: int = N, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64)
    return TensorDataset(x, (x[:, 0, 2:4, 2:4].sum((1, 2)) > 0).long())


def small_cnn() -> nn.Module:
    """A book-keeping convolution and linear layer, and a GroupNorm that Opacus's hooks handle: both part kinds."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 2))


def private_run(method: str, per_example: str, *, batch_size: int = B, model=small_cnn):
    torch.manual_seed(0)
    model = model().double()
    params = {"count_noise_std": 4.0} if method == "quantile" else {}
    return make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(images(), batch_size=batch_size),
        method=method,
        noise_multiplier=0.8,
        delta=1e-3,
        seed=5,
        per_example=per_example,
        **params,
    )


def loss_of(module, x, y):
    return nn.functional.cross_entropy(module(x), y)


def one_batch_per_step(module, optimizer, loader, epochs: int = 1) -> None:
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_of(module, x, y).backward()
            optimizer.step()


def with_batch_memory_manager(module, optimizer, loader, epochs: int = 1) -> list[int]:
    sizes = []
    for _ in range(epochs):
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=PHYSICAL, optimizer=optimizer) as physical:
            for x, y in physical:
                sizes.append(len(x))
                optimizer.zero_grad()
                loss_of(module, x, y).backward()
                optimizer.step()
    return sizes


def two_backward_passes_per_step(module, optimizer, loader, epochs: int = 1) -> None:
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            half = len(x) // 2  # the first piece may be empty
            for part in (slice(0, half), slice(half, None)):
                # the loss of a piece is the mean over the piece: gradients are per example either way
                loss_of(module, x[part], y[part]).backward()
            optimizer.step()


def state_tensors(state) -> dict:
    """Every rule's state is a dataclass of tensors or floats; GeoClip's eigenbasis is compared as the matrices it
    spans (eigenvectors of repeated eigenvalues are not unique)."""
    if state is None:
        return {}
    values = {k: torch.as_tensor(v) for k, v in vars(state).items()}
    if "basis" in values:
        basis = values.pop("basis")
        for key in ("eigenvalues", "transform_eigenvalues"):
            values[key] = basis @ torch.diag(values[key]) @ basis.T
    return values


def outcome(module, optimizer) -> dict:
    return {
        "params": torch.cat([p.detach().flatten() for p in module.parameters()]),
        "state": state_tensors(optimizer.rule_state),
        "steps": optimizer.steps_taken,
        "epsilon": optimizer.get_epsilon(),
        "batch_size": optimizer.last_stats["batch_size"],
        "clipped_fraction": optimizer.last_stats["clipped_fraction"],
    }


def assert_same_outcome(got: dict, expected: dict) -> None:
    torch.testing.assert_close(got["params"], expected["params"], rtol=1e-10, atol=1e-12)
    assert got["state"].keys() == expected["state"].keys()
    for key in got["state"]:
        torch.testing.assert_close(got["state"][key], expected["state"][key], rtol=1e-10, atol=1e-12)
    for key in ("steps", "epsilon", "batch_size", "clipped_fraction"):
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key


@pytest.mark.parametrize("per_example", PATHS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_pieces_of_a_logical_batch_equal_one_big_batch(method, per_example):
    module, optimizer, loader = private_run(method, per_example)
    one_batch_per_step(module, optimizer, loader)
    expected = outcome(module, optimizer)
    assert expected["steps"] == len(loader) == 5

    module, optimizer, loader = private_run(method, per_example)
    sizes = with_batch_memory_manager(module, optimizer, loader)
    assert max(sizes) <= PHYSICAL < B and len(sizes) > expected["steps"]  # the logical batches were split
    assert_same_outcome(outcome(module, optimizer), expected)

    module, optimizer, loader = private_run(method, per_example)
    two_backward_passes_per_step(module, optimizer, loader)
    assert_same_outcome(outcome(module, optimizer), expected)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 4), nn.Tanh(), nn.Linear(4, 2))


def test_empty_logical_batches_still_release_once():
    """At rate 2/120 some logical batches are empty: BatchMemoryManager yields them as one empty physical batch."""
    module, optimizer, loader = private_run("adaclip", "fast", batch_size=2, model=mlp)
    one_batch_per_step(module, optimizer, loader)
    expected = outcome(module, optimizer)
    module, optimizer, loader = private_run("adaclip", "fast", batch_size=2, model=mlp)
    sizes = with_batch_memory_manager(module, optimizer, loader)
    assert 0 in sizes and optimizer.steps_taken == len(loader) == 60
    assert_same_outcome(outcome(module, optimizer), expected)


def test_memory_is_bounded_by_the_physical_batch():
    """On the materialised path the largest tensor of a step is the [n, d] per-example matrix (or the convolution's
    unfolded input [n, 9, 16]): with virtual steps n is the physical batch, at most 5, not the logical one."""
    dim = sum(p.numel() for p in small_cnn().parameters())
    largest = {}
    for physical_size in (None, PHYSICAL):
        module, optimizer, loader = private_run("fixed", "materialise", batch_size=60)  # rate 1/2: n about 60
        tracker = LargestTensor()
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=physical_size or N, optimizer=optimizer
        ) as physical:
            for x, y in physical:
                with tracker:  # the training step only: the loader's views of the whole dataset do not count
                    optimizer.zero_grad()
                    loss_of(module, x, y).backward()
                    optimizer.step()
        largest[physical_size] = tracker.largest
    assert largest[None] >= 40 * dim  # the check can fail: a whole logical batch forms [n, d]
    assert largest[PHYSICAL] <= PHYSICAL * max(dim, 9 * 16)


def test_only_the_running_sum_is_carried_between_pieces():
    module, optimizer, loader = private_run("adaclip", "fast")
    x, y = next(iter(loader))
    optimizer.signal_skip_step(do_skip=True)
    loss_of(module, x[:4], y[:4]).backward()
    assert optimizer.step() is None and optimizer.steps_taken == 0  # a virtual step: no release
    assert optimizer.accumulated_iterations == 0  # the piece's per-example gradients are gone
    optimizer.zero_grad()  # after a virtual step it keeps the running sum, as Opacus keeps summed_grad
    loss_of(module, x[4:], y[4:]).backward()
    optimizer.step()
    assert optimizer.steps_taken == 1 and optimizer.last_stats["batch_size"] == len(x)


def test_zero_grad_after_a_real_step_drops_a_pending_running_sum():
    module, optimizer, loader = private_run("fixed", "fast")
    x, y = next(iter(loader))
    loss_of(module, x[:3], y[:3]).backward()
    with torch.no_grad():
        module(x[:1])  # a forward pass clips the finished pass into the running sum
    optimizer.zero_grad()  # the last step was not virtual: everything pending is dropped
    loss_of(module, x[3:], y[3:]).backward()
    optimizer.step()
    assert optimizer.last_stats["batch_size"] == len(x) - 3


# --- one Poisson batch per release --------------------------------------------------------------


def test_a_second_loader_batch_before_the_step_is_refused():
    """Two Poisson batches in one release would be accounted as one: the loader refuses to hand out the second."""
    module, optimizer, loader = private_run("fixed", "fast")
    batches = iter(loader)
    x, y = next(batches)
    loss_of(module, x, y).backward()
    with pytest.raises(RuntimeError, match=r"new batch .* pending: call optimizer\.step\(\) once per batch"):
        next(batches)
    optimizer.zero_grad()  # drops the pending batch: a new pass over the loader starts
    batches = iter(loader)
    x, y = next(batches)
    loss_of(module, x, y).backward()
    optimizer.step()
    x, y = next(batches)  # after a release, the next batch is handed out
    assert optimizer.steps_taken == 1


def test_the_check_is_off_when_worker_processes_sample_ahead():
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return torch.ones(2), 0

    model = nn.Linear(2, 2)
    _, _, loader = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(Items(), batch_size=4, num_workers=2),
        method="fixed",
        noise_multiplier=1.0,
        delta=1e-3,
    )
    assert loader.num_workers == 2 and loader.poisson_sampler.before_batch is None


# --- Opacus's accountant hook and accumulated_iterations on the fast path ------------------------


@pytest.mark.parametrize("per_example", PATHS)
@pytest.mark.parametrize("schedule", [one_batch_per_step, with_batch_memory_manager, two_backward_passes_per_step])
def test_opacus_accountant_hooks_count_one_poisson_step_per_release(schedule, per_example):
    """Opacus's own accountants, driven by their step hook, agree with the optimizer's epsilon (q = B / N)."""
    module, optimizer, loader = private_run("quantile", per_example)
    rdp, prv = RDPAccountant(), PRVAccountant()
    seen = []

    def hooks(opt):
        seen.append(opt.accumulated_iterations)
        rdp.get_optimizer_hook_fn(sample_rate=loader.sample_rate)(opt)
        prv.get_optimizer_hook_fn(sample_rate=loader.sample_rate)(opt)

    optimizer.attach_step_hook(hooks)
    schedule(module, optimizer, loader)
    steps = optimizer.steps_taken
    assert seen == [1] * steps and rdp.history == [(0.8, B / N, steps)]
    expected_rdp = epsilon(noise_multiplier=0.8, sample_rate=B / N, steps=steps, delta=1e-3, accountant="rdp")
    assert rdp.get_epsilon(1e-3) == pytest.approx(expected_rdp, rel=1e-9)
    assert prv.get_epsilon(1e-3) == pytest.approx(optimizer.get_epsilon(), rel=1e-6)


def test_accumulated_iterations_counts_pending_passes_as_opacus_does():
    from adaclip.engine import AdaptiveClipDPOptimizer
    from adaclip.engine.bookkeeping import BookkeepingGradSampleModule
    from adaclip.methods import FixedClip

    module = BookkeepingGradSampleModule(small_cnn().double())
    optimizer = AdaptiveClipDPOptimizer(
        torch.optim.SGD(module.parameters(), lr=0.1),
        rule=FixedClip(noise_multiplier=1.0, expected_batch_size=4),
        sample_rate=0.1,
    )
    x, y = images().tensors
    assert optimizer.accumulated_iterations == 0
    for passes in (1, 2):  # no module attached: the passes stay pending (book-keeping and Opacus layers)
        loss_of(module, x[:4], y[:4]).backward()
        assert optimizer.accumulated_iterations == passes
    optimizer.zero_grad()
    optimizer.attach_module(module)  # now each forward pass clips the pending one into the running sum
    for _ in range(2):
        loss_of(module, x[:4], y[:4]).backward()
        assert optimizer.accumulated_iterations == 1
    optimizer.step()
    assert optimizer.accumulated_iterations == 0 and optimizer.last_stats["batch_size"] == 8
