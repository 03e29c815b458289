"""jaxbp.nnx: each module is its flax.nnx namesake (names, layouts, defaults, parameters from
the same Rngs), computes what Flax's computes, and nnx.grad runs the _bwd rules. Skipped
when flax is not installed (it is in the `modules` extra, not in `.[all]`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from jaxbp import nnx as jn  # noqa: E402

from . import helpers as oracle  # noqa: E402

F64 = jnp.float64
X = jnp.sin(jnp.arange(2 * 4 * 6, dtype=F64)).reshape(2, 4, 6)  # (n, t, d)


@pytest.fixture(autouse=True)
def standard_promotion():
    """Flax's own modules mix float32 constants into float64 work (its norms' statistics, its
    attention's softmax): they need JAX's default promotion, as every Flax user has it. That
    jaxbp's modules need nothing of the kind is test_modules_run_under_strict_promotion."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def _pair(ours, theirs, *args, **kw):
    """Ours and Flax's, built from the same arguments and the same Rngs."""
    kw = {"param_dtype": F64, "rngs": nnx.Rngs(0)} | kw
    a = ours(*args, **kw)
    kw["rngs"] = nnx.Rngs(0)
    return a, theirs(*args, **kw)


def _same_params(ours, theirs):
    """The library's class, the same parameter paths and the same values, bit for bit."""
    assert isinstance(ours, type(theirs)), (type(ours), type(theirs))
    a, b = nnx.to_flat_state(nnx.state(ours)), nnx.to_flat_state(nnx.state(theirs))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, u), (_, v) in zip(a, b, strict=True):
        assert np.array_equal(u[...], v[...]), path


def _weights(shape, dtype=F64):
    return jnp.asarray(np.sin(np.arange(int(np.prod(shape)))).reshape(shape) + 0.5, dtype)


def _loss(f):
    def loss(model):
        y = f(model)
        return jnp.sum(_weights(y.shape, y.dtype) * y)

    return loss


def _grad(model, f):
    return nnx.jit(nnx.grad(_loss(f)))(model)


def _assert_grads_close(g, h, rtol=1e-11, atol=1e-12):
    a, b = nnx.to_flat_state(g), nnx.to_flat_state(h)
    for (path, u), (_, v) in zip(a, b, strict=True):
        np.testing.assert_allclose(u[...], v[...], rtol=rtol, atol=atol, err_msg=str(path))


def _runs(model, f, rule):
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda s: _loss(f)(nnx.merge(graphdef, s))))(state))
    assert f"{rule}_bwd" in jaxpr, rule


def _perturb(model):
    for _, p in nnx.iter_graph(model):
        if isinstance(p, nnx.Param):
            p[...] = p[...] + 0.1 * jnp.sin(jnp.arange(p[...].size, dtype=p[...].dtype)).reshape(
                p[...].shape
            )
    return model


# --------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_is_flax_linear_kernel_i_o_and_grad_runs_dense_bwd(use_bias):
    ours, theirs = _pair(jn.Linear, nnx.Linear, 6, 3, use_bias=use_bias)
    _same_params(ours, theirs)
    assert ours.kernel[...].shape == (6, 3)
    np.testing.assert_allclose(ours(X), theirs(X), rtol=1e-13)
    _assert_grads_close(_grad(ours, lambda m: m(X)), _grad(theirs, lambda m: m(X)))
    _runs(ours, lambda m: m(X), "dense")


def test_linear_promotes_as_flax_and_refuses_what_jaxbp_dense_does_not_take():
    ours, theirs = _pair(jn.Linear, nnx.Linear, 6, 3, param_dtype=jnp.float32)
    with jax.numpy_dtype_promotion("standard"):  # float64 x, float32 kernel: Flax promotes
        y = ours(X)
        assert y.dtype == theirs(X).dtype == F64
        np.testing.assert_allclose(y, theirs(X), rtol=1e-13)
    with pytest.raises(ValueError, match=r"precision: jaxbp.nnx.Linear runs jaxbp's ops"):
        jn.Linear(6, 3, precision=jax.lax.Precision.HIGHEST, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"out_sharding: jaxbp.nnx.Linear takes no sharding"):
        ours(X, out_sharding=object())


# ---------------------------------------------------------------------------- norms


@pytest.mark.parametrize(
    ("kind", "variant"),
    [("LayerNorm", v) for v in ("default", "no-scale", "no-bias")]
    + [("RMSNorm", v) for v in ("default", "no-scale")],  # nnx.RMSNorm has no bias
)
def test_norms_are_flaxs_eps_1e_6_and_grad_runs_their_bwd(kind, variant):
    kw = {"no-scale": {"use_scale": False}, "no-bias": {"use_bias": False}}.get(variant, {})
    ours, theirs = _pair(getattr(jn, kind), getattr(nnx, kind), 6, **kw)
    _perturb(ours), _perturb(theirs)
    _same_params(ours, theirs)
    assert ours.epsilon == theirs.epsilon == 1e-6  # Flax's default (Equinox's is 1e-5)
    x = X + 0.3  # not centred: Flax's one-pass variance and the rule's two-pass agree here
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-12, atol=1e-13)
    if nnx.state(ours, nnx.Param):
        _assert_grads_close(_grad(ours, lambda m: m(x)), _grad(theirs, lambda m: m(x)))
        _runs(ours, lambda m: m(x), "layer_norm" if kind == "LayerNorm" else "rms_norm")


def test_norms_refuse_other_axes_and_masks():
    with pytest.raises(ValueError, match=r"reduction_axes: jaxbp.nnx.LayerNorm runs jaxbp's"):
        jn.LayerNorm(6, reduction_axes=(-2, -1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"axis_name: jaxbp.nnx.RMSNorm"):
        jn.RMSNorm(6, axis_name="batch", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"mask: jaxbp.nnx.LayerNorm"):
        jn.LayerNorm(6, rngs=nnx.Rngs(0))(X, mask=jnp.ones(X.shape, bool))


# ---------------------------------------------------------------------------- Embed


def test_embed_is_flax_embed_and_attend_runs_dense():
    ours, theirs = _pair(jn.Embed, nnx.Embed, 5, 3)
    _same_params(ours, theirs)
    ids = jnp.array([[0, 2, 2], [4, 0, 2]])
    np.testing.assert_array_equal(ours(ids), theirs(ids))
    _assert_grads_close(_grad(ours, lambda m: m(ids)), _grad(theirs, lambda m: m(ids)))
    _runs(ours, lambda m: m(ids), "embedding")
    q = X[..., :3]
    np.testing.assert_allclose(ours.attend(q), theirs.attend(q), rtol=1e-13)
    _runs(ours, lambda m: m.attend(q), "dense")
    with pytest.raises(ValueError, match="Input type must be an integer"):
        ours(jnp.ones(3))


# -------------------------------------------------------------------------- Dropout


def test_dropout_is_flax_dropout_with_the_same_mask_from_the_same_rngs():
    ours = jn.Dropout(0.3, rngs=nnx.Rngs(dropout=5))
    theirs = nnx.Dropout(0.3, rngs=nnx.Rngs(dropout=5))
    for _ in range(2):  # the streams advance alike
        y, z = ours(X), theirs(X)
        np.testing.assert_array_equal(y == 0, z == 0)
        np.testing.assert_allclose(y, z, rtol=1e-15)
    key = jax.random.PRNGKey(4)  # a key, a stream or an Rngs at the call, as Flax
    for make in (lambda: key, lambda: nnx.Rngs(dropout=9), lambda: nnx.Rngs(dropout=9).dropout):
        a, b = jn.Dropout(0.4)(X, rngs=make()), nnx.Dropout(0.4)(X, rngs=make())
        np.testing.assert_array_equal(a == 0, b == 0)
    shared = jn.Dropout(0.5, broadcast_dims=(0,))(jnp.ones_like(X), rngs=key)
    np.testing.assert_array_equal(shared[0] == 0, shared[1] == 0)
    g = jax.grad(lambda x: jnp.sum(jn.Dropout(0.3)(x, rngs=key) * jnp.cos(x)))(X)
    h = jax.grad(lambda x: jnp.sum(nnx.Dropout(0.3)(x, rngs=key) * jnp.cos(x)))(X)
    np.testing.assert_allclose(g, h, rtol=1e-12, atol=1e-15)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: jn.Dropout(0.3)(x, rngs=key).sum()))(X))
    assert "dropout_bwd" in jaxpr


def test_dropout_deterministic_rate_0_and_rate_1_are_flaxs():
    assert jn.Dropout(0.5, deterministic=True)(X) is X
    assert jn.Dropout(0.5)(X, deterministic=True) is X
    assert jn.Dropout(0.0)(X) is X
    np.testing.assert_array_equal(jn.Dropout(1.0)(X), nnx.Dropout(1.0)(X))  # no rngs needed
    np.testing.assert_array_equal(jax.grad(lambda x: jn.Dropout(1.0)(x).sum())(X), 0.0)
    with pytest.raises(ValueError, match="no `rngs` argument was provided to Dropout"):
        jn.Dropout(0.5)(X)


# --------------------------------------------------------------- MultiHeadAttention

VALID = jnp.array([[1, 1, 0, 1], [1, 1, 1, 1]], jnp.float32)  # a padded key in example 0
ANY = jnp.array([[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 0]], bool)
MASKS = {
    "none": (None, False),
    "key-padding": (nnx.make_attention_mask(jnp.ones((2, 4), jnp.float32), VALID), False),  # 1/0
    "any-per-head": (jnp.stack([ANY, ANY.T])[None], False),
    "causal": (None, True),
    "causal-and-padding": (VALID.astype(bool)[:, None, None, :], True),
}


def _mha(**kw):
    return _pair(jn.MultiHeadAttention, nnx.MultiHeadAttention, 2, 6, decode=False, **kw)


def _plain(model, x, mask, causal):
    """Multi-head attention in plain jnp, float64 throughout (Flax's own attention runs its
    softmax through jax.nn.dot_product_attention, which computes in float32)."""

    def p(lin, merge):
        k, b = lin.kernel[...], lin.bias[...]
        return (k.reshape(-1, k.shape[-1]), b) if merge else (k.reshape(k.shape[0], -1),
                                                              b.reshape(-1))  # fmt: skip

    params = {"q": p(model.query, False), "k": p(model.key, False), "v": p(model.value, False),
              "o": p(model.out, True)}  # fmt: skip
    return oracle.attention(x, params, model.num_heads, causal, mask)


@pytest.mark.parametrize("case", list(MASKS))
def test_multihead_attention_is_flaxs_with_masks_and_is_causal(case):
    ours, theirs = _mha()
    _perturb(ours), _perturb(theirs)
    _same_params(ours, theirs)
    mask, causal = MASKS[case]

    def f(m):
        return m(X, mask=mask, is_causal=causal)

    # Flax's own: the same layouts and semantics, at its float32 softmax's precision.
    np.testing.assert_allclose(f(ours), f(theirs), rtol=1e-6, atol=1e-6)
    _assert_grads_close(_grad(ours, f), _grad(theirs, f), rtol=1e-5, atol=1e-6)
    # Plain jnp in float64: the rules' own precision.
    np.testing.assert_allclose(f(ours), _plain(ours, X, mask, causal), rtol=1e-11, atol=1e-12)
    _runs(ours, f, "attention")


def test_multihead_attention_cross_grouped_heads_and_recompute():
    ours, theirs = _pair(jn.MultiHeadAttention, nnx.MultiHeadAttention, 4, 8, in_kv_features=5,
                         num_kv_heads=2, out_features=3, decode=False)  # fmt: skip
    _same_params(ours, theirs)
    q = jnp.cos(jnp.arange(2 * 4 * 8, dtype=F64)).reshape(2, 4, 8)
    kv = jnp.sin(jnp.arange(2 * 6 * 5, dtype=F64)).reshape(2, 6, 5)
    np.testing.assert_allclose(ours(q, kv), theirs(q, kv), rtol=1e-6, atol=1e-6)
    rec = jn.MultiHeadAttention(4, 8, in_kv_features=5, num_kv_heads=2, out_features=3,
                                decode=False, strategy="recompute", param_dtype=F64,
                                rngs=nnx.Rngs(0))  # fmt: skip
    np.testing.assert_allclose(rec(q, kv), ours(q, kv), rtol=1e-12, atol=1e-13)


def test_multihead_attention_refuses_what_jaxbp_attention_does_not_do():
    with pytest.raises(ValueError, match=r"normalize_qk: jaxbp.nnx.MultiHeadAttention"):
        jn.MultiHeadAttention(2, 6, normalize_qk=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"attention_fn: jaxbp.nnx.MultiHeadAttention"):
        jn.MultiHeadAttention(2, 6, attention_fn=lambda *a, **k: None, rngs=nnx.Rngs(0))
    drop = jn.MultiHeadAttention(2, 6, dropout_rate=0.1, decode=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dropout_rate: jaxbp.attention has no dropout"):
        drop(X.astype(jnp.float32), deterministic=False)
    assert drop(X.astype(jnp.float32), deterministic=True).shape == X.shape
    ours, _ = _mha()
    with pytest.raises(ValueError, match=r"sow_weights: jaxbp.nnx.MultiHeadAttention"):
        ours(X, sow_weights=True)


# ------------------------------------------------------------ jaxbp's own Attention


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask", ["none", "key-padding", "any"])
def test_attention_with_mask_and_causal_matches_plain_multi_head_attention(causal, mask):
    model = jn.Attention(6, 2, causal=causal, param_dtype=F64, rngs=nnx.Rngs(3))
    _perturb(model)
    m = {"none": None, "key-padding": VALID.astype(bool)[:, None, None, :], "any": ANY}[mask]
    params = {c: (getattr(model, c).kernel[...], getattr(model, c).bias[...]) for c in "qkvo"}

    def plain(p):
        return oracle.attention(X, p, 2, causal, m)

    np.testing.assert_allclose(model(X, m), plain(params), rtol=1e-11, atol=1e-12)
    g = _grad(model, lambda mod: mod(X, m))
    h = jax.grad(lambda p: jnp.sum(_weights((2, 4, 6)) * plain(p)))(params)
    for c in "qkvo":
        np.testing.assert_allclose(getattr(g, c).kernel[...], h[c][0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(getattr(g, c).bias[...], h[c][1], rtol=1e-10, atol=1e-12)
    _runs(model, lambda mod: mod(X, m), "attention")


def test_attention_rejects_heads_that_do_not_divide_d():
    with pytest.raises(ValueError, match="heads"):
        jn.Attention(6, 4, rngs=nnx.Rngs(0))


def test_modules_run_under_strict_promotion():
    x = X
    with jax.numpy_dtype_promotion("strict"):
        for model, f in (
            (jn.Linear(6, 3, param_dtype=F64, rngs=nnx.Rngs(0)), lambda m: m(x)),
            (jn.LayerNorm(6, param_dtype=F64, rngs=nnx.Rngs(0)), lambda m: m(x)),
            (jn.RMSNorm(6, param_dtype=F64, rngs=nnx.Rngs(0)), lambda m: m(x)),
            (jn.MultiHeadAttention(2, 6, decode=False, param_dtype=F64, rngs=nnx.Rngs(0)),
             lambda m: m(x, is_causal=True)),
            (jn.Attention(6, 2, param_dtype=F64, rngs=nnx.Rngs(0)), lambda m: m(x)),
        ):  # fmt: skip
            assert f(model).dtype == F64
            assert all(g[...].dtype == F64 for _, g in nnx.to_flat_state(_grad(model, f)))
