"""The reference is an oracle: it shares no value-computing code with the hand-written rules.

Read from the source (``ast``): what ``jaxbp/reference/`` imports from the rest of jaxbp, and
what the rest of jaxbp imports from it.
"""

import ast
import pathlib

import jaxbp

ROOT = pathlib.Path(jaxbp.__file__).parent

# Names the reference may take from the rules: validation only (shape/dtype/option checks,
# the label-range check), the model's configuration class and the dtype policy.
ALLOWED = {
    "_checks": {"*module*"},
    "_step": {"*module*"},  # the one meaning of f.jitted: jax.jit, cached per model
    "dense": {"_validate"},
    "softmax": {"_validate", "_validate_where"},
    "norms": {"_validate_layer_norm", "_validate_rms_norm"},
    "embedding": {"_validate", "_check_ids", "_validate_positions"},
    "attention": {"_validate"},
    "dropout": {"_validate"},
    "fused": {"validate_fused"},
    "losses": {"_validate_ce"},
    "nn": {"MLP"},
    "gpt": {"GPT"},
    "per_example": {"check_clip_options", "_check_key"},
    # A model of the user's own has no twin but its forward loop: the reference runs that
    # loop on the ops' plain twins (Tape("reference") calls op.reference, never a rule).
    "model": {"check_model", "checker", "reference_loss"},
    "_tape": {"Tape"},
}


def _imports(path):
    """``(module, name)`` for every ``from .X import name`` / ``from . import X``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                yield node.level, node.module or "", alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, None


def test_reference_takes_only_validation_from_the_rules():
    for path in sorted((ROOT / "reference").glob("*.py")):
        for level, module, name in _imports(path):
            if level == 2:  # from ..X import name (or from .. import X)
                key, got = (module, name) if module else (name, "*module*")
                assert got in ALLOWED.get(key, set()), f"{path.name} imports {key}.{got}"
            assert not (level == 0 and module.startswith("jaxbp")), f"{path.name}: {module}"


def test_nothing_outside_the_reference_imports_its_private_modules():
    for path in sorted(ROOT.rglob("*.py")):
        if "reference" in path.relative_to(ROOT).parts:
            continue
        for _, module, name in _imports(path):
            assert "reference._" not in module and not module.startswith("reference."), path
            assert not (module.endswith("reference") and name and name.startswith("_")), path


def test_nn_does_not_import_the_reference():
    names = {(m, n) for _, m, n in _imports(ROOT / "nn.py")}
    assert not [mn for mn in names if "reference" in (mn[0] or "") or mn[1] == "reference"]
