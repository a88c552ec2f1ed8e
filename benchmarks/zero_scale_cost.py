"""Does a gradient scale of 0 save the backward pass? (No; a stop does.)

Times one training step of a small residual CNN on CPU, with the first half
of the network (stem and two residual blocks) behind a boundary at a cut of
the graph, in five variants:

- no boundary;
- `GradientScale(1.0)` at the boundary;
- `GradientScale(0.0)` at the boundary: the first half gets zero gradients;
- `keras.ops.stop_gradient` at the boundary: the first half gets none;
- no boundary, first half frozen (`trainable = False`).

Writes `docs/generated/zero-scale-cost.md`, included by
`docs/how-it-works.md`:

    python benchmarks/zero_scale_cost.py

Step times on a shared machine are noisy: each variant is timed in several
interleaved rounds, and the page gives the median and the range.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from _report import REPOSITORY, machine_description, publish, today

import stopgrad_lr

COMMAND = "python benchmarks/zero_scale_cost.py"
OUTPUT = REPOSITORY / "docs" / "generated" / "zero-scale-cost.md"
BATCH_SIZE = 32
IMAGE_SIZE = 32
WIDTH = 32
STEPS_PER_ROUND = 10
ROUNDS = 5
SEED = 0


class StopGradient(keras.layers.Layer):
    """`keras.ops.stop_gradient` as a layer."""

    def call(self, inputs: Any) -> Any:
        return keras.ops.stop_gradient(inputs)


def residual_block(x: Any, name: str) -> Any:
    y = keras.layers.Conv2D(WIDTH, 3, padding="same", name=f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(WIDTH, 3, padding="same", name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    y = keras.layers.Add(name=f"{name}_add")([x, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def build_model(boundary: keras.layers.Layer | None, freeze: bool) -> keras.Model:
    """stem, lower1, lower2, [boundary], upper1, upper2, classifier.

    The boundary sits on the output of `lower2`, a cut of the graph: every
    path from the lower layers to the loss goes through it. `freeze` makes
    the stem and the lower blocks non-trainable.
    """
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(WIDTH, 3, padding="same", name="stem")(inputs)
    x = residual_block(x, "lower1")
    x = residual_block(x, "lower2")
    if boundary is not None:
        x = boundary(x)
    x = residual_block(x, "upper1")
    x = residual_block(x, "upper2")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(10, name="classifier")(x)
    model = keras.Model(inputs, outputs)
    if freeze:
        for layer in model.layers:
            if layer.name.startswith(("stem", "lower")):
                layer.trainable = False
    return model


VARIANTS: dict[str, Callable[[], keras.Model]] = {
    "no boundary": lambda: build_model(None, freeze=False),
    "`GradientScale(1.0)`": lambda: build_model(
        stopgrad_lr.GradientScale(1.0), freeze=False
    ),
    "`GradientScale(0.0)`": lambda: build_model(
        stopgrad_lr.GradientScale(0.0), freeze=False
    ),
    "`stop_gradient`": lambda: build_model(StopGradient(), freeze=False),
    "first half frozen": lambda: build_model(None, freeze=True),
}


def prepare(make_model: Callable[[], keras.Model]) -> Callable[[], float]:
    """Compiles a variant and returns a function timing STEPS_PER_ROUND steps."""
    keras.utils.set_random_seed(SEED)
    model = make_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((BATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("f4")
    y = rng.standard_normal((BATCH_SIZE, 10)).astype("float32")
    with warnings.catch_warnings():
        # Behind a stop_gradient the first half has no gradient at all, which
        # is the point here; Keras warns about it once, at the first step.
        warnings.filterwarnings("ignore", message="Gradients do not exist")
        for _ in range(3):
            model.train_on_batch(x, y)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(STEPS_PER_ROUND):
            model.train_on_batch(x, y)
        return (time.perf_counter() - start) / STEPS_PER_ROUND

    return run


def measure() -> dict[str, list[float]]:
    """Seconds per step, one value per round, for each variant.

    The rounds are interleaved across variants, so that a slow period of the
    machine affects all of them alike.
    """
    runs = {name: prepare(make_model) for name, make_model in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            times[name].append(run())
    return times


def render(times: dict[str, list[float]]) -> str:
    baseline = statistics.median(times["no boundary"])
    lines = [
        "| variant | median step time | range over rounds | relative to no boundary |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(
            f"| {name} | {median * 1e3:.1f} ms "
            f"| {min(values) * 1e3:.1f} to {max(values) * 1e3:.1f} ms "
            f"| {median / baseline:.2f}x |"
        )
    return f"""Measured with `{COMMAND}` on {today()}.
Machine: {machine_description()}.

One SGD training step (`train_on_batch`, batch {BATCH_SIZE} of
{IMAGE_SIZE}x{IMAGE_SIZE}x3 images) of a residual CNN with four residual
blocks of {WIDTH} channels; the boundary sits after the second block, on a
cut. Each variant ran {ROUNDS} rounds of {STEPS_PER_ROUND} steps, interleaved
with the other variants; the table gives the median and the range of the
per-round mean step time.

{chr(10).join(lines)}
"""


def main() -> int:
    return publish(OUTPUT, render(measure()))


if __name__ == "__main__":
    sys.exit(main())
