"""The softmax cross-entropy kernel shared by :func:`jaxbp.softmax_cross_entropy` and the
vocabulary-parallel loss (:mod:`jaxbp.parallel`): its forward, its hand-written backward and
its forward-mode rule, on one device or on a shard of the classes.

Index letters::

    n  batch (any leading axes)
    c  classes (this shard's, ``c_local``, on a mesh)

With ``p = softmax(z)``, ``u = w ⊙ y'`` (class weights times the smoothed labels) and
``lse = log Σ_c e^{z_c}`` (:mod:`jaxbp.losses` derives them)::

    loss = Σ_c u_c (lse − z_c) + λ·lse²                              (n,)
    dz   = g[:,None] · (p·(Σ_c u + 2λ·lse)[:,None] − u)              "n,nc->nc"
    loṡs = ⟨p·(Σ_c u + 2λ·lse) − u, ż⟩ + ⟨u̇, lse − z⟩                "nc,nc->n"

The forward-mode rule is the backward's ``dz`` for ``g = 1`` against the logits' tangent
``ż (n,c)`` (a row of the ``(n, c)`` Jacobian of the loss is that ``dz``), plus the labels'
and class weights' part through ``u̇ = (1 − ε)·w ⊙ ẏ + ẇ ⊙ y'``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _checks
from ._vma import LOCAL

__all__ = ["ce_backward", "ce_forward", "ce_tangent", "valid_rows"]


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


def _safe_mul(u, v):
    """``u·v`` with ``0·∞ = 0``: a label weight of 0 ignores that class entirely."""
    return jnp.where(u == 0, jnp.zeros_like(u), u * v)


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
    m = _shift(z, m, red)
    zs = z - m[..., None]  # (n,c), shifted: the max is exactly 0
    first = None if red.axis is None else red.first_column(c_local, labels.dtype)
    u = _labels_matrix(labels, c_local, z.dtype, label_smoothing, c=c, first=first)  # y'
    if class_weights is not None:
        u = u * _acc(class_weights).astype(z.dtype)  # u = w ⊙ y'
    valid, bad = _rows(labels, where, ignore_index, z.shape[:-1], c)
    return zs, m, u, valid, bad


def _shift(z, m=None, red=LOCAL):
    """``m = max_c z (n,)`` over every class shard, unless given. A shift only: every
    quantity is exact in it, so JAX's derivative of the rule (forward over reverse) leaves
    it out instead of splitting ties at the max."""
    return jax.lax.stop_gradient(red.max(jnp.max(z, axis=-1))) if m is None else m


def _rows(labels, where, ignore_index, batch_shape, c):
    """``(valid, bad) (n,)``: the rows that count, and among them those whose integer label
    is out of ``[0, c)`` (none for probability labels)."""
    valid = valid_rows(labels, where, ignore_index=ignore_index, batch_shape=batch_shape)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return valid, _bad_labels(labels, c, ignore_index) & valid
    return valid, jnp.zeros(batch_shape, bool)


def _by_ids(labels, class_weights, c, red) -> bool:
    """The common case: integer ids, no class weights, every class on this device. Then
    ``Σ_c u = 1`` and ``u = (1 − ε)·onehot + ε/c`` need no ``(n, c)`` array: the loss reads
    ``z_y`` by a gather and a row mean, the backward builds ``u`` inside its one fusion."""
    return (
        red.axis is None and c is None and class_weights is None
        and jnp.issubdtype(labels.dtype, jnp.integer)
    )  # fmt: skip


def _ids_terms(logits, labels, where, ignore_index, m=None):
    """``(z, m, e = exp(z − m), valid, bad)`` for integer ids (``z − m`` is never an array
    of its own: the subtraction fuses into the exponential, as JAX's own softmax)."""
    z = _acc(logits)
    m = _shift(z, m)
    valid, bad = _rows(labels, where, ignore_index, z.shape[:-1], z.shape[-1])
    return z, m, jnp.exp(z - m[..., None]), valid, bad


def _ce_forward_ids(logits, labels, where, *, label_smoothing, ignore_index, z_loss):
    """:func:`ce_forward` for :func:`_by_ids`: ``loss = lse − (1 − ε)·z_y − ε·mean_c z``."""
    z, m, e, valid, bad = _ids_terms(logits, labels, where, ignore_index)
    lse_s = jnp.log(jnp.sum(e, axis=-1))
    ids = jnp.clip(labels, 0, z.shape[-1] - 1)[..., None]
    zy = jnp.take_along_axis(z, ids, axis=-1)[..., 0] - m  # z_y − m  (n,)
    if _checks.is_static_zero(label_smoothing):
        loss = lse_s - zy
    else:
        eps = _checks.as_scalar(label_smoothing, z.dtype)
        # 0·(−inf) = 0 (a class with no label mass is ignored, as _safe_mul does)
        loss = lse_s - _checks.scaled(1.0 - eps, zy) - _checks.scaled(eps, jnp.mean(z, -1) - m)
    if not _checks.is_static_zero(z_loss):
        lse = lse_s + m
        loss = loss + _checks.scaled(_checks.as_scalar(z_loss, lse.dtype), lse * lse)
    loss = jnp.where(valid, loss, 0.0)
    return jnp.where(bad, jnp.nan, loss), m, lse_s, None


def _ce_backward_ids(logits, labels, where, lse_s, g, *, label_smoothing, ignore_index,
                     z_loss, m=None):  # fmt: skip
    """:func:`ce_backward` for :func:`_by_ids`: ``dz = g·(p·(1 + 2λ·lse) − u)``, ``u`` from
    an iota comparison inside the same fusion, ``p = e^{z − m}·e^{−lse_s}``: the forward's
    own exponential, which XLA computes once when forward and backward are one program."""
    z, m, e, valid, bad = _ids_terms(logits, labels, where, ignore_index, m)
    gv = jnp.where(valid, g.astype(z.dtype), 0.0)[..., None]
    p = e * jnp.exp(-lse_s)[..., None]
    hit = labels[..., None] == jnp.arange(z.shape[-1], dtype=labels.dtype)
    if _checks.is_static_zero(label_smoothing):
        u = hit.astype(z.dtype)
    else:
        eps = _checks.as_scalar(label_smoothing, z.dtype)
        u = jnp.where(hit, 1.0 - eps, 0.0) + eps / z.shape[-1]
    if _checks.is_static_zero(z_loss):
        dz = gv * (p - u)
    else:
        scale = 1.0 + _checks.scaled(_checks.as_scalar(z_loss, z.dtype), 2.0 * (lse_s + m))
        dz = gv * (p * scale[..., None] - u)
    dz = jnp.where(valid[..., None], dz, 0.0)
    return jnp.where(bad[..., None], jnp.nan, dz).astype(logits.dtype), None, None


def ce_forward(logits, labels, where, class_weights, *, label_smoothing, ignore_index, z_loss,
               c=None, red=LOCAL):  # fmt: skip
    """The forward of softmax cross-entropy: ``(loss, m, lse_s, Σ_c u)``, each ``(n,)``.

    ``lse_s = lse − m = log Σ_c e^{z_c − m}``. On one device (``red`` = :data:`LOCAL`)
    ``Σ_c u`` is ``None`` (the backward recomputes it); over class shards it is reduced here,
    with the loss terms, in one ``psum``, and saved for the backward.
    """
    if _by_ids(labels, class_weights, c, red):
        return _ce_forward_ids(logits, labels, where, label_smoothing=label_smoothing,
                               ignore_index=ignore_index, z_loss=z_loss)  # fmt: skip
    zs, m, u, valid, bad = _ce_parts(
        logits, labels, where, class_weights, label_smoothing, ignore_index, c=c, red=red
    )
    lse_s = jnp.log(red.sum(jnp.sum(jnp.exp(zs), axis=-1)))  # in [0, log c] for finite rows
    loss = jnp.sum(_safe_mul(u, lse_s[..., None] - zs), axis=-1)  # −Σ u log p
    su = None
    if red.axis is not None:  # Σ_c u·(lse − z) and Σ_c u over every shard: one all-reduce
        loss, su = red.sum(jnp.stack([loss, jnp.sum(u, axis=-1)]))
    if not _checks.is_static_zero(z_loss):
        lse = lse_s + m  # log Σ e^z  (n,)
        loss = loss + _checks.scaled(_checks.as_scalar(z_loss, lse.dtype), lse * lse)
    loss = jnp.where(valid, loss, 0.0)
    return jnp.where(bad, jnp.nan, loss), m, lse_s, su


def ce_backward(logits, labels, where, class_weights, lse_s, g, *, label_smoothing,
                ignore_index, z_loss, c=None, m=None, su=None, red=LOCAL):  # fmt: skip
    """The backward: ``(dlogits, dlabels, dclass_weights)`` of this shard's classes.

    ``dz = g[:,None]·(p·(Σu + 2λ·lse)[:,None] − u)``; no communication when ``m`` and ``su``
    are given. ``dclass_weights`` is summed over this device's rows only.
    """
    if _by_ids(labels, class_weights, c, red) and su is None:
        return _ce_backward_ids(logits, labels, where, lse_s, g, label_smoothing=label_smoothing,
                                ignore_index=ignore_index, z_loss=z_loss, m=m)  # fmt: skip
    zs, m, u, valid, bad = _ce_parts(
        logits, labels, where, class_weights, label_smoothing, ignore_index, c=c, m=m, red=red
    )
    gv = jnp.where(valid, g.astype(zs.dtype), 0.0)[..., None]  # (n,1); masked rows: exactly 0
    nll = lse_s[..., None] - zs  # −log p (n,c)
    p = jnp.exp(-nll)  # (n,c), recomputed
    scale = jnp.sum(u, axis=-1) if su is None else su  # Σ_c u_c  (n,)
    if not _checks.is_static_zero(z_loss):  # Σ_c u_c + 2λ·lse
        scale = scale + _checks.scaled(_checks.as_scalar(z_loss, scale.dtype), 2.0 * (lse_s + m))
    dz = gv * (p * scale[..., None] - u)  # "n,nc->nc"
    dz = jnp.where(valid[..., None], dz, 0.0)
    dz = jnp.where(bad[..., None], jnp.nan, dz).astype(logits.dtype)

    dlabels = None
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        w = 1.0 if class_weights is None else _acc(class_weights).astype(zs.dtype)
        dy = (1.0 - _checks.as_scalar(label_smoothing, zs.dtype)) * gv * w * nll
        dlabels = jnp.where(valid[..., None], dy, 0.0).astype(labels.dtype)
    dweights = None
    if class_weights is not None:
        first = None if red.axis is None else red.first_column(zs.shape[-1], labels.dtype)
        y = _labels_matrix(labels, zs.shape[-1], zs.dtype, label_smoothing, c=c, first=first)
        per_row = jnp.where(valid[..., None], _safe_mul(y, gv * nll), 0.0)
        dweights = per_row.reshape(-1, zs.shape[-1]).sum(0)  # "nc->c"
    return dz, dlabels, dweights


def ce_tangent(logits, labels, where, class_weights, lse_s, tangents, *, label_smoothing,
               ignore_index, z_loss):  # fmt: skip
    """The forward-mode rule: the loss's tangent ``(n,)`` for the tangents ``(ż (n,c), ẏ
    (n,c) or None, None, ẇ (c,) or None)`` (``None``: integer labels, the mask, an absent
    or zero tangent), linear in them; 0 on masked rows, NaN on bad ones (as the loss)::

        loṡs = Σ_c (p·(Σu + 2λ·lse) − u)_c ż_c + Σ_c ((1 − ε)·w ⊙ ẏ + ẇ ⊙ y')_c (lse − z_c)
    """
    dz, dy, _, dw = tangents
    zs, m, u, valid, bad = _ce_parts(
        logits, labels, where, class_weights, label_smoothing, ignore_index
    )
    nll = lse_s[..., None] - zs  # −log p = lse − z  (n,c)
    out = jnp.zeros(zs.shape[:-1], zs.dtype)
    if dz is not None:
        scale = jnp.sum(u, axis=-1)  # Σ_c u_c + 2λ·lse   (n,)
        if not _checks.is_static_zero(z_loss):
            scale = scale + _checks.scaled(_checks.as_scalar(z_loss, scale.dtype),
                                           2.0 * (lse_s + m))  # fmt: skip
        dz1 = jnp.exp(-nll) * scale[..., None] - u  # the backward's dz for g = 1
        out = out + jnp.sum(dz1 * _acc(dz), axis=-1)  # "nc,nc->n"
    du = 0.0  # u̇ = (1 − ε)·w ⊙ ẏ + ẇ ⊙ y'   (n,c)
    if dy is not None and not jnp.issubdtype(labels.dtype, jnp.integer):
        w = 1.0 if class_weights is None else _acc(class_weights).astype(zs.dtype)
        du = du + (1.0 - _checks.as_scalar(label_smoothing, zs.dtype)) * w * _acc(dy)
    if dw is not None and class_weights is not None:
        y = _labels_matrix(labels, zs.shape[-1], zs.dtype, label_smoothing)
        du = du + y * _acc(dw).astype(zs.dtype)
    if not isinstance(du, float):
        out = out + jnp.sum(_safe_mul(du, nll), axis=-1)  # "nc,nc->n"
    out = jnp.where(valid, out, 0.0)
    return jnp.where(bad, jnp.nan, out)
