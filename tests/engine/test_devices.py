"""Device and dtype placement: what a GPU run or a non-float32 model needs, checked on CPU in CI.

A tensor created without ``device=`` or ``dtype=`` lands on the CPU in float32.  On CPU with float32
parameters such a mistake is invisible, so these tests run the private optimizer with float64
parameters and compare its update with an independent float64 computation at a tolerance that
float32 rounding anywhere in the chain (per-example gradients, clipping, noise, rule state) would
break.  Every test taking ``device`` also runs on ``cuda`` where ``torch.cuda.is_available()``.
"""

import dataclasses
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import make_private
from adaclip.engine.per_example import product_epsilon
from adaclip.methods import METHODS
from adaclip.research.analysis import Hyperparameters
from adaclip.research.datasets import load_dataset
from adaclip.research.params import SWEEPS, load_params
from adaclip.research.sweeps import sweep_configs
from adaclip.research.theory import log_spaced_std
from adaclip.research.train import TrainConfig, resolve

ROOT = Path(__file__).resolve().parents[2]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
    ),
]
# (test id, method, method parameters); GeoClip in both its variants (full matrix and rank k)
METHOD_CASES = [(m, m, {}) for m in sorted(METHODS) if m != "geoclip"] + [
    ("geoclip-full", "geoclip", {}),
    ("geoclip-rank4", "geoclip", {"rank": 4}),
]
# (test id, method, method parameters, per-example path): GeoClip has no norm interface, so its two paths are one
PATH_CASES = [
    pytest.param(method, params, path, id=f"{case}-{path}")
    for case, method, params in METHOD_CASES
    for path in ("fast", "materialise")
    if not (method == "geoclip" and path == "fast")
]
DATASET_SIZE, BATCH_SIZE, STEPS, LR = 64, 16, 3, 0.1


def small_model() -> nn.Module:
    """Convolution (book-keeping, materialised per layer), GroupNorm (Opacus hooks) and two linear layers.

    The linear layers use book-keeping.
    """
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 4),
        nn.Tanh(),
        nn.Linear(4, 3),
    )


def private_training(method, method_params, *, device, dtype, per_example, noise_multiplier=1.0, seed=0):
    """Model, private module, optimizer and loader; data and parameters on ``device`` in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(DATASET_SIZE, 1, 5, 5, generator=generator).to(device, dtype)
    labels = torch.randint(0, 3, (DATASET_SIZE,), generator=generator).to(device)
    torch.manual_seed(seed)
    model = small_model().to(device, dtype)
    module, optimizer, loader = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=DataLoader(TensorDataset(features, labels), batch_size=BATCH_SIZE),
        method=method,
        noise_multiplier=noise_multiplier,
        delta=1e-3,
        seed=seed,
        per_example=per_example,
        **method_params,
    )
    return model, module, optimizer, loader


def per_example_gradients(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[n, d]`` gradients of each example's loss by ``torch.func`` on a plain copy (no Opacus, no book-keeping)."""
    plain = small_model().to(features.device, next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    params = {name: p.detach() for name, p in plain.named_parameters()}

    def loss(values, x, y):
        return nn.functional.cross_entropy(torch.func.functional_call(plain, values, (x.unsqueeze(0),)), y.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, features, labels)
    return torch.cat([grads[name].reshape(len(labels), -1) for name in params], dim=1)


def state_fields(state) -> dict[str, object]:
    """The fields of a rule's state (a frozen dataclass; ``None`` for stateless rules)."""
    if state is None:
        return {}
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def snapshot(state):
    """A copy of a rule state that later in-place changes cannot reach."""
    tensors = {k: v.clone() for k, v in state_fields(state).items() if isinstance(v, torch.Tensor)}
    return dataclasses.replace(state, **tensors) if tensors else state


# float32 rounding is about 1e-7 relative: 1e-10 is far below it and far above float64 rounding of these
# short sums (about 1e-15); float32 runs get 1e-4 (norms near a clip threshold are unlikely at these sizes)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("method", "method_params", "per_example"), PATH_CASES)
def test_update_equals_the_rule_on_independent_per_example_gradients(method, method_params, per_example, dtype, device):
    """Each step's released gradient is ``rule.step`` on per-example gradients from torch.func with the same noise.

    The optimizer's noise generator is replaced by one seeded here, and a twin generator draws the
    same standard normals for the reference, on the device and in the parameters' dtype.
    """
    model, module, optimizer, loader = private_training(
        method, method_params, device=device, dtype=dtype, per_example=per_example
    )
    parameter_device = next(model.parameters()).device
    assert optimizer.generator.device == parameter_device  # a CPU generator cannot feed torch.randn on CUDA
    optimizer.generator = torch.Generator(device=parameter_device).manual_seed(7)
    twin = torch.Generator(device=parameter_device).manual_seed(7)
    rule, dim = optimizer.rule, sum(p.numel() for p in model.parameters())
    batches = iter(loader)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for _ in range(STEPS):
            features, labels = next(batches)
            assert features.device == parameter_device and labels.device == parameter_device
            state = snapshot(
                optimizer.rule_state
                if optimizer.rule_state is not None
                else rule.init_state(dim, device=parameter_device, dtype=dtype)
            )
            grads = per_example_gradients(model, features, labels)
            noise = torch.randn(rule.noise_size(dim), generator=twin, device=parameter_device, dtype=dtype)
            expected, expected_state, _ = rule.step(grads, state, noise)

            optimizer.zero_grad()
            nn.functional.cross_entropy(module(features), labels).backward()
            optimizer.step()

            released = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            assert {(p.grad.dtype, p.grad.device) for p in model.parameters()} == {(dtype, parameter_device)}
            assert released.dtype == dtype
            torch.testing.assert_close(
                released, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * float(expected.abs().max())
            )
            for name, value in state_fields(optimizer.rule_state).items():
                reference = getattr(expected_state, name)
                if name == "basis":
                    # GeoClip's eigenvectors are defined only up to sign and to rotations among equal eigenvalues
                    # (which the first steps produce), so rounding may pick others: compare the basis-free fields
                    assert (value.dtype, value.device) == (dtype, parameter_device), f"state {name}"
                    continue
                if isinstance(value, torch.Tensor):
                    assert (value.dtype, value.device) == (dtype, parameter_device), f"state {name}"
                    torch.testing.assert_close(
                        value,
                        reference,
                        rtol=TOLERANCE[dtype],
                        atol=TOLERANCE[dtype] * float(reference.abs().max()),
                        msg=f"state {name}",
                    )
                else:  # e.g. the quantile rule's clip norm, a Python float
                    assert value == pytest.approx(reference, rel=TOLERANCE[dtype]), f"state {name}"
    assert all(
        p.device == parameter_device and p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters()
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("method", "method_params", "per_example"), PATH_CASES)
def test_bfloat16_parameters_train(method, method_params, per_example, device):
    """bfloat16 parameters: a few steps run, the released gradient has the parameters' dtype and stays finite."""
    model, module, optimizer, loader = private_training(
        method, method_params, device=device, dtype=torch.bfloat16, per_example=per_example
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for _, (features, labels) in zip(range(STEPS), loader, strict=False):  # the first STEPS batches
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(features).float(), labels).backward()
            optimizer.step()
            assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in model.parameters())
    assert optimizer.steps_taken == STEPS


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fixed", "adaclip"])
def test_fast_path_under_autocast_matches_the_materialised_path(method, device):
    """Mixed precision (``torch.autocast``, bfloat16 compute, float32 parameters): the fast path records the
    linear layers' inputs in float32 and their output gradients in bfloat16, and must still match Opacus's path.

    The noise is negligible (sigma = 1e-6), so the update is the clipped mean gradient; the two paths differ
    only in bfloat16 rounding of the backward pass (unit roundoff 2^-9, about 0.2 %; 0.1 % measured), hence 2 %.
    """
    updates = {}
    for per_example in ("fast", "materialise"):
        model, module, optimizer, loader = private_training(
            method, {}, device=device, dtype=torch.float32, per_example=per_example, noise_multiplier=1e-6
        )
        features, labels = next(iter(loader))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            optimizer.zero_grad()
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
                logits = module(features)
            nn.functional.cross_entropy(logits.float(), labels).backward()
            optimizer.step()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        updates[per_example] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    scale = float(updates["materialise"].abs().max())
    torch.testing.assert_close(updates["fast"], updates["materialise"], rtol=0.02, atol=0.02 * scale)


@pytest.mark.parametrize("method", ["fixed", "adaclip", "geoclip"])
def test_optimizer_step_inside_autocast_equals_the_step_outside(method):
    """Clipping is privacy-critical: an ``optimizer.step()`` called inside an autocast block must not compute
    norms and weighted sums in bfloat16 (measured: 0.1 % to 0.2 % away from the float32 update; equal once disabled)."""
    updates = {}
    for inside in (False, True):
        model, module, optimizer, loader = private_training(
            method, {}, device="cpu", dtype=torch.float32, per_example="fast", noise_multiplier=1e-6
        )
        features, labels = next(iter(loader))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            optimizer.zero_grad()
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(module(features).float(), labels)
                if inside:
                    loss.backward()
                    optimizer.step()
            if not inside:
                loss.backward()
                optimizer.step()
        updates[inside] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(updates[True], updates[False], rtol=1e-6, atol=1e-6 * float(updates[False].abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_splits_move_to_the_device_once(device):
    """``Splits.to`` puts every split on the device, keeping dtypes and values.

    train.py can then skip per-batch copies.
    """
    splits = load_dataset("diabetes", seed=0)
    moved = splits.to(device)
    for name in ("train", "validation", "test"):
        before, after = getattr(splits, name).tensors, getattr(moved, name).tensors
        assert all(
            a.device.type == torch.device(device).type and a.dtype == b.dtype
            for a, b in zip(after, before, strict=True)
        )
        assert all(torch.equal(a.cpu(), b) for a, b in zip(after, before, strict=True))
    assert (moved.name, moved.task, moved.num_classes, moved.input_shape) == (
        splits.name,
        splits.task,
        splits.num_classes,
        splits.input_shape,
    )


def test_cancellation_guard_uses_tf32_precision_where_cuda_products_use_it():
    """AdaCliP's transformed norms cancel.

    The float64 fallback must know that TF32 products keep only 10 mantissa bits.
    """
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    float32_eps = torch.finfo(torch.float32).eps
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert product_epsilon(torch.float32, cuda) == float32_eps
        matmul.fp32_precision = "tf32"
        assert product_epsilon(torch.float32, cuda) == 2.0**-10
        assert product_epsilon(torch.float32, cpu) == float32_eps
        assert product_epsilon(torch.float64, cuda) == torch.finfo(torch.float64).eps
        assert product_epsilon(torch.bfloat16, cuda) == torch.finfo(torch.bfloat16).eps
    finally:
        matmul.fp32_precision = previous


def test_theory_std_is_float64_to_the_last_coordinate():
    """The last standard deviation is exactly ``1 / spread`` in float64 (no float32 step in between)."""
    for spread in (3, 30, 300, 3000):
        std = log_spaced_std(7, spread)
        assert std.dtype == torch.float64
        assert float(std[-1]) * spread == pytest.approx(1.0, rel=1e-14)


# --- the paper profile on CUDA -------------------------------------------------------------------------


def test_paper_profile_sends_every_training_run_to_cuda():
    """Every run of every sweep of profiles/paper.yaml trains on the profile's device and resolves."""
    params = load_params(ROOT / "profiles" / "paper.yaml")
    assert params.runtime.device == "cuda" and params.bench["device"] == "cuda"
    centres = {  # the tuning grid's centre stands in for the selected cell
        (name, m): Hyperparameters(lr=task.lr[m], scale=task.scale.get(m))
        for name, task in params.setting.tasks.items()
        for m in (*task.methods, "nonprivate")
    }
    for sweep in SWEEPS:
        configs = sweep_configs(sweep, params, centres)
        assert configs and {c["device"] for c in configs} == {"cuda"}, sweep
        for config in configs[:: max(1, len(configs) // 20)]:
            assert resolve(TrainConfig.from_dict(config)).device == "cuda"


def test_dvc_runs_depend_on_the_device():
    """Changing runtime.device (or the bench's device) re-runs the stages that train."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "runtime.device" in stages["tuning"]["params"]
    assert "runtime.device" in stages["sweep"]["do"]["params"]
    assert "bench" in stages["bench"]["params"]


# --- the benchmark's CUDA branches, with torch.cuda replaced by a recorder -------------------------------


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("adaclip_bench_devices", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_bench_timing_on_cuda_synchronises_around_every_timed_block(bench, monkeypatch):
    """CUDA kernels run asynchronously: every timed block must start and end with ``torch.cuda.synchronize``."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    setup = bench.Setup("fixed", "fast", lambda: events.append(("step", None)))
    bench.time_setups([setup], repeats=3, warmup=1, device="cuda:0", target_sample_s=0.0)
    assert events and all(kind == "sync" and device == "cuda:0" for kind, device in (events[0], events[-1]))
    # no step runs between a sync and the clock read except the timed ones, and every block is closed by a sync
    for index, (kind, _) in enumerate(events):
        if kind == "step":
            after = next(k for k, _ in events[index + 1 :] if k != "step")
            assert after == "sync"


def test_bench_peak_memory_on_cuda_counts_only_the_step(bench, monkeypatch):
    """``max_memory_allocated`` after a step minus ``memory_allocated`` before it, peak reset in between."""
    state = {"allocated": 1000, "peak": 5000}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["allocated"])
    )
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])

    def step():
        state["peak"] = max(state["peak"], state["allocated"] + 300)  # a temporary of 300 bytes

    assert bench.peak_step_memory(bench.Setup("fixed", "fast", step), "cuda") == 300


@pytest.mark.parametrize("device", ["gpu", "cudafoo", "cuda:99"])
def test_bench_refuses_a_device_it_cannot_use(bench, device):
    """A misspelt device, or a CUDA index this machine lacks, stops the benchmark before it builds anything."""
    with pytest.raises(SystemExit, match=r"device"):
        bench.resolve_options(bench.parser().parse_args(["--device", device]))
