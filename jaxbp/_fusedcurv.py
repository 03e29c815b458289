"""The fused head's curvature rules: :mod:`jaxbp._losscurv`'s four, through ``z = x·w + b``,
chunk by chunk over the vocabulary, so that no ``(n, v)`` array exists (the exact factor
aside).

Index letters::

    n  tokens (any leading axes of x flatten into n)     d  model dimension
    v  vocabulary                                        k  one chunk of vocabulary columns

The logits ``z = cap·tanh(z̃/cap)`` of ``z̃ = x·w + b`` (``z = z̃`` without a softcap), and
``J`` the map from ``(x, w, b)`` to them: ``ż = (ẋ·w + x·ẇ + ḃ) ⊙ (1 − t²)``,
``t = tanh(z̃/cap)``. ``H = α·(diag(p) − p·pᵀ) + 2λ·p·pᵀ`` at ``z`` as for
:func:`jaxbp.softmax_cross_entropy` (every option: ``α = Σ_v u + 2λ·lse``)::

    ggn_vp(res, (ẋ, ẇ, None, ḃ, None, None), g)   two passes over the chunks: first
        ⟨p, ż⟩ (n,) over the whole vocabulary, then per chunk
        dz_k = g·(α·p_k⊙ż_k + (2λ − α)·⟨p,ż⟩·p_k) and its Jᵀ (below)
    logits_bwd(res, dz (n, v))   dz̃_k = dz_k ⊙ (1 − t_k²);  dx = Σ_k dz̃_k·w_kᵀ "nk,dk->nd",
        dw_k = xᵀ·dz̃_k "nd,nk->dk", db_k = Σ_n dz̃_k "nk->k"
    sample_bwd(res, g, key)      ŷ ~ p by Gumbel-max, one pass: an online argmax of
        z_k + Gumbel noise over the chunks; then the kernel's recompute backward
        (:func:`jaxbp._xent.dlogits`) of the column s = √g·(√α·(p − onehot(ŷ)) + ε·√(2λ)·p)
    hessian_factor(res, g)       S (n, v, k) from the whole (n, v) probabilities: exact, for
        small vocabularies only (n·v·(v + 1) numbers); the Monte-Carlo column is the route
        for a large v

``ż_k``, ``p_k`` and ``t_k`` are recomputed per chunk from ``x``, ``w`` and the saved
``lse (n,)``, which both strategies' residuals hold. The cotangents come back as the op's
``bwd``'s: ``(dx, dw, None, db, None, None)`` (class weights do not reach the logits).
The noise of chunk ``[start, start + k)`` comes from ``fold_in(key, start)``: the labels
drawn depend on the key and on the chunk length.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import _checks, _vma, _xent
from ._losscurv import softmax_factor, tangents_of
from ._xent import cols, logits, mm, over_chunks

__all__ = ["rules"]

_ARGS = ("x", "w", "labels", "b", "where", "class_weights")
_STATIC = ("ignore_index", "softcap", "chunk_size", "accum_dtype", "strategy", "default_chunk")


class _Head(NamedTuple):
    """The residuals flattened to rows, and the row quantities every rule needs."""

    x: jax.Array  # (n, d)
    w: jax.Array  # (d, v)
    b: jax.Array | None  # (v,)
    lse: jax.Array  # (n,)
    alpha: jax.Array  # Σ_v u + 2λ·lse   (n,)
    gv: jax.Array  # g, 0 on masked rows   (n,)
    valid: jax.Array
    bad: jax.Array
    acc: jnp.dtype
    softcap: float | None
    size: int  # vocabulary columns per chunk
    vma: frozenset


def _head(res, g, *, ignore_index, label_smoothing, z_loss, softcap, chunk_size, accum_dtype,
          strategy, default_chunk):  # fmt: skip
    x, w, b, labels, where, cw, lse, _ = res
    acc = _xent.acc_dtype(accum_dtype, x.dtype)
    xf, lf, wf = _xent.flat_rows(x, labels, where)
    v = w.shape[1]
    eps = _checks.as_scalar(label_smoothing, acc)
    valid, bad, su, _ = _xent.row_terms(
        lf, wf, cw, v=v, eps=eps, ignore_index=ignore_index, acc=acc
    )
    alpha = su + _checks.scaled(_checks.as_scalar(z_loss, acc), 2.0 * lse)
    gv = jnp.zeros(lf.shape, acc)
    if g is not None:
        if jnp.shape(g) != labels.shape:
            raise ValueError(f"g: expected the batch shape {labels.shape}, got {jnp.shape(g)}")
        gv = jnp.where(valid, g.reshape(-1).astype(acc), 0.0)
    # "forward" counts tokens with chunk_size: the vocabulary chunk is then the default one.
    size = _xent.chunk(None if strategy == "forward" else chunk_size, v, default_chunk)
    vma = _vma.union(x, w, b, labels, where, cw, lse, g)
    return _Head(xf, w, b, lse, alpha, gv, valid, bad, acc, softcap, size, vma)


def _chunk_logits(h: _Head, start, k):
    """``z_k (n,k)``, ``t_k`` (or ``None``) and ``w_k (d,k)`` for the columns from ``start``."""
    w_k = cols(h.w, start, k, 1)
    b_k = None if h.b is None else cols(h.b, start, k, 0)
    z, t = logits(h.x, w_k, b_k, h.acc, h.softcap)
    return z, t, w_k


def _rows(*rows):
    return tuple(r[:, None] for r in rows)


def _transpose(h: _Head, dz_of):
    """``Jᵀ`` chunk by chunk: ``(dx (n,d), dw (d,v), db (v,) | None)`` in the accumulation
    dtype, from ``dz_of(start, k) -> (dz̃_k (n,k), w_k)``, the chunk's cotangent at ``z̃``."""
    xt = _xent.transposed_for_dw(h.x)

    def body(start, k, carry):
        dx, dw, db = carry
        dz, w_k = dz_of(start, k)
        dz_in = dz.astype(h.w.dtype)  # as the op's backward: dlogits in the input dtype
        dx = dx + mm(dz_in, w_k, (1, 1), h.acc)  # "nk,dk->nd"
        dw_k = mm(xt, dz_in, (1, 0), h.acc)  # "dn,nk->dk"
        dw = lax.dynamic_update_slice_in_dim(dw, dw_k, start, 1)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, jnp.sum(dz, axis=0), start, 0)  # "nk->k"
        return dx, dw, db

    carry = (
        jnp.zeros(h.x.shape, h.acc),
        jnp.zeros(h.w.shape, h.acc),
        None if h.b is None else jnp.zeros(h.b.shape, h.acc),
    )
    return over_chunks(h.w.shape[1], h.size, body, carry, h.vma)


def _cotangents(res, h: _Head, grads):
    """``(dx, dw, None, db, None, None)``: each in its argument's shape and dtype."""
    x, w, b = res[0], res[1], res[2]
    dx, dw, db = grads
    db = None if b is None else db.astype(b.dtype)
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype), None, db, None, None


# ------------------------------------------------------------------------------- rules


@functools.partial(jax.jit, static_argnames=_STATIC)
def _ggn_vp(res, tangents, g, **options):
    x, w, b = res[0], res[1], res[2]
    xdot, wdot, bdot = tangents_of(
        "linear_softmax_cross_entropy", tangents, _ARGS, (0, 1, 3), (x, w, b)
    )  # fmt: skip
    if b is None and bdot is not None:
        raise TypeError("tangents[3] (b): expected None, the op was called without a bias")
    h = _head(res, g, **options)
    xdot = None if xdot is None else xdot.reshape(h.x.shape)
    z_loss = options["z_loss"]

    def zdot_of(start, k, w_k, t):
        """``ż_k = (ẋ·w_k + x·ẇ_k + ḃ_k) ⊙ (1 − t²)  (n,k)``."""
        zd = jnp.zeros((h.x.shape[0], k), h.acc)
        if xdot is not None:
            zd = zd + mm(xdot, w_k, (1, 0), h.acc)  # "nd,dk->nk"
        if wdot is not None:
            zd = zd + mm(h.x, cols(wdot, start, k, 1), (1, 0), h.acc)
        if bdot is not None:
            zd = zd + cols(bdot, start, k, 0).astype(h.acc)
        return zd if t is None else zd * (1.0 - t * t)

    def first(start, k, pz):  # ⟨p, ż⟩ over the whole vocabulary    (n,)
        z, t, w_k = _chunk_logits(h, start, k)
        p = jnp.exp(z - h.lse[:, None])
        return pz + jnp.sum(p * zdot_of(start, k, w_k, t), axis=1)

    vma = h.vma | _vma.union(*tangents)
    pz = over_chunks(h.w.shape[1], h.size, first, jnp.zeros(h.lse.shape, h.acc), vma)
    coef = _two_lam(z_loss, h.acc) - h.alpha  # (n,)

    def dz_of(start, k):  # g·(p·(α·ż + (2λ − α)·⟨p,ż⟩) − 0), masked, through the softcap
        z, t, w_k = _chunk_logits(h, start, k)
        scale = h.alpha[:, None] * zdot_of(start, k, w_k, t) + (coef * pz)[:, None]
        lse, gv, valid, bad = _rows(h.lse, h.gv, h.valid, h.bad)
        return _xent.dlogits(z, t, 0.0, lse, scale, gv, valid, bad), w_k

    return _cotangents(res, h, _transpose(h._replace(vma=vma), dz_of))


def _two_lam(z_loss, dtype):
    return 0.0 if _checks.is_static_zero(z_loss) else 2.0 * _checks.as_scalar(z_loss, dtype)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "column"))
def _hessian_factor(res, g, *, column, **options):
    h = _head(res, g, **options)
    z, _ = logits(h.x, h.w, h.b, h.acc, h.softcap)  # (n, v): the exact factor needs it whole
    p = jnp.exp(z - h.lse[:, None])
    s = softmax_factor(p, h.alpha, h.gv, options["z_loss"], column=column)
    s = jnp.where(h.valid[:, None, None], s, 0.0)
    s = jnp.where(h.bad[:, None, None], jnp.nan, s)
    labels = res[3]
    return s.reshape(*labels.shape, *s.shape[1:]).astype(res[0].dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _logits_bwd(res, dz, **options):
    h = _head(res, None, **options)
    v = h.w.shape[1]
    want = (*res[3].shape, v)
    if jnp.shape(dz) != want:
        raise ValueError(f"dz: expected the shape of the logits {want}, got {jnp.shape(dz)}")
    dzf = dz.reshape(-1, v)

    def dz_of(start, k):
        w_k = cols(h.w, start, k, 1)
        d = cols(dzf, start, k, 1).astype(h.acc)
        if h.softcap is not None:  # through z = cap·tanh(z̃/cap): the chunk's t is needed
            _, t, _ = _chunk_logits(h, start, k)
            d = d * (1.0 - t * t)
        return d, w_k

    return _cotangents(res, h._replace(vma=h.vma | _vma.union(dz)), _transpose(h, dz_of))


def _draw(h: _Head, key, z_loss):
    """``ŷ (n,)`` ~ p by an online Gumbel-max over the chunks, and the z-loss signs ``ε``."""
    key_y, key_e = jax.random.split(key)

    def body(start, k, carry):
        best, arg = carry
        z, _, _ = _chunk_logits(h, start, k)
        score = z + jax.random.gumbel(jax.random.fold_in(key_y, start), z.shape, h.acc)
        top = jnp.max(score, axis=1)
        take = top > best
        at = jnp.argmax(score, axis=1).astype(arg.dtype) + start
        return jnp.where(take, top, best), jnp.where(take, at, arg)

    n = h.x.shape[0]
    init = (jnp.full((n,), -jnp.inf, h.acc), jnp.zeros((n,), jnp.int32))
    _, y_hat = over_chunks(h.w.shape[1], h.size, body, init, h.vma)
    sign = jax.random.rademacher(key_e, (n,), h.acc)
    return y_hat, sign


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_labels(res, key, **options):
    h = _head(res, None, **options)
    y_hat, sign = _draw(h, key, options["z_loss"])
    shape = res[3].shape
    return y_hat.reshape(shape), sign.reshape(shape)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_bwd(res, g, key, **options):
    h = _head(res, g, **options)
    z_loss = options["z_loss"]
    y_hat, sign = _draw(h, key, z_loss)
    root = jnp.sqrt(h.alpha)  # NaN where α < 0: no real factor
    scale = root
    if not _checks.is_static_zero(z_loss):
        scale = scale + sign * jnp.sqrt(_two_lam(z_loss, h.acc))

    def dz_of(start, k):  # √g·(p·(√α + ε·√(2λ)) − √α·onehot(ŷ)), the kernel's dlogits
        z, t, w_k = _chunk_logits(h, start, k)
        _, hit = _xent.smoothed(y_hat, start, k, 0.0, h.w.shape[1], h.acc)
        rows = _rows(h.lse, scale, jnp.sqrt(h.gv), h.valid, h.bad)
        u = root[:, None] * hit.astype(h.acc)
        return _xent.dlogits(z, t, u, *rows), w_k

    return _cotangents(res, h, _transpose(h, dz_of))


def rules(default_chunk: int) -> dict:
    """The fused head's ``curvature=`` mapping for :func:`jaxbp._op.declare`, and
    ``sample_labels(res, key, **options) -> (ŷ, ε)``, the draws ``sample_bwd`` makes.

    ``default_chunk``: the op's vocabulary chunk when ``chunk_size`` is ``None``. The
    options are the op's backward's (``ignore_index``, ``label_smoothing``, ``z_loss``,
    ``softcap``, ``chunk_size``, ``accum_dtype``, ``strategy``)."""

    def options(ignore_index=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
                chunk_size=None, accum_dtype=None, strategy="recompute"):  # fmt: skip
        return dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                    softcap=softcap, chunk_size=chunk_size, accum_dtype=accum_dtype,
                    strategy=strategy, default_chunk=default_chunk)  # fmt: skip

    def ggn_vp(res, tangents, g, **kw):
        """``(dx, dw, None, db, None, None) = Jᵀ·(g·H)·J·(ẋ, ẇ, ḃ)``, chunked (two passes)."""
        return _ggn_vp(res, tuple(tangents), g, **options(**kw))

    def hessian_factor(res, g, **kw):
        """``S (n…, v, k)``, ``S·Sᵀ = g·H`` at the logits; forms the ``(n, v)``
        probabilities (small vocabularies); ``k = v + 1`` unless ``z_loss`` is a Python 0."""
        column = not _checks.is_static_zero(kw.get("z_loss", 0.0))
        return _hessian_factor(res, g, column=column, **options(**kw))

    def logits_bwd(res, dz, **kw):
        """``(dx, dw, None, db, None, None) = Jᵀ·dz`` for ``dz (n…, v)`` at the logits."""
        return _logits_bwd(res, dz, **options(**kw))

    def sample_bwd(res, g, key, **kw):
        """``Jᵀ·s`` for one Monte-Carlo column ``s`` (``ŷ ~ p``), never an ``(n, v)`` array."""
        return _sample_bwd(res, g, key, **options(**kw))

    def sample_labels(res, key, **kw):
        """``(ŷ (n…), ε (n…))``: the labels and z-loss signs ``sample_bwd`` draws from ``key``."""
        return _sample_labels(res, key, **options(**kw))

    named = {"ggn_vp": ggn_vp, "hessian_factor": hessian_factor, "logits_bwd": logits_bwd,
             "sample_bwd": sample_bwd}  # fmt: skip
    for name, fn in named.items():
        fn.__name__ = fn.__qualname__ = f"linear_softmax_cross_entropy_{name}"
    sample_labels.__name__ = "linear_softmax_cross_entropy_sample_labels"
    return {**named, "sample_labels": sample_labels}
