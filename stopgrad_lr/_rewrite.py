"""Model surgery: insert or strip gradient scales, returning new models.

Every function here reads the input model and builds a new one; the input
model keeps its layers, graph and outputs. By default the new model shares
the input's layer objects (and so its weights), the way Keras's own
`clone_model(..., clone_function=lambda layer: layer)` does; `copy=True`
gives it weights of its own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import keras

from stopgrad_lr._analysis import (
    block_boundaries,
    cut_layers,
    explain_bypass,
    layer_multipliers,
    tower_levels,
)
from stopgrad_lr._check import warn_if_mismatched
from stopgrad_lr._freeze import freeze_layers, frozen_paths
from stopgrad_lr._graph import Graph, Node
from stopgrad_lr._layers import (
    SCALE_LAYERS,
    GradientScale,
    GradientStop,
    ParameterScale,
)
from stopgrad_lr._ops import validate_method
from stopgrad_lr._optimizer_kinds import (
    LINEAR,
    UPDATE_RULES,
    describe_optimizer,
    recommend,
    settings,
    update_rule_of,
    validate_optimizer,
    weight_regularizers,
)
from stopgrad_lr._patterns import Pattern, validate_pattern
from stopgrad_lr._reparam import (
    baked_layers,
    reparametrize,
    unsupported_layers,
)
from stopgrad_lr._surgery import (
    Rebuild,
    candidates,
    check_rewritable,
    finish,
    followed_by,
    match,
    match_multipliers,
    strategy_scope,
    unique_name,
)
from stopgrad_lr._validation import (
    FLOAT32_MAX,
    FLOAT32_TINY,
    invalid,
    validate_choice,
    validate_flag,
    validate_scale,
)

ON_BYPASS = ("error", "warn", "ignore")
MECHANISMS = ("auto", "gradient_scale", "reparametrize")

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
    freeze_batch_norm: bool = True,
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
            so training the new model trains them, and a freeze freezes them
            in both models. `True` gives the new model copies of the
            weights and leaves the input model untouched.
        stop_at_zero: A scale of exactly 0 freezes: it inserts a
            `GradientStop`, which removes the backward pass upstream, and
            every layer that all of its gradient paths reach only through
            stops gets `trainable = False` (Keras's freeze, which reaches every
            variable under it; with `copy=False` the layer is the input
            model's own, frozen there too), so no optimizer moves or keeps
            slots for its weights. A layer that a
            residual connection, another output or another call reaches
            around the stop keeps training. Pass `False` to insert
            `GradientScale(0.0)` instead, a zero that
            `stopgrad_lr.ScaleSchedule` can raise later but that freezes
            nothing: the backward pass runs, the optimizer keeps slots, and
            on JAX (zero gradients) momentum and weight decay still move the
            weights.
        freeze_batch_norm: With a freeze, a BatchNormalization upstream of
            it runs in inference mode, as with `trainable=False` (default).
            `False` keeps it normalising with batch statistics and updating
            its moving statistics in training; only its gamma and beta are
            frozen, a flag of the variables that a `.keras` file does not
            keep (after loading, they train again).

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
    check_rewritable(model, "insert_gradient_scales")
    method = validate_method(method)
    copy = validate_flag(copy, "copy")
    stop_at_zero = validate_flag(stop_at_zero, "stop_at_zero")
    freeze_batch_norm = validate_flag(freeze_batch_norm, "freeze_batch_norm")
    validate_choice(on_bypass, "on_bypass", ON_BYPASS)
    graph = Graph(model)
    chosen = _match_scales(graph, scales)
    _check_no_scale_already(graph, chosen)
    if on_bypass != "ignore":
        _check_cuts(graph, chosen, on_bypass)
    return _insert(model, graph, chosen, method, stop_at_zero, copy, freeze_batch_norm)


def apply_lr_multipliers(
    model: keras.Model,
    multipliers: Mapping[Pattern, float],
    *,
    optimizer: keras.optimizers.Optimizer | None = None,
    mechanism: str = "auto",
    method: str = "custom_gradient",
    copy: bool = False,
    stop_at_zero: bool = True,
    freeze_batch_norm: bool = True,
    round_to_power_of_two: bool = False,
) -> keras.Model:
    """Returns a new model in which each group of layers gets its multiplier.

    You state the learning-rate multiplier you want per group
    (`{"conv1_*": 0.01, "conv2_*": 0.1}`); layers matched by no pattern get
    1.0. Two mechanisms deliver it, and which one works depends on the
    optimizer (`docs/optimizers.md` measures every stock optimizer):

    - `"gradient_scale"`: gradient scales at the cuts between the groups,
      with the right ratios (scales compound, so the scale at a boundary is
      the ratio of the multipliers on either side), checked with
      `stopgrad_lr.effective_multipliers`. A boundary is placed at the last
      cut before the next group, typically a block's output. Outputs are
      bit-identical. A learning-rate multiplier only for optimizers whose
      update is linear in the gradient: SGD, with momentum or Nesterov, also
      in a `LossScaleOptimizer`. Adam-like optimizers cancel it.
    - `"reparametrize"`: each layer with multiplier `m` stores its parameters
      divided by `c` and is followed by a `ParameterScale(c)`; `c = m` for
      optimizers that normalise the gradient (Adam, AdamW, Adamax, Nadam,
      RMSprop, Lion, Muon, ScheduleFreeAdamW) and `c = sqrt(m)` for SGD. It
      acts per layer, so it needs no cut and works inside residual blocks.
      A non-linear activation inside the layer moves to an `Activation`
      layer after the scale (relu, leaky_relu and linear commute with a
      positive scale and stay). L1/L2 regularizers are rewritten to penalise
      the true weights. A multiplier of 0 freezes the layer
      (`trainable=False`, as a zero gradient scale does). Outputs are
      bit-identical when every `c` is a power of two
      (`round_to_power_of_two=True`); otherwise they differ by rounding
      (about one float32 ulp, see `docs/optimizers.md`).
    - `"auto"` (default): with `optimizer=None`, `"gradient_scale"`. With an
      optimizer, the mechanism that is a learning-rate multiplier for it:
      `"gradient_scale"` for SGD-like optimizers (`"reparametrize"` if a
      layer with a multiplier has a weight regularizer, whose gradient a
      scale would miss), `"reparametrize"` for Adam-like ones. Where neither
      works (Adafactor, Lamb, Adagrad, Adadelta, Ftrl; weight decay or
      gradient clipping, which act outside both) it raises, pointing to
      `stopgrad_lr.multi_optimizer`.

    With an explicit mechanism and an optimizer that it does not suit, the
    model is built and one `OptimizerMismatchWarning` says what is wrong (see
    `stopgrad_lr.check_optimizer`); `model.fit` checks again for a
    different optimizer.

    Args:
        model: A built functional or Sequential model, possibly nested.
        multipliers: Maps a pattern (as in `insert_gradient_scales`) to a
            multiplier, a finite float >= 0. Only layers with trainable
            weights take part.
        optimizer: The optimizer you will train with, or `None`.
        mechanism: `"auto"`, `"gradient_scale"` or `"reparametrize"` (which
            needs `optimizer`).
        method: Gradient scales only: `"custom_gradient"` or
            `"stop_gradient"`.
        copy: `True` gives the new model copies of all the weights and
            leaves `model` untouched. A reparametrised layer is always a new
            layer with weights of its own; with `False` the other layers are
            shared with `model`, frozen ones included.
        stop_at_zero: Gradient scales only: where a boundary needs a scale of
            0 (a group with multiplier 0 below a group with a nonzero one),
            freeze, as in `insert_gradient_scales` (default), or, with
            `False`, insert a `GradientScale(0.0)` that freezes nothing.
        freeze_batch_norm: A BatchNormalization with multiplier 0 runs in
            inference mode (default); `False` keeps it in training mode and
            freezes only its gamma and beta, as in `insert_gradient_scales`.
        round_to_power_of_two: Reparametrisation only: round each `c` to the
            nearest power of two, which makes the forward pass bit-exact and
            changes the multiplier to `c` (Adam-like) or `c**2` (SGD), for
            example 0.1 to 0.125.

    Returns:
        A new `keras.Model`.

    Raises:
        ValueError: If a pattern matches no layer with trainable weights; a
            layer is matched by two patterns with different multipliers; a
            multiplier is negative or not finite; `mechanism` or `optimizer`
            is invalid; with gradient scales, no cut separates two layers with
            different multipliers (the message names both and a path that
            bypasses the boundary); with reparametrisation, a layer is not
            linear in its parameters (such as an LSTM) or the optimizer is
            neither SGD-like nor Adam-like; or with `"auto"`, no mechanism
            suits the optimizer.

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
        >>> for_adam = stopgrad_lr.apply_lr_multipliers(
        ...     model, {"conv1": 0.125}, optimizer=keras.optimizers.Adam()
        ... )
        >>> [type(layer).__name__ for layer in for_adam.layers]
        ['InputLayer', 'Dense', 'ParameterScale', 'Dense', 'Dense']
    """
    check_rewritable(model, "apply_lr_multipliers")
    method = validate_method(method)
    copy = validate_flag(copy, "copy")
    stop_at_zero = validate_flag(stop_at_zero, "stop_at_zero")
    freeze_batch_norm = validate_flag(freeze_batch_norm, "freeze_batch_norm")
    round_to_power_of_two = validate_flag(
        round_to_power_of_two, "round_to_power_of_two"
    )
    graph = Graph(model)
    targets = _targets(graph, multipliers)
    _check_no_gradient_layers(graph)
    layers = candidates(graph)
    chosen, update_rule = choose_mechanism(
        mechanism,
        optimizer,
        [layers[key].layer for key, value in targets.items() if value != 1.0],
    )
    new_graph: Graph | None = None  # read once, for the check and the warning
    if chosen == "gradient_scale":
        try:
            boundaries = _boundaries_for(graph, targets)
        except ValueError:
            # "auto" with an SGD-like optimizer: where no cut separates the
            # groups (a layer inside a residual block), a reparametrisation
            # still can, layer by layer.
            if mechanism != "auto" or optimizer is None:
                raise
            if unsupported_layers(graph, targets):
                raise
            chosen = "reparametrize"
        else:
            new_model = _insert(
                model, graph, boundaries, method, stop_at_zero, copy, freeze_batch_norm
            )
            new_graph = Graph(new_model)
            _verify(new_graph, graph, targets)
    if chosen == "reparametrize":
        new_model = reparametrize(
            model, graph, targets, update_rule, round_to_power_of_two, copy
        )
        zeros = [layers[key].path for key, value in targets.items() if value == 0.0]
        freeze_layers(new_model, zeros, freeze_batch_norm)
    if optimizer is not None:
        warn_if_mismatched(optimizer, new_model, stacklevel=2, graph=new_graph)
    return new_model


def choose_mechanism(
    mechanism: Any, optimizer: Any, changed_layers: list[Any]
) -> tuple[str, str]:
    """`(mechanism, update rule)` for `apply_lr_multipliers`, where the
    rule sets the output scale of a reparametrisation; `changed_layers` have
    a multiplier other than 1."""
    validate_choice(mechanism, "mechanism", MECHANISMS)
    if optimizer is None:
        if mechanism == "reparametrize":
            raise ValueError(
                "Invalid value received for argument `optimizer`. "
                "mechanism='reparametrize' chooses the output scale from the "
                "optimizer (c = m for Adam-like optimizers, c = sqrt(m) for "
                "SGD): pass the optimizer you will train with. "
                "Received: optimizer=None"
            )
        return "gradient_scale", LINEAR
    validate_optimizer(optimizer)
    rule, how = update_rule_of(optimizer)
    name = describe_optimizer(optimizer)
    if mechanism == "gradient_scale":
        return "gradient_scale", rule
    if mechanism == "reparametrize":
        if rule not in UPDATE_RULES:
            raise ValueError(
                f"Cannot reparametrise for {name}: it {how}, so no output scale "
                f"gives a layer a learning-rate multiplier. Use "
                f"`stopgrad_lr.multi_optimizer(model, multipliers, optimizer)`."
            )
        return "reparametrize", rule
    if not changed_layers:
        return "gradient_scale", rule
    regularized = any(weight_regularizers(layer) for layer in changed_layers)
    chosen = recommend(optimizer, regularized)
    if chosen == "multi_optimizer":
        reasons = [f"it {how}"] if rule not in UPDATE_RULES else []
        reasons += [f"{setting} {why}" for setting, why in settings(optimizer)]
        # Offer only what `mechanism=` then accepts: a reparametrisation
        # needs an output scale rule for the optimizer.
        accepted = (
            "mechanism='gradient_scale' or 'reparametrize'"
            if rule in UPDATE_RULES
            else "mechanism='gradient_scale'"
        )
        raise ValueError(
            f"mechanism='auto' found no mechanism that gives these multipliers "
            f"with {name}: {'; '.join(reasons)}. Use "
            f"`stopgrad_lr.multi_optimizer(model, multipliers, optimizer)` to "
            f"give each group its own optimizer, or pass {accepted} to accept "
            f"the difference (a warning says what it is)."
        )
    return chosen, rule


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

    With `boundaries="auto"` there is one level per block as the model's
    authors named it (`docs/surgery.md` lists what it finds): the graph
    proposes the cuts through which the whole network passes, and the layer
    names group them where the graph over-splits a block (consecutive
    segments whose layers share a block prefix such as `block_1_`,
    `conv2_block1_` or `transformer_layer_0`, and the embedding stage, are
    one block); the head gets none. On ResNet50 that is `pool1_pool`
    (closing the stem) and each residual block's output, 17 levels; on
    MobileNetV2 18 (the stem, `block_1` ... `block_16`, the top conv); on a
    keras-hub BertBackbone with L layers L + 1 (the embedding stage, its
    LayerNormalization included, and each layer). A model with two towers
    (CLIP, SigLIP) is decayed per tower, each by its own depth, and checked
    against the levels the towers' names give; where no gradient scale can
    give them (an encoder and a decoder: T5, Bart, Whisper) it raises and
    points to `multi_optimizer` with `layerwise_decay_multipliers`.
    `stopgrad_lr.summary` prints how many levels the result has. A layer
    literally named "auto" is selected with `["auto"]`.

    Args:
        model: A built functional or Sequential model.
        boundaries: `"auto"`, a pattern, or a list of patterns, selecting the
            block output layers (as in `insert_gradient_scales`).
        decay: The factor per block, a finite float in (0, 1] (typically
            0.65-0.95).
        method: `"custom_gradient"` or `"stop_gradient"`.
        on_bypass: `"error"`, `"warn"` or `"ignore"`, as in
            `insert_gradient_scales`.
        copy: `True` gives the new model copies of the weights.

    Returns:
        A new `keras.Model`.

    Raises:
        ValueError: As `insert_gradient_scales`; if `decay` is not in
            (0, 1]; if `boundaries` is an empty list; or if `"auto"` finds no
            boundary (a model with a single block), or cannot decay each
            tower by its own depth (an encoder and a decoder).

    Examples:
        >>> import keras, stopgrad_lr
        >>> x = inputs = keras.Input((4,))
        >>> for i in range(3):
        ...     x = keras.layers.Dense(4, name=f"block{i}_out")(x)
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
        >>> decayed = stopgrad_lr.layerwise_decay(model, "block*_out", 0.5)
        >>> stopgrad_lr.effective_multipliers(decayed)
        {'block0_out': 0.125, 'block1_out': 0.25, 'block2_out': 0.5, 'head': 1.0}
        >>> auto = stopgrad_lr.layerwise_decay(model, "auto", 0.5)
        >>> stopgrad_lr.effective_multipliers(auto) == (
        ...     stopgrad_lr.effective_multipliers(decayed)
        ... )
        True
    """
    check_rewritable(model, "layerwise_decay")
    copy = validate_flag(copy, "copy")
    decay = _validate_decay(decay)
    if isinstance(boundaries, str) and boundaries == "auto":
        method = validate_method(method)
        validate_choice(on_bypass, "on_bypass", ON_BYPASS)
        graph = Graph(model)
        found = block_boundaries(graph)
        towers = tower_levels(graph)
        if not found and towers is None:
            raise ValueError(
                f"layerwise_decay(boundaries='auto') found no block boundary in "
                f"the model '{model.name}': no cut separates two groups of "
                f"trainable layers. Pass the block output layers by name "
                f"instead (`stopgrad_lr.gradient_cuts(model)` lists the cuts)."
            )
        chosen = {id(node.layer): decay for node in found}
        _check_no_scale_already(graph, chosen)
        new_model = _insert(model, graph, chosen, method, True, copy)
        if towers is not None:
            _check_towers(model, Graph(new_model), towers, decay)
        return new_model
    patterns = (
        [boundaries]
        if isinstance(boundaries, str | bytes) or not isinstance(boundaries, Sequence)
        else list(boundaries)
    )
    if not patterns:
        raise ValueError(
            'Invalid value received for argument `boundaries`. Expected "auto", '
            "a pattern or a non-empty list of patterns selecting the block "
            "output layers, such as 'transformer_layer_*'. Received: "
            "boundaries=[]"
        )
    return insert_gradient_scales(
        model,
        {validate_pattern(p, "boundaries"): decay for p in patterns},
        method=method,
        on_bypass=on_bypass,
        copy=copy,
    )


def layerwise_decay_multipliers(
    model: keras.Model,
    boundaries: Pattern | Sequence[Pattern],
    decay: float,
) -> dict[str, float]:
    """The learning-rate multiplier of each layer under layer-wise decay.

    The multipliers that `stopgrad_lr.effective_multipliers` reports for the
    model that `layerwise_decay(model, boundaries, decay)` builds, for every
    layer with trainable weights: the same groups and the same boundary
    rules (a boundary must be a cut); a layer that does not train (frozen,
    or a LoRA model's base layers) is left out, so that the dict goes to
    `multi_optimizer` as it is. `layerwise_decay` delivers them as
    gradient scales, which only SGD-like optimizers turn into learning
    rates; this dict delivers them to any optimizer:
    `stopgrad_lr.multi_optimizer(model, multipliers, AdamW(...))` gives each
    group its own copy of the optimizer, and
    `stopgrad_lr.apply_lr_multipliers(model, multipliers, optimizer=...)`
    chooses a mechanism for it. With `"auto"` on a model whose layer names
    place them in towers (`encoder_`/`decoder_`, `vision_`/`text_`), each
    tower is decayed by its own depth from the names
    (`stopgrad_lr._analysis.tower_levels`), also where gradient scales cannot
    deliver it and `layerwise_decay` raises (T5, Bart, Whisper: the
    encoder's output enters every decoder layer); layers without trainable
    weights are left out. Otherwise the decayed model is built only to be read,
    with the input model's own layers, and dropped: `model` keeps its
    layers, weights and outputs.

    Args:
        model: A built functional or Sequential model.
        boundaries: `"auto"`, a pattern, or a list of patterns, selecting
            the block output layers (as in `layerwise_decay`).
        decay: The factor per block, a finite float in (0, 1] (BEiT and MAE
            fine-tune with 0.65-0.75, ELECTRA with 0.8).

    Returns:
        A dict from layer path to multiplier, in topological order: the
        layers before the last boundary get `decay ** i`, where `i` counts
        the boundaries after them; the layers after it get 1.0.

    Raises:
        ValueError: As `layerwise_decay`.

    Examples:
        >>> import keras, stopgrad_lr
        >>> x = inputs = keras.Input((4,))
        >>> for i in range(3):
        ...     x = keras.layers.Dense(4, name=f"block{i}_out")(x)
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
        >>> stopgrad_lr.layerwise_decay_multipliers(model, "block*_out", 0.5)
        {'block0_out': 0.125, 'block1_out': 0.25, 'block2_out': 0.5, 'head': 1.0}
    """
    if isinstance(boundaries, str) and boundaries == "auto":
        check_rewritable(model, "layerwise_decay_multipliers")
        decay = _validate_decay(decay)
        graph = Graph(model)
        towers = tower_levels(graph)
        if towers is not None:
            _check_no_gradient_layers(graph)
            # Every layer with trainable weights (a frozen one has none, and
            # `multi_optimizer` takes no pattern for it).
            return {path: _decayed(decay, level) for path, level in towers.items()}
    graph = Graph(layerwise_decay(model, boundaries, decay))
    trains = {node.path for node in graph.nodes if node.trainable}
    return {
        path: value
        for path, value in layer_multipliers(graph).items()
        if path in trains
    }


def _validate_decay(decay: Any) -> float:
    decay = validate_scale(decay, argument="decay")
    if not 0 < decay <= 1:
        raise invalid(
            "decay",
            "a float > 0 and <= 1, in (0, 1]: the factor by which each block's rate "
            "falls below the next (a stop is a scale of 0, and other scales can be "
            "set with insert_gradient_scales)",
            decay,
        )
    return decay


def _decayed(decay: float, level: int) -> float:
    """`decay ** level` to the 7 digits `effective_multipliers` reports."""
    return float(f"{decay**level:.7g}")


def _check_towers(
    model: keras.Model, new_graph: Graph, towers: Mapping[str, int], decay: float
) -> None:
    """Raises unless the decayed model gives each tower's layers the decay of
    their level: where no cut separates a tower's blocks (an encoder whose
    output enters every decoder layer, an embedding both towers share),
    gradient scales cannot."""
    got = layer_multipliers(new_graph)
    for path, level in towers.items():
        want = _decayed(decay, level)
        have = got.get(path, math.nan)
        if not math.isclose(have, want, rel_tol=_CHECK_RTOL, abs_tol=0.0):
            raise ValueError(
                f"layerwise_decay(boundaries='auto') cannot decay each tower of "
                f"the model '{model.name}' by its own depth with gradient scales: "
                f"layer '{path}' would train at {have:g} instead of "
                f"{decay:g}**{level} = {want:g}, because no cut separates its "
                f"block from the next (an encoder's output enters every decoder "
                f"layer; towers may share an embedding), so part of its gradient "
                f"flows around every scale. Give each layer its multiplier in an "
                f"optimizer group of its own: `stopgrad_lr.multi_optimizer(model, "
                f"stopgrad_lr.layerwise_decay_multipliers(model, 'auto', "
                f"{decay:g}), optimizer)`."
            )


def strip_gradient_scales(model: keras.Model, *, copy: bool = False) -> keras.Model:
    """Returns a new model without any of stopgrad_lr's layers.

    Gradient scales and stops are left out. Each `ParameterScale` of a
    reparametrisation is folded back into the layer before it: that layer is
    replaced by a copy holding the true weights, `c` times the stored ones
    (and its regularizers are rewritten back). The new model saves to a
    `.keras` file that loads in a process that never imports stopgrad_lr
    (for deployment); its outputs are named after the layers that produce
    them, as in the model a rewrite was made from (a model whose output is
    itself a scale layer gets its output renamed after the layer before
    it). The outputs are bit-identical, and so are the folded
    weights when `c` is a power of two (otherwise `c * (W / c)` may differ
    from `W` by one rounding, about one ulp).

    Args:
        model: A built functional or Sequential model, possibly nested.
        copy: `True` gives the new model copies of all the weights; with
            `False` only the folded layers have weights of their own.

    Returns:
        A new `keras.Model`.

    Raises:
        ValueError: If `model` is not a built functional or Sequential model,
            or a `ParameterScale` does not directly follow the one layer it
            scales (as the reparametrisation puts it).

    Examples:
        >>> import keras, stopgrad_lr
        >>> inputs = keras.Input((4,))
        >>> hidden = stopgrad_lr.GradientScale(0.1)(keras.layers.Dense(8)(inputs))
        >>> model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
        >>> plain = stopgrad_lr.strip_gradient_scales(model)
        >>> [type(layer).__name__ for layer in plain.layers]
        ['InputLayer', 'Dense', 'Dense']
    """
    check_rewritable(model, "strip_gradient_scales")
    copy = validate_flag(copy, "copy")
    graph = Graph(model)
    with strategy_scope(model):
        rebuild = Rebuild(
            {},
            replace=baked_layers(graph),
            drop=(*SCALE_LAYERS, ParameterScale),
        )
        # For deployment: a plain model, which loads where stopgrad_lr is
        # not installed, so its outputs take the names of the layers that
        # produce them (those of the model a rewrite was made from).
        return finish(rebuild.model(model), model, copy, keep_output_names=False)


# Matching -----------------------------------------------------------------


def _match_scales(graph: Graph, scales: Mapping[Pattern, float]) -> dict[int, float]:
    def validate(value: Any, argument: str) -> float:
        return validate_scale(value, argument=argument)

    return {
        key: value
        for key, (value, _) in match(graph, scales, "scales", validate).items()
    }


def _check_no_scale_already(graph: Graph, chosen: Mapping[int, float]) -> None:
    found = followed_by(graph, chosen, SCALE_LAYERS)
    if found is not None:
        node, consumer = found
        raise ValueError(
            f"Layer '{node.path}' already has the stopgrad_lr layer "
            f"'{consumer.path}' on its output. Change that layer instead "
            f"(`model.get_layer(...).scale = value`), or remove all "
            f"scales first with `stopgrad_lr.strip_gradient_scales`."
        )


def _check_no_gradient_layers(graph: Graph) -> None:
    """Multipliers are absolute: scales already in the model would multiply
    them, so a model that holds some is refused."""
    found = {
        id(node.layer): f"'{node.path}' ({type(node.layer).__name__} {node.scale:g})"
        for node in graph.nodes
        if node.scale is not None
    }.values()
    if found:
        raise ValueError(
            f"The model already holds stopgrad_lr gradient layers, whose scales "
            f"would multiply the multipliers asked for: {', '.join(found)}. "
            f"Remove them first to set every multiplier afresh "
            f"(`stopgrad_lr.apply_lr_multipliers(stopgrad_lr.strip_gradient_scales"
            f"(model), ...)`), or change their scales instead "
            f"(`model.get_layer(name).scale = value`)."
        )


def _check_cuts(graph: Graph, chosen: Mapping[int, float], on_bypass: str) -> None:
    cuts = cut_layers(graph)
    layers = candidates(graph)
    problems = [
        f"'{layers[key].path}' is bypassed along {explain_bypass(graph, node)}"
        for key in chosen
        if (node := cuts.get(key)) is not None
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
    chosen = match_multipliers(graph, multipliers)
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
    # A shared layer that is a cut (a scale after each of its calls, as
    # `insert_gradient_scales` puts it) is one cut, placed at its last call,
    # whose region is the union of its calls' regions: the regions stay
    # nested or disjoint, since a cut downstream of one call lies downstream
    # of all of them.
    regions: dict[int, int] = {}  # layer id -> bit set of its upstream region
    last_call: dict[int, Node] = {}
    for node in graph.nodes:
        key = id(node.layer)
        if node.scale is None and key in cut_of_layer and cut_of_layer[key] is None:
            regions[key] = regions.get(key, 0) | graph.ancestors()[node.index]
            last_call[key] = node
    cut_nodes = sorted(last_call.values(), key=lambda node: node.index)
    segment: dict[int, int] = {}  # node index -> index of its segment's cut
    parent: dict[int, int | None] = {}
    assigned = open_cuts = 0  # bit sets of node indices
    for cut in cut_nodes:
        region = regions[id(cut.layer)]
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
    for node in graph.nodes:
        index = node.index
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
        ratio = inner / outer
        if ratio and not FLOAT32_TINY <= ratio <= FLOAT32_MAX:
            raise ValueError(
                f"The layers upstream of '{cut.path}' want multiplier {inner} "
                f"and those downstream {outer}: the gradient scale between them, "
                f"{ratio:.3g}, is outside what float32 can represent "
                f"({FLOAT32_TINY:.3g} to {FLOAT32_MAX:.3g}). Choose multipliers "
                f"closer together, or 0 to freeze the upstream layers."
            )
        scales[id(cut.layer)] = ratio
    return scales


def _raise_inseparable(graph: Graph, values: Mapping[float, Node]) -> None:
    (first_value, first), (second_value, second) = sorted(
        values.items(), key=lambda item: item[1].index
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


def _verify(new_graph: Graph, graph: Graph, targets: Mapping[int, float]) -> None:
    """Checks that the new model gives every layer its target multiplier."""
    reaches = graph.reaches_output()
    got = layer_multipliers(new_graph)
    for node in graph.nodes:
        if not (node.trainable and reaches[node.index]):
            continue
        want = targets[id(node.layer)]
        have = got.get(node.path, math.nan)
        if not math.isclose(have, want, rel_tol=_CHECK_RTOL, abs_tol=0.0):
            held = {id(v) for v in node.variables}
            tied = [
                other.path
                for other in new_graph.nodes
                if other.layer is not node.layer
                and held & {id(v) for v in other.variables}
            ]
            if tied:
                raise ValueError(
                    f"Layer '{node.path}' cannot get multiplier {want:g} from a "
                    f"gradient scale: it shares a variable with '{tied[0]}' (a "
                    f"tied embedding), whose gradient reaches the variable "
                    f"around the scale, so it would train at a mix of rates. "
                    f"Give the variables their rates with "
                    f"`stopgrad_lr.multi_optimizer(model, multipliers, optimizer)`."
                )
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
    freeze_batch_norm: bool = True,
) -> keras.Model:
    taken = {node.layer.name for node in graph.nodes}
    layers = candidates(graph)
    with strategy_scope(model):
        after: dict[int, list[keras.layers.Layer]] = {}
        for key, value in chosen.items():
            name = unique_name(f"{layers[key].layer.name}_gradient_scale", taken)
            if value == 0 and stop_at_zero:
                after[key] = [GradientStop(name=name.replace("_scale", "_stop"))]
            else:
                after[key] = [GradientScale(value, method, name=name)]
        stops = {key for key, value in chosen.items() if value == 0 and stop_at_zero}
        new_model = finish(Rebuild(after).model(model), model, copy)
    _check_products(Graph(new_model))
    freeze_layers(new_model, frozen_paths(graph, stops), freeze_batch_norm)
    return new_model


def _check_products(graph: Graph) -> None:
    """Refuses scales that compound to a multiplier float32 cannot hold, as
    a single such scale is refused: the gradient would underflow to 0 (or
    lose its precision as a subnormal), not be scaled. Each product of a
    node's paths is checked (a mixed layer's values too)."""
    sets = graph.multiplier_sets()
    for node in graph.nodes:
        if not node.trainable:
            continue
        for value in sets[node.index]:
            if value != 0.0 and not FLOAT32_TINY <= abs(value) <= FLOAT32_MAX:
                raise ValueError(
                    f"The gradient scales compound to multiplier {value:.3g} for "
                    f"layer '{node.path}', outside what float32 can represent "
                    f"({FLOAT32_TINY:.3g} to {FLOAT32_MAX:.3g}): its gradient "
                    f"would be 0 or lose its precision instead of being scaled. "
                    f"Use fewer or milder scales (a decay closer to 1), or 0 to "
                    f"freeze those layers."
                )
