"""The README's code blocks run and their assertions hold."""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert BLOCKS, "README.md should show runnable python examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    # The README is read by users with default JAX settings: float32, standard promotion.
    with jax.numpy_dtype_promotion("standard"), jax.enable_x64(False):
        exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})
