"""Is a zero multiplier as cheap as `trainable = False`? Time and memory.

Times one training step (`train_on_batch`, SGD with momentum) in four arms,
interleaved round by round in one process per backend:

- plain: no boundary;
- stop only: a `GradientStop` at the boundary and nothing else (what a zero
  scale inserted before the freeze, and what a hand-placed stop still is);
- freeze: `stopgrad_lr.insert_gradient_scales(model, {boundary: 0.0})`, a stop
  plus Keras's `trainable = False` on the (shared) layers upstream;
- `trainable=False`: Keras's own freeze of every layer up to the boundary.

On a 64x64 ResNet50 (TensorFlow) at three boundaries, and on an MLP on
TensorFlow, JAX and torch. Then the memory of training steps on a keras-hub
BERT of BERT-base size (110M parameters) with its lower half frozen (a zero
after `transformer_layer_5`), against the same rewrite with a nonzero scale
there and against Keras's own freeze, each in a process of its own, the
original model referenced throughout. Writes
`docs/generated/freeze-cost.md`, included by `docs/how-it-works.md`:

    python benchmarks/freeze_cost.py

The floors: the toolkit's freeze takes at most 1.05x the step time of
`trainable=False` at every point (median over the rounds), and adds at most
1% of the model's weight bytes to peak memory over the unfrozen rewrite.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

COMMAND = "python benchmarks/freeze_cost.py"
FLOOR = 1.05
RESNET_BOUNDARIES = ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out")
MEMORY_BOUNDARY = "transformer_layer_5"  # the lower half of 12 layers
MEMORY_ARMS = ("unfrozen rewrite", "freeze", "trainable=False")
MEMORY_BATCH, MEMORY_LENGTH = 4, 32
IMAGE_SIZE = 64
RESNET_BATCH = 16
RESNET_ROUNDS = 5
RESNET_STEPS = 3
MLP_WIDTH = 512
MLP_DEPTH = 6  # Dense layers before the head; the boundary is after the 4th
MLP_BATCH = 256
MLP_ROUNDS = 7
MLP_STEPS = 10
MEMORY_STEPS = 5
SEED = 0
ARMS = ("plain", "stop only", "freeze", "trainable=False")


# In a worker process ------------------------------------------------------------


def _resnet(keras: Any) -> Any:
    keras.utils.set_random_seed(SEED)
    return keras.applications.ResNet50(
        weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), classes=10
    )


def _mlp(keras: Any) -> Any:
    keras.utils.set_random_seed(SEED)
    inputs = x = keras.Input((MLP_WIDTH,))
    for index in range(MLP_DEPTH):
        x = keras.layers.Dense(MLP_WIDTH, activation="relu", name=f"dense{index}")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(x))


def _upstream(model: Any, boundary: str) -> list[Any]:
    """The layers up to the boundary, in the order of `model.layers` (a
    topological order: for ResNet50 and the MLP exactly the boundary's
    upstream region)."""
    names = [layer.name for layer in model.layers]
    return model.layers[: names.index(boundary) + 1]


def _arm(keras: Any, build: Callable[[Any], Any], arm: str, boundary: str) -> Any:
    import stopgrad_lr

    model = build(keras)
    if arm == "plain":
        return model
    if arm == "freeze":
        return stopgrad_lr.insert_gradient_scales(model, {boundary: 0.0})
    if arm == "trainable=False":
        for layer in _upstream(model, boundary):
            layer.trainable = False
        return model

    def call_function(layer: Any, *args: Any, **kwargs: Any) -> Any:
        outputs = layer(*args, **kwargs)
        if layer.name == boundary:
            outputs = stopgrad_lr.GradientStop(name="stop")(outputs)
        return outputs

    return keras.models.clone_model(
        model, clone_function=lambda layer: layer, call_function=call_function
    )


def _data(keras: Any, model: Any, batch: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((batch, *model.input_shape[1:])).astype("float32")
    y = rng.standard_normal((batch, 10)).astype("float32")
    return x, y


def _compiled(keras: Any, model: Any) -> Any:
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    return model


def _timer(keras: Any, model: Any, batch: int, steps: int) -> Callable[[], float]:
    x, y = _data(keras, model, batch)
    for _ in range(2):  # tracing, compilation, optimizer slots
        model.train_on_batch(x, y)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        return (time.perf_counter() - start) / steps

    return run


def _interleaved(timers: dict[str, Callable[[], float]], rounds: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, run in timers.items():
            times[name].append(run())
    return times


def worker_speed(part: str) -> dict[str, Any]:
    import keras
    from _report import machine_description

    if part == "resnet":
        build, batch, steps, rounds = _resnet, RESNET_BATCH, RESNET_STEPS, RESNET_ROUNDS
        boundaries: tuple[str, ...] = RESNET_BOUNDARIES
    else:
        build, batch, steps, rounds = _mlp, MLP_BATCH, MLP_STEPS, MLP_ROUNDS
        boundaries = ("dense3",)
    timers = {"plain": _timer(keras, _compiled(keras, build(keras)), batch, steps)}
    for boundary in boundaries:
        for arm in ARMS[1:]:
            model = _compiled(keras, _arm(keras, build, arm, boundary))
            timers[f"{boundary}|{arm}"] = _timer(keras, model, batch, steps)
    return {
        "machine": machine_description(),
        "times": _interleaved(timers, rounds),
        "boundaries": list(boundaries),
    }


def _memory_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _bert_base(keras: Any) -> Any:
    """keras-hub's BERT at BERT-base size (no weights downloaded), with a
    pooled head, as one functional model."""
    import keras_hub

    keras.utils.set_random_seed(SEED)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30522,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        intermediate_dim=3072,
        max_sequence_length=512,
        dropout=0.0,
    )
    head = keras.layers.Dense(10, name="head")(backbone.output["pooled_output"])
    return keras.Model(backbone.input, head, name="bert_base")


def _bert_data(keras: Any) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(SEED)
    shape = (MEMORY_BATCH, MEMORY_LENGTH)
    x = {
        "token_ids": rng.integers(1, 30522, shape).astype("int32"),
        "segment_ids": np.zeros(shape, "int32"),
        "padding_mask": np.ones(shape, "int32"),
    }
    return x, rng.standard_normal((MEMORY_BATCH, 10)).astype("float32")


def worker_memory(arm: str) -> dict[str, Any]:
    import keras

    import stopgrad_lr

    original = _bert_base(keras)  # referenced until the end
    weight_bytes = sum(int(math.prod(w.shape)) * 4 for w in original.weights)
    gc.collect()
    before_rewrite = _memory_kib("VmRSS")
    if arm == "trainable=False":
        names = [layer.name for layer in original.layers]
        for layer in original.layers[: names.index(MEMORY_BOUNDARY) + 1]:
            layer.trainable = False
        model = original
    else:
        scale = 0.0 if arm == "freeze" else 0.5
        model = stopgrad_lr.insert_gradient_scales(original, {MEMORY_BOUNDARY: scale})
    gc.collect()
    after_rewrite = _memory_kib("VmRSS")
    _compiled(keras, model)
    x, y = _bert_data(keras)
    gc.collect()
    baseline = _memory_kib("VmRSS")
    # Writing 5 resets the peak resident set size (VmHWM) to the current one.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")
    for _ in range(MEMORY_STEPS):
        model.train_on_batch(x, y)
    return {
        "rewrite_kib": after_rewrite - before_rewrite,
        "baseline_kib": baseline,
        "peak_kib": _memory_kib("VmHWM"),
        "weight_bytes": weight_bytes,
        "trainable_values": sum(
            int(math.prod(v.shape)) for v in model.trainable_variables
        ),
        "optimizer_values": sum(
            int(math.prod(v.shape)) for v in model.optimizer.variables
        ),
        "original_alive": original is not None,
    }


# In the main process ------------------------------------------------------------


def _run_worker(backend: str, *args: str) -> dict[str, Any]:
    from _report import REPOSITORY

    # The checkout's stopgrad_lr, whatever is installed.
    path = os.pathsep.join(
        filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])
    )
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": path,
    }
    completed = subprocess.run(
        [sys.executable, __file__, "--worker", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode:
        raise RuntimeError(f"worker {backend} {args} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _ms(values: list[float]) -> str:
    return (
        f"{statistics.median(values) * 1e3:.1f} ms "
        f"({min(values) * 1e3:.1f}-{max(values) * 1e3:.1f})"
    )


def _speed_table(result: dict[str, Any], model: str) -> tuple[list[str], bool]:
    times = result["times"]
    plain = statistics.median(times["plain"])
    lines = [
        f"| {model} boundary | plain | stop only | freeze (this toolkit) "
        f"| `trainable=False` | stop / plain | freeze / plain "
        f"| `trainable=False` / plain | freeze / `trainable=False` |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    met = True
    for boundary in result["boundaries"]:
        arms = {arm: times[f"{boundary}|{arm}"] for arm in ARMS[1:]}
        medians = {arm: statistics.median(values) for arm, values in arms.items()}
        ratio = medians["freeze"] / medians["trainable=False"]
        met = met and ratio <= FLOOR
        lines.append(
            f"| {boundary} | {_ms(times['plain'])} | {_ms(arms['stop only'])} "
            f"| {_ms(arms['freeze'])} | {_ms(arms['trainable=False'])} "
            f"| {medians['stop only'] / plain:.2f} | {medians['freeze'] / plain:.2f} "
            f"| {medians['trainable=False'] / plain:.2f} | **{ratio:.2f}** |"
        )
    return lines, met


def render(speed: dict[str, dict[str, Any]], memory: dict[str, dict[str, Any]]) -> str:
    from _report import today

    sections, all_met = [], True
    for key, title in (
        ("resnet-tensorflow", "ResNet50, 64x64, TensorFlow"),
        ("mlp-tensorflow", "MLP, TensorFlow"),
        ("mlp-jax", "MLP, JAX"),
        ("mlp-torch", "MLP, torch"),
    ):
        lines, met = _speed_table(speed[key], title)
        all_met = all_met and met
        sections.append(
            f"**{title}** ({speed[key]['machine']})\n\n" + "\n".join(lines) + "\n"
        )
    mib = 1024.0
    rows = []
    for arm, values in memory.items():
        rows.append(
            f"| {arm} | {values['peak_kib'] / mib:.0f} MiB "
            f"| {values['baseline_kib'] / mib:.0f} MiB "
            f"| {values['rewrite_kib'] / mib:.1f} MiB "
            f"| {values['trainable_values'] / 1e6:.1f} M "
            f"| {values['optimizer_values'] * 4 / mib / mib:.1f} MiB |"
        )
    weight_mib = memory["freeze"]["weight_bytes"] / mib / mib
    extra_mib = (
        memory["freeze"]["peak_kib"] - memory["unfrozen rewrite"]["peak_kib"]
    ) / mib
    memory_met = extra_mib <= 0.01 * weight_mib
    verdict = "met" if all_met else "NOT met"
    memory_verdict = "met" if memory_met else "NOT met"
    return f"""Measured with `{COMMAND}` on {today()}.

One training step (`train_on_batch`, `SGD(0.01, momentum=0.9)`, MSE loss):
ResNet50 (`weights=None`, {IMAGE_SIZE}x{IMAGE_SIZE}x3, batch {RESNET_BATCH},
{RESNET_ROUNDS} rounds of {RESNET_STEPS} steps) and an MLP ({MLP_DEPTH} Dense
layers of {MLP_WIDTH} and a head, batch {MLP_BATCH}, boundary after the fourth,
{MLP_ROUNDS} rounds of {MLP_STEPS} steps). Every arm is its own model, all
timed round by round in turn in one process per backend, after two warm-up
steps; each cell is the median of the per-round mean step time, with the
range over rounds. Ratios are of medians. *stop only* is a `GradientStop`
with the upstream layers left trainable; *freeze* is
`insert_gradient_scales(model, {{boundary: 0.0}})`.

Floor, the toolkit's freeze at most {FLOOR}x `trainable=False` at every
point: **{verdict}**.

{chr(10).join(sections)}
Memory, a keras-hub BERT of BERT-base size ({weight_mib:.0f} MiB of float32
weights), batch {MEMORY_BATCH} of {MEMORY_LENGTH} tokens, {MEMORY_STEPS} training
steps, each arm in a fresh TensorFlow process, the original model referenced
throughout. *unfrozen rewrite* is `insert_gradient_scales(model,
{{"{MEMORY_BOUNDARY}": 0.5}})`, *freeze* the same with 0.0 (the lower half
frozen), *trainable=False* Keras's own freeze of the same layers. *Peak* is
the highest resident set size during the steps (`VmHWM`, reset after
`compile`, at the *baseline*); *rewrite* is the resident set size the rewrite
added, before compiling (a copy of the frozen weights would show here);
*optimizer* is the size of the optimizer's variables.

| arm | peak | baseline | rewrite | trainable values | optimizer |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Floor, the freeze's peak at most the unfrozen rewrite's plus 1% of the
weights ({0.01 * weight_mib:.1f} MiB): **{memory_verdict}** (freeze minus
unfrozen rewrite: {extra_mib:+.1f} MiB).
"""


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _report import REPOSITORY, write_atomically

    speed = {"resnet-tensorflow": _run_worker("tensorflow", "speed", "resnet")}
    for backend in ("tensorflow", "jax", "torch"):
        speed[f"mlp-{backend}"] = _run_worker(backend, "speed", "mlp")
    memory = {arm: _run_worker("tensorflow", "memory", arm) for arm in MEMORY_ARMS}
    text = render(speed, memory)
    output = REPOSITORY / "docs" / "generated" / "freeze-cost.md"
    write_atomically(output, text)
    print(text)
    print(f"wrote {output}")
    return 0


def worker(kind: str, argument: str) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    with warnings.catch_warnings():
        # Behind a stop the upstream layers get no gradient; Keras says so.
        warnings.filterwarnings("ignore", message="Gradients do not exist")
        result = worker_speed(argument) if kind == "speed" else worker_memory(argument)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker(*sys.argv[2:4]))
    sys.exit(main())
