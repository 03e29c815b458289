"""Scaled dot-product attention with a hand-written backward through the row softmax.

Index letters::

    n  batch (any leading axes)
    h  heads
    t  query positions          s  key/value positions
    e  head dimension

Forward, per batch element and head, with ``q (t, e)``, ``k (s, e)``, ``v (s, e)``::

    S = q·kᵀ/√e                  "nhte,nhse->nhts"     scores        (t, s)
    P = softmax(S) by rows       (masked entries left out, probability 0)
    O = P·v                      "nhts,nhse->nhte"     output        (t, e)

Backward, for ``g = ∂L/∂O (t, e)``::

    dv = Pᵀ·g                    "nhts,nhte->nhse"
    dP = g·vᵀ                    "nhte,nhse->nhts"
    dS = P ⊙ (dP − rowsum(dP ⊙ P))                     (t, s)
    dq = dS·k/√e                 "nhts,nhse->nhte"
    dk = dSᵀ·q/√e                "nhts,nhte->nhse"

``dS`` is the softmax Jacobian collapse of :mod:`jaxbp.softmax` again: every row of ``P`` is a
softmax with its own ``(s, s)`` Jacobian ``diag(p) − p pᵀ`` (``(n, h, t, s, s)`` for all of
them), and the vector-Jacobian product ``(diag(p) − p pᵀ)·dp = p ⊙ (dp − ⟨p, dp⟩)`` never forms
it: the seeds ``dP (t, s)`` collapse row by row to ``dS (t, s)``.

Forward mode (:func:`attention_jvp`) pushes tangents ``q̇, k̇, v̇`` through the same three
steps: ``Ṡ = (q̇·kᵀ + q·k̇ᵀ)/√e``, ``Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ))`` (the Jacobian again, now
times a tangent) and ``Ȯ = Ṗ·v + P·v̇``.

Masks: ``causal=True`` lets query ``i`` see keys ``j ≤ i`` (it needs ``t == s``; for any other
alignment pass ``causal=False`` and a ``where=`` mask); ``where`` is a bool mask broadcastable
to ``(n..., h, t, s)``, with ``jax.nn``'s ``where=`` semantics: masked scores are excluded
from the softmax (selected out, never ``−inf`` arithmetic, so nothing turns into ``inf − inf``);
a row with every key masked has output 0 and gradient 0, never NaN (note that
``jax.nn.dot_product_attention`` averages the values there instead).

Strategies:

* ``"store"`` saves ``P (n..., h, t, s)`` with ``q, k, v``: the backward is five matmuls.
* ``"recompute"`` saves only the log-sum-exp ``L = log Σ_s e^S (n..., h, t)`` and recomputes
  ``P = exp(S − L)`` from ``q, k`` in the backward, as flash attention does. Both passes run
  over blocks of :data:`RECOMPUTE_BLOCK` queries (a ``fori_loop``), so temporary memory holds
  ``(block, s)`` arrays, never ``(t, s)``: linear in ``t``, not quadratic. The cost is one
  more matmul (``S`` again) in the backward; ``rowsum(dP ⊙ P)`` is taken per block.

Half-precision inputs are computed in float32 (scores, softmax, accumulations); outputs and
gradients come back in the input dtype. A NaN in a query row makes that row's output and
gradient NaN; a NaN in ``k`` or ``v`` makes the rows that see it NaN, and, as in every
attention built on matmuls (``jax.nn``'s included), it also reaches other rows through
``0·NaN`` in ``P·v`` and ``dS·k``; a ``+inf`` score makes its row NaN (as in softmax).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _checks, _vma
from ._op import declare, op_vjp

__all__ = [
    "attention", "attention_fwd", "attention_bwd", "attention_jvp", "STRATEGIES",
    "RECOMPUTE_BLOCK",
]  # fmt: skip

STRATEGIES = ("store", "recompute")
RECOMPUTE_BLOCK = 128  # queries per step of the "recompute" strategy


def _validate(q, k, v, where, causal, strategy):
    q = _checks.floating("q", q)
    k = _checks.floating("k", k)
    v = _checks.floating("v", v)
    _checks.min_rank("q", q, 3, "(..., h, t, e)")
    _checks.min_rank("k", k, 3, "(..., h, s, e)")
    _checks.min_rank("v", v, 3, "(..., h, s, e)")
    if q.shape[-1] == 0:
        raise ValueError(f"q: expected a non-empty head dimension e, got shape {q.shape}")
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k: expected shape (..., h, s, e) with (..., h) = {q.shape[:-2]} and "
            f"e = {q.shape[-1]} from q {q.shape}, got {k.shape}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {k.shape} (..., h, s, e), got {v.shape}")
    for name, a in (("k", k), ("v", v)):
        if a.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({q.dtype}), got {a.dtype}")
    if not _checks.is_concrete(causal) or not isinstance(causal, bool | np.bool_):
        raise TypeError(f"causal: must be a Python bool (a static option), got {causal!r}")
    causal = bool(causal)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    t, s = q.shape[-2], k.shape[-2]
    if causal and t != s:
        raise ValueError(
            f"causal: needs as many queries as keys (query i sees keys j ≤ i), got t = {t} "
            f"(q {q.shape}) and s = {s} (k {k.shape}); for another alignment pass "
            "causal=False and a where= mask"
        )
    scores = (*q.shape[:-1], s)
    if where is not None:
        where = _checks.as_array(where)
        if where.dtype != jnp.bool_:
            raise TypeError(f"where: expected a bool mask, got {where.dtype} ({where.shape})")
        try:
            full = jnp.broadcast_shapes(where.shape, scores)
        except ValueError:
            full = None
        if full != scores:
            raise ValueError(
                f"where: expected a shape broadcastable to the scores (..., h, t, s) = "
                f"{scores}, got {where.shape}"
            )
        if where.ndim < len(scores):  # leading 1s, so that axis −2 is always t (or 1)
            where = where.reshape((1,) * (len(scores) - where.ndim) + where.shape)
    return q, k, v, where, causal


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


def _rows(a, start, size, axis=-2):
    """Rows ``[start, start + size)`` of ``a`` along ``axis`` (all of it when it has size 1,
    a broadcast mask)."""
    if a.shape[axis] == 1:
        return a
    return lax.dynamic_slice_in_dim(a, start, size, axis=axis % a.ndim)


def _mask(start, tq, s, causal, where):
    """Bool mask of the scores of queries ``[start, start + tq)``, broadcastable to
    ``(..., tq, s)``, or ``None`` when nothing is masked."""
    mask = None
    if causal:
        i = start + lax.broadcasted_iota(jnp.int32, (tq, s), 0)
        j = lax.broadcasted_iota(jnp.int32, (tq, s), 1)
        mask = j <= i  # query i sees keys j ≤ i
    if where is not None:
        w = _rows(where, start, tq)
        mask = w if mask is None else mask & w
    return mask


def _select(mask, a, other):
    return a if mask is None else jnp.where(mask, a, other)


def _scores(qs, ka):
    """``S = (q/√e)·kᵀ`` from the pre-scaled queries ``qs``, ``"nhte,nhse->nhts"``.

    Scaling ``q (t, e)`` rather than ``S (t, s)`` is cheaper, and it leaves no multiply
    beside ``S − max S`` that the compiler could contract into an FMA: with scores near
    1e30 an FMA's unrounded product minus the rounded max is ±1e23, not 0, and exp of it is
    inf."""
    return jnp.einsum("...te,...se->...ts", qs, ka)


def _probabilities(qs, ka, mask):
    """``(P, L)`` of one block: ``P (..., tq, s)`` row softmax of the unmasked scores (0 where
    masked, all 0 on a fully masked row) and ``L = log Σ e^S (..., tq)`` (−inf there)."""
    S = _scores(qs, ka)
    m = jnp.max(_select(mask, S, -jnp.inf), axis=-1, initial=-jnp.inf)  # row max (..., tq)
    m = jnp.where(m == -jnp.inf, 0.0, m)  # a fully masked row: any finite shift will do
    E = _select(mask, jnp.exp(S - m[..., None]), 0.0)  # selected out, never exp(−inf)
    l = jnp.sum(E, axis=-1)  # (..., tq); 0 on a fully masked row
    P = E / jnp.where(l > 0, l, 1.0)[..., None]
    return P, m + jnp.log(l)


def _over_blocks(t, body, carry, inputs=()):
    """``body(start, size, carry)`` over query blocks of :data:`RECOMPUTE_BLOCK` rows: full
    blocks in a ``fori_loop``, a shorter last block once more with its own static size.

    Inside a user's ``shard_map`` (``check_vma=True``) the carry starts typed as varying
    along every mesh axis the ``inputs`` vary along, the type of what it will hold."""
    carry = _vma.pvary_tree(carry, _vma.union(*inputs))
    nfull, rem = divmod(t, RECOMPUTE_BLOCK)
    if nfull == 1 and not rem:
        return body(0, t, carry)
    if nfull:
        carry = lax.fori_loop(
            0, nfull, lambda b, c: body(b * RECOMPUTE_BLOCK, RECOMPUTE_BLOCK, c), carry
        )
    if rem:
        carry = body(nfull * RECOMPUTE_BLOCK, rem, carry)
    return carry


@functools.partial(jax.jit, static_argnames=("causal", "strategy"))
def attention_fwd(q, k, v, where=None, *, causal: bool = True, strategy: str = "store"):
    """Forward: ``O (..., h, t, e)`` and the residuals; validates like :func:`attention`.

    ``"store"``: ``res = (q, k, v, P (..., h, t, s))``. ``"recompute"``:
    ``res = (q, k, v, where, L (..., h, t))`` with ``L`` the rows' log-sum-exp. ``P`` and ``L``
    are float32 for half-precision inputs.
    """
    q, k, v, where, causal = _validate(q, k, v, where, causal, strategy)
    t, s = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    ka, va = _acc(k), _acc(v)
    if strategy == "store":
        P, _ = _probabilities(_acc(q) * scale, ka, _mask(0, t, s, causal, where))  # q/√e
        O = jnp.einsum("...ts,...se->...te", P, va)  # "nhts,nhse->nhte"
        return O.astype(q.dtype), (q, k, v, P)

    def body(start, tq, carry):
        O, L = carry
        qb = _acc(_rows(q, start, tq)) * scale  # this block's q/√e only: no (t, e) copy
        P, Lb = _probabilities(qb, ka, _mask(start, tq, s, causal, where))
        Ob = jnp.einsum("...ts,...se->...te", P, va)
        O = lax.dynamic_update_slice_in_dim(O, Ob, start, axis=O.ndim - 2)
        L = lax.dynamic_update_slice_in_dim(L, Lb, start, axis=L.ndim - 1)
        return O, L

    acc = ka.dtype
    zeros = (jnp.zeros(q.shape, acc), jnp.zeros(q.shape[:-1], acc))
    O, L = _over_blocks(t, body, zeros, (q, k, v, where))
    return O.astype(q.dtype), (q, k, v, where, L)


@functools.partial(jax.jit, static_argnames=("causal", "strategy"))
def attention_bwd(res, g, *, causal: bool = True, strategy: str = "store"):
    """Backward: ``(dq, dk, dv, None)``, one cotangent per positional argument of the fwd
    (``None`` for the mask), from ``g = ∂L/∂O (..., h, t, e)``.

    ``dv = Pᵀ·g`` (``"nhts,nhte->nhse"``), ``dP = g·vᵀ`` (``"nhte,nhse->nhts"``),
    ``dS = P ⊙ (dP − rowsum(dP ⊙ P))`` (the row softmax's Jacobian collapse, ``(t, s)`` per
    head), ``dq = dS·k/√e`` (``"nhts,nhse->nhte"``), ``dk = dSᵀ·q/√e`` (``"nhts,nhte->nhse"``).
    ``"recompute"`` first rebuilds ``P = exp(q·kᵀ/√e − L)`` block by block of queries.
    """
    q, k, v = res[:3]
    s = k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    ka, va = _acc(k), _acc(v)

    def block(P, qb, gb):
        """``dq`` of the block's queries and its ``dk, dv`` contributions (``qb = q/√e``)."""
        dP = jnp.einsum("...te,...se->...ts", gb, va)  # "nhte,nhse->nhts"
        dS = P * (dP - jnp.sum(dP * P, axis=-1, keepdims=True))  # P ⊙ (dP − rowsum(dP ⊙ P))
        dq = jnp.einsum("...ts,...se->...te", dS, ka) * scale  # "nhts,nhse->nhte"
        dk = jnp.einsum("...ts,...te->...se", dS, qb)  # "nhts,nhte->nhse", (q/√e) already
        dv = jnp.einsum("...ts,...te->...se", P, gb)  # "nhts,nhte->nhse"
        return dq, dk, dv

    if strategy == "store":
        dq, dk, dv = block(res[3], _acc(q) * scale, _acc(g))  # q/√e, as in the forward
    else:
        where, L = res[3], res[4]
        t = q.shape[-2]

        def body(start, tq, carry):
            dq, dk, dv = carry
            qb, gb = _acc(_rows(q, start, tq)) * scale, _acc(_rows(g, start, tq))
            Lb = lax.dynamic_slice_in_dim(L, start, tq, axis=L.ndim - 1)
            Lb = jnp.where(Lb == -jnp.inf, 0.0, Lb)  # fully masked rows: P is 0 anyway
            mask = _mask(start, tq, s, causal, where)
            P = _select(mask, jnp.exp(_scores(qb, ka) - Lb[..., None]), 0.0)
            dqb, dkb, dvb = block(P, qb, gb)
            dq = lax.dynamic_update_slice_in_dim(dq, dqb, start, axis=dq.ndim - 2)
            return dq, dk + dkb, dv + dvb

        zeros = (jnp.zeros(q.shape, ka.dtype), jnp.zeros(ka.shape, ka.dtype))
        dq, dk, dv = _over_blocks(t, body, (*zeros, jnp.zeros(va.shape, va.dtype)), (res, g))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


@functools.partial(jax.jit, static_argnames=("causal", "strategy"))
def attention_jvp(res, tangents, *, causal: bool = True, strategy: str = "store"):
    """Forward mode: ``Ȯ (..., h, t, e)`` from the tangents ``(q̇, k̇, v̇, None)``::

        Ṡ = (q̇·kᵀ + q·k̇ᵀ)/√e        "nhte,nhse->nhts"
        Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ))   the row softmax's Jacobian on Ṡ   (t, s)
        Ȯ = Ṗ·v + P·v̇                "nhts,nhse->nhte"

    ``"recompute"`` rebuilds ``P`` from ``L`` block by block of queries, as its backward.
    """
    q, k, v = res[:3]
    dq, dk, dv = tangents[:3]  # None: a zero tangent (its terms are left out)
    s = k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    ka, va = _acc(k), _acc(v)
    dka, dva = (None if t is None else _acc(t) for t in (dk, dv))

    def block(P, qb, dqb):
        """``Ȯ`` of the block's queries (``qb = q/√e``, ``dqb = q̇/√e``)."""
        dS = _checks.tangent_sum(  # Ṡ   "nhte,nhse->nhts"
            None if dqb is None else _scores(dqb, ka), None if dka is None else _scores(qb, dka)
        )
        dO = None
        if dS is not None:  # Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ)), then Ṗ·v
            dP = P * (dS - jnp.sum(P * dS, axis=-1, keepdims=True))
            dO = jnp.einsum("...ts,...se->...te", dP, va)
        if dva is not None:  # + P·v̇
            dO = _checks.tangent_sum(dO, jnp.einsum("...ts,...se->...te", P, dva))
        return dO

    if strategy == "store":
        dqs = None if dq is None else _acc(dq) * scale
        dO = block(res[3], _acc(q) * scale, dqs)
        return dO.astype(q.dtype)
    where, L = res[3], res[4]

    def body(start, tq, dO):
        qb = _acc(_rows(q, start, tq)) * scale
        dqb = None if dq is None else _acc(_rows(dq, start, tq)) * scale
        Lb = lax.dynamic_slice_in_dim(L, start, tq, axis=L.ndim - 1)
        Lb = jnp.where(Lb == -jnp.inf, 0.0, Lb)  # fully masked rows: P is 0 anyway
        P = _select(_mask(start, tq, s, causal, where), jnp.exp(_scores(qb, ka) - Lb[..., None]),
                    0.0)  # fmt: skip
        return lax.dynamic_update_slice_in_dim(dO, block(P, qb, dqb), start, axis=dO.ndim - 2)

    dO = _over_blocks(q.shape[-2], body, jnp.zeros(q.shape, ka.dtype), (res, *tangents[:3]))
    return dO.astype(q.dtype)


@declare(
    fwd=attention_fwd, bwd=attention_bwd, jvp=attention_jvp, per_example=("q", "k", "v"),
    example_ndim=3,
)  # fmt: skip
def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    where: jax.Array | None = None,
    strategy: str = "store",
) -> jax.Array:
    """Scaled dot-product attention ``softmax(q·kᵀ/√e)·v``, heads as a leading axis.

    Args:
      q: queries ``(n..., h, t, e)``, floating.
      k: keys ``(n..., h, s, e)``, the dtype of ``q``.
      v: values ``(n..., h, s, e)``, the dtype of ``q``.
      causal: query ``i`` sees keys ``j ≤ i`` (needs ``t == s``).
      where: optional bool mask broadcastable to ``(n..., h, t, s)``; ``False`` scores are
        left out (``jax.nn``'s ``where=``); a row with nothing left has output 0, gradient 0.
      strategy: ``"store"`` (keep ``P (n..., h, t, s)`` for the backward) or ``"recompute"``
        (keep the log-sum-exp ``(n..., h, t)`` and rebuild ``P`` block by block: temporary
        memory linear in ``t``).

    Returns:
      ``O (n..., h, t, e)`` in the dtype of ``q`` (float32 inside for half precision).

    Raises:
      TypeError: non-floating or mismatched dtypes, a non-bool mask or ``causal``.
      ValueError: shapes that do not fit, ``causal`` with ``t ≠ s``, an unknown strategy.

    The gradient is :func:`attention_bwd`: ``dS = P ⊙ (dP − rowsum(dP ⊙ P))`` per head, the
    row softmax's ``(s, s)`` Jacobians collapsed, then ``dq = dS·k/√e``, ``dk = dSᵀ·q/√e``,
    ``dv = Pᵀ·g``.

    Example:
      >>> import jax.numpy as jnp, jaxbp
      >>> q = k = v = jnp.ones((2, 4, 3, 8))  # (n, h, t, e)
      >>> jaxbp.attention(q, k, v).shape
      (2, 4, 3, 8)
    """
    q, k, v, where, causal = _validate(q, k, v, where, causal, strategy)
    return _attention(q, k, v, where, causal=causal, strategy=strategy)


_attention = op_vjp(attention)  # reads attention.fwd / .bwd when JAX traces it
