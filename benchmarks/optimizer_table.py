"""Which optimizers turn a gradient scale into a learning-rate multiplier?

A `GradientScale(m)` after a block multiplies the gradient of that block by
`m`. For plain SGD that is the same as giving the block the learning rate
`lr * m`; for optimizers that normalise the gradient it is not. This script
measures it, one row per optimizer setting, prints the table and writes it to
`docs/optimizers.md`:

    python benchmarks/optimizer_table.py

Each row trains a small MLP twice from identical initial weights on identical
data: once with the mechanism under test (a `GradientScale(m)` after `block1`,
one optimizer), and once with an independent reference (the same model
without the scale layer, trained with Keras's own
`keras.optimizers.MultiOptimizer`, which gives `block1`'s variables the
learning rate `lr * m`). It then compares the final weights.

The measuring functions are importable; `tests/test_optimizer_table.py` runs
a few rows live. Another mechanism is a callable with the signature of
`gradient_scale_mechanism` (see `Mechanism`); registered in `MECHANISMS`, it
gets its own group of columns in the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from _report import REPOSITORY, machine_description, today, write_atomically

import stopgrad_lr
from stopgrad_lr import OptimizerMismatchWarning
from stopgrad_lr._graph import Graph
from stopgrad_lr._optimizer_kinds import (
    LINEAR,
    SCALE_INVARIANT,
    recommend,
    update_rule_of,
)
from stopgrad_lr._reparam import reparametrize

MULTIPLIER = 0.1
STEPS = 50
BATCH_SIZE = 32
INPUT_SIZE, HIDDEN_SIZE, OUTPUT_SIZE = 16, 32, 4
SEED = 0
BLOCK = "block1"
EXACT_TOLERANCE = 1e-5
APPROXIMATE_TOLERANCE = 0.15
VERDICTS = ("exact", "approximate", "wrong")
COMMAND = "python benchmarks/optimizer_table.py"
DEFAULT_OUTPUT = REPOSITORY / "docs" / "optimizers.md"

Weights = dict[str, np.ndarray]
# `model_builder(after_block1)` returns a new MLP holding `initial_weights()`;
# `after_block1` (a layer, or None for none) is called on block1's output.
ModelBuilder = Callable[[keras.layers.Layer | None], keras.Model]
# `optimizer_factory(learning_rate_multiplier)` returns a new optimizer whose
# learning rate is the row's learning rate times the multiplier.
OptimizerFactory = Callable[[float], keras.optimizers.Optimizer]
# `mechanism(model_builder, optimizer_factory, m)` trains with `train` so that
# block1 learns with the multiplier `m`, and returns the final trainable
# weights in the parametrisation of `model_builder(None)`, keyed by variable
# path ("block1/kernel", "block1/bias", "block2/kernel", ...).
Mechanism = Callable[[ModelBuilder, OptimizerFactory, float], Weights]


def make_data() -> tuple[np.ndarray, np.ndarray]:
    """Fixed synthetic regression data: STEPS batches of BATCH_SIZE rows."""
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((STEPS * BATCH_SIZE, INPUT_SIZE))
    mixing = rng.standard_normal((INPUT_SIZE, OUTPUT_SIZE)) / math.sqrt(INPUT_SIZE)
    y = np.tanh(x @ mixing) + 0.1 * rng.standard_normal((len(x), OUTPUT_SIZE))
    return x.astype("float32"), y.astype("float32")


def initial_weights() -> Weights:
    """Glorot-uniform kernels and small random biases, from a fixed seed."""
    rng = np.random.default_rng(SEED + 1)
    shapes = {
        "block1": (INPUT_SIZE, HIDDEN_SIZE),
        "block2": (HIDDEN_SIZE, HIDDEN_SIZE),
        "head": (HIDDEN_SIZE, OUTPUT_SIZE),
    }
    weights = {}
    for name, (fan_in, fan_out) in shapes.items():
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        kernel = rng.uniform(-limit, limit, (fan_in, fan_out))
        bias = 0.1 * rng.standard_normal(fan_out)
        weights[f"{name}/kernel"] = kernel.astype("float32")
        weights[f"{name}/bias"] = bias.astype("float32")
    return weights


def build_mlp(
    after_block1: keras.layers.Layer | None = None, *, block1_l2: float = 0.0
) -> keras.Model:
    """Input(16) -> block1 -> [after_block1] -> block2 -> head, in float32.

    `block1` and `block2` are `Dense(32, relu)`, `head` a linear `Dense(4)`.
    Every call returns a new model holding `initial_weights()`. A positive
    `block1_l2` adds an L2 kernel regularizer to block1.
    """
    regularizer = keras.regularizers.L2(block1_l2) if block1_l2 else None
    dense = {"activation": "relu", "dtype": "float32"}
    inputs = keras.Input((INPUT_SIZE,))
    hidden = keras.layers.Dense(
        HIDDEN_SIZE, kernel_regularizer=regularizer, name="block1", **dense
    )(inputs)
    if after_block1 is not None:
        hidden = after_block1(hidden)
    hidden = keras.layers.Dense(HIDDEN_SIZE, name="block2", **dense)(hidden)
    outputs = keras.layers.Dense(OUTPUT_SIZE, name="head", dtype="float32")(hidden)
    model = keras.Model(inputs, outputs)
    weights = initial_weights()
    for variable in model.trainable_variables:
        variable.assign(weights[variable.path])
    return model


def weights_by_path(model: keras.Model) -> Weights:
    """The model's trainable weights as NumPy arrays, keyed by variable path."""
    return {
        variable.path: np.array(keras.ops.convert_to_numpy(variable))
        for variable in model.trainable_variables
    }


def train(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> Weights:
    """STEPS steps of mean-squared-error training, in a fixed batch order.

    Returns the final trainable weights keyed by variable path.
    """
    x, y = make_data()
    model.compile(optimizer=optimizer, loss="mean_squared_error", jit_compile=False)
    # Built here rather than inside `fit`: on TensorFlow, `fit` builds the
    # optimizer while tracing its train step, and there ScheduleFreeAdamW
    # (Keras 3.15) starts its iterate from zeros instead of the weights.
    optimizer.build(model.trainable_variables)
    with warnings.catch_warnings():
        # The table measures the mismatches that this warning reports.
        warnings.simplefilter("ignore", OptimizerMismatchWarning)
        model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0)
    return weights_by_path(model)


def gradient_scale_mechanism(
    model_builder: ModelBuilder, optimizer_factory: OptimizerFactory, m: float
) -> Weights:
    """`stopgrad_lr.GradientScale(m)` after block1, one optimizer for all."""
    model = model_builder(stopgrad_lr.GradientScale(m))
    return train(model, optimizer_factory(1.0))


def reparametrized(model: keras.Model, m: float, update_rule: str) -> keras.Model:
    """The model with BLOCK reparametrised for multiplier `m`: `c = m` for
    `update_rule="scale_invariant"`, `c = sqrt(m)` for `"linear"`."""
    graph = Graph(model)
    block = model.get_layer(BLOCK)
    targets = {id(layer): 1.0 for layer in model.layers if layer.trainable_weights}
    targets[id(block)] = m
    return reparametrize(model, graph, targets, update_rule, False, copy=False)


def _reparametrize_mechanism(update_rule: str) -> Mechanism:
    def mechanism(
        model_builder: ModelBuilder, optimizer_factory: OptimizerFactory, m: float
    ) -> Weights:
        model = reparametrized(model_builder(None), m, update_rule)
        train(model, optimizer_factory(1.0))
        # The true weights, c times the stored ones of block1.
        return weights_by_path(stopgrad_lr.strip_gradient_scales(model))

    mechanism.__doc__ = (
        f"block1 stores its weights divided by c = "
        f"{'m' if update_rule == SCALE_INVARIANT else 'sqrt(m)'} and is followed "
        f"by `ParameterScale(c)`; one optimizer for all."
    )
    return mechanism


reparametrize_m_mechanism = _reparametrize_mechanism(SCALE_INVARIANT)
reparametrize_sqrt_m_mechanism = _reparametrize_mechanism(LINEAR)


def lr_multiplier_reference(
    model_builder: ModelBuilder, optimizer_factory: OptimizerFactory, m: float
) -> Weights:
    """No scale layer; `keras.optimizers.MultiOptimizer` gives block1 `lr * m`.

    `MultiOptimizer` refuses a `LossScaleOptimizer` inside it, so a loss-scale
    row becomes a `LossScaleOptimizer` (same settings) around a
    `MultiOptimizer` of the inner optimizers.
    """
    default, scaled = optimizer_factory(1.0), optimizer_factory(m)
    loss_scale = None
    if isinstance(default, keras.optimizers.LossScaleOptimizer):
        loss_scale = default
        default, scaled = default.inner_optimizer, scaled.inner_optimizer
    optimizer: keras.optimizers.Optimizer = keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(
            default_optimizer=default, optimizer_map={f"{BLOCK}/.*": scaled}
        )
    )
    if loss_scale is not None:
        optimizer = keras.optimizers.LossScaleOptimizer(
            optimizer,
            initial_scale=loss_scale.initial_scale,
            dynamic_growth_steps=loss_scale.dynamic_growth_steps,
        )
    return train(model_builder(None), optimizer)


MECHANISMS: dict[str, Mechanism] = {
    "gradient_scale": gradient_scale_mechanism,
    "reparametrize_m": reparametrize_m_mechanism,
    "reparametrize_sqrt_m": reparametrize_sqrt_m_mechanism,
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: an optimizer setting and the model it trains."""

    label: str
    optimizer_class: type[keras.optimizers.Optimizer]
    learning_rate: float
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    loss_scale: bool = False
    block1_l2: float = 0.0

    def optimizer_factory(
        self, learning_rate_multiplier: float = 1.0
    ) -> keras.optimizers.Optimizer:
        optimizer = self.optimizer_class(
            learning_rate=self.learning_rate * learning_rate_multiplier,
            **self.options,
        )
        if self.loss_scale:
            return keras.optimizers.LossScaleOptimizer(optimizer)
        return optimizer

    def model_builder(self, after_block1: keras.layers.Layer | None) -> keras.Model:
        return build_mlp(after_block1, block1_l2=self.block1_l2)


# Learning rates that train the MLP without diverging in STEPS steps. An
# optimizer class that a later Keras adds gets FALLBACK_LEARNING_RATE.
LEARNING_RATES = {
    "SGD": 0.1,
    "Adadelta": 1.0,
    "Adafactor": 1e-2,
    "Adagrad": 0.05,
    "Adam": 1e-3,
    "AdamW": 1e-3,
    "Adamax": 2e-3,
    "Ftrl": 0.05,
    "Lamb": 1e-2,
    "Lion": 3e-4,
    "Muon": 1e-2,
    "Nadam": 1e-3,
    "RMSprop": 1e-3,
    "ScheduleFreeAdamW": 1e-3,
}
FALLBACK_LEARNING_RATE = 1e-3
# Wrappers rather than optimizers of their own: LossScaleOptimizer has
# explicit rows, MultiOptimizer is the reference.
WRAPPERS = ("LossScaleOptimizer", "MultiOptimizer")


def stock_optimizer_classes() -> list[type[keras.optimizers.Optimizer]]:
    """Every optimizer class exported by `keras.optimizers`, minus WRAPPERS."""
    classes = []
    for name in sorted(dir(keras.optimizers)):
        value = getattr(keras.optimizers, name)
        if (
            inspect.isclass(value)
            and issubclass(value, keras.optimizers.Optimizer)
            and value is not keras.optimizers.Optimizer
            and name not in WRAPPERS
        ):
            classes.append(value)
    return classes


def optimizer_cases() -> list[Case]:
    """The rows: SGD variants, every other stock optimizer, then settings."""
    sgd, adam = keras.optimizers.SGD, keras.optimizers.Adam
    sgd_lr, adam_lr = LEARNING_RATES["SGD"], LEARNING_RATES["Adam"]
    cases = [
        Case("SGD", sgd, sgd_lr),
        Case("SGD(momentum=0.9)", sgd, sgd_lr, {"momentum": 0.9}),
        Case(
            "SGD(momentum=0.9, nesterov=True)",
            sgd,
            sgd_lr,
            {"momentum": 0.9, "nesterov": True},
        ),
    ]
    for optimizer_class in stock_optimizer_classes():
        name = optimizer_class.__name__
        if optimizer_class is not sgd:
            learning_rate = LEARNING_RATES.get(name, FALLBACK_LEARNING_RATE)
            cases.append(Case(name, optimizer_class, learning_rate))
    cases += [
        Case("LossScaleOptimizer(SGD)", sgd, sgd_lr, loss_scale=True),
        Case("LossScaleOptimizer(Adam)", adam, adam_lr, loss_scale=True),
        # With epsilon=1.0 Adam steps like momentum SGD: SGD's learning rate.
        Case("Adam(epsilon=1.0)", adam, sgd_lr, {"epsilon": 1.0}),
        Case("SGD(weight_decay=0.01)", sgd, sgd_lr, {"weight_decay": 0.01}),
        Case("SGD(clipnorm=0.1)", sgd, sgd_lr, {"clipnorm": 0.1}),
        Case("SGD(clipvalue=0.01)", sgd, sgd_lr, {"clipvalue": 0.01}),
        Case("SGD(global_clipnorm=0.1)", sgd, sgd_lr, {"global_clipnorm": 0.1}),
        Case("SGD + L2(0.01) on block1's kernel", sgd, sgd_lr, block1_l2=0.01),
        # Decoupled weight decay is on by default in these two.
        Case(
            "AdamW(weight_decay=0)",
            keras.optimizers.AdamW,
            LEARNING_RATES["AdamW"],
            {"weight_decay": 0.0},
        ),
        Case(
            "Muon(weight_decay=0)",
            keras.optimizers.Muon,
            LEARNING_RATES["Muon"],
            {"weight_decay": 0.0},
        ),
        # Keras's RMSprop adds epsilon under the square root.
        Case(
            "RMSprop(epsilon=1e-12)",
            keras.optimizers.RMSprop,
            LEARNING_RATES["RMSprop"],
            {"epsilon": 1e-12},
        ),
    ]
    return cases


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How a mechanism's final weights differ from the reference's.

    Attributes:
        update_ratio: `||W_mech - W0|| / ||W_ref - W0||` for block1's kernel
            (Frobenius norms): 1 when block1's kernel moved as far as in the
            reference.
        block_difference: `max|W_mech - W_ref| / max|W_ref - W0|`, the largest
            over block1's variables (kernel and bias).
        other_difference: the same, the largest over every other layer's
            variables.
        verdict: `"exact"`, `"approximate"` or `"wrong"` (see `classify`).
    """

    update_ratio: float
    block_difference: float
    other_difference: float
    verdict: str


def classify(
    update_ratio: float, block_difference: float, other_difference: float
) -> str:
    """`"exact"`, `"approximate"` or `"wrong"`.

    exact: `|update_ratio - 1| <= 1e-5` and both differences `<= 1e-5`.
    approximate: not exact, `|update_ratio - 1| <= 0.15` and both differences
    `<= 0.15`. wrong: anything else, including a non-finite number.
    """
    worst = (abs(update_ratio - 1.0), block_difference, other_difference)
    if not all(math.isfinite(value) for value in worst):
        return "wrong"
    if max(worst) <= EXACT_TOLERANCE:
        return "exact"
    if max(worst) <= APPROXIMATE_TOLERANCE:
        return "approximate"
    return "wrong"


def _relative_difference(
    result: np.ndarray, reference: np.ndarray, initial: np.ndarray
) -> float:
    result, reference = result.astype("float64"), reference.astype("float64")
    difference = float(np.max(np.abs(result - reference)))
    update = float(np.max(np.abs(reference - initial)))
    if difference == 0.0:
        return 0.0
    return difference / update if update > 0.0 else math.inf


def compare(result: Weights, reference: Weights) -> Comparison:
    """Compares two runs' final weights; both started from `initial_weights()`."""
    initial = initial_weights()
    kernel = f"{BLOCK}/kernel"
    ratio = float(
        np.linalg.norm(result[kernel].astype("float64") - initial[kernel])
        / np.linalg.norm(reference[kernel].astype("float64") - initial[kernel])
    )
    block: list[float] = []
    other: list[float] = []
    for path, value in reference.items():
        difference = _relative_difference(result[path], value, initial[path])
        (block if path.startswith(f"{BLOCK}/") else other).append(difference)
    return Comparison(
        ratio, max(block), max(other), classify(ratio, max(block), max(other))
    )


def mean_squared_error(weights: Weights) -> float:
    """The MLP's loss on the whole data set, computed in NumPy float64."""
    x, y = make_data()
    hidden = x.astype("float64")
    for name in ("block1", "block2", "head"):
        hidden = hidden @ weights[f"{name}/kernel"] + weights[f"{name}/bias"]
        if name != "head":
            hidden = np.maximum(hidden, 0.0)
    return float(np.mean((hidden - y) ** 2))


@dataclasses.dataclass(frozen=True)
class Row:
    """A measured row of the table.

    Attributes:
        case: What was trained.
        reference_move: `||W_ref - W0|| / ||W0||` for block1's kernel: how far
            block1 moved in the reference run.
        reference_loss: The loss after the reference run.
        comparisons: One `Comparison` per mechanism name.
    """

    case: Case
    reference_move: float
    reference_loss: float
    comparisons: dict[str, Comparison]


def measure(
    case: Case,
    mechanisms: Mapping[str, Mechanism] | None = None,
    m: float = MULTIPLIER,
) -> Row:
    """Trains the reference and each mechanism for `case`, and compares them."""
    mechanisms = MECHANISMS if mechanisms is None else mechanisms
    keras.utils.set_random_seed(SEED)
    reference = lr_multiplier_reference(case.model_builder, case.optimizer_factory, m)
    comparisons = {}
    for name, mechanism in mechanisms.items():
        keras.backend.clear_session()
        keras.utils.set_random_seed(SEED)
        result = mechanism(case.model_builder, case.optimizer_factory, m)
        comparisons[name] = compare(result, reference)
    keras.backend.clear_session()
    kernel = f"{BLOCK}/kernel"
    initial = initial_weights()[kernel].astype("float64")
    move = np.linalg.norm(reference[kernel] - initial) / np.linalg.norm(initial)
    return Row(case, float(move), mean_squared_error(reference), comparisons)


# How the page names each mechanism and the mechanisms stopgrad_lr recommends.
TITLES = {
    "gradient_scale": "gradient scale",
    "reparametrize_m": "reparametrize, c = m",
    "reparametrize_sqrt_m": "reparametrize, c = √m",
}
# A recommended reparametrisation must be this close to the reference
# (|ratio - 1|, Δ block1 and Δ others): the epsilon of a normalising
# optimizer acts as epsilon / c on the reparametrised layer.
RECOMMENDED_TOLERANCE = 0.02


def recommendation(case: Case) -> str:
    """What stopgrad_lr recommends for the row (`mechanism="auto"` of
    `apply_lr_multipliers`): a key of TITLES, or "multi_optimizer"."""
    optimizer = case.optimizer_factory()
    chosen = recommend(optimizer, regularized=case.block1_l2 > 0)
    if chosen == "reparametrize":
        kind, _ = update_rule_of(optimizer)
        return "reparametrize_m" if kind == SCALE_INVARIANT else "reparametrize_sqrt_m"
    return chosen


def within(comparison: Comparison, tolerance: float) -> bool:
    return (
        max(
            abs(comparison.update_ratio - 1.0),
            comparison.block_difference,
            comparison.other_difference,
        )
        <= tolerance
    )


def contradiction(row: Row) -> str | None:
    """Why the row's measurement contradicts the recommendation, or None.

    A recommended gradient scale must be exact, a recommended
    reparametrisation within RECOMMENDED_TOLERANCE; where stopgrad_lr
    recommends `multi_optimizer`, no mechanism may be exact.
    """
    chosen = recommendation(row.case)
    if chosen == "multi_optimizer":
        exact = [n for n, c in row.comparisons.items() if c.verdict == "exact"]
        return f"{', '.join(exact)} measured exact" if exact else None
    comparison = row.comparisons.get(chosen)
    if comparison is None:
        return None
    if chosen == "gradient_scale" and comparison.verdict != "exact":
        return "the gradient scale is not exact"
    if not within(comparison, RECOMMENDED_TOLERANCE):
        return f"not within {RECOMMENDED_TOLERANCE:.0%} of the reference"
    return None


def _use_cell(row: Row) -> str:
    chosen = recommendation(row.case)
    cell = f"`{chosen}`" if chosen not in TITLES else f"**{TITLES[chosen]}**"
    problem = contradiction(row)
    return cell if problem is None else f"{cell} ⚠ {problem}"


def render_guide(rows: Sequence[Row]) -> str:
    """The lead table: the mechanism to use per row, and each verdict."""
    mechanisms = list(rows[0].comparisons)
    header = ["optimizer", "use", *(TITLES.get(n, n) for n in mechanisms)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * len(mechanisms)) + "|",
    ]
    for row in rows:
        cells = [f"`{row.case.label}`", _use_cell(row)]
        for name in mechanisms:
            comparison = row.comparisons[name]
            cells.append(f"**{comparison.verdict}** {comparison.update_ratio:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_table(rows: Sequence[Row], mechanism: str) -> str:
    """One mechanism's measurements as a Markdown table."""
    header = [
        "optimizer",
        "lr",
        "block1 moved",
        "reference loss",
        "ratio",
        "Δ block1",
        "Δ others",
        "verdict",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for row in rows:
        comparison = row.comparisons[mechanism]
        cells = [
            f"`{row.case.label}`",
            f"{row.case.learning_rate:g}",
            f"{row.reference_move:.3g}",
            f"{row.reference_loss:.3f}",
            f"{comparison.update_ratio:.6f}",
            f"{comparison.block_difference:.1e}",
            f"{comparison.other_difference:.1e}",
            f"**{comparison.verdict}**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_summary(rows: Sequence[Row]) -> str:
    """One bullet per mechanism and verdict, listing the rows that got it."""
    lines = []
    for name in rows[0].comparisons:
        for verdict in VERDICTS:
            labels = [
                f"`{row.case.label}`"
                for row in rows
                if row.comparisons[name].verdict == verdict
            ]
            lines.append(f"- `{name}`, {verdict}: {', '.join(labels) or 'none'}.")
    return "\n".join(lines)


def render_page(rows: Sequence[Row], machine: str, date: str) -> str:
    """The whole `docs/optimizers.md` page."""
    initial_loss = mean_squared_error(initial_weights())
    exact = f"{EXACT_TOLERANCE:.0e}".replace("e-0", "e-")
    details = "\n\n".join(
        f"### {TITLES.get(name, name)}\n\n{render_table(rows, name)}"
        for name in rows[0].comparisons
    )
    return f"""# Optimizers

<!-- Generated by benchmarks/optimizer_table.py. Do not edit: rerun it. -->

stopgrad_lr has two ways to give a layer the learning-rate multiplier `m`,
and which one works depends on the optimizer:

- a **gradient scale** (`GradientScale(m)` after a block) multiplies the
  gradient of everything upstream of it by `m`. That is a learning-rate
  multiplier only when the optimizer's update is proportional to the
  gradient: SGD.
- a **reparametrisation** stores a layer's weights divided by `c` and
  multiplies its output by `c` (`ParameterScale(c)`), so the optimizer sees
  the weights' gradient multiplied by `c`. An optimizer that normalises the
  gradient (Adam, Lion, Muon...) then moves the true weights `c` times as
  far: `c = m`. SGD moves them `c²` times as far: `c = √m`.

Where neither works, `stopgrad_lr.multi_optimizer(model, multipliers,
optimizer)` builds a `keras.optimizers.MultiOptimizer` that gives each group
its own copy of the optimizer, with the learning rate multiplied.
Its patterns also select single variables (`"head/bias"`, `"@bias"`,
`"@norm"`), and `weight_decay_multipliers` sets each group's weight decay:
AdamW fine-tuning with layer-wise decay and no weight decay on biases and
normalisation parameters is `multi_optimizer(model,
layerwise_decay_multipliers(model, "block*_out", 0.75), AdamW(1e-3,
weight_decay=0.05), weight_decay_multipliers={{"@bias": 0, "@norm": 0}})`
(see the cookbook).

This page measures every optimizer in `keras.optimizers` against that
reference. Measured on {date} on {machine}.

Regenerate the page (it is written whole by the script) from the repository
root with:

```
{COMMAND}
```

## Which mechanism to use

`stopgrad_lr.apply_lr_multipliers(model, multipliers, optimizer=optimizer)`
picks the mechanism of the **use** column (`mechanism="auto"`), and raises
where it says `multi_optimizer`; `stopgrad_lr.check_optimizer(optimizer,
model)` and its warning (from `stopgrad_lr.OptimizerCheck` or `ScaleSchedule`
when `fit` starts) read the same table (`stopgrad_lr/_optimizer_kinds.py`). The
other columns
are the measured verdicts with the ratio of how far `block1` moved to how far
it moved with the learning rate `lr * m` (1 is right, `1/m` =
{1 / MULTIPLIER:g} means the multiplier was cancelled). A recommended gradient
scale must measure exact, a recommended reparametrisation within
{RECOMMENDED_TOLERANCE:.0%}, and where the table says `multi_optimizer` no
mechanism may measure exact; a ⚠ marks a row where the measurement disagrees.

{render_guide(rows)}

## Results per mechanism

`m = {MULTIPLIER}` on `block1`, {STEPS} steps. Column definitions are below.

{details}

{render_summary(rows)}

## Reparametrisation: epsilon and the forward pass

A reparametrised layer sees its gradient multiplied by `c`, while the
optimizer's epsilon stays the same: for that layer Adam behaves as if its
epsilon were `epsilon / c`. That is why stopgrad_lr treats an optimizer
whose epsilon is above 1e-6 in gradient units as neither SGD-like nor
Adam-like: `Adam(epsilon=1.0)` above, and Keras's `RMSprop`, which adds its
epsilon under the square root (`sqrt(v + epsilon)`), so that the default
1e-7 counts as 3e-4 (`RMSprop(epsilon=1e-12)` is Adam-like again). The
effect grows as `m` and the gradients shrink. Dividing the weights by `c`
and multiplying the output by `c` is exact when `c` is a power of two
(`round_to_power_of_two=True`); otherwise the forward pass and folding the
scales back into the weights (`stopgrad_lr.strip_gradient_scales`) round.
Measured by `benchmarks/reparametrization_accuracy.py`:

--8<-- "reparametrization.md"

## What is measured

- **Model**: `Input({INPUT_SIZE})` → `block1 = Dense({HIDDEN_SIZE}, relu)` →
  `block2 = Dense({HIDDEN_SIZE}, relu)` → `head = Dense({OUTPUT_SIZE})`,
  float32, with fixed initial weights `W0` (Glorot-uniform kernels, small
  random biases, NumPy seed {SEED + 1}).
- **Data**: {STEPS * BATCH_SIZE} rows of fixed synthetic regression data
  (NumPy seed {SEED}), `y = tanh(x A) + 0.1 noise`, seen once in a fixed order
  as {STEPS} batches of {BATCH_SIZE}: {STEPS} training steps of mean squared
  error with `model.fit`. The loss before training is {initial_loss:.3f}.
- **gradient scale**: `stopgrad_lr.GradientScale({MULTIPLIER})` inserted after
  `block1`, one optimizer for the whole model at the row's learning rate `lr`.
- **reparametrize, c = m** and **c = √m**: `block1` stores its weights
  divided by `c` and is followed by `ParameterScale(c)` (relu commutes with a
  positive scale, so the activation stays inside `block1`), one optimizer for
  the whole model at `lr`. The weights compared are the true ones, folded
  back with `stopgrad_lr.strip_gradient_scales`.
- **Reference**: the same model without any stopgrad_lr layer, trained with
  `keras.optimizers.MultiOptimizer`: `block1`'s variables by an optimizer with
  learning rate `lr * {MULTIPLIER}`, the rest by one with `lr`, all other
  settings equal. A `LossScaleOptimizer` row wraps that `MultiOptimizer` in a
  `LossScaleOptimizer` (Keras refuses it the other way round). Each
  sub-optimizer of a `MultiOptimizer` clips, decays and normalises its own
  variables only, so for `global_clipnorm` the reference clips `block1` and
  the rest by their own norms.
- All runs build their optimizer right after `compile`, not inside `fit`:
  on TensorFlow, Keras 3.15's `ScheduleFreeAdamW` built inside `fit` starts
  from zeros instead of the initial weights.

## Definitions

With `W0` the initial weights, `W_mech` the final weights of the mechanism's
run and `W_ref` those of the reference run, all compared in float64:

- **ratio** = `‖W_mech - W0‖ / ‖W_ref - W0‖` for `block1`'s kernel
  (Frobenius norms). 1 means `block1` moved as far as with the learning rate
  `lr * m`; `1/m` = {1 / MULTIPLIER:g} means the multiplier was cancelled.
- **Δ block1** = the largest, over `block1`'s kernel and bias, of
  `max|W_mech - W_ref| / max|W_ref - W0|`: the weight difference relative to
  the reference's update of that variable.
- **Δ others** = the same, the largest over the variables of `block2` and
  `head`.
- **block1 moved** = `‖W_ref - W0‖ / ‖W0‖` for `block1`'s kernel: how far the
  reference moved it. **reference loss**: the loss after the reference run.
- **exact**: `|ratio - 1| ≤ {exact}`, Δ block1 ≤ {exact} and
  Δ others ≤ {exact}: the runs differ by float32 rounding only.
- **approximate**: not exact, and `|ratio - 1|`, Δ block1 and Δ others all
  ≤ {APPROXIMATE_TOLERANCE:g} ({APPROXIMATE_TOLERANCE:.0%}).
- **wrong**: anything else.

## Reading the table

- **SGD, with or without momentum or Nesterov, and under a
  `LossScaleOptimizer`**: the update is linear in the gradient, so scaling
  the gradient by `m` is scaling the learning rate by `m`: the gradient scale
  is exact, up to float32 rounding. A reparametrisation with `c = √m` is
  exact too, up to the rounding of `c` (a gradient scale is the better tool:
  it needs no weight rewrite and acts on whole blocks).
- **Optimizers that normalise the gradient** divide it by a running
  estimate of its own size (Adam, AdamW, Adamax, Nadam, RMSprop,
  ScheduleFreeAdamW), keep only its sign (Lion) or orthogonalise it (Muon).
  Multiplying the gradient by `m` then changes almost nothing, and the ratio
  of the gradient scale is near `1/m`. A reparametrisation with `c = m` gives
  them the multiplier, within the epsilon effect above; `c = √m` gives `√m`.
- **Adadelta, Adafactor and Lamb** also scale their update by the size of
  past updates or of the weights themselves, which a reparametrisation
  changes by the same factor: neither mechanism moves them.
- **Adagrad and Ftrl** divide by the square root of an accumulator that
  starts at `initial_accumulator_value` (0.1) and grows with the squared
  gradients. While the accumulator is dominated by its initial value they
  behave like SGD; as the squared gradients pile up, they cancel more and
  more of the scale. Their verdict depends on the gradient sizes and the
  number of steps; use `multi_optimizer`.
- **Ftrl** computes the weights from its accumulators, not from the current
  weights, so it forgets `W0` at its first step: "block1 moved" is close to
  1, and the ratio mostly measures that jump.
- **`Adam(epsilon=1.0)`**: an epsilon much larger than `sqrt(v)` turns Adam
  into momentum SGD, and the gradient scale nearly works again, up to the
  part of the denominator that `sqrt(v)` still contributes.
- **Weight decay and gradient clipping** act outside both mechanisms.
  `weight_decay` shrinks `block1`'s weights by the fraction `lr * decay` per
  step, not `lr * m * decay` (AdamW and Muon decay by default). `clipnorm`
  and `clipvalue` clip the already-scaled gradient, so for `block1` the
  threshold acts as if divided by the scale. `global_clipnorm` sees a global
  norm that the scale has changed. `multi_optimizer` applies each of them
  per group, at the group's learning rate.
- **An L2 regularizer** on a gradient-scaled layer adds a gradient that
  reaches the kernel directly, unscaled. A reparametrisation rewrites the
  regularizer to penalise the true weights (`L2(l2 * c²)` on the stored
  ones), which makes it exact.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="where to write the Markdown page (default: docs/optimizers.md)",
    )
    args = parser.parse_args(argv)
    rows = []
    for case in optimizer_cases():
        rows.append(measure(case))
        print(f"measured {case.label}", file=sys.stderr, flush=True)
    page = render_page(rows, machine_description(), today())
    write_atomically(args.output, page)
    print(render_guide(rows))
    print()
    print(render_summary(rows))
    print(f"\nwrote {args.output}")
    problems = [
        f"{row.case.label}: {problem}"
        for row in rows
        if (problem := contradiction(row)) is not None
    ]
    for problem in problems:
        print(f"measurement contradicts the recommendation: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
