"""Property test: random functional models, random scales, measured gradients.

`random_model(seed)` builds a small random graph: Dense and Conv1D layers,
Add and Concatenate merges, residual skips, branches, BatchNormalization
(with random statistics) and LayerNormalization, one or two inputs and
outputs, nested functional and Sequential sub-models at any position (also
two levels deep, called twice, as the whole model or as an output next to a
head), layers shared by two calls, and raw operations on symbolic tensors
(`x + 1.0`, `x * 2.0`, `keras.ops.tanh`, `keras.ops.add`). While building,
it records for every layer which trainable layers lie upstream of it: the
ground truth for cuts, independent of the package's own graph reader.

For each seed, scales go after one to three random layers (reported cuts
and arbitrary layers alike, `on_bypass="ignore"`), and then:

1. the rewritten model's outputs are bit-identical to the original's;
2. every variable's measured gradient ratio (rewritten / original) equals
   `effective_multipliers` wherever that is a number;
3. a further scale `k` at a cut that `gradient_cuts` reports (or a stop,
   `k = 0`) multiplies the measured gradient of every layer upstream of it
   by exactly `k`, leaves every other layer's alone, and the analysis moves
   from `m` to `k * m` there;
4. where the analysis says `nan`, the measured gradient is really not one
   multiple of the original's (no least-squares factor fits it, or the
   factor differs between two random projections of the outputs).

Models per run: 200 on TensorFlow, 100 on torch and 50 on JAX, in chunks of
25 seeds (see `MODELS`). JAX compiles every operation for each new shape,
and these models have many shapes, so a model costs it several times what it
costs TensorFlow. A failure names its seeds; `STOPGRAD_SEED=123` runs that
one seed alone. Gradients are taken as in `tests/_backend.py` (a fixed
random projection of the outputs), in one pass that also gives the outputs,
and eagerly on JAX, where compiling each tiny model costs more than running
it.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import pytest
from _backend import BACKEND, relative_error, to_numpy

from stopgrad_lr import (
    effective_multipliers,
    gradient_cuts,
    insert_gradient_scales,
    variable_multipliers,
)

MODELS = {"tensorflow": 200, "jax": 50, "torch": 100}[BACKEND]
CHUNK = 25
SCALES = [0.1, 0.25, 0.5, 2.0, -1.0]
CUT_SCALES = [0.5, 2.0, -1.0, 0.0]
# No relu: a unit dead on the whole batch would zero one path's gradient, and
# a layer whose paths disagree could then measure as one clean multiple.
ACTIVATIONS = [None, "tanh", "sigmoid", "gelu"]
BATCH = 3
RATIO_TOLERANCE = 1e-5
# Below this, a least-squares fit counts as "one multiple" of the original.
MIXED_RESIDUAL = 1e-3


@dataclass(eq=False)
class Value:
    """A symbolic tensor and the trainable layer paths upstream of it."""

    tensor: Any
    upstream: frozenset[str]
    used: bool = False
    from_submodel: bool = False

    @property
    def width(self) -> int:
        return int(self.tensor.shape[-1])


@dataclass(eq=False)
class Net:
    """Builds one random graph (a model or a nested sub-model).

    `through[path]` is every trainable layer path upstream of that layer's
    outputs, itself included: what a scale after it must multiply.
    """

    rng: np.random.Generator
    names: Any  # itertools.count shared by the whole model: unique names
    depth: int = 0
    pool: list[Value] = field(default_factory=list)
    through: dict[str, set[str]] = field(default_factory=dict)
    dense_layers: list[tuple[keras.layers.Layer, int]] = field(default_factory=list)
    submodels: list[tuple[keras.Model, dict[str, set[str]], list[frozenset[str]]]] = (
        field(default_factory=list)
    )

    def name(self, kind: str) -> str:
        return f"{kind}{next(self.names)}"

    def width(self) -> int:
        return int(self.rng.integers(3, 7))

    def pick(self, width: int | None = None) -> Value | None:
        """A value to build on, mostly a recent one; marks it used."""
        values = [
            v
            for v in self.pool
            if len(v.tensor.shape) == 2 and (width is None or v.width == width)
        ]
        if not values:
            return None
        recent = values[-3:]
        chosen = recent[self.rng.integers(len(recent))]
        if self.rng.random() < 0.3:
            chosen = values[self.rng.integers(len(values))]
        chosen.used = True
        return chosen

    def call(self, layer: Any, inputs: list[Value], **kwargs: Any) -> Value:
        tensors = [v.tensor for v in inputs]
        tensor = layer(tensors if len(tensors) > 1 else tensors[0], **kwargs)
        upstream = frozenset().union(*(v.upstream for v in inputs))
        if isinstance(layer, keras.layers.Layer) and layer.trainable_weights:
            upstream |= {layer.name}
        self.through.setdefault(layer.name, set()).update(upstream)
        return self.add(Value(tensor, upstream))

    def add(self, value: Value) -> Value:
        self.pool.append(value)
        return value

    def raw(self, value: Value, other: Value | None = None) -> Value:
        """A Keras operation on symbolic tensors, not a layer."""
        x = value.tensor
        if other is not None:
            tensor = keras.ops.add(x, other.tensor)
            upstream = value.upstream | other.upstream
        else:
            choice = self.rng.integers(3)
            tensor = x + 1.0 if choice == 0 else x * 2.0 if choice == 1 else None
            if tensor is None:
                tensor = keras.ops.tanh(x)
            upstream = value.upstream
        return self.add(Value(tensor, upstream))

    def dense(self, value: Value, width: int | None = None) -> Value:
        activation = ACTIVATIONS[self.rng.integers(len(ACTIVATIONS))]
        layer = keras.layers.Dense(
            width or self.width(), activation=activation, name=self.name("dense")
        )
        self.dense_layers.append((layer, value.width))
        return self.call(layer, [value])

    def norm(self, value: Value) -> Value:
        if self.rng.random() < 0.5:
            return self.call(
                keras.layers.LayerNormalization(name=self.name("ln")), [value]
            )
        layer = keras.layers.BatchNormalization(name=self.name("bn"))
        result = self.call(layer, [value])
        # Random statistics: at its initial ones, inference-mode
        # BatchNormalization is a multiple of the identity, which can make
        # paths that the analysis tells apart measure as one multiple.
        width = value.width
        layer.set_weights(
            [
                self.rng.uniform(0.5, 1.5, width).astype("float32"),
                self.rng.normal(0, 0.5, width).astype("float32"),
                self.rng.normal(0, 0.5, width).astype("float32"),
                self.rng.uniform(0.5, 2.0, width).astype("float32"),
            ]
        )
        return result

    def step(self) -> None:
        """One random construct on top of the pool."""
        kinds = ["dense", "dense", "residual", "add", "concat", "norm", "raw"]
        kinds += ["conv", "shared"]
        if self.depth < 2:
            kinds += ["submodel", "submodel"]
        if self.submodels:
            kinds.append("submodel_again")
        kind = kinds[self.rng.integers(len(kinds))]
        if kind == "dense":
            self.dense(self.pick())
        elif kind == "residual":
            x = self.pick()
            y = self.dense(x)
            y.used = True
            y = self.dense(y, x.width)
            y.used = True
            self.call(keras.layers.Add(name=self.name("residual")), [x, y])
        elif kind in ("add", "concat"):
            a = self.pick()
            b = self.pick()
            if kind == "concat":
                layer = keras.layers.Concatenate(name=self.name("concat"))
                self.call(layer, [a, b])
                return
            if b.width != a.width or b is a:
                b = self.dense(b, a.width)
                b.used = True
            if self.rng.random() < 0.3:
                self.raw(a, b)
            else:
                self.call(keras.layers.Add(name=self.name("add")), [a, b])
        elif kind == "norm":
            self.norm(self.pick())
        elif kind == "raw":
            self.raw(self.pick())
        elif kind == "conv":
            x = self.pick()
            x = self.call(
                keras.layers.Reshape((x.width, 1), name=self.name("reshape")), [x]
            )
            x.used = True
            conv = keras.layers.Conv1D(
                2, 2, padding="same", activation="tanh", name=self.name("conv")
            )
            x = self.call(conv, [x])
            x.used = True
            self.call(keras.layers.Flatten(name=self.name("flatten")), [x])
        elif kind == "shared":
            layer, width = (
                self.dense_layers[self.rng.integers(len(self.dense_layers))]
                if self.dense_layers
                else (None, 0)
            )
            x = self.pick(width) if layer is not None else None
            if x is None:
                self.dense(self.pick())
            else:
                self.call(layer, [x])
        elif kind == "submodel":
            x = self.pick()
            built = self.submodel(x.width)
            self.submodels.append(built)
            self.call_submodel(built, x)
        else:
            built = self.submodels[self.rng.integers(len(self.submodels))]
            x = self.pick(int(built[0].inputs[0].shape[-1]))
            if x is None:
                self.dense(self.pick())
            else:
                self.call_submodel(built, x)

    def submodel(
        self, width: int, outputs: int | None = None
    ) -> tuple[keras.Model, dict[str, set[str]], list[frozenset[str]]]:
        """A nested functional or Sequential model taking `width` features."""
        if self.rng.random() < 0.35:
            return self.sequential(width)
        child = Net(self.rng, self.names, self.depth + 1)
        inputs = keras.Input((width,))
        child.add(Value(inputs, frozenset()))
        for _ in range(self.rng.integers(1, 4)):
            child.step()
        ends = child.finish(outputs or int(self.rng.integers(1, 3)))
        model = keras.Model(
            inputs,
            [v.tensor for v in ends] if len(ends) > 1 else ends[0].tensor,
            name=self.name("sub"),
        )
        return model, child.through, [v.upstream for v in ends]

    def sequential(
        self, width: int
    ) -> tuple[keras.Model, dict[str, set[str]], list[frozenset[str]]]:
        layers: list[Any] = []
        through: dict[str, set[str]] = {}
        upstream: frozenset[str] = frozenset()
        for _ in range(self.rng.integers(1, 4)):
            kind = self.rng.integers(3)
            if kind == 0 or not layers:
                activation = ACTIVATIONS[self.rng.integers(len(ACTIVATIONS))]
                layer = keras.layers.Dense(
                    self.width(), activation=activation, name=self.name("dense")
                )
            elif kind == 1:
                layer = keras.layers.LayerNormalization(name=self.name("ln"))
            else:
                layer = keras.layers.Activation("tanh", name=self.name("act"))
            if not isinstance(layer, keras.layers.Activation):
                upstream |= {layer.name}
            through[layer.name] = set(upstream)
            layers.append(layer)
        model = keras.Sequential(
            [keras.Input((width,)), *layers], name=self.name("seq")
        )
        return model, through, [upstream]

    def call_submodel(
        self,
        built: tuple[keras.Model, dict[str, set[str]], list[frozenset[str]]],
        x: Value,
    ) -> list[Value]:
        model, inner, output_sets = built
        name = model.name
        for path, upstream in inner.items():
            if not upstream:
                continue  # maybe a branch of the inner input that was left out
            self.through.setdefault(f"{name}/{path}", set()).update(
                x.upstream | {f"{name}/{p}" for p in upstream}
            )
        result = model(x.tensor)
        tensors = result if isinstance(result, list) else [result]
        values = []
        for tensor, upstream in zip(tensors, output_sets, strict=True):
            full = x.upstream | {f"{name}/{p}" for p in upstream}
            self.through.setdefault(name, set()).update(full)
            values.append(self.add(Value(tensor, full, from_submodel=True)))
        return values

    def finish(self, count: int) -> list[Value]:
        """`count` outputs that together use every value built so far.

        Unused values are merged; an output may also be a value that feeds
        other layers too (`keras.Model(x, [head(s), s])`).
        """
        vectors = [v for v in self.pool if len(v.tensor.shape) == 2 and v.upstream]
        leaves = [v for v in vectors if not v.used]
        if not leaves:
            leaves = [self.dense(self.pick())]
        groups: list[list[Value]] = [[] for _ in range(min(count, len(leaves)))]
        for i, value in enumerate(leaves):
            groups[i % len(groups)].append(value)
        outputs = []
        for group in groups:
            if len(group) == 1:
                outputs.append(group[0])
                continue
            for v in group:
                v.used = True
            if len({v.width for v in group}) == 1 and self.rng.random() < 0.5:
                layer: Any = keras.layers.Add(name=self.name("add"))
            else:
                layer = keras.layers.Concatenate(name=self.name("concat"))
            outputs.append(self.call(layer, group))
        inner = [v for v in vectors if v.used and v not in outputs]
        if len(outputs) < count and inner:
            # Prefer a nested model's output as the extra output.
            nested = [v for v in inner if v.from_submodel] or inner
            outputs.append(nested[self.rng.integers(len(nested))])
        return outputs


@dataclass
class Measured:
    outputs: list[np.ndarray]
    grads: dict[int, np.ndarray]  # by variable id


@dataclass
class Case:
    model: keras.Model
    data: Any
    through: dict[str, set[str]]
    description: str


def random_model(seed: int) -> Case:
    """A random small model, its input batch and its upstream sets."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    names = itertools.count()
    form = rng.choice(["functional"] * 8 + ["wrapped", "sequential"])
    widths = [int(rng.integers(3, 7)) for _ in range(1 + (rng.random() < 0.3))]
    if form == "sequential":
        widths = widths[:1]
    data = [rng.standard_normal((BATCH, w)).astype("float32") for w in widths]
    net = Net(rng, names)
    if form == "sequential":
        model, through = outer_sequential(net, widths[0])
        return Case(model, data[0], through, "Sequential outer model")
    if form == "wrapped":
        # The whole model is a call of a nested model: keras.Model(x, sub(x)).
        x = keras.Input((widths[0],))
        built = net.submodel(widths[0])
        outputs = net.call_submodel(built, net.add(Value(x, frozenset())))
        model = keras.Model(x, [v.tensor for v in outputs], name="wrapped")
        return Case(model, data[0], net.through, "keras.Model(x, sub(x))")
    inputs = [keras.Input((w,), name=f"input{i}") for i, w in enumerate(widths)]
    for x in inputs:
        # Each input feeds a layer, so that every input is used.
        net.dense(Value(x, frozenset()))
    for _ in range(rng.integers(2, 7)):
        net.step()
    outputs = net.finish(int(rng.integers(1, 3)))
    model = keras.Model(
        inputs if len(inputs) > 1 else inputs[0],
        [v.tensor for v in outputs],
        name="random",
    )
    return Case(
        model, data if len(data) > 1 else data[0], net.through, "functional model"
    )


def outer_sequential(net: Net, width: int) -> tuple[keras.Model, dict[str, set[str]]]:
    """A Sequential model of Dense layers and nested models, in a chain."""
    layers: list[Any] = []
    through: dict[str, set[str]] = {}
    upstream: frozenset[str] = frozenset()
    current = width
    for _ in range(net.rng.integers(2, 5)):
        if net.rng.random() < 0.5:
            sub, inner, (output_set,) = net.submodel(current, outputs=1)
            for path, inner_upstream in inner.items():
                if not inner_upstream:
                    continue  # maybe a branch of its input that was left out
                through[f"{sub.name}/{path}"] = set(upstream) | {
                    f"{sub.name}/{p}" for p in inner_upstream
                }
            upstream |= {f"{sub.name}/{p}" for p in output_set}
            layer: Any = sub
            current = int(sub.outputs[0].shape[-1])
        else:
            current = net.width()
            layer = keras.layers.Dense(
                current, activation="tanh", name=net.name("dense")
            )
            upstream |= {layer.name}
        through[layer.name] = set(upstream)
        layers.append(layer)
    return keras.Sequential([keras.Input((width,)), *layers], name="chain"), through


# Checks ---------------------------------------------------------------------


def layer_by_path(model: keras.Model, path: str) -> Any:
    layer = model
    for name in path.split("/"):
        layer = layer.get_layer(name)
    return layer


def measure(model: keras.Model, data: Any, seed: int = 0) -> Measured:
    """The outputs (training=False) and the weight gradients by variable id of
    a fixed random projection of them, as `_backend.weight_gradients`, from
    one pass: on JAX eagerly, since compiling each tiny model's gradient costs
    more than running it once.
    """
    rng = np.random.default_rng(seed)
    projections = [
        keras.ops.convert_to_tensor(
            rng.standard_normal((1, *t.shape[1:])).astype("float32")
        )
        for t in model.outputs
    ]
    variables = model.trainable_variables

    def loss_of(outputs: Any) -> Any:
        return sum(
            keras.ops.sum(o * w)
            for o, w in zip(keras.tree.flatten(outputs), projections, strict=True)
        )

    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            outputs = model(data, training=False)
            value = loss_of(outputs)
        grads = tape.gradient(value, variables)
    elif BACKEND == "jax":
        import jax

        frozen = [v.value for v in model.non_trainable_variables]

        def pure(trainable: Any) -> Any:
            outputs, _ = model.stateless_call(trainable, frozen, data, training=False)
            return loss_of(outputs), outputs

        grads, outputs = jax.grad(pure, has_aux=True)([v.value for v in variables])
    else:
        import torch

        outputs = model(data, training=False)
        value = loss_of(outputs)
        # A stop before every output leaves the loss without a graph.
        grads = (
            torch.autograd.grad(value, [v.value for v in variables], allow_unused=True)
            if value.requires_grad
            else [None] * len(variables)
        )
    return Measured(
        [to_numpy(t) for t in keras.tree.flatten(outputs)],
        {
            id(v): np.zeros(v.shape, "float32") if g is None else to_numpy(g)
            for v, g in zip(variables, grads, strict=True)
        },
    )


def layer_gradient(
    model: keras.Model, path: str, grads: dict[int, np.ndarray]
) -> np.ndarray:
    """One layer's gradients, all its variables in one flat vector."""
    variables = layer_by_path(model, path).trainable_variables
    return np.concatenate([grads[id(v)].ravel() for v in variables]).astype("float64")


def same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def one_multiple(new: np.ndarray, old: np.ndarray) -> tuple[float, float]:
    """The least-squares factor c with new ~ c * old, and the residual
    relative to `new`."""
    c = float(np.dot(new, old) / np.dot(old, old))
    residual = np.linalg.norm(new - c * old) / max(np.linalg.norm(new), 1e-30)
    return c, float(residual)


def check_exact_forward(expected: Measured, got: Measured, what: str) -> list[str]:
    """(1) bit-exact outputs."""
    if len(got.outputs) != len(expected.outputs) or not all(
        np.array_equal(a, b) for a, b in zip(got.outputs, expected.outputs, strict=True)
    ):
        return [f"{what}: outputs differ from the original's"]
    return []


def check_ratios(
    case: Case,
    rewritten: keras.Model,
    reported: dict[str, float],
    before: dict[int, np.ndarray],
    after: dict[int, np.ndarray],
) -> list[str]:
    """(2) measured ratio == reported multiplier, per variable, as
    `variable_multipliers` reports it, and the per-layer report is each
    layer's variables' common value."""
    problems = []
    per_variable = variable_multipliers(rewritten)
    for key, multiplier in per_variable.items():
        path, name = key.rsplit("/", 1)
        if not same(multiplier, reported[path]):
            problems.append(
                f"{key}: variable_multipliers says {multiplier}, "
                f"effective_multipliers {reported[path]}"
            )
        if math.isnan(multiplier):
            continue
        (variable,) = [
            v
            for v in layer_by_path(case.model, path).trainable_variables
            if v.name == name
        ]
        error = relative_error(after[id(variable)], multiplier * before[id(variable)])
        if not error <= RATIO_TOLERANCE:
            problems.append(
                f"{key}: reported {multiplier}, measured off by {error:.2e} (relative)"
            )
    return problems


def check_mixed(
    case: Case,
    rewritten: keras.Model,
    reported: dict[str, float],
    before: dict[int, np.ndarray],
    after: dict[int, np.ndarray],
) -> list[str]:
    """(4) a `nan` layer's measured gradient is not one multiple."""
    mixed = [path for path, m in reported.items() if math.isnan(m)]
    if not mixed:
        return []
    # A second projection of the outputs: a true multiplier is the same for
    # every loss, a mix of paths generally is not.
    other_before = measure(case.model, case.data, seed=1).grads
    other_after = measure(rewritten, case.data, seed=1).grads
    problems = []
    for path in mixed:
        fits = []
        for old_grads, new_grads in ((before, after), (other_before, other_after)):
            old = layer_gradient(case.model, path, old_grads)
            new = layer_gradient(case.model, path, new_grads)
            if np.linalg.norm(old) > 0:
                fits.append(one_multiple(new, old))
        if not fits:
            continue  # no gradient at all: nothing to tell paths apart
        factors = [c for c, _ in fits]
        spread = max(factors) - min(factors)
        largest = max(abs(c) for c in factors)
        if all(r <= MIXED_RESIDUAL for _, r in fits) and spread <= (
            MIXED_RESIDUAL * largest
        ):
            problems.append(
                f"{path}: reported nan, but measured one multiple "
                f"{factors[0]:.6g} (residuals {[f'{r:.1e}' for _, r in fits]})"
            )
    return problems


def check_cut(
    case: Case,
    rewritten: keras.Model,
    reported: dict[str, float],
    base: Measured,
    rng: np.random.Generator,
    scaled: set[str],
) -> list[str]:
    """(3) a scale at a reported cut multiplies exactly its upstream layers."""
    cuts = [
        c for c in gradient_cuts(rewritten) if c in case.through and c not in scaled
    ]
    if not cuts:
        return []
    cut = cuts[rng.integers(len(cuts))]
    k = CUT_SCALES[rng.integers(len(CUT_SCALES))]
    twice = insert_gradient_scales(rewritten, {cut: k})
    measured = measure(twice, case.data)
    problems = check_exact_forward(base, measured, f"cut {cut} x {k}")
    again = effective_multipliers(twice)
    upstream = case.through[cut]
    if not upstream:
        problems.append(f"cut {cut}: the generator saw no trainable layer upstream")
    for path, m in reported.items():
        where = "upstream" if path in upstream else "not upstream"
        factor = k if path in upstream else 1.0
        want = 0.0 if factor == 0 else m * factor
        if not same(again.get(path, math.nan), want):
            problems.append(
                f"cut {cut} x {k}: {path} ({where}) reported {again.get(path)} "
                f"after, {m} before"
            )
        if factor == 0 and layer_by_path(twice, path).trainable_variables:
            problems.append(f"cut {cut} x 0: {path} ({where}) is not frozen")
        for variable in layer_by_path(case.model, path).trainable_variables:
            if factor == 0:
                # A zero freezes: the (shared) layer gets trainable=False,
                # and its variable no gradient at all.
                if id(variable) in measured.grads:
                    problems.append(f"cut {cut} x 0: {path} still trains")
                continue
            error = relative_error(
                measured.grads[id(variable)], factor * base.grads[id(variable)]
            )
            if not error <= RATIO_TOLERANCE:
                problems.append(
                    f"cut {cut} x {k}: {path}/{variable.name} ({where}) measured "
                    f"off x{factor} by {error:.2e}"
                )
    return problems


def check_seed(seed: int) -> list[str]:
    """Every problem found with the model and scales of `seed`."""
    case = random_model(seed)
    rng = np.random.default_rng([seed, 1])
    cuts = gradient_cuts(case.model)
    # A layer with no trainable layer upstream may have been left out of the
    # model (a branch of the input alone that reaches no output).
    anywhere = sorted(path for path, upstream in case.through.items() if upstream)
    scales: dict[str, float] = {}
    for _ in range(rng.integers(1, 4)):
        pool = cuts if cuts and rng.random() < 0.5 else anywhere
        scales[pool[rng.integers(len(pool))]] = SCALES[rng.integers(len(SCALES))]
    rewritten = insert_gradient_scales(case.model, scales, on_bypass="ignore")
    reported = effective_multipliers(rewritten)
    before = measure(case.model, case.data)
    after = measure(rewritten, case.data)
    problems = check_exact_forward(before, after, "rewrite")
    problems += check_ratios(case, rewritten, reported, before.grads, after.grads)
    problems += check_mixed(case, rewritten, reported, before.grads, after.grads)
    problems += check_cut(case, rewritten, reported, after, rng, set(scales))
    return [f"{case.description}, scales {scales}: {p}" for p in problems]


def seeds_of(chunk: int) -> list[int]:
    if "STOPGRAD_SEED" in os.environ:
        return [int(os.environ["STOPGRAD_SEED"])] if chunk == 0 else []
    return list(range(chunk * CHUNK, min((chunk + 1) * CHUNK, MODELS)))


@pytest.mark.parametrize("chunk", range(math.ceil(MODELS / CHUNK)))
def test_random_models(chunk):
    failures = []
    for seed in seeds_of(chunk):
        try:
            problems = check_seed(seed)
        except Exception as error:  # a crash is a finding too: report its seed
            problems = [f"raised {type(error).__name__}: {error}"]
        failures += [f"seed {seed}: {p}" for p in problems]
    if failures:
        pytest.fail(
            f"{len(failures)} problem(s); rerun one with STOPGRAD_SEED=<seed>:\n"
            + "\n".join(failures[:40])
        )
