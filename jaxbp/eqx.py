"""Equinox modules whose backward is jaxbp's hand-written rules (needs ``equinox``).

``Dense``, ``LayerNorm``, ``RMSNorm``, ``Embedding`` and ``Attention`` are ``eqx.Module``
pytrees whose ``__call__`` calls jaxbp's ops, so ``eqx.filter_grad`` / ``jax.grad`` of a model
built from them runs the ``_bwd`` rules instead of JAX's transposes. Unlike ``eqx.nn`` they
take batched inputs directly (leading axes are the batch; no ``vmap`` needed, though it
works). Install with ``pip install jaxbp[modules]``.

Shapes: ``x (..., i)`` for ``Dense``; ``x (..., d)`` for the norms; ``ids (...)`` integer for
``Embedding``; ``x (..., t, d)`` for ``Attention``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from . import _modules as m

__all__ = ["Dense", "LayerNorm", "RMSNorm", "Embedding", "Attention"]


class Dense(eqx.Module):
    """``y = x·w + b``: ``w (i, o)`` LeCun-normal, ``b (o,)`` zeros (``use_bias=False``: none)."""

    w: jax.Array
    b: jax.Array | None

    def __init__(self, in_features, out_features, *, use_bias=True, dtype=jnp.float32, key):
        self.w = m.dense_init(key, in_features, out_features, dtype)
        self.b = jnp.zeros((out_features,), dtype) if use_bias else None

    def __call__(self, x):
        return m.dense(x, self.w, self.b)


class LayerNorm(eqx.Module):
    """Layer norm over the last axis ``d`` with ``gamma (d,)`` ones and ``beta (d,)`` zeros."""

    gamma: jax.Array
    beta: jax.Array
    eps: float = eqx.field(static=True)

    def __init__(self, d, *, eps=1e-5, dtype=jnp.float32):
        self.gamma = jnp.ones((d,), dtype)
        self.beta = jnp.zeros((d,), dtype)
        self.eps = eps

    def __call__(self, x):
        return m.layer_norm(x, self.gamma, self.beta, self.eps)


class RMSNorm(eqx.Module):
    """RMS norm over the last axis ``d`` with ``gamma (d,)`` ones."""

    gamma: jax.Array
    eps: float = eqx.field(static=True)

    def __init__(self, d, *, eps=1e-6, dtype=jnp.float32):
        self.gamma = jnp.ones((d,), dtype)
        self.eps = eps

    def __call__(self, x):
        return m.rms_norm(x, self.gamma, self.eps)


class Embedding(eqx.Module):
    """``table[ids]``: ``table (v, d)`` standard normal; backward is a scatter-add."""

    table: jax.Array

    def __init__(self, v, d, *, dtype=jnp.float32, key):
        self.table = jax.random.normal(key, (v, d), dtype)

    def __call__(self, ids):
        return m.embedding(ids, self.table)


class Attention(eqx.Module):
    """Multi-head self-attention ``(..., t, d) -> (..., t, d)`` with q/k/v/o projections
    ``(d, d)`` and biases; ``heads`` divides ``d``; ``causal`` and ``strategy`` as in
    :func:`jaxbp.attention`."""

    q: Dense
    k: Dense
    v: Dense
    o: Dense
    heads: int = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    strategy: str = eqx.field(static=True)

    def __init__(self, d, heads, *, causal=True, strategy="store", dtype=jnp.float32, key):
        m.check_heads(d, heads)
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.q = Dense(d, d, dtype=dtype, key=kq)
        self.k = Dense(d, d, dtype=dtype, key=kk)
        self.v = Dense(d, d, dtype=dtype, key=kv)
        self.o = Dense(d, d, dtype=dtype, key=ko)
        self.heads, self.causal, self.strategy = heads, causal, strategy

    def __call__(self, x):
        q, k, v, o = self.q, self.k, self.v, self.o
        return m.attention(
            x, q.w, k.w, v.w, o.w, q.b, k.b, v.b, o.b, self.heads, self.causal, self.strategy
        )
