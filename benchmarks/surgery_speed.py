"""How fast is model surgery, and what does a stop save?

Four measurements, written to `docs/generated/surgery-speed.md`:

1. Rewrite plus analysis of ResNet50 (`insert_gradient_scales` at four block
   outputs, then `gradient_cuts` and `effective_multipliers` of the result):
   the best of several runs. Floor: 0.5 s on a 2-core machine.
2. The same on a BERT-base-sized keras-hub `BertBackbone` (12 layers, hidden
   768, built without weights; a scale after each `transformer_layer_*`),
   as a ratio to Keras's own `clone_model(model, clone_function=lambda
   layer: layer)` of the same model, which walks the same graph and calls
   the same layers again: median and range over interleaved rounds. Floor:
   3x.
3. Analysis time against layer count, on stacks of residual blocks of
   growing depth: the time per layer should stay flat (linear growth).
4. One SGD training step of a 64x64 ResNet50, plain, with a stop
   (`GradientStop`) at `conv4_block6_out`, and with every layer up to
   `conv4_block6_out` set `trainable = False` (the most a graph-level
   mechanism can save: no backward pass and no update there, and
   BatchNormalization in inference mode). Floor for the stop: 0.55x the
   plain step. Two more timings say where the remaining time goes: the
   plain model's inference forward pass, and a training step of the layers
   after the boundary alone (a model from `conv4_block6_out` to the logits),
   which every variant has to run.

    python benchmarks/surgery_speed.py

Step times are medians over interleaved rounds, so that a busy machine
slows both variants alike.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from _report import REPOSITORY, machine_description, today, write_atomically

import stopgrad_lr

COMMAND = "python benchmarks/surgery_speed.py"
OUTPUT = REPOSITORY / "docs" / "generated" / "surgery-speed.md"
BOUNDARIES = [
    "conv2_block3_out",
    "conv3_block4_out",
    "conv4_block6_out",
    "conv5_block3_out",
]
DEPTHS = [25, 50, 100, 200, 400]
REWRITE_FLOOR_S = 0.5
BERT_FLOOR = 3.0
BERT_ROUNDS = 7
STOP_FLOOR = 0.55
FORWARD = "plain forward pass (inference)"


def best_time(function: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        # Start each run with an empty collector, so that a full collection
        # that earlier garbage triggers does not land in one run's time.
        gc.collect()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def rewrite_and_analyse(model: keras.Model) -> None:
    rewritten = stopgrad_lr.insert_gradient_scales(
        model, dict.fromkeys(BOUNDARIES, 0.5)
    )
    stopgrad_lr.gradient_cuts(rewritten)
    stopgrad_lr.effective_multipliers(rewritten)


def bert_base() -> keras.Model:
    import keras_hub

    return keras_hub.models.BertBackbone(
        vocabulary_size=30522,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        intermediate_dim=3072,
        max_sequence_length=512,
    )


def rewrite_and_analyse_bert(model: keras.Model) -> None:
    rewritten = stopgrad_lr.insert_gradient_scales(model, {"transformer_layer_*": 0.5})
    stopgrad_lr.gradient_cuts(rewritten)
    stopgrad_lr.effective_multipliers(rewritten)


def bert_ratios(rounds: int = BERT_ROUNDS) -> list[float]:
    """Per round, rewrite + analysis time / `clone_model` time, interleaved
    so that a busy machine slows both alike."""
    model = bert_base()
    variants = {
        "stopgrad_lr": lambda: rewrite_and_analyse_bert(model),
        "clone_model": lambda: keras.models.clone_model(
            model, clone_function=lambda layer: layer
        ),
    }
    for function in variants.values():
        function()  # warm up
    ratios = []
    for _ in range(rounds):
        seconds = {name: best_time(function, 1) for name, function in variants.items()}
        ratios.append(seconds["stopgrad_lr"] / seconds["clone_model"])
        print(
            f"BERT-base rewrite + analysis {seconds['stopgrad_lr']:.3f} s, "
            f"clone_model {seconds['clone_model']:.3f} s"
        )
    return ratios


def residual_stack(blocks: int) -> keras.Model:
    """`blocks` residual MLP blocks of four layers each."""
    inputs = keras.Input((16,))
    x = keras.layers.Dense(16)(inputs)
    for _ in range(blocks):
        y = keras.layers.Dense(16, activation="relu")(x)
        y = keras.layers.Dense(16)(y)
        x = keras.layers.Add()([x, y])
        x = keras.layers.LayerNormalization()(x)
    return keras.Model(inputs, keras.layers.Dense(1)(x))


def analyse(model: keras.Model) -> None:
    stopgrad_lr.gradient_cuts(model)
    stopgrad_lr.effective_multipliers(model)


def step_times(rounds: int = 5, steps: int = 5) -> dict[str, list[float]]:
    keras.utils.set_random_seed(0)
    plain = keras.applications.ResNet50(
        weights=None, input_shape=(64, 64, 3), classes=10
    )
    stopped = stopgrad_lr.insert_gradient_scales(
        plain, {"conv4_block6_out": 0}, copy=True
    )
    frozen = keras.models.clone_model(plain)
    frozen.set_weights(plain.get_weights())
    names = [layer.name for layer in frozen.layers]
    for layer in frozen.layers[: names.index("conv4_block6_out") + 1]:
        layer.trainable = False
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 64, 64, 3)).astype("float32")
    y = rng.integers(0, 10, 32)
    boundary = plain.get_layer("conv4_block6_out").output
    tail = keras.Model(boundary, plain.outputs)
    features = rng.standard_normal((32, *boundary.shape[1:])).astype("float32")
    models = {
        "plain": plain,
        "stop at conv4_block6_out": stopped,
        "frozen up to conv4_block6_out": frozen,
        "layers after conv4_block6_out alone": tail,
    }
    inputs = {model: features if model is tail else x for model in models.values()}
    for model in models.values():
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss="sparse_categorical_crossentropy",
        )
        with warnings.catch_warnings():
            # Keras warns once per trace that the stopped or frozen layers get
            # no gradient: that is the point here.
            warnings.simplefilter("ignore", UserWarning)
            model.train_on_batch(inputs[model], y)  # trace and warm up
    plain.predict_on_batch(x)
    times: dict[str, list[float]] = {name: [] for name in [*models, FORWARD]}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(inputs[model], y)
            times[name].append((time.perf_counter() - start) / steps)
        start = time.perf_counter()
        for _ in range(steps):
            plain.predict_on_batch(x)
        times[FORWARD].append((time.perf_counter() - start) / steps)
    return times


def main() -> int:
    resnet = keras.applications.ResNet50(weights=None)
    rewrite_s = best_time(lambda: rewrite_and_analyse(resnet), repeats=5)
    print(f"ResNet50 rewrite + analysis: {rewrite_s:.3f} s")

    bert = bert_ratios()
    bert_ratio = statistics.median(bert)
    print(
        f"BERT-base rewrite + analysis / clone_model: {bert_ratio:.2f}x "
        f"(range {min(bert):.2f}-{max(bert):.2f})"
    )

    growth = []
    for blocks in DEPTHS:
        model = residual_stack(blocks)
        layers = len(model.layers)
        seconds = best_time(lambda model=model: analyse(model), repeats=3)
        growth.append((layers, seconds))
        print(f"{layers:5d} layers: analysis {seconds * 1e3:8.1f} ms")
    per_layer = [seconds / layers for layers, seconds in growth]
    growth_ratio = per_layer[-1] / per_layer[0]

    times = step_times()
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: value / medians["plain"] for name, value in medians.items()}
    stop_ratio = ratios["stop at conv4_block6_out"]
    for name, ratio in ratios.items():
        print(f"{name} / plain training step: {ratio:.2f}")

    lines = [
        "<!-- Generated by benchmarks/surgery_speed.py; do not edit. -->",
        f"Measured on {today()} on {machine_description()}. Regenerate with "
        f"`{COMMAND}`.",
        "",
        "| measurement | result | floor |",
        "|---|---|---|",
        f"| ResNet50: insert 4 scales, then `gradient_cuts` and "
        f"`effective_multipliers` (best of 5) | {rewrite_s:.3f} s | "
        f"<= {REWRITE_FLOOR_S} s |",
        f"| BERT-base `BertBackbone` (12 layers, hidden 768): insert a scale "
        f"after each `transformer_layer_*`, then `gradient_cuts` and "
        f"`effective_multipliers` / `keras.models.clone_model(model, "
        f"clone_function=lambda layer: layer)` (median of {len(bert)} "
        f"interleaved rounds, range {min(bert):.2f}-{max(bert):.2f}x) | "
        f"{bert_ratio:.2f}x | <= {BERT_FLOOR:g}x |",
        f"| 64x64 ResNet50 training step (batch 32, SGD), stop at "
        f"`conv4_block6_out` / plain (median of 5 rounds) | {stop_ratio:.2f}x | "
        f"<= {STOP_FLOOR}x |",
        f"| same, every layer up to `conv4_block6_out` frozen (`trainable=False`) "
        f"/ plain, for comparison | "
        f"{ratios['frozen up to conv4_block6_out']:.2f}x | - |",
        f"| training step of the layers after `conv4_block6_out` alone / plain "
        f"step | {ratios['layers after conv4_block6_out alone']:.2f}x | - |",
        f"| forward pass of the plain model (inference) / plain step | "
        f"{ratios[FORWARD]:.2f}x | - |",
        "",
        f"The BERT-base rewrite's floor is "
        f"{'met' if bert_ratio <= BERT_FLOOR else 'NOT met'}: Keras's own clone "
        f"of the same graph is the reference, so the ratio says what the "
        f"analysis and the inserted layers cost on top of rebuilding.",
        "",
        f"The stop's floor is {'met' if stop_ratio <= STOP_FLOOR else 'NOT met'}. "
        f"A stop removes the backward pass before the boundary; what is left "
        f"is the forward pass and the training step of the layers after it, "
        f"which no graph-level mechanism can remove (freezing the layers "
        f"before the boundary, which also skips their BatchNormalization "
        f"statistics, is the bound).",
        "",
        "Analysis time (`gradient_cuts` + `effective_multipliers`) against layer "
        "count, residual MLP stacks:",
        "",
        "| layers | analysis | per layer |",
        "|---|---|---|",
        *(
            f"| {layers} | {seconds * 1e3:.1f} ms | {seconds / layers * 1e6:.0f} us |"
            for layers, seconds in growth
        ),
        "",
        f"Time per layer at {growth[-1][0]} layers is {growth_ratio:.2f}x that "
        f"at {growth[0][0]} layers (1.0 would be exactly linear).",
        "",
    ]
    write_atomically(OUTPUT, "\n".join(lines))
    print(f"wrote {OUTPUT.relative_to(REPOSITORY)}")
    failed = (
        rewrite_s > REWRITE_FLOOR_S
        or bert_ratio > BERT_FLOOR
        or stop_ratio > STOP_FLOOR
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
