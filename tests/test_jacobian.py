"""Explicit Jacobians: softmax_jacobian and jaxbp.jacobian vs vmap(jacrev(reference op))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp.jacobian import rules_of
from tests.helpers import assert_close
from tests.settings import away_from_zero, probabilities

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
    (dz,) = jaxbp.softmax_bwd(res, g)
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
