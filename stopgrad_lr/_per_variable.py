"""What each trainable variable's learning rate is multiplied by.

Keras decides trainability per variable (`model.trainable_variables` is what
the optimizer updates), and a multiplier can be per variable too: a LoRA
kernel trains inside a layer whose own flag is False, and a
`stopgrad_lr.multi_optimizer` group may hold a kernel without its bias. So
this view lists the variables that train, each with the product of what
acts on it: the gradient scales on its layer's paths to the outputs, its
layer's `ParameterScale`, and the learning rate of its `MultiOptimizer`
group over the default group's.
"""

from __future__ import annotations

import math
from typing import Any

import keras

from stopgrad_lr._analysis import (
    multiplier_of,
    parameter_scale_of,
    variable_multiplier_sets,
)
from stopgrad_lr._check import _Owners
from stopgrad_lr._graph import Graph, check_model, normalise
from stopgrad_lr._layers import ParameterScale
from stopgrad_lr._optimizer_kinds import LINEAR, SCALE_INVARIANT, update_rule_of
from stopgrad_lr._validation import invalid
from stopgrad_lr._variables import sites


def variable_multipliers(
    model: keras.Model, optimizer: keras.optimizers.Optimizer | None = None
) -> dict[str, float]:
    """The learning-rate multiplier of each variable that trains.

    Without `optimizer`, the multiplier that an SGD-like optimizer gives
    each variable, as `stopgrad_lr.effective_multipliers` gives its layer:
    the product of the gradient scales on the layer's paths to the outputs
    (`nan` when paths disagree), times the multiplier of a reparametrisation
    for the kind of optimizer it was made for (`ParameterScale.multiplier`).
    A variable that two layers hold (a causal LM's token embedding, which
    its output projection calls in reverse) counts the paths of both: a
    scale between them makes it `nan`.

    With `optimizer`, what that optimizer makes of it, on its first steps:

    - SGD-like optimizers (update linear in the gradient) multiply the update
      by the gradient scales and by `c**2` for a `ParameterScale(c)`;
    - optimizers that normalise the gradient (Adam, Lion...) cancel a
      gradient scale (the variable gets 1, or 0 behind a scale of 0) and
      multiply by `c` for a `ParameterScale(c)`;
    - for the others (Adagrad, Adafactor...) a gradient scale or a
      reparametrisation is no multiplier: `nan`;
    - a `MultiOptimizer` group (`stopgrad_lr.multi_optimizer`) multiplies
      its variables by its learning rate over the default group's; a group
      of another class than the default reads the rule of its own class.

    A variable of a frozen layer does not train and is not listed
    (`effective_multipliers` reports the layer as 0).

    Args:
        model: A built functional or Sequential model.
        optimizer: The optimizer that will train it, or `None`.

    Returns:
        A dict from `"<layer path>/<variable path in the layer>"` (as
        `stopgrad_lr.multi_optimizer` patterns name variables, such as
        `"head/bias"` or `"decoder_block_0/attention/query/lora_kernel_b"`)
        to its multiplier, in topological order of the layers; a variable
        that two layers hold is listed once, under the first.

    Raises:
        ValueError: If `model` is not a built functional or Sequential
            model, or `optimizer` is not a Keras optimizer.

    Examples:
        >>> import keras, stopgrad_lr
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(8, name="body")(inputs)
        >>> hidden = stopgrad_lr.GradientScale(0.25)(hidden)
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
        >>> stopgrad_lr.variable_multipliers(model)
        {'body/kernel': 0.25, 'body/bias': 0.25, 'head/kernel': 1.0, 'head/bias': 1.0}
        >>> adam = keras.optimizers.Adam()
        >>> stopgrad_lr.variable_multipliers(model, adam)["body/kernel"]
        1.0
    """
    check_model(model, "analyse")
    if optimizer is not None and not isinstance(optimizer, keras.optimizers.Optimizer):
        raise invalid(
            "optimizer", "a keras.optimizers.Optimizer, or None", optimizer, typed=True
        )
    graph = Graph(model)
    scales = variable_multiplier_sets(graph, parameter_scales=False)
    reparametrised = _parameter_scales(graph)
    owners = _Owners(optimizer) if optimizer is not None else None
    result: dict[str, float] = {}
    listed: set[int] = set()
    for site in sites(graph):
        if id(site.variable) in listed:
            continue  # held by a second layer too: listed under the first
        listed.add(id(site.variable))
        scale = multiplier_of(scales[id(site.variable)])
        parameter_scale = reparametrised.get(id(site.layer))
        if owners is None:
            value = scale
            if parameter_scale is not None:
                value *= parameter_scale.multiplier
        else:
            owner = owners.owner(site.variable)
            value = owners.factor(owner) * _under(owner, scale, parameter_scale)
        result[site.path] = value if math.isnan(value) else normalise(value)
    return result


def _parameter_scales(graph: Graph) -> dict[int, ParameterScale]:
    """Layer id -> the `ParameterScale` that reparametrises it."""
    found: dict[int, ParameterScale] = {}
    for node in graph.first_calls():
        scale = parameter_scale_of(graph, node)
        if scale is not None:
            found[id(node.layer)] = scale
    return found


def _under(
    optimizer: Any, scale: float, parameter_scale: ParameterScale | None
) -> float:
    """The multiplier that `optimizer` makes of a gradient scale product
    `scale` and a reparametrisation."""
    rule, _ = update_rule_of(optimizer)
    c = 1.0 if parameter_scale is None else parameter_scale.scale
    if rule == LINEAR:
        return scale * c * c
    if scale == 0.0:
        return 0.0
    if rule == SCALE_INVARIANT:
        # A product of positive scales is cancelled; a reversed one (< 0) is
        # not a learning rate at all, nor are disagreeing paths (nan).
        return c if scale > 0 else math.nan
    return 1.0 if scale == 1.0 and c == 1.0 else math.nan
