"""What the graph says about learning rates: each layer's effective
multiplier, the cuts where a scale is clean, the automatic block
boundaries, and the summary table."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import keras

from stopgrad_lr._graph import Graph, Node, check_model, normalise
from stopgrad_lr._layers import ParameterScale
from stopgrad_lr._validation import invalid


def multiplier_of(values: frozenset[float]) -> float:
    """The one multiplier of a set of path products: `nan` when they
    disagree, 0.0 when there is no path."""
    if len(values) == 1:
        return next(iter(values))
    return math.nan if values else 0.0


def _layer_multiplier_sets(
    graph: Graph, parameter_scales: bool = True
) -> dict[int, frozenset[float]]:
    """Per layer object: the union of the multiplier sets of its call sites,
    and {0.0} for a frozen layer, whose learning rate is 0 whatever reaches
    it. With `parameter_scales`, a reparametrised layer's sets are times its
    `ParameterScale.multiplier` (see `parameter_scale_of`). A layer that
    trains a variable another layer also holds gets that layer's sets too
    (see `variable_multiplier_sets`)."""
    per_layer = _call_sets(graph, parameter_scales)
    per_variable = _shared(graph, per_layer)
    for node in graph.nodes:
        if node.variables:
            per_layer[id(node.layer)] = frozenset().union(
                *(per_variable[id(v)] for v in node.variables)
            )
    return per_layer


def variable_multiplier_sets(
    graph: Graph, parameter_scales: bool = True
) -> dict[int, frozenset[float]]:
    """Per trainable variable (id): the union of the sets of every layer
    that holds it. Layers share variables beyond the calls of one layer: a
    keras-hub causal LM projects its output back through its backbone's
    token embedding, which in OPT is a sublayer of the backbone's
    `embeddings` layer, so the embedding matrix trains through both paths
    while the position embeddings beside it train through one."""
    return _shared(graph, _call_sets(graph, parameter_scales))


def _call_sets(graph: Graph, parameter_scales: bool) -> dict[int, frozenset[float]]:
    """Per layer object: the union of its own calls' sets (see
    `_layer_multiplier_sets`)."""
    node_sets = graph.multiplier_sets()
    per_layer: dict[int, set[float]] = {}
    for node in graph.nodes:
        values: frozenset[float] | set[float] = node_sets[node.index]
        scale = parameter_scale_of(graph, node) if parameter_scales else None
        if node.frozen:
            values = {0.0}
        elif scale is not None:
            values = {normalise(v * scale.multiplier) for v in values}
        per_layer.setdefault(id(node.layer), set()).update(values)
    return {key: frozenset(values) for key, values in per_layer.items()}


def _shared(
    graph: Graph, per_layer: dict[int, frozenset[float]]
) -> dict[int, frozenset[float]]:
    """Per trainable variable (id): the union of `per_layer`'s sets of the
    layers that hold it."""
    per_variable: dict[int, set[float]] = {}
    for node in graph.nodes:
        for variable in node.variables:
            per_variable.setdefault(id(variable), set()).update(
                per_layer[id(node.layer)]
            )
    return {key: frozenset(values) for key, values in per_variable.items()}


def parameter_scale_of(graph: Graph, node: Node) -> ParameterScale | None:
    """The `ParameterScale` that reparametrises `node`'s layer: the one layer
    its output goes into. Its weights' gradient is then `scale` times what
    it was, which the optimizer kind it was chosen for (`update_rule`, set by
    `apply_lr_multipliers` from its `optimizer`) turns into the learning-rate
    multiplier `ParameterScale.multiplier`; the layers upstream are not
    affected (the stored weights are divided by the same `scale`)."""
    consumers = {id(c.layer): c.layer for c in graph.consumers(node)}
    if len(consumers) != 1 or any(t in graph.outputs for t in node.outputs):
        return None
    (layer,) = consumers.values()
    return layer if isinstance(layer, ParameterScale) else None


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
    return layer_multipliers(Graph(model))


def layer_multipliers(graph: Graph, parameter_scales: bool = True) -> dict[str, float]:
    """`effective_multipliers` of the model that `graph` was read from
    (without reparametrisations, with `parameter_scales=False`)."""
    sets = _layer_multiplier_sets(graph, parameter_scales)
    return {
        node.path: multiplier_of(sets[id(node.layer)])
        for node in graph.first_calls()
        if node.trainable or node.frozen
    }


def block_boundaries(graph: Graph) -> list[Node]:
    """The layers after which layer-wise decay puts a scale when asked to
    choose the blocks itself, in topological order: one per block as the
    model's authors named it.

    The graph proposes: a candidate is a cut through which the whole network
    passes (every layer with trainable weights before it, in topological
    order, lies upstream of it, and every one after it downstream); of
    consecutive candidates with no trainable layer between them, the last
    one (a block's output, just before the next block starts). The names
    decide where the graph over-splits a block (each convolution and
    normalisation of a non-residual block is a cut of its own): the layers
    between two candidates form a segment, and consecutive segments whose
    trainable layers share a block prefix (`block_prefix`) are one block;
    a segment with no indexed name joins the block below it (the stem, or
    the embedding stage), or the head when no indexed block follows. A model
    whose names carry no block index keeps one block per segment. The last
    block, the head, gets no boundary. A shared layer or a stopgrad_lr layer
    is never a boundary.
    """
    reaches = graph.reaches_output()
    trains = [node.trainable and reaches[node.index] for node in graph.nodes]
    everything = sum(1 << index for index, flag in enumerate(trains) if flag)
    found = _named_blocks(graph, _whole_network_cuts(graph, everything), everything)
    if found:
        return found
    # No cut passes the whole network (two towers, an encoder and a
    # decoder): each tower is searched on its own, and decayed by its depth.
    for tower in _towers(graph, everything):
        found.extend(_named_blocks(graph, _whole_network_cuts(graph, tower), tower))
    return sorted(found, key=lambda node: node.index)


def _towers(graph: Graph, trainable: int) -> list[int]:
    """The trainable layers grouped by the first trainable layers upstream of
    them (the layers with none upstream: a vision and a text embedding, an
    encoder's and a decoder's): each group is a tower, and the
    layers that join towers (a head) form a group of their own. `trainable`
    and the result are bit sets of node indices."""
    above = graph.ancestors()
    roots = 0
    for node in graph.nodes:
        bit = 1 << node.index
        if trainable & bit and not above[node.index] & trainable & ~bit:
            roots |= bit
    groups: dict[int, int] = {}
    for node in graph.nodes:
        if trainable >> node.index & 1:
            signature = above[node.index] & roots
            groups[signature] = groups.get(signature, 0) | 1 << node.index
    return list(groups.values())


def _named_blocks(graph: Graph, found: list[Node], members: int) -> list[Node]:
    """`found` (candidates in topological order), grouped by block prefix:
    the boundaries of `block_boundaries` among the trainable layers of the
    bit set `members`."""
    segments: list[set[str]] = [set() for _ in range(len(found) + 1)]
    position = 0
    for node in graph.nodes:
        while position < len(found) and found[position].index < node.index:
            position += 1
        if members >> node.index & 1:
            prefix = _authored_prefix(node)
            if prefix is not None:
                segments[position].add(prefix)
    named = [i for i, prefixes in enumerate(segments) if prefixes]
    if not named:
        return found
    last_named = named[-1]
    kept: list[Node] = []
    block = segments[0]
    for i in range(1, last_named + 1):
        if segments[i] and not _same_block(segments[i], block):
            kept.append(found[i - 1])
            block = set(segments[i])
        else:
            block |= segments[i]
    if last_named < len(found):
        kept.append(found[last_named])
    return kept


_TOWER_WORDS = ("encoder", "decoder", "vision", "text")


def tower_levels(graph: Graph) -> dict[str, int] | None:
    """Per trainable layer path, its level under layer-wise decay by tower,
    from the names alone; None unless the names place the layers in two
    towers or more.

    A layer's tower is the first of `encoder`, `decoder`, `vision`, `text`
    among the words of its path (`clip_vision_encoder/encoder_block_0` is
    in `vision`). In each tower, in topological order, the layers group into
    blocks by `block_prefix` as in `block_boundaries` (the embedding stage
    first; a layer without an indexed name joins the block below, or the
    head after the last indexed block), and block `g` of a tower with `B`
    gets level `B - g`: each tower is decayed by its own depth. A layer in
    no tower is the head (level 0), but for an embedding shared by the towers
    (T5's and Bart's `token_embedding`), which takes the deepest tower's
    embedding level.
    """
    reaches = graph.reaches_output()
    towers: dict[str, list[Node]] = {}
    shared: list[Node] = []
    for node in graph.first_calls():
        if not (node.trainable and reaches[node.index]):
            continue
        words = re.split(r"[_/.\-]+", node.path.lower())
        tower = next((word for word in words if word in _TOWER_WORDS), None)
        if tower is None:
            shared.append(node)
        else:
            towers.setdefault(tower, []).append(node)
    if len(towers) < 2:
        return None
    levels: dict[str, int] = {}
    deepest_embedding = 0
    for nodes in towers.values():
        prefixes = [_authored_prefix(node) for node in nodes]
        last = max(
            (i for i, prefix in enumerate(prefixes) if prefix is not None), default=-1
        )
        groups: list[int] = []  # per layer: its block number in the tower
        block: set[str] = set()
        for i, prefix in enumerate(prefixes):
            if i > last:
                groups.append(-1)  # the head
            elif prefix is not None and groups and not _same_block({prefix}, block):
                groups.append(max(groups) + 1)
                block = {prefix}
            else:
                groups.append(max(groups, default=0))
                block |= {prefix} if prefix is not None else set()
        count = max(groups, default=-1) + 1
        has_embedding = _EMBEDDING in prefixes
        deepest_embedding = max(deepest_embedding, count + (not has_embedding))
        for node, group in zip(nodes, groups, strict=True):
            levels[node.path] = 0 if group < 0 else count - group
    for node in shared:
        embedding = block_prefix(node.layer.name) == _EMBEDDING
        levels[node.path] = deepest_embedding if embedding else 0
    return {
        node.path: levels[node.path]
        for node in graph.first_calls()
        if node.path in levels
    }


_EMBEDDING = "embeddings"


def block_prefix(name: str) -> str | None:
    """The block a layer's name places it in, or None for a name without a
    block index.

    The name is split into words at `_`, `/`, `.` and `-`; the prefix runs up
    to the last word holding a digit, the block index (`block_1_expand_BN`
    -> `block_1`, `conv2_block1_1_conv` -> `conv2_block1_1`,
    `transformer_layer_0` itself), as timm's `group_matcher` names blocks by
    their index. Any name with a word holding "embed" is the embedding stage
    (`token_embedding`, `embeddings_layer_norm`, `patch_embed`).
    """
    words = [word for word in re.split(r"[_/.\-]+", name.lower()) if word]
    if any("embed" in word for word in words):
        return _EMBEDDING
    indexed = [i for i, word in enumerate(words) if any(c.isdigit() for c in word)]
    if not indexed:
        return None
    return "_".join(words[: indexed[-1] + 1])


def _authored_prefix(node: Node) -> str | None:
    """`block_prefix` of a layer's name, or None for a name Keras chose
    (`conv2d`, `batch_normalization_3`: the class name and a counter), which
    names no block."""
    name = node.layer.name
    automatic = _snake_case(type(node.layer).__name__)
    if re.fullmatch(rf"{re.escape(automatic)}(_\d+)?", name):
        return None
    return block_prefix(name)


def _snake_case(name: str) -> str:
    """A class name as Keras turns it into a layer's default name."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _same_block(prefixes: set[str], block: set[str]) -> bool:
    """Whether two segments share a block prefix, or two prefixes that name
    one block: one that starts or ends with the other word by word
    (ResNet50V2's `conv2_block1` pre-activation before `conv2_block1_1`;
    MobileNetV2's `bn_Conv1` after `Conv1`), or two that differ in one word
    without a digit (MobileNet's `conv_dw_1` and `conv_pw_1`)."""
    return any(_one_block(a, b) for a in prefixes for b in block)


def _one_block(a: str, b: str) -> bool:
    if a == b or a.startswith(f"{b}_") or b.startswith(f"{a}_"):
        return True
    if a.endswith(f"_{b}") or b.endswith(f"_{a}"):
        return True
    words_a, words_b = a.split("_"), b.split("_")
    if len(words_a) != len(words_b):
        return False
    differ = [(x, y) for x, y in zip(words_a, words_b, strict=True) if x != y]
    # `conv_dw_1` / `conv_pw_1`; an index, or an encoder and a decoder, is
    # another block.
    return (
        len(differ) == 1
        and not any(c.isdigit() for word in differ[0] for c in word)
        and not set(differ[0]) & set(_TOWER_WORDS)
    )


def _whole_network_cuts(graph: Graph, members: int) -> list[Node]:
    """The candidates of `block_boundaries` among the trainable layers of
    the bit set `members` (the whole network, or one tower), from the graph
    alone."""
    cuts = graph.cuts()
    above = graph.ancestors()
    trains = [bool(members >> node.index & 1) for node in graph.nodes]
    downstream_of_all_later: dict[int, int] = {}
    later = -1  # the AND of `above` over the trainable layers after a node
    for index in reversed(range(len(graph.nodes))):
        downstream_of_all_later[index] = later
        if trains[index]:
            later &= above[index]
    boundaries: list[Node] = []
    pending: Node | None = None
    earlier = 0  # the trainable layers before a node
    for node in graph.nodes:
        index = node.index
        if trains[index] and pending is not None:
            boundaries.append(pending)
            pending = None
        if (
            cuts.get(index)
            and node.scale is None
            and graph.calls(node.layer) == 1
            and (earlier or trains[index])
            and not earlier & ~above[index]
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
    for node in graph.nodes:
        if node.index in cuts:
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
        other is not node and graph.ancestors()[other.index] >> node.index & 1
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
    for node in graph.first_calls():
        key = id(node.layer)
        if node.scale is None and key in cuts and cuts[key] is None:
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
        return multiplier_of(frozenset(self.multipliers))


def summary(
    model: keras.Model, print_fn: Callable[[str], None] | None = print
) -> list[SummaryRow]:
    """Prints each layer with its cut status and effective multiplier.

    Like `model.summary()`, one line per layer (nested models expanded):
    type, number of trainable parameters, whether the layer is a cut (a scale
    after it gives everything upstream a clean multiplier), and the product
    of the gradient scales between its output and the model's outputs, or
    every distinct product when paths disagree; a frozen layer (weights but
    none trainable) reads `0 (frozen)`. When the layers train at more than
    one rate, a line counts the distinct multipliers (a layer-wise decay
    with `n` boundaries makes `n + 1`: the head's 1 and `decay ** i` for
    `i` up to `n`).

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
        Learning-rate levels: 2 multipliers, 1 down to 0.1
        Total trainable params: 58
        >>> rows[0].multiplier
        0.1
    """
    check_model(model, "summarise")
    if print_fn is not None and not callable(print_fn):
        raise invalid(
            "print_fn",
            "a function called with each line (such as `print`, the default), or None"
            " to print nothing",
            print_fn,
        )
    graph = Graph(model)
    sets = _layer_multiplier_sets(graph)
    cuts = cut_layers(graph)
    rows: list[SummaryRow] = []
    for node in graph.first_calls():
        key = id(node.layer)
        # A nested model's container row would repeat its layers' weights; a
        # raw operation (`x + 1.0`) has none.
        weights = node.variables
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
    # A layer's multiplier counts when it trains (a frozen one has 0) and is
    # one value (nan when paths disagree).
    levels = sorted(
        {
            row.multiplier
            for row in rows
            if row.trainable_params and not math.isnan(row.multiplier)
        },
        reverse=True,
    )
    if len(levels) > 1:
        lines.append(
            f"Learning-rate levels: {len(levels)} multipliers, "
            f"{levels[0]:g} down to {levels[-1]:g}"
        )
    total = sum(row.trainable_params for row in rows)
    return [*lines, f"Total trainable params: {total}"]
