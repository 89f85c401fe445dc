"""Data-parallel private steps over torch.distributed (gloo, 2 CPU processes) against one process.

The workers run in processes started by ``torch.multiprocessing.spawn``; an assertion failing in a
worker fails the test with the worker's traceback.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from adaclip.engine import distributed as dist_utils
from adaclip.engine import make_private
from adaclip.engine.bookkeeping import BookkeepingGradSampleModule
from adaclip.engine.optimizer import AdaptiveClipDPOptimizer
from adaclip.engine.sampling import PoissonBatchSampler
from adaclip.methods import METHODS, build_rule, supports_norm_path
from adaclip.privacy.accounting import epsilon
from adaclip.research.train import TrainConfig, run

WORLD = 2
BATCH = 8.0  # the global expected batch size B
METHOD_PARAMS = {
    "fixed": {"clip_norm": 0.5},
    "adaclip": {"initial_clip": 0.5, "count_noise_std": 4.0},  # the default estimator (quantile_scale) has a count
    "quantile": {"initial_clip": 0.5, "count_noise_std": 4.0},
    "auto": {},
    "geoclip": {"initial_clip": 0.5},
    "psac": {"clip_norm": 0.5},
    "macadam": {"initial_clip": 0.5},
    "adambc": {"clip_norm": 0.5},
}
# Global batches of three steps (indices into the 16 examples); the third is all even, so rank 1's share is empty.
STEPS = [list(range(16)), [1, 2, 3, 5, 8, 13, 14], [0, 2, 4]]


def _spawn(worker, tmp_path, *args):
    mp.spawn(_entry, args=(worker, str(tmp_path / "process_group"), args), nprocs=WORLD, join=True)


def _entry(rank, worker, init_file, args):
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def _data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def _steps(method, per_example, sigma, *, rank=None, noise_seed=7, drift=False):
    """Three steps on STEPS; ``rank=None``: one process on whole batches, else this rank's share, all-reduced.

    ``drift``: nudge this rank's rule state after the first step (a bug that updates state from local values).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    rule = build_rule(method, noise_multiplier=sigma, expected_batch_size=BATCH, **METHOD_PARAMS[method])
    fast = per_example == "fast" and supports_norm_path(rule)
    module = BookkeepingGradSampleModule(model) if fast else GradSampleModule(model)
    distributed = rank is not None
    optimizer = AdaptiveClipDPOptimizer(
        torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.5),
        rule=rule,
        sample_rate=0.5,
        generator=torch.Generator().manual_seed(noise_seed),
        per_example=per_example,
        distributed=distributed,
        check_replicas=distributed,
    )
    features, labels = _data()
    params, stats = [], []
    for batch in STEPS:
        local = batch[rank::WORLD] if distributed else batch
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(features[local]), labels[local]).backward()
        optimizer.step()
        params.append(torch.cat([p.detach().reshape(-1) for p in module.parameters()]))
        stats.append(dict(optimizer.last_stats))
        if drift:
            optimizer.rule_state = dataclasses.replace(optimizer.rule_state, mean=optimizer.rule_state.mean + 1e-6)
    return params, stats, optimizer.rule_state


def _equivalence_worker(rank):
    for method in METHODS:
        for per_example in ("fast", "materialise"):
            for sigma in (0.0, 1.0):
                single = _steps(method, per_example, sigma)
                split = _steps(method, per_example, sigma, rank=rank)
                label = f"{method}/{per_example}/sigma={sigma}"
                for step, (expected, actual) in enumerate(zip(single[0], split[0], strict=True)):
                    torch.testing.assert_close(
                        actual,
                        expected,
                        rtol=1e-10,
                        atol=1e-12,
                        msg=lambda m, label=label, step=step: f"{label} step {step}: {m}",
                    )
                for expected, actual in zip(
                    single[1], split[1], strict=True
                ):  # global statistics: realised n, clipped share, C_t
                    assert actual == pytest.approx(expected, rel=1e-10, abs=1e-12), label
                assert split[1][2]["batch_size"] == len(STEPS[2]), label
    # ranks whose generators would add their own noise are refused at construction, on every rank
    with pytest.raises(ValueError, match="draw different noise"):
        _steps("adaclip", "fast", 1.0, rank=rank, noise_seed=7 + rank)
    # debug mode can fail: rank 1's state drifts from rank 0's, and every rank reports it
    with pytest.raises(dist_utils.ReplicaDivergence, match=r"rank\(s\) \[1\]"):
        _steps("adaclip", "fast", 1.0, rank=rank, drift=rank == 1)


def test_one_distributed_step_equals_the_single_process_step_for_every_method(tmp_path):
    """Zero noise (the issue's test) and equal noise seeds: 2 ranks with half the examples each give the
    single-process parameters and statistics after each of 3 steps, for every method and both per-example
    paths; the third step leaves rank 1 with an empty share.  ``check_replicas`` is on throughout and
    catches a drifting rank; ranks with different noise seeds are refused."""
    _spawn(_equivalence_worker, tmp_path)


def _expected_noise_std(method, sigma, batch):
    """Per-coordinate standard deviation of the first update's noise, from each paper's formula (step 0: isotropic)."""
    params = METHOD_PARAMS[method]
    if method in ("quantile", "adaclip"):  # Andrew et al. 2021, Thm. 1: sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^-1/2
        sigma_b = params["count_noise_std"]
        return (sigma**-2 - (2 * sigma_b) ** -2) ** -0.5 * params["initial_clip"] / batch
    if method == "auto":  # AUTO-S: sensitivity 1
        return sigma / batch
    bound = params.get(
        "clip_norm", params.get("initial_clip")
    )  # DP-SGD / DP-PSAC: C; AdaCliP: b_0 = C0; GeoClip: M_0 = I / C0
    return sigma * bound / batch


def _noise_worker(rank, dim_in, results):
    sigma = 1.0
    for method in METHODS:
        params = dict(METHOD_PARAMS[method], **({"rank": 8} if method == "geoclip" else {}))
        torch.manual_seed(0)
        model = nn.Linear(dim_in, 5, bias=False)
        rule = build_rule(method, noise_multiplier=sigma, expected_batch_size=BATCH, **params)
        module = BookkeepingGradSampleModule(model) if supports_norm_path(rule) else GradSampleModule(model)
        optimizer = AdaptiveClipDPOptimizer(
            torch.optim.SGD(module.parameters(), lr=1.0),
            rule=rule,
            sample_rate=0.5,
            generator=torch.Generator().manual_seed(11),
            distributed=True,
        )
        features = torch.randn(4, dim_in)
        (0.0 * module(features).sum()).backward()  # zero gradients: the update is the noise alone
        optimizer.step()
        # the released noisy gradient as the audit reads it (DP-MacAdam and DP-AdamBC step by Adam's function of it)
        start = rule.init_state(dim_in * 5)
        update = METHODS[method].canary().observe(rule, start, model.weight.grad.reshape(-1), optimizer.rule_state)
        update = update[: dim_in * 5]
        ratio = float(update.square().mean()) / _expected_noise_std(method, sigma, BATCH) ** 2
        if rank == 0:
            results[method] = ratio


def test_distributed_noise_has_the_single_process_variance(tmp_path):
    """The per-coordinate variance of a 2-rank update's noise is the single-process sigma^2 s^2 / B^2.

    With zero gradients the update is pure noise; over d = 5000 coordinates mean(u_j^2) / var is
    chi^2_d / d, with standard deviation sqrt(2 / d) = 0.02, so |ratio - 1| < 0.1 (5 standard
    deviations).  Noise added on each rank would give 2 (independent) or 4 (identical draws).
    """
    results = mp.Manager().dict()
    _spawn(_noise_worker, tmp_path, 1000, results)
    assert set(results) == set(METHODS)
    for method, ratio in results.items():
        assert abs(ratio - 1) < 0.1, (method, ratio)


class _ListDataset(Dataset):
    """A dataset that is not a TensorDataset: make_private takes the DataLoader path."""

    def __init__(self, features, labels):
        self.features, self.labels = features, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.features[index], self.labels[index]


def _make_private_worker(rank):
    for tensor_dataset in (True, False):
        _train_with_make_private(rank, tensor_dataset)
    model = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="seed differs across ranks"):
        make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(*_data()), batch_size=4),
            noise_multiplier=1.0,
            delta=1e-3,
            seed=rank,
            distributed=True,
        )


def _train_with_make_private(rank, tensor_dataset):
    torch.manual_seed(100 + rank)  # different initial models: make_private must broadcast rank 0's
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    features, labels = _data()
    dataset = TensorDataset(features, labels) if tensor_dataset else _ListDataset(features, labels)
    module, optimizer, loader = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(dataset, batch_size=4),
        method="adaclip",
        noise_multiplier=1.0,
        delta=1e-3,
        seed=None,
        distributed=True,
        check_replicas=True,
    )
    seen, steps = [], 0
    for _ in range(3):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            optimizer.step()  # check_replicas: state, update and parameters agree on both ranks
            seen.append(x)
            steps += 1
    assert steps == 3 * len(loader) == optimizer.steps_taken
    owned = features[rank::WORLD]
    for x in seen:  # each rank samples only the examples it owns
        assert all(any(torch.equal(row, o) for o in owned) for row in x)
    # the accountant sees the global (sigma, q = B / N, T), as for one process
    assert optimizer.get_epsilon() == epsilon(
        noise_multiplier=1.0, sample_rate=4 / 16, steps=steps, delta=1e-3, accountant="prv"
    )


def test_make_private_shards_sampling_broadcasts_the_model_and_accounts_as_one_process(tmp_path):
    """Without a seed, for a TensorDataset and another Dataset: replicas agree every step (a shared noise
    seed is broadcast), each rank draws only from its share, and epsilon is the single-process value for
    the global (sigma, q, T).  Different seeds on different ranks are refused on every rank."""
    _spawn(_make_private_worker, tmp_path)


# --- single-process pieces -----------------------------------------------------------------------


@pytest.mark.usefixtures("float64_by_default")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_clipped_sums_add_over_any_split_of_the_batch(method):
    """The additivity an all-reduce relies on: the clipped sum of a batch is the sum over its parts."""
    rule = build_rule(method, noise_multiplier=1.0, expected_batch_size=BATCH, **METHOD_PARAMS[method])
    grads = torch.randn(9, 6, generator=torch.Generator().manual_seed(3))
    state = rule.init_state(6)
    whole = rule.clipped_sum(grads, state)
    parts = [rule.clipped_sum(grads[i::3], state) for i in range(3)]
    torch.testing.assert_close(sum(p.vector for p in parts), whole.vector)
    torch.testing.assert_close(sum(p.counts for p in parts), whole.counts)
    assert whole.counts[0] == 9 and 0 < whole.counts[1] <= 9


def test_sharded_poisson_sampling_partitions_the_examples_and_keeps_rate_q():
    """Ranks draw disjoint shares that cover every example; inclusion frequency is q.

    Over 200 epochs x 4 steps every example has 800 Bernoulli(q = 0.25) trials: the frequency's
    standard deviation is sqrt(q (1 - q) / 800) = 0.0153; each example is within 5 of them.
    """
    n, q = 21, 0.25
    counts = torch.zeros(n)
    for rank in range(3):
        sampler = PoissonBatchSampler(n, q, generator=torch.Generator().manual_seed(rank), rank=rank, world_size=3)
        assert len(sampler) == 4
        for _ in range(200):
            for batch in sampler:
                assert all(i % 3 == rank for i in batch)
                counts[batch] += 1
    frequency = counts / 800
    assert (frequency - q).abs().max() < 5 * math.sqrt(q * (1 - q) / 800)


def test_distributed_misuse_is_named():
    model = nn.Linear(5, 3)
    loader = DataLoader(TensorDataset(*_data()), batch_size=4)
    with pytest.raises(ValueError, match=r"initialised torch\.distributed process group"):
        make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            delta=1e-3,
            distributed=True,
        )
    with pytest.raises(ValueError, match=r"check_replicas=True .* needs distributed=True"):
        make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            delta=1e-3,
            check_replicas=True,
        )
    rule = build_rule("fixed", noise_multiplier=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match="generator"):
        AdaptiveClipDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), rule=rule, sample_rate=0.25, distributed=True
        )
    with pytest.raises(ValueError, match=r"initialised torch\.distributed process group"):
        AdaptiveClipDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            rule=rule,
            sample_rate=0.25,
            distributed=True,
            generator=torch.Generator().manual_seed(0),
        )
    with pytest.raises(ValueError, match="world_size"):
        PoissonBatchSampler(1, 0.5, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        PoissonBatchSampler(10, 0.5, rank=2, world_size=2)


# --- the command line under torchrun -------------------------------------------------------------


def _torchrun(tmp_path, *args):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(WORLD),
        "-m",
        "adaclip",
        "train",
        *args,
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize("method", ["adaclip", "nonprivate"])
def test_train_command_runs_unchanged_under_torchrun(tmp_path, method):
    """``torchrun --nproc_per_node 2 -m adaclip train`` with the single-process arguments: one record, from
    rank 0, with the single-process epsilon and step count and a sane accuracy (the runs differ in their
    sampling, so accuracies agree only within noise: the note reports a multi-seed comparison)."""
    args = ["--dataset", "synthetic", "--method", method, "--epochs", "2", "--seed", "1"]
    printed = _torchrun(
        tmp_path, *args, "--out", "parallel.json", *(["--check-replicas"] if method != "nonprivate" else [])
    )
    assert printed.count(f"{method} on synthetic") == 1 and "on 2 ranks" in printed  # rank 0 prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel.json"]  # rank 0 writes, nothing else is left
    parallel = json.loads((tmp_path / "parallel.json").read_text())
    single = run(TrainConfig(dataset="synthetic", method=method, epochs=2, seed=1, progress=False))
    assert parallel["world_size"] == 2 and single["world_size"] == 1
    for key in ("epsilon", "noise_multiplier", "sample_rate", "delta"):
        assert parallel[key] == single[key], key
    # chance is about 0.5 on the 1000 test examples (standard error 0.016): both learn
    assert parallel["test_accuracy"] > 0.6 and single["test_accuracy"] > 0.6
    if method != "nonprivate":
        assert parallel["steps"] == single["steps"] == 2 * int(1 / single["sample_rate"])
        # global realised batches (the synthetic default B = 100), not per rank
        assert parallel["step_stats_mean"]["batch_size"] == pytest.approx(100, rel=0.1)


def test_train_refuses_what_several_ranks_cannot_do():
    with pytest.raises(ValueError, match="check_replicas compares the ranks"):
        run(TrainConfig(dataset="breast-cancer", method="fixed", epochs=1, check_replicas=True, progress=False))
