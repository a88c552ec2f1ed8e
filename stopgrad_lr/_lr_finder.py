"""The learning-rate range test: `LRFinder` sweeps the learning rate during
`fit`, `find_lr` runs that sweep on a compiled model and puts it back.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import keras
import numpy as np

from stopgrad_lr._optimizer_kinds import unwrap
from stopgrad_lr._validation import (
    invalid,
    validate_choice,
    validate_count,
    validate_flag,
    validate_positive,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SUGGESTION_METHODS = ("valley", "steepest", "min_div_10", "fastai_valley")
MODES = ("exponential", "linear")
# `suggestion` needs this many recorded points: fewer say nothing about the
# shape of the loss curve.
MIN_POINTS = 5
# The divergence test reads the median of the last this many losses: one
# spike, up or down, does not move it, and it lags by one batch, where the
# moving average of `smoothed_losses` (beta 0.98) lags by about 50.
DIVERGENCE_WINDOW = 3
# The start of the sweep: its first this many losses.
START_WINDOW = 10
# A loss whose range over the sweep is at most this fraction of its mean
# did not change: the suggestions would be arbitrary.
FLAT_TOLERANCE = 1e-3
# Arguments of `fit` that `find_lr` sets itself.
FIT_ARGUMENTS_SET_BY_FIND_LR = ("epochs", "steps_per_epoch", "initial_epoch")
MARK_COLORS = {
    "valley": "tab:red",
    "steepest": "tab:green",
    "min_div_10": "tab:purple",
    "fastai_valley": "tab:orange",
}


def _to_float(value: Any) -> float:
    return float(keras.ops.convert_to_numpy(value))


def _sweep_rate(start: float, end: float, num_steps: int, mode: str, step: Any) -> Any:
    """Batch `step`'s learning rate; `step` may be a float or a tensor."""
    fraction = step / (num_steps - 1)
    if mode == "linear":
        return start + (end - start) * fraction
    return start * (end / start) ** fraction


class _SweepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The sweep as a function of the optimizer's own step count.

    Installed in place of an optimizer's learning-rate schedule during the
    sweep. A pure function of the step, so it works where a compiled train
    step sees only the optimizer's variables (JAX).
    """

    def __init__(self, finder: LRFinder, first_iteration: int, ratio: float) -> None:
        self.finder = finder
        self.first_iteration = first_iteration
        self.ratio = ratio

    def __call__(self, step: Any) -> Any:
        ops = keras.ops
        finder = self.finder
        batch = ops.clip(
            ops.cast(step, "float32") - float(self.first_iteration),
            0.0,
            float(finder.num_steps - 1),
        )
        rate = _sweep_rate(
            finder.start_lr, finder.end_lr, finder.num_steps, finder.mode, batch
        )
        return rate * self.ratio


def _rate_object(optimizer: Any) -> Any:
    # Keras has no public getter for the learning rate itself (the
    # `learning_rate` property evaluates a schedule), and the sweep must put
    # back the very object the optimizer had.
    return getattr(optimizer, "_learning_rate", None)


def _rate_groups(optimizer: Any) -> list[tuple[Any, float]]:
    """The optimizers that own a learning rate, each with its rate's ratio to
    the base rate: one optimizer with ratio 1, or the inner optimizers of a
    `MultiOptimizer` (possibly in a `LossScaleOptimizer`), whose base is the
    default optimizer (the group of multiplier 1 of `multi_optimizer`).

    Raises ValueError for a learning rate that is a plain function.
    """
    inner = unwrap(optimizer)
    multi_class = getattr(keras.optimizers, "MultiOptimizer", None)
    base: Any = inner
    groups = [inner]
    if multi_class is not None and isinstance(inner, multi_class):
        groups = list(inner.optimizers)
        optimizer_map = getattr(inner, "_optimizer_map", None)
        base = getattr(optimizer_map, "default_optimizer", None)
        if base not in groups:
            # Keras lists the default optimizer last.
            base = groups[-1]
    for group in groups:
        rate = _rate_object(group)
        if not isinstance(
            rate, keras.Variable | keras.optimizers.schedules.LearningRateSchedule
        ):
            raise ValueError(
                "The learning-rate finder sets the optimizer's learning rate "
                "during the sweep and puts it back afterwards, so the "
                "optimizer needs a float learning rate or a "
                "keras.optimizers.schedules.LearningRateSchedule, but "
                f"{group.name}'s learning rate is a plain function "
                f"({rate!r}). Compile the model with a float learning rate "
                "for the sweep, for example "
                "keras.optimizers.SGD(learning_rate=0.01) (the value is "
                "overwritten by the sweep), or wrap the function in a "
                "LearningRateSchedule."
            )
    base_value = _to_float(base.learning_rate)
    ratios = []
    for group in groups:
        if group is base:
            ratios.append(1.0)
        elif base_value > 0 and math.isfinite(base_value):
            ratios.append(_to_float(group.learning_rate) / base_value)
        else:
            # A schedule at 0 (a warmup at step 0): the factor of a
            # `MultipliedSchedule` still gives the ratio.
            ratios.append(float(getattr(_rate_object(group), "factor", 1.0)))
    return list(zip(groups, ratios, strict=True))


class LRFinder(keras.callbacks.Callback):
    """Sweeps the learning rate during `fit` and records the loss.

    The learning-rate range test (Smith, 2017, "Cyclical Learning Rates for
    Training Neural Networks"): batch `k` of the sweep trains with
    `start_lr * (end_lr / start_lr) ** (k / (num_steps - 1))`
    (`mode="exponential"`) or `start_lr + (end_lr - start_lr) * k /
    (num_steps - 1)` (`mode="linear"`), and its loss is recorded: the
    training loss of that batch, or with `validation_data` the loss on that
    held-out data after the batch's update. Training stops after
    `num_steps` batches, when the loss diverges, or when the loss is NaN or
    infinite (that batch is not recorded). Give `fit` enough epochs for
    `num_steps` batches, or use `stopgrad_lr.find_lr`, which does.

    The loss diverges at the first batch where the median of the last 3
    recorded losses exceeds `diverge_factor` times the lowest such median
    so far (fastai's test, 4 times the best, on a statistic that does not
    lag: one spike up or down does not move a median of 3, and it trails
    the sweep by one batch, where the moving average of `smoothed_losses`
    trails it by about 50 batches and may never reach 4 times its own
    lagged minimum), or where that median, after falling below the lowest
    of the first 10 losses by more than their range (a fall, not noise),
    climbs above the highest of them: worse than at the start (a
    cross-entropy that halves before it diverges never reaches 4 times its
    minimum). `divergence_lr` is that batch's rate (or the rate of a
    NaN or infinite loss), and the suggestion rules read only the batches
    before it. `stop_on_divergence=False` records the whole sweep anyway;
    `diverge_factor=float("inf")` turns the test off. The test assumes a
    positive loss.

    The smoothed loss is an exponential moving average with bias
    correction: `average = beta * average + (1 - beta) * loss` (starting
    from 0), and `smoothed = average / (1 - beta ** n)` after `n` batches.

    When training starts, the callback snapshots the model's variables
    (weights, BatchNormalization statistics, random seeds; on torch also
    the global generator that unseeded dropout draws from), its metrics'
    state and all of the optimizer's variables, including its step count
    and learning rate (it builds the optimizer first if `fit` has not yet);
    when training ends it restores them exactly, and puts back a
    learning-rate schedule it replaced, so the sweep leaves the model as it
    found it. The model's metrics are reset before each batch, so the logs
    of a batch show that batch's loss rather than the running mean of the
    epoch.

    Only the base learning rate is swept: `GradientScale` layers keep their
    scales, so the blocks behind them sweep at their scaled rates. With a
    `keras.optimizers.MultiOptimizer` (such as `stopgrad_lr.multi_optimizer`
    builds, also inside a `LossScaleOptimizer`), the swept rate is the
    default optimizer's, and every other group gets the same multiple of
    it as before the sweep. A learning-rate schedule is replaced by the
    sweep for its duration (the train step is retraced then, and again
    after).

    Args:
        start_lr: The first learning rate, a finite float > 0. Defaults to
            1e-7.
        end_lr: The last learning rate, a finite float > `start_lr`.
            Defaults to 10.0.
        num_steps: How many batches the sweep lasts, an integer >= 2.
            Defaults to 100.
        beta: The smoothing factor of `smoothed_losses`, a float in [0, 1);
            0 disables smoothing. Defaults to 0.98.
        diverge_factor: The loss diverges when the median of its last 3
            values exceeds this many times the lowest such median so far, a
            float > 1; `float("inf")` never (only NaN or infinite losses
            stop the sweep then). Defaults to 4.0.
        stop_on_divergence: Whether to stop the sweep where the loss
            diverges. False records all `num_steps` batches (short of a NaN
            or infinite loss); the rules still read only the batches before
            the divergence. Defaults to True.
        mode: `"exponential"` (default), equal ratios between steps, or
            `"linear"`, equal differences.
        validation_data: None (default) to record each training batch's
            loss, or held-out data to evaluate after every batch instead
            (less noisy, one `model.evaluate` per step): `(x, y)` or `(x, y,
            sample_weight)` arrays, evaluated in batches of 32, or a finite
            dataset.

    Attributes:
        lrs: The (base) learning rate of each recorded batch, as the
            optimizer applied it (float32 unless the float type is float64).
        losses: The loss of each recorded batch: its training loss, or the
            validation loss after it.
        smoothed_losses: The smoothed loss after each recorded batch.
        divergence_lr: The (base) learning rate at which the loss diverged,
            or None if it did not (see above).

    Raises:
        ValueError: If an argument is invalid; when training starts, if a
            learning rate of the optimizer is a plain function, or the
            model is not built.

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
        stop_on_divergence: bool = True,
        mode: str = "exponential",
        validation_data: Any = None,
    ) -> None:
        super().__init__()
        self.start_lr = validate_positive(start_lr, "start_lr")
        self.end_lr = validate_positive(end_lr, "end_lr")
        if not self.end_lr > self.start_lr:
            raise invalid(
                "end_lr",
                f"a learning rate greater than start_lr={start_lr!r}",
                end_lr,
            )
        self.num_steps = validate_count(num_steps, "num_steps", minimum=2)
        if isinstance(beta, bool) or not (
            isinstance(beta, numbers.Real) and 0.0 <= beta < 1.0
        ):
            raise invalid("beta", "a float in [0, 1)", beta)
        self.beta: float = float(beta)
        factor = validate_positive(diverge_factor, "diverge_factor", allow_inf=True)
        if not factor > 1.0:
            raise invalid("diverge_factor", "a float > 1", diverge_factor)
        self.diverge_factor: float = factor
        self.stop_on_divergence: bool = validate_flag(
            stop_on_divergence, "stop_on_divergence"
        )
        validate_choice(mode, "mode", MODES)
        self.mode: str = mode
        if (
            isinstance(validation_data, list | tuple)
            and not 2 <= len(validation_data) <= 3
        ):
            raise ValueError(
                "Invalid value received for argument `validation_data`. "
                "Expected (x, y), (x, y, sample_weight) or a dataset. "
                f"Received: a {type(validation_data).__name__} of "
                f"{len(validation_data)} items"
            )
        self.validation_data: Any = validation_data
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed_losses: list[float] = []
        self._step: int = 0
        self._average: float = 0.0
        self._best: float = math.inf
        self._batch_lr: float = math.nan
        self._non_finite_lr: float | None = None
        self._saved: list[tuple[Any, np.ndarray]] | None = None
        self._groups: list[tuple[Any, float]] = []
        self._schedules: list[tuple[Any, Any]] = []
        self._torch_rng: Any = None

    def __repr__(self) -> str:
        return (
            f"LRFinder(start_lr={self.start_lr!r}, end_lr={self.end_lr!r}, "
            f"num_steps={self.num_steps!r}, beta={self.beta!r}, "
            f"diverge_factor={self.diverge_factor!r}, "
            f"stop_on_divergence={self.stop_on_divergence!r}, mode={self.mode!r})"
        )

    def _learning_rate(self, step: int) -> float:
        return float(
            _sweep_rate(self.start_lr, self.end_lr, self.num_steps, self.mode, step)
        )

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        optimizer = model.optimizer
        groups = _rate_groups(optimizer)
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
        variables: dict[int, Any] = {}
        for variable in [
            *model.variables,
            *model.metrics_variables,
            *optimizer.variables,
        ]:
            variables.setdefault(id(variable), variable)
        self._saved = [
            (variable, np.array(keras.ops.convert_to_numpy(variable), copy=True))
            for variable in variables.values()
        ]
        self._torch_rng = None
        if keras.backend.backend() == "torch":
            # An unseeded Dropout on torch draws from torch's global
            # generator, not from a Keras seed variable.
            import torch

            self._torch_rng = torch.get_rng_state()
        self._groups = groups
        self._schedules = []
        for group, ratio in groups:
            rate = _rate_object(group)
            if not isinstance(rate, keras.Variable):
                self._schedules.append((group, rate))
                group.learning_rate = _SweepSchedule(
                    self, int(_to_float(group.iterations)), ratio
                )
        if self._schedules:
            # The compiled train step read the old schedule when it was traced.
            model.make_train_function(force=True)
        self.lrs, self.losses, self.smoothed_losses = [], [], []
        self._step, self._average, self._best = 0, 0.0, math.inf
        self._non_finite_lr = None

    def on_train_batch_begin(
        self, batch: int, logs: dict[str, Any] | None = None
    ) -> None:
        model = self.model
        # Fresh metrics every batch: the logs at its end then hold this
        # batch's loss, not the running mean of the epoch.
        model.reset_metrics()
        rate = self._learning_rate(self._step)
        recorded = None
        for group, ratio in self._groups:
            if isinstance(_rate_object(group), keras.Variable):
                group.learning_rate = rate * ratio
                if ratio == 1.0:
                    recorded = _to_float(group.learning_rate)
        # What the optimizer applies: float32, unless it has float64 rates.
        self._batch_lr = float(np.float32(rate)) if recorded is None else recorded

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
        if self.validation_data is not None and math.isfinite(loss):
            loss = self._validation_loss()
        self._step += 1
        if not math.isfinite(loss):
            self._non_finite_lr = self._batch_lr
            self.model.stop_training = True
            return
        self.lrs.append(self._batch_lr)
        self.losses.append(loss)
        self._average = self.beta * self._average + (1.0 - self.beta) * loss
        smoothed = self._average / (1.0 - self.beta ** len(self.losses))
        self.smoothed_losses.append(smoothed)
        diverged = False
        if len(self.losses) >= DIVERGENCE_WINDOW:
            # The same test as `_divergence_index`, one batch at a time.
            recent = float(np.median(self.losses[-DIVERGENCE_WINDOW:]))
            self._best = min(self._best, recent)
            diverged = _diverged(
                recent, self._best, self.losses[:START_WINDOW], self.diverge_factor
            )
        if (diverged and self.stop_on_divergence) or self._step >= self.num_steps:
            self.model.stop_training = True

    def _validation_loss(self) -> float:
        data = self.validation_data
        if isinstance(data, list | tuple):
            x, y, *weights = data
            logs = self.model.evaluate(
                x,
                y,
                sample_weight=weights[0] if weights else None,
                verbose=0,
                return_dict=True,
            )
        else:
            logs = self.model.evaluate(data, verbose=0, return_dict=True)
        return float(logs["loss"])

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._restore()

    def _restore(self) -> None:
        """Puts back the variables and schedules saved at the start, once."""
        if self._saved is None:
            return
        for variable, value in self._saved:
            variable.assign(value)
        self._saved = None
        if self._torch_rng is not None:
            import torch

            torch.set_rng_state(self._torch_rng)
            self._torch_rng = None
        for group, schedule in self._schedules:
            group.learning_rate = schedule
        if self._schedules:
            self._schedules = []
            self.model.make_train_function(force=True)

    def _raw(self) -> list[float]:
        """What the curve and the divergence test read: the recorded
        `losses`, or `smoothed_losses` for a sweep assigned by hand without
        them. Raises ValueError when fewer than 5 points were recorded."""
        count = len(self.lrs)
        raw = self.losses if len(self.losses) == count else self.smoothed_losses
        if count < MIN_POINTS or len(raw) != count:
            raise ValueError(
                f"Too few points to suggest a learning rate: {len(raw)} recorded, "
                f"at least {MIN_POINTS} needed. Run the sweep first (fit with "
                "this callback, or stopgrad_lr.find_lr) over more steps; if the "
                "loss diverged at once, lower start_lr."
            )
        return raw

    def curve(self) -> np.ndarray:
        """The loss curve the suggestion rules read, one value per rate.

        The recorded `losses` under a centred running median of
        `2 * max(2, n // 25) + 1` points (fewer at the ends), taken apart
        before and from `divergence_lr`, so that no point of the curve
        before the divergence reads a diverged batch (the rules read only
        those points). Unlike the moving average of `smoothed_losses`, it
        does not lag behind the sweep: with the default `beta=0.98` the
        average rests on about the last 50 batches, half of a 100-step
        sweep, so its fall comes late and drawn out. The median also shrugs
        off single spikes. A sweep that has `smoothed_losses` but no
        `losses` (assigned by hand) is read as it is.

        Returns:
            A float64 NumPy array, as long as `lrs`.

        Raises:
            ValueError: If fewer than 5 points were recorded.
        """
        raw = self._raw()
        values = np.asarray(raw, dtype="float64")
        if raw is self.smoothed_losses:
            return values
        end = self._divergence_index(raw)
        half = max(2, len(values) // 25)
        return np.concatenate(
            [_running_median(part, half) for part in np.split(values, [end or 0])]
        )

    def _divergence_index(self, raw: Sequence[float]) -> int | None:
        """The index of the recorded batch at which the loss diverged."""
        return _divergence_index(np.asarray(raw, dtype="float64"), self.diverge_factor)

    def _end(self) -> int:
        """How many recorded batches precede the divergence."""
        index = self._divergence_index(self._raw())
        return len(self.lrs) if index is None else index

    @property
    def divergence_lr(self) -> float | None:
        """The learning rate at which the loss diverged, or None.

        The rate of the first recorded batch at which the loss diverged by
        the test of `LRFinder` (read from `losses`, or `smoothed_losses` for
        a sweep assigned by hand), else the rate of a batch whose loss was
        NaN or infinite (which stopped the sweep unrecorded), else None.
        """
        count = len(self.lrs)
        raw = self.losses if len(self.losses) == count else self.smoothed_losses
        index = self._divergence_index(raw) if len(raw) == count else None
        return self.lrs[index] if index is not None else self._non_finite_lr

    def _points(self) -> tuple[np.ndarray, np.ndarray]:
        """The rates and the curve the rules read: those before the
        divergence. Warns when the loss did not change."""
        curve = self.curve()
        end = self._end()
        if end < MIN_POINTS:
            raise ValueError(
                f"Too few points to suggest a learning rate: the loss diverged "
                f"at lr {self.lrs[end]:.3g}, after {end} recorded batches, and at "
                f"least {MIN_POINTS} are needed before it. Lower start_lr, or "
                "raise num_steps for more batches per decade."
            )
        values = np.asarray(self._raw()[:end], dtype="float64")
        mean = float(np.mean(values))
        if float(np.ptp(values)) <= FLAT_TOLERANCE * abs(mean):
            warnings.warn(
                f"The loss did not change during the sweep: all {end} recorded "
                f"losses from lr {self.lrs[0]:.3g} to {self.lrs[end - 1]:.3g} lie "
                f"within {FLAT_TOLERANCE:.1%} of {mean:.6g}, so any suggested "
                "learning rate is arbitrary. Check that the loss depends on the "
                "trainable weights (not all frozen, a loss that is not constant) "
                "and that end_lr is high enough to move them.",
                UserWarning,
                stacklevel=3,
            )
        return np.asarray(self.lrs[:end], dtype="float64"), curve[:end]

    def _kept(self, end: int) -> slice:
        """The points, of the first `end`, that the valley and steepest
        rules read: the first tenth of the sweep is dropped (the moving
        average there rests on few batches), and the last twentieth of the
        `end` points (the start of the divergence, which the test sees a
        batch late). All `end` points if that leaves fewer than 3."""
        kept = slice(max(1, len(self.lrs) // 10), end - max(1, end // 20))
        return kept if kept.stop - kept.start >= 3 else slice(0, end)

    def suggestion(self, method: str = "valley") -> float:
        """A learning rate read off the recorded sweep.

        The rules, which read `lrs` and `curve()` up to the batch before
        `divergence_lr` (so that no rule suggests a rate at which the loss
        diverged), and also work on a sweep recorded earlier or assigned by
        hand:

        - `"valley"` (default): the last rate, before the minimum of the
          loss curve, at which the curve is still above the level halfway
          down (on a log scale) from its top to that minimum,
          `sqrt(top * minimum)`. Use it first: noise far smaller than the
          fall cannot move a level crossing much.
        - `"steepest"`: the rate of the most negative slope of the loss
          curve against `log10(lr)`, each slope a least-squares fit over a
          window of `2 * max(1, n // 20) + 1` points. Use it on a clean
          curve with one clear drop; it sits at the fastest fall.
        - `"min_div_10"`: the rate of the lowest loss of the curve, divided by
          10. Conservative; use it when the loss falls until it diverges.
        - `"fastai_valley"`: fastai's valley as published, halfway through
          the longest strictly decreasing subsequence of the loss curve.
          For comparison: noise on a long plateau lengthens that
          subsequence to the left, so it can land on the plateau.

        All but `"min_div_10"` ignore the first tenth of the sweep and the
        last twentieth of the points before the divergence (at least one
        point each).

        Args:
            method: `"valley"` (default), `"steepest"`, `"min_div_10"` or
                `"fastai_valley"`.

        Returns:
            The suggested learning rate, a float.

        Raises:
            ValueError: If `method` is unknown, or fewer than 5 points were
                recorded before the divergence.

        Warns:
            UserWarning: If the loss did not change during the sweep (its
                range within 0.1% of its mean): the suggestion is arbitrary.
        """
        validate_choice(method, "method", SUGGESTION_METHODS)
        return self._suggest(method, *self._points())

    def _suggest(self, method: str, lrs: np.ndarray, curve: np.ndarray) -> float:
        if method == "min_div_10":
            return float(lrs[np.argmin(curve)] / 10.0)
        kept = self._kept(len(curve))
        lrs, curve = lrs[kept], curve[kept]
        if method == "valley":
            return float(lrs[_valley_index(curve)])
        if method == "fastai_valley":
            return float(lrs[_longest_descent_index(curve)])
        window = max(1, len(self.lrs) // 20)
        slopes = _window_slopes(np.log10(lrs), curve, window)
        return float(lrs[np.argmin(slopes)])

    def suggestions(self) -> dict[str, float]:
        """Every rule's suggestion, by name (see `suggestion`).

        Returns:
            A dict from each rule's name (`"valley"`, `"steepest"`,
            `"min_div_10"`, `"fastai_valley"`) to the learning rate it
            suggests.

        Raises:
            ValueError: If fewer than 5 points were recorded before the
                divergence.

        Warns:
            UserWarning: If the loss did not change during the sweep.
        """
        points = self._points()
        return {method: self._suggest(method, *points) for method in SUGGESTION_METHODS}

    def plot(
        self,
        ax: Axes | None = None,
        method: str | Sequence[str] | None = SUGGESTION_METHODS,
    ) -> Figure:
        """Plots the loss against the learning rate, on a log scale.

        It draws the curve the rules read (`curve()`), over the recorded
        batch losses in a lighter line when there are any. The loss axis
        spans the curve before `divergence_lr` (the useful region, which
        the spikes of a diverging loss would flatten into a line), and a
        dotted line marks `divergence_lr`.

        Needs matplotlib, which is imported only here.

        Args:
            ax: The matplotlib axes to draw on. Defaults to new axes in a new
                figure (`matplotlib.pyplot.subplots()`).
            method: The suggestions to mark, each with a dashed vertical
                line: a rule name as in `suggestion`, a sequence of them, or
                None for no mark. Defaults to every rule.

        Returns:
            The matplotlib `Figure` that holds the axes.

        Raises:
            ValueError: If a marked `suggestion(method)` raises.

        Warns:
            UserWarning: If a rule is marked and the loss did not change
                during the sweep.
        """
        import matplotlib.pyplot as plt

        methods = (
            [] if method is None else [method] if isinstance(method, str) else method
        )
        for name in methods:
            validate_choice(name, "method", SUGGESTION_METHODS)
        # Computed before drawing: a failing suggestion leaves no figure.
        suggested: dict[str, float] = {}
        if methods:
            points = self._points()
            suggested = {name: self._suggest(name, *points) for name in methods}
        if ax is None:
            _, ax = plt.subplots()
        curve = self.curve() if len(self.lrs) >= MIN_POINTS else self.smoothed_losses
        end = self._end() if len(self.lrs) >= MIN_POINTS else len(curve)
        if len(self.losses) == len(self.lrs) and self.losses:
            ax.plot(self.lrs, curve, label="loss, running median")
            ax.plot(self.lrs, self.losses, color="tab:blue", alpha=0.3, label="loss")
        else:
            ax.plot(self.lrs, curve, label="smoothed loss")
        for name, rate in suggested.items():
            ax.axvline(
                rate,
                color=MARK_COLORS[name],
                linestyle="--",
                label=f"{name}: {rate:.2e}",
            )
        divergence = self.divergence_lr
        if divergence is not None:
            ax.axvline(
                divergence,
                color="black",
                linestyle=":",
                label=f"diverged: {divergence:.2e}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        useful = np.asarray(curve[:end], dtype="float64")
        useful = useful[np.isfinite(useful)]
        if len(useful) >= 2 and useful.max() > useful.min():
            # The spikes of a diverging loss would flatten the rest.
            margin = 0.1 * (useful.max() - useful.min())
            ax.set_ylim(useful.min() - margin, useful.max() + margin)
        ax.legend()
        # An Axes always belongs to a figure; the stubs allow None.
        return cast("Figure", ax.get_figure(root=True))


def _running_median(values: np.ndarray, half: int) -> np.ndarray:
    """`values` under a centred running median of `2 * half + 1` points
    (fewer at the ends)."""
    return np.array(
        [np.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]
    )


def _diverged(
    recent: float, best: float, start: Sequence[float], factor: float
) -> bool:
    """The divergence test (see `LRFinder`): `recent` is the median of the
    last losses, `best` its lowest value so far, `start` the first losses."""
    if math.isinf(factor):
        return False
    if recent > factor * best:
        return True
    if len(start) < START_WINDOW:
        return False
    # Back above every loss of the start after a fall below all of them by
    # more than their spread, which noise on a plateau does not make.
    low, high = min(start), max(start)
    return best < low - (high - low) and recent > high


def _divergence_index(values: np.ndarray, factor: float) -> int | None:
    """The first index at which the loss diverged, or None: `_diverged`
    batch by batch, as `LRFinder` tests it during the sweep."""
    best = math.inf
    start = [float(value) for value in values[:START_WINDOW]]
    for end in range(DIVERGENCE_WINDOW, len(values) + 1):
        recent = float(np.median(values[end - DIVERGENCE_WINDOW : end]))
        best = min(best, recent)
        if _diverged(recent, best, start[:end], factor):
            return end - 1
    return None


def _valley_index(values: np.ndarray) -> int:
    """The last index before the minimum of `values` where they are still
    above the level halfway down from their top (before the minimum) to the
    minimum, on a log scale: `sqrt(top * minimum)` for a positive loss."""
    bottom = int(np.argmin(values))
    top, low = values[: bottom + 1].max(), values[bottom]
    level = math.sqrt(top * low) if low > 0 else (top + low) / 2
    return int(np.flatnonzero(values[: bottom + 1] >= level)[-1])


def _longest_descent_index(values: np.ndarray) -> int:
    """The index halfway through the longest strictly decreasing
    subsequence of `values` (the first such subsequence to reach that
    length, and of those the one that starts first)."""
    count = len(values)
    length = np.ones(count, dtype=int)
    start = np.arange(count)
    for i in range(1, count):
        higher = np.flatnonzero(values[:i] > values[i])
        if len(higher):
            best = length[higher].max()
            length[i] = best + 1
            start[i] = start[higher[length[higher] == best]].min()
    end = int(np.argmax(length))
    return int(start[end] + (end - start[end]) // 2)


def _window_slopes(x: np.ndarray, y: np.ndarray, window: int) -> np.ndarray:
    """The least-squares slope of `y` against `x` over the points within
    `window` of each point (fewer at the ends)."""
    slopes = np.empty(len(x))
    for i in range(len(x)):
        part = slice(max(0, i - window), i + window + 1)
        xs, ys = x[part], y[part]
        centred = xs - xs.mean()
        slopes[i] = (centred * (ys - ys.mean())).sum() / (centred**2).sum()
    return slopes


def _sample_count(x: Any) -> int | None:
    """The number of samples of array inputs; None for a dataset or generator."""
    flat = keras.tree.flatten(x)
    shape = getattr(flat[0], "shape", None) if flat else None
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


def _check_samples(x: Any, batch_size: int, validation_split: float) -> None:
    """Refuses data with no batch, or with less than one full batch."""
    samples = _sample_count(x)
    if samples is None:
        try:
            batches = len(x)
        except TypeError:
            return
        if batches == 0:
            raise ValueError(
                "Invalid value received for argument `x`. Expected a dataset "
                "with at least one batch. Received: a dataset of 0 batches"
            )
        return
    training = math.ceil(samples * (1.0 - validation_split))
    if training == 0:
        raise ValueError(
            "Invalid value received for argument `x`. Expected at least one "
            f"sample to train on. Received: x with {samples} samples"
            + (f" and validation_split={validation_split}" if samples else "")
        )
    if training < batch_size:
        raise ValueError(
            "Invalid value received for argument `x`. Expected at least "
            f"batch_size={batch_size} samples to train on, so that every step "
            f"of the sweep sees a full batch. Received: {training} samples. "
            "Lower batch_size or pass more data."
        )


def find_lr(
    model: keras.Model,
    x: Any,
    y: Any = None,
    *,
    batch_size: int = 32,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    mode: str = "exponential",
    beta: float = 0.98,
    diverge_factor: float = 4.0,
    stop_on_divergence: bool = True,
    validation_data: Any = None,
    seed: int = 0,
    **fit_kwargs: Any,
) -> LRFinder:
    """Runs a learning-rate sweep with `LRFinder` and returns the finder.

    It calls `model.fit` for as many epochs as `num_steps` batches need (a
    sweep longer than the data repeats it), with an `LRFinder` first among
    the callbacks, and leaves the model as it was, even if training is
    interrupted: weights, BatchNormalization statistics, random seeds,
    metric state, the optimizer's variables (slots, step count, learning
    rate) and its learning-rate schedule, so a `fit` afterwards gives
    bit-identical weights to the same `fit` without the sweep. Array inputs
    are shuffled (unless `shuffle=False`) by a generator of its own, seeded
    by `seed`, so the sweep draws nothing from the global random state
    either. (On JAX and torch the order in which `fit` itself shuffles
    arrays depends on the fits that ran before, even unshuffled ones, so
    there the guarantee covers a later `fit` with `shuffle=False` or
    pre-shuffled data.) Only the base learning rate is swept: blocks behind
    `GradientScale` layers sweep at their scaled rates, and the groups of a
    `MultiOptimizer` (`stopgrad_lr.multi_optimizer`) keep their ratios to
    the base rate. Every argument is checked before the model is touched.

    Args:
        model: A compiled Keras model whose optimizer (or each inner
            optimizer of a `MultiOptimizer`) has a float learning rate or a
            `LearningRateSchedule`.
        x: The inputs: arrays (or a dict or list of them), or a dataset such
            as a batched `tf.data.Dataset`, a `keras.utils.PyDataset` or a
            generator yielding `(x, y)` batches. A dataset with a length
            runs for as many epochs as needed; one without (a generator, a
            repeated dataset) runs one epoch of `num_steps` batches.
        y: The targets, for array inputs; None (default) for a model that
            needs none, such as one trained by `add_loss`.
        batch_size: The batch size, for array inputs. Defaults to 32.
        start_lr: The first learning rate. Defaults to 1e-7.
        end_lr: The last learning rate. Defaults to 10.0.
        num_steps: How many batches the sweep lasts. Defaults to 100.
        mode: `"exponential"` (default) or `"linear"` sweep.
        beta: The smoothing factor of the loss. Defaults to 0.98.
        diverge_factor: The loss diverges when the median of its last 3
            values exceeds this many times the lowest such median so far, as
            in `LRFinder`; `float("inf")` never. Defaults to 4.0.
        stop_on_divergence: Whether the sweep stops where the loss
            diverges (the suggestions read only the batches before it
            either way). Defaults to True.
        validation_data: Held-out data whose loss is recorded after every
            step instead of the training batch's, as in `LRFinder`.
            Defaults to None.
        seed: The seed of the shuffling of array inputs. Defaults to 0.
        **fit_kwargs: More arguments for `model.fit`, such as `callbacks` or
            `shuffle`; `verbose` defaults to 0. `epochs`,
            `steps_per_epoch` and `initial_epoch` are set by `find_lr`.

    Returns:
        The `LRFinder`, with `lrs`, `losses`, `smoothed_losses`,
        `suggestion()`, `suggestions()` and `plot()`.

    Raises:
        ValueError: If the model is not compiled; a learning rate is a plain
            function; the data holds no sample, or fewer than `batch_size`;
            `fit_kwargs` holds an argument that `find_lr` sets; or an
            `LRFinder` argument is invalid (`start_lr >= end_lr`,
            `num_steps < 2`...). The model is untouched then.

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
        >>> sorted(finder.suggestions())
        ['fastai_valley', 'min_div_10', 'steepest', 'valley']
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
    seed = validate_count(seed, "seed", minimum=0)
    finder = LRFinder(
        start_lr,
        end_lr,
        num_steps,
        beta=beta,
        diverge_factor=diverge_factor,
        stop_on_divergence=stop_on_divergence,
        mode=mode,
        validation_data=validation_data,
    )
    _rate_groups(model.optimizer)
    validation_split = fit_kwargs.get("validation_split", 0.0)
    _check_samples(x, batch_size, validation_split)
    batches = _batches_per_epoch(
        x, batch_size, validation_split, int(getattr(model, "steps_per_execution", 1))
    )
    if batches is None:
        # Keras cannot shuffle a generator and warns if asked to.
        fit_kwargs.setdefault("shuffle", False)
        fit_kwargs.update(epochs=1, steps_per_epoch=num_steps)
    else:
        fit_kwargs.update(epochs=math.ceil(num_steps / batches))
    samples = _sample_count(x)
    if samples is not None:
        fit_kwargs["batch_size"] = batch_size
        if fit_kwargs.get("shuffle", True):
            # Shuffled here, once, by a generator of our own: `fit` would
            # draw from the global random state, and a later `fit` would
            # then see another order than without the sweep.
            order = np.random.default_rng(seed).permutation(samples)

            def shuffled(arrays: Any) -> Any:
                return keras.tree.map_structure(lambda a: np.asarray(a)[order], arrays)

            x = shuffled(x)
            if y is not None:  # None for a model trained by `add_loss`
                y = shuffled(y)
            if fit_kwargs.get("sample_weight") is not None:
                fit_kwargs["sample_weight"] = shuffled(fit_kwargs["sample_weight"])
        fit_kwargs["shuffle"] = False
    fit_kwargs["callbacks"] = [finder, *(fit_kwargs.get("callbacks") or [])]
    fit_kwargs.setdefault("verbose", 0)
    try:
        model.fit(x, y, **fit_kwargs)
    finally:
        # `fit` skips `on_train_end` when it is interrupted.
        finder._restore()
    return finder
