"""docs/backprop.md: every ```python block runs, in order, and its asserts hold."""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "backprop.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[str]:
    return BLOCK.findall(DOC.read_text(encoding="utf-8"))


def test_the_doc_has_its_formulas_as_code():
    blocks = _blocks()
    assert len(blocks) >= 15
    assert sum(block.count("assert") for block in blocks) >= 25


def test_every_python_block_runs_in_order_and_its_asserts_hold():
    namespace: dict = {"__name__": "backprop_md"}
    for number, block in enumerate(_blocks(), start=1):
        code = compile(block, f"{DOC.name}:block{number}", "exec")
        try:
            exec(code, namespace)
        except Exception as e:  # name the block that failed
            pytest.fail(f"{DOC.name} python block {number} failed: {type(e).__name__}: {e}")
