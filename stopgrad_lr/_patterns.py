"""Selecting layers by name: glob strings, compiled regexes and nested paths.

A `str` pattern is a glob matched with `fnmatch.fnmatchcase`; a compiled
`re.Pattern` must `fullmatch`. A layer inside a nested model can be named by
its own name or by its path `"outer/inner"`.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Iterator
from typing import Any, Union

import keras

from stopgrad_lr._validation import invalid

Pattern = Union[str, "re.Pattern[str]"]


def validate_pattern(pattern: Any, argument: str = "pattern") -> Pattern:
    if isinstance(pattern, str | re.Pattern):
        return pattern
    raise invalid(
        argument,
        "a glob string such as 'conv2_*' or a compiled regex such as "
        "re.compile(r'conv\\d_block\\d_out')",
        pattern,
        typed=True,
    )


def describe(pattern: Pattern) -> str:
    """The pattern as a user wrote it, for messages."""
    if isinstance(pattern, re.Pattern):
        return f"re.compile({pattern.pattern!r})"
    return repr(pattern)


def matches(pattern: Pattern, *names: str) -> bool:
    """Whether `pattern` matches any of `names` (a layer's name or path)."""
    if isinstance(pattern, re.Pattern):
        return any(pattern.fullmatch(name) for name in names)
    return any(fnmatch.fnmatchcase(name, pattern) for name in names)


def iter_layers(model: keras.Model, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yields `(path, layer)` for every layer, depth first, nested models too.

    A nested model yields itself and then its own layers, whose paths are
    `"outer/inner"`.
    """
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        yield path, layer
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer, prefix=f"{path}/")


def sublayers(layer: Any) -> Iterator[Any]:
    """The layer and every layer under it, outermost first: the layers held
    as attributes, in lists, tuples and dicts, as Keras tracks them (public
    Keras has no recursive list of a layer's sublayers; `Model.layers` is
    one level of a model)."""
    seen: set[int] = set()
    stack = [layer]
    while stack:
        value = stack.pop()
        if isinstance(value, keras.layers.Layer):
            if id(value) in seen:
                continue
            seen.add(id(value))
            yield value
            stack.extend(reversed(list(vars(value).values())))
        elif isinstance(value, list | tuple):
            stack.extend(reversed(value))
        elif isinstance(value, dict):
            stack.extend(reversed(list(value.values())))


def closest_names(pattern: Pattern, names: Iterable[str], count: int = 5) -> list[str]:
    """The layer names that look most like `pattern`, for 'did you mean'."""
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    # Compare with the literal part of the pattern: 'conv9_*' -> 'conv9_'.
    literal = re.sub(r"[*?\[\]\\^$+(){}|.]", "", text)
    return difflib.get_close_matches(literal, list(names), n=count, cutoff=0.3)


def no_match_error(pattern: Pattern, names: Iterable[str], what: str = "layer") -> str:
    """A message for a pattern that matched nothing, with the nearest names."""
    names = list(names)
    nearest = closest_names(pattern, names)
    hint = (
        f"The closest {what} names are {nearest}."
        if nearest
        else f"The model's {what} names start with {names[:5]}."
    )
    return (
        f"Pattern {describe(pattern)} matched no {what}. A string is a glob "
        f"matched against the whole name (use '*' for any run of characters); "
        f"a compiled regex must match the whole name. {hint}"
        f"{_variable_hint(pattern, names)}"
    )


def _variable_hint(pattern: Pattern, names: list[str]) -> str:
    """For a pattern that looks like it selects variables ('head/bias',
    '*/bias', '@norm'): where variables can be selected."""
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    layer_part = text.rsplit("/", 1)[0]
    if isinstance(pattern, re.Pattern):
        try:
            layer_pattern: Pattern = re.compile(layer_part)
        except re.error:
            return ""
    else:
        layer_pattern = layer_part
    if not text.startswith("@") and not (
        "/" in text and any(matches(layer_pattern, name) for name in names)
    ):
        return ""
    return (
        f" {describe(pattern)} looks like a variable pattern ('layer/variable', "
        f"or a kind such as '@bias'): a gradient scale or a reparametrisation "
        f"acts on a whole layer's output, so it cannot give one variable of a "
        f"layer (its kernel or bias) a multiplier of its own. "
        f"`stopgrad_lr.multi_optimizer(model, multipliers, optimizer)` selects "
        f"variables."
    )
