"""A zero multiplier is a real freeze, on every backend.

The layers upstream of a `GradientStop` that `insert_gradient_scales` or
`apply_lr_multipliers` inserts are frozen copies: their weights never change
whatever the optimizer (momentum and Adam state from earlier training, weight
decay), they take no optimizer slots, their BatchNormalization runs in
inference mode, and the user's model keeps its own trainable layers.
Runs on TensorFlow, JAX and torch.
"""

import warnings

import _models
import keras
import numpy as np
import pytest
from _backend import BACKEND, forward

import stopgrad_lr
from stopgrad_lr import (
    GradientScale,
    GradientStop,
    apply_lr_multipliers,
    check_optimizer,
    effective_multipliers,
    insert_gradient_scales,
    multi_optimizer,
    strip_gradient_scales,
    summary,
)

RNG = np.random.default_rng(0)
X = RNG.standard_normal((16, 6)).astype("float32")
Y = RNG.standard_normal((16, 2)).astype("float32")
UPSTREAM = ("body1", "norm", "body2")  # what a zero after body2 freezes


def mlp():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="relu", name="body1")(inputs)
    x = keras.layers.BatchNormalization(name="norm")(x)
    x = keras.layers.Dense(8, activation="relu", name="body2")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x), name="mlp")


def values(layers):
    return [
        np.array(keras.ops.convert_to_numpy(w)) for lay in layers for w in lay.weights
    ]


def train(model, optimizer, steps=5):
    model.compile(optimizer=optimizer, loss="mse")
    with warnings.catch_warnings():
        # TensorFlow and torch: the stopped layers have no gradient (fine).
        warnings.filterwarnings("ignore", message="Gradients do not exist")
        for _ in range(steps):
            model.train_on_batch(X, Y)


def same(a, b):
    return len(a) == len(b) and all(
        np.array_equal(x, y) for x, y in zip(a, b, strict=True)
    )


OPTIMIZERS = {
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_frozen_weights_are_bit_identical_after_training(name):
    """The issue's repro: plain training builds up momentum (and Adam state),
    then a zero after body2 and five more steps."""
    model = mlp()
    optimizer = OPTIMIZERS[name]()
    train(model, optimizer)
    user_weights = values(model.layers[1:4])
    frozen = insert_gradient_scales(model, {"body2": 0.0})
    upstream = [frozen.get_layer(n) for n in UPSTREAM]
    before, head = values(upstream), values([frozen.get_layer("head")])
    if BACKEND == "jax":
        # Keras's JAX trainer refuses an optimizer built for another set of
        # trainable variables; the rewritten model needs a fresh one.
        with pytest.raises(ValueError, match="optimizer was built with"):
            train(frozen, optimizer, steps=1)
        optimizer = type(optimizer).from_config(optimizer.get_config())
        # A fresh AdamW's decay alone moved stopped weights by 4.4e-5 here.
    train(frozen, optimizer)
    assert same(values(upstream), before)  # moving statistics included
    assert not same(values([frozen.get_layer("head")]), head)
    # The user's model: its own layers, unchanged and still trainable.
    assert same(values(model.layers[1:4]), user_weights)
    assert all(v.trainable for v in model.trainable_weights)
    assert len(model.trainable_weights) == 8
    assert frozen.get_layer("head") is model.get_layer("head")


def reference_frozen():
    """What Keras's own freeze gives: the same model, upstream layers
    `trainable = False`, and a stop (so no gradient is asked for)."""
    inputs = keras.Input((6,))
    x = inputs
    for layer in mlp().layers[1:4]:
        layer.trainable = False
        x = layer(x)
    x = GradientStop()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def test_a_fresh_optimizer_keeps_no_slots_for_frozen_variables():
    frozen = insert_gradient_scales(mlp(), {"body2": 0.0})
    reference = reference_frozen()
    for model in (frozen, reference):
        train(model, keras.optimizers.Adam(), steps=1)
    assert [v.shape for v in frozen.optimizer.variables] == [
        v.shape for v in reference.optimizer.variables
    ]
    # Adam: two slots per trainable variable, the head's kernel and bias.
    assert [tuple(v.shape) for v in frozen.trainable_variables] == [(8, 2), (2,)]


def test_batch_norm_upstream_runs_in_inference_mode_unless_asked():
    model = mlp()
    model(X, training=True)  # moving statistics that differ from batch ones
    train(model, keras.optimizers.SGD(0.1), steps=2)
    norm = model.get_layer("norm")
    frozen = insert_gradient_scales(model, {"body2": 0.0})
    stats = values([frozen.get_layer("norm")])
    # Inference mode: training and inference outputs agree.
    got_training = forward(frozen, X, True)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(got_training, forward(model, X, False), strict=True)
    )
    train(frozen, keras.optimizers.SGD(0.1))
    assert same(values([frozen.get_layer("norm")]), stats)

    kept = insert_gradient_scales(model, {"body2": 0.0}, freeze_batch_norm=False)
    kept_norm = kept.get_layer("norm")
    assert kept_norm is not norm and kept_norm.trainable
    assert not kept_norm.trainable_weights
    # Training mode: batch statistics, as the user's model computes.
    assert all(
        np.array_equal(a, b)
        for a, b in zip(forward(kept, X, True), forward(model, X, True), strict=True)
    )
    gamma_beta = values([kept_norm])[:2]
    train(kept, keras.optimizers.AdamW(0.01, weight_decay=0.1))
    assert same(values([kept_norm])[:2], gamma_beta)
    assert not same(values([kept_norm])[2:], stats[2:])  # moving mean, variance
    assert effective_multipliers(kept)["norm"] == 0.0
    # copy=True clones the model, which keeps only layer flags.
    copied = insert_gradient_scales(
        model, {"body2": 0.0}, freeze_batch_norm=False, copy=True
    )
    assert copied.get_layer("norm").trainable
    assert not copied.get_layer("norm").trainable_weights


def test_analysis_reads_frozen_layers_as_zero_like_keras_freezing():
    frozen = insert_gradient_scales(mlp(), {"body2": 0.0})
    reference = reference_frozen()
    expected = {"body1": 0.0, "norm": 0.0, "body2": 0.0, "head": 1.0}
    assert effective_multipliers(frozen) == expected
    assert effective_multipliers(reference) == expected
    lines = []
    rows = summary(frozen, print_fn=lines.append)
    assert [row.multiplier for row in rows[:3]] == [0.0, 0.0, 0.0]
    assert [row.trainable_params for row in rows[:3]] == [0, 0, 0]
    assert "0 (frozen)" in lines[1]
    # A layer frozen by hand, no stop anywhere: 0 too.
    model = mlp()
    model.get_layer("body1").trainable = False
    assert effective_multipliers(model)["body1"] == 0.0
    # Weight decay reaches no frozen layer, but a schedulable zero's layers.
    adamw = keras.optimizers.AdamW(weight_decay=0.1)
    assert check_optimizer(adamw, frozen).ok and check_optimizer(adamw, model).ok
    zero = insert_gradient_scales(mlp(), {"body2": 0.0}, stop_at_zero=False)
    (problem,) = check_optimizer(adamw, zero).problems
    assert "weight_decay=0.1" in problem


def test_a_layer_reached_around_the_stop_keeps_training():
    """body1 feeds the stopped body2 and, around it, a second output."""
    inputs = keras.Input((6,))
    body1 = keras.layers.Dense(8, name="body1")(inputs)
    body2 = keras.layers.Dense(8, name="body2")(body1)
    head = keras.layers.Dense(2, name="head")(body2)
    side = keras.layers.Dense(2, name="side")(body1)
    model = keras.Model(inputs, [head, side])
    frozen = insert_gradient_scales(model, {"body2": 0.0}, on_bypass="ignore")
    assert frozen.get_layer("body1") is model.get_layer("body1")
    assert frozen.get_layer("body2") is not model.get_layer("body2")
    assert not frozen.get_layer("body2").trainable
    # body1's gradient comes along the side path alone: paths 0 and 1.
    (row,) = [row for row in summary(frozen, print_fn=None) if row.layer == "body1"]
    assert row.multipliers == (0.0, 1.0) and row.trainable_params == 6 * 8 + 8
    assert effective_multipliers(frozen)["body2"] == 0.0


def test_a_freeze_inside_a_nested_model():
    model, data = _models.functional_in_sequential()
    frozen = insert_gradient_scales(model, {"backbone/inner_dense": 0.0})
    inner = frozen.get_layer("backbone")
    assert not inner.get_layer("inner_dense").trainable
    assert inner.get_layer("inner_out").trainable
    assert model.get_layer("backbone").get_layer("inner_dense").trainable
    got, want = forward(frozen, data, True), forward(model, data, True)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_strip_save_and_load_keep_the_freeze(tmp_path):
    frozen = insert_gradient_scales(mlp(), {"body2": 0.0})
    stripped = strip_gradient_scales(frozen)
    assert not any(isinstance(layer, GradientStop) for layer in stripped.layers)
    path = tmp_path / "frozen.keras"
    frozen.save(path)
    loaded = keras.saving.load_model(path)
    for model in (stripped, loaded):
        assert [v.shape for v in model.trainable_variables] == [(8, 2), (2,)]
        assert effective_multipliers(model)["body1"] == 0.0
    assert all(
        np.array_equal(a, b)
        for a, b in zip(forward(loaded, X, True), forward(frozen, X, True), strict=True)
    )


def test_a_schedulable_zero_freezes_nothing():
    model = mlp()
    zero = insert_gradient_scales(model, {"body2": 0.0}, stop_at_zero=False)
    assert zero.get_layer("body1") is model.get_layer("body1")
    assert isinstance(zero.get_layer("body2_gradient_scale"), GradientScale)
    assert len(zero.trainable_variables) == 8


def test_apply_lr_multipliers_freezes_a_zero_group_with_either_mechanism():
    model = mlp()
    by_scale = apply_lr_multipliers(model, {"body*": 0.0, "norm": 0.0})
    by_reparam = apply_lr_multipliers(
        model, {"body1": 0.0, "norm": 0.0}, optimizer=keras.optimizers.Adam()
    )
    for rewritten, names in ((by_scale, UPSTREAM), (by_reparam, ("body1", "norm"))):
        for name in names:
            assert not rewritten.get_layer(name).trainable
            assert model.get_layer(name).trainable
    kept = apply_lr_multipliers(
        model,
        {"norm": 0.0},
        optimizer=keras.optimizers.Adam(),
        freeze_batch_norm=False,
    )
    norm = kept.get_layer("norm")
    assert norm.trainable and not norm.trainable_weights
    assert kept.get_layer("body1") is model.get_layer("body1")


def test_a_zero_group_of_multi_optimizer_does_not_move():
    """Learning rate 0: Keras multiplies weight decay by it too. (The
    backward pass and the slots remain: it is not a freeze.)"""
    model = mlp()
    optimizer = multi_optimizer(
        model, {"body1": 0.0}, keras.optimizers.AdamW(0.01, weight_decay=0.1)
    )
    before = values([model.get_layer("body1")])
    train(model, optimizer)
    assert same(values([model.get_layer("body1")]), before)
    assert not same(values([model.get_layer("body2")])[:1], before[:1])


class _NoConfig(keras.layers.Layer):
    """A layer whose constructor needs an argument its config lacks."""

    def __init__(self, units):
        super().__init__()
        self.dense = keras.layers.Dense(units)

    def call(self, inputs):
        return self.dense(inputs)


def test_a_layer_that_cannot_be_copied_is_a_clear_error():
    inputs = keras.Input((6,))
    x = _NoConfig(4)(inputs)
    x = keras.layers.Dense(4, name="body")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    with pytest.raises(ValueError) as info:
        insert_gradient_scales(model, {"body": 0.0})
    message = str(info.value)
    assert "Cannot freeze layer" in message and "_NoConfig" in message
    assert "layer.trainable = False" in message and "stop_at_zero=False" in message
    # The suggested fix works: a layer frozen by hand is left as it is.
    model.layers[1].trainable = False
    frozen = insert_gradient_scales(model, {"body": 0.0})
    assert frozen.layers[1] is model.layers[1]


def test_freeze_batch_norm_must_be_a_bool():
    with pytest.raises(ValueError, match=r"freeze_batch_norm='no' of type str"):
        insert_gradient_scales(mlp(), {"body2": 0.0}, freeze_batch_norm="no")
    assert stopgrad_lr.insert_gradient_scales  # the public name
