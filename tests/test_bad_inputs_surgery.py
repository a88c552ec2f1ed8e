"""Bad input to model surgery and analysis: a clear error, the model unchanged."""

import re

import keras
import numpy as np
import pytest

import stopgrad_lr


def small_model():
    inputs = keras.Input((4,), name="features")
    x = keras.layers.Dense(4, name="a")(inputs)
    x = keras.layers.Dropout(0.1, name="drop")(x)
    frozen = keras.layers.Dense(4, name="frozen")
    frozen.trainable = False
    x = frozen(x)
    x = keras.layers.Dense(4, name="b")(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs, name="small")


DATA = np.random.default_rng(0).standard_normal((3, 4)).astype("float32")


def state(model):
    return (
        [layer.name for layer in model.layers],
        [np.array(w) for w in model.get_weights()],
        np.array(model(DATA)),
    )


def assert_unchanged(model, before):
    names, weights, outputs = state(model)
    assert names == before[0]
    assert all(np.array_equal(a, b) for a, b in zip(weights, before[1], strict=True))
    assert np.array_equal(outputs, before[2])


def scaled_model():
    return stopgrad_lr.insert_gradient_scales(small_model(), {"a": 0.1})


# (description, call on a model, exception type, regexes the message must match:
# what was received and what to do)
CASES = [
    (
        "a second apply_lr_multipliers pass",
        lambda m: stopgrad_lr.apply_lr_multipliers(m, {"a": 0.5}),
        scaled_model,
        [r"already holds .*'a_gradient_scale' \(GradientScale 0\.1\)", "strip"],
    ),
    (
        "a pattern that matches only a frozen layer",
        lambda m: stopgrad_lr.apply_lr_multipliers(m, {"frozen": 0.5}),
        small_model,
        [r"'frozen' \(Dense\).*frozen \(trainable=False\)", "trainable = True"],
    ),
    (
        "a pattern that matches only a layer without weights",
        lambda m: stopgrad_lr.apply_lr_multipliers(m, {"drop": 0.5}),
        small_model,
        [r"'drop' \(Dropout\).*no trainable weights", "before it"],
    ),
    (
        "a pattern that matches only a stopgrad_lr layer",
        lambda m: stopgrad_lr.insert_gradient_scales(m, {"a_gradient_*": 0.5}),
        scaled_model,
        [r"stopgrad_lr layer 'a_gradient_scale'", r"\.scale = value"],
    ),
    (
        "multipliers too far apart for float32",
        lambda m: stopgrad_lr.apply_lr_multipliers(m, {"a": 1e-30, "b": 1e30}),
        small_model,
        [r"1e-30", r"1e\+30", "closer together"],
    ),
    (
        "a multiplier that underflows float32",
        lambda m: stopgrad_lr.apply_lr_multipliers(m, {"a": 1e-46}),
        small_model,
        [r"multipliers\['a'\]=1e-46", "Use 0 to freeze"],
    ),
    (
        "an empty dict of scales",
        lambda m: stopgrad_lr.insert_gradient_scales(m, {}),
        small_model,
        [r"scales=\{\}", "non-empty dict"],
    ),
    (
        "an empty dict of multipliers",
        lambda m: stopgrad_lr.apply_lr_multipliers(m, {}),
        small_model,
        [r"multipliers=\{\}", "non-empty dict"],
    ),
    (
        "an empty list of boundaries",
        lambda m: stopgrad_lr.layerwise_decay(m, [], 0.5),
        small_model,
        [r"boundaries=\[\]", "transformer_layer_"],
    ),
    (
        "a decay above 1",
        lambda m: stopgrad_lr.layerwise_decay(m, "a", 1.5),
        small_model,
        [r"decay=1\.5", r"\(0, 1\]", "insert_gradient_scales"],
    ),
    (
        "a string for copy=",
        lambda m: stopgrad_lr.insert_gradient_scales(m, {"a": 0.5}, copy="no"),
        small_model,
        [r"copy='no' of type str", "True or False"],
    ),
    (
        "an int for stop_at_zero=",
        lambda m: stopgrad_lr.insert_gradient_scales(m, {"a": 0.0}, stop_at_zero=0),
        small_model,
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
        small_model,
        [r"round_to_power_of_two='yes'", "True or False"],
    ),
    (
        "None for strip's copy=",
        lambda m: stopgrad_lr.strip_gradient_scales(m, copy=None),
        scaled_model,
        [r"copy=None of type NoneType", "True or False"],
    ),
    (
        "a string for summary's print_fn",
        lambda m: stopgrad_lr.summary(m, print_fn="stdout"),
        small_model,
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
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_is_a_clear_error_and_the_model_is_unchanged(call, build, patterns):
    model = build()
    before = state(model)
    with pytest.raises(ValueError) as info:
        call(model)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), message
    assert "stopgrad_lr bug" not in message
    assert_unchanged(model, before)
