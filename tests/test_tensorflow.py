"""TensorFlow-only behaviour: SavedModel, tf.distribute, unconnected gradients."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from _backend import to_numpy

import stopgrad_lr
from stopgrad_lr import GradientReversal, GradientScale

METHODS = ["custom_gradient", "stop_gradient"]


def scaled_model(method):
    inputs = keras.Input((3,))
    hidden = GradientScale(0.25, method, name="boundary")(inputs)
    return keras.Model(inputs, GradientReversal(2.0, method)(hidden))


def input_gradient(fn, x):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return y, tape.gradient(y, x)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("save", ["export", "saved_model"])
def test_savedmodel_keeps_forward_and_scaled_gradient(tmp_path, method, save):
    model = scaled_model(method)
    model.get_layer("boundary").scale = 0.5  # the current value must be saved
    x = np.array([[1.0, -0.0, 3.5]], "float32")
    if save == "export":
        model.export(tmp_path / "artifact", verbose=False)
        loaded = tf.saved_model.load(str(tmp_path / "artifact"))
        serve = loaded.serve
    else:
        tf.saved_model.save(model, str(tmp_path / "artifact"))
        loaded = tf.saved_model.load(str(tmp_path / "artifact"))
        signature = loaded.signatures["serving_default"]
        (input_name,) = signature.structured_input_signature[1]

        def serve(t):
            (output,) = signature(**{input_name: t}).values()
            return output

    y, grad = input_gradient(serve, x)
    assert np.array_equal(to_numpy(y), x)
    # 0.5 from the scale, -2 from the reversal: the custom gradient survived.
    assert np.array_equal(to_numpy(grad), np.full_like(x, -1.0))


def run_python(code, tmp_path):
    """Runs `code` in a fresh interpreter (TensorFlow devices are configured
    once per process) and returns its stdout."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_rewrite_under_mirrored_strategy_trains_with_exact_ratios(tmp_path):
    output = run_python(
        """
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        import keras, stopgrad_lr

        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            keras.utils.set_random_seed(0)
            inputs = keras.Input((6,))
            hidden = keras.layers.Dense(8, activation="tanh", name="body")(inputs)
            model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
        start = [w.copy() for w in model.get_weights()]
        rewritten = stopgrad_lr.insert_gradient_scales(model, {"body": 0.25}, copy=True)
        scale = rewritten.get_layer("body_gradient_scale")
        # The new scale variable is mirrored like the model's own variables.
        print("distributed", type(scale.weights[0].value).__name__)
        rng = np.random.default_rng(1)
        x = rng.standard_normal((16, 6)).astype("float32")
        y = rng.standard_normal((16, 2)).astype("float32")
        updates = {}
        for name, m in (("plain", model), ("scaled", rewritten)):
            with strategy.scope():
                m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
            updates[name] = m.get_layer("body").kernel.numpy() - start[0]
        a, b = updates["scaled"], 0.25 * updates["plain"]
        print("relative error", np.linalg.norm(a - b) / np.linalg.norm(b))
        """,
        tmp_path,
    )
    assert "distributed MirroredVariable" in output
    error = float(output.split("relative error")[1])
    assert error <= 1e-5


def test_a_stop_leaves_upstream_variables_without_any_gradient():
    inputs = keras.Input((3,))
    body = keras.layers.Dense(4, name="body")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(body))
    stopped = stopgrad_lr.insert_gradient_scales(model, {"body": 0})
    zero = stopgrad_lr.insert_gradient_scales(model, {"body": 0}, stop_at_zero=False)
    x = tf.ones((2, 3))
    for rewritten, expect_none in ((stopped, True), (zero, False)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(rewritten(x))
        kernel = rewritten.get_layer("body").kernel
        grad = tape.gradient(loss, kernel)
        # A stop removes the backward pass upstream: TensorFlow does not
        # differentiate there at all. A zero scale computes zeros.
        assert (grad is None) == expect_none


def test_stripped_model_loads_without_stopgrad_lr(tmp_path):
    inputs = keras.Input((3,))
    hidden = GradientScale(0.5)(keras.layers.Dense(4, name="body")(inputs))
    model = keras.Model(inputs, GradientReversal(1.0)(keras.layers.Dense(2)(hidden)))
    stripped = stopgrad_lr.strip_gradient_scales(model)
    stripped.save(tmp_path / "plain.keras")
    x = np.arange(6, dtype="float32").reshape(2, 3)
    np.save(tmp_path / "expected.npy", to_numpy(model(x)))
    output = run_python(
        f"""
        import sys, numpy as np, keras
        model = keras.saving.load_model({str(tmp_path / "plain.keras")!r})
        x = np.arange(6, dtype="float32").reshape(2, 3)
        expected = np.load({str(tmp_path / "expected.npy")!r})
        print("exact", np.array_equal(keras.ops.convert_to_numpy(model(x)), expected))
        print("imported", "stopgrad_lr" in sys.modules)
        """,
        tmp_path,
    )
    assert "exact True" in output and "imported False" in output
