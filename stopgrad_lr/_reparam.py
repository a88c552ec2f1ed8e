"""Parameter reparametrisation: learning-rate multipliers that Adam keeps.

A layer whose output is linear in its parameters `W` computes the same thing
when it stores `W' = W / c` and its output is multiplied by `c`. The
optimizer then updates `W'`, whose gradient is `c` times the gradient of `W`:

- an optimizer that normalises the gradient (Adam, Lion, Muon...) moves `W'`
  as far as it would have moved `W`, so `W = c * W'` moves `c` times as far:
  the layer's learning rate is multiplied by `c` (choose `c = m`);
- SGD moves `W'` by `c` times the step of `W`, so `W` moves `c**2` times as
  far (choose `c = sqrt(m)`).

This is how StyleGAN's equalised learning rate (`lr_mul`) works. It acts on
one layer and needs no cut of the graph, so it works inside residual blocks.
Dividing and multiplying by a power of two is exact in floating point, so the
forward pass is then bit-identical (barring subnormal or overflowing values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
from keras import ops

from stopgrad_lr._graph import Graph, Node
from stopgrad_lr._layers import ParameterScale
from stopgrad_lr._optimizer_kinds import SCALE_INVARIANT
from stopgrad_lr._surgery import (
    Rebuild,
    candidates,
    finish,
    followed_by,
    strategy_scope,
    unique_name,
)

_LAYERS = keras.layers
# The layers whose output is linear in all their weights (BatchNormalization:
# in gamma and beta together; its moving statistics are not parameters).
SUPPORTED_LAYERS: tuple[type, ...] = (
    _LAYERS.Dense,
    _LAYERS.EinsumDense,
    _LAYERS.Conv1D,
    _LAYERS.Conv2D,
    _LAYERS.Conv3D,
    _LAYERS.Conv1DTranspose,
    _LAYERS.Conv2DTranspose,
    _LAYERS.Conv3DTranspose,
    _LAYERS.DepthwiseConv1D,
    _LAYERS.DepthwiseConv2D,
    _LAYERS.BatchNormalization,
    _LAYERS.LayerNormalization,
    _LAYERS.Embedding,
)
_NORMALIZATIONS = (_LAYERS.BatchNormalization, _LAYERS.LayerNormalization)
# Positively homogeneous activations, f(c * z) = c * f(z) for c > 0: the
# output scale can follow them, so a layer using one is not split.
HOMOGENEOUS_ACTIVATIONS = ("linear", "relu", "leaky_relu")


def output_scale(m: float, update_rule: str, round_to_power_of_two: bool) -> float:
    """The scale `c` that gives multiplier `m` under `update_rule`."""
    scale = m if update_rule == SCALE_INVARIANT else math.sqrt(m)
    if round_to_power_of_two:
        scale = 2.0 ** round(math.log2(scale))
    return scale


def unsupported_reason(layer: Any) -> str | None:
    """Why `layer` cannot be reparametrised from outside, or None if it can."""
    # A subclass counts (keras-hub's ReversibleEmbedding is an Embedding).
    supported = isinstance(layer, SUPPORTED_LAYERS)
    if not supported:
        return "its output is not linear in its parameters, or not known to be"
    if getattr(layer, "lora_enabled", False):
        return "LoRA makes its output bilinear in its two LoRA kernels"
    if getattr(layer.dtype_policy, "quantization_mode", None):
        return "its weights are quantized"
    config = layer.get_config()
    if isinstance(layer, _NORMALIZATIONS) and config["center"] and not config["scale"]:
        return (
            "with center=True and scale=False its output x_hat + beta is not "
            "proportional to beta"
        )
    for key, value in config.items():
        if key.endswith("_constraint") and value is not None:
            constraint = keras.constraints.get(value)
            if type(constraint) is not keras.constraints.NonNeg:
                return (
                    f"its {key} {type(constraint).__name__} would constrain the "
                    f"stored weights W / c, not W (only NonNeg is the same for both)"
                )
        if key.endswith("_regularizer") and value is not None:
            regularizer = keras.regularizers.get(value)
            if type(regularizer) not in _RESCALABLE_REGULARIZERS:
                return (
                    f"its {key} {type(regularizer).__name__} cannot be rewritten "
                    f"for the stored weights (L1, L2, L1L2 and "
                    f"OrthogonalRegularizer can)"
                )
    return None


def _rescaled_regularizer(regularizer: Any, scale: float) -> Any:
    """A regularizer that computes `regularizer(scale * w)` from `w`, so that
    the penalty of the stored weights is the penalty of the true ones."""
    # The coefficients are NumPy floats, which the constructors refuse.
    if type(regularizer) is keras.regularizers.L1:
        return keras.regularizers.L1(float(regularizer.l1) * scale)
    if type(regularizer) is keras.regularizers.L2:
        return keras.regularizers.L2(float(regularizer.l2) * scale * scale)
    if type(regularizer) is keras.regularizers.L1L2:
        return keras.regularizers.L1L2(
            l1=float(regularizer.l1) * scale, l2=float(regularizer.l2) * scale * scale
        )
    return regularizer  # OrthogonalRegularizer normalises: scale-invariant


_RESCALABLE_REGULARIZERS = (
    keras.regularizers.L1,
    keras.regularizers.L2,
    keras.regularizers.L1L2,
    keras.regularizers.OrthogonalRegularizer,
)


def _parameters(layer: Any) -> list[Any]:
    """The weights the layer's output is linear in."""
    if isinstance(layer, _LAYERS.BatchNormalization):
        return [w for w in (layer.gamma, layer.beta) if w is not None]
    return list(layer.weights)


def copy_layer(
    layer: Any,
    *,
    scale: float = 1.0,
    inverse: bool = False,
    linear: bool = False,
) -> Any:
    """A new layer like `layer`, with weights of its own.

    Its parameters are the layer's divided by `scale` (multiplied, with
    `inverse=True`), and its regularizers are rewritten to penalise what the
    layer's penalised. `linear=True` drops the activation (and the activity
    regularizer, which belongs after it).
    """
    # The old parameters are the new ones times `back`.
    back = 1.0 / scale if inverse else scale
    config = layer.get_config()
    for key, value in config.items():
        if key.endswith("_regularizer") and value is not None:
            rescaled = _rescaled_regularizer(keras.regularizers.get(value), back)
            config[key] = keras.regularizers.serialize(rescaled)
    if linear:
        config["activation"] = "linear"
        config.pop("activity_regularizer", None)
    new = type(layer).from_config(config)
    new.build_from_config(layer.get_build_config())
    parameters = {id(weight) for weight in _parameters(layer)}
    for old, fresh in zip(layer.weights, new.weights, strict=True):
        value = np.asarray(ops.convert_to_numpy(old))
        if id(old) in parameters and scale != 1.0:
            # In float64, so that the only rounding is the final cast.
            wide = value.astype("float64")
            value = (wide * scale if inverse else wide / scale).astype(value.dtype)
        fresh.assign(value)
    return new


def reparametrize(
    model: keras.Model,
    graph: Graph,
    targets: Mapping[int, float],
    update_rule: str,
    round_to_power_of_two: bool,
    copy: bool,
) -> keras.Model:
    """A new model in which each layer with a target multiplier other than 1
    stores its parameters divided by `c` and is followed by
    `ParameterScale(c)` (and by its activation, when that is not
    homogeneous). A layer with multiplier 0 is left as it is, for the caller
    to freeze (see `_freeze`)."""
    layers = candidates(graph)
    changed = {key: m for key, m in targets.items() if m not in (0.0, 1.0)}
    problems = unsupported_layers(graph, targets)
    if problems:
        names = ", ".join(cls.__name__ for cls in SUPPORTED_LAYERS)
        raise ValueError(
            f"Cannot reparametrise {'; '.join(problems)}. Reparametrisation "
            f"needs a layer whose output is proportional to its weights: {names}. "
            f"Give these layers their learning rates with "
            f"`stopgrad_lr.multi_optimizer(model, multipliers, optimizer)` "
            f"instead (a keras.optimizers.MultiOptimizer, which works for any "
            f"layer), or give them the multiplier 1, or 0 to freeze them."
        )
    _check_not_reparametrized(graph, changed)
    taken = {node.layer.name for node in graph.nodes}
    replace: dict[int, keras.layers.Layer] = {}
    after: dict[int, list[keras.layers.Layer]] = {}
    with strategy_scope(model):
        for key, m in changed.items():
            layer = layers[key].layer
            scale = output_scale(m, update_rule, round_to_power_of_two)
            split = layer.get_config().get("activation", "linear") not in (
                HOMOGENEOUS_ACTIVATIONS
            )
            replace[key] = copy_layer(layer, scale=scale, linear=split)
            name = unique_name(f"{layer.name}_parameter_scale", taken)
            chain = [
                ParameterScale(scale, update_rule, name=name, dtype=layer.dtype_policy)
            ]
            if split:
                chain.append(
                    keras.layers.Activation(
                        layer.activation,
                        name=unique_name(f"{layer.name}_activation", taken),
                        dtype=layer.dtype_policy,
                        activity_regularizer=layer.activity_regularizer,
                    )
                )
            after[key] = chain
        return finish(Rebuild(after, replace=replace).model(model), model, copy)


def unsupported_layers(graph: Graph, targets: Mapping[int, float]) -> list[str]:
    """`'path' (Class): reason` for each layer that would need a
    reparametrisation (multiplier neither 1 nor 0) and cannot have one."""
    layers = candidates(graph)
    return [
        f"'{layers[key].path}' ({type(layers[key].layer).__name__}): {reason}"
        for key, m in targets.items()
        if m not in (0.0, 1.0) and (reason := unsupported_reason(layers[key].layer))
    ]


def _check_not_reparametrized(graph: Graph, changed: Mapping[int, float]) -> None:
    found = followed_by(graph, changed, (ParameterScale,))
    if found is not None:
        node, consumer = found
        raise ValueError(
            f"Layer '{node.path}' is already reparametrised (followed by "
            f"'{consumer.path}'). Fold the scale back into its weights "
            f"with `stopgrad_lr.strip_gradient_scales` first."
        )


def baked_layers(graph: Graph) -> dict[int, keras.layers.Layer]:
    """Layer id -> a copy holding the true weights, for every layer followed
    by a `ParameterScale` (which the caller then leaves out)."""
    baked: dict[int, keras.layers.Layer] = {}
    for node in graph.nodes:
        if not isinstance(node.layer, ParameterScale):
            continue
        producers = list(graph.producers(node))
        if len(producers) != 1:
            raise ValueError(_unbakeable(node, "it does not follow one layer"))
        layer = producers[0].layer
        if id(layer) in baked:  # a shared layer: one copy serves every call
            continue
        reason = unsupported_reason(layer) or _not_alone(graph, layer, node.layer)
        if reason:
            raise ValueError(_unbakeable(node, reason))
        baked[id(layer)] = copy_layer(layer, scale=node.layer.scale, inverse=True)
    return baked


def _not_alone(graph: Graph, layer: Any, scale: ParameterScale) -> str | None:
    """Why the scale cannot be folded into `layer`: some call of `layer` has
    an output that does not go only into `scale`."""
    outputs = set(graph.outputs)
    for node in graph.nodes:
        if node.layer is not layer:
            continue
        consumers = list(graph.consumers(node))
        if (
            any(tensor in outputs for tensor in node.outputs)
            or not consumers
            or any(consumer.layer is not scale for consumer in consumers)
        ):
            return (
                f"the output of '{node.path}' is also used without the scale, "
                f"so folding the scale into its weights would change that use"
            )
    return None


def _unbakeable(node: Node, reason: str) -> str:
    return (
        f"Cannot fold ParameterScale '{node.path}' into the layer before it: "
        f"{reason}. A ParameterScale can be folded only right after a layer "
        f"that stopgrad_lr can reparametrise, as apply_lr_multipliers(..., "
        f"mechanism='reparametrize') puts it."
    )
