"""jaxbp.Op (a user's own op on the contract) and jaxbp.check (the three-way gradient check)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp


def _sqrelu_ref(z):
    return jnp.maximum(z, 0) ** 2


def _sqrelu_fwd(z):
    return jnp.maximum(z, 0) ** 2, (z,)


def _sqrelu_bwd(res, g):
    (z,) = res
    return (2 * g * jnp.maximum(z, 0),)


sqrelu = jaxbp.Op(_sqrelu_fwd, _sqrelu_bwd, _sqrelu_ref, name="sqrelu")


def _stanh_ref(z, *, scale=1.0):
    return scale * jnp.tanh(z)


def _stanh_fwd(z, *, scale):
    y = jnp.tanh(z)
    return scale * y, (y,)


def _stanh_bwd(res, g, *, scale):
    (y,) = res
    return (g * scale * (1 - y * y),)


scaled_tanh = jaxbp.Op(
    _stanh_fwd, _stanh_bwd, _stanh_ref, name="scaled_tanh", options={"scale": 1.0}
)


def _affine_ref(x, w, b):
    return x @ w + b


def _affine_fwd(x, w, b):
    return x @ w + b, (x, w)


def _affine_bwd(res, g):
    x, w = res
    return g @ w.T, x.T @ g, g.sum(0)


affine = jaxbp.Op(_affine_fwd, _affine_bwd, _affine_ref, name="affine", per_example=("x",))


def _affine_bwd_wrong_sign_w(res, g):
    dx, dw, db = _affine_bwd(res, g)
    return dx, -dw, db


affine_bad_w = jaxbp.Op(_affine_fwd, _affine_bwd_wrong_sign_w, _affine_ref, name="affine_bad")
sqrelu_twice = jaxbp.Op(
    _sqrelu_fwd, lambda res, g: (2 * _sqrelu_bwd(res, g)[0],), _sqrelu_ref, name="sqrelu2"
)

Z = jnp.array([[-1.5, 0.3, 2.0, -0.2], [0.7, -0.9, 1.1, 0.4], [1.3, 0.6, -2.2, 0.9]])
X = jnp.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]])
W = jnp.array([[0.1, -0.2], [0.3, 0.4], [-0.5, 0.6]])
B = jnp.array([0.01, -0.02])


def test_user_ops_pass_check():
    reports = [
        jaxbp.check(sqrelu, Z),
        jaxbp.check(scaled_tanh, Z, scale=2.5),
        jaxbp.check(affine, X, W, B),
    ]
    for report in reports:
        assert report.passed, report.table()
        report.raise_if_failed()
    rows = reports[-1].rows
    assert {(r.check, r.leaf) for r in rows} >= {
        (c, a) for c in ("custom_vjp", "fwd/bwd", "finite diff") for a in ("x", "w", "b")
    }
    assert all(r.tolerance == (1e-6 if r.check == "finite diff" else 1e-12) for r in rows)


def test_check_fails_a_backward_off_by_a_factor_of_two():
    report = jaxbp.check(sqrelu_twice, Z)
    assert not report.passed
    failed = {(r.check, r.leaf) for r in report.failures}
    assert failed == {("custom_vjp", "z"), ("fwd/bwd", "z"), ("finite diff", "z")}
    assert "FAIL" in report.table() and "FAILED" in report.table()
    with pytest.raises(AssertionError, match="sqrelu2"):
        report.raise_if_failed()
    d = report.to_dict()
    assert d["passed"] is False and d["op"] == "sqrelu2"


def test_check_names_the_one_argument_with_a_wrong_sign():
    report = jaxbp.check(affine_bad_w, X, W, B)
    assert {r.leaf for r in report.failures} == {"w"}
    assert {r.check for r in report.failures} == {"custom_vjp", "fwd/bwd", "finite diff"}


def test_check_passes_builtin_ops():
    labels = jnp.array([0, 3, 1])
    assert jaxbp.check(jaxbp.softmax, Z).passed
    assert jaxbp.check(jaxbp.gelu, Z).passed
    assert jaxbp.check(jaxbp.dense, X, W, B).passed
    assert jaxbp.check(jaxbp.softmax_cross_entropy, Z, labels).passed


def test_check_reports_a_static_option():
    report = jaxbp.check(scaled_tanh, Z, scale=3.0)
    assert report.options == {"scale": 3.0} and "scale=3.0" in report.table()


_jit_stanh = jax.jit(lambda z: scaled_tanh(z, scale=2.0))
_grad_stanh = jax.jit(jax.grad(lambda z: jnp.sum(scaled_tanh(z, scale=2.0) ** 2)))


def test_op_composes_with_jit_vmap_and_grad():
    np.testing.assert_allclose(_jit_stanh(Z), 2.0 * np.tanh(Z), rtol=1e-14)
    y = np.tanh(np.asarray(Z))
    expected = 2 * (2 * y) * 2 * (1 - y * y)  # d/dz (2 tanh z)^2, by hand
    np.testing.assert_allclose(_grad_stanh(Z), expected, rtol=1e-13)
    per_row = jax.vmap(jax.grad(lambda z: jnp.sum(sqrelu(z))))(Z)
    np.testing.assert_allclose(per_row, 2 * np.maximum(Z, 0), rtol=1e-14)


def test_grad_of_op_runs_the_hand_written_backward():
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda z: jnp.sum(sqrelu(z))))(Z))
    assert "sqrelu_bwd" in jaxpr
    wrong = jax.grad(lambda z: jnp.sum(sqrelu_twice(z)))(Z)
    np.testing.assert_allclose(wrong, 4 * np.maximum(Z, 0), rtol=1e-14)


def test_jacobian_of_op_per_example_and_shared():
    J = jaxbp.jacobian(scaled_tanh, Z, scale=2.0)
    y = np.tanh(np.asarray(Z))
    expected = np.einsum("nc,ck->nck", 2.0 * (1 - y * y), np.eye(4))
    np.testing.assert_allclose(J, expected, rtol=1e-13)
    Jw = jaxbp.jacobian(affine, X, W, B, argnum=1)  # (n, o, i, o)
    expected_w = np.einsum("ni,op->noip", np.asarray(X), np.eye(2))
    np.testing.assert_allclose(Jw, expected_w, rtol=1e-14)
    assert affine.batched == (True, False, False)
    assert affine.per_example_args == ("x",)


def test_op_rejects_unknown_options_and_bad_declarations():
    with pytest.raises(TypeError, match="unexpected option"):
        scaled_tanh(Z, slope=1.0)
    with pytest.raises(ValueError, match="per_example"):
        jaxbp.Op(_affine_fwd, _affine_bwd, _affine_ref, per_example=("y",))
    with pytest.raises(TypeError, match="hashable"):
        jaxbp.Op(_stanh_fwd, _stanh_bwd, _stanh_ref, options={"scale": [1.0]})
    with pytest.raises(TypeError, match="jaxbp.reference"):
        jaxbp.check(lambda z: z, Z)


def _lookup_fwd(ids, table):
    return table[ids], (ids, table)


def _lookup_bwd(res, g):
    ids, table = res
    return None, jnp.zeros_like(table).at[ids].add(g)  # repeated ids accumulate


lookup = jaxbp.Op(_lookup_fwd, _lookup_bwd, lambda ids, table: table[ids], name="lookup")


def test_check_skips_integer_arguments_and_checks_the_rest():
    ids = jnp.array([[0, 2, 2], [1, 0, 2]])
    table = jnp.arange(12.0).reshape(4, 3) / 7
    report = jaxbp.check(lookup, ids, table)
    assert report.passed, report.table()
    assert {r.leaf for r in report.rows} == {"out", "table"}
    grad = jax.grad(lambda t: jnp.sum(lookup(ids, t)))(table)
    np.testing.assert_allclose(grad[:, 0], [2.0, 1.0, 3.0, 0.0])


# ------------------------------------------------- rules that break the contract: clear errors


def _grad_all(op, *args, **options):
    """Gradients of ``sum(op(...))`` for every argument, eagerly and under ``jit``."""
    f = lambda *a: jnp.sum(op(*a, **options))  # noqa: E731
    argnums = tuple(range(len(args)))
    return jax.grad(f, argnums)(*args), jax.jit(jax.grad(f, argnums))(*args)


@pytest.mark.parametrize("count", [2, 4])
def test_a_backward_with_the_wrong_number_of_cotangents_names_the_op_rule_and_counts(count):
    def bwd(res, g):
        return (*_affine_bwd(res, g), None)[:count]

    op = jaxbp.Op(_affine_fwd, bwd, _affine_ref, name="affine_miscounted")
    message = (
        r"affine_miscounted: the bwd rule must return 3 cotangent\(s\), one per positional "
        rf"argument \('x', 'w', 'b'\) \(None for an integer one\), got {count}"
    )
    with pytest.raises(ValueError, match=message):
        jax.grad(lambda x: jnp.sum(op(x, W, B)))(X)
    with pytest.raises(ValueError, match=message):
        jax.jit(jax.vjp(op, X, W, B)[1])(jnp.ones((2, 2)))
    _, res = op.fwd(X, W, B)
    with pytest.raises(ValueError, match=message):  # the rule called directly, too
        op.bwd(res, jnp.ones((2, 2)))


def test_a_backward_returning_an_array_for_a_tuple_names_the_op_and_rule():
    op = jaxbp.Op(_sqrelu_fwd, lambda res, g: 2 * g * res[0], _sqrelu_ref, name="bare")
    with pytest.raises(TypeError, match=r"bare: the bwd rule must return a tuple of 1"):
        jax.grad(lambda z: jnp.sum(op(z)))(Z)


def test_a_forward_not_returning_out_and_residuals_names_the_op_and_rule():
    op = jaxbp.Op(lambda z: jnp.maximum(z, 0) ** 2, _sqrelu_bwd, _sqrelu_ref, name="no_res")
    with pytest.raises(TypeError, match=r"no_res: the fwd rule must return a pair \(out, res\)"):
        op(Z)


def _wrong_cotangent(k, fix):
    def bwd(res, g):
        cts = list(_affine_bwd(res, g))
        cts[k] = fix(cts[k])
        return tuple(cts)

    return jaxbp.Op(_affine_fwd, bwd, _affine_ref, name="affine_wrong")


WRONG_COTANGENTS = [
    (0, lambda c: c[:, :2], ValueError, r"'x' must have the argument's shape \(2, 3\), got \(2, 2"),
    (1, lambda c: c.T, ValueError, r"'w' must have the argument's shape \(3, 2\), got \(2, 3\)"),
    (2, lambda c: c[None], ValueError, r"'b' must have the argument's shape \(2,\), got \(1, 2"),
    (1, lambda c: c.astype(jnp.float16), TypeError,
     r"'w' must have the argument's dtype float32, got float16"),
    (2, lambda c: c.astype(jnp.int32), TypeError, r"'b' must have the argument's dtype float32"),
]  # fmt: skip


@pytest.mark.parametrize(("k", "fix", "error", "message"), WRONG_COTANGENTS)
def test_a_cotangent_of_the_wrong_shape_or_dtype_names_the_op_rule_and_argument(
    k, fix, error, message
):
    op = _wrong_cotangent(k, fix)
    x, w, b = (a.astype(jnp.float32) for a in (X, W, B))
    for run in (lambda: _grad_all(op, x, w, b)[0], lambda: _grad_all(op, x, w, b)[1]):
        with pytest.raises(error, match=r"affine_wrong: the bwd rule's cotangent for " + message):
            run()


def test_a_cotangent_for_an_integer_argument_must_be_none():
    op = jaxbp.Op(
        _lookup_fwd,
        lambda res, g: (jnp.zeros(res[0].shape), _lookup_bwd(res, g)[1]),
        lambda ids, table: table[ids],
        name="lookup_float_ids",
    )
    ids, table = jnp.array([0, 2]), jnp.ones((4, 3))
    with pytest.raises(TypeError, match=r"lookup_float_ids: .* for 'ids' \(int.* must be None"):
        jax.grad(lambda t: jnp.sum(op(ids, t)))(table)


def test_a_traced_value_for_a_static_option_names_the_op_the_option_and_traced_options():
    message = (
        r"scaled_tanh: option 'scale' is static \(its value is compiled in\), got a traced "
        r"value .*traced_options=\('scale',\)"
    )
    with pytest.raises(TypeError, match=message):
        jax.jit(lambda s: scaled_tanh(Z, scale=s))(2.0)
    with pytest.raises(TypeError, match=message):
        jax.vmap(lambda s: scaled_tanh(Z, scale=s))(jnp.ones(3))
    with pytest.raises(TypeError, match=message):
        jax.jit(lambda s: scaled_tanh.fwd(Z, scale=s))(2.0)
    with pytest.raises(TypeError, match="scaled_tanh: option 'scale' is static and must be hash"):
        scaled_tanh(Z, scale=np.array([2.0]))


def test_traced_options_take_traced_values_and_a_new_value_compiles_nothing_new():
    traces = []

    def fwd(z, *, scale):
        traces.append(1)
        return _stanh_fwd(z, scale=scale)

    op = jaxbp.Op(fwd, _stanh_bwd, _stanh_ref, name="stanh_traced", options={"scale": 1.0},
                  traced_options=("scale",))  # fmt: skip
    assert op.traced_options == ("scale",)
    step = jax.jit(lambda z, s: jax.value_and_grad(lambda z: jnp.sum(op(z, scale=s)))(z))
    for s in (0.5, 2.0, -3.0):
        value, grad = step(Z, s)
        want_value, want_grad = jax.value_and_grad(lambda z, s=s: jnp.sum(s * jnp.tanh(z)))(Z)
        np.testing.assert_allclose(value, want_value, rtol=1e-12)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-12)
    assert len(traces) == 1, "a new value of a traced option retraced the rules"
    np.testing.assert_allclose(op(Z), jnp.tanh(Z), rtol=1e-12)  # the default
    assert jaxbp.check(op, Z, scale=0.5).passed
    # The rules do not differentiate their options: a gradient through one is NaN, never 0.
    assert np.isnan(jax.grad(lambda s: jnp.sum(op(Z, scale=s)))(2.0))


def test_traced_options_must_be_options_with_numbers_for_defaults():
    with pytest.raises(ValueError, match=r"stanh: traced_options \['slope'\] are not options"):
        jaxbp.Op(_stanh_fwd, _stanh_bwd, _stanh_ref, name="stanh", options={"scale": 1.0},
                 traced_options=("slope",))  # fmt: skip
    with pytest.raises(TypeError, match=r"stanh: traced option 'scale' must have a number"):
        jaxbp.Op(_stanh_fwd, _stanh_bwd, _stanh_ref, name="stanh", options={"scale": "x"},
                 traced_options=("scale",))  # fmt: skip


SIGNATURE_MISMATCHES = [
    # (fwd, bwd, reference, options, what the message must say)
    (_affine_fwd, _affine_bwd, lambda x, w: x @ w, {},
     r"the fwd rule must take the op's arguments \('x', 'w'\) and the options \[\], as "
     r"fwd\(x, w\); got fwd\(x, w, b\) \(missing a required argument: 'b'\)"),
    (lambda x, w: (x @ w, (x, w)), _affine_bwd, _affine_ref, {},
     r"the fwd rule must take the op's arguments \('x', 'w', 'b'\).*too many positional"),
    (_stanh_fwd, _sqrelu_bwd, _stanh_ref, {"scale": 1.0},
     r"the bwd rule must take \(res, g\) and the options \['scale'\], as "
     r"bwd\(res, g, \*, scale\); got bwd\(res, g\)"),
    (_stanh_fwd, _stanh_bwd, _sqrelu_ref, {"scale": 1.0},
     r"the reference rule must take the op's arguments \('z',\) and the options \['scale'\]"),
    (lambda b, w, x: _affine_fwd(x, w, b), _affine_bwd, _affine_ref, {},
     r"the fwd rule takes the reference's arguments in another order: expected "
     r"fwd\(x, w, b, \.\.\.\)"),
]  # fmt: skip


@pytest.mark.parametrize(("fwd", "bwd", "reference", "options", "message"), SIGNATURE_MISMATCHES)
def test_rules_whose_signatures_do_not_match_are_refused_at_construction(
    fwd, bwd, reference, options, message
):
    with pytest.raises(TypeError, match=r"^mine: " + message):
        jaxbp.Op(fwd, bwd, reference, name="mine", options=options)
