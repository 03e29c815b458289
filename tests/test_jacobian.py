"""Explicit Jacobians: softmax_jacobian and jaxbp.jacobian vs vmap(jacrev(reference op))."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp.jacobian import rules_of
from tests.helpers import assert_close
from tests.settings import (
    OP_EXAMPLES,
    away_from_zero,
    op_examples,
    probabilities,
    public_ops_with_rules,
)

N, I, O, C = 3, 4, 2, 5
RNG = np.random.default_rng(0)
Z = jnp.asarray(away_from_zero(RNG, (N, C), 2.0))


def per_example(fn, *batched, argnum=0):
    """``vmap(jacrev)`` of ``fn`` applied to one example at a time (batch axis added back)."""

    def one(*row):
        return jax.jacrev(lambda *r: fn(*(a[None] for a in r))[0], argnums=argnum)(*row)

    return jax.vmap(one)(*batched)


def test_softmax_jacobian_matches_reference_per_example():
    expected = jax.vmap(jax.jacrev(jaxbp.reference.softmax))(Z)
    J = jaxbp.softmax_jacobian(Z)
    assert J.shape == (N, C, C)
    assert_close(J, expected, jnp.float64)


def test_softmax_jacobian_is_diag_s_minus_s_s_transposed_symmetric_with_zero_row_sums():
    J = np.asarray(jaxbp.softmax_jacobian(Z))
    s = np.asarray(jaxbp.softmax(Z))
    for k in range(N):
        np.testing.assert_allclose(J[k], np.diag(s[k]) - np.outer(s[k], s[k]), atol=1e-15)
    np.testing.assert_allclose(J, np.swapaxes(J, -1, -2), atol=0)
    np.testing.assert_allclose(J.sum(-1), 0.0, atol=1e-15)
    np.testing.assert_allclose(J.sum(-2), 0.0, atol=1e-15)


def test_softmax_jacobian_times_g_equals_softmax_bwd():
    g = jnp.asarray(RNG.normal(size=(N, C)))
    _, res = jaxbp.softmax_fwd(Z)
    dz, _ = jaxbp.softmax_bwd(res, g)
    assert_close(jnp.einsum("nkc,nk->nc", jaxbp.softmax_jacobian(Z), g), dz, jnp.float64)


def test_softmax_jacobian_along_axis0_moves_classes_last():
    J0 = jaxbp.softmax_jacobian(Z.T, axis=0)
    assert_close(J0, jaxbp.softmax_jacobian(Z), jnp.float64)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("softmax", {}),
        ("log_softmax", {}),
        ("relu", {}),
        ("leaky_relu", {"negative_slope": 0.2}),
        ("sigmoid", {}),
        ("tanh", {}),
        ("gelu", {"approximate": True}),
        ("gelu", {"approximate": False}),
        ("softplus", {}),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_jacobian_of_layer_op_matches_reference(name, options):
    op, ref = getattr(jaxbp, name), getattr(jaxbp.reference, name)
    J = jaxbp.jacobian(op, Z, **options)
    assert J.shape == (N, C, C)
    assert_close(J, per_example(lambda z: ref(z, **options), Z), jnp.float64)


@pytest.mark.parametrize(
    ("argnum", "bias"),
    [(0, True), (1, True), (2, True), (0, False), (1, False)],
    ids=["x", "w", "b", "x-nobias", "w-nobias"],
)
def test_jacobian_of_dense_matches_reference(argnum, bias):
    # n == i on purpose: the weight (i, o) must not be mistaken for a batched argument.
    x = jnp.asarray(RNG.normal(size=(I, I)))
    w = jnp.asarray(RNG.normal(size=(I, O)))
    b = jnp.asarray(RNG.normal(size=(O,))) if bias else None
    args = (x, w, b)
    J = jaxbp.jacobian(jaxbp.dense, *args, argnum=argnum)

    def one(xi):
        return jax.jacrev(
            lambda *a: jaxbp.reference.dense(*a), argnums=argnum
        )(xi, w, b)  # fmt: skip

    expected = jax.vmap(one)(x)
    expected_shape = [(I, O, I), (I, O, I, O), (I, O, O)][argnum]
    assert J.shape == expected_shape
    assert_close(J, expected, jnp.float64)


def test_jacobian_of_softmax_cross_entropy_with_ids_is_p_minus_onehot():
    y = jnp.asarray(RNG.integers(0, C, N))
    J = jaxbp.jacobian(jaxbp.softmax_cross_entropy, Z, y)
    assert J.shape == (N, C)
    expected = per_example(lambda z, y: jaxbp.reference.softmax_cross_entropy(z, y), Z, y)
    assert_close(J, expected, jnp.float64)
    assert_close(J, jax.nn.softmax(Z) - jax.nn.one_hot(y, C, dtype=jnp.float64), jnp.float64)


@pytest.mark.parametrize("argnum", [0, 1], ids=["logits", "labels"])
def test_jacobian_of_softmax_cross_entropy_with_probabilities_and_options(argnum):
    y = jnp.asarray(probabilities(RNG, (N, C), 1.5))
    where = jnp.asarray([True, False, True])
    cw = jnp.asarray(RNG.uniform(0.5, 2.0, C))
    opts = {"label_smoothing": 0.1, "z_loss": 1e-2}
    J = jaxbp.jacobian(
        jaxbp.softmax_cross_entropy, Z, y, argnum=argnum, where=where, class_weights=cw, **opts
    )

    def ref(z, y, m):
        return jaxbp.reference.softmax_cross_entropy(z, y, where=m, class_weights=cw, **opts)

    assert J.shape == (N, C)
    assert_close(J, per_example(ref, Z, y, where, argnum=argnum), jnp.float64)
    np.testing.assert_array_equal(J[1], 0.0)  # the masked row


@pytest.mark.parametrize("argnum", [0, 1], ids=["pred", "target"])
def test_jacobian_of_mse_matches_reference(argnum):
    t = jnp.asarray(RNG.normal(size=(N, C)))
    J = jaxbp.jacobian(jaxbp.mse, Z, t, argnum=argnum)
    assert J.shape == (N, C)
    assert_close(J, per_example(jaxbp.reference.mse, Z, t, argnum=argnum), jnp.float64)


def test_jacobian_of_integer_labels_raises_type_error():
    with pytest.raises(TypeError, match="argnum"):
        jaxbp.jacobian(jaxbp.softmax_cross_entropy, Z, jnp.zeros(N, jnp.int32), argnum=1)


def test_rules_of_rejects_a_function_without_rules():
    with pytest.raises(TypeError, match="op"):
        rules_of(jnp.sin)
    assert rules_of(jaxbp.softmax) == (jaxbp.softmax_fwd, jaxbp.softmax_bwd)
    assert (jaxbp.softmax.fwd, jaxbp.softmax.bwd) == rules_of(jaxbp.softmax)


def test_a_function_named_like_an_op_gets_no_rules_by_its_name():
    """Rules are attributes of the op, never found by name beside it in its module."""

    def softmax(z):
        return z

    softmax.__module__ = "jaxbp.softmax"
    with pytest.raises(TypeError, match="op"):
        jaxbp.jacobian(softmax, Z)


# ------------------------------------------------ every public op, with n = i = o = c


def _square_cases():
    for name in public_ops_with_rules():
        if name not in OP_EXAMPLES:  # the test fails on it (op_examples raises), never a skip
            yield pytest.param(name, None, 0, id=f"{name}-MISSING")
        for ex in OP_EXAMPLES.get(name, []):
            args = ex.args()
            for k, a in enumerate(args):
                if a is not None and jnp.issubdtype(a.dtype, jnp.floating):
                    yield pytest.param(name, ex, k, id=f"{ex.id}-arg{k}")


@pytest.mark.parametrize(("name", "example", "argnum"), list(_square_cases()))
def test_jacobian_with_square_shapes_matches_jacrev_of_reference(name, example, argnum):
    """n = i = o = c: batching must come from the op's declaration, not from shapes."""
    if example is None:
        op_examples(name)  # raises LookupError naming the op and the table to extend
    op, ref = getattr(jaxbp, name), getattr(jaxbp.reference, name)
    args = example.args()
    J = jaxbp.jacobian(op, *args, argnum=argnum, **example.options)

    def of_arg(a):
        return ref(*args[:argnum], a, *args[argnum + 1 :], **example.options)

    full = np.asarray(jax.jit(jax.jacrev(of_arg))(args[argnum]))  # out.shape + arg.shape
    out_shape = of_arg(args[argnum]).shape
    n = out_shape[0]
    param = list(inspect.signature(op).parameters)[argnum]
    if param in example.per_example:
        # full[m, c..., m', k...]: examples are independent, so only m = m' blocks are
        # non-zero; c... is () for a loss, (c,) for a layer, (h, t, e) for attention.
        def block(m, mp):
            return full[(m, *[slice(None)] * (len(out_shape) - 1), mp)]

        off = [block(m, mp) for m in range(n) for mp in range(n) if m != mp]
        np.testing.assert_array_equal(np.asarray(off), 0.0)
        expected = np.stack([block(m, m) for m in range(n)])  # (n, c..., k...)
    else:
        expected = full  # a shared parameter: every example's output against all of it
    assert J.shape == expected.shape, (J.shape, expected.shape)
    assert_close(J, expected, jnp.float64)


def test_jacobian_of_dense_square_weight_keeps_the_batch_axis():
    """The reported case: x (3, 3), w (3, 3), b (3,) gives J (n, o, i, o) = (3, 3, 3, 3)."""
    x, w, b = (jnp.asarray(RNG.normal(size=s)) for s in [(3, 3), (3, 3), (3,)])
    J = jaxbp.jacobian(jaxbp.dense, x, w, b, argnum=1)
    assert J.shape == (3, 3, 3, 3)
    # ∂y[n, o]/∂w[i, o'] = x[n, i]·δ(o, o')
    expected = np.einsum("ni,op->nopi", np.asarray(x), np.eye(3)).transpose(0, 1, 3, 2)
    np.testing.assert_allclose(J, expected, atol=1e-15)


def test_jacobian_of_an_undeclared_op_raises_type_error_saying_how_to_declare():
    def my_op(x):
        return x

    my_op.fwd, my_op.bwd = jaxbp.relu.fwd, jaxbp.relu.bwd
    with pytest.raises(TypeError, match="per_example"):
        jaxbp.jacobian(my_op, Z)


def test_a_user_built_op_declares_its_batching_and_rules():
    from jaxbp._op import declare, op_vjp

    def scale_fwd(x, s):
        return x * s, (x, s)

    def scale_bwd(res, g):
        x, s = res
        return g * s, jnp.sum(g * x, axis=0)

    @declare(per_example=("x",), fwd=scale_fwd, bwd=scale_bwd)
    def scale(x, s):
        """``x (n, c) ⊙ s (c,)``."""
        return core(x, s)

    core = op_vjp(scale)

    x = jnp.asarray(RNG.normal(size=(3, 3)))
    s = jnp.asarray(RNG.normal(size=(3,)))
    assert rules_of(scale) == (scale_fwd, scale_bwd)
    np.testing.assert_allclose(jaxbp.jacobian(scale, x, s), jax.vmap(jnp.diag)(
        jnp.broadcast_to(s, (3, 3))), atol=0)  # fmt: skip
    Js = jaxbp.jacobian(scale, x, s, argnum=1)  # (n, c, c): ∂(x s)[n, c]/∂s[c'] = x[n, c]δ
    assert Js.shape == (3, 3, 3)
    np.testing.assert_allclose(Js, jax.vmap(jnp.diag)(x), atol=0)


def test_declare_rejects_names_that_are_not_positional_parameters():
    from jaxbp._op import declare

    with pytest.raises(ValueError, match="per_example"):
        declare(per_example=("y",), fwd=jaxbp.relu.fwd, bwd=jaxbp.relu.bwd)(lambda x, w: x)
