"""Flax NNX wrappers: outputs and gradients equal plain jnp; nnx.grad runs the _bwd rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from jaxbp import nnx as jn  # noqa: E402

from . import helpers as oracle  # noqa: E402

F64 = jnp.float64
X = jnp.sin(jnp.arange(2 * 4 * 6, dtype=F64)).reshape(2, 4, 6)
needs_ops = pytest.mark.skipif(not oracle.HAS_TRANSFORMER_OPS, reason="transformer ops absent")


def _grads(model, x):
    """``nnx.grad`` of ``Σ w ⊙ model(x)`` with fixed non-uniform weights."""

    def loss(model, x):
        y = model(x)
        return jnp.sum(oracle.loss_weights(y.shape) * y)

    return nnx.grad(loss)(model, x)


def _plain_grads(f, params, x):
    def loss(params):
        y = f(params, x)
        return jnp.sum(oracle.loss_weights(y.shape) * y)

    return jax.grad(loss)(params)


def _jaxpr_of_grad(model, x) -> str:
    graphdef, state = nnx.split(model)
    return str(jax.make_jaxpr(jax.grad(lambda s: nnx.merge(graphdef, s)(x).sum()))(state))


def test_dense_matches_plain_and_grad_runs_dense_bwd():
    model = jn.Dense(6, 3, dtype=F64, rngs=nnx.Rngs(0))
    w, b = model.w[...], model.b[...]
    np.testing.assert_allclose(model(X), oracle.dense(X, w, b), rtol=1e-13)
    g = _grads(model, X)
    expected = _plain_grads(lambda p, x: oracle.dense(x, *p), (w, b), X)
    np.testing.assert_allclose(g.w[...], expected[0], rtol=1e-12)
    np.testing.assert_allclose(g.b[...], expected[1], rtol=1e-12)
    assert "dense_bwd" in _jaxpr_of_grad(model, X)


def test_dense_without_bias():
    model = jn.Dense(6, 3, use_bias=False, dtype=F64, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(model(X), X @ model.w[...], rtol=1e-13)


@needs_ops
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norms_match_plain_and_grad_runs_their_bwd(kind):
    if kind == "layer":
        model = jn.LayerNorm(6, eps=1e-5, dtype=F64)
        model.gamma[...] = jnp.linspace(0.5, 1.5, 6, dtype=F64)
        model.beta[...] = jnp.linspace(-0.2, 0.3, 6, dtype=F64)
        params = (model.gamma[...], model.beta[...])

        def f(p, x):
            return oracle.layer_norm(x, *p, 1e-5)
    else:
        model = jn.RMSNorm(6, eps=1e-6, dtype=F64)
        model.gamma[...] = jnp.linspace(0.5, 1.5, 6, dtype=F64)
        params = (model.gamma[...],)

        def f(p, x):
            return oracle.rms_norm(x, *p, 1e-6)

    np.testing.assert_allclose(model(X), f(params, X), rtol=1e-12, atol=1e-13)
    g = _grads(model, X)
    expected = _plain_grads(f, params, X)
    np.testing.assert_allclose(g.gamma[...], expected[0], rtol=1e-11, atol=1e-12)
    if kind == "layer":
        np.testing.assert_allclose(g.beta[...], expected[1], rtol=1e-11, atol=1e-12)
    assert f"{kind}_norm_bwd" in _jaxpr_of_grad(model, X)


@needs_ops
def test_embedding_matches_plain_and_repeated_ids_accumulate():
    model = jn.Embedding(5, 3, dtype=F64, rngs=nnx.Rngs(2))
    ids = jnp.array([[0, 2, 2], [4, 0, 2]])
    table = model.table[...]
    np.testing.assert_allclose(model(ids), table[ids], rtol=0)
    g = _grads(model, ids)
    expected = _plain_grads(lambda t, i: oracle.embedding(i, t), table, ids)
    np.testing.assert_allclose(g.table[...], expected, rtol=1e-13)
    assert "embedding_bwd" in _jaxpr_of_grad(model, ids)


@needs_ops
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_plain_multi_head_attention(causal):
    model = jn.Attention(6, 2, causal=causal, dtype=F64, rngs=nnx.Rngs(3))
    params = {c: (getattr(model, c).w[...], getattr(model, c).b[...]) for c in "qkvo"}

    def f(p, x):
        return oracle.attention(x, p, 2, causal)

    np.testing.assert_allclose(model(X), f(params, X), rtol=1e-11, atol=1e-12)
    g = _grads(model, X)
    expected = _plain_grads(f, params, X)
    for c in "qkvo":
        np.testing.assert_allclose(getattr(g, c).w[...], expected[c][0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(getattr(g, c).b[...], expected[c][1], rtol=1e-10, atol=1e-12)
    assert "attention_bwd" in _jaxpr_of_grad(model, X)


def test_attention_rejects_heads_that_do_not_divide_d():
    with pytest.raises(ValueError, match="heads"):
        jn.Attention(6, 4, rngs=nnx.Rngs(0))
