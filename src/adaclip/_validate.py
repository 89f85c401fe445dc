"""The one set of argument checks used across the package.

Each ``require_*`` function returns the checked value (converted to a plain Python type) or raises
``ValueError`` with a one-line message that names the parameter, what it accepts and what it got.
Booleans are never accepted as numbers (``True`` is an ``int`` in Python); NumPy scalars are (they
register as ``numbers.Real`` / ``numbers.Integral``).  The ``is_*`` predicates state the same rules as
yes-or-no answers, for the files whose errors name dotted keys (``params.yaml``, ``defaults.yaml``);
:func:`require` raises a message for settings that only make sense together.  A test keeps hand-written
argument checks out of every other module.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Collection, Mapping
from typing import TypeVar

T = TypeVar("T")


def as_real(value: object) -> float | None:
    """``value`` as a float if it is a real number and not a ``bool`` (Python or NumPy scalars), else ``None``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def as_int(value: object) -> int | None:
    """``value`` as an int if it is an integer and not a ``bool``, else ``None``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None


def is_finite(value: object) -> bool:
    """A finite real number that is not a ``bool``."""
    number = as_real(value)
    return number is not None and math.isfinite(number)


def require_positive(name: str, value: object) -> float:
    """A finite number ``> 0``."""
    number = as_real(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def require_non_negative(name: str, value: object) -> float:
    """A finite number ``>= 0``."""
    number = as_real(value)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def require_above(name: str, value: object, bound: float, hint: str = "") -> float:
    """A finite number ``> bound`` (``hint`` says what the number is)."""
    number = as_real(value)
    if number is None or not math.isfinite(number) or number <= bound:
        raise ValueError(f"{name} must be a finite number > {bound:g}{hint}, got {value!r}")
    return number


def require_at_least(name: str, value: object, minimum: float, hint: str = "") -> float:
    """A finite number ``>= minimum`` (``hint`` says what the number is)."""
    number = as_real(value)
    if number is None or not math.isfinite(number) or number < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}{hint}, got {value!r}")
    return number


def require_in_range(name: str, value: object, low: float, high: float, *, closed_high: bool = False) -> float:
    """A number in ``[low, high)`` (or ``[low, high]`` with ``closed_high``)."""
    number = as_real(value)
    if number is None or not (low <= number and (number <= high if closed_high else number < high)):
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value!r}")
    return number


def require_open_unit(name: str, value: object, hint: str = "") -> float:
    """A number in the open interval ``(0, 1)`` (a probability such as delta)."""
    number = as_real(value)
    if number is None or not 0 < number < 1:
        raise ValueError(f"{name} must lie in (0, 1){hint}, got {value!r}")
    return number


def require_int(name: str, value: object, *, minimum: int = 1) -> int:
    """An integer ``>= minimum``."""
    number = as_int(value)
    if number is None or number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return number


def require_bool(name: str, value: object) -> bool:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def require_one_of(name: str, value: T, options: Collection[T]) -> T:
    """One of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def require_rate(name: str, value: object, hint: str = "") -> float:
    """A number in the half-open interval ``(0, 1]`` (a sampling rate)."""
    number = as_real(value)
    if number is None or not 0 < number <= 1:
        raise ValueError(f"{name} must lie in (0, 1]{hint}, got {value!r}")
    return number


def require_at_most(name: str, value: object, maximum: float) -> float:
    """A finite number in ``(0, maximum]``."""
    number = as_real(value)
    if number is None or not 0 < number <= maximum:
        raise ValueError(f"{name} must be a number in (0, {maximum:g}], got {value!r}")
    return number


def require_seed(name: str, value: object) -> int:
    """An integer ``>= 0`` (a random seed)."""
    return require_int(name, value, minimum=0)


def require_delta_below_inverse_n(delta: float, size: int, *, name: str = "delta", what: str = "examples") -> float:
    """``delta`` below ``1 / N`` for a dataset of ``N = size`` examples (Dwork & Roth 2014, §2.3: a ``delta`` of
    ``1 / N`` or more allows releasing one whole record)."""
    if not delta < 1 / size:
        raise ValueError(
            f"{name}={delta} must be below 1/N = {1 / size:.3g} for N={size} {what} (1e-5 or N^-1.1 are usual)"
        )
    return delta


def is_device_name(value: object) -> bool:
    """Whether ``value`` names a CPU or CUDA device as torch parses it (``cpu``, ``cuda``, ``cuda:i``)."""
    import torch  # the only check that needs torch; imported here so that the checks stay importable alone

    try:
        return isinstance(value, str) and torch.device(value).type in ("cpu", "cuda")
    except RuntimeError:
        return False


def require_device(name: str, value: object) -> str:
    """A device name torch parses as CPU or CUDA: ``'cpu'``, ``'cuda'`` or ``'cuda:i'``."""
    if not is_device_name(value):
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:i', got {value!r}")
    return str(value)


def require_path(name: str, value: object) -> str:
    """A non-empty path (a string or ``os.PathLike``), returned as a string."""
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise ValueError(f"{name} must be a folder path (a string), got {value!r}")
    return str(value)


def require_str_keys(name: str, value: object, example: str) -> dict[str, object]:
    """A mapping with string keys (e.g. a method's parameters), returned as a new ``dict``."""
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ValueError(f"{name} must be a mapping of names to values, e.g. {example}, got {value!r}")
    return dict(value)


# Predicates: the same rules as ``require_*``, answering yes or no (for the params file, whose errors name
# dotted keys and say what each key accepts).


def is_positive(value: object) -> bool:
    """A finite number ``> 0``."""
    return is_finite(value) and float(value) > 0  # type: ignore[arg-type]


def is_positive_int(value: object) -> bool:
    """An integer ``>= 1``."""
    number = as_int(value)
    return number is not None and number >= 1


def is_seed(value: object) -> bool:
    """An integer ``>= 0``."""
    number = as_int(value)
    return number is not None and number >= 0


def is_open_unit(value: object) -> bool:
    """A number in ``(0, 1)``."""
    return is_finite(value) and 0 < float(value) < 1  # type: ignore[arg-type]


def is_at_least(minimum: float) -> Callable[[object], bool]:
    """A predicate: a finite number ``>= minimum``."""
    return lambda value: is_finite(value) and float(value) >= minimum  # type: ignore[arg-type]


def is_in_unit_interval(value: object) -> bool:
    """A number in ``[0, 1)`` (e.g. a momentum)."""
    return is_finite(value) and 0 <= float(value) < 1  # type: ignore[arg-type]


def is_name(value: object) -> bool:
    """A non-empty string."""
    return isinstance(value, str) and value != ""


def is_string(value: object) -> bool:
    """A string."""
    return isinstance(value, str)


def is_one_of(options: Collection[str]) -> Callable[[object], bool]:
    """A predicate: a string among ``options``."""
    return lambda value: isinstance(value, str) and value in options


def is_registered(names: Callable[[], Collection[str]]) -> Callable[[object], bool]:
    """A predicate: a string among the names ``names()`` gives when the value is checked (a registry that can grow
    after the predicate is built)."""
    return lambda value: isinstance(value, str) and value in names()


def is_optional(check: Callable[[object], bool]) -> Callable[[object], bool]:
    """A predicate: ``None`` or what ``check`` accepts."""
    return lambda value: value is None or check(value)


def is_list_of(check: Callable[[object], bool]) -> Callable[[object], bool]:
    """A predicate: a non-empty list whose every item ``check`` accepts."""
    return lambda value: isinstance(value, list) and len(value) > 0 and all(check(item) for item in value)


def is_mapping_of(check: Callable[[object], bool]) -> Callable[[object], bool]:
    """A predicate: a mapping with string keys whose every value ``check`` accepts."""
    return lambda value: (
        isinstance(value, Mapping) and all(isinstance(key, str) and check(item) for key, item in value.items())
    )


def is_mapping(value: object) -> bool:
    """A mapping."""
    return isinstance(value, Mapping)


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: for the settings that only make sense together (the
    message names them, what they accept and what they are)."""
    if not condition:
        raise ValueError(message)
