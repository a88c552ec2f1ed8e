"""What every model rewrite shares: selecting layers by pattern and rebuilding.

`_rewrite.py` (gradient scales) and `_reparam.py` (reparametrisation) both
select layers with `match` and build the new model with `Rebuild`, which
calls the input model's layer objects again (sharing their weights) unless
told to swap a layer for another, to call more layers after it, or to leave
some layers out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras

from stopgrad_lr._graph import Graph, Node, check_model, has_graph
from stopgrad_lr._layers import SCALE_LAYERS
from stopgrad_lr._patterns import (
    Pattern,
    describe,
    iter_layers,
    matches,
    no_match_error,
    validate_pattern,
)
from stopgrad_lr._validation import invalid, validate_multiplier


def check_rewritable(model: Any, function: str) -> None:
    """Raises a clear error for a model that a rewrite cannot return as such.

    A keras-hub task (a functional model with a `backbone` and a
    `preprocessor`) rebuilt by `clone_model` is a plain `keras.Model`: it would
    lose its preprocessor, its `compile` defaults and its task methods.
    """
    check_model(model, "rewrite")
    if isinstance(getattr(model, "backbone", None), keras.Model) and hasattr(
        model, "preprocessor"
    ):
        task = type(model).__name__
        raise ValueError(
            f"Cannot rewrite the keras-hub task '{model.name}' ({task}) as a "
            f"whole: the rewritten model would be a plain keras.Model without "
            f"its preprocessor and task methods. Rewrite its backbone and build "
            f"the task around it: `tuned = stopgrad_lr.{function}(task.backbone, "
            f"...)`, then `keras_hub.models.{task}(backbone=tuned, "
            f"preprocessor=task.preprocessor, ...)` with the task's other "
            f"arguments."
        )


def candidates(graph: Graph) -> dict[int, Node]:
    """The layers a pattern may select: every layer object (first call
    site), but not stopgrad_lr's own gradient layers."""
    found: dict[int, Node] = {}
    for node in graph.first_calls():
        if not isinstance(node.layer, SCALE_LAYERS):
            found[id(node.layer)] = node
    return found


def _names(node: Node) -> tuple[str, str]:
    return node.path, node.layer.name


def match(
    graph: Graph,
    patterns: Mapping[Pattern, float],
    argument: str,
    validate: Callable[[Any, str], float],
    keep: Callable[[Node], bool] = lambda node: True,
) -> dict[int, tuple[float, Pattern]]:
    """Layer id -> (value, pattern) for every layer a pattern selects."""
    if not isinstance(patterns, Mapping):
        raise invalid(
            argument,
            "a dict mapping layer-name patterns to floats, such as {'conv2_*': 0.1}",
            patterns,
        )
    if not patterns:
        raise ValueError(
            f"Invalid value received for argument `{argument}`. Expected a "
            f"non-empty dict mapping layer-name patterns to floats, such as "
            f"{{'conv2_*': 0.1}}: an empty one would change nothing. Received: "
            f"{argument}={{}}"
        )
    selectable = {key: node for key, node in candidates(graph).items() if keep(node)}
    chosen: dict[int, tuple[float, Pattern]] = {}
    for pattern, raw_value in patterns.items():
        pattern = validate_pattern(pattern, f"{argument} key")
        value = validate(raw_value, f"{argument}[{describe(pattern)}]")
        selected = [
            key for key, node in selectable.items() if matches(pattern, *_names(node))
        ]
        if not selected:
            raise ValueError(_not_selectable(graph, pattern, selectable))
        for key in selected:
            previous = chosen.get(key)
            if previous is not None and previous[0] != value:
                raise ValueError(
                    f"Layer '{selectable[key].path}' is matched by pattern "
                    f"{describe(previous[1])} with value {previous[0]} and by "
                    f"pattern {describe(pattern)} with value {value}. Make the "
                    f"patterns disjoint or give them the same value."
                )
            chosen[key] = (value, pattern)
    return chosen


def _not_selectable(
    graph: Graph, pattern: Pattern, selectable: Mapping[int, Node]
) -> str:
    """Why `pattern` selected nothing: it matches no layer, or only layers that
    cannot be selected here (the reason is named)."""
    for node in graph.nodes:
        if id(node.layer) in selectable or not matches(pattern, *_names(node)):
            continue
        kind = f"'{node.path}' ({type(node.layer).__name__})"
        if isinstance(node.layer, SCALE_LAYERS):
            return (
                f"Pattern {describe(pattern)} matches only the stopgrad_lr layer "
                f"{kind}, which cannot be selected. Change its scale instead "
                f"(`model.get_layer(...).scale = value`), or select the layer "
                f"before it."
            )
        if getattr(node.layer, "weights", None) and not node.trainable:
            return (
                f"Pattern {describe(pattern)} matches layer {kind}, which is "
                f"frozen (trainable=False) and so has no learning rate. Set "
                f"`trainable = True` on it first, or leave it out."
            )
        return (
            f"Pattern {describe(pattern)} matches layer {kind}, which has no "
            f"trainable weights and so no learning rate. Select the layers with "
            f"weights before it (`stopgrad_lr.summary(model)` lists them)."
        )
    names = [node.path for node in selectable.values()]
    return no_match_error(pattern, names)


def match_multipliers(
    graph: Graph, multipliers: Mapping[Pattern, float]
) -> dict[int, tuple[float, Pattern]]:
    """`match` for a `multipliers` argument: trainable layers only."""
    return match(
        graph,
        multipliers,
        "multipliers",
        validate_multiplier,
        keep=lambda node: node.trainable,
    )


def followed_by(
    graph: Graph, layers: Mapping[int, Any], kinds: tuple[type, ...]
) -> tuple[Node, Node] | None:
    """The first call of one of `layers` (by id) whose output feeds a layer of
    one of `kinds`, with that consumer; None if there is none."""
    for node in graph.nodes:
        if id(node.layer) in layers:
            for consumer in graph.consumers(node):
                if isinstance(consumer.layer, kinds):
                    return node, consumer
    return None


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or `name_2`, `name_3`... if taken; the result is taken too."""
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{name}_{number}"
    taken.add(candidate)
    return candidate


class Rebuild:
    """Rebuilds a model (recursively) calling the same layer objects.

    Args:
        after: Layer id -> layers to call, in order, on the float outputs of
            each call of that layer.
        replace: Layer id -> the layer object to call instead of it (a new
            layer with weights of its own).
        drop: Layer types left out: each call returns its first input.
    """

    def __init__(
        self,
        after: Mapping[int, Sequence[keras.layers.Layer]],
        *,
        replace: Mapping[int, keras.layers.Layer] | None = None,
        drop: tuple[type, ...] = (),
    ) -> None:
        self.after = after
        self.replace = replace or {}
        self.drop = drop
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
        if has_graph(layer):
            return self.model(layer)
        return self.replace.get(id(layer), layer)

    def _sequential(self, model: keras.Sequential) -> keras.Sequential:
        spec = model.inputs[0]
        layers: list[Any] = [keras.Input(batch_shape=spec.shape, dtype=spec.dtype)]
        for layer in model.layers:
            if isinstance(layer, self.drop):
                continue
            layers.append(self._replacement(layer))
            layers.extend(self.after.get(id(layer), ()))
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
            if isinstance(layer, self.drop):
                return args[0]
            outputs = layer(*args, **kwargs)
            for extra in self.after.get(id(originals.get(id(layer), layer)), ()):
                outputs = keras.tree.map_structure(
                    lambda t, extra=extra: (
                        extra(t) if keras.backend.is_float_dtype(t.dtype) else t
                    ),
                    outputs,
                )
            return outputs

        new = keras.models.clone_model(
            model, clone_function=clone_function, call_function=call_function
        )
        # Keras names an output after the layer that produced it; a scale
        # after an output layer would rename that output, and a loss dict
        # keyed by the original names would no longer fit.
        new.output_names = list(model.output_names)
        if not model.trainable:
            new.trainable = False
        return new


@keras.saving.register_keras_serializable(package="stopgrad_lr")
class NamedOutputsModel(keras.Model):
    """A functional model that keeps output names of its own in its config.

    Keras names a functional model's outputs after the layers that produce
    them, when it is built and again when it is loaded: a gradient scale
    after an output layer (`head_gradient_scale`) would rename that output
    in a `.keras` file, and a loss dict keyed by the original names would no
    longer fit. A rewrite whose outputs are renamed so returns this class,
    which stores the original names in `get_config` and sets them again in
    `from_config`; it is otherwise the functional model Keras builds.
    """

    def __init__(self, *args: Any, output_names: Sequence[str] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        if output_names:
            self.output_names = list(output_names)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "output_names": list(self.output_names)}

    @classmethod
    def from_config(
        cls, config: dict[str, Any], custom_objects: Any = None
    ) -> NamedOutputsModel:
        config = dict(config)
        names = config.pop("output_names", ())
        model = super().from_config(config, custom_objects=custom_objects)
        if names:
            model.output_names = list(names)
        return model


def _produced_names(model: keras.Model) -> list[str]:
    return [tensor._keras_history[0].name for tensor in model.outputs]


def finish(
    new_model: keras.Model,
    original: keras.Model,
    copy: bool,
    keep_output_names: bool = True,
) -> keras.Model:
    """`new_model`, or with `copy=True` a clone of it with weights of its own
    and the same trainability: `clone_model` keeps each layer's flag, not a
    variable's own (the gamma of a BatchNormalization frozen alone). Either
    way a `NamedOutputsModel` when a new layer produces one of its outputs
    (with `keep_output_names=False`, a plain model whose outputs are named
    after the layers that produce them), and with the input model's public
    attributes (see `_keep_attributes`)."""
    if copy:
        new_model = _copied(new_model, original)
    if not keep_output_names and not isinstance(new_model, keras.Sequential):
        new_model.output_names = _produced_names(new_model)
    new_model = _named_outputs(new_model)
    _keep_attributes(new_model, original)
    return new_model


def _named_outputs(new_model: keras.Model) -> keras.Model:
    """A `NamedOutputsModel` when a new layer produces one of the outputs,
    else a plain model (a stripped model loads where stopgrad_lr is not
    installed)."""
    if isinstance(new_model, keras.Sequential):
        return new_model
    renamed = list(new_model.output_names) != _produced_names(new_model)
    if renamed == isinstance(new_model, NamedOutputsModel):
        return new_model
    rebuilt = (
        NamedOutputsModel(
            new_model.input,
            new_model.output,
            name=new_model.name,
            output_names=new_model.output_names,
        )
        if renamed
        else keras.Model(new_model.input, new_model.output, name=new_model.name)
    )
    if not new_model.trainable:
        rebuilt.trainable = False
    return rebuilt


def _keep_attributes(new_model: keras.Model, original: keras.Model) -> None:
    """Gives the new model the public attributes of the input model that a
    plain `keras.Model` lacks, such as a keras-hub backbone's
    `token_embedding`, `transformer_layers` and `hidden_dim`, which its tasks
    (`GPT2CausalLM`, `RobertaTextClassifier`...) read. An attribute that holds
    a layer of the model points to the new model's layer at the same path;
    one that holds a layer the new model lacks is left out.

    The attributes are plain references: set with `object.__setattr__`, so
    that Keras does not track the layers a second time as sublayers of the
    model (they are already its layers, called in its graph).
    """
    new_layers = dict(iter_layers(new_model))
    paths = {id(layer): path for path, layer in iter_layers(original)}
    missing = object()

    # A sublayer held by a layer of the model (OPT's `token_embedding` is
    # `embeddings.token_embedding`): the owner's path and attribute name.
    held: dict[int, tuple[str, str]] = {}
    for path, layer in iter_layers(original):
        for attribute, value in vars(layer).items():
            if isinstance(value, keras.layers.Layer):
                held.setdefault(id(value), (path, attribute))

    def mapped(value: Any) -> Any:
        if isinstance(value, keras.layers.Layer):
            if id(value) in paths:
                return new_layers.get(paths[id(value)], missing)
            if id(value) in held:
                path, attribute = held[id(value)]
                return getattr(new_layers.get(path), attribute, missing)
            return missing
        if isinstance(value, list | tuple):
            items = [mapped(item) for item in value]
            return missing if missing in items else type(value)(items)
        return value

    # Plain attributes, and properties of the class (keras-hub's
    # `Backbone.token_embedding` is one, stored as `_token_embedding`).
    names = [
        *vars(original),
        *(n for n in dir(type(original)) if n not in vars(original)),
    ]
    for name in names:
        if name.startswith("_") or hasattr(new_model, name):
            continue
        try:
            value = getattr(original, name)
        except Exception:  # a property that fails is not an attribute to keep
            continue
        if callable(value) and not isinstance(value, keras.layers.Layer):
            continue  # a method
        new_value = mapped(value)
        if new_value is not missing:
            object.__setattr__(new_model, name, new_value)


def _copied(new_model: keras.Model, original: keras.Model) -> keras.Model:
    with strategy_scope(original):
        copied = keras.models.clone_model(new_model)
    if len(copied.weights) != len(new_model.weights):
        raise ValueError(
            f"Cannot give the rewritten model '{original.name}' weights of its "
            f"own (copy=True): keras.models.clone_model rebuilds it from its "
            f"layers' configs with {len(copied.weights)} weights instead of "
            f"{len(new_model.weights)} (LoRA kernels added by `enable_lora` "
            f"are not in a layer's config, for one). Pass copy=False, which "
            f"shares the model's own variables."
        )
    copied.set_weights(new_model.get_weights())
    for source, target in zip(new_model.weights, copied.weights, strict=True):
        target.trainable = source.trainable
    if not isinstance(new_model, keras.Sequential):
        copied.output_names = list(new_model.output_names)
    return copied


def strategy_scope(model: keras.Model) -> contextlib.AbstractContextManager[Any]:
    """The scope in which a rewrite creates the variables it adds, so that
    they are distributed like the model's.

    On TensorFlow, the model's tf.distribute strategy scope. Elsewhere a
    no-op: a `keras.distribution` (`DataParallel`, `ModelParallel`) gives
    each new variable its layout when it is created, so the rewrite must run
    under it; a model whose variables are spread over several devices while
    no distribution is active is an error, which says so.
    """
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is not None:
        return strategy.scope()
    if keras.distribution.distribution() is None:
        _check_not_distributed(model)
    return contextlib.nullcontext()


def _check_not_distributed(model: keras.Model) -> None:
    """Raises if the model's variables live on several devices (JAX arrays
    sharded by a `keras.distribution` no longer active)."""
    for variable in model.weights:
        try:
            sharding = getattr(variable.value, "sharding", None)
        except TypeError:  # a JAX variable emptied by `fit` for an epoch
            continue
        devices = getattr(sharding, "device_set", ())
        if len(devices) > 1:
            raise ValueError(
                f"The variables of model '{model.name}' are distributed over "
                f"{len(devices)} devices ('{variable.path}' for one), but no "
                f"keras.distribution is active, so the variables the rewrite "
                f"adds would sit on one device. Rewrite it under the "
                f"distribution it was built with: `with distribution.scope():` "
                f"or `keras.distribution.set_distribution(distribution)`."
            )
