"""The transformer ops in plain ``jax.numpy``: embedding, layer/RMS norm, attention, dropout.

Each is the textbook forward, differentiated by JAX's own transposes; only the input
validation is shared with the hand-written rules. The embedding is a ``jnp.take`` (its
transpose is JAX's scatter), the norms use ``jnp.var``/``jnp.mean`` and ``lax.rsqrt``, and
attention is ``jax.nn.softmax(q·kᵀ/√e, where=mask)·v``; dropout draws its mask with
``jax.random.bernoulli`` from the key, as Flax and Equinox do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from .. import _checks
from ..attention import _validate as _validate_attention
from ..dropout import _validate as _validate_dropout
from ..embedding import _check_ids, _validate_positions
from ..embedding import _validate as _validate_embedding
from ..norms import _validate_layer_norm, _validate_rms_norm

__all__ = ["embedding", "position_embedding", "layer_norm", "rms_norm", "attention", "dropout"]


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


def embedding(ids, table):
    """Reference embedding: ``table[ids]`` by ``jnp.take``; an out-of-range id (possible only
    under ``jit``) gives a NaN row (``mode="fill"``) whose cotangent JAX drops."""
    ids, table = _validate_embedding(ids, table)
    if ids.dtype.itemsize < 4:
        ids = ids.astype(jnp.int32)
    v = table.shape[0]
    _check_ids(ids, v)
    # Negative ids would wrap in jnp.take: send them past the end, where "fill" gives NaN.
    ids = jnp.where(ids < 0, v, ids)
    out = jnp.take(_acc(table), ids, axis=0, mode="fill", fill_value=jnp.nan)
    return out.astype(table.dtype)


def position_embedding(x, table):
    """Reference position embedding: ``x + table[:t]`` for ``x (..., t, d)``."""
    x, table = _validate_positions(x, table)
    return x + lax.slice_in_dim(table, 0, x.shape[-2], axis=0)


def layer_norm(x, gamma, beta, *, eps=1e-5):
    """Reference layer norm: ``(x − mean)·rsqrt(var + ε)·γ + β`` over the last axis."""
    x, gamma, beta, eps = _validate_layer_norm(x, gamma, beta, eps)
    xa = _acc(x)
    mean = jnp.mean(xa, axis=-1, keepdims=True)
    var = jnp.var(xa, axis=-1, keepdims=True)
    y = (xa - mean) * lax.rsqrt(var + eps) * _acc(gamma) + _acc(beta)
    return y.astype(x.dtype)


def rms_norm(x, gamma, *, eps=1e-6):
    """Reference RMS norm: ``x / √(mean(x²) + ε) · γ`` over the last axis."""
    x, gamma, eps = _validate_rms_norm(x, gamma, eps)
    xa = _acc(x)
    y = xa / jnp.sqrt(jnp.mean(jnp.square(xa), axis=-1, keepdims=True) + eps) * _acc(gamma)
    return y.astype(x.dtype)


def attention(q, k, v, *, causal=True, where=None, strategy="store"):
    """Reference attention: ``jax.nn.softmax(q·kᵀ/√e, where=mask)·v`` (``strategy`` accepted
    and ignored). A fully masked row is 0 with gradient 0, as ``jax.nn.softmax`` gives."""
    q, k, v, where, causal = _validate_attention(q, k, v, where, causal, strategy)
    qa, ka, va = _acc(q), _acc(k), _acc(v)
    scores = jnp.einsum("...te,...se->...ts", qa, ka) / math.sqrt(q.shape[-1])
    mask = where
    if causal:
        t, s = scores.shape[-2:]
        tril = jnp.tril(jnp.ones((t, s), bool))
        mask = tril if mask is None else mask & tril
    if mask is not None:
        mask = jnp.broadcast_to(mask, scores.shape)
    p = jax.nn.softmax(scores, axis=-1, where=mask)
    return jnp.einsum("...ts,...se->...te", p, va).astype(q.dtype)


def dropout(x, key, *, rate, broadcast_dims=()):
    """Reference dropout: ``where(keep, x·(1/(1 − rate)), 0·x)`` with
    ``keep = jax.random.bernoulli(key, 1 − rate, mask_shape)`` broadcast to ``x.shape``
    (``mask_shape``: ``x.shape`` with ``broadcast_dims`` set to 1); ``rate`` 0 is ``x``,
    ``rate`` 1 is ``0·x`` (gradient 0)."""
    x, key, rate, dims = _validate_dropout(x, key, rate, broadcast_dims)
    if rate == 0.0:
        return x
    if rate == 1.0:
        return x * 0
    q = 1.0 - rate
    mask_shape = tuple(1 if a in dims else n for a, n in enumerate(x.shape))
    keep = jnp.broadcast_to(jax.random.bernoulli(key, q, mask_shape), x.shape)
    return jnp.where(keep, x * (1.0 / q), x * 0)
