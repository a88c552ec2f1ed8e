"""The bad-input sweep of issue 12: nothing silent, nothing lost.

Each case is one kind of bad input to the public API. Each asserts the
exception type, that the message names what was received (Keras style,
"Received: x=...") and says what to do or what was expected, and, where a
model is involved, that the model is unchanged afterwards: same layers, same
weights, same trainability of every variable, same scales, same effective
multipliers. (A call that succeeds may change one thing of the input model:
the `trainable` flag of the layers that a zero multiplier freezes with
`copy=False`, which the new model shares; docs/surgery.md, "Sharing".)

Layers and `scale_gradient` first, then the command line through its Python
entry point `stopgrad_lr.cli.main` (whose errors are a status and one line
rather than an exception), then the optimizer functions, then model surgery
and analysis.
"""

import hashlib
import re

import keras
import numpy as np
import pytest

import stopgrad_lr
from stopgrad_lr import (
    GradientReversal,
    GradientScale,
    GradientStop,
    apply_lr_multipliers,
    check_optimizer,
    cli,
    effective_multipliers,
    multi_optimizer,
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


# Optimizer functions ------------------------------------------------------

OPT = keras.optimizers


def optimizer_model():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu", name="block1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    return model, np.random.default_rng(0).standard_normal((4, 6)).astype("float32")


def outputs_snapshot(model, data):
    return list(model.layers), model.predict_on_batch(data)


def assert_outputs_unchanged(model, data, before):
    layers, outputs = before
    assert list(model.layers) == layers
    np.testing.assert_array_equal(model.predict_on_batch(data), outputs)


# (a) The report's truth value is its `ok`.


def test_a_failing_report_is_false():
    model, data = optimizer_model()
    before = outputs_snapshot(model, data)
    scaled = apply_lr_multipliers(model, {"block1": 0.1})
    failing = check_optimizer(OPT.Adam(), scaled)
    assert not failing.ok and not failing and bool(failing) is False
    passing = check_optimizer(OPT.SGD(), scaled)
    assert passing.ok and passing
    assert_outputs_unchanged(model, data, before)


# (b) A layer or a string where the model goes.


@pytest.mark.parametrize(
    "not_a_model", ["optimizer_model", keras.layers.Dense(3)], ids=["str", "layer"]
)
def test_check_optimizer_refuses_what_is_not_a_model(not_a_model):
    model, data = optimizer_model()
    before = outputs_snapshot(model, data)
    with pytest.raises(ValueError) as raised:
        check_optimizer(OPT.SGD(), not_a_model)
    message = str(raised.value)
    assert "argument `model`" in message
    assert f"of type {type(not_a_model).__name__}" in message  # what was received
    assert "Expected the keras.Model" in message and "or None" in message
    assert_outputs_unchanged(model, data, before)


# (c) A learning rate that is a plain function or a lambda.


def constant_rate():
    return 1e-3


@pytest.mark.parametrize(
    ("rate", "received"),
    [(lambda: 1e-3, "a lambda"), (constant_rate, "the function constant_rate")],
    ids=["lambda", "function"],
)
def test_multi_optimizer_refuses_a_function_learning_rate(rate, received):
    model, data = optimizer_model()
    before = outputs_snapshot(model, data)
    with pytest.raises(ValueError) as raised:
        multi_optimizer(model, {"block1": 0.1}, OPT.Adam(rate))
    message = str(raised.value)
    assert "safe_mode" not in message
    assert f"Received: learning_rate={received}" in message
    assert "LearningRateSchedule" in message and "or pass a float" in message
    assert_outputs_unchanged(model, data, before)


# (d) No message recommends what the code then refuses.


def test_the_rmsprop_refusal_does_not_recommend_reparametrize():
    model, data = optimizer_model()
    before = outputs_snapshot(model, data)
    with pytest.raises(ValueError) as raised:
        apply_lr_multipliers(model, {"block1": 0.1}, optimizer=OPT.RMSprop())
    message = str(raised.value)
    assert "RMSprop" in message and "multi_optimizer" in message
    assert "'reparametrize'" not in message
    assert "mechanism='gradient_scale'" in message
    # What it does recommend is accepted (with a warning saying what is off).
    with pytest.warns(UserWarning, match="RMSprop"):
        apply_lr_multipliers(
            model, {"block1": 0.1}, optimizer=OPT.RMSprop(), mechanism="gradient_scale"
        )
    assert_outputs_unchanged(model, data, before)


def test_the_adamw_fix_does_not_recommend_apply_lr_multipliers_which_refuses_it():
    model, data = optimizer_model()
    before = outputs_snapshot(model, data)
    scaled = apply_lr_multipliers(model, {"block1": 0.1})
    report = check_optimizer(OPT.AdamW(), scaled)
    assert not any("apply_lr_multipliers" in problem for problem in report.problems)
    assert all("multi_optimizer" in problem for problem in report.problems)
    with pytest.raises(ValueError, match="found no mechanism"):
        apply_lr_multipliers(model, {"block1": 0.1}, optimizer=OPT.AdamW())
    # The fix it does recommend works.
    multi_optimizer(model, {"block1": 0.1}, OPT.AdamW())
    assert_outputs_unchanged(model, data, before)


# Model surgery and analysis -----------------------------------------------


def surgery_model():
    inputs = keras.Input((4,), name="features")
    x = keras.layers.Dense(4, name="a")(inputs)
    x = keras.layers.Dropout(0.1, name="drop")(x)
    frozen = keras.layers.Dense(4, name="frozen")
    frozen.trainable = False
    x = frozen(x)
    x = keras.layers.Dense(4, name="b")(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs, name="small")


SURGERY_DATA = np.random.default_rng(0).standard_normal((3, 4)).astype("float32")


def surgery_state(model):
    return (
        [layer.name for layer in model.layers],
        [np.array(w) for w in model.get_weights()],
        np.array(model(SURGERY_DATA)),
        [
            (layer.trainable, [v.trainable for v in layer.weights])
            for layer in model.layers
        ],
    )


def assert_surgery_unchanged(model, before):
    names, weights, outputs, trainability = surgery_state(model)
    assert names == before[0]
    assert all(np.array_equal(a, b) for a, b in zip(weights, before[1], strict=True))
    assert np.array_equal(outputs, before[2])
    assert trainability == before[3]


def scaled_surgery_model():
    return stopgrad_lr.insert_gradient_scales(surgery_model(), {"a": 0.1})


# (description, call on a model, exception type, regexes the message must match:
# what was received and what to do)
SURGERY_CASES = [
    (
        "a second apply_lr_multipliers pass",
        lambda m: stopgrad_lr.apply_lr_multipliers(m, {"a": 0.5}),
        scaled_surgery_model,
        [r"already holds .*'a_gradient_scale' \(GradientScale 0\.1\)", "strip"],
    ),
    (
        "a pattern that matches only a frozen layer",
        lambda m: stopgrad_lr.apply_lr_multipliers(m, {"frozen": 0.5}),
        surgery_model,
        [r"'frozen' \(Dense\).*frozen \(trainable=False\)", "trainable = True"],
    ),
    (
        "a pattern that matches only a layer without weights",
        lambda m: stopgrad_lr.apply_lr_multipliers(m, {"drop": 0.5}),
        surgery_model,
        [r"'drop' \(Dropout\).*no trainable weights", "before it"],
    ),
    (
        "a pattern that matches only a stopgrad_lr layer",
        lambda m: stopgrad_lr.insert_gradient_scales(m, {"a_gradient_*": 0.5}),
        scaled_surgery_model,
        [r"stopgrad_lr layer 'a_gradient_scale'", r"\.scale = value"],
    ),
    (
        "multipliers too far apart for float32",
        lambda m: stopgrad_lr.apply_lr_multipliers(m, {"a": 1e-30, "b": 1e30}),
        surgery_model,
        [r"1e-30", r"1e\+30", "closer together"],
    ),
    (
        "a multiplier that underflows float32",
        lambda m: stopgrad_lr.apply_lr_multipliers(m, {"a": 1e-46}),
        surgery_model,
        [r"multipliers\['a'\]=1e-46", "Pass 0 to stop it"],
    ),
    (
        "an empty dict of scales",
        lambda m: stopgrad_lr.insert_gradient_scales(m, {}),
        surgery_model,
        [r"scales=\{\}", "non-empty dict"],
    ),
    (
        "an empty dict of multipliers",
        lambda m: stopgrad_lr.apply_lr_multipliers(m, {}),
        surgery_model,
        [r"multipliers=\{\}", "non-empty dict"],
    ),
    (
        "an empty list of boundaries",
        lambda m: stopgrad_lr.layerwise_decay(m, [], 0.5),
        surgery_model,
        [r"boundaries=\[\]", "transformer_layer_"],
    ),
    (
        "a decay above 1",
        lambda m: stopgrad_lr.layerwise_decay(m, "a", 1.5),
        surgery_model,
        [r"decay=1\.5", r"\(0, 1\]", "insert_gradient_scales"],
    ),
    (
        "a string for copy=",
        lambda m: stopgrad_lr.insert_gradient_scales(m, {"a": 0.5}, copy="no"),
        surgery_model,
        [r"copy='no' of type str", "True or False"],
    ),
    (
        "an int for stop_at_zero=",
        lambda m: stopgrad_lr.insert_gradient_scales(m, {"a": 0.0}, stop_at_zero=0),
        surgery_model,
        [r"stop_at_zero=0 of type int", "True or False"],
    ),
    (
        "a string for round_to_power_of_two=",
        lambda m: stopgrad_lr.apply_lr_multipliers(
            m,
            {"a": 0.5},
            optimizer=keras.optimizers.Adam(),
            round_to_power_of_two="yes",
        ),
        surgery_model,
        [r"round_to_power_of_two='yes'", "True or False"],
    ),
    (
        "None for strip's copy=",
        lambda m: stopgrad_lr.strip_gradient_scales(m, copy=None),
        scaled_surgery_model,
        [r"copy=None of type NoneType", "True or False"],
    ),
    (
        "a string for summary's print_fn",
        lambda m: stopgrad_lr.summary(m, print_fn="stdout"),
        surgery_model,
        [r"print_fn='stdout'", "None to print nothing"],
    ),
    (
        "layerwise_decay(auto) on a model of one block",
        lambda m: stopgrad_lr.layerwise_decay(m, "auto", 0.5),
        lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
        [r"found no block boundary", "gradient_cuts"],
    ),
]


@pytest.mark.parametrize(
    ("call", "build", "patterns"),
    [case[1:] for case in SURGERY_CASES],
    ids=[case[0] for case in SURGERY_CASES],
)
def test_bad_input_is_a_clear_error_and_the_model_is_unchanged(call, build, patterns):
    model = build()
    before = surgery_state(model)
    with pytest.raises(ValueError) as info:
        call(model)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), message
    assert "stopgrad_lr bug" not in message
    assert_surgery_unchanged(model, before)
