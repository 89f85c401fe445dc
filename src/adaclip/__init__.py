"""adaclip: differentially private training with adaptive clipping (AdaCliP and friends) on Opacus.

Two wings:

* the library – :mod:`adaclip.methods` (the clipping rules and their registry), :mod:`adaclip.engine`
  (``make_private`` and Opacus's ``PrivacyEngine`` interface, the optimizer, per-example paths,
  sampling, data-parallel steps), :mod:`adaclip.privacy` (accounting) and :mod:`adaclip.audit` (the
  empirical privacy audit);
* the research pipeline – :mod:`adaclip.research` (params, data, models, training runs, sweeps,
  analysis, figures and the report), which uses the library and is never imported by it.

The names below are imported on first use (PEP 562), so that ``import adaclip.research.data`` (say)
does not load the training engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0.dev0"

__all__ = [
    "METHODS",
    "AdaCliP",
    "AdaCliPState",
    "AdamBC",
    "AdamState",
    "AdaptiveClipDPOptimizer",
    "AutoClip",
    "ClipRule",
    "FixedClip",
    "GeoClip",
    "GeoClipState",
    "MacAdam",
    "MacAdamState",
    "PerSampleAdaptiveClip",
    "PrivacyEngine",
    "QuantileClip",
    "QuantileClipState",
    "epsilon",
    "make_private",
    "noise_multiplier_for",
]
_HOMES = {
    "engine": ("make_private", "AdaptiveClipDPOptimizer", "PrivacyEngine"),
    "privacy.accounting": ("epsilon", "noise_multiplier_for"),
}
_EXPORTS = {name: f"adaclip.{home}" for home, names in _HOMES.items() for name in names}
_EXPORTS.update({name: "adaclip.methods" for name in __all__ if name not in _EXPORTS})

if TYPE_CHECKING:
    from adaclip.engine import AdaptiveClipDPOptimizer, PrivacyEngine, make_private
    from adaclip.methods import (
        METHODS,
        AdaCliP,
        AdaCliPState,
        AdamBC,
        AdamState,
        AutoClip,
        ClipRule,
        FixedClip,
        GeoClip,
        GeoClipState,
        MacAdam,
        MacAdamState,
        PerSampleAdaptiveClip,
        QuantileClip,
        QuantileClipState,
    )
    from adaclip.privacy.accounting import epsilon, noise_multiplier_for


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adaclip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
