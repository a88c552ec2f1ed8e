"""Training callbacks: `ScaleSchedule` changes gradient scales, `LRFinder` sweeps
the learning rate, and `find_lr` runs that sweep on a compiled model.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import keras
import numpy as np

from stopgrad_lr._layers import GradientReversal, GradientScale
from stopgrad_lr._ops import validate_scale
from stopgrad_lr._patterns import (
    Pattern,
    describe,
    iter_layers,
    matches,
    no_match_error,
    validate_pattern,
)
from stopgrad_lr._schedules import validate_count

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PERIODS = ("epoch", "batch")
ATTRIBUTES = ("scale", "strength")
SUGGESTION_METHODS = ("steepest", "min_div_10")
# `suggestion` needs this many recorded points: fewer say nothing about the
# shape of the loss curve.
MIN_POINTS = 5
# Arguments of `fit` that `find_lr` sets itself.
FIT_ARGUMENTS_SET_BY_FIND_LR = ("epochs", "steps_per_epoch", "initial_epoch")


def _to_float(value: Any) -> float:
    return float(keras.ops.convert_to_numpy(value))


def _schedule_name(schedule: Callable[..., Any]) -> str:
    # A function's qualified name reads better than its repr, which carries
    # a memory address.
    return getattr(schedule, "__qualname__", None) or repr(schedule)


class ScaleSchedule(keras.callbacks.Callback):
    """Sets the scale of `GradientScale` layers from a schedule during training.

    At the start of every epoch (`per="epoch"`) or every batch
    (`per="batch"`) it sets `layer.scale = schedule(t)` on each selected
    layer. For `per="epoch"`, `t` is the epoch index, which follows
    `initial_epoch`. For `per="batch"`, `t` is the optimizer's step count
    `model.optimizer.iterations`: it counts across epochs and across `fit`
    calls and is saved in checkpoints, like the step of a Keras
    learning-rate schedule. The scale is a variable, so a compiled model is
    not retraced.

    For a `GradientReversal` layer, either pass a schedule that returns the
    negative scale, or pass `attribute="strength"` and a schedule that
    returns the (positive) strength, such as a ramp built on
    `stopgrad_lr.dann_ramp`.

    The current value of each layer is written into the logs under the key
    `"<log_name>/<layer path>"` (for example `"scale/backbone_out"`, or
    `"scale/encoder/boundary"` for a layer in a nested model) at the end of
    every epoch and, for `per="batch"`, of every batch, so `History`,
    `CSVLogger` and `TensorBoard` record it. Keras passes the logs to the
    callbacks in list order: put this callback before the loggers.

    On the JAX backend, `fit` keeps the training state outside the model
    during an epoch; this callback reaches the layers through `self.model`,
    which syncs that state first. With `per="batch"` that sync happens every
    batch, which slows down training on JAX.

    Args:
        layers: Which layers to schedule: a glob string matched against the
            whole layer name or nested path (`"outer/inner"`), a compiled
            regex that must match the whole name, or a list of those. Only
            `GradientScale` layers (including `GradientReversal`) count, and
            every pattern must select at least one.
        schedule: A function of `t` (an int) that returns the value to set,
            a finite float.
        per: `"epoch"` (default) or `"batch"`: when the value is set and
            what `t` counts.
        attribute: `"scale"` (default) sets the scale; `"strength"` sets the
            strength of `GradientReversal` layers (the scale is then
            `-strength`) and requires every selected layer to be one.
        log_name: The prefix of the log keys. Defaults to `attribute`.

    Raises:
        ValueError: If an argument is invalid; when training starts, if a
            pattern selects no `GradientScale` layer (the message lists the
            closest names) or `attribute="strength"` selects a layer that is
            not a `GradientReversal`; during training, if `schedule` returns
            something that is not a finite number.

    Examples:
        >>> import keras
        >>> import numpy as np
        >>> import stopgrad_lr
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(8, name="backbone")(inputs)
        >>> hidden = stopgrad_lr.GradientScale(0.0, name="backbone_out")(hidden)
        >>> model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> unfreeze = stopgrad_lr.ScaleSchedule(
        ...     "backbone_out", stopgrad_lr.gradual_unfreeze(2))
        >>> history = model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=3,
        ...                     callbacks=[unfreeze], verbose=0)
        >>> tuple(history.history["scale/backbone_out"])
        (0.0, 0.0, 1.0)
    """

    def __init__(
        self,
        layers: Pattern | Sequence[Pattern],
        schedule: Callable[[int], float],
        *,
        per: str = "epoch",
        attribute: str = "scale",
        log_name: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(layers, str | re.Pattern):
            patterns: list[Any] = [layers]
        elif isinstance(layers, list | tuple):
            patterns = list(layers)
        else:
            patterns = []
        if not patterns:
            raise ValueError(
                "Invalid value received for argument `layers`. Expected a glob "
                "string, a compiled regex, or a non-empty list of those. "
                f"Received: layers={layers!r}"
            )
        self._patterns = [validate_pattern(p, argument="layers") for p in patterns]
        if not callable(schedule):
            raise ValueError(
                "Invalid value received for argument `schedule`. Expected a "
                "function of the epoch or step that returns a float. Received: "
                f"schedule={schedule!r}"
            )
        if per not in PERIODS:
            raise ValueError(
                f"Invalid value received for argument `per`. Expected one of "
                f"{PERIODS}. Received: per={per!r}"
            )
        if attribute not in ATTRIBUTES:
            raise ValueError(
                "Invalid value received for argument `attribute`. Expected one "
                f"of {ATTRIBUTES}. Received: attribute={attribute!r}"
            )
        if log_name is not None and not (isinstance(log_name, str) and log_name):
            raise ValueError(
                "Invalid value received for argument `log_name`. Expected a "
                f"non-empty string or None. Received: log_name={log_name!r}"
            )
        self.layers = layers
        self.schedule = schedule
        self.per = per
        self.attribute = attribute
        self.log_name = attribute if log_name is None else log_name
        # With per="epoch", `on_train_batch_end` does nothing, so Keras may
        # keep dispatching batch ends asynchronously (JAX, torch). With
        # per="batch" it must run in order with the next batch's begin.
        self.async_safe = per == "epoch"
        self._paths: list[str] = []
        self._current: dict[str, float] = {}

    def __repr__(self) -> str:
        return (
            f"ScaleSchedule(layers={self.layers!r}, "
            f"schedule={_schedule_name(self.schedule)}, per={self.per!r}, "
            f"attribute={self.attribute!r}, log_name={self.log_name!r})"
        )

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._paths = self._select(self.model)
        self._current = {}

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.per == "epoch":
            self._apply(epoch)

    def on_train_batch_begin(
        self, batch: int, logs: dict[str, Any] | None = None
    ) -> None:
        if self.per == "batch":
            self._apply(
                int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            )

    def on_train_batch_end(
        self, batch: int, logs: dict[str, Any] | None = None
    ) -> None:
        if self.per == "batch" and logs is not None:
            logs.update(self._current)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs.update(self._current)

    def _apply(self, time: int) -> None:
        value = validate_scale(self.schedule(time), argument=f"schedule({time})")
        # Looked up through `self.model` every time: on JAX that syncs the
        # training state into the variables, so the assignment is not lost.
        layers = dict(iter_layers(self.model))
        for path in self._paths:
            setattr(layers[path], self.attribute, value)
            # Read back: the log shows the float32 value the layer applies.
            key = f"{self.log_name}/{path}"
            self._current[key] = getattr(layers[path], self.attribute)

    def _select(self, model: keras.Model) -> list[str]:
        """The paths of the layers the patterns select, in model order."""
        all_layers = list(iter_layers(model))
        scale_paths = [p for p, layer in all_layers if isinstance(layer, GradientScale)]
        selected: list[str] = []
        for pattern in self._patterns:
            matched = [
                (path, layer)
                for path, layer in all_layers
                if matches(pattern, layer.name, path)
            ]
            paths = [p for p, layer in matched if isinstance(layer, GradientScale)]
            if not paths:
                raise ValueError(self._no_match_message(pattern, matched, scale_paths))
            selected += [path for path in paths if path not in selected]
        if self.attribute == "strength":
            layers = dict(all_layers)
            wrong = [p for p in selected if not isinstance(layers[p], GradientReversal)]
            if wrong:
                raise ValueError(
                    "ScaleSchedule(attribute='strength') sets the strength of "
                    f"GradientReversal layers, but {wrong} are GradientScale "
                    "layers without a strength. Use attribute='scale' with a "
                    "schedule that returns the scale (negative to reverse), or "
                    "select only GradientReversal layers."
                )
        return selected

    @staticmethod
    def _no_match_message(
        pattern: Pattern, matched: list[tuple[str, Any]], scale_paths: list[str]
    ) -> str:
        if not scale_paths:
            return (
                f"Pattern {describe(pattern)} selected nothing: the model has no "
                "GradientScale layer for ScaleSchedule to change. Put a "
                "GradientScale after the block whose learning rate you want to "
                "schedule."
            )
        if matched:
            return (
                f"Pattern {describe(pattern)} matched {[p for p, _ in matched]}, "
                "but none of them is a GradientScale layer (GradientReversal "
                "included), the only layers ScaleSchedule changes. The "
                f"GradientScale layers of the model are {scale_paths[:10]}."
            )
        return no_match_error(pattern, scale_paths, what="GradientScale layer")


def _validate_positive(value: Any, argument: str, allow_inf: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"Invalid value received for argument `{argument}`. Expected a "
            f"positive float. Received: {argument}={value!r} of type "
            f"{type(value).__name__}"
        )
    number = float(value)
    if not (number > 0 and (allow_inf or math.isfinite(number))):
        expected = "a float > 0" if allow_inf else "a finite float > 0"
        raise ValueError(
            f"Invalid value received for argument `{argument}`. Expected "
            f"{expected}. Received: {argument}={value!r}"
        )
    return number


class LRFinder(keras.callbacks.Callback):
    """Sweeps the learning rate exponentially and records the loss.

    The learning-rate range test (Smith, 2017, "Cyclical Learning Rates for
    Training Neural Networks"): batch `k` of the sweep trains with
    `start_lr * (end_lr / start_lr) ** (k / (num_steps - 1))`, set on
    `model.optimizer.learning_rate`, and its loss is recorded. Training
    stops after `num_steps` batches, when the smoothed loss exceeds
    `diverge_factor` times the lowest smoothed loss so far, or when the loss
    is NaN or infinite (that batch is not recorded). Give `fit` enough epochs
    for `num_steps` batches, or use `stopgrad_lr.find_lr`, which does.

    The smoothed loss is an exponential moving average with bias
    correction: `average = beta * average + (1 - beta) * loss` (starting
    from 0), and `smoothed = average / (1 - beta ** n)` after `n` batches.
    The divergence test assumes a positive loss.

    When training starts, the callback snapshots the model's weights
    (trainable and not) and all of the optimizer's variables, including its
    step count and learning rate (it builds the optimizer first if `fit` has
    not yet); when training ends it restores them exactly, so the sweep
    leaves the model as it found it. The model's metrics are reset before
    each batch, so the logs of a batch show that batch's loss rather than
    the running mean of the epoch.

    Only the base learning rate is swept: `GradientScale` layers keep their
    scales, so the blocks behind them sweep at their scaled rates.

    Args:
        start_lr: The first learning rate, a finite float > 0. Defaults to
            1e-7.
        end_lr: The last learning rate, a finite float > `start_lr`.
            Defaults to 10.0.
        num_steps: How many batches the sweep lasts, an integer >= 2.
            Defaults to 100.
        beta: The smoothing factor, a float in [0, 1); 0 disables
            smoothing. Defaults to 0.98.
        diverge_factor: Stop when the smoothed loss exceeds this many times
            its minimum, a float > 1; `float("inf")` stops only on NaN or
            infinite losses. Defaults to 4.0.

    Attributes:
        lrs: The learning rate of each recorded batch, as stored in the
            optimizer (float32 unless the float type is float64).
        losses: The loss of each recorded batch.
        smoothed_losses: The smoothed loss after each recorded batch.

    Raises:
        ValueError: If an argument is invalid; when training starts, if the
            model's optimizer has a learning-rate schedule instead of a
            float learning rate, or the model is not built.

    Examples:
        >>> import keras
        >>> import numpy as np
        >>> import stopgrad_lr
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> x = np.random.default_rng(0).standard_normal((64, 4))
        >>> finder = stopgrad_lr.LRFinder(1e-4, 0.1, num_steps=20)
        >>> history = model.fit(x, x.sum(axis=1), batch_size=8, epochs=3,
        ...                     callbacks=[finder], verbose=0)
        >>> len(finder.lrs), round(finder.lrs[0], 8), round(finder.lrs[-1], 6)
        (20, 0.0001, 0.1)
        >>> 1e-4 <= finder.suggestion() <= 0.1
        True
    """

    def __init__(
        self,
        start_lr: float = 1e-7,
        end_lr: float = 10.0,
        num_steps: int = 100,
        *,
        beta: float = 0.98,
        diverge_factor: float = 4.0,
    ) -> None:
        super().__init__()
        self.start_lr = _validate_positive(start_lr, "start_lr")
        self.end_lr = _validate_positive(end_lr, "end_lr")
        if not self.end_lr > self.start_lr:
            raise ValueError(
                "Invalid value received for argument `end_lr`. Expected a "
                f"learning rate greater than start_lr={start_lr!r}. Received: "
                f"end_lr={end_lr!r}"
            )
        self.num_steps = validate_count(num_steps, "num_steps", minimum=2)
        if isinstance(beta, bool) or not (
            isinstance(beta, numbers.Real) and 0.0 <= beta < 1.0
        ):
            raise ValueError(
                "Invalid value received for argument `beta`. Expected a float "
                f"in [0, 1). Received: beta={beta!r}"
            )
        self.beta: float = float(beta)
        factor = _validate_positive(diverge_factor, "diverge_factor", allow_inf=True)
        if not factor > 1.0:
            raise ValueError(
                "Invalid value received for argument `diverge_factor`. Expected "
                f"a float > 1. Received: diverge_factor={diverge_factor!r}"
            )
        self.diverge_factor: float = factor
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed_losses: list[float] = []
        self._step: int = 0
        self._average: float = 0.0
        self._best: float = math.inf
        self._batch_lr: float = math.nan
        self._saved: list[tuple[Any, np.ndarray]] | None = None

    def __repr__(self) -> str:
        return (
            f"LRFinder(start_lr={self.start_lr!r}, end_lr={self.end_lr!r}, "
            f"num_steps={self.num_steps!r}, beta={self.beta!r}, "
            f"diverge_factor={self.diverge_factor!r})"
        )

    def _learning_rate(self, step: int) -> float:
        ratio = self.end_lr / self.start_lr
        return self.start_lr * ratio ** (step / (self.num_steps - 1))

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        optimizer = model.optimizer
        if not isinstance(optimizer.learning_rate, keras.Variable):
            raise ValueError(
                "LRFinder sets the optimizer's learning rate every batch, so "
                "the optimizer needs a float learning rate, but its learning "
                "rate comes from a schedule or a callable (it reads as a "
                f"{type(optimizer.learning_rate).__name__}). "
                "Compile the model with a float learning rate for the sweep, "
                "for example keras.optimizers.SGD(learning_rate=0.01) (the "
                "value is overwritten by the sweep), and with the schedule "
                "again after it."
            )
        if not model.built:
            raise ValueError(
                "LRFinder must snapshot the model's weights before training, "
                "but the model is not built yet. Build it first: start it "
                "with keras.Input(shape), or call model.build(input_shape) or "
                "the model on a batch."
            )
        if not optimizer.built:
            # Build the optimizer now, as `fit` would at the first step, so
            # its slot variables exist in the snapshot and are restored too.
            optimizer.build(model.trainable_variables)
        self._saved = [
            (variable, np.array(keras.ops.convert_to_numpy(variable), copy=True))
            for variable in [*model.weights, *optimizer.variables]
        ]
        self.lrs, self.losses, self.smoothed_losses = [], [], []
        self._step, self._average, self._best = 0, 0.0, math.inf

    def on_train_batch_begin(
        self, batch: int, logs: dict[str, Any] | None = None
    ) -> None:
        model = self.model
        # Fresh metrics every batch: the logs at its end then hold this
        # batch's loss, not the running mean of the epoch.
        model.reset_metrics()
        model.optimizer.learning_rate = self._learning_rate(self._step)
        self._batch_lr = _to_float(model.optimizer.learning_rate)

    def on_train_batch_end(
        self, batch: int, logs: dict[str, Any] | None = None
    ) -> None:
        if not logs or "loss" not in logs:
            raise ValueError(
                "LRFinder needs the batch loss under 'loss' in the logs of "
                f"each batch, but received logs with keys {sorted(logs or {})}. "
                "A custom `train_step` must return the loss under 'loss'."
            )
        loss = float(logs["loss"])
        self._step += 1
        if not math.isfinite(loss):
            self.model.stop_training = True
            return
        self.lrs.append(self._batch_lr)
        self.losses.append(loss)
        self._average = self.beta * self._average + (1.0 - self.beta) * loss
        smoothed = self._average / (1.0 - self.beta ** len(self.losses))
        self.smoothed_losses.append(smoothed)
        self._best = min(self._best, smoothed)
        if smoothed > self.diverge_factor * self._best or self._step >= self.num_steps:
            self.model.stop_training = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._restore()

    def _restore(self) -> None:
        """Puts back the weights and optimizer state saved at the start, once."""
        if self._saved is None:
            return
        for variable, value in self._saved:
            variable.assign(value)
        self._saved = None

    def suggestion(self, method: str = "steepest") -> float:
        """A learning rate read off the recorded sweep.

        `"steepest"` returns the learning rate where the smoothed loss falls
        fastest: the first tenth of the points (at least one) is dropped,
        because the moving average there rests on few batches; then the
        slope of the smoothed loss with respect to `log10(lr)` is taken
        with `numpy.gradient` (central differences), and the learning rate
        of the most negative slope is returned. `"min_div_10"` returns the
        learning rate of the lowest smoothed loss divided by 10.

        Both read `lrs` and `smoothed_losses`, so they work on a sweep
        recorded earlier or assigned by hand.

        Args:
            method: `"steepest"` (default) or `"min_div_10"`.

        Returns:
            The suggested learning rate, a float.

        Raises:
            ValueError: If `method` is unknown or fewer than 5 points were
                recorded.
        """
        if method not in SUGGESTION_METHODS:
            raise ValueError(
                "Invalid value received for argument `method`. Expected one of "
                f"{SUGGESTION_METHODS}. Received: method={method!r}"
            )
        count = len(self.smoothed_losses)
        if count < MIN_POINTS:
            raise ValueError(
                f"Too few points to suggest a learning rate: {count} recorded, "
                f"at least {MIN_POINTS} needed. Run the sweep first (fit with "
                "this callback, or stopgrad_lr.find_lr) over more steps; if the "
                "loss diverged at once, lower start_lr."
            )
        lrs = np.asarray(self.lrs, dtype="float64")
        smoothed = np.asarray(self.smoothed_losses, dtype="float64")
        if method == "min_div_10":
            return float(lrs[np.argmin(smoothed)] / 10.0)
        skip = max(1, count // 10)
        slopes = np.gradient(smoothed[skip:], np.log10(lrs[skip:]))
        return float(lrs[skip + np.argmin(slopes)])

    def plot(self, ax: Axes | None = None, method: str | None = "steepest") -> Figure:
        """Plots the smoothed loss against the learning rate, on a log scale.

        Needs matplotlib, which is imported only here.

        Args:
            ax: The matplotlib axes to draw on. Defaults to new axes in a new
                figure (`matplotlib.pyplot.subplots()`).
            method: The suggestion to mark with a dashed vertical line, as in
                `suggestion`, or None for no mark. Defaults to `"steepest"`.

        Returns:
            The matplotlib `Figure` that holds the axes.

        Raises:
            ValueError: If `method` is set and `suggestion(method)` raises.
        """
        import matplotlib.pyplot as plt

        # Computed before drawing: a failing suggestion leaves no figure.
        suggested = None if method is None else self.suggestion(method)
        if ax is None:
            _, ax = plt.subplots()
        ax.plot(self.lrs, self.smoothed_losses, label="smoothed loss")
        if suggested is not None:
            ax.axvline(
                suggested,
                color="tab:red",
                linestyle="--",
                label=f"suggestion ({method}): {suggested:.2e}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.legend()
        # An Axes always belongs to a figure; the stubs allow None.
        return cast("Figure", ax.get_figure(root=True))


def _sample_count(x: Any) -> int | None:
    """The number of samples of array inputs; None for a dataset or generator."""
    shape = getattr(keras.tree.flatten(x)[0], "shape", None)
    return None if shape is None or len(shape) == 0 else int(shape[0])


def _batches_per_epoch(
    x: Any, batch_size: int, validation_split: float, steps_per_execution: int
) -> int | None:
    """How many times per epoch `fit` calls the batch callbacks, or None."""
    samples = _sample_count(x)
    if samples is not None:
        # `fit` holds out the last `validation_split` of the samples.
        batches = math.ceil(math.ceil(samples * (1.0 - validation_split)) / batch_size)
    else:
        try:
            batches = len(x)
        except TypeError:
            # A generator, or a dataset of infinite or unknown length.
            return None
    return max(1, math.ceil(batches / steps_per_execution))


def find_lr(
    model: keras.Model,
    x: Any,
    y: Any = None,
    *,
    batch_size: int = 32,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    **fit_kwargs: Any,
) -> LRFinder:
    """Runs a learning-rate sweep with `LRFinder` and returns the finder.

    It calls `model.fit` for as many epochs as `num_steps` batches need, with
    an `LRFinder` first among the callbacks, and leaves the model's weights
    and optimizer state as they were, even if training is interrupted. Only
    the base learning rate is swept: blocks behind `GradientScale` layers
    sweep at their scaled rates.

    Args:
        model: A compiled, built Keras model whose optimizer has a float
            learning rate.
        x: The inputs: arrays (or a dict or list of them), or a dataset such
            as a batched `tf.data.Dataset`, a `keras.utils.PyDataset` or a
            generator yielding `(x, y)` batches. A dataset with a length
            runs for as many epochs as needed; one without (a generator, a
            repeated dataset) runs one epoch of `num_steps` batches.
        y: The targets, for array inputs.
        batch_size: The batch size, for array inputs. Defaults to 32.
        start_lr: The first learning rate. Defaults to 1e-7.
        end_lr: The last learning rate. Defaults to 10.0.
        num_steps: How many batches the sweep lasts. Defaults to 100.
        **fit_kwargs: More arguments for `model.fit`, such as `callbacks` or
            `shuffle`; `verbose` defaults to 0. `epochs`,
            `steps_per_epoch` and `initial_epoch` are set by `find_lr`.

    Returns:
        The `LRFinder`, with `lrs`, `losses`, `smoothed_losses`,
        `suggestion()` and `plot()`.

    Raises:
        ValueError: If the model is not compiled, `fit_kwargs` holds an
            argument that `find_lr` sets, or an `LRFinder` argument is
            invalid; see also `LRFinder`.

    Examples:
        >>> import keras
        >>> import numpy as np
        >>> import stopgrad_lr
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(8, activation="relu")(inputs)
        >>> hidden = stopgrad_lr.GradientScale(0.1)(hidden)
        >>> model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
        >>> model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        >>> x = np.random.default_rng(0).standard_normal((256, 4))
        >>> finder = stopgrad_lr.find_lr(model, x, x.sum(axis=1), batch_size=16,
        ...                              start_lr=1e-4, end_lr=1.0, num_steps=40)
        >>> 1e-4 <= finder.suggestion() <= 1.0
        True
        >>> round(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)), 6)
        0.01
    """
    if getattr(model, "optimizer", None) is None:
        raise ValueError(
            "find_lr needs a compiled model: call model.compile(optimizer=..., "
            "loss=...) first, with a float learning rate (its value is swept)."
        )
    for name in FIT_ARGUMENTS_SET_BY_FIND_LR:
        if name in fit_kwargs:
            raise ValueError(
                f"find_lr sets `{name}` itself from num_steps. Received: "
                f"{name}={fit_kwargs[name]!r}. Set num_steps instead."
            )
    batch_size = validate_count(batch_size, "batch_size", minimum=1)
    finder = LRFinder(start_lr, end_lr, num_steps)
    batches = _batches_per_epoch(
        x,
        batch_size,
        fit_kwargs.get("validation_split", 0.0),
        int(getattr(model, "steps_per_execution", 1)),
    )
    if batches is None:
        # Keras cannot shuffle a generator and warns if asked to.
        fit_kwargs.setdefault("shuffle", False)
        fit_kwargs.update(epochs=1, steps_per_epoch=num_steps)
    else:
        fit_kwargs.update(epochs=math.ceil(num_steps / batches))
    if _sample_count(x) is not None:
        fit_kwargs["batch_size"] = batch_size
    fit_kwargs["callbacks"] = [finder, *(fit_kwargs.get("callbacks") or [])]
    fit_kwargs.setdefault("verbose", 0)
    try:
        model.fit(x, y, **fit_kwargs)
    finally:
        # `fit` skips `on_train_end` when it is interrupted.
        finder._restore()
    return finder
