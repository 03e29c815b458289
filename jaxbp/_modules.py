"""What the Flax NNX and Equinox wrappers share: the forward math on plain arrays, through
jaxbp's ops, so that ``jax.grad`` (``nnx.grad``, ``eqx.filter_grad``) of a module runs the
hand-written backward rules.

The wrappers (:mod:`jaxbp.nnx`, :mod:`jaxbp.eqx`) subclass the library's own modules and
replace only their ``__call__``: names, parameter layouts, defaults and initialisation are
the library's. The library's layouts are turned into the ops' here (``eqx.nn.Linear``'s
``weight (o, i)`` is ``w (i, o)`` transposed; ``nnx.MultiHeadAttention``'s kernels
``(d, h, e)`` are ``(d, h·e)`` reshaped); those are views, differentiated by JAX's own
transposes around the hand-written rules.

Index letters::

    n  batch (any leading axes)     i, o  input and output features     d  normalised axis
    h  heads     t  query positions     s  key/value positions     e  head dimension
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .attention import attention as _attention_op
from .dense import dense as _dense_op
from .dropout import dropout as _dropout_op
from .embedding import embedding as _embedding_op
from .norms import layer_norm as _layer_norm_op
from .norms import rms_norm as _rms_norm_op


def linear(x, w, b):
    """``x (..., i) · w (i, o) + b (o,)`` through :func:`jaxbp.dense`."""
    return _dense_op(x, w, b)


def _flat_norm(op: Callable, x, k: int, params, eps):
    """``op`` over the trailing ``k`` axes of ``x``, flattened into one ``d`` (the norms
    normalise over the last axis); ``params`` are reshaped to ``(d,)``."""
    lead, tail = x.shape[: x.ndim - k], x.shape[x.ndim - k :]
    d = math.prod(tail)
    y = op(x.reshape(*lead, d), *(p.reshape(d) for p in params), eps=eps)
    return y.reshape(x.shape)


def layer_norm(x, k: int, weight, bias, eps: float):
    """Layer norm over the trailing ``k`` axes; ``weight``/``bias`` of those axes' shape or
    ``None`` (1 and 0: no gradient)."""
    tail = x.shape[x.ndim - k :]
    gamma = jnp.ones(tail, x.dtype) if weight is None else weight.astype(x.dtype)
    beta = jnp.zeros(tail, x.dtype) if bias is None else bias.astype(x.dtype)
    return _flat_norm(_layer_norm_op, x, k, (gamma, beta), eps)


def rms_norm(x, k: int, weight, eps: float):
    """RMS norm over the trailing ``k`` axes; ``weight`` of those axes' shape or ``None``."""
    tail = x.shape[x.ndim - k :]
    gamma = jnp.ones(tail, x.dtype) if weight is None else weight.astype(x.dtype)
    return _flat_norm(_rms_norm_op, x, k, (gamma,), eps)


def embedding(ids, table):
    return _embedding_op(ids, table)


def dropout(x, key, rate: float, broadcast_dims=()):
    return _dropout_op(x, key, rate=rate, broadcast_dims=tuple(broadcast_dims))


def as_mask(mask) -> jax.Array | None:
    """A mask as bool (``True``: attend); Flax's mask helpers make float 1/0 masks."""
    return None if mask is None else jnp.asarray(mask).astype(bool)


def attend(q, k, v, mask, causal: bool, strategy: str):
    """Multi-head attention on heads laid out as the libraries lay them out,
    ``q (..., t, h, e)``, ``k, v (..., s, h_kv, e)`` → ``(..., t, h, e)``, through
    :func:`jaxbp.attention` (``(..., h, t, e)`` inside). ``mask`` (bool, ``True`` attends)
    broadcasts to the scores ``(..., h, t, s)`` and combines with ``causal``; ``h_kv``
    dividing ``h`` shares each key/value head among ``h / h_kv`` query heads (grouped
    queries, as Flax groups them)."""
    h, h_kv = q.shape[-2], k.shape[-2]
    if h != h_kv:
        k, v = jnp.repeat(k, h // h_kv, axis=-2), jnp.repeat(v, h // h_kv, axis=-2)
    q, k, v = (jnp.swapaxes(a, -2, -3) for a in (q, k, v))
    o = _attention_op(q, k, v, causal=causal, where=as_mask(mask), strategy=strategy)
    return jnp.swapaxes(o, -2, -3)


def split_heads(y, heads: int):
    """``(..., t, h·e) -> (..., t, h, e)``."""
    return y.reshape(*y.shape[:-1], heads, y.shape[-1] // heads)


def merge_heads(y):
    """``(..., t, h, e) -> (..., t, h·e)``."""
    return y.reshape(*y.shape[:-2], y.shape[-2] * y.shape[-1])


def check_heads(d: int, heads: int) -> None:
    if heads < 1 or d % heads:
        raise ValueError(f"heads: expected a positive divisor of d={d}, got {heads}")


def unsupported(module: str, library: str, **given: tuple[Any, Any]) -> None:
    """``ValueError`` naming the first option whose value is not its default: a setting the
    library's module has and jaxbp's ops do not (``given``: ``name=(value, default)``)."""
    for name, (value, default) in given.items():
        same = value is default or (
            not callable(value) and not isinstance(value, jax.Array) and value == default
        )
        if not same:
            raise ValueError(
                f"{name}: {module} runs jaxbp's ops, which do not take {name}={value!r} (only "
                f"{default!r}); use {library} for it"
            )
