"""The one set of argument checks used across the package.

Each ``require_*`` function returns the checked value (converted to a plain Python type) or raises
``ValueError`` with a one-line message that names the parameter, what it accepts and what it got.
Booleans are never accepted as numbers (``True`` is an ``int`` in Python); NumPy scalars are (they
register as ``numbers.Real`` / ``numbers.Integral``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
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
