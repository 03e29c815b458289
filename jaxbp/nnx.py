"""Flax NNX modules whose backward is jaxbp's hand-written rules (needs ``flax``).

``Dense``, ``LayerNorm``, ``RMSNorm``, ``Embedding`` and ``Attention`` hold their parameters
as ``nnx.Param`` and call jaxbp's ops in ``__call__``, so ``nnx.grad`` / ``jax.grad`` of a
model built from them runs the ``_bwd`` rules (``dense_bwd``, ``layer_norm_bwd``, ...)
instead of JAX's transposes. Install with ``pip install jaxbp[modules]``.

Shapes: ``x (..., i)`` for ``Dense``; ``x (..., d)`` for the norms; ``ids (...)`` integer for
``Embedding``; ``x (..., t, d)`` for ``Attention``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import _modules as m

__all__ = ["Dense", "LayerNorm", "RMSNorm", "Embedding", "Attention"]


class Dense(nnx.Module):
    """``y = x·w + b``: ``w (i, o)`` LeCun-normal, ``b (o,)`` zeros (``use_bias=False``: none)."""

    def __init__(self, in_features, out_features, *, use_bias=True, dtype=jnp.float32, rngs):
        self.w = nnx.Param(m.dense_init(rngs.params(), in_features, out_features, dtype))
        self.b = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x):
        return m.dense(x, self.w[...], None if self.b is None else self.b[...])


class LayerNorm(nnx.Module):
    """Layer norm over the last axis ``d`` with ``gamma (d,)`` ones and ``beta (d,)`` zeros."""

    def __init__(self, d, *, eps=1e-5, dtype=jnp.float32, rngs=None):
        self.eps = eps
        self.gamma = nnx.Param(jnp.ones((d,), dtype))
        self.beta = nnx.Param(jnp.zeros((d,), dtype))

    def __call__(self, x):
        return m.layer_norm(x, self.gamma[...], self.beta[...], self.eps)


class RMSNorm(nnx.Module):
    """RMS norm over the last axis ``d`` with ``gamma (d,)`` ones."""

    def __init__(self, d, *, eps=1e-6, dtype=jnp.float32, rngs=None):
        self.eps = eps
        self.gamma = nnx.Param(jnp.ones((d,), dtype))

    def __call__(self, x):
        return m.rms_norm(x, self.gamma[...], self.eps)


class Embedding(nnx.Module):
    """``table[ids]``: ``table (v, d)`` standard normal; backward is a scatter-add."""

    def __init__(self, v, d, *, dtype=jnp.float32, rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (v, d), dtype))

    def __call__(self, ids):
        return m.embedding(ids, self.table[...])


class Attention(nnx.Module):
    """Multi-head self-attention ``(..., t, d) -> (..., t, d)`` with q/k/v/o projections
    ``(d, d)`` and biases; ``heads`` divides ``d``; ``causal`` and ``strategy`` as in
    :func:`jaxbp.attention`."""

    def __init__(self, d, heads, *, causal=True, strategy="store", dtype=jnp.float32, rngs):
        m.check_heads(d, heads)
        self.heads, self.causal, self.strategy = heads, causal, strategy
        self.q = Dense(d, d, dtype=dtype, rngs=rngs)
        self.k = Dense(d, d, dtype=dtype, rngs=rngs)
        self.v = Dense(d, d, dtype=dtype, rngs=rngs)
        self.o = Dense(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        p = [(lin.w[...], lin.b[...]) for lin in (self.q, self.k, self.v, self.o)]
        (wq, bq), (wk, bk), (wv, bv), (wo, bo) = p
        return m.attention(
            x, wq, wk, wv, wo, bq, bk, bv, bo, self.heads, self.causal, self.strategy
        )
