"""adaclip: differentially private training with adaptive clipping (AdaCliP and friends) on Opacus."""

from adaclip.accounting import epsilon, noise_multiplier_for
from adaclip.clipping import AdaCliP, AdaClipState, AutoClip, ClipRule, FixedClip, PerSampleAdaptiveClip, QuantileClip, QuantileClipState
from adaclip.engine import METHODS, make_private
from adaclip.geoclip import GeoClip, GeoClipState
from adaclip.optimizer import AdaptiveClipDPOptimizer

__all__ = [
    "METHODS",
    "AdaCliP",
    "AdaClipState",
    "AdaptiveClipDPOptimizer",
    "AutoClip",
    "ClipRule",
    "FixedClip",
    "GeoClip",
    "GeoClipState",
    "PerSampleAdaptiveClip",
    "QuantileClip",
    "QuantileClipState",
    "epsilon",
    "make_private",
    "noise_multiplier_for",
]
__version__ = "0.1.0"
