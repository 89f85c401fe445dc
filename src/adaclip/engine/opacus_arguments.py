"""Opacus's ``make_private`` arguments: taken with their Opacus meaning, or refused with the adaclip name to use.

Opacus's ``PrivacyEngine.make_private`` takes engine arguments that :func:`adaclip.make_private` would
otherwise read as parameters of the clipping rule.  :func:`translate` takes them out of the keyword
arguments first:

* ``max_grad_norm``: the clip bound ``C`` of the first step, under the rule's own name (the registry's
  :attr:`~adaclip.methods.registry.Method.clip_bound`): ``clip_norm``
  for the rules with a fixed one (DP-SGD, DP-PSAC: every clipped gradient has norm at most ``C``),
  ``initial_clip`` for the adaptive ones (quantile clipping, AdaCliP, GeoClip: their first step is
  DP-SGD with clip ``C``, as Opacus's ``clipping="adaptive"`` starts from ``max_grad_norm``).  A method
  without a clip bound (AUTO-S) refuses it.
* ``target_delta``: ``delta``.
* ``clipping``: ``"flat"`` (one norm over all parameters, the default) or ``"per_layer"`` (a bound per
  trainable parameter, :mod:`adaclip.methods.per_layer`, for the methods in
  :func:`~adaclip.methods.registry.per_layer_methods`): ``max_grad_norm`` is then a list of per-layer
  bounds, one per trainable parameter in the optimizer's order, or one bound split equally
  (``C / sqrt(K)`` each).  ``"adaptive"`` is refused with ``method="quantile"``.
* ``poisson_sampling=True``, ``secure_mode=False``, ``wrap_model=True``, ``rand_on_empty=False``: what
  adaclip always does; the other values are refused with the reason.
* ``grad_sample_mode``: ``"hooks"`` (Opacus's per-layer hooks, the ``[B, d]`` per-example gradients)
  is ``per_example="materialise"``; ``"ghost"`` (norms without per-example gradients) is adaclip's
  book-keeping path, ``per_example="fast"``.  When given it decides ``per_example``.
* ``batch_first``: ``False`` for sequence-first inputs ``[T, B, ...]``, on both paths (each layer's
  batch dimension: :func:`~adaclip.engine.bookkeeping.layer_batch_dims`).

Names of Opacus features that adaclip lacks or names differently (``noise_generator``, Opacus's
adaptive-clipping parameters, ``criterion``, ...) are refused with what to use.  A name is read as
Opacus's only when the chosen method has no parameter of that name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from adaclip._validate import require_bool, require_one_of, require_open_unit, require_positive
from adaclip.engine.optimizer import PerExample
from adaclip.methods import clip_bound_names, method_parameters
from adaclip.methods import method as method_entry
from adaclip.methods.per_layer import check_per_layer

GRAD_SAMPLE_MODES: dict[str, PerExample] = {"hooks": "materialise", "ghost": "fast"}
"""Opacus's ``grad_sample_mode`` values that adaclip has, and the ``per_example`` path each is."""

_REFUSED: dict[str, str] = {
    "noise_generator": "use seed= (it fixes the noise and the Poisson sampling)",
    "criterion": (
        "only Opacus's ghost clipping needs the criterion: adaclip's fast path works with the plain loss "
        "(PrivacyEngine.make_private(grad_sample_mode='ghost') returns it unchanged)"
    ),
    "target_unclipped_quantile": "use method='quantile' with target_quantile=",
    "clipbound_learning_rate": "use method='quantile' with clip_lr=",
    "unclipped_num_std": "use method='quantile' with count_noise_std=",
    "max_clipbound": "adaclip's quantile clipping has no upper bound on the clip norm",
    "min_clipbound": "adaclip's quantile clipping has no lower bound on the clip norm",
    "epsilon_tolerance": "make_private calibrates sigma to 0.5 %; call adaclip.noise_multiplier_for to choose another",
}

_ALWAYS: dict[str, tuple[object, str]] = {
    "poisson_sampling": (True, "adaclip always samples Poisson batches (its accounting assumes them)"),
    "secure_mode": (
        False,
        "noise comes from torch's floating-point PRNG, with no defence against floating-point attacks "
        "(Mironov 2012); use seed= for reproducible runs",
    ),
    "wrap_model": (True, "make_private returns the wrapped module"),
    "rand_on_empty": (False, "an empty Poisson batch stays empty (the step still releases noise)"),
}

_CLIPPING = {
    "flat": "",
    "per_layer": "",
    "adaptive": "use method='quantile' (Andrew et al. 2021, what Opacus's clipping='adaptive' implements)",
}

OPACUS_NAMES = frozenset(
    {"max_grad_norm", "target_delta", "clipping", "grad_sample_mode", "batch_first", *_REFUSED, *_ALWAYS}
)
"""Every Opacus argument name :func:`translate` reads."""


@dataclass(frozen=True)
class Translated:
    """The keyword arguments with Opacus's names resolved.

    ``method_params`` are the rule's parameters (``max_grad_norm`` under the rule's name); ``delta``,
    ``per_example`` and ``batch_first`` are the engine's settings; ``clipping`` is ``"flat"`` or
    ``"per_layer"``, and ``layer_bounds`` the per-layer bounds when ``max_grad_norm`` listed them.
    """

    method_params: dict[str, object]
    delta: float | None
    per_example: PerExample
    batch_first: bool
    clipping: str = "flat"
    layer_bounds: tuple[float, ...] | None = None


def require_opacus_default(name: str, value: object) -> None:
    """Refuse ``poisson_sampling``, ``secure_mode``, ``wrap_model`` or ``rand_on_empty`` unless adaclip does that."""
    expected, reason = _ALWAYS[name]
    if require_bool(name, value) is not expected:
        raise ValueError(f"{name}={value!r} is not offered: {reason}; drop {name}")


def clip_bound_name(method: str) -> str | None:
    """The parameter of ``method``'s rule that sets its first step's clip bound (``None`` if it has none)."""
    return method_entry(method).clip_bound


def translate(
    method: str, arguments: Mapping[str, object], *, delta: float | None, per_example: PerExample
) -> Translated:
    """Resolve Opacus's names among ``arguments`` (``make_private``'s extra keywords) for ``method``.

    Raises ``ValueError`` naming the argument and the adaclip name or value to use instead.
    """
    accepted = method_parameters(method)
    opacus = {name: value for name, value in arguments.items() if name in OPACUS_NAMES and name not in accepted}
    params = {name: value for name, value in arguments.items() if name not in opacus}
    refused = sorted(opacus.keys() & _REFUSED.keys())
    if refused:
        raise ValueError(f"{refused[0]} is an Opacus argument adaclip does not take: {_REFUSED[refused[0]]}")
    for name in _ALWAYS.keys() & opacus.keys():
        require_opacus_default(name, opacus[name])
    _check_clip_bound_names(method, params)
    clipping = opacus.get("clipping", "flat")
    require_one_of("clipping", clipping, _CLIPPING)
    if _CLIPPING[str(clipping)]:
        raise ValueError(f"clipping={clipping!r}: {_CLIPPING[str(clipping)]}")
    if clipping == "per_layer":
        check_per_layer(method)
    layer_bounds = None
    max_grad_norm = opacus.get("max_grad_norm")
    if isinstance(max_grad_norm, list | tuple):
        layer_bounds = _layer_bounds(method, params, max_grad_norm, str(clipping))
    elif "max_grad_norm" in opacus:
        params = _with_max_grad_norm(method, params, max_grad_norm)
    if "target_delta" in opacus:
        if delta is not None:
            raise ValueError("give delta or Opacus's target_delta, not both")
        delta = require_open_unit("target_delta", opacus["target_delta"], " (use < 1/N for N examples)")
    per_example = _per_example(opacus.get("grad_sample_mode"), per_example)
    batch_first = require_bool("batch_first", opacus.get("batch_first", True))
    return Translated(
        method_params=params,
        delta=delta,
        per_example=per_example,
        batch_first=batch_first,
        clipping=str(clipping),
        layer_bounds=layer_bounds,
    )


def _check_clip_bound_names(method: str, params: Mapping[str, object]) -> None:
    """Refuse another rule's name for the clip bound, naming this rule's."""
    own = clip_bound_name(method)
    for name in clip_bound_names():
        if name in params and name != own:
            use = f"its clip bound is {own}= (or Opacus's max_grad_norm=)" if own else "it has no clip bound"
            raise ValueError(f"{name} means nothing for method {method!r}: {use}")


def _layer_bounds(
    method: str, params: Mapping[str, object], bounds: Sequence[object], clipping: str
) -> tuple[float, ...]:
    """``max_grad_norm`` given as a list: the per-layer bounds, checked (Opacus's ``clipping="per_layer"``)."""
    if clipping != "per_layer":
        raise ValueError(
            "max_grad_norm is a list of per-layer bounds: it needs clipping='per_layer' (or give one number)"
        )
    own = clip_bound_name(method)
    if own is None:
        raise ValueError(f"max_grad_norm means nothing for method {method!r}: it has no clip bound; drop max_grad_norm")
    if own in params:
        raise ValueError(f"give max_grad_norm or {own}, not both (for method {method!r} they are the same)")
    if not bounds:
        raise ValueError("max_grad_norm is an empty list: give one bound per trainable parameter")
    return tuple(require_positive(f"max_grad_norm[{k}]", bound) for k, bound in enumerate(bounds))


def _with_max_grad_norm(method: str, params: dict[str, object], value: object) -> dict[str, object]:
    own = clip_bound_name(method)
    if own is None:
        raise ValueError(
            f"max_grad_norm means nothing for method {method!r}: it has no clip bound (its parameters are "
            f"{method_parameters(method)}); drop max_grad_norm"
        )
    if own in params:
        raise ValueError(f"give max_grad_norm or {own}, not both (for method {method!r} they are the same)")
    return {**params, own: value}


def _per_example(grad_sample_mode: object, per_example: PerExample) -> PerExample:
    if grad_sample_mode is None:
        return per_example
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode={grad_sample_mode!r} is not offered: use 'hooks' (per_example='materialise') or "
            "'ghost' (per_example='fast', book-keeping); for data-parallel training use distributed=True"
        )
    mode = GRAD_SAMPLE_MODES[str(grad_sample_mode)]
    if per_example != "fast" and per_example != mode:
        raise ValueError(f"grad_sample_mode={grad_sample_mode!r} contradicts per_example={per_example!r}: give one")
    return mode
