"""A zero multiplier is a freeze: the layers a gradient stop cuts off stop training.

A `GradientStop` removes the backward pass upstream of it, but the layers
there would stay trainable: their variables would still reach the
optimizer, which on JAX gets zero gradients for them and still applies
momentum and weight decay, keeps slots for them, and their
BatchNormalization layers would stay in training mode. So each layer that
the new stops cut off entirely is frozen the way Keras freezes a layer,
`layer.trainable = False`, which reaches every variable under it (sublayers
built in `build()`, LoRA kernels, nested models) and runs every
BatchNormalization under it in inference mode.

Keras keeps trainability on the variable, and a rewrite shares the input
model's variables (`copy=False`): the frozen layers are the input model's
own layer objects, so they are frozen in the input model too, exactly as
`layer.trainable = False` on a layer shared by two models would do. A
frozen copy would keep the input's flags but hold a second set of weights
that `set_weights` and `load_weights` on the input no longer reach.
`copy=True` freezes the new model's copies and leaves the input untouched.
The stop stays at the boundary, where the analysis,
`strip_gradient_scales` and the docs read it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

import keras

from stopgrad_lr._graph import Graph, Node, has_graph
from stopgrad_lr._layers import GradientStop
from stopgrad_lr._patterns import iter_layers, sublayers


def frozen_paths(graph: Graph, stops: Collection[int]) -> list[str]:
    """The paths of the layers to freeze (each its first call's), when a stop
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
    return [
        nodes[0].path
        for nodes in calls.values()
        if _trains(nodes[0])
        and not any(free[node.index] for node in nodes)
        and any(behind[node.index] for node in nodes)
    ]


def _trains(node: Node) -> bool:
    """Whether a freeze changes the layer: it has variables that train, or a
    BatchNormalization under it is in training mode."""
    layer = node.layer
    if node.trainable:
        return True
    # A nested model's container node: its layers are nodes of their own.
    if not isinstance(layer, keras.layers.Layer) or has_graph(layer):
        return False
    return layer.trainable and any(norm.trainable for norm in _batch_norms(layer))


def freeze_layers(
    model: keras.Model, paths: Collection[str], freeze_batch_norm: bool
) -> None:
    """Freezes the layers of `model` at `paths` (as `Node.path` names them).

    `trainable = False` on each and on every layer and variable under it. With
    `freeze_batch_norm=False`, every BatchNormalization under a frozen layer
    stays in training mode (its flag stays True, so it normalises with batch
    statistics and updates its moving ones) and only its gamma and beta are
    frozen.
    """
    wanted = set(paths)
    for path, layer in iter_layers(model):
        if path not in wanted:
            continue
        # Keras's setter walks each layer's tracked sublayers; on keras-hub's
        # Gemma after `enable_lora` it was seen to leave the attention's LoRA
        # kernels trainable (tests/test_per_variable.py), so every sublayer
        # held as an attribute and every variable is frozen too.
        for sublayer in sublayers(layer):
            sublayer.trainable = False
        for variable in layer.weights:
            variable.trainable = False
        if not freeze_batch_norm:
            for norm in _batch_norms(layer):
                norm.trainable = True
                freeze_parameters(norm)


def _batch_norms(layer: Any) -> Iterator[Any]:
    for sublayer in sublayers(layer):
        if isinstance(sublayer, keras.layers.BatchNormalization):
            yield sublayer


def freeze_parameters(layer: Any) -> None:
    """Freezes a BatchNormalization's gamma and beta, not the layer.

    Keras keeps a variable's `trainable` flag only in memory: a `.keras` file
    and `clone_model` record the layer's flag alone.
    """
    for variable in (layer.gamma, layer.beta):
        if variable is not None:
            variable.trainable = False
