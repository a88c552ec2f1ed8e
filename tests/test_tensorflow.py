"""TensorFlow-only behaviour: SavedModel export and tracing."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _backend import to_numpy

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
