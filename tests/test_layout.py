"""The layout: what imports what (nothing upward, no circles), what ``import jaxbp`` loads,
how long a module may be. Read from the source (``ast``) and from a fresh interpreter."""

import ast
import pathlib
import subprocess
import sys

import jaxbp

ROOT = pathlib.Path(jaxbp.__file__).parent

# Layers, lowest first: a module may import from its own layer or below, never above.
LAYERS = [
    {"_checks", "_vma", "_sharding", "_step", "_text", "datasets"},
    {"_op", "_userop", "_autodiff", "_tape", "_contrib", "_contract"},
    {
        "_ce",
        "_losscurv",
        "dense",
        "activations",
        "softmax",
        "losses",
        "norms",
        "embedding",
        "attention",
        "dropout",
        "jacobian",
    },
    {"_xent", "_fusedcurv", "fused", "forward_mode"},
    {"model", "nn", "gpt", "per_example", "curvature", "kfac", "_modules", "eqx", "nnx"},
    {"parallel"},
    {"reference"},
    {
        "_measure",
        "gradcheck",
        "mistakes",
        "handcheck",
        "custom",
        "explain",
        "explain_attention",
        "_nonfinite",
        "checkpoint",
        "train",
        "privacy",
        "_train_mesh",
        "train_gpt",
        "generate",
        "_draw",
        "plots",
    },
    {"cli", "__main__"},
]
LAYER = {name: k for k, names in enumerate(LAYERS) for name in names}
MAX_LINES = 500


def _modules():
    """``{dotted name: path}`` of every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name, path):
    """The jaxbp modules ``name`` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            if node.module:
                found.add(".".join([*base, node.module]))
            else:
                found.update(".".join([*base, a.name]) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("jaxbp"))
    return found


def _graph():
    mods = _modules()
    return {m: {d for d in _imports(m, p) if d in mods and d != m} for m, p in mods.items()}


def _top(name):
    """The layer key of a module: ``jaxbp.parallel._vocab`` → ``parallel``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    missing = sorted({_top(m) for m in _modules()} - set(LAYER) - {"__init__"})
    assert not missing, f"modules with no layer in tests/test_layout.py LAYERS: {missing}"


def test_nothing_imports_upward():
    upward = [
        (m, d)
        for m, deps in _graph().items()
        if _top(m) != "__init__"
        for d in deps
        if LAYER[_top(d)] > LAYER[_top(m)]
    ]
    assert not upward, upward


def test_there_are_no_import_circles():
    graph, state, circles = _graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in graph[m]:
            if state.get(d) == "open":
                circles.append([*stack[stack.index(d) :], d])
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not circles, circles


def test_no_module_is_long_without_saying_why():
    long = []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > MAX_LINES and "lines" not in doc:
            long.append((name, text.count("\n")))
    assert not long, f"over {MAX_LINES} lines with no reason in the docstring: {long}"


def test_import_jaxbp_loads_no_cli_no_benchmarks_and_no_argparse():
    # jax itself imports argparse when etils is installed (jax._src.path tries etils.epath,
    # which imports unittest): count only what importing jaxbp adds to its dependencies'.
    code = (
        "import sys, jax, jax.numpy, optax, chex, numpy\n"
        "before = set(sys.modules)\n"
        "import jaxbp\n"
        "bad = [m for m in sys.modules if m.startswith(('jaxbp.cli', 'benchmarks'))"
        " or (m == 'argparse' and m not in before)]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_public_faces_only_re_export():
    """jaxbp/__init__.py, jaxbp/parallel/__init__.py and jaxbp/reference/__init__.py define
    no function or class of their own."""
    for path in (ROOT / "__init__.py", ROOT / "parallel" / "__init__.py",
                 ROOT / "reference" / "__init__.py"):  # fmt: skip
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        assert not defs, (path.name, defs)


def test_the_readme_layout_names_every_module_and_folder():
    readme = (ROOT.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    words = set(block.replace("/", " ").split())
    top = {name.split(".")[1] for name in _modules() if name.count(".") >= 1}
    missing = sorted(top - words)
    assert not missing, f"README's Layout does not name: {missing}"
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders <= words, sorted(folders - words)
