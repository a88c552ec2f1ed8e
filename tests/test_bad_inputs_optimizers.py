"""Bad inputs to the optimizer functions: a clear error, and the model unchanged.

Each test asserts the exception type, that the message names what was
received and what to do, and that the input model still has its layers and
gives the same outputs.
"""

import keras
import numpy as np
import pytest

from stopgrad_lr import apply_lr_multipliers, check_optimizer, multi_optimizer

OPT = keras.optimizers


def mlp():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu", name="block1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    return model, np.random.default_rng(0).standard_normal((4, 6)).astype("float32")


def snapshot(model, data):
    return list(model.layers), model.predict_on_batch(data)


def assert_unchanged(model, data, before):
    layers, outputs = before
    assert list(model.layers) == layers
    np.testing.assert_array_equal(model.predict_on_batch(data), outputs)


# (a) The report's truth value is its `ok`.


def test_a_failing_report_is_false():
    model, data = mlp()
    before = snapshot(model, data)
    scaled = apply_lr_multipliers(model, {"block1": 0.1})
    failing = check_optimizer(OPT.Adam(), scaled)
    assert not failing.ok and not failing and bool(failing) is False
    passing = check_optimizer(OPT.SGD(), scaled)
    assert passing.ok and passing
    assert_unchanged(model, data, before)


# (b) A layer or a string where the model goes.


@pytest.mark.parametrize(
    "not_a_model", ["mlp", keras.layers.Dense(3)], ids=["str", "layer"]
)
def test_check_optimizer_refuses_what_is_not_a_model(not_a_model):
    model, data = mlp()
    before = snapshot(model, data)
    with pytest.raises(ValueError) as raised:
        check_optimizer(OPT.SGD(), not_a_model)
    message = str(raised.value)
    assert "argument `model`" in message
    assert f"of type {type(not_a_model).__name__}" in message  # what was received
    assert "Expected the keras.Model" in message and "or None" in message
    assert_unchanged(model, data, before)


# (c) A learning rate that is a plain function or a lambda.


def constant_rate():
    return 1e-3


@pytest.mark.parametrize(
    ("rate", "received"),
    [(lambda: 1e-3, "a lambda"), (constant_rate, "the function constant_rate")],
    ids=["lambda", "function"],
)
def test_multi_optimizer_refuses_a_function_learning_rate(rate, received):
    model, data = mlp()
    before = snapshot(model, data)
    with pytest.raises(ValueError) as raised:
        multi_optimizer(model, {"block1": 0.1}, OPT.Adam(rate))
    message = str(raised.value)
    assert "safe_mode" not in message
    assert f"Received: learning_rate={received}" in message
    assert "LearningRateSchedule" in message and "or pass a float" in message
    assert_unchanged(model, data, before)


# (d) No message recommends what the code then refuses.


def test_the_rmsprop_refusal_does_not_recommend_reparametrize():
    model, data = mlp()
    before = snapshot(model, data)
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
    assert_unchanged(model, data, before)


def test_the_adamw_fix_does_not_recommend_apply_lr_multipliers_which_refuses_it():
    model, data = mlp()
    before = snapshot(model, data)
    scaled = apply_lr_multipliers(model, {"block1": 0.1})
    report = check_optimizer(OPT.AdamW(), scaled)
    assert not any("apply_lr_multipliers" in problem for problem in report.problems)
    assert all("multi_optimizer" in problem for problem in report.problems)
    with pytest.raises(ValueError, match="found no mechanism"):
        apply_lr_multipliers(model, {"block1": 0.1}, optimizer=OPT.AdamW())
    # The fix it does recommend works.
    multi_optimizer(model, {"block1": 0.1}, OPT.AdamW())
    assert_unchanged(model, data, before)
