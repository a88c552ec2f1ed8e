"""`multi_optimizer`: one optimizer per group of layers, the mechanism that
gives a learning-rate multiplier under any optimizer."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import keras

from stopgrad_lr._graph import Graph, check_model
from stopgrad_lr._optimizer_kinds import (
    describe_optimizer,
    unwrap,
    validate_optimizer,
)
from stopgrad_lr._patterns import Pattern
from stopgrad_lr._validation import (
    invalid,
    validate_multiplier,
    validate_scale,
)
from stopgrad_lr._variables import select, sites


@keras.saving.register_keras_serializable(package="stopgrad_lr")
class MultipliedSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule multiplied by a constant factor.

    `stopgrad_lr.multi_optimizer` gives each group of layers a copy of the
    base optimizer whose schedule is wrapped in this.

    Args:
        schedule: A `keras.optimizers.schedules.LearningRateSchedule`.
        factor: The multiplier, a finite float.

    Raises:
        ValueError: If `schedule` is not a `LearningRateSchedule` or `factor`
            is not a finite float.

    Examples:
        >>> import keras
        >>> import stopgrad_lr
        >>> base = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
        >>> round(float(stopgrad_lr.MultipliedSchedule(base, 0.1)(10)), 6)
        0.005
    """

    def __init__(self, schedule: Any, factor: float) -> None:
        if not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            raise invalid(
                "schedule",
                "a keras.optimizers.schedules.LearningRateSchedule",
                schedule,
            )
        self.schedule = schedule
        self.factor = validate_scale(factor, argument="factor")

    def __call__(self, step: Any) -> Any:
        return keras.ops.multiply(self.schedule(step), self.factor)

    def get_config(self) -> dict[str, Any]:
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "factor": self.factor,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MultipliedSchedule:
        schedule = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(schedule, config["factor"])


@keras.saving.register_keras_serializable(package="stopgrad_lr", name="ScaledSchedule")
class _ScaledSchedule(MultipliedSchedule):
    """`MultipliedSchedule` under its name before the rename (one letter from
    `ScaleSchedule`, a callback): `.keras` files saved then still load."""


# A learning rate that is a plain function serialises with one of these.
_FUNCTION_CLASS_NAMES = ("function", "__lambda__")


def _group_copy(
    optimizer: Any, factor: float, weight_decay_factor: float, name: str
) -> Any:
    """A fresh copy of `optimizer` (same class and settings, no state) whose
    learning rate or schedule is multiplied by `factor` and weight decay by
    `weight_decay_factor`."""
    with warnings.catch_warnings():
        # Keras warns that a lambda learning rate is unsafe to save; the
        # error below says what to do instead.
        warnings.filterwarnings("ignore", message="The object being serialized")
        config = optimizer.get_config()
    rate = config["learning_rate"]
    if isinstance(rate, dict) and rate.get("class_name") in _FUNCTION_CLASS_NAMES:
        function = rate.get("config") if rate["class_name"] == "function" else None
        raise ValueError(
            f"Invalid value received for argument `base_optimizer`. Expected an "
            f"optimizer whose learning_rate is a float or a "
            f"keras.optimizers.schedules.LearningRateSchedule: a plain function "
            f"or lambda cannot be multiplied per group, nor saved. Write it as "
            f"a LearningRateSchedule subclass (its __call__(step) returns the "
            f"rate) or pass a float. Received: learning_rate="
            f"{'a lambda' if function is None else f'the function {function}'}"
        )
    schedule = None
    if isinstance(rate, dict):
        schedule = keras.saving.deserialize_keras_object(rate)
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        config["learning_rate"] = (
            schedule if factor == 1.0 else MultipliedSchedule(schedule, factor)
        )
    elif isinstance(rate, int | float) and not isinstance(rate, bool):
        config["learning_rate"] = float(rate) * factor
    else:
        raise ValueError(
            f"Invalid value received for argument `base_optimizer`. Expected an "
            f"optimizer whose learning_rate is a float or a "
            f"keras.optimizers.schedules.LearningRateSchedule. Received: "
            f"learning_rate={rate!r}"
        )
    if weight_decay_factor != 1.0 and config.get("weight_decay"):
        config["weight_decay"] = float(config["weight_decay"]) * weight_decay_factor
    config["name"] = name
    return type(optimizer).from_config(config)


@keras.saving.register_keras_serializable(package="stopgrad_lr")
class GroupedLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """A `LossScaleOptimizer` around a `MultiOptimizer` that shows its groups.

    `stopgrad_lr.multi_optimizer` returns this under mixed precision. It is a
    `keras.optimizers.LossScaleOptimizer` in every way, and also has the
    `optimizers` attribute of the `MultiOptimizer` inside it: Keras's
    `LearningRateScheduler` and `ReduceLROnPlateau` look for that attribute
    on `model.optimizer` and then set each group's learning rate, which they
    cannot do through a stock `LossScaleOptimizer` (whose `learning_rate` is
    the MultiOptimizer's, which does not exist).
    """

    @property
    def optimizers(self) -> list[Any]:
        """The MultiOptimizer's group optimizers, default group last."""
        return list(self.inner_optimizer.optimizers)


def multi_optimizer(
    model: keras.Model,
    multipliers: Mapping[Pattern, float],
    base_optimizer: keras.optimizers.Optimizer,
    *,
    weight_decay_multipliers: Mapping[Pattern, float] | None = None,
) -> keras.optimizers.Optimizer:
    """Returns a stock `keras.optimizers.MultiOptimizer` that gives each group its rate.

    The optimizer-level way to give layers, or single variables,
    learning-rate multipliers, which works for every optimizer and every
    layer: each group of variables (one per distinct pair of learning-rate
    and weight-decay multipliers) is updated by a copy of `base_optimizer`
    whose learning rate (or learning-rate schedule) is multiplied by the
    group's multiplier, and whose weight decay by the group's weight-decay
    multiplier. Variables selected by no pattern get 1.0. Weight decay,
    clipping (`global_clipnorm` too) and epsilon then act per group, as with
    separate optimizers. Use it where neither a gradient scale nor a
    reparametrisation gives the multipliers: AdamW and any weight decay,
    clipping, Adafactor, Lamb, Adagrad, Adadelta, Ftrl, layers that cannot
    be reparametrised, and a kernel and a bias with different rates. The
    fine-tuning recipe of BEiT and MAE (AdamW, layer-wise decay, no weight
    decay on biases and normalisation parameters) is

    ```python
    multi_optimizer(
        model,
        stopgrad_lr.layerwise_decay_multipliers(model, "block*_out", 0.75),
        keras.optimizers.AdamW(1e-3, weight_decay=0.05),
        weight_decay_multipliers={"@bias": 0.0, "@norm": 0.0, "@embedding": 0.0},
    )
    ```

    Patterns (the keys of both dicts): a layer pattern as in
    `stopgrad_lr.apply_lr_multipliers` (a glob or compiled regex for a layer's
    name or path) selects all the layer's trainable variables; a variable
    pattern is matched against `"<layer>/<variable>"` (`"head/kernel"`,
    `"head/bias"`, `"*/bias"`, `"block1/attention/query/kernel"`); the kind
    selectors `"@bias"`, `"@norm"` (every variable of a normalisation layer)
    and `"@embedding"` (of an embedding layer) select by what a variable is,
    and may select nothing. The most specific wins: a variable pattern over
    a kind selector over a layer pattern.

    The base optimizer's `exclude_from_weight_decay(...)` is kept: the
    variables it excludes go to groups with no weight decay, which survives
    a `.keras` round trip (Keras's own exclusions do not).

    `print(stopgrad_lr.check_optimizer(optimizer, model))` lists the groups:
    which variable went to which group, at what learning-rate multiplier and
    weight decay (`check_optimizer(...).groups` holds them as
    `stopgrad_lr.OptimizerGroup`s).

    Each group optimizer has a learning rate of its own (a variable, or a
    schedule), reachable as `optimizer.optimizers`; Keras's
    `LearningRateScheduler` and `ReduceLROnPlateau` set each of them, so a
    schedule that maps the current rate to a new one (`lambda epoch, lr: lr
    * 0.5`) keeps the ratios between groups, while one that returns a fixed
    value gives every group that same value. Under mixed precision (a
    `LossScaleOptimizer` base, or a model with the `"mixed_float16"`
    policy) the result is a `GroupedLossScaleOptimizer`, a
    `LossScaleOptimizer` that shows the same `optimizers`, so the callbacks
    work there too.

    The model is not changed, and the result needs no stopgrad_lr layer: the
    groups are regexes of variable paths, saved with a compiled model in a
    `.keras` file (a schedule is wrapped in `MultipliedSchedule` and mixed
    precision uses `GroupedLossScaleOptimizer`, so loading such a file needs
    `import stopgrad_lr`).

    Args:
        model: A built functional or Sequential model, possibly nested.
        multipliers: Maps a pattern to a learning-rate multiplier, a finite
            float >= 0, such as `stopgrad_lr.layerwise_decay_multipliers(...)`.
        base_optimizer: The optimizer to copy per group. Only its class and
            settings (`get_config()`) and its weight-decay exclusions are
            used, not its state. A `LossScaleOptimizer` is copied around the
            `MultiOptimizer`.
        weight_decay_multipliers: Maps a pattern to a multiplier of the base
            optimizer's `weight_decay` (0 for none), or `None`.

    Returns:
        A `keras.optimizers.MultiOptimizer` (in a `GroupedLossScaleOptimizer`
        under mixed precision), ready for `model.compile`.

    Raises:
        ValueError: If the model is not a built functional or Sequential
            model; a pattern selects nothing (a kind selector aside); one
            variable is selected by two patterns of the same kind with
            different values; a multiplier is negative or not finite;
            `base_optimizer` is not an optimizer, is a `MultiOptimizer`, or
            has a learning rate that is a plain function;
            `weight_decay_multipliers` is given but the base optimizer has no
            weight decay; or two variables in different groups have the same
            path (rename a layer).

    Examples:
        >>> import keras
        >>> import stopgrad_lr
        >>> from stopgrad_lr import multi_optimizer
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(8, name="backbone")(inputs)
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
        >>> optimizer = multi_optimizer(
        ...     model, {"backbone": 0.1}, keras.optimizers.Adam(1e-3, name="adam")
        ... )
        >>> sorted(
        ...     round(float(o.learning_rate), 6) for o in optimizer.optimizers
        ... )
        [0.0001, 0.001]
        >>> model.compile(optimizer=optimizer, loss="mse")
        >>> for group in stopgrad_lr.check_optimizer(optimizer, model).groups:
        ...     print(group)
        'adam_x0.1' (Adam): multiplier 0.1, learning rate 0.0001:
            backbone/kernel, backbone/bias
        'adam' (Adam, the default group): multiplier 1, learning rate 0.001:
            head/kernel, head/bias

        The kernel and the bias of one layer apart, no decay on biases:

        >>> optimizer = multi_optimizer(
        ...     model,
        ...     {"head/kernel": 10.0, "head/bias": 20.0},
        ...     keras.optimizers.AdamW(1e-3, weight_decay=0.05, name="adam_w"),
        ...     weight_decay_multipliers={"@bias": 0.0},
        ... )
        >>> for group in sorted(optimizer.optimizers, key=lambda o: o.name):
        ...     print(group.name, group.weight_decay)
        adam_w 0.05
        adam_w_wd0 0.0
        adam_w_x10 0.05
        adam_w_x20_wd0 0.0
    """
    check_model(model, "build an optimizer for")
    validate_optimizer(base_optimizer, "base_optimizer")
    inner = unwrap(base_optimizer)
    graph = Graph(model)
    rates = select(graph, multipliers, "multipliers", validate_multiplier)
    decays: dict[int, float] = {}
    if weight_decay_multipliers is not None:
        if not inner.weight_decay:
            raise invalid(
                "weight_decay_multipliers",
                f"None: {describe_optimizer(inner)} has no weight decay "
                f"(weight_decay={inner.weight_decay!r}), so there is nothing to "
                "multiply. Set weight_decay on the base optimizer",
                weight_decay_multipliers,
            )
        decays = select(
            graph,
            weight_decay_multipliers,
            "weight_decay_multipliers",
            validate_multiplier,
        )
    groups: dict[int, tuple[float, float]] = {}
    for site in sites(graph):
        key = id(site.variable)
        decay = decays.get(key, 1.0)
        # The base optimizer's own exclude_from_weight_decay(...): Keras's
        # get_config() does not carry it, so it becomes a group without decay.
        if inner.weight_decay and not inner._use_weight_decay(site.variable):
            decay = 0.0
        groups[key] = (rates.get(key, 1.0), decay)
    optimizer_map = {
        regex: _group_copy(inner, rate, decay, _group_name(inner.name, rate, decay))
        for (rate, decay), regex in _group_regexes(model, graph, groups).items()
    }
    multi = keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(
            default_optimizer=_group_copy(inner, 1.0, 1.0, inner.name),
            optimizer_map=optimizer_map,
        )
    )
    if isinstance(base_optimizer, keras.optimizers.LossScaleOptimizer):
        return GroupedLossScaleOptimizer(
            multi,
            initial_scale=base_optimizer.initial_scale,
            dynamic_growth_steps=base_optimizer.dynamic_growth_steps,
            name=base_optimizer.name,
        )
    if model.dtype_policy.name == "mixed_float16":
        # `compile` would wrap it in a stock LossScaleOptimizer, through which
        # Keras's learning-rate callbacks cannot reach the groups.
        return GroupedLossScaleOptimizer(multi)
    return multi


def _group_name(name: str, rate: float, decay: float) -> str:
    """`adamw`, `adamw_x0.1`, `adamw_wd0`, `adamw_x0.1_wd0`."""
    return (
        name
        + (f"_x{rate:g}" if rate != 1.0 else "")
        + (f"_wd{decay:g}" if decay != 1.0 else "")
    )


def _group_regexes(
    model: keras.Model, graph: Graph, groups: Mapping[int, tuple[float, float]]
) -> dict[tuple[float, float], str]:
    """Group -> a regex that `fullmatch`es the paths of exactly the
    variables of that group, for every group other than the default (1, 1).

    A MultiOptimizer routes variables by path, and Keras does not keep paths
    across a `.keras` round trip or `clone_model` ("mlp/block1/kernel" in a
    Sequential model named "mlp" loads as "block1/kernel"). So each variable
    is matched by its path from its layer's name on, after any prefix.
    """
    default = (1.0, 1.0)
    relative: dict[tuple[float, float], set[str]] = {}
    for site in sites(graph):
        group = groups[id(site.variable)]
        if group != default:
            path = f"{site.layer.name}/{site.relative}"
            relative.setdefault(group, set()).add(path)
    regexes = {
        group: "(?:.*/)?(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")"
        for group, paths in sorted(relative.items())
    }
    for variable in model.trainable_variables:
        wanted = groups.get(id(variable), default)
        hits = [g for g, regex in regexes.items() if re.fullmatch(regex, variable.path)]
        if hits != ([] if wanted == default else [wanted]):
            raise ValueError(
                f"The variable '{variable.path}' ({_group_text(wanted)}) cannot "
                f"be told apart by its path from variables with "
                f"{' and '.join(_group_text(g) for g in hits) or _group_text(default)}"
                f": a MultiOptimizer selects variables by path. Give the layers "
                f"distinct names."
            )
    return regexes


def _group_text(group: tuple[float, float]) -> str:
    rate, decay = group
    return f"multiplier {rate:g}" + (
        f", weight decay x{decay:g}" if decay != 1.0 else ""
    )
