"""The clipping methods and their one registry (:mod:`adaclip.methods.registry`).

Each method lives in its own module (its rule, its state and its audit view, with the paper and the
equations in the module docstring); :data:`METHODS` is the only place that lists them.  Adding a method
means writing its module and registering one :class:`Method` (:func:`register_method`):
``make_private``, the command line, the report's sweeps and labels, the benchmark and the privacy audit
all read this registry.
"""

from __future__ import annotations

from adaclip.methods.adaclip import AdaCliP, AdaCliPState, QuantileScaleState
from adaclip.methods.adambc import AdamBC, AdamState
from adaclip.methods.auto import AutoClip
from adaclip.methods.base import ClippedSum, ClipRule, Stats, clip_factors, supports_norm_path
from adaclip.methods.canary import CanaryAdapter
from adaclip.methods.fixed import FixedClip
from adaclip.methods.geoclip import GeoClip, GeoClipState
from adaclip.methods.macadam import MacAdam, MacAdamState
from adaclip.methods.per_layer import PerLayerClip, PerLayerQuantileState
from adaclip.methods.psac import PerSampleAdaptiveClip
from adaclip.methods.quantile import QuantileClip, QuantileClipState
from adaclip.methods.registry import (
    METHODS,
    NONPRIVATE,
    Method,
    build_rule,
    check_method,
    clip_bound,
    clip_bound_names,
    method,
    method_parameters,
    per_layer_methods,
    per_layer_refusals,
    register_method,
    registered_method,
    unregister_method,
)

__all__ = [
    "METHODS",
    "NONPRIVATE",
    "AdaCliP",
    "AdaCliPState",
    "AdamBC",
    "AdamState",
    "AutoClip",
    "CanaryAdapter",
    "ClipRule",
    "ClippedSum",
    "FixedClip",
    "GeoClip",
    "GeoClipState",
    "MacAdam",
    "MacAdamState",
    "Method",
    "PerLayerClip",
    "PerLayerQuantileState",
    "PerSampleAdaptiveClip",
    "QuantileClip",
    "QuantileClipState",
    "QuantileScaleState",
    "Stats",
    "build_rule",
    "check_method",
    "clip_bound",
    "clip_bound_names",
    "clip_factors",
    "method",
    "method_parameters",
    "per_layer_methods",
    "per_layer_refusals",
    "register_method",
    "registered_method",
    "supports_norm_path",
    "unregister_method",
]
