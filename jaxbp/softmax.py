"""Softmax and log-softmax with hand-written backward rules, and the explicit Jacobian.

Index letters::

    n  batch (any leading axes)
    c  classes (the softmax axis)

``s = softmax(z)``, ``sₖ = e^{zₖ} / Σₗ e^{zₗ}``. Unlike an elementwise activation, every
output depends on every input, so the Jacobian of one row is a full ``(c, c)`` matrix::

    J = ∂s/∂z = diag(s) − s sᵀ      (c, c) per row, (n, c, c) batched

The backward is a vector-Jacobian product ``dz = Jᵀ g``, and because ``J`` is symmetric and
has that structure, it never needs the matrix::

    dz = Jᵀ g = s ⊙ g − s (sᵀ g) = s ⊙ (g − ⟨s, g⟩)      "nc,nc->nc": O(c), not O(c²)

For ``log_softmax`` (output ``ℓ = z − logΣe^z``) the Jacobian is ``I − 1 sᵀ`` and::

    dz = g − s · Σₖ gₖ,   with s = e^ℓ

Both rules save only their output. Rows whose logits are all ``−inf``, or that contain
``+inf``, come out NaN (as ``jax.nn.softmax``); a single ``−inf`` logit is an exact 0.
Half-precision inputs are computed in float32 and cast back. Forward-mode (``jax.jvp``,
``jax.jacfwd``) does not go through a ``custom_vjp``: use :func:`softmax_jacobian` or
``jaxbp.reference`` for that.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import _checks
from ._op import custom_vjp_op, declare_op

__all__ = [
    "softmax", "softmax_fwd", "softmax_bwd",
    "log_softmax", "log_softmax_fwd", "log_softmax_bwd",
    "softmax_jacobian",
]  # fmt: skip


def _validate(z, axis):
    z = _checks.floating("z", z)
    _checks.min_rank("z", z, 1, "(..., c)")
    _checks.static_int("axis", axis)
    if not isinstance(axis, int) or not -z.ndim <= axis < z.ndim:
        raise ValueError(f"axis: expected an int in [{-z.ndim}, {z.ndim}), got {axis!r}")
    return z, axis % z.ndim


@functools.partial(jax.jit, static_argnames="axis")
def softmax_fwd(z: jax.Array, *, axis: int = -1):
    """Forward: ``s (..., c) = softmax(z)``; returns ``(s, (s,))``. Validates like the op."""
    z, axis = _validate(z, axis)
    zc = z.astype(_checks.accum_dtype(z.dtype))
    s = jax.nn.softmax(zc, axis=axis).astype(z.dtype)
    return s, (s,)


@functools.partial(jax.jit, static_argnames="axis")
def softmax_bwd(res, g: jax.Array, *, axis: int = -1):
    """Backward: ``dz = s ⊙ (g − ⟨s, g⟩)`` (``"nc,nc->nc"``), never forming ``J (n, c, c)``."""
    (s,) = res
    acc = _checks.accum_dtype(s.dtype)
    s, gc = s.astype(acc), g.astype(acc)
    sg = jnp.sum(s * gc, axis=axis, keepdims=True)  # ⟨s, g⟩  "nc,nc->n"
    return ((s * (gc - sg)).astype(g.dtype),)


@functools.partial(jax.jit, static_argnames="axis")
def log_softmax_fwd(z: jax.Array, *, axis: int = -1):
    """Forward: ``ℓ (..., c) = z − logΣₖe^{zₖ}``; returns ``(ℓ, (ℓ,))``. Validates like the op."""
    z, axis = _validate(z, axis)
    zc = z.astype(_checks.accum_dtype(z.dtype))
    out = jax.nn.log_softmax(zc, axis=axis).astype(z.dtype)
    return out, (out,)


@functools.partial(jax.jit, static_argnames="axis")
def log_softmax_bwd(res, g: jax.Array, *, axis: int = -1):
    """Backward: ``dz = g − e^ℓ · Σₖ gₖ`` (``"nc,n->nc"``)."""
    (out,) = res
    acc = _checks.accum_dtype(out.dtype)
    gc = g.astype(acc)
    dz = gc - jnp.exp(out.astype(acc)) * jnp.sum(gc, axis=axis, keepdims=True)
    return (dz.astype(g.dtype),)


_softmax = custom_vjp_op(softmax_fwd, softmax_bwd)
_log_softmax = custom_vjp_op(log_softmax_fwd, log_softmax_bwd)


@declare_op(per_example=("z",))
def softmax(z: jax.Array, *, axis: int = -1) -> jax.Array:
    """Softmax along ``axis``: ``z (..., c) → s (..., c)``, rows summing to 1.

    The gradient is the hand-written :func:`softmax_bwd`, ``s ⊙ (g − ⟨s, g⟩)``.

    Example:
      >>> import jax.numpy as jnp, jaxbp
      >>> jaxbp.softmax(jnp.zeros((2, 4))).tolist()[0]
      [0.25, 0.25, 0.25, 0.25]
    """
    z, axis = _validate(z, axis)
    return _softmax((("axis", axis),), z)


@declare_op(per_example=("z",))
def log_softmax(z: jax.Array, *, axis: int = -1) -> jax.Array:
    """Log-softmax along ``axis``: ``z (..., c) → z − logΣe^z (..., c)``.

    The gradient is the hand-written :func:`log_softmax_bwd`, ``g − s·Σg``.
    """
    z, axis = _validate(z, axis)
    return _log_softmax((("axis", axis),), z)


@functools.partial(jax.jit, static_argnames="axis")
def _softmax_jacobian(z, axis):
    s = jax.nn.softmax(z.astype(_checks.accum_dtype(z.dtype)), axis=axis)
    s = jnp.moveaxis(s, axis, -1)  # (n, c)
    eye = jnp.eye(s.shape[-1], dtype=s.dtype)
    jac = s[..., :, None] * eye - s[..., :, None] * s[..., None, :]  # diag(s) − s sᵀ
    return jac.astype(z.dtype)


def softmax_jacobian(z: jax.Array, *, axis: int = -1) -> jax.Array:
    """The explicit softmax Jacobian ``J = diag(s) − s sᵀ`` of every row.

    Args:
      z: logits ``(..., c)`` (``axis`` picks the class axis; it is moved last).

    Returns:
      ``J (..., c, c)`` with ``J[..., k, l] = ∂s_k/∂z_l``. Symmetric; each row and column
      sums to 0. ``J @ g`` equals :func:`softmax_bwd`'s result, at ``O(c²)`` instead of
      ``O(c)`` cost: this is for looking at, not for training.
    """
    z, axis = _validate(z, axis)
    return _softmax_jacobian(z, axis)
