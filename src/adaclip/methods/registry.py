"""The one registry of clipping methods: every per-method fact, read by the engine, the CLI, the sweeps and the audit.

Each method lives in its own module (its rule, its state and its audit view, with the paper and the
equations in the module docstring); :data:`METHODS` below is the only place that lists them, with what
the rest of the library needs to know about each: its label and paper, its clip bound, what a tuning
grid searches, and whether it has per-layer clipping.  :func:`register_method` adds a method (a new
method module calls it once); :func:`registered_method` adds one for the duration of a ``with`` block.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from adaclip._validate import require, require_one_of
from adaclip.methods.adaclip import AdaCliP, AdaCliPAdapter
from adaclip.methods.adambc import AdamBC, AdamBCAdapter
from adaclip.methods.auto import AutoClip, AutoClipAdapter
from adaclip.methods.base import ClipRule
from adaclip.methods.canary import CanaryAdapter
from adaclip.methods.fixed import FixedClip, FixedClipAdapter
from adaclip.methods.geoclip import GeoClip, GeoClipAdapter
from adaclip.methods.macadam import MacAdam, MacAdamAdapter
from adaclip.methods.psac import PerSampleAdaptiveClip, PerSampleAdaptiveClipAdapter
from adaclip.methods.quantile import QuantileClip, QuantileClipAdapter

NONPRIVATE = "nonprivate"
"""The name of the non-private baseline (plain SGD, no clipping or noise) wherever a method name is expected."""

NO_PER_LAYER = "its rule has no per-layer form"
"""The reason of the refusal of ``clipping="per_layer"`` for a method that gives none."""

_SET_BY_ENGINE = frozenset({"noise_multiplier", "expected_batch_size"})


@dataclass(frozen=True, kw_only=True)
class Method:
    """One registered clipping method: every fact about it that code outside its module reads.

    * ``rule``: the :class:`~adaclip.methods.base.ClipRule` class; ``label`` its display name; ``paper``
      the reference; ``canary`` its audit view (:mod:`adaclip.audit`).
    * ``clip_bound``: the rule parameter that sets the clip bound of the first step (``clip_norm`` for
      the rules with a fixed one, ``initial_clip`` for the adaptive ones, whose first step is DP-SGD with
      that bound; ``None`` for a rule without one, such as AUTO-S, which normalises every gradient).
      Opacus's ``max_grad_norm`` is read as this parameter (:mod:`adaclip.engine.opacus_arguments`).
    * What a tuning grid searches besides the learning rate: ``scale_parameter``, the rule parameter that
      sets the scale of its clipping (DP-SGD's ``C``; the initial scale that AdaCliP's and quantile
      clipping's private quantile then adapts; the floor ``h1`` at which DP-MacAdam's bias-free scale
      settles; ``None`` for a method without one, such as AUTO-S); ``step_per_scale``: whether the
      released gradient is proportional to that parameter (DP-SGD: clipped vectors and noise both scale
      with ``C``), so that a learning rate is best read per unit of scale (``lr x C``).
    * ``releases_step``: the rule releases an optimiser step (an Adam direction built from the released
      gradient) rather than a gradient, to be applied by plain SGD without momentum.
    * ``per_layer``: whether :class:`~adaclip.methods.per_layer.PerLayerClip` wraps the rule
      (``clipping="per_layer"``); ``per_layer_refusal`` the one-line reason when it does not.
    """

    rule: type[ClipRule]
    label: str
    paper: str
    canary: type[CanaryAdapter[Any]]
    clip_bound: str | None
    scale_parameter: str | None
    step_per_scale: bool = False
    releases_step: bool = False
    per_layer: bool = False
    per_layer_refusal: str = NO_PER_LAYER


_METHODS: dict[str, Method] = {}
METHODS: Mapping[str, Method] = _METHODS
"""Every clipping method by name, in the report's order (change it with :func:`register_method`)."""


def _rule_parameters(rule: type[ClipRule]) -> list[str]:
    return [p for p in inspect.signature(rule).parameters if p not in _SET_BY_ENGINE]


PER_LAYER_RULES: tuple[type[ClipRule], ...] = (FixedClip, QuantileClip, AutoClip, PerSampleAdaptiveClip)
"""The rules :class:`~adaclip.methods.per_layer.PerLayerClip` weights per layer (their own weight at each layer's
bound); a subclass of one of them is weighted as that rule."""


def register_method(name: str, entry: Method) -> None:
    """Add method ``name``; the engine, the CLI, the sweeps, the labels and the audit then offer it.

    Raises ``ValueError`` for a name already taken (or :data:`NONPRIVATE`), an entry that is not a
    :class:`Method`, or a ``clip_bound`` / ``scale_parameter`` that is not a parameter of the rule.
    """
    if not isinstance(name, str) or not name or name == NONPRIVATE or name in _METHODS:
        raise ValueError(
            f"name must be a new method name (not {NONPRIVATE!r} nor one of {list(_METHODS)}), got {name!r}"
        )
    if not isinstance(entry, Method):
        raise ValueError(f"entry must be a Method, got {type(entry).__name__}")
    require(
        not entry.per_layer or issubclass(entry.rule, PER_LAYER_RULES),
        f"per_layer=True needs a rule that per-layer clipping knows how to weight (a subclass of "
        f"{', '.join(rule.__name__ for rule in PER_LAYER_RULES)}), got {entry.rule.__name__}; give per_layer=False "
        "with a per_layer_refusal",
    )
    accepted = _rule_parameters(entry.rule)
    for field_name in ("clip_bound", "scale_parameter"):
        parameter = getattr(entry, field_name)
        if parameter is not None and parameter not in accepted:
            raise ValueError(
                f"{field_name} must be None or a parameter of {entry.rule.__name__} {accepted}, got {parameter!r}"
            )
    _METHODS[name] = entry


def unregister_method(name: str) -> None:
    """Remove method ``name`` (added by :func:`register_method`)."""
    method(name)
    del _METHODS[name]


@contextmanager
def registered_method(name: str, entry: Method) -> Iterator[str]:
    """Method ``name`` registered inside the ``with`` block (for tests and experiments); yields ``name``."""
    register_method(name, entry)
    try:
        yield name
    finally:
        unregister_method(name)


def method(name: str) -> Method:
    """The registry entry of ``name``, or a ``ValueError`` listing the methods."""
    return METHODS[require_one_of("method", name, METHODS)]


def method_parameters(name: str) -> list[str]:
    """The keyword parameters of method ``name``'s rule beyond the privacy ones (set by the engine)."""
    return _rule_parameters(method(name).rule)


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


def clip_bound_names() -> tuple[str, ...]:
    """The rules' names for their first step's clip bound (``clip_norm``, ``initial_clip``), in registry order."""
    return tuple(dict.fromkeys(m.clip_bound for m in METHODS.values() if m.clip_bound is not None))


def clip_bound(rule: ClipRule) -> float:
    """The clip bound of ``rule``'s first step: its :attr:`Method.clip_bound` parameter's value, 1 without one.

    The rule's attribute of the first name of :func:`clip_bound_names` it has (a per-layer rule's
    ``clip_norm`` is its total bound ``sqrt(sum_k C_k^2)``); 1 for a rule without any, which normalises
    every gradient to norm below 1 (AUTO-S, Bu et al. 2023).
    """
    name = next((name for name in clip_bound_names() if hasattr(rule, name)), None)
    return 1.0 if name is None else float(getattr(rule, name))


def per_layer_methods() -> tuple[str, ...]:
    """The methods with per-layer clipping (``clipping="per_layer"``), in registry order."""
    return tuple(name for name, entry in METHODS.items() if entry.per_layer)


def per_layer_refusals() -> dict[str, str]:
    """Why each other method has no per-layer clipping (the one-line reason of the refusal)."""
    return {name: entry.per_layer_refusal for name, entry in METHODS.items() if not entry.per_layer}


_WHOLE_VECTOR = (
    "clips the whole transformed vector (g - a) / b to norm 1, its per-coordinate scale b already weighs every layer"
)

register_method(
    "fixed",
    Method(
        rule=FixedClip,
        label="DP-SGD (fixed C)",
        paper="Abadi et al. 2016",
        canary=FixedClipAdapter,
        clip_bound="clip_norm",
        scale_parameter="clip_norm",
        step_per_scale=True,
        per_layer=True,
    ),
)
register_method(
    "adaclip",
    Method(
        rule=AdaCliP,
        label="AdaCliP",
        paper="Pichapati et al. 2019, arXiv 1908.07643",
        canary=AdaCliPAdapter,
        clip_bound="initial_clip",
        scale_parameter="initial_clip",
        per_layer_refusal=f"AdaCliP {_WHOLE_VECTOR}",
    ),
)
register_method(
    "quantile",
    Method(
        rule=QuantileClip,
        label="quantile clipping",
        paper="Andrew et al. 2021",
        canary=QuantileClipAdapter,
        clip_bound="initial_clip",
        scale_parameter="initial_clip",
        per_layer=True,
    ),
)
register_method(
    "auto",
    Method(
        rule=AutoClip,
        label="AUTO-S",
        paper="Bu et al. 2023",
        canary=AutoClipAdapter,
        clip_bound=None,
        scale_parameter=None,
        per_layer=True,
    ),
)
register_method(
    "geoclip",
    Method(
        rule=GeoClip,
        label="GeoClip",
        paper="Gilani et al. 2025, arXiv 2506.06549",
        canary=GeoClipAdapter,
        clip_bound="initial_clip",
        scale_parameter="h1",
        per_layer_refusal="GeoClip clips the whole vector after a transform that mixes the coordinates of every layer",
    ),
)
register_method(
    "psac",
    Method(
        rule=PerSampleAdaptiveClip,
        label="DP-PSAC",
        paper="Xia et al. 2023",
        canary=PerSampleAdaptiveClipAdapter,
        clip_bound="clip_norm",
        scale_parameter="clip_norm",
        step_per_scale=True,
        per_layer=True,
    ),
)
register_method(
    "macadam",
    Method(
        rule=MacAdam,
        label="DP-MacAdam",
        paper="Tasnim, Sankar, Kosut 2026, arXiv 2606.05435",
        canary=MacAdamAdapter,
        clip_bound="initial_clip",
        scale_parameter="h1",
        releases_step=True,
        per_layer_refusal=f"DP-MacAdam {_WHOLE_VECTOR}",
    ),
)
register_method(
    "adambc",
    Method(
        rule=AdamBC,
        label="DP-AdamBC",
        paper="Tang, Shpilevskiy, Lécuyer 2024, arXiv 2312.14334",
        canary=AdamBCAdapter,
        clip_bound="clip_norm",
        scale_parameter="clip_norm",
        releases_step=True,
        per_layer_refusal=(
            "DP-AdamBC's rule and its noise-variance correction take one flat clip_norm (not implemented per layer)"
        ),
    ),
)
