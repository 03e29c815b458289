"""jaxbp.compare: the report's fields, a caught wrong rule, and every configuration passing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp import gradcheck
from jaxbp.cli import main


def _problem(activation="relu", loss="softmax_cross_entropy", sizes=(5, 6, 3), n=6):
    model = jaxbp.MLP(sizes, activation, loss)
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(1), 3)
    params = model.init(kp, jnp.float64)
    x = jax.random.normal(kx, (n, sizes[0]), jnp.float64)
    if loss == "softmax_cross_entropy":
        labels = jax.random.randint(ky, (n,), 0, sizes[-1], jnp.int32)
    else:
        labels = jax.random.uniform(ky, (n, sizes[-1]), jnp.float64)
    return model, params, x, labels


def _wrong_relu_bwd(res, g):
    """A classic mistake: pass the gradient through where the unit was off."""
    (y,) = res
    return (g * jnp.ones_like(y),)


@pytest.fixture
def wrong_relu_rule(monkeypatch):
    """Swap in the wrong relu rule, on the op object that every route reads it from (the
    compiled steps are keyed on the rules: nothing to clear)."""
    monkeypatch.setattr(jaxbp.relu, "bwd", _wrong_relu_bwd)


def test_report_has_a_row_per_check_and_leaf_with_errors_cosine_and_verdict():
    model, params, x, labels = _problem()
    report = jaxbp.compare(model, params, x, labels, dtype=jnp.float32, fd_directions=3)
    assert report.passed
    leaves = ["[0]['b']", "[0]['w']", "[1]['b']", "[1]['w']"]
    by_check = {}
    for row in report.rows:
        by_check.setdefault(row.check, []).append(row.leaf)
    assert by_check == {
        "loss": ["mean loss"],
        "jax.grad": leaves,
        "custom_vjp": leaves,
        "finite diff": leaves,
    }
    for row in report.rows:
        assert row.max_abs_error >= 0 and row.max_rel_error >= 0
        assert row.max_rel_error <= row.tolerance and row.passed
        assert 0.9999 <= row.cosine <= 1.0 + 1e-12
    grad_rows = [r for r in report.rows if r.check == "jax.grad"]
    assert [r.shape for r in grad_rows] == [(6,), (5, 6), (3,), (6, 3)]
    assert {r.tolerance for r in grad_rows} == {1e-5} and grad_rows[0].dtype == "float32"
    fd_rows = [r for r in report.rows if r.check == "finite diff"]
    assert {r.tolerance for r in fd_rows} == {1e-6} and {r.shape for r in fd_rows} == {(3,)}
    assert report.loss_manual == pytest.approx(report.loss_reference, rel=1e-5)


def test_report_serialises_and_prints_a_table():
    model, params, x, labels = _problem("tanh")
    report = jaxbp.compare(model, params, x, labels, fd_directions=2)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is True and d["sizes"] == [5, 6, 3] and d["dtype"] == "float64"
    assert len(d["rows"]) == len(report.rows) and d["rows"][1]["leaf"] == "[0]['b']"
    table = report.table()
    for text in ("[1]['w']", "(6, 3)", "finite diff", "custom_vjp", "max rel err", "PASSED"):
        assert text in table
    header = next(line for line in table.splitlines() if line.startswith("check"))
    rows = [line for line in table.splitlines() if line.startswith(("jax.grad  ", "finite diff  "))]
    end = header.index("max rel err") + len("max rel err")  # right-aligned numbers end here
    # Every number in the column is right-aligned under its header ("1.23e-16" ends there).
    assert all(r[end - 4] == "e" and r[end - 3] in "+-" for r in rows), rows


def test_wrong_backward_rule_is_caught(wrong_relu_rule):
    model, params, x, labels = _problem("relu")
    x = x * 3.0  # plenty of units off, so the wrong rule matters
    report = jaxbp.compare(model, params, x, labels, fd_directions=2)
    assert not report.passed
    failed = {(r.check, r.leaf) for r in report.failures}
    # The first layer sits below the relu: its gradient is wrong, against both references,
    # through the explicit loop and through the custom_vjp alike (both read relu.bwd).
    assert {("jax.grad", "[0]['w']"), ("finite diff", "[0]['w']"),
            ("custom_vjp", "[0]['w']")} <= failed  # fmt: skip
    # The layer above the relu and the loss are untouched.
    assert not {leaf for check, leaf in failed if leaf.startswith("[1]")}
    assert not [check for check, _ in failed if check == "loss"]
    assert "FAILED" in report.table() and "FAIL" in report.table()


def test_wrong_backward_rule_makes_the_cli_exit_1(wrong_relu_rule, capsys):
    assert main(["compare", "--sizes", "6,8,3", "--batch", "8", "--fd-directions", "2"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_bfloat16_comparison_passes_at_its_tolerance():
    model, params, x, labels = _problem("gelu")
    report = jaxbp.compare(model, params, x, labels, dtype=jnp.bfloat16, fd=False)
    assert report.passed and report.dtype == "bfloat16"
    assert {r.tolerance for r in report.rows} == {2e-2}


def test_masks_and_class_weights_are_compared_too():
    model, params, x, labels = _problem()
    cw = jnp.array([1.0, 3.0, 0.5], jnp.float64)
    where = jnp.array([1, 0, 1, 1, 0, 1], bool)
    assert jaxbp.compare(model, params, x, labels, where=where, class_weights=cw).passed
    everything_masked = jaxbp.compare(model, params, x, labels, where=jnp.zeros(6, bool))
    assert everything_masked.passed and everything_masked.loss_manual == 0.0
    assert all(r.max_abs_error == 0.0 and r.cosine == 1.0 for r in everything_masked.rows)


def test_nan_never_passes():
    row = gradcheck._row("jax.grad", "w", np.array([np.nan, 1.0]), np.array([1.0, 1.0]), "f", 1)
    assert not row.passed


def test_bad_arguments_are_clear_errors():
    model, params, x, labels = _problem()
    with pytest.raises(ValueError, match="dtype"):
        jaxbp.compare(model, params, x, labels, dtype=jnp.int32)
    with pytest.raises(ValueError, match="fd_directions"):
        jaxbp.compare(model, params, x, labels, fd_directions=0)
    with pytest.raises(ValueError, match=r"x: expected shape \(n, 5\)"):
        jaxbp.compare(model, params, x[:, :3], labels)


def test_x64_context_turns_float64_on_only_inside():
    was = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        with gradcheck.x64():
            assert jnp.zeros(2, jnp.float64).dtype == jnp.float64
        with pytest.warns(UserWarning, match="float64"):
            assert jnp.zeros(2, jnp.float64).dtype == jnp.float32
    finally:
        jax.config.update("jax_enable_x64", was)


def test_cli_compare_passes_for_every_activation_and_loss_in_float64(capsys):
    status = main([
        "compare", "--activation", "all", "--loss", "all", "--dtype", "float64",
        "--sizes", "4,5,3", "--batch", "5", "--fd-directions", "2",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert "24 of 24 configurations passed" in out  # 8 activations (swish = silu) × 3 losses
    assert status == 0
