"""What each optimizer does with a scaled gradient.

`OPTIMIZER_TABLE` is the one place that knows it: for every optimizer class
in `keras.optimizers`, its update rule: linear in the gradient (a gradient
scale is then a learning-rate multiplier), invariant to a constant gradient
scale (reparametrise with `c = m`), or neither (only a
`keras.optimizers.MultiOptimizer` gives a layer its own learning rate).
`benchmarks/optimizer_table.py` measures every entry and writes
`docs/optimizers.md`; a test checks that the page and this table agree.
"""

from __future__ import annotations

import math
from typing import Any

import keras

from stopgrad_lr._validation import invalid, validate_choice

# The update rules a reparametrisation can serve: an update linear in the
# gradient (SGD), or one invariant to its scale (Adam); and the third, an
# optimizer for which neither mechanism is a multiplier.
LINEAR = "linear"
SCALE_INVARIANT = "scale_invariant"
UPDATE_RULES = (SCALE_INVARIANT, LINEAR)
NEITHER = "neither"

_OPT = keras.optimizers
_NORMALISES = "divides the gradient by a running estimate of its own size"
# Optimizer class -> (update rule, what it does with the gradient). The
# rule is measured for every class by benchmarks/optimizer_table.py.
OPTIMIZER_TABLE: dict[type, tuple[str, str]] = {
    _OPT.SGD: (LINEAR, "makes an update proportional to the gradient"),
    _OPT.Adam: (SCALE_INVARIANT, _NORMALISES),
    _OPT.AdamW: (SCALE_INVARIANT, _NORMALISES),
    _OPT.Adamax: (SCALE_INVARIANT, _NORMALISES),
    _OPT.Nadam: (SCALE_INVARIANT, _NORMALISES),
    _OPT.RMSprop: (
        SCALE_INVARIANT,
        "divides the gradient by the root of a running mean of its square",
    ),
    _OPT.ScheduleFreeAdamW: (SCALE_INVARIANT, _NORMALISES),
    _OPT.Lion: (SCALE_INVARIANT, "keeps only the sign of its update"),
    _OPT.Muon: (
        SCALE_INVARIANT,
        "orthogonalises the update of each matrix and uses AdamW for the other weights",
    ),
    _OPT.Adadelta: (
        NEITHER,
        "divides the gradient by its running size and multiplies it by the "
        "running size of its own past updates, so a reparametrisation cancels "
        "out as well",
    ),
    _OPT.Adafactor: (
        NEITHER,
        "normalises the gradient and scales its update by the size of the "
        "weights, so a reparametrisation cancels out as well",
    ),
    _OPT.Lamb: (
        NEITHER,
        "normalises the gradient and scales its update by the ratio of the "
        "weights' norm to the update's norm, so a reparametrisation cancels out "
        "as well",
    ),
    _OPT.Adagrad: (
        NEITHER,
        "divides the gradient by the root of an accumulator that starts at "
        "initial_accumulator_value: like SGD while that dominates, scale-"
        "invariant once the squared gradients do",
    ),
    _OPT.Ftrl: (
        NEITHER,
        "computes the weights from accumulated gradients and their squares",
    ),
}
# A normalising optimizer divides by `sqrt(v) + epsilon` (RMSprop: by
# `sqrt(v + epsilon)`, so its epsilon counts as `sqrt(epsilon)`). Where that
# epsilon is not small next to the gradient, the update is between SGD's and
# Adam's, and a reparametrisation, whose layer sees its gradient times `c`,
# acts as if the epsilon were `epsilon / c`. Measured in docs/optimizers.md:
# at m = 0.1, epsilon 1e-7 is within 0.1% of the reference, 1e-6 within 2%,
# 1e-5 4% off, and RMSprop's default (1e-7 under the root) 4% off.
EPSILON_LIMIT = 1e-6
_EPSILON_UNDER_ROOT = (_OPT.RMSprop,)


def unwrap(optimizer: Any) -> Any:
    """The optimizer inside any `LossScaleOptimizer`: loss scaling is linear
    and undone before the update, so it changes nothing here."""
    while isinstance(optimizer, _OPT.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def describe_optimizer(optimizer: Any) -> str:
    """`'Adam'`, `'LossScaleOptimizer(SGD)'`: the class names, for messages."""
    if isinstance(optimizer, _OPT.LossScaleOptimizer):
        return f"LossScaleOptimizer({describe_optimizer(optimizer.inner_optimizer)})"
    return type(optimizer).__name__


def update_rule_of(optimizer: Any) -> tuple[str, str]:
    """`(update rule, what it does with the gradient)` for a (wrapped)
    optimizer; the rule is `"linear"`, `"scale_invariant"`, `"neither"` or
    `"unknown"`."""
    optimizer = unwrap(optimizer)
    for cls in type(optimizer).__mro__:
        if cls in OPTIMIZER_TABLE:
            rule, how = OPTIMIZER_TABLE[cls]
            epsilon = getattr(optimizer, "epsilon", None) or 0.0
            if isinstance(optimizer, _EPSILON_UNDER_ROOT):
                epsilon = math.sqrt(epsilon)
            if rule == SCALE_INVARIANT and epsilon > EPSILON_LIMIT:
                return NEITHER, (
                    f"{how}, but its epsilon is {epsilon:.2g} in gradient units, "
                    f"not small next to gradients (above {EPSILON_LIMIT:g}), so "
                    f"its update is between SGD's and Adam's"
                )
            return rule, how
    return "unknown", "is not in stopgrad_lr's optimizer table"


def settings(optimizer: Any) -> list[tuple[str, str]]:
    """`(setting, why it breaks a multiplier)` for the settings that act on
    a gradient or a weight outside both mechanisms."""
    optimizer = unwrap(optimizer)
    found = []
    if optimizer.weight_decay:
        found.append(
            (
                f"weight_decay={optimizer.weight_decay:g}",
                "shrinks the weights by learning_rate * weight_decay every "
                "step, not by the multiplied rate: decoupled weight decay "
                "bypasses both gradient scales and reparametrisation",
            )
        )
    for name, why in (
        ("clipnorm", "clips the norm of each scaled gradient"),
        ("clipvalue", "clips each element of the scaled gradient"),
        ("global_clipnorm", "clips by a global norm that mixes scaled gradients"),
    ):
        value = getattr(optimizer, name)
        if value:
            found.append(
                (
                    f"{name}={value:g}",
                    f"{why}, so the threshold acts as if divided by the multiplier",
                )
            )
    return found


def recommend(optimizer: Any, regularized: bool = False) -> str:
    """The mechanism that gives layers their multipliers with `optimizer`:
    `"gradient_scale"`, `"reparametrize"` or `"multi_optimizer"`.

    `regularized`: whether a layer with a multiplier other than 1 has a
    weight regularizer (whose gradient a gradient scale does not scale).
    """
    rule, _ = update_rule_of(optimizer)
    if settings(optimizer) or rule not in UPDATE_RULES:
        return "multi_optimizer"
    if rule == LINEAR and not regularized:
        return "gradient_scale"
    return "reparametrize"


def weight_regularizers(layer: Any) -> list[str]:
    """The names of the layer's weight regularizer arguments that are set."""
    config = layer.get_config()
    return [
        key
        for key, value in config.items()
        if key.endswith("_regularizer")
        and key != "activity_regularizer"
        and value is not None
    ]


def validate_optimizer(optimizer: Any, argument: str = "optimizer") -> Any:
    if not isinstance(optimizer, _OPT.Optimizer) or isinstance(
        unwrap(optimizer), _OPT.MultiOptimizer
    ):
        raise invalid(
            argument,
            "the keras.optimizers.Optimizer instance you train with (not a "
            "MultiOptimizer, which sets per-layer learning rates itself)",
            optimizer,
        )
    return optimizer


def validate_update_rule(update_rule: Any) -> str:
    """One of `UPDATE_RULES`."""
    return validate_choice(update_rule, "update_rule", UPDATE_RULES)
