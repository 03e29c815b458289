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

Both rules save only their output (and the mask, for ``log_softmax`` with ``where=``). Rows
whose logits are all ``−inf``, or that contain ``+inf``, come out NaN (as
``jax.nn.softmax``); a single ``−inf`` logit is an exact 0.

Masks (``where=``, a bool array broadcastable to ``z``), with ``jax.nn``'s semantics: masked
entries are left out of the normalisation as if they were not there. ``softmax`` gives them
probability exactly 0; ``log_softmax`` gives them ``−inf`` (as ``jax.nn.log_softmax``). A
row with every entry masked gives all 0 (``softmax``) or all ``−inf`` (``log_softmax``) and a
zero gradient, never NaN. In the backward, masked entries get a zero gradient and the sums
run over the unmasked ones only::

    softmax:      dz = s ⊙ (g − ⟨s, g⟩)             (s = 0 where masked: nothing changes)
    log_softmax:  dz = [m] ⊙ (g − s · Σₖ mₖ gₖ)     (m the mask)

The bwd returns one cotangent per positional argument of the fwd: ``(dz, None)``, ``None``
for the mask.
Forward mode is the same collapse on the tangent ``ż``: ``ṡ = J·ż = s ⊙ (ż − ⟨s, ż⟩)``
(:func:`softmax_jvp`), and ``ℓ̇ = ż − ⟨s, ż⟩`` for ``log_softmax``; ``jax.jvp`` and
``jax.jacfwd`` run them through :mod:`jaxbp.forward_mode` (the ops here are ``custom_vjp``).
Half-precision inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import _checks
from ._op import declare, op_vjp

__all__ = [
    "softmax", "softmax_fwd", "softmax_bwd", "softmax_jvp",
    "log_softmax", "log_softmax_fwd", "log_softmax_bwd", "log_softmax_jvp",
    "softmax_jacobian",
]  # fmt: skip


def _validate(z, axis):
    z = _checks.floating("z", z)
    _checks.min_rank("z", z, 1, "(..., c)")
    _checks.static_int("axis", axis)
    if not isinstance(axis, int) or not -z.ndim <= axis < z.ndim:
        raise ValueError(f"axis: expected an int in [{-z.ndim}, {z.ndim}), got {axis!r}")
    return z, axis % z.ndim


def _validate_where(z, where):
    """``where``: ``None`` or a bool mask broadcastable to ``z``'s shape (not widening it)."""
    if where is None:
        return None
    where = _checks.as_array(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where: expected a bool mask, got {where.dtype} (shape {where.shape})")
    try:
        full = jnp.broadcast_shapes(where.shape, z.shape)
    except ValueError:
        full = None
    if full != z.shape:
        raise ValueError(
            f"where: expected a shape broadcastable to z's {z.shape}, got {where.shape}"
        )
    return where


@functools.partial(jax.jit, static_argnames="axis")
def softmax_fwd(z: jax.Array, where: jax.Array | None = None, *, axis: int = -1):
    """Forward: ``s (..., c) = softmax(z)`` (0 where masked); returns ``(s, (s,))``.

    Validates like the op. Masked entries have ``s = 0`` exactly, so ``s`` alone is all the
    backward needs, with or without a mask."""
    z, axis = _validate(z, axis)
    where = _validate_where(z, where)
    zc = z.astype(_checks.accum_dtype(z.dtype))
    s = jax.nn.softmax(zc, axis=axis, where=where).astype(z.dtype)
    return s, (s,)


@functools.partial(jax.jit, static_argnames="axis")
def softmax_bwd(res, g: jax.Array, *, axis: int = -1):
    """Backward: ``(dz, None)``, ``dz = s ⊙ (g − ⟨s, g⟩)`` (``"nc,nc->nc"``), never forming
    ``J (n, c, c)``; ``None`` is the mask's cotangent. Masked entries (``s = 0``) get 0."""
    (s,) = res
    acc = _checks.accum_dtype(s.dtype)
    s, gc = s.astype(acc), g.astype(acc)
    sg = jnp.sum(s * gc, axis=axis, keepdims=True)  # ⟨s, g⟩  "nc,nc->n"
    return (s * (gc - sg)).astype(g.dtype), None


@functools.partial(jax.jit, static_argnames="axis")
def softmax_jvp(res, tangents, *, axis: int = -1):
    """Forward mode: ``ṡ = J·ż = s ⊙ (ż − ⟨s, ż⟩)`` (``"nc,nc->nc"``), the same collapse as
    the backward (``J`` is symmetric); the tangents are ``(ż, None)`` (``None``: the mask)."""
    (s,) = res
    dz = tangents[0]
    acc = _checks.accum_dtype(s.dtype)
    s, dzc = s.astype(acc), dz.astype(acc)
    sz = jnp.sum(s * dzc, axis=axis, keepdims=True)  # ⟨s, ż⟩  "nc,nc->n"
    return (s * (dzc - sz)).astype(dz.dtype)


@functools.partial(jax.jit, static_argnames="axis")
def log_softmax_fwd(z: jax.Array, where: jax.Array | None = None, *, axis: int = -1):
    """Forward: ``ℓ (..., c) = z − logΣₖe^{zₖ}`` (``−inf`` where masked); returns
    ``(ℓ, (ℓ, where))``. Validates like the op."""
    z, axis = _validate(z, axis)
    where = _validate_where(z, where)
    zc = z.astype(_checks.accum_dtype(z.dtype))
    out = jax.nn.log_softmax(zc, axis=axis, where=where).astype(z.dtype)
    return out, (out, where)


@functools.partial(jax.jit, static_argnames="axis")
def log_softmax_bwd(res, g: jax.Array, *, axis: int = -1):
    """Backward: ``(dz, None)``, ``dz = g − e^ℓ · Σₖ gₖ`` (``"nc,n->nc"``); with a mask
    ``m``, ``dz = m ⊙ (g − e^ℓ · Σₖ mₖgₖ)``. ``None`` is the mask's cotangent."""
    out, where = res
    acc = _checks.accum_dtype(out.dtype)
    gc = g.astype(acc)
    if where is not None:
        gc = jnp.where(where, gc, 0.0)  # masked entries neither count nor get a gradient
    dz = gc - jnp.exp(out.astype(acc)) * jnp.sum(gc, axis=axis, keepdims=True)
    if where is not None:
        dz = jnp.where(where, dz, 0.0)  # e^ℓ = 0 there already; this keeps NaN·0 out
    return dz.astype(g.dtype), None


@functools.partial(jax.jit, static_argnames="axis")
def log_softmax_jvp(res, tangents, *, axis: int = -1):
    """Forward mode: ``ℓ̇ = ż − ⟨e^ℓ, ż⟩`` (``J = I − 1 sᵀ``, ``"nc,nc->n"``); with a mask
    ``m``, ``ℓ̇ = m ⊙ (ż − ⟨e^ℓ, m ⊙ ż⟩)`` (0 where masked, as ``ℓ = −inf`` there)."""
    out, where = res
    dz = tangents[0]
    acc = _checks.accum_dtype(out.dtype)
    dzc = dz.astype(acc)
    if where is not None:
        dzc = jnp.where(where, dzc, 0.0)  # masked entries do not count
    dl = dzc - jnp.sum(jnp.exp(out.astype(acc)) * dzc, axis=axis, keepdims=True)
    if where is not None:
        dl = jnp.where(where, dl, 0.0)
    return dl.astype(dz.dtype)


@declare(fwd=softmax_fwd, bwd=softmax_bwd, jvp=softmax_jvp, per_example=("z",))
def softmax(z: jax.Array, *, axis: int = -1, where: jax.Array | None = None) -> jax.Array:
    """Softmax along ``axis``: ``z (..., c) → s (..., c)``, rows summing to 1.

    The gradient is the hand-written :func:`softmax_bwd`, ``s ⊙ (g − ⟨s, g⟩)``.

    Args:
      z: logits ``(..., c)``, floating.
      axis: the class axis.
      where: optional bool mask broadcastable to ``z`` (``jax.nn.softmax``'s ``where=``):
        masked entries are left out and get probability 0 and gradient 0; a row with every
        entry masked is all 0 with a zero gradient (never NaN).

    Example:
      >>> import jax.numpy as jnp, jaxbp
      >>> jaxbp.softmax(jnp.zeros((2, 4))).tolist()[0]
      [0.25, 0.25, 0.25, 0.25]
      >>> jaxbp.softmax(jnp.zeros(3), where=jnp.array([True, False, True])).tolist()
      [0.5, 0.0, 0.5]
    """
    z, axis = _validate(z, axis)
    where = _validate_where(z, where)
    return _softmax(z, where, axis=axis)


@declare(fwd=log_softmax_fwd, bwd=log_softmax_bwd, jvp=log_softmax_jvp, per_example=("z",))
def log_softmax(z: jax.Array, *, axis: int = -1, where: jax.Array | None = None) -> jax.Array:
    """Log-softmax along ``axis``: ``z (..., c) → z − logΣe^z (..., c)``.

    The gradient is the hand-written :func:`log_softmax_bwd`, ``g − s·Σg``.

    Args:
      z: logits ``(..., c)``, floating.
      axis: the class axis.
      where: optional bool mask broadcastable to ``z``, as ``jax.nn.log_softmax``'s: the
        log-sum-exp runs over unmasked entries only; masked entries come out ``−inf`` (as in
        ``jax.nn``) with gradient 0. A fully masked row is all ``−inf`` with a zero gradient.
        Reduce with ``jnp.where(where, ℓ, 0)``, never ``ℓ·0`` (``0·(−inf)`` is NaN).
    """
    z, axis = _validate(z, axis)
    where = _validate_where(z, where)
    return _log_softmax(z, where, axis=axis)


_softmax = op_vjp(softmax)  # each reads its op's .fwd / .bwd when JAX traces it
_log_softmax = op_vjp(log_softmax)


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
