"""The method registry's per-method facts: keyword-built entries and the one answer to "what is the clip bound"."""

import math

import pytest

from adaclip.engine.opacus_arguments import clip_bound_name
from adaclip.methods import (
    METHODS,
    NONPRIVATE,
    FixedClip,
    Method,
    PerLayerClip,
    QuantileClip,
    build_rule,
    clip_bound,
    clip_bound_names,
)
from adaclip.methods.fixed import FixedClipAdapter

# written out by hand from each rule's paper: the parameter that sets the first step's bound
FIRST_STEP_BOUND = {
    "fixed": "clip_norm",
    "adaclip": "initial_clip",
    "quantile": "initial_clip",
    "auto": None,
    "geoclip": "initial_clip",
    "psac": "clip_norm",
    "macadam": "initial_clip",
    "adambc": "clip_norm",
}


def test_every_method_names_its_first_step_bound():
    assert {name: entry.clip_bound for name, entry in METHODS.items()} == FIRST_STEP_BOUND
    assert clip_bound_names() == ("clip_norm", "initial_clip")
    assert {name: clip_bound_name(name) for name in METHODS} == FIRST_STEP_BOUND


@pytest.mark.parametrize("name", list(FIRST_STEP_BOUND))
def test_clip_bound_of_a_rule_is_its_parameter_or_1(name):
    parameter = FIRST_STEP_BOUND[name]
    params = {} if parameter is None else {parameter: 0.37}
    rule = build_rule(name, noise_multiplier=1.0, expected_batch_size=10, **params)
    assert clip_bound(rule) == (1.0 if parameter is None else 0.37)


def test_clip_bound_of_a_per_layer_rule_is_its_total_bound():
    base = QuantileClip(noise_multiplier=1.0, expected_batch_size=10, initial_clip=2.0)
    assert clip_bound(PerLayerClip(base=base, layer_sizes=[3, 1], layer_bounds=[0.3, 0.4])) == pytest.approx(0.5)
    split = PerLayerClip(base=base, layer_sizes=[3, 1, 2, 2])  # C / sqrt(K) each: total C
    assert split.layer_bounds == pytest.approx([2.0 / math.sqrt(4)] * 4)
    assert clip_bound(split) == pytest.approx(2.0)


def test_entries_are_built_with_keywords_and_nonprivate_is_not_a_method():
    with pytest.raises(TypeError):
        Method(FixedClip, "DP-SGD", "paper", FixedClipAdapter, "clip_norm", "clip_norm")  # type: ignore[misc]
    assert NONPRIVATE == "nonprivate" and NONPRIVATE not in METHODS


def test_per_layer_clipping_is_registered_only_for_rules_it_knows_how_to_weight():
    from adaclip.methods import AdaCliP, register_method
    from adaclip.methods.adaclip import AdaCliPAdapter

    coordinatewise = Method(
        rule=AdaCliP, label="x", paper="x", canary=AdaCliPAdapter, clip_bound=None, scale_parameter=None, per_layer=True
    )
    with pytest.raises(ValueError, match="per_layer=True needs a rule that per-layer clipping knows how to weight"):
        register_method("coordinatewise_per_layer", coordinatewise)  # it would be weighted as DP-SGD
    assert "coordinatewise_per_layer" not in METHODS
