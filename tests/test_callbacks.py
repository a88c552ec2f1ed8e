"""`ScaleSchedule`, `LRFinder` and `find_lr`, on every backend.

Scheduled training is compared with a NumPy float64 simulation of SGD
written out from the chain rule, as in test_layers.py, so the reference
shares no code with Keras or with this package.
"""

import csv
import math
import re

import keras
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from _backend import BACKEND, bits, to_numpy
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler

from stopgrad_lr import (
    GradientReversal,
    GradientScale,
    LRFinder,
    ScaleSchedule,
    dann_ramp,
    find_lr,
    linear_warmup,
)

FIT_MODES = {
    "tensorflow": ["eager", "compiled", "jit"],
    "jax": ["eager", "jit"],
    "torch": ["eager"],
}[BACKEND]
BATCH, N_IN, N_HIDDEN, N_OUT = 8, 5, 4, 3


def two_layer_model(scale_layer, first_kernel):
    """x -> Dense(W1) -> scale_layer -> Dense(W2), linear, no biases."""
    second_kernel = np.random.default_rng(7).standard_normal((N_HIDDEN, N_OUT))
    inputs = keras.Input((N_IN,))
    hidden = keras.layers.Dense(N_HIDDEN, use_bias=False, name="first")(inputs)
    outputs = keras.layers.Dense(N_OUT, use_bias=False, name="second")(
        scale_layer(hidden)
    )
    model = keras.Model(inputs, outputs)
    model.get_layer("first").kernel.assign(first_kernel.astype("float32"))
    model.get_layer("second").kernel.assign(second_kernel.astype("float32"))
    return model


def data(steps, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((steps * BATCH, N_IN)).astype("float32")
    y = rng.standard_normal((steps * BATCH, N_OUT)).astype("float32")
    return x, y


def simulate_sgd(w1, w2, x, y, scales, lr):
    """Float64 SGD on mean squared error, the update of W1 times the scale.

    loss = mean((x W1 W2 - y)**2); dL/dpred = 2 (pred - y) / (batch * outputs).
    Batch `step` is rows `step * BATCH` to `(step + 1) * BATCH` of x and y.
    """
    w1, w2 = w1.astype("float64"), w2.astype("float64")
    for step, scale in enumerate(scales):
        xb = x[step * BATCH : (step + 1) * BATCH].astype("float64")
        yb = y[step * BATCH : (step + 1) * BATCH].astype("float64")
        d_pred = 2 * (xb @ w1 @ w2 - yb) / (BATCH * N_OUT)
        grad_w2 = (xb @ w1).T @ d_pred
        grad_w1 = xb.T @ (d_pred @ w2.T)
        w1, w2 = w1 - lr * scale * grad_w1, w2 - lr * grad_w2
    return w1, w2


def compile_for(model, mode, lr):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=lr),
        loss="mse",
        run_eagerly=mode == "eager",
        jit_compile=mode == "jit",
    )


def relative_error(actual, desired):
    desired = np.asarray(desired, "float64")
    return np.linalg.norm(actual - desired) / np.linalg.norm(desired)


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


class BatchLogRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batch_logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_logs.append(dict(logs))


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


class TraceCountingScale(GradientScale):
    """Counts how often `call` runs as Python: once per trace when compiled."""

    traces = 0

    def call(self, inputs):
        TraceCountingScale.traces += 1
        return super().call(inputs)


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


# LRFinder


def regression_data(batches, growing=False):
    """A linear regression, y = sum(x), of `batches` batches.

    With `growing`, batch k's targets are multiplied by k + 1, so the batch
    losses differ a lot from each other.
    """
    x = np.random.default_rng(0).standard_normal((batches * BATCH, 4))
    y = x.sum(axis=1, keepdims=True)
    if growing:
        y *= np.repeat(np.arange(1, batches + 1), BATCH)[:, None]
    return x.astype("float32"), y.astype("float32")


def linear_model(optimizer):
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(1, kernel_initializer="zeros")]
    )
    model.compile(optimizer=optimizer, loss="mse")
    return model


def test_sweep_is_geometric_and_records_each_batch_loss():
    x, y = regression_data(batches=4, growing=True)
    model = linear_model(keras.optimizers.SGD(0.5))
    # Learning rates too small to move the zero kernel: each loss is then
    # the mean of y**2 over its batch. Those grow 16-fold from the first
    # batch to the fourth: the divergence test is off.
    finder = LRFinder(1e-12, 1e-10, num_steps=10, beta=0.9, diverge_factor=math.inf)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=5, shuffle=False, verbose=0, callbacks=[finder]
    )
    assert len(history.history["loss"]) == 3  # stopped in the 3rd epoch
    expected_lrs = np.geomspace(1e-12, 1e-10, 10).astype("float32")
    np.testing.assert_array_equal(np.array(finder.lrs, "float32"), expected_lrs)
    assert all(type(lr) is float for lr in finder.lrs)
    batch_losses = (y.reshape(4, BATCH) ** 2).mean(axis=1)
    np.testing.assert_allclose(finder.losses, np.resize(batch_losses, 10), rtol=1e-5)
    # Bias-corrected moving average, in closed form.
    losses = np.array(finder.losses)
    for n in range(1, 11):
        weights = 0.1 * 0.9 ** np.arange(n - 1, -1, -1)
        expected = (weights * losses[:n]).sum() / (1 - 0.9**n)
        assert finder.smoothed_losses[n - 1] == pytest.approx(expected, rel=1e-12)


def variables_by_path(variables):
    return {v.path: to_numpy(v).copy() for v in variables}


class WeightsAtTrainEnd(keras.callbacks.Callback):
    """Listed before the finder: sees the weights before they are restored."""

    def on_train_end(self, logs=None):
        self.weights = variables_by_path(self.model.weights)
        self.iterations = int(to_numpy(self.model.optimizer.iterations))


# Adam on purpose: its moment slots are the optimizer state to restore. The
# model's GradientScale then rightly warns that Adam cancels the scale.
@pytest.mark.filterwarnings("ignore::stopgrad_lr.OptimizerMismatchWarning")
@pytest.mark.parametrize("pretrained", [False, True])
def test_weights_and_optimizer_state_are_restored_bit_exactly(pretrained):
    inputs = keras.Input((N_IN,))
    hidden = keras.layers.Dense(N_HIDDEN)(inputs)
    hidden = keras.layers.BatchNormalization()(hidden)
    hidden = GradientScale(0.5, name="boundary")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(N_OUT)(hidden))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    x, y = data(steps=4)
    if pretrained:
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    weights = variables_by_path(model.weights)
    optimizer_state = variables_by_path(model.optimizer.variables)
    recorder = WeightsAtTrainEnd()
    finder = LRFinder(1e-4, 1e-1, num_steps=6)
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[recorder, finder])
    # The sweep trained: six more optimizer steps and different weights.
    assert recorder.iterations == (4 if pretrained else 0) + 6
    assert any(
        not np.array_equal(recorder.weights[path], value)
        for path, value in weights.items()
    )
    after = variables_by_path(model.weights)
    assert after.keys() == weights.keys()
    for path, value in weights.items():
        assert np.array_equal(bits(after[path]), bits(value)), path
    restored = variables_by_path(model.optimizer.variables)
    for path, value in restored.items():
        if path in optimizer_state:
            assert np.array_equal(bits(value), bits(optimizer_state[path])), path
        else:
            # Slots the finder built for an optimizer that had not yet
            # trained: restored to their initial zeros.
            assert not pretrained and not value.any(), path
    optimizer = model.optimizer
    assert {optimizer.iterations.path, optimizer.learning_rate.path} <= set(
        optimizer_state
    )


def test_stops_when_the_smoothed_loss_diverges():
    x, y = regression_data(batches=8)
    model = linear_model(keras.optimizers.SGD(0.01))
    finder = LRFinder(1e-4, 1e3, num_steps=200, beta=0.7)
    model.fit(x, y, batch_size=BATCH, epochs=25, verbose=0, callbacks=[finder])
    smoothed = np.array(finder.smoothed_losses)
    assert 5 < len(smoothed) < 200
    assert smoothed[-1] > 4 * smoothed.min()
    assert all(
        smoothed[i] <= 4 * smoothed[: i + 1].min() for i in range(len(smoothed) - 1)
    )
    assert np.isfinite(finder.losses).all()
    # SGD on this regression diverges above lr ~ 1 (2 / largest Hessian
    # eigenvalue), not at the small rates of the start.
    assert 0.1 < finder.lrs[-1] < 100
    assert not to_numpy(model.layers[0].kernel).any()  # restored zeros


def test_stops_on_a_non_finite_loss_without_recording_it():
    x, y = regression_data(batches=8)
    model = linear_model(keras.optimizers.SGD(0.01))
    finder = LRFinder(1e-2, 1e12, num_steps=200, diverge_factor=float("inf"))
    recorder = BatchLogRecorder()
    model.fit(
        x, y, batch_size=BATCH, epochs=25, verbose=0, callbacks=[finder, recorder]
    )
    assert len(finder.losses) == len(recorder.batch_logs) - 1 < 199
    assert not math.isfinite(recorder.batch_logs[-1]["loss"])
    assert np.isfinite(finder.losses).all()
    assert max(finder.smoothed_losses) > 1e6 * min(finder.smoothed_losses)


def test_learning_rate_schedule_is_rejected_with_a_fix():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)
    model = linear_model(keras.optimizers.SGD(schedule))
    with pytest.raises(ValueError, match="needs a float learning rate") as info:
        model.fit(*regression_data(2), epochs=1, verbose=0, callbacks=[LRFinder()])
    assert "keras.optimizers.SGD(learning_rate=0.01)" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"start_lr": 0.0}, "start_lr"),
        ({"start_lr": float("nan")}, "start_lr"),
        ({"end_lr": 1e-8}, "end_lr"),
        ({"end_lr": float("inf")}, "end_lr"),
        ({"num_steps": 1}, "num_steps"),
        ({"num_steps": 10.0}, "num_steps"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"diverge_factor": 1.0}, "diverge_factor"),
        ({"diverge_factor": True}, "diverge_factor"),
    ],
)
def test_finder_rejects_invalid_arguments(kwargs, argument):
    with pytest.raises(ValueError) as info:
        LRFinder(**kwargs)
    message = str(info.value)
    assert message.startswith(f"Invalid value received for argument `{argument}`.")
    assert f"Received: {argument}={kwargs[argument]!r}" in message


def synthetic_finder(smoothed=None):
    """A sweep from 1e-6 to 1, 10 points a decade, with a hand-made loss.

    The loss falls fastest at lr = 1e-3 (log10 lr = -3, where tanh is
    steepest) and is lowest at lr = 10**-1.5, where a quadratic wall starts.
    """
    log_lrs = np.linspace(-6.0, 0.0, 61)
    finder = LRFinder()
    finder.lrs = [10.0**x for x in log_lrs]
    if smoothed is None:
        smoothed = (
            3 - np.tanh(2 * (log_lrs + 3)) + 20 * np.maximum(0, log_lrs + 1.5) ** 2
        )
    finder.smoothed_losses = [float(s) for s in smoothed]
    return finder


def test_steepest_suggestion_is_the_most_negative_slope():
    finder = synthetic_finder()
    assert finder.suggestion() == finder.lrs[30] == pytest.approx(1e-3)
    assert finder.suggestion("steepest") == finder.suggestion()


def test_steepest_suggestion_skips_the_first_tenth():
    smoothed = np.array(synthetic_finder().smoothed_losses)
    # 61 points: the first 6 are dropped. A steep fall out of point 5 is
    # ignored; the same fall out of point 6 is found.
    ignored, found = smoothed.copy(), smoothed.copy()
    ignored[5] = found[6] = 100.0
    assert synthetic_finder(ignored).suggestion() == pytest.approx(1e-3)
    finder = synthetic_finder(found)
    assert finder.suggestion() == finder.lrs[6]


def test_min_div_10_suggestion():
    finder = synthetic_finder()
    assert finder.suggestion("min_div_10") == finder.lrs[45] / 10
    assert finder.suggestion("min_div_10") == pytest.approx(10**-2.5)


def test_suggestion_needs_five_points_and_a_known_method():
    finder = synthetic_finder()
    finder.lrs, finder.smoothed_losses = finder.lrs[:4], finder.smoothed_losses[:4]
    with pytest.raises(ValueError, match="4 recorded, at least 5 needed"):
        finder.suggestion()
    finder.lrs.append(1.0)
    finder.smoothed_losses.append(5.0)
    assert finder.suggestion("min_div_10") == finder.lrs[3] / 10
    with pytest.raises(ValueError, match="Received: method='valley'"):
        finder.suggestion("valley")


def test_plot_marks_the_suggestion_on_a_log_axis():
    matplotlib.use("Agg")
    finder = synthetic_finder()
    figures = plt.get_fignums()
    try:
        figure = finder.plot()
        assert isinstance(figure, matplotlib.figure.Figure)
        (ax,) = figure.axes
        assert ax.get_xscale() == "log"
        curve, mark = ax.get_lines()
        np.testing.assert_array_equal(curve.get_ydata(), finder.smoothed_losses)
        assert list(mark.get_xdata()) == [1e-3, 1e-3]
        # On given axes, with another method or none.
        other_figure, (left, right) = plt.subplots(1, 2)
        assert finder.plot(left, method="min_div_10") is other_figure
        assert left.get_lines()[1].get_xdata()[0] == finder.lrs[45] / 10
        finder.plot(right, method=None)
        assert len(right.get_lines()) == 1
        # A sweep too short for a suggestion fails before making a figure.
        open_figures = plt.get_fignums()
        with pytest.raises(ValueError, match="Too few points"):
            LRFinder().plot()
        assert plt.get_fignums() == open_figures
    finally:
        for number in set(plt.get_fignums()) - set(figures):
            plt.close(number)


# find_lr


def digits():
    """sklearn's 8x8 digits (1797 images, bundled), standardized pixels."""
    x, y = load_digits(return_X_y=True)
    return StandardScaler().fit_transform(x).astype("float32"), y


def digits_model():
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(32, activation="relu", name="features")(inputs)
    hidden = GradientScale(0.5, name="boundary")(hidden)
    outputs = keras.layers.Dense(10, activation="softmax")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss="sparse_categorical_crossentropy",
    )
    return model


def test_find_lr_on_digits_suggests_a_sensible_rate():
    x, y = digits()
    model = digits_model()
    weights = variables_by_path(model.weights)
    # 57 batches an epoch: the sweep needs three epochs.
    finder = find_lr(model, x, y, batch_size=32, start_lr=1e-5, num_steps=150)
    assert len(model.history.history["loss"]) == 3
    assert 1e-4 <= finder.suggestion() <= 1.0
    assert 1e-4 <= finder.suggestion("min_div_10") <= 1.0
    assert min(finder.smoothed_losses) < 0.75 * finder.smoothed_losses[0]
    for path, value in variables_by_path(model.weights).items():
        assert np.array_equal(bits(value), bits(weights[path])), path
    assert float(to_numpy(model.optimizer.learning_rate)) == np.float32(0.05)


def small_batches(count):
    """`count` batches of a linear regression, all of the same difficulty."""
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((count, BATCH, 4)).astype("float32")
    return [(x, x.sum(axis=1, keepdims=True)) for x in xs]


class Batches(keras.utils.PyDataset):
    """A dataset with a length: `find_lr` runs as many epochs as needed."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


def endless(batches):
    while True:
        yield from batches


@pytest.mark.parametrize("source", ["dataset", "generator"])
def test_find_lr_runs_num_steps_on_datasets_and_generators(source):
    batches = small_batches(5)
    x = Batches(batches) if source == "dataset" else endless(batches)
    model = linear_model(keras.optimizers.SGD(0.01))
    recorder = BatchLogRecorder()
    finder = find_lr(
        model, x, start_lr=1e-6, end_lr=1e-3, num_steps=12, callbacks=[recorder]
    )
    assert len(finder.lrs) == len(recorder.batch_logs) == 12
    assert len(model.history.history["loss"]) == (3 if source == "dataset" else 1)


class Interrupt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 2:
            raise RuntimeError("interrupted")


def test_find_lr_restores_the_model_when_training_is_interrupted():
    model = digits_model()
    x, y = digits()
    weights = variables_by_path(model.weights)
    with pytest.raises(RuntimeError, match="interrupted"):
        find_lr(model, x[:256], y[:256], start_lr=1e-2, callbacks=[Interrupt()])
    for path, value in variables_by_path(model.weights).items():
        assert np.array_equal(bits(value), bits(weights[path])), path


def test_find_lr_needs_a_compiled_model_and_sets_epochs_itself():
    x, y = regression_data(2)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="needs a compiled model"):
        find_lr(model, x, y)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="find_lr sets `epochs` itself"):
        find_lr(model, x, y, epochs=3)
