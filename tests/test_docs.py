"""The docs run as written and say what the code does."""

import re
from pathlib import Path

import keras
import pytest

from stopgrad_lr._optimizer_kinds import recommend

DOCS = Path(__file__).resolve().parent.parent / "docs"
CODE_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
BLOCKS = [
    pytest.param(block, id=f"{page.name}-{index}")
    for page in [*sorted(DOCS.glob("*.md")), DOCS.parent / "README.md"]
    for index, block in enumerate(CODE_BLOCK.findall(page.read_text("utf-8")))
]


def test_the_docs_have_code_blocks():
    assert BLOCKS


@pytest.mark.parametrize("block", BLOCKS)
def test_code_block_runs(block):
    exec(compile(block, "<docs>", "exec"), {})


# The "which mechanism" table of the README and of docs/index.md -----------------

README = DOCS.parent / "README.md"
MECHANISMS = {
    "gradient scales": "gradient_scale",
    "reparametrisation": "reparametrize",
    "one optimizer per group": "multi_optimizer",
}


def mechanism_rows(page):
    """(first cell, mechanism) for each row of the page's mechanism table."""
    text = page.read_text("utf-8")
    table = text[text.index("| your optimizer |") :].split("\n\n")[0]
    rows = []
    for line in table.splitlines()[2:]:
        first, second = line.split("|")[1:3]
        mechanism = next(
            v for k, v in MECHANISMS.items() if second.strip().startswith(k)
        )
        rows.append((first.strip(), mechanism))
    return rows


def named_optimizers(cell):
    """The optimizers a table cell names, built with their default settings:
    `Adam`, `AdamW(weight_decay=0)`, `LossScaleOptimizer(SGD)`."""
    namespace = {
        name: getattr(keras.optimizers, name)
        for name in dir(keras.optimizers)
        if isinstance(getattr(keras.optimizers, name), type)
    }
    for token in re.findall(r"[A-Z][A-Za-z]*(?:\([^)]*\))?", cell):
        if token.split("(")[0] not in namespace:
            continue  # "Nesterov", "L2"
        # A bare class name stands for its default instance, also as an
        # argument: `LossScaleOptimizer(SGD)` is `LossScaleOptimizer(SGD())`.
        call = re.sub(r"\((\w+)\)", r"(\1())", token) if "(" in token else f"{token}()"
        yield eval(call, {}, namespace)


def test_readme_and_docs_show_the_same_mechanism_table():
    assert mechanism_rows(README) == mechanism_rows(DOCS / "index.md")


@pytest.mark.parametrize(
    ("cell", "mechanism"), mechanism_rows(README), ids=lambda value: value[:30]
)
def test_the_mechanism_table_says_what_the_code_chooses(cell, mechanism):
    optimizers = list(named_optimizers(cell))
    regularized = "regularizer" in cell
    assert optimizers, cell
    for optimizer in optimizers:
        chosen = recommend(optimizer, regularized=regularized)
        assert chosen == mechanism, (cell, optimizer)
    if "weight decay or clipping" in cell:
        for settings in ({"weight_decay": 0.01}, {"clipnorm": 1.0}):
            assert recommend(keras.optimizers.SGD(**settings)) == mechanism
