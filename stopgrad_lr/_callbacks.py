"""Training callbacks: `ScaleSchedule` changes gradient scales during `fit`.

The learning-rate finder lives in `_lr_finder.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import keras

from stopgrad_lr._check import check_at_train_begin
from stopgrad_lr._layers import GradientReversal, GradientScale
from stopgrad_lr._patterns import (
    Pattern,
    describe,
    iter_layers,
    matches,
    no_match_error,
    validate_pattern,
)
from stopgrad_lr._validation import invalid, validate_choice, validate_scale

PERIODS = ("epoch", "batch")
ATTRIBUTES = ("scale", "strength")


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

    When training starts it also checks the model's optimizer, as
    `stopgrad_lr.OptimizerCheck` does (scales as they are then).

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
            raise invalid(
                "layers",
                "a glob string, a compiled regex, or a non-empty list of those",
                layers,
            )
        self._patterns = [validate_pattern(p, argument="layers") for p in patterns]
        if not callable(schedule):
            raise invalid(
                "schedule",
                "a function of the epoch or step that returns a float",
                schedule,
            )
        validate_choice(per, "per", PERIODS)
        validate_choice(attribute, "attribute", ATTRIBUTES)
        if log_name is not None and not (isinstance(log_name, str) and log_name):
            raise invalid("log_name", "a non-empty string or None", log_name)
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
        check_at_train_begin(self.model)

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
