"""The Python code blocks of the docs run as written."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
CODE_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
BLOCKS = [
    pytest.param(block, id=f"{page.name}-{index}")
    for page in sorted(DOCS.glob("*.md"))
    for index, block in enumerate(CODE_BLOCK.findall(page.read_text("utf-8")))
]


def test_the_docs_have_code_blocks():
    assert BLOCKS


@pytest.mark.parametrize("block", BLOCKS)
def test_code_block_runs(block):
    exec(compile(block, "<docs>", "exec"), {})
