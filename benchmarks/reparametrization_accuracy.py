"""How accurate is a reparametrisation: Adam's epsilon, and the forward pass.

A reparametrised layer stores its weights divided by `c` and multiplies its
output by `c` (`stopgrad_lr.ParameterScale`). Two things are not exact:

- the optimizer's epsilon: the layer's gradient is `c` times larger, so Adam
  treats that layer as if its epsilon were `epsilon / c`. This script trains
  the MLP of `benchmarks/optimizer_table.py` with Adam, its `block1`
  reparametrised with `c = m`, for several `m`, against the same
  `keras.optimizers.MultiOptimizer` reference;
- the forward pass and folding the scales back, which round unless `c` is a
  power of two. This script reparametrises every trainable layer of that MLP
  and of ResNet50 (32x32, random weights) and compares the outputs and the
  folded weights with the original's.

It writes `docs/generated/reparametrization.md`, which `docs/optimizers.md`
includes:

    python benchmarks/reparametrization_accuracy.py
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence

import keras
import numpy as np
import optimizer_table
from _report import REPOSITORY, machine_description, publish, today

import stopgrad_lr

COMMAND = "python benchmarks/reparametrization_accuracy.py"
OUTPUT = REPOSITORY / "docs" / "generated" / "reparametrization.md"
SWEEP_MULTIPLIERS = (0.5, 0.1, 0.01, 0.001)


def epsilon_sweep() -> list[tuple[float, optimizer_table.Comparison]]:
    """Adam, block1 reparametrised with c = m, for each of SWEEP_MULTIPLIERS."""
    adam = optimizer_table.Case(
        "Adam", keras.optimizers.Adam, optimizer_table.LEARNING_RATES["Adam"]
    )
    mechanism = {"c = m": optimizer_table.reparametrize_m_mechanism}
    return [
        (m, optimizer_table.measure(adam, mechanism, m).comparisons["c = m"])
        for m in SWEEP_MULTIPLIERS
    ]


def render_sweep(sweep: Sequence[tuple[float, optimizer_table.Comparison]]) -> str:
    lines = [
        "| m | ratio | Δ block1 | Δ others | verdict |",
        "|---:|---:|---:|---:|---:|",
    ]
    for m, comparison in sweep:
        lines.append(
            f"| {m:g} | {comparison.update_ratio:.6f} | "
            f"{comparison.block_difference:.1e} | "
            f"{comparison.other_difference:.1e} | **{comparison.verdict}** |"
        )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ForwardRow:
    """How far a reparametrised model is from the original.

    Attributes:
        model: The model's description.
        scale: The description of `c`.
        differing: The fraction of output elements that differ.
        largest: `max|y_reparam - y| / max|y|`.
        folded: The fraction of weight elements that differ from the original
            after folding the scales back (`strip_gradient_scales`).
    """

    model: str
    scale: str
    differing: float
    largest: float
    folded: float


def forward_rows() -> list[ForwardRow]:
    """Every trainable layer reparametrised for m = MULTIPLIER, in inference
    mode, float32."""
    m = optimizer_table.MULTIPLIER
    rng = np.random.default_rng(optimizer_table.SEED)
    keras.utils.set_random_seed(optimizer_table.SEED)
    resnet = keras.applications.ResNet50(
        weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None
    )
    models = [
        ("the MLP", optimizer_table.build_mlp(), optimizer_table.make_data()[0][:256]),
        (
            "ResNet50, 32x32 (logits)",
            resnet,
            rng.standard_normal((8, 32, 32, 3)).astype("float32"),
        ),
    ]
    settings = [
        (f"c = m = {m:g} (Adam)", keras.optimizers.Adam(), False),
        (f"c = √m = {math.sqrt(m):.4f} (SGD)", keras.optimizers.SGD(), False),
        ("c = 0.125, m rounded (Adam)", keras.optimizers.Adam(), True),
    ]
    rows = []
    for description, model, x in models:
        expected = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
        original = model.get_weights()
        for scale, optimizer, rounded in settings:
            rewritten = stopgrad_lr.apply_lr_multipliers(
                model,
                {"*": m},
                optimizer=optimizer,
                mechanism="reparametrize",
                round_to_power_of_two=rounded,
            )
            got = np.asarray(keras.ops.convert_to_numpy(rewritten(x, training=False)))
            folded = stopgrad_lr.strip_gradient_scales(rewritten).get_weights()
            differing = sum(
                np.count_nonzero(a != b) for a, b in zip(folded, original, strict=True)
            )
            rows.append(
                ForwardRow(
                    description,
                    scale,
                    float(np.mean(got != expected)),
                    float(np.max(np.abs(got - expected)) / np.max(np.abs(expected))),
                    differing / sum(w.size for w in original),
                )
            )
    return rows


def render_forward(rows: Sequence[ForwardRow]) -> str:
    lines = [
        "| model | c | outputs that differ | largest difference | weights that "
        "differ after folding back |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.model} | {row.scale} | {row.differing:.1%} | "
            f"{row.largest:.1e} | {row.folded:.1%} |"
        )
    return "\n".join(lines)


def render(
    sweep: Sequence[tuple[float, optimizer_table.Comparison]],
    forward: Sequence[ForwardRow],
    machine: str,
    date: str,
) -> str:
    m = optimizer_table.MULTIPLIER
    return f"""Measured with `{COMMAND}` on {date}.
Machine: {machine}.

Adam (`lr` = {optimizer_table.LEARNING_RATES["Adam"]:g}, `epsilon=1e-7`),
`block1` of the MLP reparametrised with `c = m`, {optimizer_table.STEPS}
steps, against the `lr * m` reference (columns as in the tables above):

{render_sweep(sweep)}

Every trainable layer reparametrised for `m = {m:g}`, outputs compared with
the original model's in inference mode, float32. "Largest difference" is
`max|y_reparam - y| / max|y|`; the last column counts the weights that
differ from the original after folding the scales back:

{render_forward(forward)}
"""


def main() -> int:
    return publish(
        OUTPUT, render(epsilon_sweep(), forward_rows(), machine_description(), today())
    )


if __name__ == "__main__":
    sys.exit(main())
