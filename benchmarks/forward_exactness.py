"""Is the forward pass of a gradient scale really the identity?

Compares three ways to write "identity forward, gradient times k backward" on
100,000 standard-normal values per dtype:

- seed: `k * x + (1 - k) * stop_gradient(x)`, the arrangement this project
  started from;
- `stop_gradient` method: `s + k * (x - s)` with `s = stop_gradient(x)`;
- `custom_gradient` method: an identity whose gradient is `upstream * k`.

It counts the elements whose output is not bit-identical to the input, in
eager mode and (on TensorFlow) under XLA, and shows what each form does with
+-inf, -0.0 and NaN. Writes `docs/generated/forward-exactness.md`, included by
`docs/how-it-works.md`:

    python benchmarks/forward_exactness.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from _report import REPOSITORY, machine_description, publish, today
from keras import ops

import stopgrad_lr

COMMAND = "python benchmarks/forward_exactness.py"
OUTPUT = REPOSITORY / "docs" / "generated" / "forward-exactness.md"
SIZE = 100_000
DTYPES = ("float32", "float16", "bfloat16")
SCALES = (0.1, 0.3, 0.77, 1e-3)
SPECIAL_VALUES = np.array([np.inf, -np.inf, -0.0, np.nan, 1.5], dtype="float32")

Form = Callable[[Any, float], Any]
# Eager (the form itself) or compiled (a traced version of it).
Mode = Callable[[Form], Form]


def seed_form(x: Any, k: float) -> Any:
    return k * x + (1 - k) * ops.stop_gradient(x)


def stop_gradient_form(x: Any, k: float) -> Any:
    return stopgrad_lr.scale_gradient(x, k, method="stop_gradient")


def custom_gradient_form(x: Any, k: float) -> Any:
    return stopgrad_lr.scale_gradient(x, k, method="custom_gradient")


FORMS: dict[str, Form] = {
    "seed": seed_form,
    "stop_gradient method": stop_gradient_form,
    "custom_gradient method": custom_gradient_form,
}


def modes() -> dict[str, Mode]:
    """Eager, plus XLA on the TensorFlow backend."""
    result: dict[str, Mode] = {"eager": lambda form: form}
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        def xla(form: Form) -> Form:
            return tf.function(form, jit_compile=True, autograph=False)

        result["XLA"] = xla
    return result


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How many representable values lie between `a` and `b` (same signs)."""
    unsigned = f"uint{8 * a.dtype.itemsize}"
    a_bits = a.view(unsigned).astype("int64")
    b_bits = b.view(unsigned).astype("int64")
    return np.abs(a_bits - b_bits)


def changed_elements(form: Form, dtype: str, k: float, mode: Mode) -> tuple[float, int]:
    """The fraction of outputs not bit-identical to the input, and the max ulps."""
    values = np.random.default_rng(0).standard_normal(SIZE)
    x = ops.convert_to_tensor(values, dtype=dtype)
    output = np.asarray(ops.convert_to_numpy(mode(form)(x, k)))
    expected = np.asarray(ops.convert_to_numpy(x))
    distance = ulp_distance(output, expected)
    return float(np.mean(distance != 0)), int(distance.max())


def exactness_table() -> str:
    header = ["dtype", "k", "mode", *(f"{name}: changed" for name in FORMS)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * len(FORMS)) + "|",
    ]
    for dtype in DTYPES:
        for k in SCALES:
            for mode_name, mode in modes().items():
                cells = [f"`{dtype}`", f"{k:g}", mode_name]
                for form in FORMS.values():
                    fraction, ulps = changed_elements(form, dtype, k, mode)
                    cells.append(
                        f"{fraction:.1%} (max {ulps} ulp)" if fraction else "0"
                    )
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def special_values_table(k: float = 0.1) -> str:
    x = ops.convert_to_tensor(SPECIAL_VALUES)
    header = [f"form, k = {k:g}", *(repr(float(value)) for value in SPECIAL_VALUES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, form in FORMS.items():
        output = np.asarray(ops.convert_to_numpy(form(x, k)))
        cells = [name, *(str(value) for value in output)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render() -> str:
    return f"""Measured with `{COMMAND}` on {today()}.
Machine: {machine_description()}.

{SIZE:,} standard-normal values per dtype. "changed" is the fraction of
outputs that are not bit-identical to the input; "ulp" is a unit in the last
place of that dtype.

{exactness_table()}

What each form returns for special float32 inputs:

{special_values_table()}
"""


def main() -> int:
    return publish(OUTPUT, render())


if __name__ == "__main__":
    sys.exit(main())
