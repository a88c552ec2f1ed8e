"""Model surgery: insert or strip gradient scales, returning new models.

Every function here reads the input model and builds a new one; the input
model keeps its layers, graph and outputs. By default the new model shares
the input's layer objects (and so its weights), the way Keras's own
`clone_model(..., clone_function=lambda layer: layer)` does; `copy=True`
gives it weights of its own.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import keras

from stopgrad_lr._graph import (
    Graph,
    Node,
    check_model,
    cut_layers,
    effective_multipliers,
)
from stopgrad_lr._layers import SCALE_LAYERS, GradientScale, GradientStop
from stopgrad_lr._ops import validate_method, validate_scale
from stopgrad_lr._patterns import (
    Pattern,
    describe,
    matches,
    no_match_error,
    validate_pattern,
)

ON_BYPASS = ("error", "warn", "ignore")

# Relative tolerance when checking the multipliers a rewrite produced: the
# scales are stored in float32.
_CHECK_RTOL = 1e-6


def insert_gradient_scales(
    model: keras.Model,
    scales: Mapping[Pattern, float],
    *,
    method: str = "custom_gradient",
    on_bypass: str = "error",
    copy: bool = False,
    stop_at_zero: bool = True,
) -> keras.Model:
    """Returns a new model with a gradient scale after each matched layer.

    The new model's outputs are bit-identical to the input model's. With an
    SGD-like optimizer, a scale `k` after a layer multiplies the learning
    rate of that layer and of everything upstream of it by `k` (scales
    compound: `stopgrad_lr.effective_multipliers` tells what each layer
    gets).

    Args:
        model: A built functional or Sequential model, possibly nested.
        scales: Maps a pattern to a scale. A `str` is a glob matched against
            layer names (`fnmatch.fnmatchcase`); a compiled `re.Pattern` must
            `fullmatch`. A layer inside a nested model matches by its own name
            or by its path `"outer/inner"`; a nested model matches by its
            name, and the scale goes after its outputs. A shared layer gets
            the scale after each of its calls.
        method: `"custom_gradient"` or `"stop_gradient"`, see
            `stopgrad_lr.scale_gradient`.
        on_bypass: What to do when a matched layer is not a cut, so that a
            residual connection or another output carries gradient around it
            and its upstream layers would not get a clean multiplier:
            `"error"` (default) raises and names one bypassing path, `"warn"`
            warns once, `"ignore"` inserts silently.
        copy: `False` (default) shares the input model's layers and weights,
            so training the new model trains them. `True` gives the new model
            copies of the weights.
        stop_at_zero: A scale of exactly 0 inserts a `GradientStop`, which
            removes the backward pass upstream (faster, fixed). Pass `False`
            to insert `GradientScale(0.0)` instead, a zero that
            `stopgrad_lr.ScaleSchedule` can raise later but that still runs
            the backward pass.

    Returns:
        A new `keras.Model` (a Sequential model stays Sequential).

    Raises:
        ValueError: If the model is not a built functional or Sequential
            model; a pattern matches no layer (the closest names are listed);
            a layer is matched by two patterns with different scales; a
            matched layer already has a stopgrad_lr layer on its output; a
            scale is not finite; or `on_bypass="error"` and a matched layer
            is not a cut.

    Examples:
        >>> import keras, stopgrad_lr
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(8, name="block1")(inputs)
        >>> hidden = keras.layers.Dense(8, name="block2")(hidden)
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
        >>> scaled = stopgrad_lr.insert_gradient_scales(
        ...     model, {"block1": 0.1, "block2": 0.5}
        ... )
        >>> stopgrad_lr.effective_multipliers(scaled)
        {'block1': 0.05, 'block2': 0.5, 'head': 1.0}
    """
    check_model(model, "rewrite")
    method = validate_method(method)
    if on_bypass not in ON_BYPASS:
        raise ValueError(
            f"Invalid value received for argument `on_bypass`. Expected one of "
            f"{ON_BYPASS}. Received: on_bypass={on_bypass!r}"
        )
    graph = Graph(model)
    chosen = _match_scales(graph, scales)
    _check_no_scale_already(graph, chosen)
    if on_bypass != "ignore":
        _check_cuts(graph, chosen, on_bypass)
    return _insert(model, graph, chosen, method, stop_at_zero, copy)


def apply_lr_multipliers(
    model: keras.Model,
    multipliers: Mapping[Pattern, float],
    *,
    method: str = "custom_gradient",
    copy: bool = False,
    stop_at_zero: bool = True,
) -> keras.Model:
    """Returns a new model in which each group of layers gets its multiplier.

    You state the effective learning-rate multiplier you want per group
    (`{"conv1_*": 0.01, "conv2_*": 0.1}`); layers matched by no pattern get
    1.0. The function finds the cuts between the groups, inserts gradient
    scales with the right ratios there (scales compound, so the scale at a
    boundary is the ratio of the multipliers on either side), and checks the
    result with `stopgrad_lr.effective_multipliers`. A boundary is placed at
    the last cut before the next group, typically a block's output.

    The multipliers are learning-rate multipliers for SGD-like optimizers
    (plain, momentum, Nesterov); adaptive optimizers such as Adam cancel a
    gradient scale. See the optimizers page of the docs.

    Args:
        model: A built functional or Sequential model, possibly nested.
        multipliers: Maps a pattern (as in `insert_gradient_scales`) to a
            multiplier, a finite float >= 0. Only layers with trainable
            weights take part.
        method: `"custom_gradient"` or `"stop_gradient"`.
        copy: `True` gives the new model copies of the weights.
        stop_at_zero: Where a boundary needs a scale of 0 (a group with
            multiplier 0 below a group with a nonzero one), insert a
            `GradientStop` (default) or, with `False`, `GradientScale(0.0)`.

    Returns:
        A new `keras.Model`.

    Raises:
        ValueError: If a pattern matches no layer with trainable weights; a
            layer is matched by two patterns with different multipliers; a
            multiplier is negative or not finite; or no cut separates two
            layers with different multipliers (the message names both and a
            path that bypasses the boundary).

    Examples:
        >>> import keras, stopgrad_lr
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(8, name="conv1")(inputs)
        >>> hidden = keras.layers.Dense(8, name="conv2")(hidden)
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
        >>> tuned = stopgrad_lr.apply_lr_multipliers(
        ...     model, {"conv1": 0.01, "conv2": 0.1}
        ... )
        >>> stopgrad_lr.effective_multipliers(tuned)
        {'conv1': 0.01, 'conv2': 0.1, 'head': 1.0}
    """
    check_model(model, "rewrite")
    method = validate_method(method)
    graph = Graph(model)
    targets = _targets(graph, multipliers)
    chosen = _boundaries_for(graph, targets)
    new_model = _insert(model, graph, chosen, method, stop_at_zero, copy)
    _verify(new_model, graph, targets)
    return new_model


def layerwise_decay(
    model: keras.Model,
    boundaries: Pattern | Sequence[Pattern],
    decay: float,
    *,
    method: str = "custom_gradient",
    on_bypass: str = "error",
    copy: bool = False,
) -> keras.Model:
    """Returns a new model with layer-wise learning-rate decay.

    A scale of `decay` goes after each boundary layer (a block's output), so
    the block `i` boundaries below the head trains at `decay ** i` times the
    base rate: the layer-wise decay used to fine-tune BERT and ViT models.

    Args:
        model: A built functional or Sequential model.
        boundaries: A pattern, or a list of patterns, selecting the block
            output layers (as in `insert_gradient_scales`).
        decay: The factor per block, a finite float > 0 (typically 0.5-0.95).
        method: `"custom_gradient"` or `"stop_gradient"`.
        on_bypass: `"error"`, `"warn"` or `"ignore"`, as in
            `insert_gradient_scales`.
        copy: `True` gives the new model copies of the weights.

    Returns:
        A new `keras.Model`.

    Raises:
        ValueError: As `insert_gradient_scales`, or if `decay` is not > 0.

    Examples:
        >>> import keras, stopgrad_lr
        >>> x = inputs = keras.Input((4,))
        >>> for i in range(3):
        ...     x = keras.layers.Dense(4, name=f"block{i}_out")(x)
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
        >>> decayed = stopgrad_lr.layerwise_decay(model, "block*_out", 0.5)
        >>> stopgrad_lr.effective_multipliers(decayed)
        {'block0_out': 0.125, 'block1_out': 0.25, 'block2_out': 0.5, 'head': 1.0}
    """
    decay = validate_scale(decay, argument="decay")
    if decay <= 0:
        raise ValueError(
            f"Invalid value received for argument `decay`. Expected a float > 0 "
            f"(a stop is a scale of 0: use insert_gradient_scales). "
            f"Received: decay={decay!r}"
        )
    patterns = (
        [boundaries]
        if isinstance(boundaries, str | bytes) or not isinstance(boundaries, Sequence)
        else list(boundaries)
    )
    return insert_gradient_scales(
        model,
        {validate_pattern(p, "boundaries"): decay for p in patterns},
        method=method,
        on_bypass=on_bypass,
        copy=copy,
    )


def strip_gradient_scales(model: keras.Model, *, copy: bool = False) -> keras.Model:
    """Returns a new model without any of stopgrad_lr's layers.

    The outputs are bit-identical, and the new model saves to a `.keras` file
    that loads in a process that never imports stopgrad_lr (for deployment).

    Args:
        model: A built functional or Sequential model, possibly nested.
        copy: `True` gives the new model copies of the weights.

    Returns:
        A new `keras.Model`.

    Raises:
        ValueError: If `model` is not a built functional or Sequential model.

    Examples:
        >>> import keras, stopgrad_lr
        >>> inputs = keras.Input((4,))
        >>> hidden = stopgrad_lr.GradientScale(0.1)(keras.layers.Dense(8)(inputs))
        >>> model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
        >>> plain = stopgrad_lr.strip_gradient_scales(model)
        >>> [type(layer).__name__ for layer in plain.layers]
        ['InputLayer', 'Dense', 'Dense']
    """
    check_model(model, "rewrite")
    with _strategy_scope(model):
        return _finish(_Rebuild({}, drop_scales=True).model(model), model, copy)


# Matching -----------------------------------------------------------------


def _candidates(graph: Graph) -> dict[int, Node]:
    """The layers a pattern may select: every layer object (first call
    site), but not stopgrad_lr's own layers."""
    candidates: dict[int, Node] = {}
    for index in graph.order:
        node = graph.nodes[index]
        if not isinstance(node.layer, SCALE_LAYERS):
            candidates.setdefault(id(node.layer), node)
    return candidates


def _names(node: Node) -> tuple[str, str]:
    return node.path, node.layer.name


def _match(
    graph: Graph,
    patterns: Mapping[Pattern, float],
    argument: str,
    validate: Callable[[Any, str], float],
    keep: Callable[[Node], bool] = lambda node: True,
) -> dict[int, tuple[float, Pattern]]:
    """Layer id -> (value, pattern) for every layer a pattern selects."""
    if not isinstance(patterns, Mapping):
        raise ValueError(
            f"Invalid value received for argument `{argument}`. Expected a dict "
            f"mapping layer-name patterns to floats, such as {{'conv2_*': 0.1}}. "
            f"Received: {argument}={patterns!r}"
        )
    candidates = {key: node for key, node in _candidates(graph).items() if keep(node)}
    chosen: dict[int, tuple[float, Pattern]] = {}
    for pattern, raw_value in patterns.items():
        pattern = validate_pattern(pattern, f"{argument} key")
        value = validate(raw_value, f"{argument}[{describe(pattern)}]")
        selected = [
            key for key, node in candidates.items() if matches(pattern, *_names(node))
        ]
        if not selected:
            names = [node.path for node in candidates.values()]
            raise ValueError(no_match_error(pattern, names))
        for key in selected:
            previous = chosen.get(key)
            if previous is not None and previous[0] != value:
                raise ValueError(
                    f"Layer '{candidates[key].path}' is matched by pattern "
                    f"{describe(previous[1])} with value {previous[0]} and by "
                    f"pattern {describe(pattern)} with value {value}. Make the "
                    f"patterns disjoint or give them the same value."
                )
            chosen[key] = (value, pattern)
    return chosen


def _match_scales(graph: Graph, scales: Mapping[Pattern, float]) -> dict[int, float]:
    def validate(value: Any, argument: str) -> float:
        return validate_scale(value, argument=argument)

    return {
        key: value
        for key, (value, _) in _match(graph, scales, "scales", validate).items()
    }


def _check_no_scale_already(graph: Graph, chosen: Mapping[int, float]) -> None:
    for node in graph.nodes:
        if id(node.layer) not in chosen:
            continue
        for consumer in graph.consumers(node):
            if isinstance(consumer.layer, SCALE_LAYERS):
                raise ValueError(
                    f"Layer '{node.path}' already has the stopgrad_lr layer "
                    f"'{consumer.path}' on its output. Change that layer instead "
                    f"(`model.get_layer(...).scale = value`), or remove all "
                    f"scales first with `stopgrad_lr.strip_gradient_scales`."
                )


def _check_cuts(graph: Graph, chosen: Mapping[int, float], on_bypass: str) -> None:
    cuts = cut_layers(graph)
    candidates = _candidates(graph)
    problems = [
        f"'{candidates[key].path}' is bypassed along {cuts[key]}"
        for key in chosen
        if cuts.get(key) is not None
    ]
    if not problems:
        return
    message = (
        f"A gradient scale after these layers would not give the layers "
        f"upstream of them one clean multiplier, because part of the gradient "
        f"flows around them: {'; '.join(problems)}. Put the scale at a cut "
        f"instead, such as the block's output (`stopgrad_lr.gradient_cuts(model)` "
        f"lists them), or pass on_bypass='warn' or 'ignore' to insert it anyway."
    )
    if on_bypass == "error":
        raise ValueError(message)
    warnings.warn(message, UserWarning, stacklevel=3)


# Multipliers -> boundary scales ---------------------------------------------


def _targets(graph: Graph, multipliers: Mapping[Pattern, float]) -> dict[int, float]:
    """Layer id -> wanted multiplier, for every trainable layer."""

    def validate(value: Any, argument: str) -> float:
        value = validate_scale(value, argument=argument)
        if value < 0:
            raise ValueError(
                f"Invalid value received for argument `{argument}`. Expected a "
                f"multiplier >= 0 (a negative gradient scale reverses training; "
                f"use insert_gradient_scales or GradientReversal for that). "
                f"Received: {argument}={value!r}"
            )
        return value

    chosen = _match(
        graph, multipliers, "multipliers", validate, keep=lambda n: n.trainable
    )
    targets = {id(n.layer): 1.0 for n in graph.nodes if n.trainable}
    targets.update({key: value for key, (value, _) in chosen.items()})
    return targets


def _bits(value: int) -> Iterator[int]:
    while value:
        low = value & -value
        yield low.bit_length() - 1
        value ^= low


def _boundaries_for(graph: Graph, targets: Mapping[int, float]) -> dict[int, float]:
    """The scales to insert, by layer id, so that each layer gets its target.

    The regions upstream of cuts are nested or disjoint, so the cuts form a
    tree: each trainable layer belongs to the segment of the first cut (in
    topological order) whose region holds it, and a cut's parent is the next
    cut whose region holds it. A layer's multiplier is the product of the
    scales of the cuts whose regions hold it. Every segment must have one
    target; the scale at a cut is its level divided by its parent's.
    """
    cut_of_layer = cut_layers(graph)
    calls: dict[int, int] = {}
    for node in graph.nodes:
        calls[id(node.layer)] = calls.get(id(node.layer), 0) + 1
    cut_nodes = [
        node
        for node in (graph.nodes[index] for index in graph.order)
        if node.scale is None
        and calls[id(node.layer)] == 1
        and id(node.layer) in cut_of_layer
        and cut_of_layer[id(node.layer)] is None
    ]
    segment: dict[int, int] = {}  # node index -> index of its segment's cut
    parent: dict[int, int | None] = {}
    assigned = open_cuts = 0  # bit sets of node indices
    for cut in cut_nodes:
        region = graph.above[cut.index]
        for index in _bits(region & ~assigned):
            segment[index] = cut.index
        for child in _bits(region & open_cuts):
            parent[child] = cut.index
        assigned |= region
        open_cuts = (open_cuts & ~region) | 1 << cut.index
    for root in _bits(open_cuts):
        parent[root] = None

    reaches = graph.reaches_output()
    wanted: dict[int | None, dict[float, Node]] = {}
    for index in graph.order:
        node = graph.nodes[index]
        if node.trainable and reaches[index]:
            owner = segment.get(index)
            wanted.setdefault(owner, {}).setdefault(targets[id(node.layer)], node)
    for values in wanted.values():
        if len(values) > 1:
            _raise_inseparable(graph, values)
    top = wanted.get(None, {})
    if set(top) - {1.0}:
        ((value, node),) = top.items()
        raise ValueError(
            f"Layer '{node.path}' wants multiplier {value}, but no cut lies "
            f"between it and the model's outputs (another output or branch "
            f"bypasses every candidate), so its gradient cannot be scaled."
        )

    # The multiplier wanted below each cut: its segment's; for a segment
    # without trainable layers, its children's when they agree (so the
    # boundary lands at the last cut before the next group), else its
    # parent's (filled in top-down).
    provisional: dict[int, float | None] = {}
    children: dict[int, list[int]] = {}
    for cut in cut_nodes:
        own = wanted.get(cut.index)
        below = {provisional[child] for child in children.get(cut.index, [])}
        provisional[cut.index] = (
            next(iter(own)) if own else (below.pop() if len(below) == 1 else None)
        )
        up = parent[cut.index]
        if up is not None:
            children.setdefault(up, []).append(cut.index)
    level: dict[int, float] = {}
    for cut in reversed(cut_nodes):  # parents before children
        up = parent[cut.index]
        inherited = 1.0 if up is None else level[up]
        own_level = provisional[cut.index]
        level[cut.index] = inherited if own_level is None else own_level

    scales: dict[int, float] = {}
    for cut in cut_nodes:
        up = parent[cut.index]
        inner = level[cut.index]
        outer = 1.0 if up is None else level[up]
        if inner == outer:
            continue
        if outer == 0:
            raise ValueError(
                f"The layers downstream of '{cut.path}' have multiplier 0 (their "
                f"gradient is stopped), so the layers upstream of it cannot get "
                f"multiplier {inner}: no gradient reaches them."
            )
        scales[id(cut.layer)] = inner / outer
    return scales


def _raise_inseparable(graph: Graph, values: Mapping[float, Node]) -> None:
    position = {index: rank for rank, index in enumerate(graph.order)}
    (first_value, first), (second_value, second) = sorted(
        values.items(), key=lambda item: position[item[1].index]
    )[:2]
    detour = ""
    if graph.cuts().get(first.index) is False:
        source, destination = graph.bypass(first)
        detour = f", along {source.path} -> {destination.path}"
    raise ValueError(
        f"No cut separates layer '{first.path}' (multiplier {first_value}) from "
        f"layer '{second.path}' (multiplier {second_value}): part of the "
        f"gradient flows around every boundary between them{detour}. A gradient "
        f"scale there would give the upstream layers a mix of both multipliers. "
        f"Move the group boundary to a cut (`stopgrad_lr.gradient_cuts(model)` "
        f"lists them), or give a whole residual block one multiplier."
    )


def _verify(new_model: keras.Model, graph: Graph, targets: Mapping[int, float]) -> None:
    reaches = graph.reaches_output()
    got = effective_multipliers(new_model)
    for node in graph.nodes:
        if not (node.trainable and reaches[node.index]):
            continue
        want = targets[id(node.layer)]
        have = got.get(node.path, math.nan)
        if not math.isclose(have, want, rel_tol=_CHECK_RTOL, abs_tol=0.0):
            raise RuntimeError(  # pragma: no cover - a bug in this package
                f"stopgrad_lr bug: layer '{node.path}' got multiplier {have} "
                f"instead of {want}. Please report it with the model summary."
            )


# Building the new model -----------------------------------------------------


def _insert(
    model: keras.Model,
    graph: Graph,
    chosen: Mapping[int, float],
    method: str,
    stop_at_zero: bool,
    copy: bool,
) -> keras.Model:
    taken = {node.layer.name for node in graph.nodes}
    candidates = _candidates(graph)
    with _strategy_scope(model):
        after = {}
        for key, value in chosen.items():
            name = _unique(f"{candidates[key].layer.name}_gradient_scale", taken)
            if value == 0 and stop_at_zero:
                after[key] = GradientStop(name=name.replace("_scale", "_stop"))
            else:
                after[key] = GradientScale(value, method, name=name)
        return _finish(_Rebuild(after, drop_scales=False).model(model), model, copy)


def _unique(name: str, taken: set[str]) -> str:
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{name}_{number}"
    taken.add(candidate)
    return candidate


class _Rebuild:
    """Rebuilds a model (recursively) calling the same layer objects, with a
    layer added after some and, optionally, stopgrad_lr's layers left out."""

    def __init__(
        self, after: Mapping[int, keras.layers.Layer], drop_scales: bool
    ) -> None:
        self.after = after
        self.drop_scales = drop_scales
        self.rebuilt: dict[int, keras.Model] = {}  # nested models, by id

    def model(self, model: keras.Model) -> keras.Model:
        if id(model) not in self.rebuilt:
            self.rebuilt[id(model)] = (
                self._sequential(model)
                if isinstance(model, keras.Sequential)
                else self._functional(model)
            )
        return self.rebuilt[id(model)]

    def _replacement(self, layer: Any) -> Any:
        return self.model(layer) if isinstance(layer, keras.Model) else layer

    def _sequential(self, model: keras.Sequential) -> keras.Sequential:
        spec = model.inputs[0]
        layers: list[Any] = [keras.Input(batch_shape=spec.shape, dtype=spec.dtype)]
        for layer in model.layers:
            if self.drop_scales and isinstance(layer, SCALE_LAYERS):
                continue
            layers.append(self._replacement(layer))
            if id(layer) in self.after:
                layers.append(self.after[id(layer)])
        new = keras.Sequential(layers, name=model.name)
        if not model.trainable:
            new.trainable = False
        return new

    def _functional(self, model: keras.Model) -> keras.Model:
        originals: dict[int, Any] = {}

        def clone_function(layer: Any) -> Any:
            replacement = self._replacement(layer)
            originals[id(replacement)] = layer
            return replacement

        def call_function(layer: Any, *args: Any, **kwargs: Any) -> Any:
            if self.drop_scales and isinstance(layer, SCALE_LAYERS):
                return args[0]
            outputs = layer(*args, **kwargs)
            extra = self.after.get(id(originals.get(id(layer), layer)))
            if extra is None:
                return outputs
            return keras.tree.map_structure(
                lambda t: extra(t) if keras.backend.is_float_dtype(t.dtype) else t,
                outputs,
            )

        new = keras.models.clone_model(
            model, clone_function=clone_function, call_function=call_function
        )
        if not model.trainable:
            new.trainable = False
        return new


def _finish(new_model: keras.Model, original: keras.Model, copy: bool) -> keras.Model:
    if not copy:
        return new_model
    with _strategy_scope(original):
        copied = keras.models.clone_model(new_model)
        copied.set_weights(new_model.get_weights())
    return copied


def _strategy_scope(model: keras.Model) -> contextlib.AbstractContextManager[Any]:
    """The model's tf.distribute strategy scope, so new variables are
    distributed like the model's (TensorFlow only; a no-op elsewhere)."""
    strategy = getattr(model, "distribute_strategy", None)
    return strategy.scope() if strategy is not None else contextlib.nullcontext()
