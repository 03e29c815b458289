"""The one chunked softmax cross-entropy kernel: ``x·w (+ b)`` one vocabulary chunk at a time.

Index letters::

    n  tokens                  d  model dimension
    v  vocabulary (global)     k  one chunk of vocabulary columns (or of tokens, below)

With ``y' = (1 − ε)·onehot(y) + ε/v``, ``u = cw ⊙ y'`` and the (optionally soft-capped)
logits ``z = cap·tanh((x·w + b)/cap)``, per row::

    lse  = log Σ_v e^{z}                                       online, chunk by chunk
    loss = (Σ_v u)·lse − (1−ε)·cw[y]·z[y] − (ε/v)·Σ_v cw·z + λ·lse²
    dz_k = g·(p_k·(Σ_v u + 2λ·lse) − u_k),   p_k = exp(z_k − lse)        (n,k) per chunk
    dx   = Σ_chunks dz̃_k · w_kᵀ   "nk,dk->nd";  dw_k = xᵀ·dz̃_k  "nd,nk->dk";  db_k = Σ_n dz̃_k

(``dz̃ = dz ⊙ (1 − (z/cap)²)`` with a softcap). Two losses run this code:

* :func:`jaxbp.linear_softmax_cross_entropy` (:mod:`jaxbp.fused`) on one device: ``w (d, v)``
  whole, the row reductions the identity (:data:`LOCAL`);
* :func:`jaxbp.parallel.vocab_parallel_linear_softmax_cross_entropy` on each device of a
  mesh axis that splits ``w``'s columns: ``w_k (d, v/P)``, and the per-row statistics
  combined across the shards by ``pmax``/``psum`` over that axis (``Reduce(axis)``): the
  running max, the rescaled sums of exponentials, the target logits and label terms, and
  the input gradient ``dx``. Integer ids are global; each shard sees its own columns.

:func:`forward_with_grads` (the fused loss's ``"forward"`` strategy) runs over token chunks
with whole vocabulary rows, on one device only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import _checks, _vma
from ._ce import _bad_labels, valid_rows
from ._contrib import Factor, OneHot, Rows
from ._vma import LOCAL, Reduce

__all__ = [
    "LOCAL", "LogitGrads", "Reduce", "dlogits", "flat_rows", "forward_with_grads",
    "grads_recompute", "loss_and_lse",
    "row_terms",
]  # fmt: skip


def mm(a, b, contract, acc):
    """``lax.dot_general`` contracting ``a``'s axis ``contract[0]`` with ``b``'s
    ``contract[1]``, accumulated and returned in ``acc`` (float32 for bfloat16 inputs)."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=acc)  # fmt: skip


def over_chunks(total, size, body, carry, vma=frozenset()):
    """Run ``body(start, k, carry)`` over ``[0, total)`` in chunks of ``k = size``.

    Full chunks run in a ``fori_loop`` (``start`` traced); a shorter last chunk, if any, runs
    once more with its own static length, so nothing is padded and no column is masked.
    Inside a ``shard_map``, ``vma`` names the mesh axes the carried values vary along (all
    the axes of the inputs they are computed from): the carry starts with that type.
    """
    carry = _vma.pvary_tree(carry, vma)
    nfull, rem = divmod(total, size)
    if nfull:
        carry = lax.fori_loop(0, nfull, lambda j, c: body(j * size, size, c), carry)
    if rem:
        carry = body(nfull * size, rem, carry)
    return carry


def chunk(chunk_size, total, default):
    """The chunk length: ``chunk_size`` (or ``default``), at least 1, at most ``total``."""
    return max(1, min(total, default if chunk_size is None else int(chunk_size)))


def transposed_for_dw(x):
    """``xᵀ (d, n)``, made once before the chunk loop, for the ``dW`` products.

    Each chunk's ``dW`` contracts the token axis, the first axis of both ``x`` and ``dz``; on
    XLA:CPU that dot can miss the fast matmul kernel (the dense layer's ``dW`` has the same
    effect, :mod:`jaxbp.dense`): for 512 tokens × d 512 × 32768 columns it took 1.4× the
    time of the same product from ``xᵀ`` on one AVX-512 CPU. Unlike the dense layer's
    per-product transpose, this one is made once per call (``n·d`` copies, against ``n·d·v``
    multiply-adds in the loop), so where the plain dot is as fast it costs that copy and
    nothing more: the choice holds on any CPU, and it is the same program every run. Off the
    CPU the transpose is left to XLA, which folds it into the dot.
    """
    return lax.platform_dependent(
        x, cpu=lambda x: lax.optimization_barrier(x.T), default=lambda x: x.T
    )


def flat_rows(x, labels, where):
    """``x (n,d)``, ``labels (n,)`` as int32 or wider (so column ids never wrap), ``where``."""
    d = x.shape[-1]
    lab = labels.reshape(-1)
    if lab.dtype.itemsize < 4:
        lab = lab.astype(jnp.int32)
    return x.reshape(-1, d), lab, None if where is None else where.reshape(-1)


def cols(a, start, k, axis):
    return lax.dynamic_slice_in_dim(a, start, k, axis=axis)


def logits(x, w_k, b_k, acc, softcap):
    """``z (n,k)`` in ``acc`` and ``t = tanh(z̃/cap)`` (or ``None``) for one chunk."""
    z = mm(x, w_k, (1, 0), acc)  # "nd,dk->nk"
    if b_k is not None:
        z = z + b_k.astype(acc)
    if softcap is None:
        return z, None
    t = jnp.tanh(z / softcap)
    return softcap * t, t


def smoothed(labels, start, k, eps, v, acc):
    """``y' (n,k)`` for the (global) columns ``[start, start + k)``, and the one-hot ``hit``."""
    ids = jnp.arange(k, dtype=labels.dtype) + jnp.asarray(start).astype(labels.dtype)
    hit = labels[:, None] == ids[None, :]
    y = hit.astype(acc)
    if not _checks.is_static_zero(eps):
        y = (1.0 - eps) * y + eps / v
    return y, hit


def row_terms(labels, where, cw, *, v, eps, ignore_index, acc, red=LOCAL):
    """Per-row pieces that do not depend on the logits: ``valid, bad, Σ_v u, cw[y]`` (n,).

    ``labels`` are global ids; ``cw`` is this shard's slice of the class weights (all of
    them on one device): ``cw[y]`` comes from the shard that holds column ``y``."""
    valid = valid_rows(labels, where, ignore_index=ignore_index, batch_shape=labels.shape)
    bad = _bad_labels(labels, v, ignore_index) & valid
    if cw is None:
        ones = jnp.ones(labels.shape, acc)
        return valid, bad, ones, ones  # Σ_v u = (1 − ε)·1 + (ε/v)·v
    cwa, eps = cw.astype(acc), _checks.as_scalar(eps, acc)
    v_local = cwa.shape[0]
    local = labels - red.first_column(v_local, labels.dtype)  # the ids on this shard
    own = (local >= 0) & (local < v_local)
    cw_y = red.sum(jnp.where(own, cwa[jnp.clip(local, 0, v_local - 1)], 0.0))
    su = (1.0 - eps) * cw_y + (eps / v) * red.sum(jnp.sum(cwa))
    return valid, bad, su, cw_y


def _finish_loss(lse, zy, zc, valid, bad, su, cw_y, *, v, eps, z_loss):
    """``loss = Σu·lse − (1−ε)·cw[y]·z[y] − (ε/v)·Σ cw·z + λ·lse²`` on valid rows."""
    loss = su * lse - (1.0 - eps) * jnp.where(cw_y == 0, 0.0, cw_y * zy)
    if not _checks.is_static_zero(eps):
        loss = loss - _checks.scaled(eps, zc) / v
    if not _checks.is_static_zero(z_loss):
        loss = loss + _checks.scaled(z_loss, lse * lse)
    loss = jnp.where(valid, loss, 0.0)
    return jnp.where(bad, jnp.nan, loss)


# ------------------------------------------------------------------------ loss only


def loss_and_lse(x, w, b, labels, where, cw, *, v, ignore_index, label_smoothing, z_loss,
                 softcap, chunk_size, acc, default_chunk, red=LOCAL):  # fmt: skip
    """Loss, ``lse`` and ``Σ_v u`` (n,) by an online log-sum-exp over vocabulary chunks.

    ``x (n, d)``, ``w (d, v_local)``, ``b``/``cw`` ``(v_local,)`` (this shard's columns),
    ``labels (n,)`` global ids; ``red`` combines the shards' statistics (one ``pmax`` and
    one ``psum`` of ``(3, n)``)."""
    n, v_local = x.shape[0], w.shape[1]
    eps, z_loss = _checks.as_scalar(label_smoothing, acc), _checks.as_scalar(z_loss, acc)
    offset = red.first_column(v_local, labels.dtype)

    def body(start, k, carry):
        m, s, zy, zc = carry  # running max, Σ e^{z − m}, z[y], Σ cw·z    (n,) each
        b_k = None if b is None else cols(b, start, k, 0)
        z, _ = logits(x, cols(w, start, k, 1), b_k, acc, softcap)  # (n,k)
        _, hit = smoothed(labels, offset + start, k, 0.0, v, acc)
        zy = zy + jnp.sum(jnp.where(hit, z, 0.0), axis=1)
        if not _checks.is_static_zero(eps):
            if cw is None:
                zc = zc + jnp.sum(z, axis=1)
            else:
                cw_k = cols(cw, start, k, 0).astype(acc)
                zc = zc + jnp.sum(jnp.where(cw_k == 0, 0.0, cw_k * z), axis=1)
        # the running max is a shift only (every result is exact in it): JAX's derivative of
        # the rule leaves it out
        m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(z, axis=1)))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all −inf so far: no NaN
        s = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(z - m_safe[:, None]), axis=1)
        return m_new, s, zy, zc

    zeros = jnp.zeros((n,), acc)
    m0 = jnp.full((n,), -jnp.inf, acc)
    vma = _vma.union(x, w, b, labels, where, cw)
    size = chunk(chunk_size, v_local, default_chunk)
    m_k, s_k, zy, zc = over_chunks(v_local, size, body, (m0, zeros, zeros, zeros), vma)
    m = red.max(m_k)  # the row max over every shard (n,)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    if red.axis is not None:  # each shard's Σ e^{z − m_k}, rescaled to the common max
        mk_safe = jnp.where(jnp.isfinite(m_k), m_k, 0.0)
        s_k = jnp.where(s_k > 0, s_k * jnp.exp(mk_safe - m_safe), 0.0)  # exp ≤ 1
        s_k, zy, zc = red.sum(jnp.stack([s_k, zy, zc]))  # one all-reduce (3, n)
    lse = m_safe + jnp.log(s_k)
    valid, bad, su, cw_y = row_terms(
        labels, where, cw, v=v, eps=eps, ignore_index=ignore_index, acc=acc, red=red
    )
    loss = _finish_loss(lse, zy, zc, valid, bad, su, cw_y, v=v, eps=eps, z_loss=z_loss)
    return loss, lse, su


# --------------------------------------------------------------- recompute backward


def dlogits(z, t, u, lse, scale, g, valid, bad):
    """``dz̃ = g·(p·scale − u)``, ``p = e^{z − lse}``, ``scale = Σ_v u + 2λ·lse``, chained
    through the softcap (``⊙ (1 − t²)``, ``t = tanh(z̃/cap)``); 0 on rows that are not
    ``valid``, NaN on ``bad`` ones. The row quantities (``lse``, ``scale``, ``g``, ``valid``,
    ``bad``) broadcast against ``z``: ``(n, 1)`` for a chunk ``(n, k)`` of columns."""
    dz = g * (jnp.exp(z - lse) * scale - u)  # "n,nk->nk"
    dz = jnp.where(valid, dz, 0.0)
    dz = jnp.where(bad, jnp.nan, dz)
    return dz if t is None else dz * (1.0 - t * t)  # through z = cap·tanh(z̃/cap)


def grads_recompute(x, w, b, labels, where, cw, lse, su, g, *, v, ignore_index,
                    label_smoothing, z_loss, softcap, chunk_size, acc, default_chunk,
                    param_dtype=None, red=LOCAL):  # fmt: skip
    """``(dx (n,d), dw (d,v_local), db, dcw)`` for upstream ``g (n,)``, logits recomputed
    per vocabulary chunk from ``x``, ``w`` and ``lse (n,)``.

    ``dx = red.sum(Σ_chunks dz·w_kᵀ)`` in ``x``'s dtype: every shard's classes contribute to
    every row (the one all-reduce of the backward). ``dw``, ``db``, ``dcw`` are this shard's
    columns, each chunk written once, in ``param_dtype`` (default: the parameter's own
    dtype; the accumulation dtype when the caller sums them over more devices first).
    """
    v_local = w.shape[1]
    eps, z_loss = _checks.as_scalar(label_smoothing, acc), _checks.as_scalar(z_loss, acc)
    offset = red.first_column(v_local, labels.dtype)
    valid, bad, _, _ = row_terms(
        labels, where, None, v=v, eps=eps, ignore_index=ignore_index, acc=acc, red=red
    )
    gv = jnp.where(valid, g.astype(acc), 0.0)  # (n,); masked rows: exactly 0
    scale = su + _checks.scaled(z_loss, 2.0 * lse)  # Σ_v u + 2λ·lse   (n,)
    dtype_of = (lambda a: a.dtype) if param_dtype is None else (lambda a: jnp.dtype(param_dtype))

    def body(start, k, carry):
        dx, dw, db, dcw = carry
        w_k = cols(w, start, k, 1)  # (d,k)
        b_k = None if b is None else cols(b, start, k, 0)
        z, t = logits(x, w_k, b_k, acc, softcap)  # (n,k), recomputed
        y, _ = smoothed(labels, offset + start, k, eps, v, acc)  # y' (n,k)
        cw_k = None if cw is None else cols(cw, start, k, 0).astype(acc)
        u = y if cw_k is None else y * cw_k
        dz = dlogits(z, t, u, *(r[:, None] for r in (lse, scale, gv, valid, bad)))
        if cw is not None:  # dcw_k = Σ_n g·y'⊙(lse − z)    "nk->k"
            per_row = jnp.where(y == 0, 0.0, y * (gv[:, None] * (lse[:, None] - z)))
            per_row = jnp.where(valid[:, None], per_row, 0.0)
            dcw = lax.dynamic_update_slice_in_dim(
                dcw, jnp.sum(per_row, axis=0).astype(dcw.dtype), start, 0
            )
        dz_in = dz.astype(w.dtype)  # as the unfused path: dlogits in the input dtype
        dx = dx + mm(dz_in, w_k, (1, 1), acc)  # "nk,dk->nd"
        dw_k = mm(xt, dz_in, (1, 0), acc).astype(dw.dtype)  # "dn,nk->dk", xt = xᵀ
        dw = lax.dynamic_update_slice_in_dim(dw, dw_k, start, 1)
        if b is not None:
            db = lax.dynamic_update_slice_in_dim(
                db, jnp.sum(dz, axis=0).astype(db.dtype), start, 0
            )  # "nk->k"
        return dx, dw, db, dcw

    carry = (
        jnp.zeros(x.shape, acc),
        jnp.zeros(w.shape, dtype_of(w)),
        None if b is None else jnp.zeros(b.shape, dtype_of(b)),
        None if cw is None else jnp.zeros(cw.shape, dtype_of(cw)),
    )
    vma = _vma.union(x, w, b, labels, where, cw, lse, g)
    size = chunk(chunk_size, v_local, default_chunk)
    xt = transposed_for_dw(x)
    dx, dw, db, dcw = over_chunks(v_local, size, body, carry, vma)
    return red.sum(dx).astype(x.dtype), dw, db, dcw


# ------------------------------------------------------- gradients in the forward pass


def forward_with_grads(x, w, b, labels, where, cw, *, ignore_index, label_smoothing, z_loss,
                       softcap, chunk_size, acc, default_chunk):  # fmt: skip
    """Loss, lse and the gradients for ``g = 1`` on every row, over token chunks (one device).

    Each token chunk holds its whole ``(k, v)`` logits: one matmul for the logits, two for
    the gradients, the unfused FLOPs. Returns ``(loss, lse, dx1 (n,d), dw1 (d,v),
    db1 (v,) | None, dcw1 (v,) | None)``, all in the accumulation dtype.
    """
    n, d = x.shape
    v = w.shape[1]
    eps, z_loss = _checks.as_scalar(label_smoothing, acc), _checks.as_scalar(z_loss, acc)
    valid, bad, su, _ = row_terms(
        labels, where, cw, v=v, eps=eps, ignore_index=ignore_index, acc=acc
    )
    cwa = None if cw is None else cw.astype(acc)

    def body(start, k, carry):
        loss, lse, dx, dw, db, dcw = carry
        x_k = cols(x, start, k, 0)  # (k,d)
        lab = cols(labels, start, k, 0)
        ok, bad_k, su_k = (cols(a, start, k, 0) for a in (valid, bad, su))
        z, t = logits(x_k, w, b, acc, softcap)  # (k,v), whole rows
        lse_k = jax.nn.logsumexp(z, axis=1)
        y, _ = smoothed(lab, 0, v, eps, v, acc)  # y' (k,v)
        u = y if cwa is None else y * cwa
        nll = lse_k[:, None] - z
        loss_k = jnp.sum(jnp.where(u == 0, 0.0, u * nll), axis=1)
        if not _checks.is_static_zero(z_loss):
            loss_k = loss_k + _checks.scaled(z_loss, lse_k * lse_k)
        loss_k = jnp.where(bad_k, jnp.nan, jnp.where(ok, loss_k, 0.0))
        scale, ones = su_k + _checks.scaled(z_loss, 2.0 * lse_k), jnp.ones_like(lse_k)
        dz = dlogits(z, t, u, *(r[:, None] for r in (lse_k, scale, ones, ok, bad_k)))  # g = 1
        if cwa is not None:  # Σ_k y'⊙(lse − z), valid rows      "kv->v"
            per_row = jnp.where(ok[:, None] & (y != 0), y * nll, 0.0)
            dcw = dcw + jnp.sum(per_row, axis=0)
        dz_in = dz.astype(w.dtype)
        dx_k = mm(dz_in, w, (1, 1), acc)  # "kv,dv->kd"
        dw = dw + mm(cols(xt, start, k, 1), dz_in, (1, 0), acc)  # "dk,kv->dv", xt = xᵀ
        if db is not None:
            db = db + jnp.sum(dz, axis=0)
        put = functools.partial(lax.dynamic_update_slice_in_dim, start_index=start, axis=0)
        return put(loss, loss_k), put(lse, lse_k), put(dx, dx_k), dw, db, dcw

    carry = (
        jnp.zeros((n,), acc),
        jnp.zeros((n,), acc),
        jnp.zeros((n, d), acc),
        jnp.zeros((d, v), acc),
        None if b is None else jnp.zeros((v,), acc),
        None if cw is None else jnp.zeros((v,), acc),
    )
    default = max(1, default_chunk // max(v, 1))
    tokens = chunk(chunk_size, n, default)
    xt = transposed_for_dw(x)
    return over_chunks(n, tokens, body, carry, _vma.union(x, w, b, labels, where, cw))


def acc_dtype(accum_dtype, x_dtype):
    """The accumulation dtype: ``accum_dtype``, or float32 for half precision."""
    return _checks.accum_dtype(x_dtype) if accum_dtype is None else jnp.dtype(accum_dtype)


# ------------------------------------------------ per example: dz as a lazy factor


@dataclasses.dataclass(frozen=True, eq=False)
class LogitGrads(Factor):
    """The rows ``dz̃_t (v,)`` of the head's logit gradient, ``T`` tokens per example, as a
    factor of the per-example weight gradient ``Σ_t x_t dz̃_tᵀ`` (:mod:`jaxbp._contrib`),
    computed one vocabulary chunk at a time so that no ``(n, T, v)`` array exists::

        gram(self, self)    Σ_v dz̃_t·dz̃_s   (n, T, T)   chunk by chunk   "ntk,nsk->nts"
        gram(self, OneHot)  dz̃_t[id_s]      (n, T, S)   logits at the ids' columns only
        gram(self, Rows)    Σ_v dz̃_t·c_s    (n, T, S)   chunk by chunk
        outer(self, Rows)   Σ_t dz̃_t ⊗ c_t  (n, v, e)   chunk by chunk (per-example gradients)

    ``x (N, d)``, ``labels``/``where``/``lse``/``g`` ``(N,)`` for ``N = n·T`` tokens,
    example-major; ``w (d, v)``, ``b``/``cw`` ``(v,)`` or ``None``.
    """

    x: jax.Array
    w: jax.Array
    b: Any
    labels: jax.Array
    where: Any
    cw: Any
    lse: jax.Array
    g: jax.Array
    examples: int
    eps: Any
    z_loss: Any
    ignore_index: Any
    softcap: Any
    acc: Any
    chunk_size: int

    @property
    def n(self):
        return self.examples

    @property
    def rows(self):
        return self.x.shape[0] // self.examples

    @property
    def size(self):
        return self.w.shape[1]

    def _rows(self):
        """``lse, scale, g, valid, bad`` per token ``(N,)``."""
        v, acc = self.size, self.acc
        eps = _checks.as_scalar(self.eps, acc)
        valid, bad, su, _ = row_terms(self.labels, self.where, self.cw, v=v, eps=eps,
                                      ignore_index=self.ignore_index, acc=acc)  # fmt: skip
        gv = jnp.where(valid, self.g.astype(acc), 0.0)
        scale = su + _checks.scaled(_checks.as_scalar(self.z_loss, acc), 2.0 * self.lse)
        return self.lse, scale, gv, valid, bad

    def _chunk(self, start, k, rows):
        """``dz̃ (n, T, k)`` for the columns ``[start, start + k)``."""
        b_k = None if self.b is None else cols(self.b, start, k, 0)
        z, t = logits(self.x, cols(self.w, start, k, 1), b_k, self.acc, self.softcap)
        y, _ = smoothed(self.labels, start, k, _checks.as_scalar(self.eps, self.acc),
                        self.size, self.acc)  # fmt: skip
        u = y if self.cw is None else y * cols(self.cw, start, k, 0).astype(self.acc)
        dz = dlogits(z, t, u, *(r[:, None] for r in rows))
        return dz.reshape(self.n, self.rows, k)

    def _at(self, ids):
        """``dz̃ (n, T, S)`` at the columns ``ids (n, S)`` of each example (in range)."""
        n, T, acc = self.n, self.rows, self.acc
        x3 = self.x.reshape(n, T, -1)
        w_cols = jnp.take(self.w, ids, axis=1)  # (d, n, S)
        z = jnp.einsum("ntd,dns->nts", x3, w_cols, preferred_element_type=acc)
        if self.b is not None:
            z = z + self.b[ids].astype(acc)[:, None, :]
        t = None
        if self.softcap is not None:
            t = jnp.tanh(z / self.softcap)
            z = self.softcap * t
        eps = _checks.as_scalar(self.eps, acc)
        u = (self.labels.reshape(n, T)[:, :, None] == ids[:, None, :]).astype(acc)
        if not _checks.is_static_zero(eps):
            u = (1.0 - eps) * u + eps / self.size
        if self.cw is not None:
            u = u * self.cw[ids].astype(acc)[:, None, :]
        rows = (r.reshape(n, T, 1) for r in self._rows())
        return dlogits(z, t, u, *rows)

    def _over_vocab(self, body, carry):
        size = chunk(self.chunk_size, self.size, self.chunk_size)
        return over_chunks(self.size, size, body, carry)

    def gram(self, other):
        rows = self._rows()
        if isinstance(other, LogitGrads):
            theirs = rows if other is self else other._rows()

            def body(start, k, acc):
                mine = self._chunk(start, k, rows)
                yours = mine if other is self else other._chunk(start, k, theirs)
                return acc + jnp.einsum("ntk,nsk->nts", mine, yours)

            return self._over_vocab(body, jnp.zeros((self.n, self.rows, other.rows), self.acc))
        if isinstance(other, OneHot):
            ok = (other.ids >= 0) & (other.ids < self.size)
            at = self._at(jnp.clip(other.ids, 0, self.size - 1))
            return jnp.where(ok[:, None, :], at, 0.0)
        if isinstance(other, Rows):

            def body(start, k, acc):
                c = cols(other.a, start, k, 2).astype(self.acc)
                return acc + jnp.einsum("ntk,nsk->nts", self._chunk(start, k, rows), c)

            return self._over_vocab(body, jnp.zeros((self.n, self.rows, other.rows), self.acc))
        return NotImplemented

    def outer(self, other):
        if not isinstance(other, Rows):
            return NotImplemented
        rows, c = self._rows(), other.a.astype(self.acc)

        def body(start, k, out):
            part = jnp.einsum("ntk,nte->nke", self._chunk(start, k, rows), c)
            return lax.dynamic_update_slice_in_dim(out, part, start, 1)

        return self._over_vocab(body, jnp.zeros((self.n, self.size, c.shape[2]), self.acc))

    def row_sums(self):
        """``Σ_t dz̃_t (n, v)`` per example: each example's bias gradient."""
        rows = self._rows()

        def body(start, k, out):
            part = jnp.sum(self._chunk(start, k, rows), axis=1)
            return lax.dynamic_update_slice_in_dim(out, part, start, 1)

        return self._over_vocab(body, jnp.zeros((self.n, self.size), self.acc))
