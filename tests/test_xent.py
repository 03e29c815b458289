"""The chunked softmax cross-entropy kernel (jaxbp/_xent.py) on one device, against
``jax.nn.logsumexp`` and optax, for any chunk length; its backward against ``jax.grad``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbp import _xent
from tests.helpers import assert_close

RNG = np.random.default_rng(0)
N, D, V = 5, 3, 11
X = jnp.asarray(RNG.normal(size=(N, D)))
W = jnp.asarray(RNG.normal(size=(D, V)) * 2.0)
B = jnp.asarray(RNG.normal(size=(V,)))
Y = jnp.asarray(RNG.integers(0, V, N), jnp.int32)
OPTS = dict(ignore_index=None, softcap=None, acc=jnp.dtype(jnp.float64), default_chunk=4)


def _plain(x, w, b, eps):
    z = x @ w + b
    y = optax.smooth_labels(jax.nn.one_hot(Y, V, dtype=z.dtype), eps)
    return optax.softmax_cross_entropy(z, y), jax.nn.logsumexp(z, axis=-1)


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 64])  # remainders, exact, one, more than v
def test_online_lse_and_loss_equal_the_whole_row_for_any_chunk(chunk):
    loss, lse, su = jax.jit(
        lambda x, w, b: _xent.loss_and_lse(
            x,
            w,
            b,
            Y,
            None,
            None,
            v=V,
            label_smoothing=0.1,
            z_loss=0.0,
            chunk_size=chunk,
            **OPTS,
        )  # fmt: skip
    )(X, W, B)
    want_loss, want_lse = _plain(X, W, B, 0.1)
    assert_close(lse, want_lse, jnp.float64)
    assert_close(loss, want_loss, jnp.float64)
    np.testing.assert_array_equal(su, np.ones(N))  # Σ_v u = 1 without class weights


@pytest.mark.parametrize("chunk", [3, 11])
def test_recompute_backward_equals_jax_grad_of_the_whole_row(chunk):
    g = jnp.asarray(RNG.normal(size=(N,)))
    common = dict(v=V, label_smoothing=0.1, z_loss=0.0, chunk_size=chunk, **OPTS)

    @jax.jit
    def manual(x, w, b, g):
        _, lse, su = _xent.loss_and_lse(x, w, b, Y, None, None, **common)
        return _xent.grads_recompute(x, w, b, Y, None, None, lse, su, g, **common)[:3]

    want = jax.grad(lambda x, w, b: jnp.sum(g * _plain(x, w, b, 0.1)[0]), argnums=(0, 1, 2))
    assert_close(manual(X, W, B, g), want(X, W, B), jnp.float64)


def test_forward_with_grads_equals_the_recompute_backward_for_g_one():
    common = dict(label_smoothing=0.0, z_loss=1e-2, chunk_size=2, **OPTS)
    loss1, lse1, dx1, dw1, db1, _ = jax.jit(
        lambda x, w, b: _xent.forward_with_grads(x, w, b, Y, None, None, **common)
    )(X, W, B)
    loss, lse, su = _xent.loss_and_lse(X, W, B, Y, None, None, v=V, **common)
    dx, dw, db, _ = _xent.grads_recompute(X, W, B, Y, None, None, lse, su, jnp.ones(N),
                                          v=V, **common)  # fmt: skip
    assert_close((loss1, lse1, dx1, dw1, db1), (loss, lse, dx, dw, db), jnp.float64)
