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
from ._contrib import Full, OneHot, Outer, Rows, group
from ._op import declare, op_vjp

__all__ = [
    "embedding", "embedding_fwd", "embedding_bwd", "embedding_jvp", "embedding_example_grads",
    "position_embedding", "position_embedding_fwd", "position_embedding_bwd",
    "position_embedding_jvp", "position_embedding_example_grads",
]  # fmt: skip


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


@jax.jit
def embedding_jvp(res, tangents):
    """Forward mode: ``ȯut (n..., d) = ṫable[ids]`` (a gather of the tangent: the lookup is
    linear in the table), from the tangents ``(None, ṫable (v, d))``; NaN rows stay NaN."""
    ids, shape = res
    dtable = tangents[1]
    bad = _bad(ids, shape.shape[0])
    rows = dtable[jnp.where(bad, 0, ids)]
    return jnp.where(bad[..., None], jnp.nan, rows).astype(shape.dtype)


def embedding_example_grads(res, g: jax.Array, *, examples: int):
    """Per-example rule: ``dtable_k = Σ_t onehot(id_t) g_tᵀ (v, d)``, never formed per
    example: ``Outer(OneHot ids (n,T), Rows g (n,T,d))``, whose squared norm is
    ``Σ_{t,s} [id_t = id_s]·⟨g_t, g_s⟩`` (repeated ids add before the norm)."""
    ids, shape = res
    return {"table": Outer(OneHot(group(ids, examples, 0, "ids"), shape.shape[0]),
                           Rows(group(g, examples, 1, "g")))}  # fmt: skip


@declare(
    fwd=embedding_fwd, bwd=embedding_bwd, jvp=embedding_jvp, per_example=("ids",), example_ndim=0,
    example_grads=embedding_example_grads,
)  # fmt: skip
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


# ------------------------------------------------------------------- position embedding


def _validate_positions(x, table):
    x = _checks.floating("x", x)
    table = _checks.floating("table", table)
    _checks.min_rank("x", x, 2, "(..., t, d)")
    if table.ndim != 2:
        raise ValueError(f"table: expected shape (context, d), got {table.shape}")
    t, d = x.shape[-2:]
    if table.shape[1] != d or t > table.shape[0]:
        raise ValueError(
            f"x: expected (..., t, d) with d = {table.shape[1]} and t ≤ context = "
            f"{table.shape[0]} of table {table.shape}, got x shape {x.shape}"
        )
    if table.dtype != x.dtype:
        raise TypeError(f"table: expected the dtype of x ({x.dtype}), got {table.dtype}")
    return x, table


@jax.jit
def position_embedding_fwd(x: jax.Array, table: jax.Array):
    """Forward: ``y (..., t, d) = x + table[:t]``; returns ``(y, zeros (context, 0))`` (the
    backward needs only the table's row count and dtype)."""
    x, table = _validate_positions(x, table)
    t = x.shape[-2]
    return x + table[:t], jnp.zeros((table.shape[0], 0), table.dtype)


@jax.jit
def position_embedding_bwd(res, g: jax.Array):
    """Backward: ``(dx = g, dtable (context, d))`` with ``dtable[:t] = Σₙ g`` ``"ntd->td"``
    (float32 accumulation for half precision) and zeros below row ``t``."""
    shape = res
    context, t, d = shape.shape[0], g.shape[-2], g.shape[-1]
    rows = jnp.sum(g.reshape(-1, t, d), axis=0, dtype=_checks.accum_dtype(g.dtype))
    return g, jnp.pad(rows, ((0, context - t), (0, 0))).astype(shape.dtype)


@jax.jit
def position_embedding_jvp(res, tangents):
    """Forward mode: ``ẏ (..., t, d) = ẋ + ṫable[:t]``, from the tangents ``(ẋ, ṫable)``."""
    del res
    dx, dtable = tangents
    return dx + dtable[: dx.shape[-2]]


def position_embedding_example_grads(res, g: jax.Array, *, examples: int):
    """Per-example rule: ``dtable_k[:t] = Σ g_k`` over the example's other axes, ``(n,
    context, d)``: the size of one row of activations per example, formed as it is."""
    context, t = res.shape[0], g.shape[-2]
    rows = jnp.sum(group(g, examples, 2, "g"), axis=1, dtype=_checks.accum_dtype(g.dtype))
    return {"table": Full(jnp.pad(rows, ((0, 0), (0, context - t), (0, 0))))}


@declare(
    fwd=position_embedding_fwd, bwd=position_embedding_bwd, jvp=position_embedding_jvp,
    per_example=("x",), example_ndim=2, jvp_takes_none=False,  # an addition: zeros are free
    example_grads=position_embedding_example_grads,
)  # fmt: skip
def position_embedding(x: jax.Array, table: jax.Array) -> jax.Array:
    """Add learned position embeddings: ``x + table[:t]`` for ``x (..., t, d)``.

    A GPT's ``tok[ids] + pos[:t]`` is ``position_embedding(embedding(ids, tok), pos)``. The
    backward sums the rows' gradients into the first ``t`` rows of the table.

    Args:
      x: ``(..., t, d)``, floating; the leading axes are the batch.
      table: ``(context, d)`` with ``context ≥ t``, the dtype of ``x``.

    Returns:
      ``(..., t, d)`` in the dtype of ``x``.

    Raises:
      TypeError: non-floating or mismatched dtypes.
      ValueError: ``x`` of rank < 2, a table that is not ``(context, d)``, or ``t > context``.

    Example:
      >>> import jax.numpy as jnp, jaxbp
      >>> jaxbp.position_embedding(jnp.zeros((1, 2, 3)), jnp.arange(12.0).reshape(4, 3)).tolist()
      [[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]]
    """
    x, table = _validate_positions(x, table)
    return _positions(x, table)


_positions = op_vjp(position_embedding)  # reads position_embedding.fwd / .bwd when traced
