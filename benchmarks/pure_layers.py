"""Do stopgrad_lr's layers cost more than Keras's own identity layer?

The layers are pure (docs/architecture.md): `call` does only its
arithmetic. This times one eager training step (`run_eagerly=True`, where
any per-call Python work would show) of an MLP with 20 `GradientScale(1.0)`
layers between its Dense layers, against the same MLP with 20
`keras.layers.Identity` layers, in interleaved rounds, and writes
`docs/generated/pure-layers.md`:

    KERAS_BACKEND=tensorflow python benchmarks/pure_layers.py

The scale layer does real work that Identity does not (a custom gradient
that multiplies by the scale), so the ratio measures that arithmetic, not a
check: the stack walk and thread that an earlier version ran here cost more.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from _report import REPOSITORY, machine_description, publish, today

import stopgrad_lr

COMMAND = "KERAS_BACKEND=tensorflow python benchmarks/pure_layers.py"
OUTPUT = REPOSITORY / "docs" / "generated" / "pure-layers.md"
LAYERS = 20
WIDTH = 32
BATCH = 32
STEPS = 20
ROUNDS = 7


def mlp(between: Callable[[int], keras.layers.Layer]) -> keras.Model:
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((WIDTH,))
    for i in range(LAYERS):
        x = keras.layers.Dense(WIDTH, activation="relu", name=f"dense{i}")(x)
        x = between(i)(x)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x))
    model.compile(keras.optimizers.SGD(0.01), "mse", run_eagerly=True)
    return model


def step_time(model: keras.Model, x: Any, y: Any) -> float:
    start = time.perf_counter()
    for _ in range(STEPS):
        model.train_on_batch(x, y)
    return (time.perf_counter() - start) / STEPS


def measure() -> dict[str, list[float]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, WIDTH)).astype("float32")
    y = rng.standard_normal((BATCH, 1)).astype("float32")
    models = {
        "identity": mlp(lambda i: keras.layers.Identity(name=f"between{i}")),
        "scale": mlp(lambda i: stopgrad_lr.GradientScale(1.0, name=f"between{i}")),
    }
    for model in models.values():
        step_time(model, x, y)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(ROUNDS):
        for name, model in models.items():
            times[name].append(step_time(model, x, y))
    return times


def render(times: dict[str, list[float]]) -> str:
    ratios = [s / i for s, i in zip(times["scale"], times["identity"], strict=True)]
    median = statistics.median(ratios)
    return "\n".join(
        [
            f"Measured on {today()} with `{COMMAND}` ({keras.backend.backend()}, "
            f"{machine_description()}).",
            "",
            f"One eager training step of a {LAYERS + 1}-layer MLP (width {WIDTH}, "
            f"batch {BATCH}) with {LAYERS} layers between its Dense layers, "
            f"{STEPS} steps per round, {ROUNDS} interleaved rounds:",
            "",
            "| between the Dense layers | step (ms, median) | range (ms) |",
            "|---|---:|---:|",
            *(
                f"| {label} | {statistics.median(times[key]) * 1e3:.2f} | "
                f"{min(times[key]) * 1e3:.2f}-{max(times[key]) * 1e3:.2f} |"
                for key, label in (
                    ("identity", "`keras.layers.Identity`"),
                    ("scale", "`stopgrad_lr.GradientScale(1.0)`"),
                )
            ),
            "",
            f"Ratio GradientScale / Identity, per round: median **{median:.2f}x** "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}x).",
            "",
        ]
    )


def main() -> int:
    return publish(OUTPUT, render(measure()))


if __name__ == "__main__":
    sys.exit(main())
