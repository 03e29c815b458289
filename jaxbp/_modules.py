"""What the Flax NNX and Equinox wrappers share: initialisers and the forward math on arrays.

Each function takes plain arrays and calls jaxbp's ops, so ``jax.grad`` (and ``nnx.grad``,
``eqx.filter_grad``) of a module runs the hand-written backward rules.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .attention import attention as _attention_op
from .dense import dense as _dense_op
from .embedding import embedding as _embedding_op
from .norms import layer_norm as _layer_norm_op
from .norms import rms_norm as _rms_norm_op


def dense_init(key, in_features: int, out_features: int, dtype) -> jax.Array:
    """LeCun-normal weights ``(i, o)``: ``N(0, 1/i)``."""
    return jax.random.normal(key, (in_features, out_features), dtype) / math.sqrt(in_features)


def dense(x, w, b):
    """``x (..., i) · w (i, o) + b (o,)`` through :func:`jaxbp.dense`."""
    return _dense_op(x, w, b)


def layer_norm(x, gamma, beta, eps: float):
    return _layer_norm_op(x, gamma, beta, eps=eps)


def rms_norm(x, gamma, eps: float):
    return _rms_norm_op(x, gamma, eps=eps)


def embedding(ids, table):
    return _embedding_op(ids, table)


def attention(x, wq, wk, wv, wo, bq, bk, bv, bo, heads: int, causal: bool, strategy: str):
    """Multi-head self-attention of ``x (..., t, d)``: ``q, k, v = x·w_q, x·w_k, x·w_v``
    split into ``h`` heads of ``e = d/h`` (``(..., h, t, e)``), :func:`jaxbp.attention`, heads
    merged back to ``(..., t, d)`` and projected by ``w_o``."""
    *lead, t, d = x.shape
    e = d // heads

    def split(y):  # (..., t, d) -> (..., h, t, e)
        return jnp.swapaxes(y.reshape(*lead, t, heads, e), -2, -3)

    q, k, v = (split(dense(x, w, b)) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    o = _attention_op(q, k, v, causal=causal, strategy=strategy)
    o = jnp.swapaxes(o, -2, -3).reshape(*lead, t, d)
    return dense(o, wo, bo)


def check_heads(d: int, heads: int) -> None:
    if heads < 1 or d % heads:
        raise ValueError(f"heads: expected a positive divisor of d={d}, got {heads}")
