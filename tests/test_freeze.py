"""A zero multiplier is a real freeze, on every backend.

The layers upstream of a `GradientStop` that `insert_gradient_scales` or
`apply_lr_multipliers` inserts are frozen as Keras freezes a layer
(`trainable = False`): every variable under them, sublayers built in
`build()` and keras-hub blocks included, never changes whatever the
optimizer (momentum and Adam state from earlier training, weight decay),
takes no optimizer slot, and every BatchNormalization under them runs in
inference mode. The frozen layers are the input model's own (`copy=False`):
weights set on either model reach the other.
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


class _Block(keras.layers.Layer):
    """A custom block that creates its sublayers in `build()`, a
    BatchNormalization among them, and has no `get_config`."""

    def __init__(self, units):
        super().__init__()
        self.units = units

    def build(self, input_shape):
        self.dense = keras.layers.Dense(self.units, activation="relu")
        self.dense.build(input_shape)
        self.norm = keras.layers.BatchNormalization()
        self.norm.build((*input_shape[:-1], self.units))

    def call(self, inputs, training=None):
        return self.norm(self.dense(inputs), training=training)


def _dense_stack():
    return mlp(), X, "body2"


def _attention():
    inputs = keras.Input((4, 6))
    x = keras.layers.MultiHeadAttention(2, 3, name="mha")(inputs, inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    return model, RNG.standard_normal((16, 4, 6)).astype("float32"), "mha"


def _custom_block():
    inputs = keras.Input((6,))
    x = _Block(8)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    return model, X, model.layers[1].name


def _with_head(backbone, output=None):
    features = backbone.output if output is None else backbone.output[output]
    pooled = keras.layers.GlobalAveragePooling1D()(features)
    return keras.Model(backbone.input, keras.layers.Dense(2, name="head")(pooled))


def _bert():
    return (
        _with_head(_models.bert_backbone(), "sequence_output"),
        None,
        "transformer_layer_0",
    )


def _gpt2():
    return _with_head(_models.gpt2_backbone()), None, "transformer_layer_0"


MODELS = {
    "dense_stack": _dense_stack,
    "multi_head_attention": _attention,
    "custom_block_with_batch_norm": _custom_block,
    "bert_layer": _bert,
    "gpt2_layer": _gpt2,
}


def _inputs(model, x):
    if x is not None:
        return x
    inputs = _models.bert_inputs(batch=16)
    return {name: inputs[name] for name in model.input}


def _fit(model, optimizer, x, steps=5):
    model.compile(optimizer=optimizer, loss="mse")
    y = np.asarray(RNG.standard_normal((16, 2)), "float32")
    with warnings.catch_warnings():
        # TensorFlow and torch: the stopped layers have no gradient (fine).
        warnings.filterwarnings("ignore", message="Gradients do not exist")
        for _ in range(steps):
            model.train_on_batch(x, y)


def _under(model, path):
    """Every variable under the layer at `path`, and the others."""
    layer = model.get_layer(path)
    inside = {id(v) for v in layer.weights}
    return layer.weights, [v for v in model.weights if id(v) not in inside]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_variable_under_a_frozen_layer_is_bit_identical(model_name, name):
    """Plain training first builds up momentum (and Adam state), then a zero
    after the layer and five steps of AdamW(weight_decay=0.1) or SGD with
    momentum: nothing under it moves, moving statistics included."""
    model, x, target = MODELS[model_name]()
    x = _inputs(model, x)
    optimizer = OPTIMIZERS[name]()
    _fit(model, optimizer, x, steps=2)
    frozen = insert_gradient_scales(model, {target: 0.0})
    inside, outside = _under(frozen, target)
    assert inside and not {id(v) for v in inside} & {
        id(v) for v in frozen.trainable_variables
    }
    before, rest = values_of(inside), values_of(outside)
    if BACKEND == "jax":
        # Keras's JAX trainer refuses an optimizer built for another set of
        # trainable variables; the rewritten model needs a fresh one.
        optimizer = type(optimizer).from_config(optimizer.get_config())
    _fit(frozen, optimizer, x)
    assert same(values_of(inside), before)
    assert not same(values_of(outside), rest)  # the head trained
    assert effective_multipliers(frozen)[target] == 0.0


def values_of(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def test_the_frozen_layers_are_the_input_models_own():
    """The sharing contract (copy=False): every variable of the new model
    that came from the input model is that variable, frozen ones included, so
    weights set on the input reach the new model, and the freeze is Keras's
    own `trainable = False` on the shared layers."""
    model = mlp()
    frozen = insert_gradient_scales(model, {"body2": 0.0})
    assert all(frozen.get_layer(n) is model.get_layer(n) for n in (*UPSTREAM, "head"))
    assert {id(v) for v in frozen.weights} == {id(v) for v in model.weights}
    assert [v.path for v in model.trainable_variables] == ["head/kernel", "head/bias"]
    rng = np.random.default_rng(3)
    # Positive, so that the moving variance is a variance.
    model.set_weights([rng.uniform(0.5, 1.5, w.shape) for w in model.get_weights()])
    got, want = forward(frozen, X, False), forward(model, X, False)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    # Unfreezing is Keras's own too.
    model.get_layer("body1").trainable = True
    assert "body1/kernel" in [v.path for v in frozen.trainable_variables]


def test_copy_true_freezes_copies_and_leaves_the_input_untouched():
    model = mlp()
    frozen = insert_gradient_scales(model, {"body2": 0.0}, copy=True)
    assert not {id(v) for v in frozen.weights} & {id(v) for v in model.weights}
    assert all(layer.trainable for layer in model.layers)
    assert len(model.trainable_variables) == 8
    assert [v.path for v in frozen.trainable_variables] == [
        "head/kernel",
        "head/bias",
    ]


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
    frozen = insert_gradient_scales(model, {"body2": 0.0}, copy=True)
    stats = values([frozen.get_layer("norm")])
    # Inference mode: training and inference outputs agree.
    got_training = forward(frozen, X, True)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(got_training, forward(model, X, False), strict=True)
    )
    train(frozen, keras.optimizers.SGD(0.1))
    assert same(values([frozen.get_layer("norm")]), stats)

    norm = model.get_layer("norm")
    stats = values([norm])
    kept = insert_gradient_scales(model, {"body2": 0.0}, freeze_batch_norm=False)
    assert kept.get_layer("norm") is norm and norm.trainable
    assert not norm.trainable_weights
    assert not model.get_layer("body1").trainable
    # Training mode: batch statistics.
    want = forward(model, X, True)
    assert all(
        np.array_equal(a, b) for a, b in zip(forward(kept, X, True), want, strict=True)
    )
    gamma_beta = values([norm])[:2]
    train(kept, keras.optimizers.AdamW(0.01, weight_decay=0.1))
    assert same(values([norm])[:2], gamma_beta)
    assert not same(values([norm])[2:], stats[2:])  # moving mean, variance
    assert effective_multipliers(kept)["norm"] == 0.0
    # copy=True and a strip with copy=True keep the variables' own flags,
    # which `clone_model` alone loses.
    copied = insert_gradient_scales(
        mlp(), {"body2": 0.0}, freeze_batch_norm=False, copy=True
    )
    for rewritten in (copied, strip_gradient_scales(copied, copy=True)):
        assert rewritten.get_layer("norm").trainable
        assert not rewritten.get_layer("norm").trainable_weights
        assert [v.path for v in rewritten.trainable_variables] == [
            "head/kernel",
            "head/bias",
        ]


def test_a_batch_norm_inside_a_frozen_block_keeps_training_mode_if_asked():
    model, _, target = _custom_block()
    kept = insert_gradient_scales(model, {target: 0.0}, freeze_batch_norm=False)
    norm = kept.get_layer(target).norm
    assert norm.trainable and not norm.trainable_weights
    assert not kept.get_layer(target).dense.trainable
    stats = values_of(norm.non_trainable_weights)
    train(kept, keras.optimizers.SGD(0.1), steps=2)
    assert not same(values_of(norm.non_trainable_weights), stats)
    assert effective_multipliers(kept)[target] == 0.0


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
    assert frozen.get_layer("body1").trainable
    assert not frozen.get_layer("body2").trainable
    # body1's gradient comes along the side path alone: paths 0 and 1.
    (row,) = [row for row in summary(frozen, print_fn=None) if row.layer == "body1"]
    assert row.multipliers == (0.0, 1.0) and row.trainable_params == 6 * 8 + 8
    assert effective_multipliers(frozen)["body2"] == 0.0


def test_a_freeze_inside_a_nested_model():
    model, data = _models.functional_in_sequential()
    frozen = insert_gradient_scales(model, {"backbone/inner_dense": 0.0}, copy=True)
    inner = frozen.get_layer("backbone")
    assert not inner.get_layer("inner_dense").trainable
    assert inner.get_layer("inner_out").trainable
    assert model.get_layer("backbone").get_layer("inner_dense").trainable
    shared = insert_gradient_scales(model, {"backbone/inner_dense": 0.0})
    dense = shared.get_layer("backbone").get_layer("inner_dense")
    assert dense is model.get_layer("backbone").get_layer("inner_dense")
    assert not dense.trainable
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
    for names, optimizer in (
        (UPSTREAM, None),
        (("body1", "norm"), keras.optimizers.Adam()),
    ):
        model = mlp()
        zeros = {name: 0.0 for name in names}
        rewritten = apply_lr_multipliers(model, zeros, optimizer=optimizer)
        for name in names:
            assert rewritten.get_layer(name) is model.get_layer(name)
            assert not rewritten.get_layer(name).trainable
        assert all(effective_multipliers(rewritten)[n] == 0.0 for n in names)
    model = mlp()
    kept = apply_lr_multipliers(
        model,
        {"norm": 0.0},
        optimizer=keras.optimizers.Adam(),
        freeze_batch_norm=False,
    )
    norm = kept.get_layer("norm")
    assert norm is model.get_layer("norm")
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


def test_a_layer_that_cannot_be_rebuilt_from_its_config_still_freezes():
    """No copy is made, so no config is needed (GPT-2's blocks and DeiT's
    patch embedding are such layers)."""
    inputs = keras.Input((6,))
    x = _NoConfig(4)(inputs)
    x = keras.layers.Dense(4, name="body")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    frozen = insert_gradient_scales(model, {"body": 0.0})
    assert frozen.layers[1] is model.layers[1]
    assert not model.layers[1].dense.trainable
    assert [v.path for v in frozen.trainable_variables] == [
        "head/kernel",
        "head/bias",
    ]


def test_freeze_batch_norm_must_be_a_bool():
    with pytest.raises(ValueError, match=r"freeze_batch_norm='no' of type str"):
        insert_gradient_scales(mlp(), {"body2": 0.0}, freeze_batch_norm="no")
    assert stopgrad_lr.insert_gradient_scales  # the public name
