"""The bad-input sweep of issue 12: nothing silent, nothing lost.

Each case is one kind of bad input to the public API. Each asserts the
exception type, that the message names what was received (Keras style,
"Received: x=...") and says what to do or what was expected, and, where a
model is involved, that the model is unchanged afterwards: same layers, same
weights, same scales, same effective multipliers.

Layers and `scale_gradient` first, then the command line through its Python
entry point `stopgrad_lr.cli.main` (whose errors are a status and one line
rather than an exception).
"""

import hashlib

import keras
import numpy as np
import pytest

from stopgrad_lr import (
    GradientReversal,
    GradientScale,
    GradientStop,
    cli,
    effective_multipliers,
    scale_gradient,
)

UNDERFLOW = "float32, where a smaller value becomes 0"


def small_model():
    """Dense -> GradientScale(0.5) -> Dense -> GradientStop -> Dense."""
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="first")(inputs)
    x = GradientScale(0.5, name="half")(x)
    x = keras.layers.Dense(3, name="second")(x)
    x = GradientStop(name="stop")(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs)


def snapshot(model):
    return (
        [(layer.name, type(layer).__name__) for layer in model.layers],
        [keras.ops.convert_to_numpy(weight).tobytes() for weight in model.weights],
        [getattr(layer, "scale", None) for layer in model.layers],
        effective_multipliers(model),
    )


def assert_message(error, *fragments):
    message = str(error.value)
    assert "Received: " in message, message
    for fragment in fragments:
        assert fragment in message, message


# Layers: each case changes a layer of a model, which must stay as it was.


def set_stop_scale(model, value):
    model.get_layer("stop").scale = value


def set_scale(model, value):
    model.get_layer("half").scale = value


LAYER_CASES = [
    # A stop reported as a multiplier of 0.5 while no gradient flows.
    (
        "stop_scale_nonzero",
        lambda m: set_stop_scale(m, 0.5),
        ["Expected 0.0", "insert GradientScale(0.0) instead", "scale=0.5"],
    ),
    ("stop_scale_negative", lambda m: set_stop_scale(m, -1.0), ["scale=-1.0"]),
    ("stop_scale_nan", lambda m: set_stop_scale(m, float("nan")), ["scale=nan"]),
    ("scale_setter_underflow", lambda m: set_scale(m, 1e-46), [UNDERFLOW, "=1e-46"]),
    (
        "scale_setter_subnormal",
        lambda m: set_scale(m, -1e-40),
        [UNDERFLOW, "Pass 0 to stop it on purpose", "scale=-1e-40"],
    ),
    ("scale_setter_nan", lambda m: set_scale(m, float("nan")), ["finite", "=nan"]),
    ("scale_setter_overflow", lambda m: set_scale(m, 1e39), ["<= 3.4e38", "=1e+39"]),
    ("scale_setter_bool", lambda m: set_scale(m, True), ["not a bool", "=True"]),
    ("scale_setter_string", lambda m: set_scale(m, "0.1"), ["finite float", "'0.1'"]),
]


@pytest.mark.parametrize(
    ("change", "fragments"),
    [case[1:] for case in LAYER_CASES],
    ids=[case[0] for case in LAYER_CASES],
)
def test_a_bad_scale_on_a_layer_of_a_model(change, fragments):
    model = small_model()
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        change(model)
    assert_message(error, "Invalid value received for argument `scale`", *fragments)
    assert snapshot(model) == before


def test_a_stop_accepts_zero_and_still_reports_it():
    model = small_model()
    before = snapshot(model)
    model.get_layer("stop").scale = 0
    assert model.get_layer("stop").scale == 0.0
    assert snapshot(model) == before


def test_a_bad_strength_on_a_reversal_layer():
    layer = GradientReversal(0.3)
    with pytest.raises(ValueError) as error:
        layer.strength = 1e-39
    assert_message(error, "argument `strength`", UNDERFLOW, "strength=1e-39")
    assert (layer.strength, layer.scale) == (0.3, -0.3)


CONSTRUCTOR_CASES = [
    ("scale_underflow", lambda: GradientScale(1e-46), "scale", [UNDERFLOW]),
    ("scale_tiny_negative", lambda: GradientScale(-1e-45), "scale", [UNDERFLOW]),
    ("scale_infinite", lambda: GradientScale(float("inf")), "scale", ["finite"]),
    ("scale_numpy_nan", lambda: GradientScale(np.float32("nan")), "scale", ["nan"]),
    ("scale_none", lambda: GradientScale(None), "scale", ["of type NoneType"]),
    ("reversal_underflow", lambda: GradientReversal(1e-40), "strength", [UNDERFLOW]),
    ("reversal_overflow", lambda: GradientReversal(-1e40), "strength", ["3.4e38"]),
    (
        "unknown_method",
        lambda: GradientScale(0.1, method="stop"),
        "method",
        ["Expected one of ('custom_gradient', 'stop_gradient')", "method='stop'"],
    ),
]


@pytest.mark.parametrize(
    ("build", "argument", "fragments"),
    [case[1:] for case in CONSTRUCTOR_CASES],
    ids=[case[0] for case in CONSTRUCTOR_CASES],
)
def test_a_bad_argument_to_a_layer_constructor(build, argument, fragments):
    with pytest.raises(ValueError) as error:
        build()
    assert_message(error, f"Invalid value received for argument `{argument}`")
    assert_message(error, f"Received: {argument}=", *fragments)


# scale_gradient


def x():
    return keras.ops.convert_to_tensor(np.array([1.0, -2.0, 3.0], dtype="float32"))


def traced_scale_gradient(scale_shape):
    """Traces `scale_gradient` with a scale whose value is not known, only
    its shape: the shape check must work there too."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec(scale_shape, "float32")
        function = tf.function(lambda s: scale_gradient(x(), s), input_signature=[spec])
        return function.get_concrete_function()
    if backend == "jax":
        import jax

        return jax.jit(lambda s: scale_gradient(x(), s))(np.ones(scale_shape, "f4"))
    pytest.skip(f"{backend} has no symbolic tracing of its own")


OPS_CASES = [
    (
        "nan_tensor",
        lambda: scale_gradient(x(), keras.ops.convert_to_tensor(np.float32("nan"))),
        ["Expected a finite scalar tensor", "scale with value nan"],
    ),
    (
        "inf_tensor",
        lambda: scale_gradient(x(), keras.ops.convert_to_tensor(np.float32("-inf"))),
        ["scale with value -inf"],
    ),
    (
        "vector_tensor",
        lambda: scale_gradient(x(), keras.ops.ones((3,))),
        ["Expected a scalar (shape ())", "element by element", "shape (3,)"],
    ),
    (
        "one_element_tensor",
        lambda: scale_gradient(x(), keras.ops.ones((1,))),
        ["keras.ops.reshape(scale, ())", "shape (1,)"],
    ),
    (
        "vector_variable",
        lambda: scale_gradient(x(), keras.Variable(np.ones(3, "float32"))),
        ["shape (3,)"],
    ),
    ("traced_vector", lambda: traced_scale_gradient((3,)), ["shape (3,)"]),
    ("python_underflow", lambda: scale_gradient(x(), 1e-46), [UNDERFLOW]),
    ("python_nan", lambda: scale_gradient(x(), float("nan")), ["scale=nan"]),
    (
        "unknown_method",
        lambda: scale_gradient(x(), 0.5, method="fast"),
        ["method='fast'"],
    ),
]


@pytest.mark.parametrize(
    ("call", "fragments"),
    [case[1:] for case in OPS_CASES],
    ids=[case[0] for case in OPS_CASES],
)
def test_a_bad_scale_to_scale_gradient(call, fragments):
    with pytest.raises(ValueError) as error:
        call()
    assert_message(error, "Invalid value received for argument `", *fragments)


def test_a_scalar_tensor_scale_still_works():
    y = scale_gradient(x(), keras.ops.convert_to_tensor(np.float32(0.5)))
    assert np.array_equal(keras.ops.convert_to_numpy(y), [1.0, -2.0, 3.0])
    if keras.backend.backend() in ("tensorflow", "jax"):
        # Traced, a scalar passes: its value is not read.
        traced_scale_gradient(())


# The command line, through cli.main: status 2, one line, input untouched.


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "in.keras"
    small_model().save(path)
    return path


CLI_CASES = [
    (["--scale", "first=1e-46"], [UNDERFLOW, "Received: "]),
    (["--scale", "first=nan"], ["finite", "Received: "]),
    (["--multiplier", "head=inf"], ["Received: "]),
    (["--scale", "first"], ["expected PATTERN=NUMBER", "Received: 'first'"]),
    (["--scale", "first=fast"], ["expected a number after '='", "Received: 'fast'"]),
]


@pytest.mark.parametrize(
    ("options", "fragments"), CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES]
)
def test_a_bad_value_on_the_command_line(saved, tmp_path, capsys, options, fragments):
    before = hashlib.sha256(saved.read_bytes()).hexdigest()
    output = tmp_path / "out.keras"
    status = cli.main(["rewrite", str(saved), str(output), *options])
    out, err = capsys.readouterr()
    assert status == cli.BAD_INPUT
    (line,) = err.splitlines()
    assert line.startswith("stopgrad-lr: error: ")
    for fragment in fragments:
        assert fragment in line
    assert out == "" and not output.exists()
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == before
