"""The docs are tested: every ```python block of README.md and docs/*.md runs, in order per
file, and its asserts hold. Blocks that need several devices or processes are ```text."""

import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(doc: pathlib.Path) -> list[str]:
    return BLOCK.findall(doc.read_text(encoding="utf-8"))


def test_backprop_doc_has_its_formulas_as_code():
    blocks = _blocks(ROOT / "docs" / "backprop.md")
    assert len(blocks) >= 15
    assert sum(block.count("assert") for block in blocks) >= 25


def test_every_doc_with_math_has_runnable_code():
    for doc in DOCS:
        if doc.name in ("README.md", "parallel.md"):
            continue
        assert _blocks(doc), f"{doc.name} has no ```python block"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_python_block_runs_in_order_and_its_asserts_hold(doc):
    namespace: dict = {"__name__": doc.stem}
    for number, block in enumerate(_blocks(doc), start=1):
        code = compile(block, f"{doc.name}:block{number}", "exec")
        try:
            # Docs are read by users with JAX's default (standard) dtype promotion.
            with jax.numpy_dtype_promotion("standard"):
                exec(code, namespace)
        except Exception as e:  # name the block that failed
            pytest.fail(f"{doc.name} python block {number} failed: {type(e).__name__}: {e}")
