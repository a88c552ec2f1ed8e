"""`LRFinder` and `find_lr`, on every backend.

The suggestion rules are checked on synthetic loss curves whose answer is
known in closed form (with noise added); the sweep on models whose
divergence point follows from the Hessian; the restore bit for bit, by
comparing a `fit` after the sweep with the same `fit` without it.
"""

import math

import keras
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from _backend import BACKEND, bits, to_numpy
from _helpers import BATCH, N_HIDDEN, N_IN, N_OUT, BatchLogRecorder, data
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler

import stopgrad_lr
from stopgrad_lr import GradientScale, LRFinder, find_lr

SHUFFLE = BACKEND == "tensorflow"


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


def diverged_by_hand(losses, factor):
    """The divergence test of `LRFinder`, batch by batch: the median of the
    last 3 losses above `factor` times its lowest value so far, or above
    each of the first 10 losses once that lowest value is below each by more
    than their range."""
    verdicts = []
    start = losses[:10]
    for end in range(3, len(losses) + 1):
        recent = [float(np.median(losses[i - 3 : i])) for i in range(3, end + 1)]
        best = min(recent)
        verdicts.append(
            recent[-1] > factor * best
            or (
                len(start) == 10
                and best < 2 * min(start) - max(start)
                and recent[-1] > max(start)
            )
        )
    return verdicts


def test_stops_when_the_loss_diverges():
    x, y = regression_data(batches=8)
    model = linear_model(keras.optimizers.SGD(0.01))
    finder = LRFinder(1e-4, 1e3, num_steps=200, beta=0.7)
    model.fit(x, y, batch_size=BATCH, epochs=25, verbose=0, callbacks=[finder])
    assert 5 < len(finder.losses) < 200
    # Diverged at the last batch and at no batch before.
    assert diverged_by_hand(finder.losses, 4.0) == [False] * (
        len(finder.losses) - 3
    ) + [True]
    assert finder.divergence_lr == finder.lrs[-1]
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
    # The rate of the unrecorded batch: the next of the geometric sweep.
    assert finder.divergence_lr == pytest.approx(
        finder.lrs[-1] * (1e14 ** (1 / 199)), rel=1e-5
    )
    assert np.isfinite(finder.losses).all()
    assert max(finder.smoothed_losses) > 1e6 * min(finder.smoothed_losses)


def test_plain_function_learning_rate_is_rejected_with_a_fix():
    model = linear_model(keras.optimizers.SGD(lambda: 0.1))
    with pytest.raises(ValueError, match="is a plain function") as info:
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
        ({"stop_on_divergence": 1}, "stop_on_divergence"),
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
    assert finder.suggestion("steepest") == finder.lrs[30] == pytest.approx(1e-3)


def test_steepest_suggestion_skips_the_first_tenth():
    smoothed = np.array(synthetic_finder().smoothed_losses)
    # 61 points: the first 6 are dropped. A steep fall out of point 5 is
    # ignored; the same fall out of point 6 is found.
    ignored, found = smoothed.copy(), smoothed.copy()
    ignored[5] = found[6] = 100.0
    assert synthetic_finder(ignored).suggestion("steepest") == pytest.approx(1e-3)
    finder = synthetic_finder(found)
    assert finder.suggestion("steepest") == finder.lrs[6]


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
    with pytest.raises(ValueError, match="Received: method='fastest'"):
        finder.suggestion("fastest")


def test_plot_marks_the_suggestion_on_a_log_axis():
    matplotlib.use("Agg")
    finder = synthetic_finder()
    figures = plt.get_fignums()
    try:
        figure = finder.plot(method="steepest")
        assert isinstance(figure, matplotlib.figure.Figure)
        (ax,) = figure.axes
        assert ax.get_xscale() == "log"
        curve, mark, divergence = ax.get_lines()
        np.testing.assert_array_equal(curve.get_ydata(), finder.smoothed_losses)
        assert list(mark.get_xdata()) == [1e-3, 1e-3]
        # Up the wall, the median of 3 passes every loss of the start (4.0)
        # at lr 0.1 (where it is the loss at 10**-1.1, 5.2): a dotted line
        # there, and the loss axis spans the curve before it (a fall from 4
        # to 2 and its foot, 5.2), not the wall's 47.
        assert finder.divergence_lr == pytest.approx(0.1)
        assert list(divergence.get_xdata()) == [finder.divergence_lr] * 2
        assert divergence.get_label() == f"diverged: {finder.divergence_lr:.2e}"
        before = [
            v
            for lr, v in zip(finder.lrs, finder.smoothed_losses, strict=True)
            if lr < finder.divergence_lr
        ]
        bottom, top = ax.get_ylim()
        assert (
            bottom < min(before) < max(before) < top < 10 < max(finder.smoothed_losses)
        )
        # On given axes, with another method or none.
        other_figure, (left, right) = plt.subplots(1, 2)
        assert finder.plot(left, method="min_div_10") is other_figure
        assert left.get_lines()[1].get_xdata()[0] == finder.lrs[45] / 10
        finder.plot(right, method=None)
        assert len(right.get_lines()) == 2  # the curve, the divergence
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


# The rules on noisy synthetic curves with a known answer


def noisy_sweep(seed, noise=0.01, points=121):
    """A sweep from 1e-7 to 10 (15 points a decade) of a curve with a flat
    plateau, a fall of 0.9 centred at lr = 1e-2 (a logistic in log10 lr, of
    width 0.25 decade), and a quadratic wall from lr = 10**-1.2 on; noise of
    `noise` times the loss is added to the smoothed loss.

    Known answers: the fall is steepest at lr = 1e-2 (the wall is flat
    there); the curve reaches 95% of its fall at 10**(-2 + 0.25 ln 19) and
    is lowest near the wall's foot, before 10**-1.0.
    """
    log_lrs = np.linspace(-7.0, 1.0, points)
    clean = (
        1.0
        - 0.9 / (1.0 + np.exp(-(log_lrs + 2.0) / 0.25))
        + 20.0 * np.maximum(0.0, log_lrs + 1.2) ** 2
    )
    rng = np.random.default_rng(seed)
    finder = LRFinder()
    finder.lrs = [float(10.0**x) for x in log_lrs]
    finder.smoothed_losses = list(clean * (1 + noise * rng.standard_normal(points)))
    return finder


@pytest.mark.parametrize("seed", range(5))
def test_rules_find_the_known_answer_on_a_noisy_curve(seed):
    finder = noisy_sweep(seed)
    log_lrs = np.log10(finder.lrs)
    step = log_lrs[1] - log_lrs[0]
    # The steepest fall, over a window: within two points of 1e-2.
    steepest = math.log10(finder.suggestion("steepest"))
    assert abs(steepest - (-2.0)) <= 2 * step + 1e-9
    # The lowest point lies in the wall's foot, in [10**-1.4, 10**-1.0].
    minimum = math.log10(finder.suggestion("min_div_10") * 10)
    assert -1.4 <= minimum <= -1.0
    # The valley: the last point above sqrt(top * minimum) on the way down.
    # It reads the points before the divergence (the wall at 4 times the
    # floor), less their last twentieth: top 1 (the plateau) and minimum
    # m = 1 - 0.9 s_end, the logistic's value at the last point read. Then
    # 1 - 0.9 s = sqrt(m) at s = (1 - sqrt(m)) / 0.9, the logistic's value
    # at 10**(-2 + 0.25 ln(s / (1 - s))).
    end = finder.lrs.index(finder.divergence_lr)
    last = log_lrs[end - max(1, end // 20) - 1]
    floor = 1 - 0.9 / (1 + math.exp(-(last + 2.0) / 0.25))
    fall = (1 - math.sqrt(floor)) / 0.9
    crossing = -2.0 + 0.25 * math.log(fall / (1 - fall))
    assert abs(math.log10(finder.suggestion("valley")) - crossing) <= 2 * step
    assert finder.suggestions() == {
        "valley": finder.suggestion("valley"),
        "steepest": finder.suggestion("steepest"),
        "min_div_10": finder.suggestion("min_div_10"),
        "fastai_valley": finder.suggestion("fastai_valley"),
    }


def test_windowed_slope_ignores_a_noise_dip_that_a_point_slope_takes():
    """The failure of the issue: one noisy dip on the plateau is the most
    negative point-to-point slope, but not over a window."""
    finder = noisy_sweep(0, noise=0.0)
    smoothed = np.array(finder.smoothed_losses)
    smoothed[20] -= 0.3  # a one-point dip at lr = 10**(-7 + 20/15)
    finder.smoothed_losses = list(smoothed)
    pointwise = np.gradient(smoothed[12:], np.log10(finder.lrs[12:]))
    assert np.argmin(pointwise) + 12 == 20 - 1
    assert finder.suggestion("steepest") == pytest.approx(1e-2)
    assert 1e-3 <= finder.suggestion("valley") <= 1e-1


def test_fastai_valley_is_halfway_through_the_longest_descent():
    # 20 points: the first 2 and the last 1 are dropped. The longest
    # strictly decreasing subsequence of the rest runs from index 4 (5.0) to
    # index 14 (0.5), through a bump at 9 that it steps over.
    smoothed = [9, 9, 3, 2, 5, 4.5, 4, 3.5, 3, 3.2, 2.5, 2, 1.5, 1, 0.5, 6, 7, 8, 9, 0]
    finder = LRFinder()
    finder.lrs = [float(2.0**k) for k in range(20)]
    finder.smoothed_losses = [float(v) for v in smoothed]
    assert finder.suggestion("fastai_valley") == finder.lrs[4 + (14 - 4) // 2]
    # The valley: the top before the minimum (0.5 at index 14) is 5.0, so
    # the level is sqrt(2.5) = 1.58; the last point above it before the
    # minimum is index 11 (2.0; index 12 holds 1.5).
    assert finder.suggestion("valley") == finder.suggestion() == finder.lrs[11]


def test_fastai_valley_lands_on_a_noisy_plateau_where_valley_does_not():
    finder = noisy_sweep(0)
    assert finder.suggestion("fastai_valley") < 1e-3 < finder.suggestion("valley")


def test_plot_marks_every_rule_by_default():
    matplotlib.use("Agg")
    finder = noisy_sweep(1)
    figure = finder.plot()
    try:
        (ax,) = figure.axes
        marks = {line.get_label().split(":")[0]: line for line in ax.get_lines()[1:]}
        assert set(marks) == {
            "valley",
            "steepest",
            "min_div_10",
            "fastai_valley",
            "diverged",
        }
        for name, line in marks.items():
            expected = finder.divergence_lr if name == "diverged" else None
            assert line.get_xdata()[0] == (expected or finder.suggestion(name))
    finally:
        plt.close(figure)


# Sweep options


def test_linear_sweep_steps_by_equal_differences():
    x, y = regression_data(batches=4)
    model = linear_model(keras.optimizers.SGD(0.5))
    finder = find_lr(
        model,
        x,
        y,
        batch_size=BATCH,
        start_lr=1e-12,
        end_lr=1e-10,
        num_steps=10,
        mode="linear",
    )
    expected = np.linspace(1e-12, 1e-10, 10).astype("float32")
    np.testing.assert_array_equal(np.array(finder.lrs, "float32"), expected)
    # Longer than an epoch of 4 batches: the data repeats, for 3 epochs.
    assert len(model.history.history["loss"]) == 3


def test_validation_data_loss_replaces_the_training_loss():
    # Rates too small to move the zero kernel: every validation loss is
    # mean(y_val ** 2), while the training batches' losses grow.
    x, y = regression_data(batches=4, growing=True)
    x_val, y_val = data(steps=3, seed=5)[0][:, :4], data(steps=3, seed=6)[1][:, :1]
    model = linear_model(keras.optimizers.SGD(0.5))
    finder = find_lr(
        model,
        x,
        y,
        batch_size=BATCH,
        start_lr=1e-12,
        end_lr=1e-10,
        num_steps=6,
        validation_data=(x_val, y_val),
        diverge_factor=math.inf,
    )
    expected = float((y_val.astype("float64") ** 2).mean())
    np.testing.assert_allclose(finder.losses, [expected] * 6, rtol=1e-6)


def test_diverge_factor_sets_where_the_sweep_stops():
    x, y = regression_data(batches=8)
    stops = {}
    for factor in (1.5, 100.0):
        model = linear_model(keras.optimizers.SGD(0.01))
        finder = find_lr(
            model,
            x,
            y,
            batch_size=BATCH,
            start_lr=1e-4,
            end_lr=1e3,
            num_steps=200,
            beta=0.7,
            diverge_factor=factor,
        )
        verdicts = diverged_by_hand(finder.losses, factor)
        assert verdicts == [False] * (len(verdicts) - 1) + [True]
        stops[factor] = len(finder.losses)
    assert stops[1.5] < stops[100.0] < 200


def ordered_state(model):
    """Every variable of the model, its optimizer and its metrics, in order:
    a second model's auto-generated names differ."""
    variables = [*model.variables, *model.optimizer.variables, *model.metrics_variables]
    return [(v.path, to_numpy(v).copy()) for v in variables]


def assert_same_state(actual, expected):
    assert len(actual) == len(expected)
    for (path, value), (_, other) in zip(expected, actual, strict=True):
        assert np.array_equal(bits(other), bits(value)), path


def test_learning_rate_schedule_is_swept_and_put_back():
    x, y = regression_data(batches=8)
    trained = {}
    for sweep in (False, True):
        schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.9)
        model = linear_model(keras.optimizers.SGD(schedule))
        fit = dict(batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        model.fit(x, y, **fit)  # the train step is traced with the schedule
        if sweep:
            finder = find_lr(
                model,
                x,
                y,
                batch_size=BATCH,
                start_lr=1e-4,
                end_lr=1e3,
                num_steps=200,
                beta=0.7,
            )
            # The sweep really ran: it diverged where SGD on this regression
            # does (lr above ~1), which the decaying schedule never reaches.
            assert len(finder.lrs) < 200
            assert 0.1 < finder.lrs[-1] < 100
            assert model.optimizer.get_config()["learning_rate"] == (
                keras.saving.serialize_keras_object(schedule)
            )
            assert int(to_numpy(model.optimizer.iterations)) == 8
        model.fit(x, y, **fit)  # retraced: with the schedule again
        trained[sweep] = ordered_state(model)
    assert_same_state(trained[True], trained[False])


# The restore guarantee: a fit after find_lr is the fit without it


def block_model():
    """Dense -> BatchNormalization -> Dropout -> "head": BN statistics and a
    dropout seed are state too."""
    inputs = keras.Input((N_IN,))
    hidden = keras.layers.Dense(N_HIDDEN, name="backbone")(inputs)
    hidden = keras.layers.BatchNormalization(name="norm")(hidden)
    hidden = keras.layers.Dropout(0.25, name="drop")(hidden)
    return keras.Model(inputs, keras.layers.Dense(N_OUT, name="head")(hidden))


def sgd():
    return keras.optimizers.SGD(0.05, momentum=0.9)


# Each builds a compiled model from the same seed; stopgrad_lr's rewrites
# (gradient scales, a stop, reparametrisation) and a MultiOptimizer.
MODEL_KINDS = {
    "plain": lambda: (block_model(), sgd()),
    "scales": lambda: (
        stopgrad_lr.apply_lr_multipliers(block_model(), {"backbone": 0.1}),
        sgd(),
    ),
    "stop": lambda: (
        stopgrad_lr.apply_lr_multipliers(block_model(), {"backbone": 0.0}),
        sgd(),
    ),
    "reparametrized": lambda: (
        stopgrad_lr.apply_lr_multipliers(
            block_model(), {"backbone": 0.25}, optimizer=keras.optimizers.Adam()
        ),
        keras.optimizers.Adam(1e-2),
    ),
    "multi_optimizer": lambda: (
        (model := block_model()),
        stopgrad_lr.multi_optimizer(model, {"backbone": 0.1}, sgd()),
    ),
}


def build(kind):
    keras.utils.set_random_seed(0)
    model, optimizer = MODEL_KINDS[kind]()
    # No XLA: it compiles for seconds, and the guarantee does not depend on it.
    model.compile(optimizer=optimizer, loss="mse", metrics=["mae"], jit_compile=False)
    return model


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(
            kind,
            # A stop leaves the backbone without gradients, and Keras says so.
            marks=pytest.mark.filterwarnings("ignore:Gradients do not exist")
            if kind == "stop"
            else (),
        )
        for kind in MODEL_KINDS
    ],
)
def test_fit_after_find_lr_is_bit_identical_to_fit_without(kind):
    x, y = data(steps=6)
    results = {}
    for sweep in (False, True):
        # Same seed for both: a sweep that drew from the global random
        # state (shuffling, dropout) would change the fit after it.
        model = build(kind)
        if sweep:
            before = variables_by_path(model.variables)
            finder = find_lr(
                model,
                x,
                y,
                batch_size=BATCH,
                start_lr=1e-4,
                end_lr=1.0,
                num_steps=8,
                diverge_factor=math.inf,
            )
            assert len(finder.lrs) == 8
            after = variables_by_path(model.variables)
            assert after.keys() == before.keys()
            for path, value in before.items():
                assert np.array_equal(bits(after[path]), bits(value)), path
        # Shuffled on TensorFlow. On JAX and torch the order of Keras's own
        # shuffling depends on the fits that ran before, even unshuffled
        # ones (measured), which no restore of the model can undo.
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=SHUFFLE, verbose=0)
        results[sweep] = ordered_state(model)
    assert_same_state(results[True], results[False])


class GroupRates(keras.callbacks.Callback):
    """After the finder: the rate each inner optimizer applies this batch."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        inner = self.model.optimizer
        if isinstance(inner, keras.optimizers.LossScaleOptimizer):
            inner = inner.inner_optimizer
        self.rates.append(
            {o.name: float(to_numpy(o.learning_rate)) for o in inner.optimizers}
        )


@pytest.mark.parametrize("base", ["float", "schedule", "loss_scale"])
def test_multi_optimizer_sweeps_the_base_rate_and_keeps_the_ratios(base):
    keras.utils.set_random_seed(0)
    model = block_model()
    rate = (
        keras.optimizers.schedules.ExponentialDecay(0.05, 10, 0.5)
        if base == "schedule"
        else 0.05
    )
    optimizer = keras.optimizers.SGD(rate)
    if base == "loss_scale":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=stopgrad_lr.multi_optimizer(model, {"backbone": 0.1}, optimizer),
        loss="mse",
    )
    rates = GroupRates()
    x, y = data(steps=4)
    finder = find_lr(
        model,
        x,
        y,
        batch_size=BATCH,
        start_lr=1e-4,
        end_lr=1e-2,
        num_steps=5,
        callbacks=[rates],
    )
    expected = np.geomspace(1e-4, 1e-2, 5)
    for swept, by_group in zip(expected, rates.rates, strict=True):
        assert by_group["sgd"] == pytest.approx(swept, rel=1e-6)
        assert by_group["sgd_x0.1"] == pytest.approx(0.1 * swept, rel=1e-6)
    np.testing.assert_allclose(finder.lrs, expected, rtol=1e-6)
    # Put back: each group's own rate (or schedule) at step 0.
    after = GroupRates()
    after.set_model(model)
    after.on_train_batch_begin(0)
    assert after.rates[0] == {
        "sgd": pytest.approx(0.05, rel=1e-7),
        "sgd_x0.1": pytest.approx(0.005, rel=1e-7),
    }


# Bad input: a clear ValueError, and the model untouched


def untouched_state(model):
    optimizer = getattr(model, "optimizer", None)
    return (
        variables_by_path(model.variables),
        None if optimizer is None else optimizer.built,
        None if optimizer is None else int(to_numpy(optimizer.iterations)),
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("start >= end", "Received: end_lr=0.001"),
        ("zero steps", "Received: num_steps=0"),
        ("uncompiled", "needs a compiled model"),
        ("smaller than a batch", "Expected at least batch_size=32 samples"),
        ("0 samples", "Received: x with 0 samples"),
        ("empty dataset", "Received: a dataset of 0 batches"),
        ("plain-function rate", "is a plain function"),
        ("bad mode", "Received: mode='log'"),
    ],
)
def test_bad_input_raises_and_leaves_the_model_untouched(case, message):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    rate = (lambda: 0.01) if case == "plain-function rate" else 0.01
    if case != "uncompiled":
        model.compile(optimizer=keras.optimizers.SGD(rate), loss="mse")
    x, y = regression_data(batches=8)
    kwargs = {}
    if case == "start >= end":
        kwargs = dict(start_lr=1e-3, end_lr=1e-3)
    elif case == "zero steps":
        kwargs = dict(num_steps=0)
    elif case == "smaller than a batch":
        x, y = x[:10], y[:10]
    elif case == "0 samples":
        x, y = x[:0], y[:0]
    elif case == "empty dataset":
        x, y = Batches([]), None
    elif case == "bad mode":
        kwargs = dict(mode="log")
    before = untouched_state(model)
    with pytest.raises(ValueError, match=message):
        find_lr(model, x, y, **kwargs)
    after = untouched_state(model)
    assert after[1:] == before[1:]
    for path, value in before[0].items():
        assert np.array_equal(bits(after[0][path]), bits(value)), path
    assert getattr(model, "history", None) is None or not model.history.history


# Divergence: where the sweep stops, and no rule past it


def digits_mlp(optimizer):
    """A 64-64-10 MLP whose initial weights (Glorot uniform, zero biases) are
    drawn by NumPy: the same on every backend, whose own draws differ."""
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    rng = np.random.default_rng(0)
    weights = []
    for kernel, bias in zip(*[iter(model.get_weights())] * 2, strict=True):
        limit = math.sqrt(6 / sum(kernel.shape))
        weights += [rng.uniform(-limit, limit, kernel.shape), np.zeros_like(bias)]
    model.set_weights(weights)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


@pytest.mark.parametrize(
    "optimizer",
    [lambda: keras.optimizers.SGD(0.01, momentum=0.9), lambda: keras.optimizers.Adam()],
    ids=["sgd", "adam"],
)
def test_default_sweep_on_digits_stops_at_divergence_and_suggests_below(optimizer):
    x, y = digits()
    finder = find_lr(digits_mlp(optimizer()), x, y)
    # The whole sweep, 1e-7 to 10, from the same weights and order.
    whole = find_lr(digits_mlp(optimizer()), x, y, stop_on_divergence=False)
    assert len(whole.lrs) == 100
    stop = len(finder.lrs)
    assert 20 < stop < 100
    assert finder.lrs[-1] < 1.0
    assert finder.divergence_lr == finder.lrs[-1] == whole.divergence_lr
    np.testing.assert_allclose(finder.losses, whole.losses[:stop], rtol=1e-4)
    # Measured apart from the rule: the first rate after the lowest loss at
    # which the batch loss is worse than at the start (chance, about log 10).
    losses = np.array(whole.losses)
    lowest = int(np.argmin(losses))
    worse = lowest + int(np.argmax(losses[lowest:] > np.median(losses[:10])))
    assert losses[worse] > np.median(losses[:10]) > 2.0
    for sweep in (finder, whole):
        suggestions = sweep.suggestions()
        assert max(suggestions.values()) < min(whole.lrs[worse], finder.divergence_lr)
        assert min(suggestions.values()) > 1e-6


def test_rules_read_only_the_curve_before_the_divergence():
    """A fall at 1e-2, a divergence at 0.1 (the loss 30 times its lowest),
    then a steeper fall back to a chance level: the fall after the
    divergence is the steepest of the whole curve, and no rule may use it."""
    log_lrs = np.linspace(-6.0, 1.0, 106)
    loss = 2.0 - 1.8 / (1 + np.exp(-(log_lrs + 2.0) / 0.25))
    loss = np.where(log_lrs >= -1.0, 6.0 - 10.0 * (log_lrs + 1.0), loss)
    loss = np.maximum(loss, np.where(log_lrs >= -1.0, 2.3, 0.0))
    finder = LRFinder()
    finder.lrs = [float(10.0**x) for x in log_lrs]
    finder.losses = [float(v) for v in loss]
    first_high = int(np.argmax(log_lrs >= -1.0))
    assert finder.divergence_lr == finder.lrs[first_high + 1]
    whole = np.log10(finder.lrs)
    slopes = np.gradient(finder.curve(), whole)
    assert whole[np.argmin(slopes)] > -1.0  # unrestricted, steepest is past it
    suggestions = finder.suggestions()
    assert max(suggestions.values()) < finder.divergence_lr
    assert abs(math.log10(suggestions["steepest"]) + 2.0) < 0.15


def test_a_loss_that_never_changes_warns():
    finder = LRFinder()
    finder.lrs = [float(rate) for rate in np.geomspace(1e-7, 10, 100)]
    finder.losses = [1.0] * 100
    finder.smoothed_losses = [1.0] * 100
    with pytest.warns(UserWarning, match="The loss did not change") as record:
        finder.suggestions()
    assert len(record) == 1
    assert "within 0.1% of 1" in str(record[0].message)
    with pytest.warns(UserWarning, match="The loss did not change"):
        finder.suggestion("valley")
    # A loss that falls by 1% is read without a warning.
    finder.losses = [float(v) for v in np.linspace(1.0, 0.99, 100)]
    assert finder.suggestion("min_div_10") == pytest.approx(1.0)


class ReconstructionLoss(keras.layers.Layer):
    """Adds the mean squared difference of its two inputs as a loss."""

    def call(self, inputs):
        reconstruction, target = inputs
        self.add_loss(keras.ops.mean(keras.ops.square(reconstruction - target)))
        return reconstruction


def test_find_lr_without_targets_on_a_model_trained_by_add_loss():
    inputs = keras.Input((4,))
    reconstruction = keras.layers.Dense(4, kernel_initializer="zeros")(inputs)
    model = keras.Model(inputs, ReconstructionLoss()([reconstruction, inputs]))
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    x = np.random.default_rng(0).standard_normal((8 * BATCH, 4)).astype("float32")
    finder = find_lr(
        model, x, batch_size=BATCH, start_lr=1e-3, end_lr=1.0, num_steps=20
    )
    assert len(finder.lrs) == 20
    # From mean(x ** 2) with the zero kernel, down as the rate grows.
    assert finder.losses[0] == pytest.approx(float((x[:BATCH] ** 2).mean()), rel=0.5)
    assert min(finder.losses) < 0.5 * finder.losses[0]
    assert not to_numpy(model.layers[1].kernel).any()  # restored zeros


def test_suggestion_needs_five_points_before_the_divergence():
    finder = LRFinder()
    finder.lrs = [float(rate) for rate in np.geomspace(1e-3, 1.0, 10)]
    finder.losses = [2.0, 1.0, 1.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0]
    # The median of the last 3 is 9 > 4 * 1 at the fifth batch.
    assert finder.divergence_lr == finder.lrs[4]
    with pytest.raises(ValueError, match=r"diverged at lr 0\.0215, after 4 "):
        finder.suggestion()
    # One low loss among the 9s: a median of 3 is still 1 there.
    finder.losses[4] = 1.0
    assert finder.divergence_lr == finder.lrs[5]
    assert finder.suggestion("min_div_10") == finder.lrs[0] / 10
