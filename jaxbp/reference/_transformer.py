"""The transformer ops in plain ``jax.numpy``: layer and RMS norm.

Each is the textbook forward, differentiated by JAX's own transposes; only the input
validation is shared with the hand-written rules. The norms use ``jnp.var``/``jnp.mean``
and ``lax.rsqrt``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .. import _checks
from ..norms import _validate_layer_norm, _validate_rms_norm

__all__ = ["layer_norm", "rms_norm"]


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


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
