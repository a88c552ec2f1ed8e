"""`GradientScale` and `GradientReversal` as Keras layers, on every backend.

Training tests compare the weights after SGD steps with the NumPy float64
simulation of the same steps in `_helpers.py`, written out from the chain
rule, so the reference shares no code with Keras or with this package.
"""

import keras
import numpy as np
import pytest
from _backend import BACKEND, bits, to_numpy, vjp
from _helpers import (
    BATCH,
    FIT_MODES,
    N_HIDDEN,
    N_IN,
    N_OUT,
    TraceCountingScale,
    compile_for,
    data,
    simulate_sgd,
    two_layer_model,
)

from stopgrad_lr import GradientReversal, GradientScale

METHODS = ["custom_gradient", "stop_gradient"]
SCALES = [1.0, 0.5, 0.1, 1e-3, 0.0, -1.0, 2.5]


def assert_relative_error(actual, desired, bound):
    """Norm-wise relative error, the measure for a whole weight gradient.

    Scaling the gradient before a batch-sum matmul rounds differently from
    scaling after it; single elements with cancellation can then differ by
    more than the bound while the vector as a whole does not.
    """
    desired = np.asarray(desired, "float64")
    error = np.linalg.norm(actual - desired) / max(np.linalg.norm(desired), 1e-300)
    assert error <= bound, f"relative error {error:.2e} > {bound:.0e}"
    if not desired.any():
        assert not np.asarray(actual).any()


def one_sgd_step(scale_layer, mode):
    """First-layer kernel after one SGD step (lr=1) from a zero kernel.

    With W1 = 0 the step is exactly -grad(W1): no cancellation in
    `new - old` hides the effect of a small scale.
    """
    model = two_layer_model(scale_layer, np.zeros((N_IN, N_HIDDEN)))
    x, y = data()
    compile_for(model, mode)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return to_numpy(model.get_layer("first").kernel)


@pytest.mark.parametrize("mode", FIT_MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", SCALES)
def test_fit_scales_the_update_upstream(scale, method, mode):
    scaled = one_sgd_step(GradientScale(scale, method), mode)
    plain = one_sgd_step(keras.layers.Identity(), mode)
    # Against the same model without the layer: float32 relative error 1e-6.
    assert_relative_error(scaled, scale * plain.astype("float64"), 1e-6)
    # Against a float64 chain-rule simulation, which shares no code with Keras.
    w2 = two_layer_model(keras.layers.Identity(), np.zeros((N_IN, N_HIDDEN)))
    expected, _ = simulate_sgd(
        np.zeros((N_IN, N_HIDDEN)),
        to_numpy(w2.get_layer("second").kernel),
        *data(),
        [scale],
        lr=1.0,
    )
    assert_relative_error(scaled, expected, 1e-5)


def test_reversal_is_a_negative_scale():
    layer = GradientReversal(0.3)
    assert (layer.strength, layer.scale) == (0.3, -0.3)
    _, grad = vjp(layer, np.ones((2, 3), "float32"), np.ones((2, 3), "float32"))
    np.testing.assert_allclose(grad, -0.3, rtol=1e-6)
    layer.strength = 0.0
    assert (repr(layer.strength), repr(layer.scale)) == ("0.0", "0.0")


@pytest.mark.parametrize("mode", FIT_MODES)
def test_setting_scale_between_fits_takes_effect(mode):
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((N_IN, N_HIDDEN)).astype("float32")
    layer = GradientScale(0.5)
    model = two_layer_model(layer, w1)
    w2 = to_numpy(model.get_layer("second").kernel)
    x, y = data(steps=2)
    compile_for(model, mode, lr=0.1)
    model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0, shuffle=False)
    layer.scale = -2.0
    model.fit(x[BATCH:], y[BATCH:], batch_size=BATCH, verbose=0, shuffle=False)
    expected_w1, _ = simulate_sgd(w1, w2, x, y, [0.5, -2.0], lr=0.1)
    assert_relative_error(to_numpy(model.get_layer("first").kernel), expected_w1, 1e-5)


class SetScaleEachBatch(keras.callbacks.Callback):
    def __init__(self, layer_name, scales):
        super().__init__()
        self.layer_name, self.scales = layer_name, scales

    def on_train_batch_begin(self, batch, logs=None):
        # Reached through `self.model`, which on JAX syncs the training state
        # into the variables first; see the GradientScale docstring.
        self.model.get_layer(self.layer_name).scale = self.scales[batch]


@pytest.mark.parametrize("mode", FIT_MODES)
def test_setting_scale_from_a_callback_takes_effect_on_the_next_step(mode):
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((N_IN, N_HIDDEN)).astype("float32")
    model = two_layer_model(GradientScale(1.0, name="boundary"), w1)
    w2 = to_numpy(model.get_layer("second").kernel)
    scales = [0.0, 1.0, 0.25, -0.5]
    x, y = data(steps=len(scales))
    compile_for(model, mode, lr=0.1)
    model.fit(
        x,
        y,
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
        callbacks=[SetScaleEachBatch("boundary", scales)],
    )
    expected_w1, _ = simulate_sgd(w1, w2, x, y, scales, lr=0.1)
    assert_relative_error(to_numpy(model.get_layer("first").kernel), expected_w1, 1e-5)
    # The reference with the schedule ignored is far away: the test can fail.
    ignored_w1, _ = simulate_sgd(w1, w2, x, y, [1.0] * len(scales), lr=0.1)
    assert np.abs(expected_w1 - ignored_w1).max() > 1e-2


@pytest.mark.skipif(
    BACKEND == "torch", reason="torch runs fit eagerly: there is no trace to repeat"
)
@pytest.mark.parametrize("mode", [m for m in FIT_MODES if m != "eager"] or ["none"])
def test_changing_the_scale_does_not_retrace(mode):
    boundary = TraceCountingScale(1.0)
    model = two_layer_model(boundary, np.zeros((N_IN, N_HIDDEN)))
    compile_for(model, mode, lr=0.1)
    x, y = data()
    model.fit(x, y, batch_size=BATCH, verbose=0)
    traces_after_first_fit = TraceCountingScale.traces
    for value in (0.5, 0.0, -1.0):
        boundary.scale = value
        model.fit(x, y, batch_size=BATCH, verbose=0)
    assert TraceCountingScale.traces == traces_after_first_fit


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("method", METHODS)
def test_mixed_precision_forward_exact_and_gradient_dtype(policy, method):
    keras.config.set_dtype_policy(policy)
    inputs = keras.Input((N_IN,))
    hidden = keras.layers.Dense(N_HIDDEN, name="first")(inputs)
    scaled = GradientScale(1e-3, method)(hidden)
    outputs = keras.layers.Dense(N_OUT, name="second")(scaled)
    probe = keras.Model(inputs, [hidden, scaled, outputs])
    hidden_value, scaled_value, _ = (to_numpy(t) for t in probe(data()[0]))
    compute_dtype = "float16" if policy == "mixed_float16" else "bfloat16"
    assert str(scaled_value.dtype) == compute_dtype
    assert np.array_equal(bits(scaled_value), bits(hidden_value))
    # The scale variable stays float32 and is not autocast.
    layer = probe.layers[2]
    assert layer.weights[0].dtype == "float32" and layer.scale == 1e-3
    # A half-precision gradient through the layer keeps its dtype.
    x = hidden_value
    _, grad = vjp(layer, x, np.ones_like(x))
    assert grad.dtype == x.dtype
    assert np.array_equal(grad, np.full_like(x, 1e-3))


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32"])
def test_layer_does_not_cast_its_input(dtype):
    keras.config.set_dtype_policy("mixed_float16")
    x = np.arange(6).reshape(2, 3).astype(dtype) / (3 if dtype != "int32" else 1)
    y = to_numpy(GradientScale(0.5)(x))
    assert y.dtype == x.dtype and np.array_equal(y, x)


def test_mask_passes_through():
    tokens = np.array([[3, 5, 0, 0], [7, 0, 0, 0]])
    inputs = keras.Input((4,), dtype="int32")
    embedding = keras.layers.Embedding(10, 3, mask_zero=True)
    pooled = keras.layers.GlobalAveragePooling1D()(
        GradientScale(0.5)(embedding(inputs))
    )
    output = to_numpy(keras.Model(inputs, pooled)(tokens))
    vectors = to_numpy(embedding.embeddings)[tokens]
    valid = (tokens != 0)[..., None]
    masked_mean = (vectors * valid).sum(axis=1) / valid.sum(axis=1)
    np.testing.assert_allclose(output, masked_mean, rtol=1e-6)
    # The mask matters: the plain mean over all positions is different.
    assert not np.allclose(output, vectors.mean(axis=1))


@pytest.mark.parametrize("layer_class", [GradientScale, GradientReversal])
def test_config_round_trip(layer_class):
    layer = layer_class(0.25, method="stop_gradient", name="boundary")
    restored = layer_class.from_config(layer.get_config())
    assert restored.get_config() == layer.get_config()
    assert restored.scale == layer.scale and restored.method == "stop_gradient"


@pytest.mark.parametrize("method", METHODS)
def test_keras_file_round_trip_keeps_outputs_and_current_scale(tmp_path, method):
    rng = np.random.default_rng(5)
    scale_layer = GradientScale(1.0, method, name="boundary")
    reversal = GradientReversal(1.0, method, name="reversal")
    inputs = keras.Input((N_IN,))
    hidden = keras.layers.Dense(N_HIDDEN, activation="tanh")(inputs)
    outputs = keras.layers.Dense(N_OUT)(reversal(scale_layer(hidden)))
    model = keras.Model(inputs, outputs)
    scale_layer.scale, reversal.strength = 0.125, 0.75  # changed after building
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = rng.standard_normal((4, N_IN)).astype("float32")
    assert np.array_equal(to_numpy(loaded(x)), to_numpy(model(x)))
    assert loaded.get_layer("boundary").scale == 0.125
    assert loaded.get_layer("reversal").strength == 0.75
    assert loaded.get_layer("boundary").method == method
    # The product of both scales reaches the input.
    probe = keras.Model(loaded.inputs, loaded.get_layer("reversal").output)
    _, grad = vjp(probe, x, np.ones((4, N_HIDDEN), "float32"))
    inner = keras.Model(loaded.inputs, loaded.layers[1].output)
    _, plain = vjp(inner, x, np.ones((4, N_HIDDEN), "float32"))
    assert_relative_error(grad, -0.125 * 0.75 * plain.astype("float64"), 1e-6)


@pytest.mark.parametrize(
    ("make", "argument", "value"),
    [
        (lambda v: GradientScale(v), "scale", float("nan")),
        (lambda v: GradientScale(v), "scale", True),
        (lambda v: GradientScale(v), "scale", "1"),
        (lambda v: GradientReversal(v), "strength", float("-inf")),
        (lambda v: GradientReversal(v), "strength", None),
    ],
)
def test_invalid_arguments_raise_keras_style_errors(make, argument, value):
    with pytest.raises(ValueError) as info:
        make(value)
    message = str(info.value)
    assert message.startswith(f"Invalid value received for argument `{argument}`.")
    assert f"Received: {argument}={value!r}" in message


def test_setters_validate_and_keep_the_old_value():
    layer, reversal = GradientScale(0.5), GradientReversal(1.0)
    with pytest.raises(ValueError, match="argument `scale`"):
        layer.scale = float("inf")
    with pytest.raises(ValueError, match="argument `strength`"):
        reversal.strength = "strong"
    assert layer.scale == 0.5 and reversal.strength == 1.0


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="Received: method='custom'"):
        GradientScale(0.5, method="custom")


def test_the_scale_is_a_weight_that_an_older_snapshot_restores():
    # Documented in docs/how-it-works.md: set_weights from weights taken
    # before an assignment undoes it.
    inputs = keras.Input((3,))
    scale = GradientScale(0.1, name="boundary")
    model = keras.Model(inputs, keras.layers.Dense(2)(scale(inputs)))
    snapshot = model.get_weights()
    assert [w for w in snapshot if np.ndim(w) == 0] == [np.float32(0.1)]
    scale.scale = 0.5
    model.set_weights(snapshot)
    assert scale.scale == 0.1
