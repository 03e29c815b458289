"""jaxbp.eqx: each module is its equinox.nn namesake (fields, layouts, defaults, weights from
the same key), computes what Equinox's computes, and eqx.filter_grad runs the _bwd rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

eqx = pytest.importorskip("equinox")

from jaxbp import eqx as jn  # noqa: E402

from . import helpers as oracle  # noqa: E402

F64 = jnp.float64
X = jnp.sin(jnp.arange(2 * 4 * 6, dtype=F64)).reshape(2, 4, 6)  # (n, t, d)
KEY = jax.random.PRNGKey(3)


def _leaves_with_paths(module):
    return [(jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(module)]


def _same_fields_and_weights(ours, theirs):
    """The same field paths and leaves (arrays bit for bit), and the library's class."""
    assert isinstance(ours, type(theirs)), (type(ours), type(theirs))
    a, b = _leaves_with_paths(ours), _leaves_with_paths(theirs)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, u), (_, v) in zip(a, b, strict=True):
        assert jnp.shape(u) == jnp.shape(v) and np.array_equal(u, v), path


def _weights(shape, dtype=F64):
    """A fixed, non-uniform cotangent (a constant: usable under jit)."""
    return jnp.asarray(np.sin(np.arange(int(np.prod(shape)))).reshape(shape) + 0.5, dtype)


def _loss(f):
    """``Σ w ⊙ f(model)`` with fixed non-uniform weights."""

    def loss(model):
        y = f(model)
        return jnp.sum(_weights(y.shape, y.dtype) * y)

    return loss


def _grad(model, f):
    return eqx.filter_jit(eqx.filter_grad(_loss(f)))(model)


def _assert_grads_close(g, h, rtol=1e-11, atol=1e-12):
    for (path, u), (_, v) in zip(_leaves_with_paths(g), _leaves_with_paths(h), strict=True):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol, err_msg=path)


def _runs(model, f, rule):
    jaxpr = str(eqx.filter_make_jaxpr(eqx.filter_grad(_loss(f)))(model)[0])
    assert f"{rule}_bwd" in jaxpr, rule


# --------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_is_eqx_linear_weight_o_i_and_grad_runs_dense_bwd(use_bias):
    ours = jn.Linear(6, 3, use_bias=use_bias, dtype=F64, key=KEY)
    theirs = eqx.nn.Linear(6, 3, use_bias=use_bias, dtype=F64, key=KEY)
    _same_fields_and_weights(ours, theirs)
    assert ours.weight.shape == (3, 6)  # (o, i), as Equinox lays it out
    one = X[0, 0]
    np.testing.assert_allclose(ours(one), theirs(one), rtol=1e-13)
    # Leading batch axes directly; Equinox needs a vmap for them.
    np.testing.assert_allclose(ours(X), jax.vmap(jax.vmap(theirs))(X), rtol=1e-13)
    g = _grad(ours, lambda m: m(X))
    h = _grad(theirs, lambda m: jax.vmap(jax.vmap(m))(X))
    _assert_grads_close(g, h)
    _runs(ours, lambda m: m(X), "dense")


def test_linear_scalar_features_and_default_dtype_are_equinoxs():
    ours = jn.Linear("scalar", "scalar", key=KEY)
    theirs = eqx.nn.Linear("scalar", "scalar", key=KEY)
    _same_fields_and_weights(ours, theirs)
    assert ours.weight.dtype == theirs.weight.dtype  # Equinox's default floating dtype
    x = jnp.asarray(0.7, ours.weight.dtype)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-6)
    assert ours(x).shape == ()


# ---------------------------------------------------------------------------- norms


def _perturbed(model):
    def shift(a):
        if not eqx.is_inexact_array(a):
            return a
        return a + 0.1 * jnp.sin(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape)

    return jax.tree.map(shift, model)


@pytest.mark.parametrize("shape", [6, (4, 6)], ids=["d", "t-d"])
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)],
                         ids=["weight-bias", "weight", "none"])  # fmt: skip
def test_norms_are_equinoxs_and_grad_runs_their_bwd(kind, shape, affine):
    use_weight, use_bias = affine
    kw = dict(use_weight=use_weight, use_bias=use_bias, dtype=F64)
    ours = _perturbed(getattr(jn, kind)(shape, **kw))
    theirs = _perturbed(getattr(eqx.nn, kind)(shape, **kw))
    _same_fields_and_weights(ours, theirs)
    assert ours.eps == 1e-5  # Equinox's default, for both
    x = X[0]  # (t, d): normalised over both axes, or row by row over d
    theirs_x = theirs(x) if shape == (4, 6) else jax.vmap(theirs)(x)
    np.testing.assert_allclose(ours(x), theirs_x, rtol=1e-12, atol=1e-13)
    assert ours(X).shape == X.shape  # leading axes: no vmap needed
    if use_weight or use_bias:
        f_theirs = (lambda m: m(x)) if shape == (4, 6) else (lambda m: jax.vmap(m)(x))
        _assert_grads_close(_grad(ours, lambda m: m(x)), _grad(theirs, f_theirs))
        _runs(ours, lambda m: m(x), "layer_norm" if kind == "LayerNorm" else "rms_norm")


def test_norms_pass_a_state_through_and_name_a_wrong_shape():
    ln = jn.LayerNorm(6, dtype=F64)
    out, state = ln(X[0, 0], "state")
    assert state == "state" and out.shape == (6,)
    with pytest.raises(ValueError, match=r"LayerNorm: expected x of shape \(\.\.\., \*\(5,\)\)"):
        jn.LayerNorm(5)(X)


# ------------------------------------------------------------------------ Embedding


def test_embedding_is_eqx_embedding_and_repeated_ids_accumulate():
    ours = jn.Embedding(5, 3, dtype=F64, key=KEY)
    theirs = eqx.nn.Embedding(5, 3, dtype=F64, key=KEY)
    _same_fields_and_weights(ours, theirs)
    ids = jnp.array([[0, 2, 2], [4, 0, 2]])
    np.testing.assert_array_equal(ours(jnp.asarray(2)), theirs(jnp.asarray(2)))
    np.testing.assert_array_equal(ours(ids), jax.vmap(jax.vmap(theirs))(ids))
    g = _grad(ours, lambda m: m(ids))
    _assert_grads_close(g, _grad(theirs, lambda m: jax.vmap(jax.vmap(m))(ids)), rtol=1e-13)
    _runs(ours, lambda m: m(ids), "embedding")


# -------------------------------------------------------------------------- Dropout


def test_dropout_is_eqx_dropout_with_the_same_mask_and_gradient():
    ours, theirs = jn.Dropout(0.3), eqx.nn.Dropout(0.3)
    _same_fields_and_weights(ours, theirs)
    y, z = ours(X, key=KEY), theirs(X, key=KEY)
    np.testing.assert_array_equal(y == 0, z == 0)
    np.testing.assert_allclose(y, z, rtol=1e-15)
    gx = jax.grad(lambda x: jnp.sum(ours(x, key=KEY) * jnp.cos(x)))(X)
    gz = jax.grad(lambda x: jnp.sum(theirs(x, key=KEY) * jnp.cos(x)))(X)
    np.testing.assert_allclose(gx, gz, rtol=1e-12, atol=1e-15)
    assert "dropout_bwd" in str(jax.make_jaxpr(jax.grad(lambda x: ours(x, key=KEY).sum()))(X))


def test_dropout_inference_p0_and_a_missing_key_are_equinoxs():
    assert jn.Dropout(0.5, inference=True)(X) is X
    assert jn.Dropout(0.5)(X, inference=True) is X
    assert jn.Dropout(0.0)(X) is X
    with pytest.raises(RuntimeError, match="Dropout requires a key"):
        jn.Dropout(0.5)(X)
    # p = 1: zeros and a zero gradient (Equinox's divides by 0: NaN)
    g = jax.grad(lambda x: jn.Dropout(1.0)(x, key=KEY).sum())(X)
    np.testing.assert_array_equal(g, 0.0)


# --------------------------------------------------------------- MultiheadAttention


def _mha(**kw):
    kw = dict(dtype=F64, key=KEY) | kw
    return jn.MultiheadAttention(2, 6, **kw), eqx.nn.MultiheadAttention(2, 6, **kw)


PADDING = jnp.array([True, True, False, True])  # key 2 is padding
# Every row keeps three keys.
ANY = jnp.array([[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 0]], bool)
MASKS = {
    "none": (None, None, False),
    "t-s": (ANY, ANY, False),
    "h-t-s": (jnp.stack([ANY, ANY.T]), jnp.stack([ANY, ANY.T]), False),
    "key-padding": (PADDING, jnp.broadcast_to(PADDING, (4, 4)), False),
    "causal": (None, jnp.tril(jnp.ones((4, 4), bool)), True),
    "causal-and-padding": (PADDING, jnp.tril(jnp.ones((4, 4), bool)) & PADDING, True),
}


@pytest.mark.parametrize("case", list(MASKS))
@pytest.mark.parametrize("biases", [False, True], ids=["eqx-default", "biases"])
def test_multihead_attention_is_equinoxs_with_masks_and_grad_runs_attention_bwd(case, biases):
    kw = {f"use_{w}_bias": biases for w in ("query", "key", "value", "output")}
    ours, theirs = _mha(**kw)
    _same_fields_and_weights(ours, theirs)
    ours_mask, eqx_mask, causal = MASKS[case]
    x = X[0]

    def f_ours(m):
        return m(x, x, x, ours_mask, causal=causal)

    def f_theirs(m):
        return m(x, x, x, eqx_mask)

    np.testing.assert_allclose(f_ours(ours), f_theirs(theirs), rtol=1e-11, atol=1e-12)
    _assert_grads_close(_grad(ours, f_ours), _grad(theirs, f_theirs), rtol=1e-10, atol=1e-12)
    _runs(ours, f_ours, "attention")


def test_multihead_attention_cross_sizes_batch_axes_and_process_heads():
    kw = dict(key_size=5, value_size=7, output_size=4, qk_size=3, vo_size=3, use_query_bias=True)
    ours, theirs = _mha(**kw)
    q, kv = X[0], jnp.cos(jnp.arange(6 * 5, dtype=F64)).reshape(6, 5)
    v = jnp.sin(jnp.arange(6 * 7, dtype=F64)).reshape(6, 7)
    np.testing.assert_allclose(ours(q, kv, v), theirs(q, kv, v), rtol=1e-11, atol=1e-12)
    batched = ours(jnp.stack([q, q]), jnp.stack([kv, kv]), jnp.stack([v, v]))
    np.testing.assert_allclose(batched[1], theirs(q, kv, v), rtol=1e-11, atol=1e-12)

    def scale(qh, kh, vh):
        return 2.0 * qh, kh, vh

    got, want = ours(q, kv, v, process_heads=scale), theirs(q, kv, v, process_heads=scale)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def test_multihead_attention_refuses_what_jaxbp_attention_does_not_do():
    with pytest.raises(ValueError, match="vo_size: jaxbp.attention takes values"):
        jn.MultiheadAttention(2, 6, vo_size=4, key=KEY)
    ours = jn.MultiheadAttention(2, 6, dropout_p=0.1, dtype=F64, key=KEY)
    with pytest.raises(ValueError, match="dropout_p: jaxbp.attention has no dropout"):
        ours(X[0], X[0], X[0], key=KEY)
    theirs = eqx.nn.MultiheadAttention(2, 6, dropout_p=0.1, dtype=F64, key=KEY)
    np.testing.assert_allclose(ours(X[0], X[0], X[0], inference=True),
                               theirs(X[0], X[0], X[0], inference=True), rtol=1e-11)  # fmt: skip


# ------------------------------------------------------------ jaxbp's own Attention


def _params(model):
    return {c: (getattr(model, c).weight.T, getattr(model, c).bias) for c in "qkvo"}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask", ["none", "key-padding", "any"])
def test_attention_with_mask_and_causal_matches_plain_multi_head_attention(causal, mask):
    model = jn.Attention(6, 2, causal=causal, dtype=F64, key=KEY)
    m = {"none": None, "key-padding": jnp.array([[1, 1, 0, 1], [1, 1, 1, 1]], bool)[:, None, None],
         "any": ANY}[mask]  # fmt: skip

    def plain(p):
        return oracle.attention(X, p, 2, causal, m)

    np.testing.assert_allclose(model(X, m), plain(_params(model)), rtol=1e-11, atol=1e-12)
    g = _grad(model, lambda mod: mod(X, m))
    h = jax.grad(lambda p: jnp.sum(_weights((2, 4, 6)) * plain(p)))(_params(model))
    for c in "qkvo":
        np.testing.assert_allclose(getattr(g, c).weight.T, h[c][0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(getattr(g, c).bias, h[c][1], rtol=1e-10, atol=1e-12)
    _runs(model, lambda mod: mod(X, m), "attention")


def test_attention_rejects_heads_that_do_not_divide_d():
    with pytest.raises(ValueError, match="heads"):
        jn.Attention(6, 4, key=KEY)
