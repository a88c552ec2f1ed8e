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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import keras

from stopgrad_lr._layers import SCALE_LAYERS

# Scales are stored and applied in float32, so a multiplier (a product of
# scales) is known to float32 precision: products along two paths that agree
# to a relative 1e-6 are one value (0.3 * (1/3 in float32) and 0.1), and a
# multiplier is reported to 7 significant digits. Products are carried
# unrounded: rounding each step would drift (0.5 ** 18 read 3.814695e-06).
_DIGITS = 7
_SAME = 1e-6


def _normalise(value: float) -> float:
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
    """One call of a layer (or Keras operation) in the flattened graph."""

    index: int
    path: str
    layer: Any
    inputs: list[int] = field(default_factory=list)  # float tensor ids
    outputs: list[int] = field(default_factory=list)  # tensor ids

    @property
    def trainable(self) -> bool:
        """Whether the call trains weights of its own (a nested model's
        container node does not: its layers are nodes of their own)."""
        if has_graph(self.layer):
            return False
        return bool(getattr(self.layer, "trainable_weights", None))

    @property
    def frozen(self) -> bool:
        """Whether the call is of a frozen layer: one with weights but none
        that train, because `trainable = False` is set on it (or on a model
        around it), or on the gamma and beta of a BatchNormalization (a
        freeze that keeps its batch statistics, see `_freeze`)."""
        layer = self.layer
        if (
            has_graph(layer)
            or isinstance(layer, SCALE_LAYERS)
            or not getattr(layer, "weights", None)
            or layer.trainable_weights
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
        self.tensors: list[Tensor] = []
        self.outputs: list[int] = []
        inputs = [
            self._new_tensor(None, keras.backend.is_float_dtype(t.dtype))
            for t in model.inputs
        ]
        for tensor_id in self._add_model(model, "", inputs):
            if self.tensors[tensor_id].is_float:
                self.outputs.append(tensor_id)
        # Nodes are added after the nodes they consume: a topological order.
        self.order = list(range(len(self.nodes)))
        # Per node, the bit set of itself and its ancestors; filled by cuts().
        self.above: list[int] = []
        self._cuts: dict[int, bool] | None = None
        self._reaches: list[bool] | None = None

    # Construction --------------------------------------------------------

    def _new_tensor(self, producer: int | None, is_float: bool) -> int:
        self.tensors.append(Tensor(producer, is_float))
        return len(self.tensors) - 1

    def _new_node(self, path: str, layer: Any, inputs: list[int]) -> Node:
        node = Node(len(self.nodes), path, layer)
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

    def reaches_output(self) -> list[bool]:
        """For each node, whether a float path leads from it to a model output."""
        if self._reaches is not None:
            return self._reaches
        reaches = [False] * len(self.nodes)
        outputs = set(self.outputs)
        for index in reversed(self.order):
            node = self.nodes[index]
            reaches[index] = any(t in outputs for t in node.outputs) or any(
                reaches[c.index] for c in self.consumers(node)
            )
        self._reaches = reaches
        return reaches

    def multiplier_sets(self) -> dict[int, frozenset[float]]:
        """For each node, the products of scales on its paths to the outputs.

        The set is that of the node's outputs: a scale layer's own set does
        not include its scale, which applies to what lies upstream of it.
        """
        at_tensor: dict[int, list[float]] = {t: [1.0] for t in self.outputs}
        sets: dict[int, frozenset[float]] = {}
        for index in reversed(self.order):
            node = self.nodes[index]
            values: list[float] = []
            for tensor_id in node.outputs:
                _merge(values, at_tensor.get(tensor_id, ()))
            sets[index] = frozenset(_normalise(v) for v in values)
            scale = node.scale
            passed = values if scale is None else [v * scale for v in values]
            for tensor_id in node.inputs:
                _merge(at_tensor.setdefault(tensor_id, []), passed)
        return sets

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

        above = [0] * len(self.nodes)
        escapes = [0] * len(self.nodes)
        carries = [False] * len(self.nodes)  # a weight gradient flows through
        strict_escapes = [0] * len(self.nodes)
        for index in self.order:
            node = self.nodes[index]
            bits, inherited = 1 << index, 0
            carries[index] = node.trainable
            for producer in self.producers(node):
                bits |= above[producer.index]
                inherited |= escapes[producer.index]
                carries[index] = carries[index] or carries[producer.index]
            above[index], strict_escapes[index] = bits, inherited
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

        self.above = above
        self._cuts = {
            node.index: not strict_escapes[node.index] & ~above[node.index]
            for node in self.nodes
            if carries[node.index] and reaches[node.index]
        }
        return self._cuts

    def bypass(self, node: Node) -> tuple[Node, Node]:
        """One edge from the upstream region of a non-cut `node` that avoids it.

        Only called to explain an error, after `cuts()`.
        """
        reaches = self.reaches_output()
        region = self.above[node.index]
        outputs = set(self.outputs)
        for index in self.order:
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

    def layer_paths(self) -> dict[int, str]:
        """The path of every distinct layer object, first call site wins."""
        paths: dict[int, str] = {}
        for node in self.nodes:
            paths.setdefault(id(node.layer), node.path)
        return paths


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
        raise ValueError(
            f"Invalid value received for argument `model`. Expected a built "
            f"keras.Model (functional or Sequential). Received: model={model!r} "
            f"of type {type(model).__name__}"
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


def _multiplier(values: frozenset[float]) -> float:
    if len(values) == 1:
        return next(iter(values))
    return math.nan if values else 0.0


def _layer_multiplier_sets(graph: Graph) -> dict[int, frozenset[float]]:
    """Per layer object: the union of the multiplier sets of its call sites,
    and {0.0} for a frozen layer, whose learning rate is 0 whatever reaches
    it."""
    node_sets = graph.multiplier_sets()
    per_layer: dict[int, set[float]] = {}
    for index in graph.order:
        node = graph.nodes[index]
        values = {0.0} if node.frozen else node_sets[index]
        per_layer.setdefault(id(node.layer), set()).update(values)
    return {key: frozenset(values) for key, values in per_layer.items()}


def effective_multipliers(model: keras.Model) -> dict[str, float]:
    """The learning-rate multiplier that each trainable layer really gets.

    For every layer with trainable weights, the product of the gradient
    scales on its paths to the model's outputs. When all paths agree, that
    product is the layer's multiplier: with an SGD-like optimizer the layer
    trains as if its learning rate were multiplied by it.

    When paths disagree the value is `nan`: the layer's gradient is a sum of
    path gradients scaled differently (a residual connection that bypasses a
    scale, a second model output, another call of a shared layer), so no
    single multiplier describes it. `stopgrad_lr.summary` lists the products
    found. A layer with no float path to an output gets 0.0, and so does a
    frozen one (weights but none trainable: `trainable = False`, such as the
    layers upstream of a freeze by `insert_gradient_scales`).

    Args:
        model: A built functional or Sequential model; nested models are
            analysed too.

    Returns:
        A dict from layer path (its name, or `"outer/inner"` inside a nested
        model) to its multiplier, in topological order.

    Raises:
        ValueError: If `model` is not a built functional or Sequential model.

    Examples:
        >>> import keras, stopgrad_lr
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(8, name="body")(inputs)
        >>> hidden = stopgrad_lr.GradientScale(0.1)(hidden)
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
        >>> stopgrad_lr.effective_multipliers(model)
        {'body': 0.1, 'head': 1.0}
    """
    check_model(model, "analyse")
    graph = Graph(model)
    sets = _layer_multiplier_sets(graph)
    result: dict[str, float] = {}
    for index in graph.order:
        node = graph.nodes[index]
        if (node.trainable or node.frozen) and node.path not in result:
            result[node.path] = _multiplier(sets[id(node.layer)])
    return result


def block_boundaries(graph: Graph) -> list[Node]:
    """The layers after which layer-wise decay puts a scale when asked to
    choose the blocks itself, in topological order.

    A boundary is a cut through which the whole network passes: every layer
    with trainable weights before it (in topological order) lies upstream of
    it, and every one after it downstream. Of consecutive such cuts with no
    trainable layer between them, the last one is the boundary (a block's
    output, just before the next block starts). The last block, the head,
    gets none. A shared layer or a stopgrad_lr layer is never a boundary.
    """
    cuts = graph.cuts()  # fills graph.above
    reaches = graph.reaches_output()
    calls: dict[int, int] = {}
    for node in graph.nodes:
        calls[id(node.layer)] = calls.get(id(node.layer), 0) + 1
    trains = [node.trainable and reaches[node.index] for node in graph.nodes]
    downstream_of_all_later: dict[int, int] = {}
    later = -1  # the AND of `above` over the trainable layers after a node
    for index in reversed(graph.order):
        downstream_of_all_later[index] = later
        if trains[index]:
            later &= graph.above[index]
    boundaries: list[Node] = []
    pending: Node | None = None
    earlier = 0  # the trainable layers before a node
    for index in graph.order:
        node = graph.nodes[index]
        if trains[index] and pending is not None:
            boundaries.append(pending)
            pending = None
        if (
            cuts.get(index)
            and node.scale is None
            and calls[id(node.layer)] == 1
            and not earlier & ~graph.above[index]
            and downstream_of_all_later[index] >> index & 1
        ):
            pending = node
        if trains[index]:
            earlier |= 1 << index
    return boundaries


def cut_layers(graph: Graph) -> dict[int, Node | None]:
    """Per layer object with weights upstream: None if a scale after each of
    its calls gives a clean multiplier, else the call that does not
    (`explain_bypass` says why; it is not computed here, to stay linear).

    A shared layer is a cut when each call is, and no call feeds another
    (then its own weights would get the scale once along one call and twice
    along the other).
    """
    cuts = graph.cuts()
    sites: dict[int, list[Node]] = {}
    for index in graph.order:
        if index in cuts:
            node = graph.nodes[index]
            sites.setdefault(id(node.layer), []).append(node)
    per_layer: dict[int, Node | None] = {}
    for key, nodes in sites.items():
        per_layer[key] = next(
            (
                node
                for node in nodes
                if not cuts[node.index] or _feeds_itself(graph, node, nodes)
            ),
            None,
        )
    return per_layer


def _feeds_itself(graph: Graph, node: Node, calls: list[Node]) -> bool:
    """Whether another call of the same layer lies downstream of `node`."""
    return any(
        other is not node and graph.above[other.index] >> node.index & 1
        for other in calls
    )


def explain_bypass(graph: Graph, node: Node) -> str:
    """Why a scale after `node` (a non-cut from `cut_layers`) is bypassed."""
    if graph.cuts()[node.index]:
        return (
            f"{node.path} -> {node.path} (its output feeds another call of the "
            f"same layer)"
        )
    source, destination = graph.bypass(node)
    return f"{source.path} -> {destination.path}"


def gradient_cuts(model: keras.Model) -> list[str]:
    """The layers where a gradient scale gives a clean multiplier.

    A layer is a cut when every gradient path from the trainable weights
    upstream of it (its own included) to the model's outputs passes through
    its output. A scale there multiplies the gradient of all of them by
    exactly the scale. A layer inside a residual block is not a cut: the skip
    connection carries part of the gradient around it. Only float tensors are
    gradient paths; a shared layer is a cut when each of its calls is.
    stopgrad_lr's own layers are not listed.

    Args:
        model: A built functional or Sequential model.

    Returns:
        Layer paths in topological order.

    Raises:
        ValueError: If `model` is not a built functional or Sequential model.

    Examples:
        >>> import keras, stopgrad_lr
        >>> inputs = keras.Input((4,))
        >>> body = keras.layers.Dense(4, name="body")(inputs)
        >>> branch = keras.layers.Dense(4, name="branch")(body)
        >>> added = keras.layers.Add(name="add")([body, branch])
        >>> model = keras.Model(inputs, keras.layers.Dense(1, name="head")(added))
        >>> stopgrad_lr.gradient_cuts(model)
        ['body', 'add', 'head']
    """
    check_model(model, "analyse")
    graph = Graph(model)
    cuts = cut_layers(graph)
    result: list[str] = []
    seen: set[int] = set()
    for index in graph.order:
        node = graph.nodes[index]
        key = id(node.layer)
        if key in seen or node.scale is not None:
            continue
        seen.add(key)
        if key in cuts and cuts[key] is None:
            result.append(node.path)
    return result


class SummaryRow(NamedTuple):
    """One row of `stopgrad_lr.summary`."""

    layer: str
    type: str
    trainable_params: int
    is_cut: bool
    multipliers: tuple[float, ...]

    @property
    def multiplier(self) -> float:
        """The single multiplier, `nan` when paths disagree (see `multipliers`)."""
        return _multiplier(frozenset(self.multipliers))


def summary(
    model: keras.Model, print_fn: Callable[[str], None] | None = print
) -> list[SummaryRow]:
    """Prints each layer with its cut status and effective multiplier.

    Like `model.summary()`, one line per layer (nested models expanded):
    type, number of trainable parameters, whether the layer is a cut (a scale
    after it gives everything upstream a clean multiplier), and the product
    of the gradient scales between its output and the model's outputs, or
    every distinct product when paths disagree; a frozen layer (weights but
    none trainable) reads `0 (frozen)`.

    Args:
        model: A built functional or Sequential model.
        print_fn: Called with each line; `None` prints nothing.

    Returns:
        The rows, as `SummaryRow` tuples, in topological order.

    Raises:
        ValueError: If `model` is not a built functional or Sequential model.

    Examples:
        >>> import keras, stopgrad_lr
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(8, name="body")(inputs)
        >>> hidden = stopgrad_lr.GradientScale(0.1, name="scale")(hidden)
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
        >>> rows = stopgrad_lr.summary(model)
        Layer  Type           Trainable params  Cut  Multiplier
        body   Dense                        40  yes         0.1
        scale  GradientScale                 0    -           1
        head   Dense                        18  yes           1
        Total trainable params: 58
        >>> rows[0].multiplier
        0.1
    """
    check_model(model, "summarise")
    if print_fn is not None and not callable(print_fn):
        raise ValueError(
            f"Invalid value received for argument `print_fn`. Expected a "
            f"function called with each line (such as `print`, the default), or "
            f"None to print nothing. Received: print_fn={print_fn!r}"
        )
    graph = Graph(model)
    sets = _layer_multiplier_sets(graph)
    cuts = cut_layers(graph)
    rows: list[SummaryRow] = []
    seen: set[int] = set()
    for index in graph.order:
        node = graph.nodes[index]
        key = id(node.layer)
        if key in seen:
            continue
        seen.add(key)
        # A nested model's container row would repeat its layers' weights; a
        # raw operation (`x + 1.0`) has none.
        weights = node.layer.trainable_weights if node.trainable else []
        rows.append(
            SummaryRow(
                node.path,
                type(node.layer).__name__,
                sum(math.prod(w.shape) for w in weights),
                key in cuts and cuts[key] is None and node.scale is None,
                tuple(sorted(sets[key])),
            )
        )
    if print_fn is not None:
        for line in _format_rows(rows, graph, cuts):
            print_fn(line)
    return rows


def _format_rows(
    rows: list[SummaryRow], graph: Graph, cuts: dict[int, Any]
) -> list[str]:
    layers = {node.path: node for node in graph.nodes}
    table = [("Layer", "Type", "Trainable params", "Cut", "Multiplier")]
    for row in rows:
        node = layers[row.layer]
        if node.scale is not None or id(node.layer) not in cuts:
            cut = "-"  # a scale layer itself, or no weights upstream
        else:
            cut = "yes" if row.is_cut else "no"
        values = ", ".join(f"{v:g}" for v in row.multipliers) or "none"
        if node.frozen:
            values += " (frozen)"
        table.append(
            (
                row.layer,
                row.type,
                str(row.trainable_params),
                cut,
                values if len(row.multipliers) < 2 else f"mixed: {values}",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(5)]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 2 or i == 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in table
    ]
    total = sum(row.trainable_params for row in rows)
    return [*lines, f"Total trainable params: {total}"]
