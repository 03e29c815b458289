"""What every softmax cross-entropy rule shares: the labels, the rows that count, the pieces
at the logits (the loss's backward, its curvature rules, the vocabulary-parallel loss).

Index letters::

    n  batch (any leading axes)
    c  classes (the last axis; this shard's columns on a class shard)
"""

from __future__ import annotations

import jax.numpy as jnp

from . import _checks
from ._vma import LOCAL

__all__ = ["valid_rows"]  # and _labels_matrix, _bad_labels, _ce_parts for the rules


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


def _labels_matrix(labels, c_local, dtype, label_smoothing, *, c=None, first=None):
    """Smoothed labels ``y' (n, c)`` from ids ``(n,)`` or probabilities ``(n, c)``.

    On a class shard: the columns ``[first, first + c_local)`` of the ``c`` classes (ids are
    global; probability labels come as the shard's own slice)."""
    c = c_local if c is None else c
    if jnp.issubdtype(labels.dtype, jnp.integer):
        ids = jnp.arange(c_local, dtype=labels.dtype)
        if first is not None:
            ids = ids + first
        y = (labels[..., None] == ids).astype(dtype)  # one-hot, only on the owning shard
    else:
        y = labels.astype(dtype)
    if not _checks.is_static_zero(label_smoothing):  # traced: the term stays (0 gives y)
        eps = _checks.as_scalar(label_smoothing, dtype)
        y = (1.0 - eps) * y + eps / c
    return y


def valid_rows(labels, where=None, *, ignore_index=None, batch_shape=None):
    """Boolean mask ``(n,)`` of the rows that count: ``where`` and not ``ignore_index``.

    Integer labels equal to ``ignore_index`` are excluded. Use it for a mean over valid rows:
    ``loss.sum() / jnp.maximum(valid_rows(...).sum(), 1)``.
    """
    if batch_shape is None:
        batch_shape = (
            labels.shape if jnp.issubdtype(labels.dtype, jnp.integer) else labels.shape[:-1]
        )
    valid = jnp.ones(batch_shape, bool) if where is None else jnp.asarray(where, bool)
    if ignore_index is not None and jnp.issubdtype(labels.dtype, jnp.integer):
        valid = valid & (labels != ignore_index)
    return valid


def _bad_labels(labels, c, ignore_index):
    """Integer labels outside ``[0, c)`` that are not ``ignore_index``."""
    bad = (labels < 0) | (labels >= c)
    if ignore_index is not None:
        bad = bad & (labels != ignore_index)
    return bad


def _ce_parts(logits, labels, where, class_weights, label_smoothing, ignore_index, *, c=None,
              m=None, red=LOCAL):  # fmt: skip
    """What forward and backward share: ``zs = z − m, m, u, valid, bad`` in the accumulation
    dtype.

    ``m = max_c z (n,)``: over every class shard (``red``), unless given (the backward of the
    vocab-parallel loss saves it). ``logits`` and ``class_weights`` are this shard's classes
    (all of them on one device), ``c`` the number of classes in all. A row all −inf, or
    holding +inf, makes ``zs`` (and the row) NaN.
    """
    z = _acc(logits)
    c_local = z.shape[-1]
    c = c_local if c is None else c
    if m is None:
        m = red.max(jnp.max(z, axis=-1))
    zs = z - m[..., None]  # (n,c), shifted: the max is exactly 0
    first = None if red.axis is None else red.first_column(c_local, labels.dtype)
    u = _labels_matrix(labels, c_local, z.dtype, label_smoothing, c=c, first=first)  # y'
    if class_weights is not None:
        u = u * _acc(class_weights).astype(z.dtype)  # u = w ⊙ y'
    valid = valid_rows(labels, where, ignore_index=ignore_index, batch_shape=z.shape[:-1])
    if jnp.issubdtype(labels.dtype, jnp.integer):
        bad = _bad_labels(labels, c, ignore_index) & valid
    else:
        bad = jnp.zeros(z.shape[:-1], bool)
    return zs, m, u, valid, bad
