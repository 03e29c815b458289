"""Dropout with a hand-written backward that regenerates its mask from the key.

Index letters::

    n  batch (any leading axes)       k  features (any trailing axes: dropout is elementwise)

Forward (inverted dropout: the kept entries are scaled so that the expectation is ``x``)::

    q    = 1 − rate                                     the keep probability
    keep = jax.random.bernoulli(key, q, mask_shape)     bool, broadcast to x's shape
    y    = where(keep, x·(1/q), 0·x)                    (n..., k...)

``mask_shape`` is ``x.shape`` with every axis in ``broadcast_dims`` set to 1 (those axes share
one mask, as ``flax.nnx.Dropout``'s ``broadcast_dims``). The mask is the one Flax's
``nnx.Dropout`` and Equinox's ``eqx.nn.Dropout`` draw from the same key, and the one
:func:`jaxbp.reference.dropout` draws in plain ``jax.numpy``. A dropped entry is ``0·x``:
0, or NaN where ``x`` is NaN or ±∞, so that a NaN is never turned into a finite value
(``docs/edge_cases.md``; PyTorch's dropout, a product, does the same); Flax and Equinox
select a 0 there, the one difference, on non-finite inputs only.

Backward: the Jacobian is ``diag(keep / q)``, so ``dx = where(keep, g·(1/q), 0·g)`` (no
cotangent for the key). ``1/q`` is a Python float: the same bits jitted or not, where XLA
would turn a division by the constant ``q`` into a product in one and not in the other
(Flax and Equinox divide: their values are within an ulp of these).

The residual is the key alone: the backward draws the mask again (``jax.random`` is a pure
function of the key), where keeping it would hold one byte per element (XLA stores ``bool``
as bytes) from the forward to the backward. With the two run apart (``jax.vjp``,
rematerialisation, a pipeline stage's forward) that is the mask's size saved per dropout;
under one ``jit`` XLA:CPU draws each mask once either way (it merges the two draws), and
the temporary memory measured the same. The figures: ``docs/transformer.md``.

``rate = 0`` is the identity; ``rate = 1`` gives zeros (``0·x``) and a zero gradient, as
``flax.nnx.Dropout`` and PyTorch do (a plain ``x / (1 − rate)`` would divide by 0 and give
NaN gradients, as ``eqx.nn.Dropout(p=1)`` does); neither draws, so the key may be ``None``.
Any other rate outside ``[0, 1]``, or NaN, is a ``ValueError``. ``rate`` is static (a
Python number): it decides the identity and the zeros when the function is traced.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks
from ._op import declare, op_vjp

__all__ = ["dropout", "dropout_fwd", "dropout_bwd", "dropout_jvp"]


def _validate_rate(rate: Any) -> float:
    rate = _checks.static_number("rate", rate)
    if not 0.0 <= rate <= 1.0:  # NaN fails too
        raise ValueError(f"rate: expected a number in [0, 1] (the dropped fraction), got {rate!r}")
    return rate


def _validate_dims(broadcast_dims: Any, ndim: int) -> tuple[int, ...]:
    try:
        dims = tuple(operator.index(d) for d in broadcast_dims)
    except TypeError:
        raise TypeError(
            f"broadcast_dims: expected a tuple of ints (axes sharing one mask), got "
            f"{broadcast_dims!r}"
        ) from None
    bad = [d for d in dims if not -ndim <= d < ndim]
    if bad:
        raise ValueError(f"broadcast_dims: expected axes of x (ndim {ndim}), got {dims}")
    return tuple(sorted({d % ndim for d in dims}))


def _validate_key(key: Any, rate: float) -> Any:
    if key is None and rate in (0.0, 1.0):  # nothing is drawn
        return None
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == jnp.uint32 and jnp.ndim(key) == 1
    if not (typed and jnp.ndim(key) == 0) and not raw:
        got = "None" if key is None else f"{dtype} of shape {jnp.shape(key)}"
        raise TypeError(
            "key: expected one PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
            f"got {got}"
        )
    return key


def _validate(x, key, rate, broadcast_dims):
    x = _checks.floating("x", x)
    rate = _validate_rate(rate)
    return x, _validate_key(key, rate), rate, _validate_dims(broadcast_dims, x.ndim)


def keep_mask(key, rate: float, shape: tuple[int, ...], broadcast_dims=()) -> jax.Array:
    """The kept entries, bool ``shape``: ``jax.random.bernoulli(key, 1 − rate, mask_shape)``
    broadcast to ``shape`` (``mask_shape``: ``shape`` with ``broadcast_dims`` set to 1)."""
    mask_shape = tuple(1 if a in broadcast_dims else s for a, s in enumerate(shape))
    return jnp.broadcast_to(jax.random.bernoulli(key, 1.0 - rate, mask_shape), shape)


def _apply(keep, a, rate):
    """``where(keep, a·(1/q), 0·a)`` in ``a``'s dtype (the forward on ``x``, the backward on
    ``g``): a dropped NaN stays NaN. A product by the Python float ``1/q``, so that the
    result is the same bits jitted or not (XLA rewrites a division by a constant)."""
    return jnp.where(keep, a * (1.0 / (1.0 - rate)), a * 0)


@functools.partial(jax.jit, static_argnames=("rate", "broadcast_dims"))
def dropout_fwd(x: jax.Array, key: jax.Array, *, rate: float, broadcast_dims=()):
    """Forward: ``y = where(keep, x / (1 − rate), 0·x)``; returns ``(y, (key,))``."""
    x, key, rate, dims = _validate(x, key, rate, broadcast_dims)
    if rate == 0.0:
        return x, (key,)
    if rate == 1.0:
        return x * 0, (key,)
    return _apply(keep_mask(key, rate, x.shape, dims), x, rate), (key,)


@functools.partial(jax.jit, static_argnames=("rate", "broadcast_dims"))
def dropout_bwd(res, g: jax.Array, *, rate: float, broadcast_dims=()):
    """Backward: ``(dx, None)``, ``dx = where(keep, g / (1 − rate), 0·g)`` with ``keep``
    drawn again from the saved key (the same mask as the forward's)."""
    (key,) = res
    rate = _validate_rate(rate)
    dims = _validate_dims(broadcast_dims, g.ndim)
    if rate == 0.0:
        return g, None
    if rate == 1.0:
        return g * 0, None
    return _apply(keep_mask(key, rate, g.shape, dims), g, rate), None


@functools.partial(jax.jit, static_argnames=("rate", "broadcast_dims"))
def dropout_jvp(res, tangents, *, rate: float, broadcast_dims=()):
    """Forward mode: ``ẏ = where(keep, ẋ / (1 − rate), 0·ẋ)``, the backward's mask on the
    tangent ``ẋ`` (the tangents are ``(ẋ, None)``: the key has none)."""
    (key,), dx = res, tangents[0]
    rate = _validate_rate(rate)
    dims = _validate_dims(broadcast_dims, dx.ndim)
    if rate == 0.0:
        return dx
    if rate == 1.0:
        return dx * 0
    return _apply(keep_mask(key, rate, dx.shape, dims), dx, rate)


@declare(fwd=dropout_fwd, bwd=dropout_bwd, jvp=dropout_jvp, per_example=("x",))
def dropout(x: jax.Array, key: jax.Array, *, rate: float, broadcast_dims=()) -> jax.Array:
    """Inverted dropout: each entry kept with probability ``1 − rate`` and scaled by
    ``1/(1 − rate)``, the others 0 (NaN stays NaN); the gradient is :func:`dropout_bwd`.

    Args:
      x: ``(n..., k...)``, floating; any shape.
      key: one PRNG key (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``): the mask is
        ``jax.random.bernoulli(key, 1 − rate, mask_shape)``, as Flax and Equinox draw it.
        ``None`` is accepted when ``rate`` is 0 or 1 (nothing is drawn).
      rate: the dropped fraction, a Python number in ``[0, 1]``: 0 is the identity, 1 gives
        zeros (and a zero gradient).
      broadcast_dims: axes of ``x`` that share one mask (``flax.nnx.Dropout``'s).

    Returns:
      ``(n..., k...)`` in the dtype of ``x``.

    Raises:
      TypeError: a non-floating ``x``, a key that is not one PRNG key, a traced ``rate``.
      ValueError: ``rate`` outside ``[0, 1]`` or NaN; an axis in ``broadcast_dims`` that ``x``
        does not have.

    Under ``jax.vmap`` the mask is drawn for each mapped call's own shape, and inside a
    ``shard_map`` for each device's own block: give each mapped example (each device) its
    own key (``jax.random.split``, ``jax.random.fold_in(key, lax.axis_index(axis))``), or
    share one mask along the mapped axes (``broadcast_dims``). Under plain ``jit`` on a
    sharded ``x`` the mask is the one device's (``jax_threefry_partitionable``).

    Example:
      >>> import jax, jax.numpy as jnp, jaxbp
      >>> x = jnp.ones((2, 4))
      >>> key = jax.random.key(0)
      >>> y = jaxbp.dropout(x, key, rate=0.5)
      >>> keep = jax.random.bernoulli(key, 0.5, x.shape)      # the same mask
      >>> bool((y == jnp.where(keep, 2.0, 0.0)).all())        # kept entries doubled
      True
    """
    x, key, rate, dims = _validate(x, key, rate, broadcast_dims)
    if rate == 0.0:
        return x
    return _dropout(x, key, rate=rate, broadcast_dims=dims)


_dropout = op_vjp(dropout)  # reads dropout.fwd / .bwd when JAX traces it
