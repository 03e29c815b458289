"""Fused linear + softmax cross-entropy for large vocabularies, with a chunked backward.

Index letters::

    n  tokens (any leading axes of x flatten into n)
    d  model dimension
    v  vocabulary
    k  one chunk of the vocabulary (recompute) or of the tokens (forward)

The last layer of a language model and its loss, ``x (n,d) · w (d,v) + b (v,) -> z (n,v)``,
then :func:`jaxbp.softmax_cross_entropy` on ``z`` with integer ids ``(n,)``. Autodiff of
that composition stores the ``(n,v)`` logits and builds their ``(n,v)`` gradient; for
v = 256000 that is gigabytes. Here the logits exist one chunk at a time.

With ``y' = (1 − ε)·onehot(y) + ε/v``, class weights ``u = cw ⊙ y'``, optional softcap
``z = cap·tanh(z̃/cap)`` of the raw logits ``z̃ = x·w + b``::

    lse  = log Σ_v e^{z}                               (n,)  online, chunk by chunk
    loss = Σ_v u (lse − z) + λ·lse²
         = (Σ_v u)·lse − (1−ε)·cw[y]·z[y] − (ε/v)·Σ_v cw·z + λ·lse²
    dz   = g·(p·(Σ_v u + 2λ·lse) − u),   p = exp(z − lse)     (n,k) per chunk
    dz̃   = dz ⊙ (1 − (z/cap)²)                                 (softcap only)
    dx   = Σ_chunks dz̃ · w_kᵀ      "nk,dk->nd"
    dw_k = xᵀ · dz̃                 "nd,nk->dk"
    db_k = Σ_n dz̃                  "nk->k"

Forward mode (:func:`linear_softmax_cross_entropy_jvp`) is the same recomputation: a row of
the loss's Jacobian with respect to the logits is ``dz`` for ``g = 1``, so per chunk
``loṡs += ⟨dz̃_k, ẋ·w_k + x·ẇ_k + ḃ_k⟩`` (plus the class weights' ``⟨ċw ⊙ y', lse − z⟩``).

Everything in ``dz`` is recomputable per chunk from ``x``, ``w`` and ``lse (n,)``: that is
all the ``"recompute"`` strategy saves. The ``"forward"`` strategy instead computes the
gradients for ``g = 1`` during the forward pass (over token chunks, so the whole
vocabulary row is at hand and no logit is computed twice) and, in the backward, scales
them by ``g`` when ``g`` is the same on every valid row (a mean or a sum of the losses);
otherwise it falls back to the recompute backward. See ``docs/fused.md``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _checks, _fusedcurv, _vma, _xent
from ._checks import check_label_range
from ._contrib import Full, Outer, Rows, group
from ._op import declare, op_vjp
from ._xent import flat_rows as _flat
from .losses import _check_ce_options, ce_float_options, valid_rows, validate_ce_options

__all__ = [
    "linear_softmax_cross_entropy",
    "linear_softmax_cross_entropy_fwd",
    "linear_softmax_cross_entropy_bwd",
    "linear_softmax_cross_entropy_jvp",
    "linear_softmax_cross_entropy_example_grads",
    "STRATEGIES",
]

STRATEGIES = ("recompute", "forward")
DEFAULT_STRATEGY = "recompute"
# Default chunk lengths: a vocabulary chunk of 1024 columns (recompute: two (n, 1024)
# float32 temporaries, half of 2048's, at the same speed within the noise of one AVX-512
# CPU), and token chunks of about 2**24 logits (forward: each chunk holds its (k, v) logits
# and their gradient).
DEFAULT_CHUNK = 1024
FORWARD_CHUNK_ELEMENTS = 2**24

# label_smoothing and z_loss only scale values: traced (each value compiles nothing new).
# The others change shapes or control flow: static.
_STATIC = ("ignore_index", "softcap", "chunk_size", "accum_dtype", "strategy")


# --------------------------------------------------------------------- the op triple


@_checks.concrete_options(_check_ce_options)
@functools.partial(jax.jit, static_argnames=_STATIC)
def linear_softmax_cross_entropy_fwd(
    x, w, labels, b=None, where=None, class_weights=None, *, ignore_index=None,
    label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None, accum_dtype=None,
    strategy=DEFAULT_STRATEGY,
):  # fmt: skip
    """Forward: ``loss (n,)`` and the residuals; the arguments in the op's order.

    Validates shapes, dtypes and options like :func:`linear_softmax_cross_entropy` (label
    values are not checked here: out-of-range ids give NaN rows).

    ``"recompute"``: ``res = (x, w, b, labels, where, class_weights, lse (n,))`` — only
    ``lse`` is new. ``"forward"``: the same plus the gradients for ``g = 1``:
    ``dx1 (n,d)``, ``dw1 (d,v)``, ``db1 (v,)``, ``dcw1 (v,)`` (accumulation dtype).
    """
    validate_fused(x, w, b, labels, where, class_weights, label_smoothing, z_loss, softcap,
              chunk_size, accum_dtype, strategy, ignore_index)  # fmt: skip
    opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                softcap=softcap, chunk_size=chunk_size,
                acc=_xent.acc_dtype(accum_dtype, x.dtype))  # fmt: skip
    xf, lf, wf = _flat(x, labels, where)
    base = (x, w, b, labels, where, class_weights)
    if strategy == "forward":
        loss, lse, dx1, dw1, db1, dcw1 = _xent.forward_with_grads(
            xf, w, b, lf, wf, class_weights, default_chunk=FORWARD_CHUNK_ELEMENTS, **opts
        )
        return loss.reshape(labels.shape), (*base, lse, (dx1, dw1, db1, dcw1))
    loss, lse, _ = _xent.loss_and_lse(
        xf, w, b, lf, wf, class_weights, v=w.shape[1], default_chunk=DEFAULT_CHUNK, **opts
    )
    return loss.reshape(labels.shape), (*base, lse, None)


@functools.partial(jax.jit, static_argnames=_STATIC)
def linear_softmax_cross_entropy_bwd(
    res, g, *, ignore_index=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
    chunk_size=None, accum_dtype=None, strategy=DEFAULT_STRATEGY,
):  # fmt: skip
    """Backward: ``(dx (n,d), dw (d,v), None, db (v,) | None, None, dclass_weights | None)``,
    one cotangent per argument of the forward, in its order (``None`` for the labels and mask).

    ``"recompute"``: one more pass over the vocabulary chunks, ``dz = g·(p·(Σu + 2λ·lse) − u)``
    per chunk, then ``dx += dz·w_kᵀ``, ``dw_k = xᵀ·dz``, ``db_k = Σₙ dz``.
    ``"forward"``: ``dx = g[:,None]·dx1`` (always exact, row by row); ``dw, db, dcw`` are
    ``g₀·dw1, …`` when ``g`` is the same value ``g₀`` on every valid row, and otherwise the
    recompute backward computes them instead (a ``lax.cond``; under ``vmap`` with a batched
    predicate both branches run and the results are selected).
    """
    x, w, b, labels, where, cw, lse, grads = res
    acc = _xent.acc_dtype(accum_dtype, x.dtype)
    opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                acc=acc)  # fmt: skip
    xf, lf, wf = _flat(x, labels, where)
    gf = g.reshape(-1)

    def recompute(_=None):
        v = w.shape[1]
        _, _, su, _ = _xent.row_terms(
            lf, wf, cw, v=v, eps=label_smoothing, ignore_index=ignore_index, acc=acc
        )
        dx, dw, db, dcw = _xent.grads_recompute(
            xf, w, b, lf, wf, cw, lse, su, gf, v=v, softcap=softcap,
            chunk_size=None if strategy == "forward" else chunk_size,
            default_chunk=DEFAULT_CHUNK, **opts,
        )  # fmt: skip
        return dx.reshape(x.shape), dw, db, dcw

    if grads is None:
        dx, dw, db, dcw = recompute()
        return dx, dw, None, db, None, dcw

    dx1, dw1, db1, dcw1 = grads
    valid = valid_rows(lf, wf, ignore_index=ignore_index, batch_shape=lf.shape)
    ga = gf.astype(acc)
    g0 = ga[jnp.argmax(valid)] if gf.shape[0] else jnp.zeros((), acc)
    uniform = jnp.all(jnp.where(valid, ga == g0, True))

    # dx is exact row by row for any g; only the parameter gradients need a uniform g.
    dx = jnp.where(valid[:, None], ga[:, None] * dx1, 0.0)  # "n,nd->nd"
    dx = jnp.where(jnp.isnan(dx1), jnp.nan, dx)  # bad rows stay NaN
    dx = dx.astype(x.dtype).reshape(x.shape)

    def scaled():
        cast = lambda a, like: None if a is None else (g0 * a).astype(like.dtype)
        return cast(dw1, w), cast(db1, b), cast(dcw1, cw)

    # Both branches return one type: varying along every axis any input varies along. A
    # caller that needs dx alone (a per-example transform) drops the whole cond under jit.
    vma = _vma.union(res, g)
    dw, db, dcw = lax.cond(
        uniform,
        lambda: _vma.pvary_tree(scaled(), vma),
        lambda: _vma.pvary_tree(recompute()[1:], vma),
    )
    return dx, dw, None, db, None, dcw


@functools.partial(jax.jit, static_argnames=_STATIC)
def linear_softmax_cross_entropy_jvp(
    res, tangents, *, ignore_index=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
    chunk_size=None, accum_dtype=None, strategy=DEFAULT_STRATEGY,
):  # fmt: skip
    """Forward mode: ``loṡs (n,)`` for the tangents ``(ẋ (n,d), ẇ (d,v), None, ḃ (v,) |
    None, None, ċw (v,) | None)``, one vocabulary chunk at a time from the saved ``lse``
    (both strategies; no ``(n, v)`` array)::

        ż̃_k  = ẋ·w_k + x·ẇ_k + ḃ_k                   "nd,dk->nk"   (raw logits' tangent)
        loṡs = Σ_chunks ⟨dz̃_k, ż̃_k⟩ + ⟨ċw_k ⊙ y'_k, lse − z_k⟩     "nk,nk->n"

    with ``dz̃_k`` the backward's logit gradient for ``g = 1`` (through the softcap).
    """
    x, w, b, labels, where, cw, lse, _ = res
    dx, dw, _, db, _, dcw = tangents
    acc = _xent.acc_dtype(accum_dtype, x.dtype)
    xf, lf, wf = _flat(x, labels, where)
    v = w.shape[1]
    eps = _checks.as_scalar(label_smoothing, acc)
    valid, bad, su, _ = _xent.row_terms(
        lf, wf, cw, v=v, eps=eps, ignore_index=ignore_index, acc=acc
    )
    scale = su + _checks.scaled(_checks.as_scalar(z_loss, acc), 2.0 * lse)  # Σu + 2λ·lse (n,)
    dxf = None if dx is None else dx.reshape(xf.shape)
    ones = jnp.ones(lf.shape, acc)

    def body(start, k, out):
        w_k = _xent.cols(w, start, k, 1)
        b_k = None if b is None else _xent.cols(b, start, k, 0)
        z, t = _xent.logits(xf, w_k, b_k, acc, softcap)  # (n,k), recomputed
        y, _ = _xent.smoothed(lf, start, k, eps, v, acc)  # y' (n,k)
        cw_k = None if cw is None else _xent.cols(cw, start, k, 0).astype(acc)
        u = y if cw_k is None else y * cw_k
        dz = _xent.dlogits(z, t, u, *(r[:, None] for r in (lse, scale, ones, valid, bad)))
        dzt = jnp.zeros(z.shape, acc)  # ż̃ (n,k)
        if dxf is not None:
            dzt = dzt + _xent.mm(dxf, w_k, (1, 0), acc)  # "nd,dk->nk"
        if dw is not None:
            dzt = dzt + _xent.mm(xf, _xent.cols(dw, start, k, 1), (1, 0), acc)
        if db is not None:
            dzt = dzt + _xent.cols(db, start, k, 0).astype(acc)
        out = out + jnp.sum(dz * dzt, axis=1)
        if dcw is not None and cw is not None:  # ⟨ċw ⊙ y', lse − z⟩ on valid rows
            du = y * _xent.cols(dcw, start, k, 0).astype(acc)
            per = jnp.sum(jnp.where(du == 0, 0.0, du * (lse[:, None] - z)), axis=1)
            out = out + jnp.where(valid, per, 0.0)
        return out

    vma = _vma.union(res, tangents)
    size = _xent.chunk(None if strategy == "forward" else chunk_size, v, DEFAULT_CHUNK)
    out = _xent.over_chunks(v, size, body, jnp.zeros(lf.shape, acc), vma)
    return jnp.where(bad, jnp.nan, out).reshape(labels.shape)


def linear_softmax_cross_entropy_example_grads(
    res, g, *, examples, ignore_index=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
    chunk_size=None, accum_dtype=None, strategy=DEFAULT_STRATEGY,
):  # fmt: skip
    """Per-example rule: each example's head gradient from the saved ``lse``, never an
    ``(n, T, v)`` array::

        dw_k = Σ_t x_t dz̃_tᵀ   (d, v)   Outer(Rows x (n,T,d), LogitGrads (n,T,v))
        db_k = Σ_t dz̃_t        (n, v)   chunk by chunk

    with ``dz̃_t = g_t·(p_t·(Σu + 2λ·lse_t) − u_t)`` (every option). Its squared norm is
    ``Σ_{t,s} ⟨x_t, x_s⟩·⟨dz̃_t, dz̃_s⟩``, the ``⟨dz̃_t, dz̃_s⟩ (n, T, T)`` accumulated one
    vocabulary chunk at a time (:class:`jaxbp._xent.LogitGrads`); tied to an embedding
    table, the cross term needs ``dz̃_t`` at the ids' columns only.
    """
    x, w, b, labels, where, cw, lse, _ = res
    xf, lf, wf = _flat(x, labels, where)
    factor = _xent.LogitGrads(
        xf, w, b, lf, wf, cw, lse.reshape(-1), g.reshape(-1), examples, label_smoothing,
        z_loss, ignore_index, softcap, _xent.acc_dtype(accum_dtype, x.dtype),
        _xent.chunk(None if strategy == "forward" else chunk_size, w.shape[1], DEFAULT_CHUNK),
    )  # fmt: skip
    out = {"w": Outer(Rows(group(xf, examples, 1, "x")), factor)}
    if b is not None:
        out["b"] = Full(factor.row_sums())
    return out


def _loss_alone(x, w, labels, b, where, class_weights, *, strategy, **opts):
    """The primal alone (no gradient asked for): the loss only, whatever the strategy."""
    if strategy == "forward":
        opts["chunk_size"] = None  # there chunk_size counts tokens, not vocabulary columns
    return _loss_only(x, w, b, labels, where, class_weights, **opts)


@functools.partial(jax.jit, static_argnames=_STATIC[:-1])
def _loss_only(x, w, b, labels, where, class_weights, *, accum_dtype, **opts):
    xf, lf, wf = _flat(x, labels, where)
    loss, _, _ = _xent.loss_and_lse(
        xf, w, b, lf, wf, class_weights, v=w.shape[1], default_chunk=DEFAULT_CHUNK,
        acc=_xent.acc_dtype(accum_dtype, x.dtype), **opts,
    )  # fmt: skip
    return loss.reshape(labels.shape)


def validate_fused(x, w, b, labels, where, class_weights, label_smoothing, z_loss, softcap,
              chunk_size, accum_dtype, strategy, ignore_index):  # fmt: skip
    x = _checks.floating("x", x)
    w = _checks.floating("w", w)
    _checks.min_rank("x", x, 1, "(..., d)")
    if w.ndim != 2:
        raise ValueError(f"w: expected shape (d, v), got {w.shape}")
    d, v = w.shape
    if x.shape[-1] != d:
        raise ValueError(
            f"x: expected last axis d = {d} to match w (d, v) = {w.shape}, got x shape {x.shape}"
        )
    if v == 0:
        raise ValueError(f"w: expected at least one vocabulary column (v ≥ 1), got {w.shape}")
    if x.dtype != w.dtype:
        raise TypeError(f"w: expected the dtype of x ({x.dtype}), got {w.dtype}")
    if b is not None:
        b = _checks.floating("b", b)
        if b.shape != (v,):
            raise ValueError(f"b: expected shape (v,) = ({v},), got {b.shape}")
        if b.dtype != w.dtype:
            raise TypeError(f"b: expected the dtype of w ({w.dtype}), got {b.dtype}")
    labels = _checks.as_array(labels)
    if jnp.issubdtype(labels.dtype, jnp.floating):
        raise TypeError(
            f"labels: expected integer class ids of shape {x.shape[:-1]}, got {labels.dtype} "
            "(probability labels (n, v) would defeat the fusion; use softmax_cross_entropy)"
        )
    labels = _checks.integer("labels", labels)
    if labels.shape != x.shape[:-1]:
        raise ValueError(
            f"labels: expected the batch shape {x.shape[:-1]} of x {x.shape}, got {labels.shape}"
        )
    where, class_weights = validate_ce_options(
        labels.shape, v, where, class_weights, label_smoothing, ignore_index, z_loss, letter="v"
    )
    softcap = _checks.static_number("softcap", softcap, allow_none=True)
    if softcap is not None and not 0.0 < softcap < np.inf:
        raise ValueError(f"softcap: expected None or a finite float > 0, got {softcap!r}")
    _checks.static_int("chunk_size", chunk_size, allow_none=True)
    if chunk_size is not None and (
        not isinstance(chunk_size, int | np.integer) or isinstance(chunk_size, bool)
        or chunk_size < 1
    ):  # fmt: skip
        raise ValueError(f"chunk_size: expected None or an int ≥ 1, got {chunk_size!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if accum_dtype is not None:
        acc = jnp.dtype(accum_dtype)
        if not jnp.issubdtype(acc, jnp.floating) or acc.itemsize < max(4, x.dtype.itemsize):
            raise TypeError(
                f"accum_dtype: expected None or a floating dtype at least as wide as float32 "
                f"and x ({x.dtype}), got {acc}"
            )
        accum_dtype = acc.name
    return x, w, b, labels, where, class_weights, accum_dtype


@declare(
    fwd=linear_softmax_cross_entropy_fwd,
    bwd=linear_softmax_cross_entropy_bwd,
    jvp=linear_softmax_cross_entropy_jvp,
    per_example=("x", "labels"),
    traced=("label_smoothing", "z_loss"),
    example_grads=linear_softmax_cross_entropy_example_grads,
    curvature=_fusedcurv.rules(DEFAULT_CHUNK),
)
def linear_softmax_cross_entropy(
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    b: jax.Array | None = None,
    *,
    where: jax.Array | None = None,
    ignore_index: int | None = None,
    class_weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    accum_dtype=None,
    strategy: str = DEFAULT_STRATEGY,
) -> jax.Array:
    """``softmax_cross_entropy(x·w + b, labels)`` per token, never forming ``(n, v)`` logits.

    .. math::

        z = \\mathrm{cap}\\tanh((xw + b)/\\mathrm{cap}),\\qquad
        \\ell = \\sum_v u_v(\\mathrm{lse}(z) - z_v) + \\lambda\\,\\mathrm{lse}(z)^2

    Same option semantics as :func:`jaxbp.softmax_cross_entropy` (``u = cw ⊙ y'``,
    ``y' = (1 − ε)·onehot + ε/v``), computed chunk by chunk with a hand-written backward.

    Args:
      x: hidden states ``(n, d)`` (any leading axes), floating (bfloat16 is fine).
      w: output projection ``(d, v)``, the dtype of ``x``.
      labels: integer token ids, the batch shape of ``x``.
      b: optional bias ``(v,)``, the dtype of ``w``.
      where: optional bool mask of the batch shape; ``False`` rows: loss 0, gradient 0.
      ignore_index: ids equal to it are masked like ``where=False``.
      class_weights: optional ``(v,)`` per-class weights (differentiable).
      label_smoothing: ``ε`` in ``[0, 1]``.
      z_loss: ``λ ≥ 0``, adds ``λ·lse²``.
      softcap: optional ``cap > 0``: logits become ``cap·tanh(z/cap)`` (Gemma 2).
      chunk_size: vocabulary columns per chunk (``"recompute"``, default 1024) or tokens per
        chunk (``"forward"``, default about ``2**24 / v``). A last shorter chunk is fine.
      accum_dtype: accumulation dtype; ``None``: float32 for half precision, else the input
        dtype. Matmuls take the inputs as they are and accumulate in it.
      strategy: ``"recompute"`` (save ``lse (n,)`` only; recompute logits in the backward)
        or ``"forward"`` (compute the gradients during the forward over token chunks; exact
        for any ``g``, fast when ``g`` is uniform over valid rows, as for a mean).

    Returns:
      ``loss`` of the batch shape, in the accumulation dtype (float32 for bfloat16 inputs).

    Raises:
      TypeError: non-floating or mismatched dtypes, float labels, a non-bool ``where``.
      ValueError: shapes that do not fit, a bad option, ids out of range (when concrete).

    Example:
      >>> import jax, jax.numpy as jnp, jaxbp
      >>> x, w = jnp.ones((3, 4)), jnp.zeros((4, 10))
      >>> jaxbp.linear_softmax_cross_entropy(x, w, jnp.array([0, 1, 2])).round(4)
      Array([2.3026, 2.3026, 2.3026], dtype=float32)
    """
    x, w, b, labels, where, class_weights, accum_dtype = validate_fused(
        x, w, b, labels, where, class_weights, label_smoothing, z_loss, softcap, chunk_size,
        accum_dtype, strategy, ignore_index,
    )  # fmt: skip
    check_label_range(labels, w.shape[1], ignore_index, where=where)
    options = (
        ("ignore_index", None if ignore_index is None else int(ignore_index)),
        ("softcap", None if softcap is None else float(softcap)),
        ("chunk_size", None if chunk_size is None else int(chunk_size)),
        ("accum_dtype", accum_dtype),
        ("strategy", strategy),
    )
    eps, lam = ce_float_options(label_smoothing, z_loss, check=True)
    return _fused(
        x, w, labels, b, where, class_weights, **dict(options), label_smoothing=eps, z_loss=lam
    )


# Reads linear_softmax_cross_entropy.fwd / .bwd when JAX traces it; the loss alone without
# a gradient.
_fused = op_vjp(linear_softmax_cross_entropy, primal=_loss_alone)
