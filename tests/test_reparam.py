"""Reparametrisation: exact forward passes, learning rates measured in training.

A layer reparametrised with `c` stores `W / c` and is followed by
`ParameterScale(c)`. The forward pass must be bit-exact for a power of two,
folding back must give the true weights bit for bit, and training must move
the layer like the reference: the same model trained with a
`keras.optimizers.MultiOptimizer` that gives the layer `lr * m`.
"""

import math
import re
import warnings

import _models
import keras
import numpy as np
import pytest
from _backend import BACKEND, forward, relative_error, weight_gradients

from stopgrad_lr import (
    GradientScale,
    OptimizerMismatchWarning,
    ParameterScale,
    apply_lr_multipliers,
    strip_gradient_scales,
)
from stopgrad_lr._patterns import iter_layers

RNG = np.random.default_rng(0)
L = keras.layers
ADAM = keras.optimizers.Adam


def bits_equal(a, b):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and np.array_equal(a.view("uint8"), b.view("uint8"))


def single_layer_model(layer, shape, dtype="float32", head=True):
    """Input -> layer (-> Dense head), with random non-trivial weights."""
    inputs = keras.Input(shape, dtype=dtype)
    outputs = layer(inputs)
    if head:
        outputs = L.Dense(3, name="head")(L.Flatten()(outputs))
    model = keras.Model(inputs, outputs)
    for weight in layer.weights:
        # Gamma near 1, variances positive, everything else centred.
        value = (
            RNG.uniform(0.5, 1.5, weight.shape)
            if "variance" in weight.name
            else (RNG.standard_normal(weight.shape))
        )
        weight.assign(value.astype(weight.dtype))
    return model


def images(*shape):
    return RNG.standard_normal((4, *shape)).astype("float32")


# (layer factory, input shape, input data): every layer kind reparametrisation
# supports, with a non-linear activation (split) or a homogeneous one (kept).
LAYERS = {
    "dense_relu": (lambda: L.Dense(5, activation="relu", name="x"), (6,), None),
    "dense_tanh": (lambda: L.Dense(5, activation="tanh", name="x"), (6,), None),
    "einsum_dense": (
        lambda: L.EinsumDense(
            "ab,bc->ac", (5,), bias_axes="c", activation="gelu", name="x"
        ),
        (6,),
        None,
    ),
    "conv1d": (lambda: L.Conv1D(4, 3, activation="elu", name="x"), (9, 3), None),
    "conv2d": (lambda: L.Conv2D(4, 3, name="x"), (8, 8, 3), None),
    "conv3d": (lambda: L.Conv3D(2, 2, name="x"), (4, 4, 4, 2), None),
    "conv1d_transpose": (
        lambda: L.Conv1DTranspose(3, 3, activation="sigmoid", name="x"),
        (7, 2),
        None,
    ),
    "conv2d_transpose": (lambda: L.Conv2DTranspose(3, 3, name="x"), (5, 5, 2), None),
    "conv3d_transpose": (lambda: L.Conv3DTranspose(2, 2, name="x"), (3, 3, 3, 2), None),
    "depthwise_conv1d": (lambda: L.DepthwiseConv1D(3, name="x"), (9, 3), None),
    "depthwise_conv2d": (
        lambda: L.DepthwiseConv2D(3, activation="swish", name="x"),
        (8, 8, 3),
        None,
    ),
    "batch_normalization": (lambda: L.BatchNormalization(name="x"), (5, 6), None),
    "batch_normalization_no_center": (
        lambda: L.BatchNormalization(center=False, name="x"),
        (6,),
        None,
    ),
    "layer_normalization": (lambda: L.LayerNormalization(name="x"), (5, 6), None),
    "embedding": (
        lambda: L.Embedding(10, 4, mask_zero=True, name="x"),
        (7,),
        np.array([[1, 2, 0, 0, 0, 0, 0], [3, 9, 8, 7, 6, 5, 4]] * 2, "int32"),
    ),
}


def build(kind, dtype="float32"):
    factory, shape, data = LAYERS[kind]
    input_dtype = "int32" if kind == "embedding" else dtype
    # Flatten would drop (and warn about) the Embedding's mask.
    model = single_layer_model(factory(), shape, input_dtype, head=kind != "embedding")
    return model, images(*shape) if data is None else data


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(
    ("optimizer", "m", "c"), [(ADAM, 0.25, 0.25), (keras.optimizers.SGD, 1 / 16, 0.25)]
)
def test_forward_and_folding_back_are_bit_exact_for_a_power_of_two(
    kind, optimizer, m, c
):
    model, data = build(kind)
    before = [w.copy() for w in model.get_weights()]
    reparametrized = apply_lr_multipliers(
        model, {"x": m}, optimizer=optimizer(), mechanism="reparametrize"
    )
    (scale,) = [
        layer for layer in reparametrized.layers if isinstance(layer, ParameterScale)
    ]
    assert scale.scale == c and scale.multiplier == m
    # Training calls update both models' BatchNormalization statistics alike.
    expected = {}
    for training in (False, True):
        expected[training] = forward(model, data, training)[0]
        got = forward(reparametrized, data, training)[0]
        assert bits_equal(got, expected[training]), training
    # The stored weights are the true ones divided by c.
    stored = reparametrized.get_layer("x")
    assert stored is not model.get_layer("x")
    moving = {id(w) for w in stored.non_trainable_weights}
    for new, old in zip(stored.weights, model.get_layer("x").weights, strict=True):
        factor = 1.0 if id(new) in moving else c
        assert bits_equal(keras.ops.convert_to_numpy(new) * factor, np.asarray(old))
    folded = strip_gradient_scales(reparametrized)
    assert not any(
        isinstance(layer, ParameterScale) for _, layer in iter_layers(folded)
    )
    assert all(
        bits_equal(a, b)
        for a, b in zip(folded.get_weights(), model.get_weights(), strict=True)
    )
    assert bits_equal(forward(folded, data, False)[0], forward(model, data, False)[0])
    # The input model is untouched (but for the statistics that the training
    # call above updated).
    assert model.get_layer("x") is not folded.get_layer("x")
    if "batch" not in kind:
        assert all(
            bits_equal(a, b) for a, b in zip(model.get_weights(), before, strict=True)
        )


def test_a_non_homogeneous_activation_is_split_and_relu_is_not():
    model, _ = build("dense_tanh")
    split = apply_lr_multipliers(model, {"x": 0.5}, optimizer=ADAM())
    assert [type(layer).__name__ for layer in split.layers[1:4]] == [
        "Dense",
        "ParameterScale",
        "Activation",
    ]
    assert split.get_layer("x").get_config()["activation"] == "linear"
    assert split.get_layer("x_activation").get_config()["activation"] == "tanh"
    model, _ = build("dense_relu")
    kept = apply_lr_multipliers(model, {"x": 0.5}, optimizer=ADAM())
    assert [type(layer).__name__ for layer in kept.layers[1:3]] == [
        "Dense",
        "ParameterScale",
    ]
    assert kept.get_layer("x").get_config()["activation"] == "relu"


@pytest.mark.parametrize("m", [0.1, 0.3, 3.0])
def test_other_scales_round_by_about_an_ulp_and_rounding_makes_them_exact(m):
    model, data = _models.residual_cnn()
    expected = forward(model, data, False)[0]
    for rounded in (False, True):
        reparametrized = apply_lr_multipliers(
            model, {"*": m}, optimizer=ADAM(), round_to_power_of_two=rounded
        )
        got = forward(reparametrized, data, False)[0]
        scales = {
            layer.scale
            for layer in reparametrized.layers
            if isinstance(layer, ParameterScale)
        }
        if rounded:
            assert scales == {2.0 ** round(math.log2(m))}
            assert bits_equal(got, expected)
        else:
            assert scales == {m}
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_round_to_power_of_two_for_sgd_rounds_the_square_root():
    model, _ = _models.sequential_mlp()
    tuned = apply_lr_multipliers(
        model,
        {"block1": 0.1},
        optimizer=keras.optimizers.SGD(),
        mechanism="reparametrize",
        round_to_power_of_two=True,
    )
    (scale,) = [layer for layer in tuned.layers if isinstance(layer, ParameterScale)]
    # sqrt(0.1) = 0.316 rounds to 0.25: the multiplier becomes 1/16.
    assert (scale.scale, scale.update_rule, scale.multiplier) == (
        0.25,
        "linear",
        0.0625,
    )


def test_mixed_precision_forward_is_exact_for_a_power_of_two():
    keras.config.set_dtype_policy("mixed_float16")
    model, data = _models.residual_cnn()
    reparametrized = apply_lr_multipliers(model, {"*": 0.25}, optimizer=ADAM())
    for training in (False, True):
        expected = forward(model, data, training)[0]
        assert bits_equal(forward(reparametrized, data, training)[0], expected)
    assert reparametrized.get_layer("stem_conv_parameter_scale").compute_dtype == (
        "float16"
    )


# Model surgery ----------------------------------------------------------------


def test_the_input_model_is_untouched_and_shares_only_unchanged_layers():
    model, data = _models.residual_cnn()
    config, layers, outputs = (
        model.get_config(),
        list(model.layers),
        forward(model, data, False),
    )
    shared = apply_lr_multipliers(model, {"block1_conv2": 0.5}, optimizer=ADAM())
    copied = apply_lr_multipliers(
        model, {"block1_conv2": 0.5}, optimizer=ADAM(), copy=True
    )
    assert model.get_config() == config and model.layers == layers
    assert bits_equal(forward(model, data, False)[0], outputs[0])
    assert shared.get_layer("block1_conv2") is not model.get_layer("block1_conv2")
    assert shared.get_layer("block1_conv1") is model.get_layer("block1_conv1")
    assert copied.get_layer("block1_conv1") is not model.get_layer("block1_conv1")
    assert bits_equal(forward(copied, data, False)[0], outputs[0])


def test_sequential_nested_and_shared_layers():
    model, data = _models.sequential_mlp()
    tuned = apply_lr_multipliers(model, {"block2": 0.5}, optimizer=ADAM())
    assert isinstance(tuned, keras.Sequential)
    assert bits_equal(forward(tuned, data, True)[0], forward(model, data, True)[0])

    model, data = _models.functional_in_sequential()
    tuned = apply_lr_multipliers(
        model, {"backbone/inner_dense": 0.25}, optimizer=ADAM()
    )
    backbone = tuned.get_layer("backbone")
    assert isinstance(backbone.get_layer("inner_dense_parameter_scale"), ParameterScale)
    assert bits_equal(forward(tuned, data, False)[0], forward(model, data, False)[0])

    model, data = _models.shared_layers()
    tuned = apply_lr_multipliers(model, {"encoder": 0.25}, optimizer=ADAM())
    # One copy of the shared layer, still shared by both inputs, each call
    # followed by the scale.
    assert sum(layer.name == "encoder" for layer in tuned.layers) == 1
    assert [layer.name for layer in tuned.layers].count("encoder_parameter_scale") == 1
    assert bits_equal(forward(tuned, data, False)[0], forward(model, data, False)[0])
    assert bits_equal(
        forward(strip_gradient_scales(tuned), data, False)[0],
        forward(model, data, False)[0],
    )


def test_a_zero_multiplier_freezes_any_layer():
    """Even one that cannot be reparametrised: a freeze needs no rescaling.
    The layer is the input model's own, frozen in both (the sharing
    contract)."""
    model, data = _models.masked_lstm()
    tuned = apply_lr_multipliers(model, {"lstm1": 0.0, "embed": 0.5}, optimizer=ADAM())
    assert tuned.get_layer("lstm1") is model.get_layer("lstm1")
    assert not tuned.get_layer("lstm1").trainable
    assert isinstance(tuned.get_layer("embed_parameter_scale"), ParameterScale)
    assert bits_equal(forward(tuned, data, False)[0], forward(model, data, False)[0])
    frozen = {id(v) for v in tuned.get_layer("lstm1").weights}
    assert not frozen & {id(v) for v in tuned.trainable_variables}


def test_save_and_load_keep_the_reparametrisation(tmp_path):
    model, data = _models.residual_cnn()
    tuned = apply_lr_multipliers(
        model, {"block1_*": 0.1, "head": 4.0}, optimizer=ADAM()
    )
    path = tmp_path / "tuned.keras"
    tuned.save(path)
    loaded = keras.models.load_model(path)
    assert bits_equal(forward(loaded, data, False)[0], forward(tuned, data, False)[0])
    scale = loaded.get_layer("block1_conv1_parameter_scale")
    assert (scale.scale, scale.update_rule) == (0.1, "scale_invariant")
    cloned = keras.models.clone_model(tuned)
    assert isinstance(cloned.get_layer("head_parameter_scale"), ParameterScale)


def test_regularizers_still_penalise_the_true_weights():
    inputs = keras.Input((6,))
    hidden = L.Dense(
        5,
        activation="tanh",
        kernel_regularizer=keras.regularizers.L2(0.01),
        bias_regularizer=keras.regularizers.L1(0.02),
        activity_regularizer=keras.regularizers.L1L2(0.03, 0.04),
        name="x",
    )(inputs)
    model = keras.Model(inputs, L.Dense(2)(hidden))
    data = images(6)
    model(data)
    expected = [float(keras.ops.convert_to_numpy(loss)) for loss in model.losses]
    tuned = apply_lr_multipliers(model, {"x": 0.25}, optimizer=ADAM())
    tuned(data)
    got = [float(keras.ops.convert_to_numpy(loss)) for loss in tuned.losses]
    assert sorted(got) == sorted(expected)
    l2 = float(model.get_layer("x").kernel_regularizer.l2)
    assert float(tuned.get_layer("x").kernel_regularizer.l2) == l2 * 0.25**2
    # The activity regularizer moved after the split activation.
    assert tuned.get_layer("x_activation").activity_regularizer is not None
    folded = strip_gradient_scales(tuned)
    assert float(folded.get_layer("x").kernel_regularizer.l2) == l2


# Errors -----------------------------------------------------------------------


def test_a_layer_that_is_not_linear_in_its_weights_points_to_multi_optimizer():
    model, _ = _models.masked_lstm()
    with pytest.raises(ValueError) as info:
        apply_lr_multipliers(model, {"lstm*": 0.1}, optimizer=ADAM())
    message = str(info.value)
    assert "'lstm1' (LSTM)" in message and "'lstm2' (LSTM)" in message
    assert "stopgrad_lr.multi_optimizer(model, multipliers, optimizer)" in message


@keras.saving.register_keras_serializable(package="test_reparam")
class Quartic(keras.regularizers.Regularizer):
    def __call__(self, weights):
        return keras.ops.sum(weights**4)

    def get_config(self):
        return {}


@pytest.mark.parametrize(
    ("layer", "shape", "reason"),
    [
        (L.SeparableConv2D(4, 3), (8, 8, 3), "not linear in its parameters"),
        (L.MultiHeadAttention(2, 4), None, "not linear in its parameters"),
        (L.GRU(3), (5, 2), "not linear in its parameters"),
        (L.BatchNormalization(scale=False), (4,), "x_hat + beta"),
        (
            L.Dense(3, kernel_constraint=keras.constraints.MaxNorm(2.0)),
            (4,),
            "kernel_constraint MaxNorm",
        ),
        (L.Dense(3, kernel_regularizer=Quartic()), (4,), "cannot be rewritten"),
    ],
)
def test_unsupported_layers_raise(layer, shape, reason):
    if shape is None:
        inputs = keras.Input((5, 4))
        outputs = layer(inputs, inputs)
    else:
        inputs = keras.Input(shape)
        outputs = layer(inputs)
    model = keras.Model(inputs, L.Dense(1, name="head")(L.Flatten()(outputs)))
    with pytest.raises(ValueError, match=re.escape(reason)):
        apply_lr_multipliers(model, {layer.name: 0.1}, optimizer=ADAM())


def test_lora_is_refused():
    model, _ = build("dense_relu")
    model.get_layer("x").enable_lora(2)
    with pytest.raises(ValueError, match="LoRA"):
        apply_lr_multipliers(model, {"x": 0.1}, optimizer=ADAM())


def test_a_reparametrised_layer_is_not_reparametrised_twice():
    model, data = _models.sequential_mlp()
    tuned = apply_lr_multipliers(model, {"block1": 0.5}, optimizer=ADAM())
    with pytest.raises(ValueError, match="already reparametrised"):
        apply_lr_multipliers(tuned, {"block1": 0.5}, optimizer=ADAM())
    again = apply_lr_multipliers(
        strip_gradient_scales(tuned), {"block1": 0.25}, optimizer=ADAM()
    )
    assert bits_equal(forward(again, data, False)[0], forward(model, data, False)[0])


def test_a_scale_that_cannot_be_folded_back_is_an_error():
    inputs = keras.Input((4,))
    hidden = L.Dense(3, name="dense")(inputs)
    scaled = ParameterScale(0.5, name="scale")(hidden)
    model = keras.Model(inputs, [scaled, hidden])
    with pytest.raises(ValueError, match="also used without the scale"):
        strip_gradient_scales(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": 0.0}, "Expected a float > 0"),
        ({"scale": float("nan")}, "finite"),
        ({"scale": 0.5, "update_rule": "adam"}, "argument `update_rule`"),
    ],
)
def test_parameter_scale_validates_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParameterScale(**kwargs)


# Training: the learning rates the reparametrisation delivers ---------------------

STEPS, BATCH = 50, 16
# The module runs on TensorFlow in CI (Makefile); the marker says why.
TENSORFLOW_ONLY = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="the training loop uses tf.GradientTape"
)
INNER = "inner2"  # inside the residual block: not a cut


def residual_mlp():
    """stem -> [inner1 -> inner2] + skip -> relu -> head, fixed weights."""
    rng = np.random.default_rng(1)
    inputs = keras.Input((8,))
    stem = L.Dense(16, activation="relu", name="stem")(inputs)
    branch = L.Dense(16, activation="relu", name="inner1")(stem)
    branch = L.Dense(16, name=INNER)(branch)
    merged = L.ReLU(name="out")(L.Add(name="add")([stem, branch]))
    model = keras.Model(inputs, L.Dense(2, name="head")(merged))
    for weight in model.weights:
        scale = 0.1 if "bias" in weight.path else 1 / math.sqrt(weight.shape[0])
        weight.assign(rng.standard_normal(weight.shape).astype("float32") * scale)
    return model


def residual_data():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((STEPS * BATCH, 8)).astype("float32")
    y = np.stack([np.sin(x[:, 0] * x[:, 1]), np.tanh(x[:, 2:5].sum(1))], 1)
    return x, y.astype("float32")


def train_eagerly(model, optimizer, batches, loss_fn):
    """The training step of `fit`, without its tracing: the acceptance runs
    compare many short trainings."""
    import tensorflow as tf

    for x, y in batches:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)


def reference_optimizer(make, lr, m, variables):
    """`keras.optimizers.MultiOptimizer`: `variables` at `lr * m`, the rest at
    `lr`: the independent reference."""
    paths = "|".join(re.escape(v.path) for v in variables)
    return keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(
            default_optimizer=make(lr), optimizer_map={paths: make(lr * m)}
        )
    )


def weights(model):
    return {v.path: np.asarray(keras.ops.convert_to_numpy(v)) for v in model.weights}


def true_weights(model):
    """The weights with every ParameterScale folded back in."""
    return weights(strip_gradient_scales(model))


def update_errors(result, reference, initial):
    """Per variable path: ||dW - dW_ref|| / ||dW_ref||, with dW = W - W0."""
    errors = {}
    for path, value in reference.items():
        wanted = value.astype("float64") - initial[path]
        got = result[path].astype("float64") - initial[path]
        norm = np.linalg.norm(wanted)
        if norm > 0:
            errors[path] = float(np.linalg.norm(got - wanted) / norm)
    return errors


OPTIMIZERS = {
    "Adam": (lambda lr: keras.optimizers.Adam(lr), 1e-3, 0.02),
    "Adamax": (lambda lr: keras.optimizers.Adamax(lr), 2e-3, 0.02),
    "Nadam": (lambda lr: keras.optimizers.Nadam(lr), 1e-3, 0.02),
    "Lion": (lambda lr: keras.optimizers.Lion(lr), 3e-4, 0.02),
    "AdamW(weight_decay=0)": (
        lambda lr: keras.optimizers.AdamW(lr, weight_decay=0.0),
        1e-3,
        0.02,
    ),
    # At lr=0.05 momentum 0.9 sits at the edge of stability, where any two
    # runs that differ by a rounding drift apart.
    "SGD": (lambda lr: keras.optimizers.SGD(lr, momentum=0.9), 0.01, 1e-4),
}


@TENSORFLOW_ONLY
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_layer_inside_a_residual_block_trains_at_lr_times_m(name):
    make, lr, tolerance = OPTIMIZERS[name]
    m = 0.1
    x, y = residual_data()
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    loss = keras.losses.MeanSquaredError()
    initial = weights(residual_mlp())

    reference_model = residual_mlp()
    optimizer = reference_optimizer(
        make, lr, m, reference_model.get_layer(INNER).trainable_variables
    )
    train_eagerly(reference_model, optimizer, batches, loss)
    reference = weights(reference_model)

    # With SGD, "auto" reparametrises too: no cut separates INNER.
    reparametrized = apply_lr_multipliers(
        residual_mlp(), {INNER: m}, optimizer=make(lr)
    )
    assert isinstance(
        reparametrized.get_layer(f"{INNER}_parameter_scale"), ParameterScale
    )
    train_eagerly(reparametrized, make(lr), batches, loss)
    errors = update_errors(true_weights(reparametrized), reference, initial)
    # The errors are relative to the reference's updates; had the layer moved
    # without its multiplier, its error would be about 1/m - 1 = 9.
    assert len(errors) == 8 and max(errors.values()) <= tolerance, errors


def frozen_statistics_resnet50():
    """ResNet50 at 32x32 with calibrated, frozen BatchNormalization (as when
    fine-tuning a pretrained network), and a batch of 8.

    Random initialisation leaves unhealthy regimes otherwise: with the
    initial statistics (0 and 1) whole blocks are dead; in training mode,
    stage 5 normalises 8 values per channel and many gradients are rounding
    noise, which Adam turns into steps of +-lr.
    """
    model, _ = _models.resnet50()
    rng = np.random.default_rng(3)
    normalizations = [
        layer for layer in model.layers if isinstance(layer, L.BatchNormalization)
    ]
    for layer in normalizations:
        layer.momentum = 0.0  # the next training call sets the statistics
    model(rng.standard_normal((64, 32, 32, 3)).astype("float32"), training=True)
    for layer in normalizations:
        layer.trainable = False
    data = rng.standard_normal((8, 32, 32, 3)).astype("float32")
    labels = np.eye(4, dtype="float32")[np.arange(8) % 4]
    return model, data, labels


@TENSORFLOW_ONLY
def test_a_layer_inside_a_resnet50_residual_block():
    """A layer inside a ResNet50 residual block at m = 0.1, its neighbours at 1.

    SGD: the reparametrised kernel's gradient is c times the true gradient,
    and every other layer's is unchanged, so SGD's update (linear in the
    gradient) moves the layer c**2 times as far and the others as before;
    fifty steps of it are tested above. The gradients are compared with a
    power of two as c (m = 0.1 rounds to 0.0625), whose forward pass is
    bit-exact: a forward rounding of one ulp moves conv1's gradient by 3.6%
    in this ResNet50, where ReLU zeros tie in max pooling. (At random
    initialisation it is also so sharp that two SGD steps of 1e-4 quadruple
    the loss, so SGD runs are not compared.)

    Adam, two steps (ResNet50 is slow on CPU): element by element, about 0.5%
    of the gradient entries are rounding noise whose sign flips between any
    two runs, and Adam makes each a full step of +-lr. So the criterion is
    the learning rate itself: how far each kernel of the block moved relative
    to the reference, the ratio column of docs/optimizers.md.
    """
    target, m = "conv2_block2_2_conv", 0.1
    model, data, labels = frozen_statistics_resnet50()
    sgd = apply_lr_multipliers(
        model,
        {target: m},
        optimizer=keras.optimizers.SGD(),
        mechanism="reparametrize",
        round_to_power_of_two=True,
    )
    c = sgd.get_layer(f"{target}_parameter_scale").scale
    before, after = weight_gradients(model, data), weight_gradients(sgd, data)
    for variable in model.trainable_variables:
        if variable.path.startswith(f"{target}/"):
            stored = getattr(sgd.get_layer(target), variable.path.split("/")[1])
            got, wanted = after[id(stored)] / c, before[id(variable)]
        else:  # the same variable object, shared by both models
            got, wanted = after[id(variable)], before[id(variable)]
        assert relative_error(got, wanted) <= 1e-6, variable.path

    initial = model.get_weights()
    loss = keras.losses.CategoricalCrossentropy()

    def fresh():
        copy = keras.models.clone_model(model)
        copy.set_weights(initial)
        return copy

    start = weights(model)
    reference_model = fresh()
    optimizer = reference_optimizer(
        keras.optimizers.Adam, 1e-3, m, reference_model.get_layer(target).weights
    )
    train_eagerly(reference_model, optimizer, [(data, labels)] * 2, loss)
    reference = weights(reference_model)
    adam = apply_lr_multipliers(fresh(), {target: m}, optimizer=ADAM(1e-3))
    train_eagerly(adam, ADAM(1e-3), [(data, labels)] * 2, loss)
    result = true_weights(adam)
    ratios = [
        np.linalg.norm(result[k] - start[k]) / np.linalg.norm(reference[k] - start[k])
        for k in (f"conv2_block2_{i}_conv/kernel" for i in (1, 2, 3))
    ]
    np.testing.assert_allclose(ratios, 1.0, atol=0.02)


def test_an_explicit_mechanism_that_does_not_suit_the_optimizer_warns_once():
    model, _ = _models.sequential_mlp()
    with pytest.warns(OptimizerMismatchWarning) as records:
        tuned = apply_lr_multipliers(
            model, {"block1": 0.1}, optimizer=ADAM(), mechanism="gradient_scale"
        )
    (record,) = [r for r in records if r.category is OptimizerMismatchWarning]
    assert "cancels a constant gradient scale" in str(record.message)
    assert any(isinstance(layer, GradientScale) for layer in tuned.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizerMismatchWarning)
        apply_lr_multipliers(model, {"block1": 0.1}, optimizer=keras.optimizers.SGD())
