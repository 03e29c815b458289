"""The fused head's curvature rules: :mod:`jaxbp._losscurv`'s four at the head's logits
``z̃ = x·w + b``, chunk by chunk over the vocabulary, so that no ``(n, v)`` array exists
(the exact factor aside).

Index letters::

    n  tokens (any leading axes of x flatten into n)     d  model dimension
    v  vocabulary                                        k  one chunk of vocabulary columns

``J`` maps ``(x, w, b)`` to ``z̃``: ``ż̃ = ẋ·w + x·ẇ + ḃ``, its transpose
``dx = dz̃·wᵀ "nv,dv->nd"``, ``dw = xᵀ·dz̃ "nd,nv->dv"``, ``db = Σ_n dz̃ "nv->v"``. The loss
of a row is softmax cross-entropy ``ℓ(z)`` at ``z = c(z̃)``, ``c = cap·tanh(·/cap)`` with a
softcap, the identity without. With ``t = tanh(z̃/cap)``, ``c' = 1 − t² =: d`` and
``c'' = −(2/cap)·t·(1 − t²)``, the chain rule twice gives the Hessian at ``z̃``::

    H̃ = diag(d)·H·diag(d) + diag(e),     e = c'' ⊙ ∂ℓ/∂z = −(2/cap)·t⊙d⊙(α·p − u)
      = diag(a) − (α − 2λ)·q·qᵀ,         a = α·p⊙d² + e,   q = d⊙p

with ``H = α·(diag(p) − p·pᵀ) + 2λ·p·pᵀ`` softmax cross-entropy's Hessian at ``z``
(:mod:`jaxbp._losscurv`, every option: ``α = Σ_v u + 2λ·lse``). The second term, the
softcap's curvature times the loss's gradient, is what a Gauss–Newton split after the
softcap would drop; it makes ``H̃`` indefinite on many rows (roughly where the target's
logit lies below the mean logit under ``p``). The rules::

    ggn_vp(res, (ẋ, ẇ, None, ḃ, None, None), g)   Jᵀ·(g·H̃)·J·ṫ in two passes: ⟨p, d⊙ż̃⟩
        (n,) over the vocabulary, then per chunk
        dz̃_k = g·(d_k⊙(α·p_k⊙d_k⊙ż̃_k + (2λ − α)·⟨p, d⊙ż̃⟩·p_k) + e_k⊙ż̃_k)
    logits_bwd(res, dz̃ (n…, v))   Jᵀ·dz̃, chunk by chunk
    hessian_factor(res, g)         S (n…, v, k), S·Sᵀ = g·H̃ (exact: forms (n, v, k); for
        small vocabularies; ``k = v + 1`` unless ``z_loss`` is a Python 0). Without a
        softcap ``S = √g·[√α·(diag(√p) − p·√pᵀ) | √(2λ)·p]``; with one
        ``S = √g·[diag(√a) − γ·q·rᵀ | 0]`` with ``β = α − 2λ``, ``r = q/√a``,
        ``κ = 1 − β·|r|² = Σ_v p·e/a + 2λ·|r|²`` (no cancellation: ``Σ_v p = 1``) and
        ``γ = β/(1 + √κ)``, the root of ``2γ − γ²·|r|² = β``, so that
        ``(diag(√a) − γ·q·rᵀ)·(…)ᵀ = diag(a) − (2γ − γ²·|r|²)·q·qᵀ = H̃``
    sample_logits(res, g, key)     s (n…, v) itself, the column sample_bwd carries back
    sample_bwd(res, g, key)        Jᵀ·s, one Monte-Carlo column, E[s·sᵀ] = g·H̃: ŷ ~ p by
        Gumbel-max chunk by chunk; ``s = √g·(√α·(p − e_ŷ) + ε·√(2λ)·p)`` without a
        softcap; with one ``s = √g·ε·S₀·e_ŷ/√p_ŷ`` (``S₀`` the square block above;
        ``E[e_ŷ·e_ŷᵀ/p_ŷ] = I``; the sign ``ε = ±1`` makes ``E[s] = 0``). Without a softcap
        the two agree: ``S₀·e_ŷ/√p_ŷ = √α·(e_ŷ − p)``

A real factor exists only where ``g·H̃`` is positive semi-definite: where ``α < 0`` (a z-loss
far below 0), ``g < 0``, or with a softcap where some ``a < 0`` or ``κ < 0`` (``H̃``
indefinite), the factor and the Monte-Carlo column are NaN on that row, never something
else; ``ggn_vp`` stays the exact ``g·H̃``. (One corner gives NaN on a semi-definite ``H̃``:
``β < 0`` with some ``a < 0``: a z-loss with ``lse < 1 − Σu/2λ`` and a saturated softcap.)
Masked rows give exactly 0, out-of-range labels NaN. ``p``, ``d``, ``e`` are recomputed per
chunk from ``x``, ``w`` and the saved ``lse (n,)``, which both strategies' residuals hold;
the cotangents come back as the op's ``bwd``'s: ``(dx, dw, None, db, None, None)``. The
noise of chunk ``[start, start + k)`` comes from ``fold_in(key, start)``: the labels drawn
depend on the key and on the chunk length.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import _checks, _vma, _xent
from ._losscurv import _two_lam, softmax_factor, tangents_of
from ._xent import cols, mm, over_chunks

__all__ = ["rules"]

_ARGS = ("x", "w", "labels", "b", "where", "class_weights")
_STATIC = ("ignore_index", "softcap", "chunk_size", "accum_dtype", "strategy", "default_chunk")


class _Head(NamedTuple):
    """The residuals flattened to rows, and the row quantities every rule needs."""

    x: jax.Array  # (n, d)
    w: jax.Array  # (d, v)
    b: jax.Array | None  # (v,)
    labels: jax.Array  # (n,)
    cw: jax.Array | None  # (v,)
    eps: Any  # label smoothing
    two_lam: Any  # 2λ
    lse: jax.Array  # (n,)
    alpha: jax.Array  # Σ_v u + 2λ·lse   (n,)
    gv: jax.Array  # g, 0 on masked rows   (n,)
    valid: jax.Array
    bad: jax.Array
    acc: jnp.dtype
    softcap: float | None
    size: int  # vocabulary columns per chunk
    vma: frozenset


class _Chunk(NamedTuple):
    """One chunk's columns ``(n, k)``: ``p``, ``d = c'``, ``e`` and a bound of its rounding
    error ``de`` (``None`` without a softcap), and ``w_k (d, k)``."""

    p: jax.Array
    d: jax.Array | None
    e: jax.Array | None
    de: jax.Array | None
    w_k: jax.Array


def _head(res, g, *, ignore_index, label_smoothing, z_loss, softcap, chunk_size, accum_dtype,
          strategy, default_chunk):  # fmt: skip
    x, w, b, labels, where, cw, lse = res[:7]
    acc = _xent.acc_dtype(accum_dtype, x.dtype)
    xf, lf, wf = _xent.flat_rows(x, labels, where)
    eps = _checks.as_scalar(label_smoothing, acc)
    valid, bad, su, _ = _xent.row_terms(
        lf, wf, cw, v=w.shape[1], eps=eps, ignore_index=ignore_index, acc=acc
    )
    alpha = su + _checks.scaled(_checks.as_scalar(z_loss, acc), 2.0 * lse)
    gv = jnp.zeros(lf.shape, acc)
    if g is not None:
        if jnp.shape(g) != labels.shape:
            raise ValueError(f"g: expected the batch shape {labels.shape}, got {jnp.shape(g)}")
        gv = jnp.where(valid, g.reshape(-1).astype(acc), 0.0)
    # "forward" counts tokens with chunk_size: the vocabulary chunk is then the default one.
    size = _xent.chunk(None if strategy == "forward" else chunk_size, w.shape[1], default_chunk)
    vma = _vma.union(x, w, b, labels, where, cw, lse, g)
    return _Head(xf, w, b, lf, cw, eps, _two_lam(z_loss, acc), lse, alpha, gv, valid, bad, acc,
                 softcap, size, vma)  # fmt: skip


def _chunk(h: _Head, start, k) -> _Chunk:
    """``p_k``, ``d_k``, ``e_k`` for the columns ``[start, start + k)``, recomputed."""
    w_k = cols(h.w, start, k, 1)
    b_k = None if h.b is None else cols(h.b, start, k, 0)
    z, t = _xent.logits(h.x, w_k, b_k, h.acc, h.softcap)  # z = c(z̃)   (n,k)
    p = jnp.exp(z - h.lse[:, None])
    if t is None:
        return _Chunk(p, None, None, None, w_k)
    y, _ = _xent.smoothed(h.labels, start, k, h.eps, h.w.shape[1], h.acc)
    u = y if h.cw is None else y * cols(h.cw, start, k, 0).astype(h.acc)
    d = 1.0 - t * t
    ap = h.alpha[:, None] * p
    e = (-2.0 / h.softcap) * t * d * (ap - u)  # c''·∂ℓ/∂z
    de = 4.0 * jnp.finfo(h.acc).eps * jnp.abs((2.0 / h.softcap) * t * d) * (abs(ap) + abs(u))
    return _Chunk(p, d, e, de, w_k)


def _mask(h: _Head, a):
    """0 on masked rows, NaN on rows with out-of-range labels; ``a (n, …)``."""
    extra = (None,) * (a.ndim - 1)
    a = jnp.where(h.valid[(..., *extra)], a, 0.0)
    return jnp.where(h.bad[(..., *extra)], jnp.nan, a)


def _transpose(h: _Head, dz_of, vma):
    """``Jᵀ`` chunk by chunk: ``(dx (n,d), dw (d,v), db (v,) | None)`` in the accumulation
    dtype, from ``dz_of(start, k) -> (dz̃_k (n,k), w_k)``."""
    xt = _xent.transposed_for_dw(h.x)

    def body(start, k, carry):
        dx, dw, db = carry
        dz, w_k = dz_of(start, k)
        dz_in = dz.astype(h.w.dtype)  # as the op's backward: dlogits in the input dtype
        dx = dx + mm(dz_in, w_k, (1, 1), h.acc)  # "nk,dk->nd"
        dw = lax.dynamic_update_slice_in_dim(dw, mm(xt, dz_in, (1, 0), h.acc), start, 1)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, jnp.sum(dz, axis=0), start, 0)  # "nk->k"
        return dx, dw, db

    carry = (
        jnp.zeros(h.x.shape, h.acc),
        jnp.zeros(h.w.shape, h.acc),
        None if h.b is None else jnp.zeros(h.b.shape, h.acc),
    )
    return over_chunks(h.w.shape[1], h.size, body, carry, vma)


def _cotangents(res, grads):
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
    h = _head(res, g, **options)
    xdot = None if xdot is None else xdot.reshape(h.x.shape)
    vma = h.vma | _vma.union(*tangents)

    def zdot_of(start, k, c: _Chunk):
        """``ż̃_k = ẋ·w_k + x·ẇ_k + ḃ_k (n,k)``."""
        zd = jnp.zeros((h.x.shape[0], k), h.acc)
        if xdot is not None:
            zd = zd + mm(xdot, c.w_k, (1, 0), h.acc)  # "nd,dk->nk"
        if wdot is not None:
            zd = zd + mm(h.x, cols(wdot, start, k, 1), (1, 0), h.acc)
        if bdot is not None:
            zd = zd + cols(bdot, start, k, 0).astype(h.acc)
        return zd

    def first(start, k, pz):  # ⟨p, d⊙ż̃⟩ over the whole vocabulary    (n,)
        c = _chunk(h, start, k)
        zd = zdot_of(start, k, c)
        return pz + jnp.sum(c.p * (zd if c.d is None else c.d * zd), axis=1)

    pz = over_chunks(h.w.shape[1], h.size, first, jnp.zeros(h.lse.shape, h.acc), vma)
    coef = (h.two_lam - h.alpha) * pz  # (2λ − α)·⟨p, d⊙ż̃⟩   (n,)

    def dz_of(start, k):
        c = _chunk(h, start, k)
        zd = zdot_of(start, k, c)
        if c.d is None:
            hz = h.alpha[:, None] * c.p * zd + coef[:, None] * c.p
        else:
            hz = c.d * (h.alpha[:, None] * c.p * c.d * zd + coef[:, None] * c.p) + c.e * zd
        return _mask(h, h.gv[:, None] * hz), c.w_k

    return _cotangents(res, _transpose(h, dz_of, vma))


def _capped_pieces(h: _Head, c: _Chunk):
    """With a softcap, for the columns ``(n, k)`` of ``c``: ``a = α·p⊙d² + e``, ``q = d⊙p``,
    ``r = q/√a`` (0 where ``a = 0`` and ``q = 0`` or ``β = 0``; NaN where no factor exists)
    and this chunk's share of ``κ = 1 − β·|r|² = Σ_v p·e/a + 2λ·|r|² (n,)`` and of a bound of
    its rounding error, ``Σ_v p·δe/a``: a gradient ``α·p − u`` of 0 (``v = 1``) leaves ``κ``
    its rounding's sign, and :func:`_settled` reads ``κ`` within the bound as 0."""
    alpha = h.alpha[:, None]
    a = alpha * c.p * c.d * c.d + c.e
    q = c.d * c.p
    pos = a > 0
    safe = jnp.where(pos, a, 1.0)
    free = (a == 0) & ((q == 0) | (alpha - h.two_lam == 0))  # a decoupled column: r = 0
    r = jnp.where(pos, q / jnp.sqrt(safe), jnp.where(free, 0.0, jnp.nan))
    kappa = jnp.sum(c.p * jnp.where(pos, c.e / safe, 1.0) + h.two_lam * r * r, axis=1)
    slack = jnp.sum(jnp.where(pos, c.p * c.de / safe, 0.0), axis=1)
    return a, q, r, kappa, slack


def _settled(kappa, slack):
    """``κ``, with a negative value within its rounding error (``slack``) read as 0."""
    return jnp.where((kappa < 0) & (kappa >= -slack), 0.0, kappa)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "column"))
def _hessian_factor(res, g, *, column, **options):
    h = _head(res, g, **options)
    v = h.w.shape[1]
    c = _chunk(h._replace(size=v), 0, v)  # the whole (n, v): the exact factor needs it
    if c.d is None:
        s = softmax_factor(c.p, h.alpha, h.gv, h.two_lam / 2.0, column=column)
    else:
        a, q, r, kappa, slack = _capped_pieces(h, c)
        kappa = _settled(kappa, slack)
        gamma = (h.alpha - h.two_lam) / (1.0 + jnp.sqrt(kappa))  # β/(1 + √κ); NaN if κ < 0
        eye = jnp.eye(v, dtype=a.dtype)
        s = jnp.sqrt(a)[:, :, None] * eye - gamma[:, None, None] * q[:, :, None] * r[:, None, :]
        if column:  # "nv,nu->nvu" above, square: a zero column keeps k = v + 1
            s = jnp.concatenate([s, jnp.zeros_like(q)[:, :, None]], axis=-1)
        s = jnp.sqrt(h.gv)[:, None, None] * s
    s = _mask(h, s)
    return s.reshape(*res[3].shape, *s.shape[1:]).astype(res[0].dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _logits_bwd(res, dz, **options):
    h = _head(res, None, **options)
    v = h.w.shape[1]
    want = (*res[3].shape, v)
    if jnp.shape(dz) != want:
        raise ValueError(f"dz: expected the shape of the logits {want}, got {jnp.shape(dz)}")
    dzf = dz.reshape(-1, v)

    def dz_of(start, k):
        return cols(dzf, start, k, 1).astype(h.acc), cols(h.w, start, k, 1)

    return _cotangents(res, _transpose(h, dz_of, h.vma | _vma.union(dz)))


def _draw(h: _Head, key):
    """``ŷ (n,)`` ~ p by an online Gumbel-max over the chunks, two signs ``ε (2, n)``, and
    with a softcap ``κ (n,)`` and whether a factor cannot exist on the row (``(n,)`` bool)."""
    key_y, key_e = jax.random.split(key)
    n = h.x.shape[0]

    def body(start, k, carry):
        best, arg, kappa, slack, broken = carry
        c = _chunk(h, start, k)
        z = jnp.log(c.p)  # z − lse: the same argmax
        score = z + jax.random.gumbel(jax.random.fold_in(key_y, start), z.shape, h.acc)
        top = jnp.max(score, axis=1)
        take = top > best
        at = jnp.argmax(score, axis=1).astype(arg.dtype) + start
        if c.d is not None:
            a, _, r, kappa_k, slack_k = _capped_pieces(h, c)
            kappa, slack = kappa + kappa_k, slack + slack_k
            broken = broken | jnp.any((a < 0) | jnp.isnan(r), axis=1)
        return jnp.where(take, top, best), jnp.where(take, at, arg), kappa, slack, broken

    zeros = jnp.zeros((n,), h.acc)
    init = (jnp.full((n,), -jnp.inf, h.acc), jnp.zeros((n,), jnp.int32), zeros, zeros,
            jnp.zeros((n,), bool))  # fmt: skip
    _, y_hat, kappa, slack, broken = over_chunks(h.w.shape[1], h.size, body, init, h.vma)
    sign = jax.random.rademacher(key_e, (2, n), h.acc)
    kappa = _settled(kappa, slack)
    return y_hat, sign, kappa, broken | (kappa < 0)


def _at_label(h: _Head, y_hat):
    """``a_ŷ``, ``r_ŷ``, ``p_ŷ (n,)`` at the drawn columns (a softcap), one more pass."""

    def body(start, k, carry):
        c = _chunk(h, start, k)
        a, _, r, _, _ = _capped_pieces(h, c)
        _, hit = _xent.smoothed(y_hat, start, k, 0.0, h.w.shape[1], h.acc)
        pick = lambda m: jnp.sum(jnp.where(hit, m, 0.0), axis=1)  # noqa: E731
        return tuple(acc + pick(m) for acc, m in zip(carry, (a, r, c.p), strict=True))

    zeros = jnp.zeros(h.lse.shape, h.acc)
    return over_chunks(h.w.shape[1], h.size, body, (zeros, zeros, zeros), h.vma)


def _sampler(h: _Head, key):
    """``dz_of(start, k) -> (s_k (n,k), w_k)``: the chunks of one Monte-Carlo column."""
    y_hat, sign, kappa, broken = _draw(h, key)
    root_g = jnp.sqrt(h.gv)  # NaN where g < 0
    if h.softcap is None:
        lam = jnp.sqrt(h.two_lam)
        root = jnp.sqrt(h.alpha)  # NaN where α < 0: no real factor
        hit_w, p_w, q_w = root, root + sign[1] * lam, None  # s = √g·(p·(√α + ε√(2λ)) − √α·e_ŷ)
    else:  # s = √g·ε·(√a_ŷ·e_ŷ − γ·r_ŷ·q)/√p_ŷ
        a_y, r_y, p_y = _at_label(h, y_hat)
        gamma = (h.alpha - h.two_lam) / (1.0 + jnp.sqrt(kappa))
        inv = sign[0] / jnp.sqrt(p_y)
        hit_w = -inv * jnp.sqrt(a_y)  # the −: e_ŷ enters as −hit below
        q_w = jnp.where(broken, jnp.nan, -inv * gamma * r_y)
        p_w = None

    def dz_of(start, k):
        c = _chunk(h, start, k)
        _, hit = _xent.smoothed(y_hat, start, k, 0.0, h.w.shape[1], h.acc)
        s = -hit_w[:, None] * hit.astype(h.acc)
        s = s + (p_w[:, None] * c.p if c.d is None else q_w[:, None] * c.d * c.p)
        return _mask(h, root_g[:, None] * s), c.w_k

    return dz_of


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_bwd(res, g, key, **options):
    h = _head(res, g, **options)
    return _cotangents(res, _transpose(h, _sampler(h, key), h.vma))


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_logits(res, g, key, **options):
    h = _head(res, g, **options)
    dz_of, v = _sampler(h, key), h.w.shape[1]

    def body(start, k, out):
        return lax.dynamic_update_slice_in_dim(out, dz_of(start, k)[0], start, 1)

    out = over_chunks(v, h.size, body, jnp.zeros((h.x.shape[0], v), h.acc), h.vma)
    return out.reshape(*res[3].shape, v).astype(res[0].dtype)


def _options(default_chunk, ignore_index=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
             chunk_size=None, accum_dtype=None, strategy="recompute"):  # fmt: skip
    return dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                softcap=softcap, chunk_size=chunk_size, accum_dtype=accum_dtype,
                strategy=strategy, default_chunk=default_chunk)  # fmt: skip


def rules(default_chunk: int) -> dict:
    """The fused head's ``curvature=`` mapping for :func:`jaxbp._op.declare`.

    ``default_chunk``: the op's vocabulary chunk when ``chunk_size`` is ``None``. The
    options are the op's backward's (``ignore_index``, ``label_smoothing``, ``z_loss``,
    ``softcap``, ``chunk_size``, ``accum_dtype``, ``strategy``)."""

    options = functools.partial(_options, default_chunk)

    def ggn_vp(res, tangents, g, **kw):
        """``(dx, dw, None, db, None, None) = Jᵀ·(g·H̃)·J·(ẋ, ẇ, ḃ)`` at ``z̃ = x·w + b``,
        chunked (two passes over the vocabulary)."""
        return _ggn_vp(res, tuple(tangents), g, **options(**kw))

    def hessian_factor(res, g, **kw):
        """``S (n…, v, k)``, ``S·Sᵀ = g·H̃`` at ``z̃ = x·w + b``; forms the ``(n, v, k)``
        factor (small vocabularies); ``k = v + 1`` unless ``z_loss`` is a Python 0."""
        column = not _checks.is_static_zero(kw.get("z_loss", 0.0))
        return _hessian_factor(res, g, column=column, **options(**kw))

    def logits_bwd(res, dz, **kw):
        """``(dx, dw, None, db, None, None) = Jᵀ·dz̃`` for ``dz̃ (n…, v)`` at ``z̃ = x·w + b``."""
        return _logits_bwd(res, dz, **options(**kw))

    def sample_bwd(res, g, key, **kw):
        """``Jᵀ·s`` for one Monte-Carlo column ``s`` (``ŷ ~ p``), never an ``(n, v)`` array."""
        return _sample_bwd(res, g, key, **options(**kw))

    def sample_logits(res, g, key, **kw):
        """``s (n…, v)``: the Monte-Carlo column ``sample_bwd`` carries back (the same draws
        for the same key), at the logits ``z̃`` itself (forms the ``(n, v)`` column: KFAC's
        output-gradient factor needs it)."""
        return _sample_logits(res, g, key, **options(**kw))

    named = {"ggn_vp": ggn_vp, "hessian_factor": hessian_factor, "logits_bwd": logits_bwd,
             "sample_bwd": sample_bwd, "sample_logits": sample_logits}  # fmt: skip
    for name, fn in named.items():
        fn.__name__ = fn.__qualname__ = f"linear_softmax_cross_entropy_{name}"
    return named
