"""`check_optimizer`: does an optimizer give the model's layers the
multipliers its stopgrad_lr layers imply? And the warning that says so.

The rewrite functions run the check when given the optimizer, and
`OptimizerCheck` (a callback, included in `ScaleSchedule`) runs it when
training starts; the layers themselves do nothing but their arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import keras

from stopgrad_lr._analysis import layer_multipliers
from stopgrad_lr._graph import Graph, check_model
from stopgrad_lr._layers import GradientScale, GradientStop, ParameterScale
from stopgrad_lr._optimizer_kinds import (
    LINEAR,
    NEITHER,
    SCALE_INVARIANT,
    UPDATE_RULES,
    describe_optimizer,
    recommend,
    settings,
    unwrap,
    update_rule_of,
    weight_regularizers,
)
from stopgrad_lr._patterns import iter_layers
from stopgrad_lr._validation import (
    invalid,
)


class OptimizerMismatchWarning(UserWarning):
    """The optimizer does not give the layers the multipliers that the
    model's stopgrad_lr layers imply (see `stopgrad_lr.check_optimizer`)."""


@dataclasses.dataclass(frozen=True)
class OptimizerGroup:
    """One group of a `keras.optimizers.MultiOptimizer`, as
    `stopgrad_lr.check_optimizer` reads it: what `stopgrad_lr.multi_optimizer`
    made, or a MultiOptimizer built by hand.

    Attributes:
        name: The group optimizer's name, as `"adam_w_x0.1_wd0"`.
        optimizer: Its class, as `"AdamW"`.
        multiplier: Its learning rate over the default group's, now: the
            learning-rate multiplier of its variables (`nan` for a group of
            another class than the default, which is another optimizer
            rather than a multiplier).
        learning_rate: Its learning rate now (a schedule's current value).
        weight_decay: Its `weight_decay` (`None` or 0 for none).
        variables: The paths of the model's trainable variables it updates
            (empty without a model).
        default: Whether it is the default group, which updates every
            variable that no other group selects.
    """

    name: str
    optimizer: str
    multiplier: float
    learning_rate: float
    weight_decay: float | None
    variables: tuple[str, ...]
    default: bool = False

    def __str__(self) -> str:
        decay = (
            "" if self.weight_decay is None else f", weight decay {self.weight_decay:g}"
        )
        default = ", the default group" if self.default else ""
        variables = ", ".join(self.variables) if self.variables else "no variable"
        return (
            f"'{self.name}' ({self.optimizer}{default}): multiplier "
            f"{self.multiplier:g}, learning rate {self.learning_rate:g}{decay}: "
            f"{variables}"
        )


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
        groups: For a `MultiOptimizer` (such as `stopgrad_lr.multi_optimizer`
            returns), its groups: which variable goes to which group, at what
            learning-rate multiplier and weight decay (`OptimizerGroup`);
            empty for any other optimizer. `str(report)` lists them.

    The report's truth value is `ok`, so `if not report: print(report)`
    reads as it should.
    """

    optimizer: str
    ok: bool
    problems: list[str]
    recommended: str
    groups: list[OptimizerGroup] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        """`report.ok`, so that `if check_optimizer(optimizer, model):` reads
        as it should."""
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            lines = [
                f"{self.optimizer} gives the layers the learning-rate "
                f"multipliers that the model's stopgrad_lr layers imply."
            ]
        else:
            lines = [
                f"{self.optimizer} does not give the layers the learning-rate "
                f"multipliers that the model's stopgrad_lr layers imply:"
            ]
            lines += [f"- {problem}" for problem in self.problems]
        if self.groups:
            lines.append("Groups (multiplier: learning rate over the default group's):")
            lines += [f"- {group}" for group in self.groups]
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

    The rewrite functions run this check when given `optimizer=`, and the
    `stopgrad_lr.OptimizerCheck` callback (or a `ScaleSchedule`) when
    training starts; each issues one `OptimizerMismatchWarning` if the report
    is not ok. A plain `fit` runs no check.

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
        >>> from stopgrad_lr import check_optimizer
        >>> check_optimizer(keras.optimizers.SGD(0.1, momentum=0.9)).ok
        True
        >>> report = check_optimizer(keras.optimizers.Adam())
        >>> report.ok, report.recommended
        (False, 'reparametrize')
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise invalid("optimizer", "a keras.optimizers.Optimizer", optimizer)
    if model is not None and not isinstance(model, keras.Model):
        raise invalid(
            "model",
            "the keras.Model whose stopgrad_lr layers to check (pass a layer's model,"
            " not the layer), or None to ask about the optimizer alone",
            model,
            typed=True,
        )
    return _report(optimizer, model)


def _report(optimizer: Any, model: Any, graph: Graph | None = None) -> OptimizerReport:
    """`check_optimizer` of checked arguments; `graph`, if given, is the
    model's, already read."""
    inner = unwrap(optimizer)
    recommended = (
        "multi_optimizer"
        if isinstance(inner, keras.optimizers.MultiOptimizer)
        else recommend(optimizer)
    )
    if model is None:
        scaled = [_Scaled("the layers upstream of a gradient scale", None, math.nan)]
    else:
        scaled = list(_scaled_layers(model, graph))
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
    if owners.unreadable:
        sentences.append(
            f"{describe_optimizer(optimizer)} chooses each variable's optimizer "
            f"with a function, which stopgrad_lr cannot read, and has not been "
            f"built, so its group optimizers are not known yet. Check it again "
            f"after `optimizer.build(model.trainable_variables)` (or training), "
            f"or build it from a keras.optimizers.OptimizerMap, as "
            f"`stopgrad_lr.multi_optimizer` does, whose groups can be read."
        )
    return OptimizerReport(
        describe_optimizer(optimizer),
        not sentences,
        sentences,
        recommended,
        owners.groups(model),
    )


class _Owners:
    """The optimizers that update a layer: the optimizer itself, or for a
    MultiOptimizer the group optimizers that its variables map to (a
    `stopgrad_lr.multi_optimizer` may put a kernel and a bias apart)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.map = None
        # A MultiOptimizer that selects with a function: its group
        # optimizers (known once built), any of which may update a layer.
        self.selected_by_function: list[Any] | None = None
        if isinstance(optimizer, keras.optimizers.MultiOptimizer):
            config = optimizer.get_config()["optimizer_map"]
            # The public config holds the map (variable path regex ->
            # optimizer) when it is an OptimizerMap rather than a function.
            if isinstance(config, dict) and config.get("class_name") == "OptimizerMap":
                self.map = keras.saving.deserialize_keras_object(config)
            else:
                self.selected_by_function = list(optimizer.optimizers)

    @property
    def unreadable(self) -> bool:
        """A MultiOptimizer whose groups are not known: a function selects
        them, and it is not built."""
        return self.selected_by_function == []

    def of(self, layer: Any) -> list[Any]:
        if self.selected_by_function is not None:
            return self.selected_by_function
        if self.map is None:
            return [self.optimizer]
        if layer is None:  # no model: every group
            return [*self.map.values(), self.map.default_optimizer]
        found = {}
        # Per variable, as Keras decides it: a LoRA kernel trains inside a
        # layer whose own flag is False.
        for variable in layer.weights:
            if not variable.trainable:
                continue
            owner = self.map[variable.path]
            found[id(owner)] = owner
        return list(found.values()) or [self.optimizer]

    def owner(self, variable: Any) -> Any:
        """The optimizer that updates `variable`."""
        if self.map is None:
            return self.optimizer
        return self.map[variable.path]

    @property
    def in_multi(self) -> bool:
        return self.map is not None or self.selected_by_function is not None

    def groups(self, model: Any) -> list[OptimizerGroup]:
        """The MultiOptimizer's groups, default last, with the model's
        variables that each updates; empty for another optimizer, or for one
        whose groups a function selects."""
        if self.map is None:
            return []
        owners = [*self.map.values(), self.map.default_optimizer]
        variables: dict[int, list[str]] = {id(owner): [] for owner in owners}
        if model is not None:
            for variable in model.trainable_variables:
                variables[id(self.map[variable.path])].append(variable.path)
        found = {id(owner): owner for owner in owners}.values()
        return [
            OptimizerGroup(
                name=owner.name,
                optimizer=describe_optimizer(owner),
                multiplier=self.factor(owner)
                if type(owner) is type(self.map.default_optimizer)
                else math.nan,
                learning_rate=_number(owner.learning_rate),
                weight_decay=owner.weight_decay,
                variables=tuple(variables[id(owner)]),
                default=owner is self.map.default_optimizer,
            )
            for owner in found
        ]

    def factor(self, owner: Any) -> float:
        """The group's learning rate over the default group's, now: the
        multiplier that a `multi_optimizer` group gives its variables (1.0
        for a group of another class than the default)."""
        default = self.map.default_optimizer if self.map is not None else None
        # Groups of another class are other optimizers, not a multiplier.
        if default is None or owner is default or type(owner) is not type(default):
            return 1.0
        rate, base = (_number(group.learning_rate) for group in (owner, default))
        return float(f"{rate / base:.6g}") if base else math.nan

    def label(self, owner: Any) -> str:
        name = describe_optimizer(owner)
        if owner is self.optimizer:
            return name
        return f"{name} (in the MultiOptimizer, group {owner.name!r})"


def _number(value: Any) -> float:
    """A learning rate (a variable, or a schedule's current value) as a
    float, rounded as the float32 it is stored in prints."""
    return float(f"{float(keras.ops.convert_to_numpy(value)):.7g}")


def _scaled_layers(model: Any, graph: Graph | None) -> Iterator[_Scaled]:
    """Every layer whose learning rate a stopgrad_lr layer multiplies."""
    try:
        if graph is None:
            check_model(model, "check")
            graph = Graph(model)
    except ValueError:
        # A subclassed model: its graph is code. Report each gradient scale
        # as a multiplier of the layers before it.
        for path, layer in iter_layers(model):
            if isinstance(layer, GradientScale) and layer.scale != 1.0:
                yield _Scaled(f"everything upstream of '{path}'", None, layer.scale)
        return
    # Every gradient path of a stopped node passes a GradientStop: the
    # optimizer never sees its variables' gradients.
    reaches = graph.reaches_output(blocked=(GradientStop,))
    layers = {node.path: node.layer for node in graph.nodes}
    stopped_paths = {
        node.path for node in graph.nodes if not reaches[node.index] or node.frozen
    }
    # The gradient scales alone; a reparametrisation is its own item below.
    for path, multiplier in layer_multipliers(graph, parameter_scales=False).items():
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


# The kinds of problem that are not an optimizer setting.
_CANCELLED, _WRONG_RULE, _REGULARIZER = "cancelled", "wrong_rule", "regularizer"
_COMPOUND = "compound"


def _problems(item: _Scaled, owner: Any, factor: float = 1.0) -> Iterator[str]:
    """The problems of one scaled layer under the optimizer that updates it
    (a MultiOptimizer group whose rate is `factor` times the default's): a
    rule above, or an optimizer setting such as `"weight_decay=0.004"`."""
    rule, _ = update_rule_of(owner)
    m = item.multiplier
    works = False
    if item.parameter_scale is None:
        # A zero scale stays zero and -1 stays -1 under normalisation.
        if not item.stopped and (
            rule not in UPDATE_RULES
            or (rule == SCALE_INVARIANT and abs(m) not in (0.0, 1.0))
        ):
            yield _CANCELLED
        else:
            works = rule == LINEAR
        if item.layer is not None and weight_regularizers(item.layer):
            yield _REGULARIZER
    elif rule != item.parameter_scale.update_rule:
        yield _WRONG_RULE
    else:
        works = True
    # Without a model (a nan placeholder) nothing is known to compound.
    known = m != 0.0 and not math.isnan(m)
    if works and not item.stopped and known and factor != 1.0:
        yield _COMPOUND
    if not item.stopped:
        for setting, _ in settings(owner):
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
    rule, how = update_rule_of(owner)
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
    if problem == _CANCELLED and rule == SCALE_INVARIANT:
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
    if problem == _CANCELLED and rule == NEITHER:
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
        layers = _listing(items, lambda item: _reparametrised(rule, item))
        if rule not in UPDATE_RULES:
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
            if rule in UPDATE_RULES and not owners.in_multi
            else multi
        )
        return (
            f"A weight regularizer's gradient reaches the weights without "
            f"passing through the gradient scale, so the penalties of these "
            f"layers train at the full learning rate{layers}. Fix: {fix}."
        )
    why = dict(settings(owner))[problem]
    return (
        f"{label}'s {problem} {why}{layers}. Fix: {multi}, whose per-group "
        f"optimizers apply it at each group's learning rate, or remove the "
        f"setting."
    )


_RULE_TEXT = {
    LINEAR: "SGD-like optimizers (c = sqrt(m))",
    SCALE_INVARIANT: "Adam-like optimizers (c = m)",
}


def _reparametrised(rule: str, item: _Scaled) -> str:
    scale = item.parameter_scale.scale if item.parameter_scale else math.nan
    wanted = f"{item.multiplier:g}"
    if rule == LINEAR:
        return f"c = {scale:g}: multiplier {scale**2:g} instead of {wanted}"
    if rule == SCALE_INVARIANT:
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


def _message(optimizer: Any, model: Any, graph: Graph | None) -> str | None:
    report = _report(optimizer, model, graph)
    if report.ok:
        return None
    # The problems alone: the groups, one line each, are check_optimizer's.
    problems = dataclasses.replace(report, groups=[])
    return (
        f"{problems}\nstopgrad_lr.check_optimizer(optimizer, model) repeats this "
        f"report; warnings.filterwarnings('ignore', "
        f"category=stopgrad_lr.OptimizerMismatchWarning) silences it."
    )


def warn_if_mismatched(
    optimizer: Any, model: Any, stacklevel: int, graph: Graph | None = None
) -> None:
    """Issues one `OptimizerMismatchWarning` per model and optimizer when
    `check_optimizer` finds problems; `graph` is the model's, if read."""
    if _first_check(optimizer, model):
        message = _message(optimizer, model, graph)
        if message is not None:
            warnings.warn(message, OptimizerMismatchWarning, stacklevel=stacklevel + 1)


class OptimizerCheck(keras.callbacks.Callback):
    """Checks the optimizer when training starts, once per model and optimizer.

    At `on_train_begin` it runs `stopgrad_lr.check_optimizer(model.optimizer,
    model)` and, if the report is not ok, issues one
    `stopgrad_lr.OptimizerMismatchWarning` that says what breaks the
    multipliers and how to fix it. It costs nothing per step.
    `stopgrad_lr.ScaleSchedule` runs the same check, and the rewrite
    functions run it when given `optimizer=`; the layers themselves check
    nothing, so a plain `fit` without one of these is not checked. A custom
    training loop calls `check_optimizer` itself.

    Examples:
        >>> import keras, numpy as np, stopgrad_lr, warnings
        >>> inputs = keras.Input((4,))
        >>> hidden = stopgrad_lr.GradientScale(0.1)(keras.layers.Dense(4)(inputs))
        >>> model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
        >>> model.compile(keras.optimizers.Adam(), "mse")
        >>> x, y = np.ones((8, 4), "float32"), np.ones((8, 1), "float32")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = model.fit(x, y, verbose=0, callbacks=[stopgrad_lr.OptimizerCheck()])
        >>> sum(w.category is stopgrad_lr.OptimizerMismatchWarning for w in caught)
        1
    """

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        check_at_train_begin(self.model)


def check_at_train_begin(model: Any) -> None:
    """The check of a callback's `on_train_begin`: the model's optimizer, if
    it has one, once per model and optimizer."""
    optimizer = getattr(model, "optimizer", None)
    if isinstance(optimizer, keras.optimizers.Optimizer):
        # fit -> CallbackList -> on_train_begin -> here: the warning points
        # at `fit`.
        warn_if_mismatched(optimizer, model, stacklevel=4)
