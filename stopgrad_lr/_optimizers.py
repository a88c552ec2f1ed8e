"""What each optimizer does with a scaled gradient, and what to do about it.

`OPTIMIZER_TABLE` is the one place that knows it: for every optimizer class
in `keras.optimizers`, whether its update is linear in the gradient (a
gradient scale is then a learning-rate multiplier), invariant to a constant
gradient scale (reparametrise with `c = m`), or neither (only a
`keras.optimizers.MultiOptimizer` gives a layer its own learning rate).
`benchmarks/optimizer_table.py` measures every entry and writes
`docs/optimizers.md`; a test checks that the page and this table agree.

The warning: `GradientScale` and `ParameterScale` call
`check_training_optimizer` when called in training mode. That happens while
`fit` traces its training step (every step when it runs eagerly), inside
`Model.train_step`, the public method that `fit` calls and users override.
The model being trained is the `self` of that frame on the call stack, and
its `optimizer` is the one to check: once per model and optimizer, whatever
the model's nesting, however its stopgrad_lr layers got there, and after a
`.keras` round trip, since only the layers are needed.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras

from stopgrad_lr._graph import Graph, check_model, effective_multipliers
from stopgrad_lr._layers import GradientScale, GradientStop
from stopgrad_lr._ops import validate_scale
from stopgrad_lr._patterns import Pattern, iter_layers
from stopgrad_lr._reparam import (
    LINEAR,
    SCALE_INVARIANT,
    UPDATE_RULES,
    ParameterScale,
)
from stopgrad_lr._surgery import validate_multiplier
from stopgrad_lr._variables import select, sites

# The third kind: an optimizer for which neither mechanism is a multiplier.
NEITHER = "neither"
MECHANISMS = ("auto", "gradient_scale", "reparametrize")

_OPT = keras.optimizers
_NORMALISES = "divides the gradient by a running estimate of its own size"
# Optimizer class -> (kind of update, what it does with the gradient). The
# kind is measured for every class by benchmarks/optimizer_table.py.
OPTIMIZER_TABLE: dict[type, tuple[str, str]] = {
    _OPT.SGD: (LINEAR, "makes an update proportional to the gradient"),
    _OPT.Adam: (SCALE_INVARIANT, _NORMALISES),
    _OPT.AdamW: (SCALE_INVARIANT, _NORMALISES),
    _OPT.Adamax: (SCALE_INVARIANT, _NORMALISES),
    _OPT.Nadam: (SCALE_INVARIANT, _NORMALISES),
    _OPT.RMSprop: (
        SCALE_INVARIANT,
        "divides the gradient by the root of a running mean of its square",
    ),
    _OPT.ScheduleFreeAdamW: (SCALE_INVARIANT, _NORMALISES),
    _OPT.Lion: (SCALE_INVARIANT, "keeps only the sign of its update"),
    _OPT.Muon: (
        SCALE_INVARIANT,
        "orthogonalises the update of each matrix and uses AdamW for the other weights",
    ),
    _OPT.Adadelta: (
        NEITHER,
        "divides the gradient by its running size and multiplies it by the "
        "running size of its own past updates, so a reparametrisation cancels "
        "out as well",
    ),
    _OPT.Adafactor: (
        NEITHER,
        "normalises the gradient and scales its update by the size of the "
        "weights, so a reparametrisation cancels out as well",
    ),
    _OPT.Lamb: (
        NEITHER,
        "normalises the gradient and scales its update by the ratio of the "
        "weights' norm to the update's norm, so a reparametrisation cancels out "
        "as well",
    ),
    _OPT.Adagrad: (
        NEITHER,
        "divides the gradient by the root of an accumulator that starts at "
        "initial_accumulator_value: like SGD while that dominates, scale-"
        "invariant once the squared gradients do",
    ),
    _OPT.Ftrl: (
        NEITHER,
        "computes the weights from accumulated gradients and their squares",
    ),
}
# A normalising optimizer divides by `sqrt(v) + epsilon` (RMSprop: by
# `sqrt(v + epsilon)`, so its epsilon counts as `sqrt(epsilon)`). Where that
# epsilon is not small next to the gradient, the update is between SGD's and
# Adam's, and a reparametrisation, whose layer sees its gradient times `c`,
# acts as if the epsilon were `epsilon / c`. Measured in docs/optimizers.md:
# at m = 0.1, epsilon 1e-7 is within 0.1% of the reference, 1e-6 within 2%,
# 1e-5 4% off, and RMSprop's default (1e-7 under the root) 4% off.
EPSILON_LIMIT = 1e-6
_EPSILON_UNDER_ROOT = (_OPT.RMSprop,)


class OptimizerMismatchWarning(UserWarning):
    """The optimizer does not give the layers the multipliers that the
    model's stopgrad_lr layers imply (see `stopgrad_lr.check_optimizer`)."""


def _unwrap(optimizer: Any) -> Any:
    """The optimizer inside any `LossScaleOptimizer`: loss scaling is linear
    and undone before the update, so it changes nothing here."""
    while isinstance(optimizer, _OPT.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def describe_optimizer(optimizer: Any) -> str:
    """`'Adam'`, `'LossScaleOptimizer(SGD)'`: the class names, for messages."""
    if isinstance(optimizer, _OPT.LossScaleOptimizer):
        return f"LossScaleOptimizer({describe_optimizer(optimizer.inner_optimizer)})"
    return type(optimizer).__name__


def update_kind(optimizer: Any) -> tuple[str, str]:
    """`(kind, what it does with the gradient)` for a (wrapped) optimizer:
    kind is `"linear"`, `"scale_invariant"`, `"neither"` or `"unknown"`."""
    optimizer = _unwrap(optimizer)
    for cls in type(optimizer).__mro__:
        if cls in OPTIMIZER_TABLE:
            kind, how = OPTIMIZER_TABLE[cls]
            epsilon = getattr(optimizer, "epsilon", None) or 0.0
            if isinstance(optimizer, _EPSILON_UNDER_ROOT):
                epsilon = math.sqrt(epsilon)
            if kind == SCALE_INVARIANT and epsilon > EPSILON_LIMIT:
                return NEITHER, (
                    f"{how}, but its epsilon is {epsilon:.2g} in gradient units, "
                    f"not small next to gradients (above {EPSILON_LIMIT:g}), so "
                    f"its update is between SGD's and Adam's"
                )
            return kind, how
    return "unknown", "is not in stopgrad_lr's optimizer table"


def _settings(optimizer: Any) -> list[tuple[str, str]]:
    """`(setting, why it breaks a multiplier)` for the settings that act on
    a gradient or a weight outside both mechanisms."""
    optimizer = _unwrap(optimizer)
    found = []
    if optimizer.weight_decay:
        found.append(
            (
                f"weight_decay={optimizer.weight_decay:g}",
                "shrinks the weights by learning_rate * weight_decay every "
                "step, not by the multiplied rate: decoupled weight decay "
                "bypasses both gradient scales and reparametrisation",
            )
        )
    for name, why in (
        ("clipnorm", "clips the norm of each scaled gradient"),
        ("clipvalue", "clips each element of the scaled gradient"),
        ("global_clipnorm", "clips by a global norm that mixes scaled gradients"),
    ):
        value = getattr(optimizer, name)
        if value:
            found.append(
                (
                    f"{name}={value:g}",
                    f"{why}, so the threshold acts as if divided by the multiplier",
                )
            )
    return found


def recommend(optimizer: Any, regularized: bool = False) -> str:
    """The mechanism that gives layers their multipliers with `optimizer`:
    `"gradient_scale"`, `"reparametrize"` or `"multi_optimizer"`.

    `regularized`: whether a layer with a multiplier other than 1 has a
    weight regularizer (whose gradient a gradient scale does not scale).
    """
    kind, _ = update_kind(optimizer)
    if _settings(optimizer) or kind not in UPDATE_RULES:
        return "multi_optimizer"
    if kind == LINEAR and not regularized:
        return "gradient_scale"
    return "reparametrize"


def weight_regularizers(layer: Any) -> list[str]:
    """The names of the layer's weight regularizer arguments that are set."""
    config = layer.get_config()
    return [
        key
        for key, value in config.items()
        if key.endswith("_regularizer")
        and key != "activity_regularizer"
        and value is not None
    ]


def validate_optimizer(optimizer: Any, argument: str = "optimizer") -> Any:
    if not isinstance(optimizer, _OPT.Optimizer) or isinstance(
        _unwrap(optimizer), _OPT.MultiOptimizer
    ):
        raise ValueError(
            f"Invalid value received for argument `{argument}`. Expected the "
            f"keras.optimizers.Optimizer instance you train with (not a "
            f"MultiOptimizer, which sets per-layer learning rates itself). "
            f"Received: {argument}={optimizer!r}"
        )
    return optimizer


def choose_mechanism(
    mechanism: Any, optimizer: Any, changed_layers: list[Any]
) -> tuple[str, str]:
    """`(mechanism, kind of update)` for `apply_lr_multipliers`, where the
    kind sets the output scale of a reparametrisation; `changed_layers` have
    a multiplier other than 1."""
    if mechanism not in MECHANISMS:
        raise ValueError(
            f"Invalid value received for argument `mechanism`. Expected one of "
            f"{MECHANISMS}. Received: mechanism={mechanism!r}"
        )
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
    kind, how = update_kind(optimizer)
    name = describe_optimizer(optimizer)
    if mechanism == "gradient_scale":
        return "gradient_scale", kind
    if mechanism == "reparametrize":
        if kind not in UPDATE_RULES:
            raise ValueError(
                f"Cannot reparametrise for {name}: it {how}, so no output scale "
                f"gives a layer a learning-rate multiplier. Use "
                f"`stopgrad_lr.multi_optimizer(model, multipliers, optimizer)`."
            )
        return "reparametrize", kind
    if not changed_layers:
        return "gradient_scale", kind
    regularized = any(weight_regularizers(layer) for layer in changed_layers)
    chosen = recommend(optimizer, regularized)
    if chosen == "multi_optimizer":
        reasons = [f"it {how}"] if kind not in UPDATE_RULES else []
        reasons += [f"{setting} {why}" for setting, why in _settings(optimizer)]
        # Offer only what `mechanism=` then accepts: a reparametrisation
        # needs an output scale rule for the optimizer.
        accepted = (
            "mechanism='gradient_scale' or 'reparametrize'"
            if kind in UPDATE_RULES
            else "mechanism='gradient_scale'"
        )
        raise ValueError(
            f"mechanism='auto' found no mechanism that gives these multipliers "
            f"with {name}: {'; '.join(reasons)}. Use "
            f"`stopgrad_lr.multi_optimizer(model, multipliers, optimizer)` to "
            f"give each group its own optimizer, or pass {accepted} to accept "
            f"the difference (a warning says what it is)."
        )
    return chosen, kind


@dataclasses.dataclass(frozen=True)
class OptimizerReport:
    """What `stopgrad_lr.check_optimizer` found.

    Attributes:
        optimizer: The optimizer's class, as `"Adam"` or
            `"LossScaleOptimizer(SGD)"`.
        ok: Whether the optimizer gives the layers the learning-rate
            multipliers that the model's stopgrad_lr layers imply (without a
            model: whether gradient scales are multipliers for it).
        problems: One sentence per problem, each saying what breaks the
            multipliers and how to fix it.
        recommended: The mechanism that works with this optimizer:
            `"gradient_scale"`, `"reparametrize"` or `"multi_optimizer"`.

    The report's truth value is `ok`, so `if not report: print(report)`
    reads as it should.
    """

    optimizer: str
    ok: bool
    problems: list[str]
    recommended: str

    def __bool__(self) -> bool:
        """`report.ok`, so that `if check_optimizer(optimizer, model):` reads
        as it should."""
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            return (
                f"{self.optimizer} gives the layers the learning-rate "
                f"multipliers that the model's stopgrad_lr layers imply."
            )
        lines = [
            f"{self.optimizer} does not give the layers the learning-rate "
            f"multipliers that the model's stopgrad_lr layers imply:"
        ]
        lines += [f"- {problem}" for problem in self.problems]
        return "\n".join(lines)


@dataclasses.dataclass
class _Scaled:
    """A layer whose learning rate a stopgrad_lr layer multiplies."""

    path: str
    layer: Any
    multiplier: float
    parameter_scale: ParameterScale | None = None  # None: by gradient scales
    # Every gradient path passes a GradientStop, or the layer is frozen: no
    # optimizer setting reaches its weights (on TensorFlow and torch; on JAX
    # only a frozen layer's, see _freeze).
    stopped: bool = False


def check_optimizer(optimizer: Any, model: Any = None) -> OptimizerReport:
    """Says whether an optimizer gives the model's layers their multipliers.

    A gradient scale multiplies a gradient, and a reparametrisation
    (`ParameterScale`) multiplies a layer's gradient by `c`; whether that
    multiplies the layer's learning rate depends on the optimizer
    (`docs/optimizers.md` measures every one). This function reads the
    optimizer's class and settings and the model's stopgrad_lr layers and
    lists what breaks the multipliers:

    - an optimizer that normalises the gradient (Adam, RMSprop, Lion,
      Muon...) cancels gradient scales;
    - a reparametrisation chosen for another kind of optimizer (SGD gets
      `c**2`, Adam `c`), and optimizers for which neither mechanism works
      (Adafactor, Lamb, Adagrad, Adadelta, Ftrl);
    - decoupled `weight_decay`, `clipnorm`, `clipvalue` and `global_clipnorm`,
      which act outside both mechanisms;
    - a weight regularizer on a gradient-scaled layer, whose gradient does not
      pass through the scale (a reparametrisation rewrites regularizers).

    Layers whose paths carry different scales (`nan` in
    `stopgrad_lr.effective_multipliers`, such as a gradient reversal in one
    branch) are a weighting of gradient paths, which every optimizer keeps,
    and are not reported. The scales are read as they are now; a schedule
    that changes them later is not seen.

    `model.fit` runs this check by itself the first time it trains a model
    that contains stopgrad_lr layers, and issues one
    `OptimizerMismatchWarning` if the report is not ok.

    Args:
        optimizer: A `keras.optimizers.Optimizer`; a `LossScaleOptimizer` is
            read through, a `MultiOptimizer` per layer.
        model: The model, or `None` to ask whether gradient scales are
            learning-rate multipliers for this optimizer at all.

    Returns:
        An `OptimizerReport`; `str(report)` reads as a paragraph.

    Raises:
        ValueError: If `optimizer` is not a Keras optimizer.

    Examples:
        >>> import keras
        >>> from stopgrad_lr._optimizers import check_optimizer
        >>> check_optimizer(keras.optimizers.SGD(0.1, momentum=0.9)).ok
        True
        >>> report = check_optimizer(keras.optimizers.Adam())
        >>> report.ok, report.recommended
        (False, 'reparametrize')
    """
    if not isinstance(optimizer, _OPT.Optimizer):
        raise ValueError(
            f"Invalid value received for argument `optimizer`. Expected a "
            f"keras.optimizers.Optimizer. Received: optimizer={optimizer!r}"
        )
    if model is not None and not isinstance(model, keras.Model):
        raise ValueError(
            f"Invalid value received for argument `model`. Expected the "
            f"keras.Model whose stopgrad_lr layers to check (pass a layer's "
            f"model, not the layer), or None to ask about the optimizer alone. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    inner = _unwrap(optimizer)
    recommended = (
        "multi_optimizer"
        if isinstance(inner, _OPT.MultiOptimizer)
        else recommend(optimizer)
    )
    if model is None:
        scaled = [_Scaled("the layers upstream of a gradient scale", None, math.nan)]
    else:
        scaled = list(_scaled_layers(model))
    owners = _Owners(inner)
    groups: dict[tuple[str, int], tuple[Any, str, list[_Scaled]]] = {}
    for item in scaled:
        for owner in owners.of(item.layer):
            for problem in _problems(item, owner, owners.factor(owner)):
                key = (problem, id(owner))
                groups.setdefault(key, (owner, problem, []))[2].append(item)
    sentences = [
        _sentence(problem, owner, items, owners)
        for owner, problem, items in groups.values()
    ]
    return OptimizerReport(
        describe_optimizer(optimizer), not sentences, sentences, recommended
    )


class _Owners:
    """The optimizers that update a layer: the optimizer itself, or for a
    MultiOptimizer the group optimizers that its variables map to (a
    `stopgrad_lr.multi_optimizer` may put a kernel and a bias apart)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.map = None
        if isinstance(optimizer, _OPT.MultiOptimizer):
            config = optimizer.get_config()["optimizer_map"]
            # The public config holds the map (variable path regex ->
            # optimizer) when it is an OptimizerMap rather than a function.
            if isinstance(config, dict) and config.get("class_name") == "OptimizerMap":
                self.map = keras.saving.deserialize_keras_object(config)

    def of(self, layer: Any) -> list[Any]:
        if self.map is None:
            return [self.optimizer]
        if layer is None:  # no model: every group
            return [*self.map.values(), self.map.default_optimizer]
        found = {}
        for variable in layer.trainable_variables:
            owner = self.map[variable.path]
            found[id(owner)] = owner
        return list(found.values()) or [self.optimizer]

    @property
    def in_multi(self) -> bool:
        return self.map is not None

    def factor(self, owner: Any) -> float:
        """The group's learning rate over the default group's, now: the
        multiplier that a `multi_optimizer` group gives its variables (1.0
        for a group of another class than the default)."""
        default = self.map.default_optimizer if self.map is not None else None
        # Groups of another class are other optimizers, not a multiplier.
        if default is None or owner is default or type(owner) is not type(default):
            return 1.0
        rate, base = (
            float(keras.ops.convert_to_numpy(group.learning_rate))
            for group in (owner, default)
        )
        return float(f"{rate / base:.6g}") if base else math.nan

    def label(self, owner: Any) -> str:
        name = describe_optimizer(owner)
        if owner is self.optimizer:
            return name
        return f"{name} (in the MultiOptimizer, group {owner.name!r})"


def _scaled_layers(model: Any) -> Iterator[_Scaled]:
    """Every layer whose learning rate a stopgrad_lr layer multiplies."""
    try:
        check_model(model, "check")
    except ValueError:
        # A subclassed model: its graph is code. Report each gradient scale
        # as a multiplier of the layers before it.
        for path, layer in iter_layers(model):
            if isinstance(layer, GradientScale) and layer.scale != 1.0:
                yield _Scaled(f"everything upstream of '{path}'", None, layer.scale)
        return
    graph = Graph(model)
    stopped = _stopped_nodes(graph)
    layers = {node.path: node.layer for node in graph.nodes}
    stopped_paths = {graph.nodes[index].path for index in stopped}
    stopped_paths |= {node.path for node in graph.nodes if node.frozen}
    for path, multiplier in effective_multipliers(model).items():
        if multiplier != 1.0 and not math.isnan(multiplier):
            yield _Scaled(path, layers[path], multiplier, stopped=path in stopped_paths)
    for node in graph.nodes:
        if isinstance(node.layer, ParameterScale):
            for producer in graph.producers(node):
                yield _Scaled(
                    producer.path,
                    producer.layer,
                    node.layer.multiplier,
                    parameter_scale=node.layer,
                )


def _stopped_nodes(graph: Graph) -> set[int]:
    """The nodes whose every gradient path to an output passes a
    GradientStop: the optimizer never sees their variables' gradients."""
    outputs = set(graph.outputs)
    reaches = [False] * len(graph.nodes)
    for index in reversed(graph.order):
        node = graph.nodes[index]
        reaches[index] = any(tensor in outputs for tensor in node.outputs) or any(
            reaches[consumer.index] and not isinstance(consumer.layer, GradientStop)
            for consumer in graph.consumers(node)
        )
    return {index for index, reached in enumerate(reaches) if not reached}


# The kinds of problem that are not an optimizer setting.
_CANCELLED, _WRONG_RULE, _REGULARIZER = "cancelled", "wrong_rule", "regularizer"
_COMPOUND = "compound"


def _problems(item: _Scaled, owner: Any, factor: float = 1.0) -> Iterator[str]:
    """The problems of one scaled layer under the optimizer that updates it
    (a MultiOptimizer group whose rate is `factor` times the default's): a
    kind above, or an optimizer setting such as `"weight_decay=0.004"`."""
    kind, _ = update_kind(owner)
    m = item.multiplier
    works = False
    if item.parameter_scale is None:
        # A zero scale stays zero and -1 stays -1 under normalisation.
        if not item.stopped and (
            kind not in UPDATE_RULES
            or (kind == SCALE_INVARIANT and abs(m) not in (0.0, 1.0))
        ):
            yield _CANCELLED
        else:
            works = kind == LINEAR
        if item.layer is not None and weight_regularizers(item.layer):
            yield _REGULARIZER
    elif kind != item.parameter_scale.update_rule:
        yield _WRONG_RULE
    else:
        works = True
    # Without a model (a nan placeholder) nothing is known to compound.
    known = m != 0.0 and not math.isnan(m)
    if works and not item.stopped and known and factor != 1.0:
        yield _COMPOUND
    if not item.stopped:
        for setting, _ in _settings(owner):
            # Clipping a zero gradient changes nothing; decay still shrinks.
            if m != 0.0 or setting.startswith("weight_decay"):
                yield setting


def _sentence(problem: str, owner: Any, items: list[_Scaled], owners: _Owners) -> str:
    """One problem of the report: what breaks, for which layers, the fix.

    A fix never recommends what the code would refuse: `apply_lr_multipliers`
    with `optimizer=` only where its "auto" accepts the optimizer, a
    reparametrisation only for optimizers it has an output scale for, and
    inside a MultiOptimizer (which `apply_lr_multipliers` does not take)
    the MultiOptimizer's own groups.
    """
    kind, how = update_kind(owner)
    label = owners.label(owner)
    strip = "`stopgrad_lr.strip_gradient_scales(model)`"
    if owners.in_multi:
        multi = (
            f"remove the stopgrad_lr layers ({strip}) and give these multipliers "
            f"to the MultiOptimizer's groups "
            f"(`stopgrad_lr.multi_optimizer(model, multipliers, optimizer)`)"
        )
    else:
        multi = "`stopgrad_lr.multi_optimizer(model, multipliers, optimizer)`"
    rewrite = "`stopgrad_lr.apply_lr_multipliers(model, multipliers, optimizer=...)`"
    rewrites = not owners.in_multi and recommend(owner) != "multi_optimizer"
    layers = _listing(items, lambda item: f"multiplier {item.multiplier:g}")
    if problem == _CANCELLED and kind == SCALE_INVARIANT:
        fix = (
            f"{rewrite} reparametrises them for {label}, or {multi} gives them "
            f"their learning rates"
            if rewrites
            else multi
        )
        return (
            f"{label} {how}, which cancels a constant gradient scale, so these "
            f"layers train at about the full learning rate{layers}. Fix: {fix}."
        )
    if problem == _CANCELLED and kind == NEITHER:
        return (
            f"{label} {how}: for it neither a gradient scale nor a "
            f"reparametrisation is a learning-rate multiplier, so these layers "
            f"do not get their multipliers{layers}. Fix: {multi}."
        )
    if problem == _CANCELLED:
        return (
            f"{label} {how}, so stopgrad_lr cannot tell whether these layers get "
            f"their multipliers{layers}. Fix: {multi}, or measure the optimizer "
            f"with benchmarks/optimizer_table.py."
        )
    if problem == _COMPOUND:
        factor = owners.factor(owner)
        layers = _listing(
            items,
            lambda item: (
                f"multiplier {item.multiplier:g} x {factor:g} = "
                f"{item.multiplier * factor:g}"
            ),
        )
        return (
            f"{label} trains its variables at {factor:g} times the base rate, "
            f"and stopgrad_lr layers give these layers a multiplier as well, so "
            f"the two multiply{layers}. Fix: give each multiplier once: "
            f"{strip} removes the stopgrad_lr layers, or build the "
            f"MultiOptimizer without these layers."
        )
    if problem == _WRONG_RULE:
        meant = sorted(
            {item.parameter_scale.update_rule for item in items if item.parameter_scale}
        )
        layers = _listing(items, lambda item: _reparametrised(kind, item))
        if kind not in UPDATE_RULES:
            fix = f"no output scale is a multiplier for it{layers}. Fix: {multi}."
        else:
            then = rewrite if rewrites else multi
            fix = (
                f"they get other multipliers{layers}. Fix: fold the scales back "
                f"with {strip}, then {then}."
            )
        return (
            f"These layers were reparametrised for "
            f"{' and '.join(_RULE_TEXT[rule] for rule in meant)}, but {label} "
            f"{how}, so {fix}"
        )
    if problem == _REGULARIZER:
        layers = _listing(
            items, lambda item: ", ".join(weight_regularizers(item.layer))
        )
        fix = (
            f"{rewrite} with mechanism='reparametrize' rewrites the regularizers "
            f"to match, or {multi}"
            if kind in UPDATE_RULES and not owners.in_multi
            else multi
        )
        return (
            f"A weight regularizer's gradient reaches the weights without "
            f"passing through the gradient scale, so the penalties of these "
            f"layers train at the full learning rate{layers}. Fix: {fix}."
        )
    why = dict(_settings(owner))[problem]
    return (
        f"{label}'s {problem} {why}{layers}. Fix: {multi}, whose per-group "
        f"optimizers apply it at each group's learning rate, or remove the "
        f"setting."
    )


_RULE_TEXT = {
    LINEAR: "SGD-like optimizers (c = sqrt(m))",
    SCALE_INVARIANT: "Adam-like optimizers (c = m)",
}


def _reparametrised(kind: str, item: _Scaled) -> str:
    scale = item.parameter_scale.scale if item.parameter_scale else math.nan
    wanted = f"{item.multiplier:g}"
    if kind == LINEAR:
        return f"c = {scale:g}: multiplier {scale**2:g} instead of {wanted}"
    if kind == SCALE_INVARIANT:
        return f"c = {scale:g}: multiplier {scale:g} instead of {wanted}"
    return f"c = {scale:g}, meant for multiplier {wanted}"


def _listing(items: list[_Scaled], detail: Callable[[_Scaled], str]) -> str:
    """`: 'a' (detail), 'b' (detail)`, at most four named; empty for the
    placeholder of `check_optimizer` without a model."""
    if items[0].layer is None and math.isnan(items[0].multiplier):
        return ""
    shown = [f"{_quoted(item)} ({detail(item)})" for item in items[:4]]
    more = len(items) - len(shown)
    return ": " + ", ".join(shown) + (f" and {more} more" if more else "")


def _quoted(item: _Scaled) -> str:
    return f"'{item.path}'" if item.layer is not None else item.path


# Training-time check ----------------------------------------------------------

# Optimizer -> the models already checked with it: one report per pair.
_CHECKED: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = (
    weakref.WeakKeyDictionary()
)


def _first_check(optimizer: Any, model: Any) -> bool:
    models = _CHECKED.setdefault(optimizer, weakref.WeakSet())
    if model in models:
        return False
    models.add(model)
    return True


def _message(optimizer: Any, model: Any) -> str | None:
    report = check_optimizer(optimizer, model)
    if report.ok:
        return None
    return (
        f"{report}\nstopgrad_lr.check_optimizer(optimizer, model) repeats this "
        f"report; warnings.filterwarnings('ignore', "
        f"category=stopgrad_lr.OptimizerMismatchWarning) silences it."
    )


def warn_if_mismatched(optimizer: Any, model: Any, stacklevel: int) -> None:
    """Issues one `OptimizerMismatchWarning` per model and optimizer when
    `check_optimizer` finds problems."""
    if _first_check(optimizer, model):
        message = _message(optimizer, model)
        if message is not None:
            warnings.warn(message, OptimizerMismatchWarning, stacklevel=stacklevel + 1)


def _model_in_training() -> Any:
    """The model whose `train_step` is on the call stack, or None."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "train_step":
                owner = frame.f_locals.get("self")
                if isinstance(owner, keras.Model):
                    return owner
            frame = frame.f_back
        return None
    finally:
        del frame  # a frame in a local variable is a reference cycle


def check_training_optimizer() -> None:
    """Called by stopgrad_lr's layers in a training call: checks, once, the
    optimizer of the model that `fit` (or `train_on_batch`) is training."""
    model = _model_in_training()
    optimizer = getattr(model, "optimizer", None)
    if not isinstance(optimizer, _OPT.Optimizer) or not _first_check(optimizer, model):
        return
    # The call comes while `fit` traces its step, where the model's variables
    # are symbolic (a tf.function graph, JAX's stateless scope) and cannot be
    # read. Both contexts are thread-local: a fresh thread reads them eagerly.
    # The warning is issued here, where a warnings filter can turn it into an
    # error that reaches the caller.
    outcome: list[str | None] = []

    def report() -> None:
        try:
            outcome.append(_message(optimizer, model))
        except Exception as error:  # a checker bug must not stop training
            outcome.append(
                f"stopgrad_lr could not check whether {describe_optimizer(optimizer)} "
                f"gives this model's layers their learning-rate multipliers "
                f"({type(error).__name__}: {error}). Call "
                f"stopgrad_lr.check_optimizer(model.optimizer, model) after "
                f"training, and please report the error."
            )

    thread = threading.Thread(target=report, name="stopgrad_lr-check")
    thread.start()
    thread.join()
    if outcome[0] is not None:
        warnings.warn(outcome[0], OptimizerMismatchWarning, stacklevel=3)


# The fallback: one optimizer per group ---------------------------------------


@keras.saving.register_keras_serializable(package="stopgrad_lr")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule multiplied by a constant factor.

    `stopgrad_lr.multi_optimizer` gives each group of layers a copy of the
    base optimizer whose schedule is wrapped in this.

    Args:
        schedule: A `keras.optimizers.schedules.LearningRateSchedule`.
        factor: The multiplier, a finite float.

    Raises:
        ValueError: If `schedule` is not a `LearningRateSchedule` or `factor`
            is not a finite float.

    Examples:
        >>> import keras
        >>> from stopgrad_lr._optimizers import ScaledSchedule
        >>> base = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
        >>> round(float(ScaledSchedule(base, 0.1)(10)), 6)
        0.005
    """

    def __init__(self, schedule: Any, factor: float) -> None:
        if not isinstance(schedule, _OPT.schedules.LearningRateSchedule):
            raise ValueError(
                f"Invalid value received for argument `schedule`. Expected a "
                f"keras.optimizers.schedules.LearningRateSchedule. Received: "
                f"schedule={schedule!r}"
            )
        self.schedule = schedule
        self.factor = validate_scale(factor, argument="factor")

    def __call__(self, step: Any) -> Any:
        return keras.ops.multiply(self.schedule(step), self.factor)

    def get_config(self) -> dict[str, Any]:
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "factor": self.factor,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ScaledSchedule:
        schedule = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(schedule, config["factor"])


# A learning rate that is a plain function serialises with one of these.
_FUNCTION_CLASS_NAMES = ("function", "__lambda__")


def _group_copy(
    optimizer: Any, factor: float, weight_decay_factor: float, name: str
) -> Any:
    """A fresh copy of `optimizer` (same class and settings, no state) whose
    learning rate or schedule is multiplied by `factor` and weight decay by
    `weight_decay_factor`."""
    with warnings.catch_warnings():
        # Keras warns that a lambda learning rate is unsafe to save; the
        # error below says what to do instead.
        warnings.filterwarnings("ignore", message="The object being serialized")
        config = optimizer.get_config()
    rate = config["learning_rate"]
    if isinstance(rate, dict) and rate.get("class_name") in _FUNCTION_CLASS_NAMES:
        function = rate.get("config") if rate["class_name"] == "function" else None
        raise ValueError(
            f"Invalid value received for argument `base_optimizer`. Expected an "
            f"optimizer whose learning_rate is a float or a "
            f"keras.optimizers.schedules.LearningRateSchedule: a plain function "
            f"or lambda cannot be multiplied per group, nor saved. Write it as "
            f"a LearningRateSchedule subclass (its __call__(step) returns the "
            f"rate) or pass a float. Received: learning_rate="
            f"{'a lambda' if function is None else f'the function {function}'}"
        )
    schedule = None
    if isinstance(rate, dict):
        schedule = keras.saving.deserialize_keras_object(rate)
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        config["learning_rate"] = (
            schedule if factor == 1.0 else ScaledSchedule(schedule, factor)
        )
    elif isinstance(rate, int | float) and not isinstance(rate, bool):
        config["learning_rate"] = float(rate) * factor
    else:
        raise ValueError(
            f"Invalid value received for argument `base_optimizer`. Expected an "
            f"optimizer whose learning_rate is a float or a "
            f"keras.optimizers.schedules.LearningRateSchedule. Received: "
            f"learning_rate={rate!r}"
        )
    if weight_decay_factor != 1.0 and config.get("weight_decay"):
        config["weight_decay"] = float(config["weight_decay"]) * weight_decay_factor
    config["name"] = name
    return type(optimizer).from_config(config)


@keras.saving.register_keras_serializable(package="stopgrad_lr")
class GroupedLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """A `LossScaleOptimizer` around a `MultiOptimizer` that shows its groups.

    `stopgrad_lr.multi_optimizer` returns this under mixed precision. It is a
    `keras.optimizers.LossScaleOptimizer` in every way, and also has the
    `optimizers` attribute of the `MultiOptimizer` inside it: Keras's
    `LearningRateScheduler` and `ReduceLROnPlateau` look for that attribute
    on `model.optimizer` and then set each group's learning rate, which they
    cannot do through a stock `LossScaleOptimizer` (whose `learning_rate` is
    the MultiOptimizer's, which does not exist).
    """

    @property
    def optimizers(self) -> list[Any]:
        """The MultiOptimizer's group optimizers, default group last."""
        return list(self.inner_optimizer.optimizers)


def multi_optimizer(
    model: keras.Model,
    multipliers: Mapping[Pattern, float],
    base_optimizer: keras.optimizers.Optimizer,
    *,
    weight_decay_multipliers: Mapping[Pattern, float] | None = None,
) -> keras.optimizers.Optimizer:
    """Returns a stock `keras.optimizers.MultiOptimizer` that gives each group its rate.

    The optimizer-level way to give layers, or single variables,
    learning-rate multipliers, which works for every optimizer and every
    layer: each group of variables (one per distinct pair of learning-rate
    and weight-decay multipliers) is updated by a copy of `base_optimizer`
    whose learning rate (or learning-rate schedule) is multiplied by the
    group's multiplier, and whose weight decay by the group's weight-decay
    multiplier. Variables selected by no pattern get 1.0. Weight decay,
    clipping (`global_clipnorm` too) and epsilon then act per group, as with
    separate optimizers. Use it where neither a gradient scale nor a
    reparametrisation gives the multipliers: AdamW and any weight decay,
    clipping, Adafactor, Lamb, Adagrad, Adadelta, Ftrl, layers that cannot
    be reparametrised, and a kernel and a bias with different rates. The
    fine-tuning recipe of BEiT and MAE (AdamW, layer-wise decay, no weight
    decay on biases and normalisation parameters) is

    ```python
    multi_optimizer(
        model,
        stopgrad_lr.layerwise_decay_multipliers(model, "block*_out", 0.75),
        keras.optimizers.AdamW(1e-3, weight_decay=0.05),
        weight_decay_multipliers={"@bias": 0.0, "@norm": 0.0, "@embedding": 0.0},
    )
    ```

    Patterns (the keys of both dicts): a layer pattern as in
    `stopgrad_lr.apply_lr_multipliers` (a glob or compiled regex for a layer's
    name or path) selects all the layer's trainable variables; a variable
    pattern is matched against `"<layer>/<variable>"` (`"head/kernel"`,
    `"head/bias"`, `"*/bias"`, `"block1/attention/query/kernel"`); the kind
    selectors `"@bias"`, `"@norm"` (every variable of a normalisation layer)
    and `"@embedding"` (of an embedding layer) select by what a variable is,
    and may select nothing. The most specific wins: a variable pattern over
    a kind selector over a layer pattern.

    The base optimizer's `exclude_from_weight_decay(...)` is kept: the
    variables it excludes go to groups with no weight decay, which survives
    a `.keras` round trip (Keras's own exclusions do not).

    Each group optimizer has a learning rate of its own (a variable, or a
    schedule), reachable as `optimizer.optimizers`; Keras's
    `LearningRateScheduler` and `ReduceLROnPlateau` set each of them, so a
    schedule that maps the current rate to a new one (`lambda epoch, lr: lr
    * 0.5`) keeps the ratios between groups, while one that returns a fixed
    value gives every group that same value. Under mixed precision (a
    `LossScaleOptimizer` base, or a model with the `"mixed_float16"`
    policy) the result is a `GroupedLossScaleOptimizer`, a
    `LossScaleOptimizer` that shows the same `optimizers`, so the callbacks
    work there too.

    The model is not changed, and the result needs no stopgrad_lr layer: the
    groups are regexes of variable paths, saved with a compiled model in a
    `.keras` file (a schedule is wrapped in `ScaledSchedule` and mixed
    precision uses `GroupedLossScaleOptimizer`, so loading such a file needs
    `import stopgrad_lr`).

    Args:
        model: A built functional or Sequential model, possibly nested.
        multipliers: Maps a pattern to a learning-rate multiplier, a finite
            float >= 0, such as `stopgrad_lr.layerwise_decay_multipliers(...)`.
        base_optimizer: The optimizer to copy per group. Only its class and
            settings (`get_config()`) and its weight-decay exclusions are
            used, not its state. A `LossScaleOptimizer` is copied around the
            `MultiOptimizer`.
        weight_decay_multipliers: Maps a pattern to a multiplier of the base
            optimizer's `weight_decay` (0 for none), or `None`.

    Returns:
        A `keras.optimizers.MultiOptimizer` (in a `GroupedLossScaleOptimizer`
        under mixed precision), ready for `model.compile`.

    Raises:
        ValueError: If the model is not a built functional or Sequential
            model; a pattern selects nothing (a kind selector aside); one
            variable is selected by two patterns of the same kind with
            different values; a multiplier is negative or not finite;
            `base_optimizer` is not an optimizer, is a `MultiOptimizer`, or
            has a learning rate that is a plain function;
            `weight_decay_multipliers` is given but the base optimizer has no
            weight decay; or two variables in different groups have the same
            path (rename a layer).

    Examples:
        >>> import keras
        >>> from stopgrad_lr._optimizers import multi_optimizer
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(8, name="backbone")(inputs)
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
        >>> optimizer = multi_optimizer(
        ...     model, {"backbone": 0.1}, keras.optimizers.Adam(1e-3)
        ... )
        >>> sorted(
        ...     round(float(o.learning_rate), 6) for o in optimizer.optimizers
        ... )
        [0.0001, 0.001]
        >>> model.compile(optimizer=optimizer, loss="mse")

        The kernel and the bias of one layer apart, no decay on biases:

        >>> optimizer = multi_optimizer(
        ...     model,
        ...     {"head/kernel": 10.0, "head/bias": 20.0},
        ...     keras.optimizers.AdamW(1e-3, weight_decay=0.05),
        ...     weight_decay_multipliers={"@bias": 0.0},
        ... )
        >>> for group in sorted(optimizer.optimizers, key=lambda o: o.name):
        ...     print(group.name, group.weight_decay)
        adam_w 0.05
        adam_w_wd0 0.0
        adam_w_x10 0.05
        adam_w_x20_wd0 0.0
    """
    check_model(model, "build an optimizer for")
    validate_optimizer(base_optimizer, "base_optimizer")
    inner = _unwrap(base_optimizer)
    graph = Graph(model)
    rates = select(graph, multipliers, "multipliers", validate_multiplier)
    decays: dict[int, float] = {}
    if weight_decay_multipliers is not None:
        if not inner.weight_decay:
            raise ValueError(
                f"Invalid value received for argument `weight_decay_multipliers`. "
                f"Expected None: {describe_optimizer(inner)} has no weight decay "
                f"(weight_decay={inner.weight_decay!r}), so there is nothing to "
                f"multiply. Set weight_decay on the base optimizer. Received: "
                f"weight_decay_multipliers={weight_decay_multipliers!r}"
            )
        decays = select(
            graph,
            weight_decay_multipliers,
            "weight_decay_multipliers",
            validate_multiplier,
        )
    groups: dict[int, tuple[float, float]] = {}
    for site in sites(graph):
        key = id(site.variable)
        decay = decays.get(key, 1.0)
        # The base optimizer's own exclude_from_weight_decay(...): Keras's
        # get_config() does not carry it, so it becomes a group without decay.
        if inner.weight_decay and not inner._use_weight_decay(site.variable):
            decay = 0.0
        groups[key] = (rates.get(key, 1.0), decay)
    optimizer_map = {
        regex: _group_copy(inner, rate, decay, _group_name(inner.name, rate, decay))
        for (rate, decay), regex in _group_regexes(model, graph, groups).items()
    }
    multi = _OPT.MultiOptimizer(
        _OPT.OptimizerMap(
            default_optimizer=_group_copy(inner, 1.0, 1.0, inner.name),
            optimizer_map=optimizer_map,
        )
    )
    if isinstance(base_optimizer, _OPT.LossScaleOptimizer):
        return GroupedLossScaleOptimizer(
            multi,
            initial_scale=base_optimizer.initial_scale,
            dynamic_growth_steps=base_optimizer.dynamic_growth_steps,
            name=base_optimizer.name,
        )
    if model.dtype_policy.name == "mixed_float16":
        # `compile` would wrap it in a stock LossScaleOptimizer, through which
        # Keras's learning-rate callbacks cannot reach the groups.
        return GroupedLossScaleOptimizer(multi)
    return multi


def _group_name(name: str, rate: float, decay: float) -> str:
    """`adamw`, `adamw_x0.1`, `adamw_wd0`, `adamw_x0.1_wd0`."""
    return (
        name
        + (f"_x{rate:g}" if rate != 1.0 else "")
        + (f"_wd{decay:g}" if decay != 1.0 else "")
    )


def _group_regexes(
    model: keras.Model, graph: Graph, groups: Mapping[int, tuple[float, float]]
) -> dict[tuple[float, float], str]:
    """Group -> a regex that `fullmatch`es the paths of exactly the
    variables of that group, for every group other than the default (1, 1).

    A MultiOptimizer routes variables by path, and Keras does not keep paths
    across a `.keras` round trip or `clone_model` ("mlp/block1/kernel" in a
    Sequential model named "mlp" loads as "block1/kernel"). So each variable
    is matched by its path from its layer's name on, after any prefix.
    """
    default = (1.0, 1.0)
    relative: dict[tuple[float, float], set[str]] = {}
    for site in sites(graph):
        group = groups[id(site.variable)]
        if group != default:
            path = f"{site.layer.name}/{site.relative}"
            relative.setdefault(group, set()).add(path)
    regexes = {
        group: "(?:.*/)?(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")"
        for group, paths in sorted(relative.items())
    }
    for variable in model.trainable_variables:
        wanted = groups.get(id(variable), default)
        hits = [g for g, regex in regexes.items() if re.fullmatch(regex, variable.path)]
        if hits != ([] if wanted == default else [wanted]):
            raise ValueError(
                f"The variable '{variable.path}' ({_group_text(wanted)}) cannot "
                f"be told apart by its path from variables with "
                f"{' and '.join(_group_text(g) for g in hits) or _group_text(default)}"
                f": a MultiOptimizer selects variables by path. Give the layers "
                f"distinct names."
            )
    return regexes


def _group_text(group: tuple[float, float]) -> str:
    rate, decay = group
    return f"multiplier {rate:g}" + (
        f", weight decay x{decay:g}" if decay != 1.0 else ""
    )
