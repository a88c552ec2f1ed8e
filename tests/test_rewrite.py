"""Model surgery on real models: exact outputs, measured multipliers, errors.

Runs on TensorFlow and JAX. Every multiplier the analysis reports is checked
against gradients measured by the backend's autodiff, as the ratio of a
layer's gradient in the rewritten model to its gradient in the original.
"""

import re
import warnings

import _models
import keras
import numpy as np
import pytest
from _backend import BACKEND, assert_measured_multipliers, forward, weight_gradients

import stopgrad_lr
from stopgrad_lr import (
    GradientScale,
    GradientStop,
    apply_lr_multipliers,
    effective_multipliers,
    insert_gradient_scales,
    layerwise_decay,
    strip_gradient_scales,
)


def snapshot(model, data):
    """What must not change in the user's model: its layers and outputs."""
    return (
        [id(layer) for layer in model.layers],
        model.get_config(),
        forward(model, data, False),
    )


def assert_untouched(model, data, before):
    layers, config, values = snapshot(model, data)
    assert layers == before[0] and config == before[1]
    assert all(np.array_equal(a, b) for a, b in zip(values, before[2], strict=True))


@pytest.mark.parametrize("name", list(_models.ZOO))
def test_rewrite_is_exact_and_leaves_the_original_alone(name):
    build, scales = _models.ZOO[name]
    model, data = build()
    before = snapshot(model, data)
    rewritten = insert_gradient_scales(model, scales)
    assert_untouched(model, data, before)
    assert sum(
        isinstance(layer, GradientScale)
        for _, layer in stopgrad_lr._patterns.iter_layers(rewritten)
    ) == len(scales)
    for training in (False, True):
        expected = forward(model, data, training)
        got = forward(rewritten, data, training)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert type(rewritten) is type(model)


def test_apply_lr_multipliers_on_resnet50():
    model, data = _models.resnet50()
    wanted = {"conv1_*": 0.01, "conv2_*": 0.1}
    tuned = apply_lr_multipliers(model, wanted)
    reported = assert_measured_multipliers(model, tuned, data)
    assert reported["conv1_conv"] == pytest.approx(0.01, rel=1e-6)
    assert reported["conv2_block2_2_conv"] == pytest.approx(0.1, rel=1e-6)
    assert reported["conv3_block1_1_conv"] == 1.0
    scales = [layer for layer in tuned.layers if isinstance(layer, GradientScale)]
    # The boundaries land on the last cut before the next group.
    assert sorted(layer.name for layer in scales) == [
        "conv2_block3_out_gradient_scale",
        "pool1_pool_gradient_scale",
    ]


def test_apply_lr_multipliers_refuses_a_boundary_inside_a_residual_block():
    model, data = _models.resnet50()
    before = snapshot(model, data)
    with pytest.raises(ValueError) as info:
        apply_lr_multipliers(model, {"conv2_block3_2_*": 0.1})
    message = str(info.value)
    assert "No cut separates layer 'conv2_block3_1_conv'" in message
    assert "conv2_block2_out -> conv2_block3_add" in message
    assert_untouched(model, data, before)


def test_apply_lr_multipliers_with_a_zero_group_stops_the_gradient():
    model, data = _models.residual_cnn()
    frozen = apply_lr_multipliers(model, {"stem_*": 0.0, "block1_*": 0.5})
    stops = [layer for layer in frozen.layers if isinstance(layer, GradientStop)]
    assert [layer.name for layer in stops] == ["stem_out_gradient_stop"]
    reported = assert_measured_multipliers(model, frozen, data)
    assert reported["stem_conv"] == 0.0 and reported["block1_conv1"] == 0.5


def test_apply_lr_multipliers_rejects_a_nonzero_group_below_a_zero_one():
    model, _ = _models.sequential_mlp()
    with pytest.raises(ValueError, match="have multiplier 0"):
        apply_lr_multipliers(model, {"block1": 0.5, "block2": 0.0})


def test_layerwise_decay_compounds_per_block():
    model, data = _models.residual_cnn()
    decayed = layerwise_decay(model, re.compile(r"(stem|block\d)_out"), 0.5)
    reported = assert_measured_multipliers(model, decayed, data)
    assert reported["stem_conv"] == 0.125
    assert reported["block1_conv1"] == 0.25
    assert reported["block2_conv1"] == 0.5
    assert reported["head"] == 1.0


def test_a_zero_scale_is_a_stop_unless_asked_otherwise():
    model, data = _models.sequential_mlp()
    schedulable = insert_gradient_scales(model, {"block1": 0}, stop_at_zero=False)
    (zero,) = [
        layer for layer in schedulable.layers if isinstance(layer, GradientScale)
    ]
    assert zero.scale == 0.0
    # Both give no gradient upstream; only the stop skips computing it, and
    # freezes: block1 (shared) gets trainable=False, out of the trainable
    # variables of both models.
    grads = weight_gradients(schedulable, data)
    assert not grads[id(model.get_layer("block1").kernel)].any()
    assert grads[id(model.get_layer("block2").kernel)].any()
    assert model.get_layer("block1").trainable
    stopped = insert_gradient_scales(model, {"block1": 0})
    (stop,) = [
        layer
        for layer in stopped.layers
        if isinstance(layer, (GradientScale, GradientStop))
    ]
    assert isinstance(stop, GradientStop)
    assert stopped.get_layer("block1") is model.get_layer("block1")
    assert stopped.get_layer("block1").trainable is False
    assert stopped.get_layer("block2") is model.get_layer("block2")
    assert weight_gradients(stopped, data)[id(model.get_layer("block2").kernel)].any()


@pytest.mark.skipif(BACKEND != "jax", reason="inspects a jaxpr")
def test_stop_removes_the_upstream_backward_pass_from_the_jax_program():
    import jax

    model, data = _models.residual_cnn()

    def gradient_program_size(rewritten):
        trainable = [v.value for v in rewritten.trainable_variables]
        frozen = [v.value for v in rewritten.non_trainable_variables]

        def loss(trainable):
            out, _ = rewritten.stateless_call(trainable, frozen, data)
            return keras.ops.sum(out)

        return len(jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr.eqns)

    zero = gradient_program_size(
        insert_gradient_scales(model, {"block1_out": 0}, stop_at_zero=False)
    )
    # Second: the stop's freeze sets trainable=False on the shared layers.
    stop = gradient_program_size(insert_gradient_scales(model, {"block1_out": 0}))
    assert stop < 0.8 * zero


def test_warn_warns_once_and_ignore_is_silent():
    model, _ = _models.residual_cnn()
    scales = {"block1_conv2": 0.5, "block2_conv1": 0.5}
    with pytest.warns(UserWarning) as records:
        insert_gradient_scales(model, scales, on_bypass="warn")
    # pytest.warns records the NumPy DeprecationWarning that pyproject ignores
    # (reading a scale's value on TensorFlow) too.
    records = [r for r in records if r.category is UserWarning]
    assert len(records) == 1
    assert "block1_conv2" in str(records[0].message)
    assert "block2_conv1" in str(records[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        insert_gradient_scales(model, scales, on_bypass="ignore")


def test_bypass_error_names_a_path():
    model, _ = _models.resnet50()
    with pytest.raises(ValueError, match="conv2_block2_out -> conv2_block3_add"):
        insert_gradient_scales(model, {"conv2_block3_2_conv": 0.1})


def test_copy_gives_independent_weights():
    model, data = _models.sequential_mlp()
    before = snapshot(model, data)
    copied = insert_gradient_scales(model, {"block1": 0.5}, copy=True)
    shared = insert_gradient_scales(model, {"block1": 0.5})
    assert copied.get_layer("block1") is not model.get_layer("block1")
    assert shared.get_layer("block1") is model.get_layer("block1")
    for rewritten in (copied, shared):
        rewritten.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    copied.fit(data, np.ones((len(data), 3)), verbose=0)
    assert_untouched(model, data, before)
    shared.fit(data, np.ones((len(data), 3)), verbose=0)
    assert not np.array_equal(forward(model, data, False)[0], before[2][0])


def test_strip_restores_a_plain_model():
    model, data = _models.functional_in_sequential()
    rewritten = insert_gradient_scales(model, {"backbone/inner_dense": 0.1, "head": 0})
    stripped = strip_gradient_scales(rewritten)
    assert not [
        layer
        for _, layer in stopgrad_lr._patterns.iter_layers(stripped)
        if isinstance(layer, (GradientScale, GradientStop))
    ]
    for training in (False, True):
        assert np.array_equal(
            forward(stripped, data, training)[0], forward(model, data, training)[0]
        )
    # The zero on the head froze every layer; stripping keeps the freeze.
    assert effective_multipliers(stripped) == dict.fromkeys(
        effective_multipliers(model), 0.0
    )
    assert not stripped.trainable_variables


# Bad input -------------------------------------------------------------------


def test_pattern_matching_nothing_lists_the_closest_names():
    model, data = _models.resnet50()
    before = snapshot(model, data)
    with pytest.raises(ValueError) as info:
        insert_gradient_scales(model, {"conv2_block3_outt": 0.1})
    assert "matched no layer" in str(info.value)
    assert "'conv2_block3_out'" in str(info.value)
    assert_untouched(model, data, before)


def test_regex_and_path_patterns():
    model, _ = _models.functional_in_sequential()
    by_regex = insert_gradient_scales(
        model, {re.compile(r"inner_\w+"): 0.5}, on_bypass="ignore"
    )
    by_path = insert_gradient_scales(
        model, {"backbone/inner_*": 0.5}, on_bypass="ignore"
    )
    assert effective_multipliers(by_regex) == effective_multipliers(by_path)
    # A regex must match the whole name.
    with pytest.raises(ValueError, match="matched no layer"):
        insert_gradient_scales(model, {re.compile("inner"): 0.5})


def test_conflicting_patterns_are_rejected():
    model, _ = _models.sequential_mlp()
    with pytest.raises(
        ValueError, match=r"matched by pattern 'block\*' with value 0.1"
    ):
        insert_gradient_scales(model, {"block*": 0.1, "block1": 0.2})
    # The same value twice is not a conflict.
    insert_gradient_scales(model, {"block*": 0.1, "block1": 0.1})


def test_unbuilt_model_is_rejected():
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"has no defined inputs yet.*keras\.Input"):
        insert_gradient_scales(model, {"dense": 0.1})


def test_subclassed_model_is_rejected_with_advice():
    class Custom(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Custom()
    model(np.ones((1, 3), "float32"))
    with pytest.raises(
        ValueError, match=r"subclassed model.*GradientScale.*scale_gradient"
    ):
        effective_multipliers(model)


def test_a_subclassed_model_inside_a_functional_one_is_one_layer():
    class Doubled(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(4)

        def call(self, x):
            return self.dense(x) * 2.0

    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, name="a")(inputs)
    x = Doubled(name="doubled")(x) + 1.0  # and a raw op after it
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    data = np.random.default_rng(0).standard_normal((2, 3)).astype("float32")
    rewritten = insert_gradient_scales(model, {"a": 0.5, "doubled": 0.25})
    assert np.array_equal(
        forward(rewritten, data, False)[0], forward(model, data, False)[0]
    )
    reported = assert_measured_multipliers(model, rewritten, data)
    assert reported == {"a": 0.125, "doubled": 0.25, "head": 1.0}


def test_existing_scale_at_the_same_place_is_rejected():
    model, data = _models.sequential_mlp()
    once = insert_gradient_scales(model, {"block1": 0.5})
    before = snapshot(once, data)
    with pytest.raises(
        ValueError, match="already has the stopgrad_lr layer 'block1_gradient_scale'"
    ):
        insert_gradient_scales(once, {"block1": 0.1})
    assert_untouched(once, data, before)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.1", True])
def test_bad_scale_values_are_rejected(scale):
    model, _ = _models.sequential_mlp()
    with pytest.raises(ValueError, match=r"argument `scales\['block1'\]`"):
        insert_gradient_scales(model, {"block1": scale})


def test_bad_arguments_are_rejected():
    model, _ = _models.sequential_mlp()
    with pytest.raises(ValueError, match="Received: on_bypass='raise'"):
        insert_gradient_scales(model, {"block1": 0.1}, on_bypass="raise")
    with pytest.raises(ValueError, match="Expected a dict"):
        insert_gradient_scales(model, [("block1", 0.1)])
    with pytest.raises(ValueError, match="Expected a glob string"):
        insert_gradient_scales(model, {1: 0.1})
    with pytest.raises(ValueError, match="Expected a float > 0"):
        layerwise_decay(model, "block*", 0.0)
    with pytest.raises(ValueError, match="multiplier >= 0"):
        apply_lr_multipliers(model, {"block1": -0.5})
    with pytest.raises(ValueError, match=r"Expected a built keras\.Model"):
        effective_multipliers("model.keras")
