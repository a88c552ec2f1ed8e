"""A zero multiplier is a freeze: frozen copies of what a gradient stop cuts off.

A `GradientStop` removes the backward pass upstream of it, but the layers
there stay trainable: their variables still reach the optimizer, which on
JAX gets zero gradients for them and still applies momentum and weight
decay, keeps slots for them, and their BatchNormalization layers stay in
training mode. Keras's own freeze is per variable (`layer.trainable =
False`), and a rewritten model shares its layer objects with the input
model, which must not change; so each layer that the new stops cut off
entirely is replaced by a frozen copy with weights of its own. The stop
stays at the boundary, where the analysis, `strip_gradient_scales` and the
docs read it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import keras

from stopgrad_lr._graph import Graph, Node
from stopgrad_lr._layers import GradientStop
from stopgrad_lr._patterns import iter_layers
from stopgrad_lr._reparam import copy_layer
from stopgrad_lr._surgery import candidates


def frozen_nodes(graph: Graph, stops: Collection[int]) -> dict[int, Node]:
    """The layers to freeze, by id (each with its first call), when a stop
    goes after every call of each layer in `stops` (layer ids).

    A layer is frozen when every gradient path from each of its calls to the
    model's outputs passes through a stop (one of the new ones, or a
    `GradientStop` already in the model), at least one call reaches a new
    stop, and it has trainable weights or is a trainable BatchNormalization
    (whose moving statistics `trainable = False` also freezes). A layer that
    a residual connection, another output or another call of it reaches
    around the stops keeps training; so does every layer already frozen.
    """
    free = [False] * len(graph.nodes)  # a path to an output avoids every stop
    behind = [False] * len(graph.nodes)  # a path reaches a new stop
    outputs = set(graph.outputs)
    for node in reversed(graph.nodes):
        index = node.index
        if id(node.layer) in stops:
            behind[index] = True
            continue
        passing = [
            c for c in graph.consumers(node) if not isinstance(c.layer, GradientStop)
        ]
        free[index] = any(t in outputs for t in node.outputs) or any(
            free[c.index] for c in passing
        )
        behind[index] = any(behind[c.index] for c in passing)
    calls: dict[int, list[Node]] = {}
    for node in graph.nodes:
        calls.setdefault(id(node.layer), []).append(node)
    return {
        key: nodes[0]
        for key, nodes in calls.items()
        if _trains(nodes[0])
        and not any(free[node.index] for node in nodes)
        and any(behind[node.index] for node in nodes)
    }


def _trains(node: Node) -> bool:
    if node.trainable:
        return True
    layer = node.layer
    return isinstance(layer, keras.layers.BatchNormalization) and layer.trainable


def frozen_copy(layer: Any, path: str, freeze_batch_norm: bool = True) -> Any:
    """A copy of `layer` with weights of its own that does not train.

    `trainable=False`, which also runs a BatchNormalization in inference
    mode; with `freeze_batch_norm=False` a BatchNormalization copy stays
    trainable (so it normalises with batch statistics and updates its moving
    ones in training) and only its gamma and beta are frozen.

    Raises:
        ValueError: If the layer cannot be rebuilt from its config.
    """
    keeps_statistics = not freeze_batch_norm and isinstance(
        layer, keras.layers.BatchNormalization
    )
    try:
        copy = copy_layer(layer, trainable=None if keeps_statistics else False)
    except Exception as error:
        raise ValueError(
            f"Cannot freeze layer '{path}' ({type(layer).__name__}), which lies "
            f"upstream of a gradient stop: freezing it without changing the "
            f"input model needs a copy of it, and rebuilding it from its config "
            f"failed ({type(error).__name__}: {error}). Freeze it yourself "
            f"before the rewrite (`layer.trainable = False`), give the layer a "
            f"`get_config` that rebuilds it, or pass stop_at_zero=False for a "
            f"GradientScale(0.0) that freezes nothing."
        ) from error
    if keeps_statistics:
        freeze_parameters(copy)
    return copy


def freeze_parameters(layer: Any) -> None:
    """Freezes a BatchNormalization's gamma and beta, not the layer.

    Keras keeps a variable's `trainable` flag only in memory: a `.keras` file
    and `clone_model` record the layer's flag alone.
    """
    for variable in (layer.gamma, layer.beta):
        if variable is not None:
            variable.trainable = False


def frozen_copies(
    graph: Graph, stops: Collection[int], freeze_batch_norm: bool
) -> dict[int, Any]:
    """Layer id -> its frozen copy, for `Rebuild(..., replace=...)`."""
    return {
        key: frozen_copy(node.layer, node.path, freeze_batch_norm)
        for key, node in frozen_nodes(graph, stops).items()
    }


def zero_copies(
    graph: Graph, targets: Mapping[int, float], freeze_batch_norm: bool
) -> dict[int, Any]:
    """Layer id -> its frozen copy, for each layer with target multiplier 0:
    the copies that a reparametrisation puts in their place."""
    first = candidates(graph)
    return {
        key: frozen_copy(first[key].layer, first[key].path, freeze_batch_norm)
        for key, multiplier in targets.items()
        if multiplier == 0.0
    }


def refreeze_parameters(
    model: keras.Model, graph: Graph, copies: Mapping[int, Any]
) -> None:
    """Freezes again the gamma and beta of each BatchNormalization copy kept
    in training mode, in `model`: a clone of the model rebuilt from `graph`
    with `copies`, which kept only the layers' own flags."""
    first = candidates(graph)
    kept = {
        first[key].path
        for key, copy in copies.items()
        if isinstance(copy, keras.layers.BatchNormalization)
        and copy.trainable
        and not copy.trainable_weights
    }
    for path, layer in iter_layers(model):
        if path in kept:
            freeze_parameters(layer)
