"""Adding a method takes its own rule (and audit view) plus one registry entry, nothing else.

The trivial rule below (DP-SGD that clips at half the given bound, a complete and private rule) is
registered the way a new method module would be; the engine, the command line's validation, the audit
and the research pipeline's grid and labels must all pick it up from the registry alone.
"""

import dataclasses
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import make_private
from adaclip.audit import audit_config, audit_method
from adaclip.methods import (
    METHODS,
    Method,
    build_rule,
    clip_bound,
    method_parameters,
    register_method,
    registered_method,
)
from adaclip.methods.base import ClipRule, clip_factors
from adaclip.methods.canary import DTYPE, CoordinatewiseAdapter
from adaclip.research import analysis
from adaclip.research.params import load_params
from adaclip.research.sweeps import tuning_configs
from adaclip.research.train import TrainConfig, resolve


class HalfClip(ClipRule):
    """DP-SGD clipping at ``C / 2`` (so its sum has sensitivity ``C / 2``)."""

    def __init__(self, *, noise_multiplier: float, expected_batch_size: float, clip_norm: float = 1.0) -> None:
        self.noise_multiplier, self.expected_batch_size, self.clip_norm = (
            noise_multiplier,
            expected_batch_size,
            clip_norm,
        )

    def example_weights(self, norms: Tensor, state: None) -> Tensor:
        return clip_factors(norms, self.clip_norm / 2)

    def weight_bound(self, state: None) -> float:
        return self.clip_norm / 2


class HalfClipAdapter(CoordinatewiseAdapter[HalfClip]):
    def scale(self, rule: HalfClip, state: Any, dim: int) -> Tensor:
        return torch.full((dim,), rule.clip_norm / 2, dtype=DTYPE)


HALF = Method(
    rule=HalfClip,
    label="half-clip DP-SGD",
    paper="test",
    canary=HalfClipAdapter,
    clip_bound="clip_norm",
    scale_parameter="clip_norm",
    step_per_scale=True,
)


@pytest.fixture
def registered():
    with registered_method("half", HALF) as name:
        yield name
    assert "half" not in METHODS


def test_registration_is_checked_and_undone():
    with pytest.raises(ValueError, match="clip_bound must be None or a parameter of HalfClip"):
        register_method("half", dataclasses.replace(HALF, clip_bound="initial_clip"))
    for taken in ("fixed", "nonprivate"):
        with pytest.raises(ValueError, match="new method name"):
            register_method(taken, HALF)
    assert "half" not in METHODS and METHODS["fixed"].rule is not HalfClip


def test_the_clip_bound_and_the_per_layer_refusal_come_from_the_entry(registered):
    rule = build_rule(registered, noise_multiplier=1.0, expected_batch_size=10, clip_norm=0.25)
    assert clip_bound(rule) == 0.25
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="not offered for method 'half': its rule has no per-layer form"):
        make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.randn(20, 3), torch.zeros(20, dtype=torch.long)), batch_size=5),
            method=registered,
            noise_multiplier=1.0,
            delta=1e-5,
            clipping="per_layer",
        )


def test_the_engine_and_validation_take_a_registered_method(registered):
    assert method_parameters(registered) == ["clip_norm"]
    assert isinstance(build_rule(registered, noise_multiplier=1.0, expected_batch_size=10), HalfClip)
    resolve(TrainConfig(dataset="synthetic", method=registered, method_params={"clip_norm": 0.5}))
    data = TensorDataset(torch.randn(200, 5), torch.randint(0, 2, (200,)))
    model = nn.Linear(5, 2)
    module, optimizer, loader = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=20),
        method=registered,
        noise_multiplier=1.0,
        delta=1e-5,
        seed=0,
    )
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(module(x), y).backward()
    optimizer.step()
    assert optimizer.last_stats["noise_power"] == pytest.approx(12 * (1.0 * 0.5 / 20) ** 2)  # d (sigma C/2 / B)^2


def test_the_audit_takes_a_registered_method(registered):
    result = audit_method(registered, audit_config({"trials": 100, "optimizer_trials": 0}))
    assert result.name == registered and result.verdict == "pass"


def test_the_pipeline_grid_and_labels_take_a_registered_method(registered):
    tiny = load_params("tests/fixtures/params-tiny.yaml")
    task = tiny.task("diabetes")
    task = dataclasses.replace(
        task,
        methods=(*task.methods, registered),
        lr={**task.lr, registered: 0.1},
        scale={**task.scale, registered: 1.0},
    )
    setting = dataclasses.replace(tiny.setting, methods=(*tiny.setting.methods, registered), tasks={"diabetes": task})
    configs = [c for c in tuning_configs(dataclasses.replace(tiny, setting=setting)) if c["method"] == registered]
    assert len(configs) == len(tiny.tuning.lr_factors) * len(tiny.tuning.scale_factors)
    assert analysis.label(registered) == "half-clip DP-SGD"
