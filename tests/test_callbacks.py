"""`ScaleSchedule`, on every backend.

Scheduled training is compared with a NumPy float64 simulation of SGD
written out from the chain rule (`_helpers.py`), so the reference
shares no code with Keras or with this package.
"""

import csv
import re

import keras
import numpy as np
import pytest
from _backend import BACKEND, relative_error, to_numpy
from _helpers import (
    BATCH,
    FIT_MODES,
    N_HIDDEN,
    N_IN,
    N_OUT,
    BatchLogRecorder,
    TraceCountingScale,
    compile_for,
    data,
    simulate_sgd,
    two_layer_model,
)

from stopgrad_lr import (
    GradientReversal,
    GradientScale,
    ScaleSchedule,
    dann_ramp,
    linear_warmup,
)


def train_with_schedule(schedule_callback, scale_layer, mode, steps, epochs):
    """Trains the two-layer model; returns (W1 after, W1 before, W2 before, x, y).

    Every epoch sees the same `steps` batches in order; x and y are returned
    repeated `epochs` times, as the batches of the whole run.
    """
    w1 = np.random.default_rng(4).standard_normal((N_IN, N_HIDDEN))
    model = two_layer_model(scale_layer, w1)
    w2 = to_numpy(model.get_layer("second").kernel)
    x, y = data(steps)
    compile_for(model, mode, lr=0.1)
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[schedule_callback],
    )
    trained = to_numpy(model.get_layer("first").kernel)
    return (
        trained,
        w1.astype("float32"),
        w2,
        np.tile(x, (epochs, 1)),
        np.tile(y, (epochs, 1)),
    )


# ScaleSchedule


@pytest.mark.parametrize("mode", FIT_MODES)
def test_per_batch_schedule_follows_the_step_across_epochs(mode):
    values = [0.0, 1.0, 0.25, -0.5, 2.0, 0.5]
    callback = ScaleSchedule("boundary", values.__getitem__, per="batch")
    trained, w1, w2, x, y = train_with_schedule(
        callback, GradientScale(1.0, name="boundary"), mode, steps=3, epochs=2
    )
    expected, _ = simulate_sgd(w1, w2, x, y, values, lr=0.1)
    assert relative_error(trained, expected) < 1e-5
    # Restarting the count every epoch would give a different W1.
    restarted, _ = simulate_sgd(w1, w2, x, y, values[:3] * 2, lr=0.1)
    assert relative_error(restarted, expected) > 1e-2


@pytest.mark.parametrize("mode", FIT_MODES)
def test_per_epoch_schedule_sets_the_scale_each_epoch(mode):
    callback = ScaleSchedule("boundary", linear_warmup(0.0, 1.0, steps=2))
    trained, w1, w2, x, y = train_with_schedule(
        callback, GradientScale(1.0, name="boundary"), mode, steps=2, epochs=3
    )
    scales = [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    expected, _ = simulate_sgd(w1, w2, x, y, scales, lr=0.1)
    assert relative_error(trained, expected) < 1e-5
    unscheduled, _ = simulate_sgd(w1, w2, x, y, [1.0] * 6, lr=0.1)
    assert relative_error(unscheduled, expected) > 1e-2


def test_strength_attribute_ramps_a_reversal_layer():
    def ramp(epoch):
        return dann_ramp(epoch / 2)

    callback = ScaleSchedule("reversal", ramp, attribute="strength")
    trained, w1, w2, x, y = train_with_schedule(
        callback, GradientReversal(1.0, name="reversal"), "compiled", 1, epochs=3
    )
    scales = [-dann_ramp(0.0), -dann_ramp(0.5), -dann_ramp(1.0)]
    expected, _ = simulate_sgd(w1, w2, x, y, scales, lr=0.1)
    assert relative_error(trained, expected) < 1e-5
    history = callback.model.history.history
    np.testing.assert_allclose(history["strength/reversal"], -np.array(scales), 1e-7)


def nested_model():
    """An "encoder" submodel holding a GradientScale, then a GradientReversal."""
    inner_inputs = keras.Input((N_IN,))
    hidden = keras.layers.Dense(N_HIDDEN, name="first")(inner_inputs)
    encoder = keras.Model(
        inner_inputs, GradientScale(1.0, name="boundary")(hidden), name="encoder"
    )
    inputs = keras.Input((N_IN,))
    reversed_ = GradientReversal(1.0, name="reversal")(encoder(inputs))
    return keras.Model(inputs, keras.layers.Dense(N_OUT)(reversed_))


def test_scales_are_logged_for_csv_logger_history_and_batches(tmp_path):
    model = nested_model()
    model.compile(optimizer="sgd", loss="mse")
    values = [0.5, 0.1, -0.25, 0.75, 2.0, 0.0]
    schedule = ScaleSchedule(
        [re.compile(r"enc\w+/bound\w+"), "rev*"], values.__getitem__, per="batch"
    )
    recorder = BatchLogRecorder()
    csv_path = tmp_path / "log.csv"
    x, y = data(steps=3)
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        verbose=0,
        callbacks=[schedule, keras.callbacks.CSVLogger(str(csv_path)), recorder],
    )
    keys = ["scale/encoder/boundary", "scale/reversal"]
    # Each batch logs the value it trained with; an epoch logs its last one.
    for key in keys:
        assert [logs[key] for logs in recorder.batch_logs] == values
        assert history.history[key] == [values[2], values[5]]
    with csv_path.open() as file:
        rows = list(csv.DictReader(file))
    assert [[float(row[key]) for key in keys] for row in rows] == [
        [values[2]] * 2,
        [values[5]] * 2,
    ]
    assert model.get_layer("encoder").get_layer("boundary").scale == values[5]
    assert model.get_layer("reversal").scale == values[5]


def test_log_name_sets_the_key_prefix():
    model = two_layer_model(GradientScale(1.0, name="boundary"), np.eye(N_IN, N_HIDDEN))
    model.compile(optimizer="sgd", loss="mse")
    schedule = ScaleSchedule("bound*", lambda epoch: 0.5, log_name="lr_multiplier")
    history = model.fit(*data(1), epochs=1, verbose=0, callbacks=[schedule])
    assert history.history["lr_multiplier/boundary"] == [0.5]
    assert "scale/boundary" not in history.history


@pytest.mark.skipif(
    BACKEND == "torch", reason="torch runs fit eagerly: there is no trace to repeat"
)
@pytest.mark.parametrize("mode", [m for m in FIT_MODES if m != "eager"] or ["none"])
def test_scheduling_every_batch_does_not_retrace(mode):
    boundary = TraceCountingScale(1.0, name="boundary")
    model = two_layer_model(boundary, np.zeros((N_IN, N_HIDDEN)))
    compile_for(model, mode, lr=0.1)
    x, y = data(steps=4)
    model.fit(x, y, batch_size=BATCH, verbose=0)
    traces = TraceCountingScale.traces
    values = [0.5, 0.0, -1.0, 0.25]
    # The step count goes on from the first fit: this one runs steps 4 to 7.
    schedule = ScaleSchedule("boundary", lambda step: values[step - 4], per="batch")
    model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=[schedule])
    assert TraceCountingScale.traces == traces
    assert boundary.scale == values[-1]


def callback_on(model, callback):
    callback.set_model(model)
    return callback


def test_pattern_without_a_gradient_scale_lists_the_closest_names():
    model = nested_model()
    with pytest.raises(ValueError) as info:
        callback_on(model, ScaleSchedule("boundry", float)).on_train_begin()
    assert "Pattern 'boundry' matched no GradientScale layer" in str(info.value)
    assert "'encoder/boundary'" in str(info.value)


def test_pattern_matching_other_layers_says_they_are_not_gradient_scales():
    with pytest.raises(ValueError) as info:
        callback_on(nested_model(), ScaleSchedule("first", float)).on_train_begin()
    message = str(info.value)
    assert "matched ['encoder/first']" in message
    assert "none of them is a GradientScale layer" in message
    assert "['encoder/boundary', 'reversal']" in message


def test_model_without_gradient_scale_layers_is_reported():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="the model has no GradientScale layer"):
        callback_on(model, ScaleSchedule("*", float)).on_train_begin()


def test_strength_needs_reversal_layers():
    callback = callback_on(
        nested_model(), ScaleSchedule("*", float, attribute="strength")
    )
    with pytest.raises(ValueError, match=r"\['encoder/boundary'\] are GradientScale"):
        callback.on_train_begin()


def test_schedule_returning_a_non_finite_value_raises():
    callback = callback_on(
        nested_model(), ScaleSchedule("reversal", lambda epoch: float("nan"))
    )
    callback.on_train_begin()
    with pytest.raises(ValueError) as info:
        callback.on_epoch_begin(3)
    assert str(info.value).startswith(
        "Invalid value received for argument `schedule(3)`."
    )
    assert "Received: schedule(3)=nan" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"layers": 3}, "layers"),
        ({"layers": []}, "layers"),
        ({"layers": ["ok", None]}, "layers"),
        ({"schedule": 0.5}, "schedule"),
        ({"per": "step"}, "per"),
        ({"attribute": "weight"}, "attribute"),
        ({"log_name": ""}, "log_name"),
    ],
)
def test_invalid_arguments_raise_keras_style_errors(kwargs, argument):
    arguments = {"layers": "boundary", "schedule": float, **kwargs}
    with pytest.raises(ValueError) as info:
        ScaleSchedule(**arguments)
    assert str(info.value).startswith(
        f"Invalid value received for argument `{argument}`."
    )


def test_repr_names_the_arguments():
    def warmup(step):
        return 1.0

    text = repr(ScaleSchedule(["a*", re.compile("b")], warmup, per="batch"))
    assert text == (
        "ScaleSchedule(layers=['a*', re.compile('b')], schedule="
        "test_repr_names_the_arguments.<locals>.warmup, per='batch', "
        "attribute='scale', log_name='scale')"
    )
