"""Selecting trainable variables: by layer, by variable path, or by kind.

`stopgrad_lr.multi_optimizer` gives learning-rate and weight-decay
multipliers per variable, so its patterns may select less than a layer:

- a layer pattern, as everywhere in stopgrad_lr (a glob or compiled regex
  matched against the layer's name or its path `"outer/inner"`), selects
  all the layer's trainable variables;
- a variable pattern, the same kind of glob or regex, is matched against
  `"<layer>/<variable>"`, where `<layer>` is the layer's name or path and
  `<variable>` the variable's path inside the layer: `"head/kernel"`,
  `"head/bias"`, `"*/bias"` (every variable named bias),
  `"encoder/attention/query/kernel"` (a variable of a sublayer);
- a kind selector, `"@bias"`, `"@norm"` or `"@embedding"`, selects by what
  a variable is, whatever the names: every bias, every variable of a
  normalisation layer (gamma and beta of BatchNormalization,
  LayerNormalization, GroupNormalization, RMSNormalization and any layer
  class whose name ends in `Normalization` or `Norm`), every variable of an
  embedding layer (a class whose name contains `Embedding`). A selector may
  select nothing (a CNN has no embedding).

The most specific selection wins: a variable pattern over a kind selector
over a layer pattern, so `{"head": 10.0, "head/bias": 20.0}` gives the
kernel 10 and the bias 20. Two selections of the same kind that give one
variable different values are an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import keras

from stopgrad_lr._graph import Graph
from stopgrad_lr._patterns import (
    Pattern,
    closest_names,
    describe,
    matches,
    sublayers,
    validate_pattern,
)
from stopgrad_lr._surgery import candidates
from stopgrad_lr._validation import invalid

_NORMALIZATION_LAYERS = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.RMSNormalization,
    keras.layers.UnitNormalization,
)


def _is_bias(site: Site) -> bool:
    return site.name == "bias" or site.name.endswith("_bias")


def _is_norm(site: Site) -> bool:
    name = type(site.owner).__name__
    return isinstance(site.owner, _NORMALIZATION_LAYERS) or name.endswith(
        ("Normalization", "Norm")
    )


def _is_embedding(site: Site) -> bool:
    return "Embedding" in type(site.owner).__name__


KINDS: dict[str, Callable[[Site], bool]] = {
    "@bias": _is_bias,
    "@norm": _is_norm,
    "@embedding": _is_embedding,
}
# How specific a selection is: the most specific one gives a variable its value.
_LAYER, _KIND, _VARIABLE = 0, 1, 2
_LEVEL_TEXT = {_LAYER: "layer", _KIND: "kind", _VARIABLE: "variable"}


@dataclasses.dataclass(eq=False)
class Site:
    """A trainable variable and the layer of the model it belongs to."""

    variable: Any
    layer: Any  # the selectable layer (a node of the graph)
    layer_path: str  # its path: "name", or "outer/inner" in a nested model
    relative: str  # the variable's path inside the layer: "kernel", "query/bias"
    owner: Any  # the innermost layer that holds the variable

    @property
    def name(self) -> str:
        return self.relative.rsplit("/", 1)[-1]

    @property
    def path(self) -> str:
        return f"{self.layer_path}/{self.relative}"

    @property
    def names(self) -> tuple[str, str]:
        """What a variable pattern is matched against."""
        return self.path, f"{self.layer.name}/{self.relative}"


def relative_path(variable: Any, layer: Any) -> str:
    """The variable's path from its layer's name on, without that name:
    Keras prefixes paths with the scopes a layer was built in, and does not
    keep them across a `.keras` round trip or `clone_model`."""
    segments = variable.path.split("/")
    starts = [i for i, part in enumerate(segments[:-1]) if part == layer.name]
    return "/".join(segments[starts[-1] + 1 :]) if starts else variable.name


def _owners(layer: Any) -> dict[int, Any]:
    """Variable id -> the innermost (sub)layer that holds it."""
    found: dict[int, Any] = {}
    for sublayer in sublayers(layer):
        for variable in sublayer.weights:
            found[id(variable)] = sublayer  # inner layers come later
    return found


def sites(graph: Graph) -> list[Site]:
    """Every trainable variable of the model's selectable layers."""
    found = []
    for node in candidates(graph).values():
        if not node.trainable:
            continue
        owners = _owners(node.layer)
        for variable in node.variables:
            found.append(
                Site(
                    variable,
                    node.layer,
                    node.path,
                    relative_path(variable, node.layer),
                    owners.get(id(variable), node.layer),
                )
            )
    return found


def select(
    graph: Graph,
    patterns: Mapping[Pattern, float],
    argument: str,
    validate: Callable[[Any, str], float],
) -> dict[int, float]:
    """Variable id -> value for every variable a pattern selects."""
    if not isinstance(patterns, Mapping):
        raise invalid(
            argument,
            "a dict mapping layer or variable patterns to floats, such as "
            "{'backbone_*': 0.1, 'head/bias': 2.0, '@norm': 0.0}",
            patterns,
        )
    all_sites = sites(graph)
    chosen: dict[int, tuple[int, float, Pattern]] = {}
    for pattern, raw_value in patterns.items():
        pattern = validate_pattern(pattern, f"{argument} key")
        value = validate(raw_value, f"{argument}[{describe(pattern)}]")
        for level, site in _selected(pattern, all_sites):
            previous = chosen.get(id(site.variable))
            if previous is None or previous[0] < level:
                chosen[id(site.variable)] = (level, value, pattern)
            elif previous[0] == level and previous[1] != value:
                raise ValueError(
                    f"Variable '{site.path}' is selected by the "
                    f"{_LEVEL_TEXT[level]} patterns {describe(previous[2])} with "
                    f"value {previous[1]:g} and {describe(pattern)} with value "
                    f"{value:g}. Make the patterns disjoint or give them the "
                    f"same value (a more specific pattern, such as "
                    f"'layer/bias' over '@bias' over 'layer', overrides)."
                )
    return {key: value for key, (_, value, _) in chosen.items()}


def _selected(pattern: Pattern, all_sites: list[Site]) -> list[tuple[int, Site]]:
    if isinstance(pattern, str) and pattern.startswith("@"):
        if pattern not in KINDS:
            raise invalid(
                "pattern",
                "a layer or variable pattern, or one of the kind selectors "
                f"{sorted(KINDS)}",
                pattern,
            )
        return [(_KIND, site) for site in all_sites if KINDS[pattern](site)]
    found = [
        (_LAYER, site)
        for site in all_sites
        if matches(pattern, site.layer_path, site.layer.name)
    ]
    if not found:
        found = [
            (_VARIABLE, site) for site in all_sites if matches(pattern, *site.names)
        ]
    if not found:
        names = list(dict.fromkeys(site.layer_path for site in all_sites))
        names += [site.path for site in all_sites]
        nearest = closest_names(pattern, names)
        raise ValueError(
            f"Pattern {describe(pattern)} matched no layer with trainable "
            f"weights and no variable. A layer pattern is matched against a "
            f"layer's name or path ('outer/inner'), a variable pattern against "
            f"'<layer>/<variable>' (such as 'head/bias' or '*/bias'), both as "
            f"globs ('*' for any run of characters) or compiled regexes that "
            f"must match the whole text; '@bias', '@norm' and '@embedding' "
            f"select by kind. The closest names are {nearest or names[:5]}."
        )
    return found
