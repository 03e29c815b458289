"""Embedding lookup with a hand-written scatter-add backward.

Index letters::

    n  batch (any leading axes of the ids)
    v  vocabulary (rows of the table)
    d  embedding dimension

Forward ``out[n] = table[ids[n]]``: ``ids (n...)`` integer, ``table (v, d)`` → ``(n..., d)``.
As a matrix product it is ``onehot(ids) (n, v) · table (v, d)``, so the backward is
``onehot(ids)ᵀ · g`` — but that ``(n, v)`` one-hot is never formed: the rows of ``g`` are
scattered into a zero ``(v, d)`` table, and ids that repeat accumulate::

    dtable[j] = Σ_{n : ids[n] = j} g[n]       "n,nd->vd" (a scatter-add)

For half-precision tables the accumulation runs in float32 (thousands of tokens may share
one row), and the result is cast back to the table's dtype. The ids get no cotangent
(``None``). The residuals are the ids and a ``(v, 0)`` array that carries only the table's
row count and dtype: the backward never reads the table.

Out-of-range ids behave like out-of-range labels in :func:`jaxbp.softmax_cross_entropy`
(and unlike JAX indexing, which clamps, or wraps negative ids): a ``ValueError`` when the ids
are concrete; under ``jit`` the output row is NaN (so is any loss computed from it) and its
cotangent has no table row to go to, so it is dropped; :func:`jaxbp.checked` reports them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _checks
from ._checks import check_label_range
from ._op import declare, op_vjp

__all__ = ["embedding", "embedding_fwd", "embedding_bwd"]


def _validate(ids, table):
    ids = _checks.integer("ids", ids)
    table = _checks.floating("table", table)
    if table.ndim != 2:
        raise ValueError(f"table: expected shape (v, d), got {table.shape}")
    if table.shape[0] == 0:
        raise ValueError(f"table: expected at least one row (v ≥ 1), got shape {table.shape}")
    return ids, table


def _check_ids(ids, v):
    """Concrete ids outside ``[0, v)`` raise ``ValueError`` naming ``ids``; traced ones are
    checked under :func:`jaxbp.checked` (the same check as class ids)."""
    check_label_range(ids, v, name="ids")


def _wide(ids):
    """int8/int16 (and uint8/uint16) ids as int32, so that ``v`` always fits their dtype."""
    return ids.astype(jnp.int32) if ids.dtype.itemsize < 4 else ids


def _bad(ids, v):
    return (ids < 0) | (ids >= v)


@jax.jit
def embedding_fwd(ids: jax.Array, table: jax.Array):
    """Forward: ``out (n..., d) = table[ids]``; returns ``(out, (ids, zeros (v, 0)))``.

    Validates shapes and dtypes like :func:`embedding` (id values are not checked here: an
    out-of-range id gives a NaN row)."""
    ids, table = _validate(ids, table)
    ids, v = _wide(ids), table.shape[0]
    bad = _bad(ids, v)
    rows = table[jnp.where(bad, 0, ids)]  # a gather; ids in [0, v), nothing clamps or wraps
    out = jnp.where(bad[..., None], jnp.nan, rows).astype(table.dtype)
    return out, (ids, jnp.zeros((v, 0), table.dtype))


@jax.jit
def embedding_bwd(res, g: jax.Array):
    """Backward: ``(None, dtable (v, d))``, ``dtable = onehot(ids)ᵀ·g`` as a scatter-add
    (``"n,nd->vd"``; repeated ids accumulate, in float32 for half precision)."""
    ids, shape = res
    v, d = shape.shape[0], g.shape[-1]
    acc = _checks.accum_dtype(shape.dtype)
    flat = ids.reshape(-1)
    flat = jnp.where(_bad(flat, v), v, flat)  # out of range (or negative): dropped, not wrapped
    dtable = jnp.zeros((v, d), acc).at[flat].add(g.reshape(-1, d).astype(acc), mode="drop")
    return None, dtable.astype(shape.dtype)


@declare(fwd=embedding_fwd, bwd=embedding_bwd, per_example=("ids",), example_ndim=0)
def embedding(ids: jax.Array, table: jax.Array) -> jax.Array:
    """Embedding lookup ``table[ids]`` whose gradient is the scatter-add :func:`embedding_bwd`.

    Args:
      ids: integer ids ``(n...)``, any shape (``()`` too); each in ``[0, v)``.
      table: ``(v, d)``, floating.

    Returns:
      ``(n..., d)`` in the table's dtype.

    Raises:
      TypeError: non-integer ids, a non-floating table.
      ValueError: a table that is not ``(v, d)`` with ``v ≥ 1``; ids outside ``[0, v)`` when
        they are concrete (under ``jit`` their rows are NaN; :func:`jaxbp.checked` flags them).

    Example:
      >>> import jax.numpy as jnp, jaxbp
      >>> table = jnp.arange(6.0).reshape(3, 2)
      >>> jaxbp.embedding(jnp.array([2, 0, 2]), table).tolist()
      [[4.0, 5.0], [0.0, 1.0], [4.0, 5.0]]
    """
    ids, table = _validate(ids, table)
    ids = _wide(ids)
    _check_ids(ids, table.shape[0])
    return _embedding(ids, table)


_embedding = op_vjp(embedding)  # reads embedding.fwd / .bwd when JAX traces it
