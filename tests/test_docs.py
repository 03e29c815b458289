"""The docs are tested: every ```python block of README.md and docs/*.md runs, in order per
file, and its asserts hold. Blocks that need several devices or processes are ```text."""

import os
import pathlib
import re
import subprocess
import sys

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
        if doc.name in ("README.md", "parallel.md", "edge_cases.md", "performance.md"):
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


# ------------------------------------------------- links and cited files exist in the repo

MARKDOWN = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "benchmarks" / "README.md",
]
# Every Python file's docstrings and comments (this file names docs by their bare names).
SOURCES = sorted(
    p
    for d in ("jaxbp", "benchmarks", "tests")
    for p in (ROOT / d).rglob("*.py")
    if p != pathlib.Path(__file__).resolve()
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITED_MD = re.compile(r"(?<![\w./-])([\w][\w./-]*\.md)\b")
# Written by `python -m benchmarks` into its --out folder, not a file of the repository.
GENERATED = {"report.md"}


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("doc", MARKDOWN, ids=_rel)
def test_every_relative_link_in_the_docs_points_to_a_file_in_the_repository(doc):
    missing = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            missing.append(target)
    assert not missing, f"{_rel(doc)} links to files that are not in the repository: {missing}"


@pytest.mark.parametrize("path", MARKDOWN + SOURCES, ids=_rel)
def test_every_cited_md_file_exists_in_the_repository(path):
    missing = []
    for cited in CITED_MD.findall(path.read_text(encoding="utf-8")):
        if cited in GENERATED:
            continue
        if not ((ROOT / cited).exists() or (path.parent / cited).exists()):
            missing.append(cited)
    assert not missing, f"{_rel(path)} cites files that are not in the repository: {missing}"


def test_edge_case_table_names_tests_that_exist():
    text = (ROOT / "docs" / "edge_cases.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(test_\w+)`", text))
    defined = {
        m
        for p in (ROOT / "tests").glob("test_*.py")
        for m in re.findall(r"^def (test_\w+)\(", p.read_text(encoding="utf-8"), re.M)
    }
    assert len(named) >= 20
    assert not sorted(named - defined), (
        f"docs/edge_cases.md names missing tests: {sorted(named - defined)}"
    )


# ------------------------------------------------------------ the docstrings' >>> examples


def test_every_docstring_example_runs_as_a_user_sees_it():
    """``doctest`` on every module of jaxbp, in a fresh interpreter with JAX's defaults
    (float32, standard promotion): what a user typing the examples gets."""
    code = (
        "import doctest, importlib, pkgutil, jaxbp\n"
        "failed = attempted = 0\n"
        "for m in pkgutil.walk_packages(jaxbp.__path__, 'jaxbp.'):\n"
        "    if m.name.endswith(('.eqx', '.nnx')):\n"
        "        continue  # optional dependencies; their examples are in their tests\n"
        "    r = doctest.testmod(importlib.import_module(m.name),\n"
        "                        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)\n"
        "    failed += r.failed\n"
        "    attempted += r.attempted\n"
        "print(attempted, failed)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_ENABLE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    attempted, failed = map(int, out.stdout.split()[-2:])
    assert attempted >= 30 and failed == 0, out.stdout[-4000:]
