"""Read-only analysis of a model's gradient paths: cuts and effective multipliers.

The model is read call by call (any built functional model: Sequential,
functional subclasses such as keras-hub's Backbones and Tasks, raw Keras
operations such as `x + 1.0` as nodes) and flattened: nested functional and
Sequential models are expanded in place, so a layer inside a nested model is
a node like any other, named by its path `"outer/inner"`. Only floating
tensors are edges: an integer or boolean tensor (token ids, an Embedding's
mask) carries no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import keras

from stopgrad_lr._layers import SCALE_LAYERS
from stopgrad_lr._validation import invalid

# Scales are stored and applied in float32, so a multiplier (a product of
# scales) is known to float32 precision: products along two paths that agree
# to a relative 1e-6 are one value (0.3 * (1/3 in float32) and 0.1), and a
# multiplier is reported to 7 significant digits. Products are carried
# unrounded: rounding each step would drift (0.5 ** 18 read 3.814695e-06).
_DIGITS = 7
_SAME = 1e-6


def normalise(value: float) -> float:
    return float(f"{value:.{_DIGITS}g}")


def _merge(target: list[float], values: Iterable[float]) -> None:
    """Adds each of `values` to `target` unless it holds one close to it."""
    for value in values:
        if not any(
            math.isclose(value, known, rel_tol=_SAME, abs_tol=0.0) for known in target
        ):
            target.append(value)


@dataclass(eq=False)
class Node:
    """One call of a layer (or Keras operation) in the flattened graph.

    `variables` are the layer's weights that train, as Keras decides it per
    variable: those in the model's `trainable_variables`, wherever they live
    in the layer (a sublayer built in `build()`, a LoRA kernel inside a layer
    whose own flag is False). A nested model's container node has none: its
    layers are nodes of their own.
    """

    index: int
    path: str
    layer: Any
    variables: list[Any] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)  # float tensor ids
    outputs: list[int] = field(default_factory=list)  # tensor ids

    @property
    def trainable(self) -> bool:
        """Whether the call trains weights of its own."""
        return bool(self.variables)

    @property
    def frozen(self) -> bool:
        """Whether the call is of a frozen layer: one with weights but none
        that train, because `trainable = False` is set on it (or on the
        model), or on the gamma and beta of a BatchNormalization (a freeze
        that keeps its batch statistics, see `_freeze`)."""
        layer = self.layer
        if (
            self.variables
            or has_graph(layer)
            or isinstance(layer, SCALE_LAYERS)
            or not getattr(layer, "weights", None)
        ):
            return False
        if not layer.trainable:
            return True
        return isinstance(layer, keras.layers.BatchNormalization) and (
            layer.gamma is not None or layer.beta is not None
        )

    @property
    def scale(self) -> float | None:
        """The gradient multiplier of a stopgrad_lr layer, else None."""
        if isinstance(self.layer, SCALE_LAYERS):
            return float(self.layer.scale)
        return None


@dataclass(eq=False)
class Tensor:
    producer: int | None  # node index; None for a model input
    is_float: bool
    consumers: list[int] = field(default_factory=list)  # node indices


class Graph:
    """The flattened call graph of a built functional or Sequential model."""

    def __init__(self, model: keras.Model) -> None:
        self.nodes: list[Node] = []
        # What the optimizer sees: Keras decides trainability per variable.
        self._trains = {id(v) for v in model.trainable_variables}
        self.tensors: list[Tensor] = []
        self.outputs: list[int] = []
        inputs = [
            self._new_tensor(None, keras.backend.is_float_dtype(t.dtype))
            for t in model.inputs
        ]
        for tensor_id in self._add_model(model, "", inputs):
            if self.tensors[tensor_id].is_float:
                self.outputs.append(tensor_id)
        # Nodes are added after the nodes they consume, so `nodes` is in
        # topological order. The analyses below are computed once, on demand.
        self._ancestors: list[int] | None = None
        self._calls: dict[int, int] | None = None
        self._cuts: dict[int, bool] | None = None
        self._reaches: list[bool] | None = None

    # Construction --------------------------------------------------------

    def _new_tensor(self, producer: int | None, is_float: bool) -> int:
        self.tensors.append(Tensor(producer, is_float))
        return len(self.tensors) - 1

    def _new_node(self, path: str, layer: Any, inputs: list[int]) -> Node:
        node = Node(len(self.nodes), path, layer)
        if not has_graph(layer):
            weights = getattr(layer, "weights", None) or []
            node.variables = [v for v in weights if id(v) in self._trains]
        for tensor_id in inputs:
            if self.tensors[tensor_id].is_float:
                node.inputs.append(tensor_id)
                self.tensors[tensor_id].consumers.append(node.index)
        self.nodes.append(node)
        return node

    def _add_model(self, model: Any, prefix: str, inputs: list[int]) -> list[int]:
        """Adds the calls of a functional or Sequential `model` whose inputs
        are the tensors `inputs`; returns the tensors of its outputs.

        Public Keras API has no per-call view of a functional graph:
        `get_config()` of a functional subclass (every keras-hub model) holds
        its constructor arguments instead, and `clone_model` runs the shape
        inference of every layer again, which costs as much as a rewrite. So
        the graph is read from the records Keras keeps for it, the ones
        `clone_model` itself follows: a symbolic tensor's `_keras_history`
        names the operation and call that produced it, and the operation's
        `_inbound_nodes[i]` holds that call's arguments and outputs.
        """
        known = {
            id(tensor): tensor_id
            for tensor, tensor_id in zip(model.inputs, inputs, strict=True)
        }
        for call in _calls_in_order(model):
            layer = call.operation
            if has_graph(layer):
                arguments = _bound_inputs(layer, call)
            else:
                arguments = call.input_tensors
            outputs = self._add_call(
                layer, prefix + layer.name, [known[id(t)] for t in arguments], call
            )
            for tensor, tensor_id in zip(call.outputs, outputs, strict=True):
                known[id(tensor)] = tensor_id
        return [known[id(tensor)] for tensor in model.outputs]

    def _add_call(
        self, layer: Any, path: str, inputs: list[int], call: Any
    ) -> list[int]:
        """Adds a layer call; returns the tensors of its outputs.

        A nested functional or Sequential model is expanded in place, and
        each of its outputs gets a container node of its own (output `i` is
        the inner output `i` alone): a scale after the nested model as a whole
        goes after each of them. A nested subclassed model is one node, like a
        layer.
        """
        if not has_graph(layer):
            node = self._new_node(path, layer, inputs)
            node.outputs = [
                self._new_tensor(node.index, _is_float(t)) for t in call.outputs
            ]
            return node.outputs
        outputs = []
        for inner in self._add_model(layer, f"{path}/", inputs):
            node = self._new_node(path, layer, [inner])
            is_float = self.tensors[inner].is_float
            node.outputs = [self._new_tensor(node.index, is_float)]
            outputs.extend(node.outputs)
        return outputs

    # Queries ---------------------------------------------------------------

    def consumers(self, node: Node) -> Iterator[Node]:
        for tensor_id in node.outputs:
            if tensor_id >= 0:
                for consumer in self.tensors[tensor_id].consumers:
                    yield self.nodes[consumer]

    def producers(self, node: Node) -> Iterator[Node]:
        for tensor_id in node.inputs:
            producer = self.tensors[tensor_id].producer
            if producer is not None:
                yield self.nodes[producer]

    def reaches_output(self, blocked: tuple[type, ...] = ()) -> list[bool]:
        """For each node, whether a float path leads from it to a model
        output, through no layer of a `blocked` type."""
        if not blocked and self._reaches is not None:
            return self._reaches
        reaches = [False] * len(self.nodes)
        outputs = set(self.outputs)
        for node in reversed(self.nodes):
            reaches[node.index] = any(t in outputs for t in node.outputs) or any(
                reaches[c.index] and not isinstance(c.layer, blocked)
                for c in self.consumers(node)
            )
        if not blocked:
            self._reaches = reaches
        return reaches

    def multiplier_sets(self) -> dict[int, frozenset[float]]:
        """For each node, the products of scales on its paths to the outputs.

        The set is that of the node's outputs: a scale layer's own set does
        not include its scale, which applies to what lies upstream of it.
        """
        at_tensor: dict[int, list[float]] = {t: [1.0] for t in self.outputs}
        sets: dict[int, frozenset[float]] = {}
        for node in reversed(self.nodes):
            index = node.index
            values: list[float] = []
            for tensor_id in node.outputs:
                _merge(values, at_tensor.get(tensor_id, ()))
            sets[index] = frozenset(normalise(v) for v in values)
            scale = node.scale
            passed = values if scale is None else [v * scale for v in values]
            for tensor_id in node.inputs:
                _merge(at_tensor.setdefault(tensor_id, []), passed)
        return sets

    def ancestors(self) -> list[int]:
        """For each node, the bit set of itself and its ancestors."""
        if self._ancestors is None:
            above = [0] * len(self.nodes)
            for node in self.nodes:
                bits = 1 << node.index
                for producer in self.producers(node):
                    bits |= above[producer.index]
                above[node.index] = bits
            self._ancestors = above
        return self._ancestors

    def calls(self, layer: Any) -> int:
        """How many times `layer` is called in the graph."""
        if self._calls is None:
            self._calls = {}
            for node in self.nodes:
                self._calls[id(node.layer)] = self._calls.get(id(node.layer), 0) + 1
        return self._calls.get(id(layer), 0)

    def first_calls(self) -> Iterator[Node]:
        """The first call of each distinct layer object, in topological order."""
        seen: set[int] = set()
        for node in self.nodes:
            if id(node.layer) not in seen:
                seen.add(id(node.layer))
                yield node

    def cuts(self) -> dict[int, bool]:
        """For each node with trainable weights upstream (or its own) and a
        path to an output, whether it is a cut.

        A node is a cut when every gradient path from the trainable weights
        upstream of it to the outputs passes through it. Bit sets keep this
        linear in the number of nodes: `above[n]` holds n and its ancestors;
        `escapes[n]` holds, for every ancestor-or-self of n that carries a
        weight gradient, the nodes its gradient also comes from (consumers
        that reach an output, other call sites of a shared layer, and the
        pseudo-node OUTPUT when it is itself a model output). A layer is a cut
        exactly when the escapes of its strict ancestors stay inside `above`.
        """
        if self._cuts is not None:
            return self._cuts
        reaches = self.reaches_output()
        output_bit = 1 << len(self.nodes)
        outputs = set(self.outputs)
        sites: dict[int, list[int]] = {}
        for node in self.nodes:
            if node.trainable and reaches[node.index]:
                sites.setdefault(id(node.layer), []).append(node.index)

        above = self.ancestors()
        escapes = [0] * len(self.nodes)
        carries = [False] * len(self.nodes)  # a weight gradient flows through
        strict_escapes = [0] * len(self.nodes)
        for node in self.nodes:
            index, inherited = node.index, 0
            carries[index] = node.trainable
            for producer in self.producers(node):
                inherited |= escapes[producer.index]
                carries[index] = carries[index] or carries[producer.index]
            strict_escapes[index] = inherited
            own = 0
            if carries[index]:
                for consumer in self.consumers(node):
                    if reaches[consumer.index]:
                        own |= 1 << consumer.index
                if any(t in outputs for t in node.outputs):
                    own |= output_bit
                if node.trainable:
                    for sibling in sites.get(id(node.layer), []):
                        own |= 1 << sibling
            escapes[index] = inherited | own

        self._cuts = {
            node.index: not strict_escapes[node.index] & ~above[node.index]
            for node in self.nodes
            if carries[node.index] and reaches[node.index]
        }
        return self._cuts

    def bypass(self, node: Node) -> tuple[Node, Node]:
        """One edge from the upstream region of a non-cut `node` that avoids it.

        Only called to explain an error.
        """
        reaches = self.reaches_output()
        region = self.ancestors()[node.index]
        outputs = set(self.outputs)
        for index in range(len(self.nodes)):
            if index == node.index or not region >> index & 1:
                continue
            source = self.nodes[index]
            for consumer in self.consumers(source):
                if reaches[consumer.index] and not region >> consumer.index & 1:
                    return source, consumer
            if any(t in outputs for t in source.outputs):
                return source, _OUTPUT
            if source.trainable:
                for other in self.nodes:
                    if (
                        other.layer is source.layer
                        and other.index != index
                        and reaches[other.index]
                        and not region >> other.index & 1
                    ):
                        return source, other
        raise RuntimeError(f"no bypass found for {node.path}")  # pragma: no cover


# The destination of a bypass through a model output.
_OUTPUT = Node(-1, "<model output>", None)


def _is_float(tensor: Any) -> bool:
    return bool(keras.backend.is_float_dtype(tensor.dtype))


def _producer(tensor: Any) -> Any:
    """The Keras call record (a node) that produced a symbolic tensor."""
    operation, node_index, _ = tensor._keras_history
    return operation._inbound_nodes[node_index]


def _calls_in_order(model: Any) -> list[Any]:
    """The calls between `model.inputs` and `model.outputs`, each after the
    calls whose outputs it takes (iterative, for graphs thousands deep)."""
    inputs = {id(tensor) for tensor in model.inputs}
    order: list[Any] = []
    seen: set[int] = set()
    stack = [
        (_producer(tensor), False)
        for tensor in reversed(model.outputs)
        if id(tensor) not in inputs
    ]
    while stack:
        call, inputs_done = stack.pop()
        if inputs_done:
            order.append(call)
            continue
        if id(call) in seen:
            continue
        seen.add(id(call))
        stack.append((call, True))
        for tensor in reversed(call.input_tensors):
            if (
                id(tensor) not in inputs
                and id(producer := _producer(tensor)) not in seen
            ):
                stack.append((producer, False))
    return order


def _bound_inputs(model: keras.Model, call: Any) -> list[Any]:
    """The tensors that a call of the nested `model` binds to its inputs, in
    the order of `model.inputs`, as `Functional.call` binds them: the first
    argument flattened (a keyword tensor such as `mask=` is not an input), a
    dict matched by input name where the model takes a list."""
    args, kwargs = call.arguments.args, call.arguments.kwargs
    value = args[0] if args else kwargs.get("inputs")
    names = [tensor.name for tensor in model.inputs]
    if (
        isinstance(value, dict)
        and not isinstance(model.input, dict)
        and set(names) <= set(value)
    ):
        return [value[name] for name in names]
    return list(keras.tree.flatten(value))


def check_model(model: Any, action: str) -> None:
    """Raises a clear error unless `model` is a built functional/Sequential model."""
    if not isinstance(model, keras.Model):
        raise invalid(
            "model",
            "a built keras.Model (functional or Sequential)",
            model,
            typed=True,
        )
    if isinstance(model, keras.Sequential):
        if not model.built or not _has_inputs(model):
            raise ValueError(
                f"Cannot {action} the Sequential model '{model.name}': it has no "
                f"defined inputs yet. Start it with `keras.Input(shape)` or call "
                f"`model.build(input_shape)` first."
            )
        return
    if not _has_inputs(model):
        raise ValueError(
            f"Cannot {action} the model '{model.name}' of class "
            f"{type(model).__name__}: it is a subclassed model, whose graph is "
            f"Python code that cannot be read or rewritten. Put the layer into "
            f"its `call` by hand instead: create `stopgrad_lr.GradientScale(0.1)` "
            f"in `__init__` and apply it to a block's output in `call`, or use "
            f"`stopgrad_lr.scale_gradient(x, 0.1)` there."
        )


def has_graph(layer: Any) -> bool:
    """Whether `layer` is a model with a graph to expand (functional or
    Sequential); a subclassed model is read and rebuilt like a layer."""
    return isinstance(layer, keras.Model) and _has_inputs(layer)


def _has_inputs(model: keras.Model) -> bool:
    try:
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False
