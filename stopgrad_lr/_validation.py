"""Argument checks, with the message format of Keras's own errors.

Every public function of the package checks its arguments here, so every bad
argument reads the same way: "Invalid value received for argument `x`.
Expected <what is accepted, and what to do>. Received: x=<the value>".
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

# The scale is stored and applied in float32: the largest finite float32, and
# the smallest normal one. Below it a float32 is subnormal, and TensorFlow and
# XLA flush subnormals to zero on CPU, so such a scale stops the gradient.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38


def invalid(
    argument: str, expected: str, value: Any, *, typed: bool = False
) -> ValueError:
    """The error for `argument=value`; `expected` says what is accepted (and
    may go on with what to do). `typed` adds the value's type, for values
    refused for their type."""
    received = f"{argument}={value!r}"
    if typed:
        received += f" of type {type(value).__name__}"
    return ValueError(
        f"Invalid value received for argument `{argument}`. Expected "
        f"{expected}. Received: {received}"
    )


def is_real(value: Any) -> bool:
    """Whether `value` is a Python or NumPy real number, and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def validate_real(value: Any, argument: str) -> float:
    """`value` as a float if it is a real number (not a bool)."""
    if not is_real(value):
        raise invalid(argument, "a real number (not a bool)", value, typed=True)
    return float(value)


def validate_positive(value: Any, argument: str, allow_inf: bool = False) -> float:
    """A real number > 0, finite unless `allow_inf`."""
    if not is_real(value):
        raise invalid(argument, "a positive float", value, typed=True)
    number = float(value)
    if not (number > 0 and (allow_inf or math.isfinite(number))):
        raise invalid(
            argument, "a float > 0" if allow_inf else "a finite float > 0", value
        )
    return number


def validate_time(value: Any, argument: str) -> float:
    """A step or epoch: a finite real number >= 0."""
    time = validate_real(value, argument)
    if not time >= 0 or math.isinf(time):
        raise invalid(argument, "a finite number >= 0", value)
    return time


def validate_count(value: Any, argument: str, minimum: int) -> int:
    """An integer (Python or NumPy, not a bool) >= `minimum`."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        raise invalid(argument, f"an integer >= {minimum}", value)
    return int(value)


def validate_flag(value: Any, argument: str) -> bool:
    """A `True`/`False` argument; anything else (a string, 0, None) is refused,
    since `copy="no"` would read as true."""
    if isinstance(value, bool):
        return value
    raise invalid(argument, "True or False", value, typed=True)


def validate_choice(value: Any, argument: str, choices: Sequence[str]) -> str:
    """One of the strings `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise invalid(argument, f"one of {tuple(choices)}", value)
    return value


def validate_scale(scale: Any, argument: str = "scale") -> float:
    """A gradient scale as a Python float: a real number (not a bool) that is
    finite in float32 and, unless it is zero, not so small that float32
    rounds or flushes it to zero."""
    if not is_real(scale):
        raise invalid(
            argument,
            "a finite float (a Python or NumPy real number, not a bool)",
            scale,
            typed=True,
        )
    value = float(scale)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise invalid(
            argument,
            f"a float that is finite in float32 (|{argument}| <= 3.4e38)",
            scale,
        )
    if value != 0.0 and abs(value) < FLOAT32_TINY:
        raise invalid(
            argument,
            f"0 or a float with |{argument}| >= 1.2e-38: the scale is applied in "
            f"float32, where a smaller value becomes 0 (or a subnormal that "
            f"TensorFlow and XLA flush to 0) and silently stops the gradient. "
            f"Pass 0 to stop it on purpose",
            scale,
        )
    return value


def validate_multiplier(value: Any, argument: str) -> float:
    """A learning-rate multiplier: a scale (finite and not flushed to zero in
    float32) >= 0."""
    value = validate_scale(value, argument=argument)
    if value < 0:
        raise invalid(
            argument,
            "a multiplier >= 0 (a negative gradient scale reverses training; "
            "use insert_gradient_scales or GradientReversal for that)",
            value,
        )
    return value
