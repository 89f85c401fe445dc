"""The clipping methods and their one registry.

Each method lives in its own module (its rule, its state and its audit view, with the paper and the
equations in the module docstring); :data:`METHODS` below is the only place that lists them.  Adding
a method means writing its module and adding one :class:`Method` entry here: ``make_private``, the
command line, the report's sweeps and labels, the benchmark and the privacy audit all read this
registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from adaclip._validate import require_one_of
from adaclip.methods.adaclip import AdaCliP, AdaCliPAdapter, AdaClipState, QuantileScaleState
from adaclip.methods.adambc import AdamBC, AdamBCAdapter, AdamState
from adaclip.methods.auto import AutoClip, AutoClipAdapter
from adaclip.methods.base import ClippedSum, ClipRule, Stats, clip_factors, supports_norm_path
from adaclip.methods.canary import CanaryAdapter
from adaclip.methods.fixed import FixedClip, FixedClipAdapter
from adaclip.methods.geoclip import GeoClip, GeoClipAdapter, GeoClipState
from adaclip.methods.macadam import MacAdam, MacAdamAdapter, MacAdamState
from adaclip.methods.per_layer import PER_LAYER_METHODS, PerLayerClip, PerLayerQuantileState
from adaclip.methods.psac import PerSampleAdaptiveClip, PerSampleAdaptiveClipAdapter
from adaclip.methods.quantile import QuantileClip, QuantileClipAdapter, QuantileClipState


@dataclass(frozen=True)
class Method:
    """One registered clipping method.

    ``rule`` is the :class:`~adaclip.methods.base.ClipRule` class; ``label`` its display name;
    ``scale_parameter`` the rule parameter that sets the scale of its clipping (DP-SGD's ``C``; the
    initial scale that AdaCliP's and quantile clipping's private quantile then adapts; the floor ``h1`` at
    which DP-MacAdam's bias-free scale settles; ``None`` for a method without one, such as AUTO-S),
    the knob a tuning grid sweeps besides the learning rate; ``step_per_scale`` says whether
    the released gradient is proportional to that parameter (DP-SGD: clipped vectors and noise both
    scale with ``C``), so that a learning rate is best read per unit of scale (``lr x C``);
    ``releases_step`` says that the rule releases an optimiser step (an Adam direction built from the
    released gradient) rather than a gradient, to be applied by plain SGD without momentum;
    ``canary`` the audit view of :mod:`adaclip.privacy.audit`; ``paper`` the reference.
    """

    rule: type[ClipRule]
    label: str
    scale_parameter: str | None
    canary: type[CanaryAdapter[Any]]
    paper: str
    step_per_scale: bool = False
    releases_step: bool = False


METHODS: Mapping[str, Method] = {
    "fixed": Method(FixedClip, "DP-SGD (fixed C)", "clip_norm", FixedClipAdapter, "Abadi et al. 2016", True),
    "adaclip": Method(AdaCliP, "AdaCliP", "initial_clip", AdaCliPAdapter, "Pichapati et al. 2019, arXiv 1908.07643"),
    "quantile": Method(QuantileClip, "quantile clipping", "initial_clip", QuantileClipAdapter, "Andrew et al. 2021"),
    "auto": Method(AutoClip, "AUTO-S", None, AutoClipAdapter, "Bu et al. 2023"),
    "geoclip": Method(GeoClip, "GeoClip", "h1", GeoClipAdapter, "Gilani et al. 2025, arXiv 2506.06549"),
    "psac": Method(
        PerSampleAdaptiveClip, "DP-PSAC", "clip_norm", PerSampleAdaptiveClipAdapter, "Xia et al. 2023", True
    ),
    "macadam": Method(
        MacAdam, "DP-MacAdam", "h1", MacAdamAdapter, "Tasnim, Sankar, Kosut 2026, arXiv 2606.05435", releases_step=True
    ),
    "adambc": Method(
        AdamBC,
        "DP-AdamBC",
        "clip_norm",
        AdamBCAdapter,
        "Tang, Shpilevskiy, Lécuyer 2024, arXiv 2312.14334",
        releases_step=True,
    ),
}
"""Every clipping method by name, in the report's order."""

_SET_BY_ENGINE = frozenset({"noise_multiplier", "expected_batch_size"})


def method(name: str) -> Method:
    """The registry entry of ``name``, or a ``ValueError`` listing the methods."""
    return METHODS[require_one_of("method", name, METHODS)]


def method_parameters(name: str) -> list[str]:
    """The keyword parameters of method ``name``'s rule beyond the privacy ones (set by the engine)."""
    return [p for p in inspect.signature(method(name).rule).parameters if p not in _SET_BY_ENGINE]


def check_method(name: str, params: Mapping[str, object]) -> None:
    """Reject an unknown method name or parameter, naming what is accepted."""
    accepted = method_parameters(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for method {name!r}; it accepts {accepted}")


def build_rule(name: str, *, noise_multiplier: float, expected_batch_size: float, **params: object) -> ClipRule:
    """The rule of method ``name`` with ``params`` (the rule's own defaults for the others)."""
    check_method(name, params)
    factory: Callable[..., ClipRule] = method(name).rule
    return factory(noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size, **params)


__all__ = [
    "METHODS",
    "PER_LAYER_METHODS",
    "AdaCliP",
    "AdaClipState",
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
    "clip_factors",
    "method",
    "method_parameters",
    "supports_norm_path",
]
