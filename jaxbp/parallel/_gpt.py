"""The GPT across devices: data, tensor (Megatron-LM) and vocabulary parallelism, with every
collective written into the explicit forward and backward loop.

Index letters, per device (the shapes one device holds inside the ``shard_map``)::

    n  sequences on this data shard (n·D in the batch)     t  positions
    d  model width        h  heads here (H/P)     e  head width (d = H·e)     g = h·e = d/P
    f  MLP width here (F/P)      v  vocabulary here (V/P)      V  the whole vocabulary
    D  devices on the data axis ``axis``;  P  devices on the model axis ``model_axis``

The layout is Megatron-LM's (:mod:`jaxbp.parallel._layout`), and so are the two conjugate
operators around each parallel region, written out below beside the matrix product each
one pairs with (no autodiff of a collective anywhere):

* **f**: identity forward, ``psum`` over the model axis backward. A block's replicated
  input ``a (n,t,d)`` enters the column-split product ``a·W_k (d, 3g)``; every device's
  ``da_k = dqkv_k·W_kᵀ`` is a partial sum of ``da``: one all-reduce of ``(n,t,d)``.
* **g**: ``psum`` forward, identity backward. The row-split product ``o_k·W_k (g, d)``
  gives a partial sum of the block's output: one all-reduce of ``(n,t,d)``; its gradient
  ``δ (n,t,d)`` is already the same on every device.

Forward, per device (``x (n,t,d)`` the same on every device of the model axis)::

    x    = g(embed(ids, tok_k (v,d)) on the ids this device holds) + pos[:t]   all-reduce ntd
    per block:
      a      = layer_norm(x)                               f: identity
      q,k,v  = split(a·W_qkv,k + b_qkv,k)                  (n,h,t,e) each: this device's heads
      o      = attention(q, k, v, causal)                  (n,h,t,e)
      x      = x + g(merge(o)·W_proj,k) + b_proj           (n,t,d)     all-reduce ntd
      m      = layer_norm(x)                               f: identity
      x      = x + g(gelu(m·W_fc,k + b_fc,k)·W_out,k) + b_out            all-reduce ntd
    loss = the chunked softmax-CE kernel on layer_norm(x)·W_head,k (d,v)   pmax nt, psum 3nt

Backward, the same loop reversed: the head's ``dx = psum(Σ_chunks dz·W_head,kᵀ)`` (one
all-reduce of ``ntd``, inside the kernel), then per block the two f-backward all-reduces
(``dm`` and ``da``, ``ntd`` each); g's backward and the embedding's are the identity. Last,
the data-parallel all-reduce over ``axis`` of every gradient this device holds (each split
part ``1/P``). Per device and step, in elements (``L`` blocks)::

    model axis   forward  (2L + 1)·ntd + 4nt       backward (2L + 1)·ntd
    data axis    the gradient: |θ|/P of the split parts + all of the replicated ones, and
                 two scalars (the valid-token count and the loss)

which is Megatron-LM's count: two all-reduces of ``n·t·d`` per block forward and two
backward, the embedding's and the head's, and nothing else (the qkv columns are stored per
head, so a device's contiguous block of them is its heads: nothing is re-laid out).

The head runs the kernel's ``"recompute"`` strategy (the single-device GPT's default
``head_strategy="forward"`` needs whole vocabulary rows on one device): the same values,
the logits recomputed chunk by chunk in the backward.

**The mean over valid tokens.** Each data shard counts its valid tokens ``N_k``; one
``psum`` gives ``N``, and every shard seeds its backward with ``1/max(N, 1)`` on its valid
tokens: the gradient of the global mean, exact however unevenly ``where`` masks the shards
(a shard with none contributes 0), and the data-parallel ``psum`` of the gradients adds up
the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from .. import _checks, _step, _xent
from .._op import rules
from .._vma import Reduce
from ..activations import gelu
from ..attention import attention
from ..dense import dense
from ..embedding import embedding
from ..fused import DEFAULT_CHUNK, linear_softmax_cross_entropy
from ..gpt import GPT, _join_qkv, _merge_heads, _split_heads, _split_qkv
from ..losses import valid_rows
from ..norms import layer_norm
from . import _layout
from ._mesh import P, axis_size, call, host_readable, no_dropout, not_divisible, round_up

__all__ = ["value_and_grad"]

# The ops of the loop: their rules are part of the compiled step's cache key.
_LOOP_OPS = (embedding, layer_norm, dense, attention, gelu, linear_softmax_cross_entropy)


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


def _sum_nt(g):
    """``Σ_{n,t} g  "ntd->d"``: the gradient of a bias added after an all-reduce."""
    return jnp.sum(g, axis=(0, 1), dtype=_checks.accum_dtype(g.dtype)).astype(g.dtype)


# ------------------------------------------------------------------------ per device


def _forward(model: GPT, axes, params, ids, targets, where):
    """Forward on one device: ``(loss (n·t,), valid (n·t,), state)``; ``state`` holds every
    rule's residuals in the order :func:`_backward` consumes them."""
    m, p = axes  # the model axis (or None) and its size P
    red = Reduce(m)  # psum / pmax over the model axis (nothing when m is None)
    n, t = ids.shape
    eps, h = model.eps, model.heads // p

    # Vocabulary-parallel embedding: this device holds rows [k·v, (k+1)·v) of tok.
    tok = params["tok"]  # (v, d)
    local = ids - red.first_column(tok.shape[0], ids.dtype)
    own = (local >= 0) & (local < tok.shape[0])
    x_k, tok_res = embedding.fwd(jnp.where(own, local, -1), tok)  # others' ids: dropped
    x = red.sum(jnp.where(own[..., None], x_k, 0.0))  # g: all-reduce (n,t,d)
    bad = (ids < 0) | (ids >= model.vocab)  # an id no device holds: NaN, as on one device
    x = jnp.where(bad[..., None], jnp.nan, x).astype(tok.dtype) + params["pos"][:t]

    blocks = []
    for blk in params["blocks"]:
        a, ln1 = layer_norm.fwd(x, blk["ln1"]["gamma"], blk["ln1"]["beta"], eps=eps)
        # f: identity forward. This device's block of [q₀ k₀ v₀ | q₁ …]: its h heads' columns.
        qkv, qkv_res = dense.fwd(a, blk["attn"]["qkv"]["w"], blk["attn"]["qkv"]["b"])  # c = 3g
        q, k, v = _split_qkv(qkv, h)  # (n, h, t, e) each
        o, att = attention.fwd(q, k, v, None, causal=True, strategy=model.attention)
        y_k, proj = dense.fwd(_merge_heads(o), blk["attn"]["proj"]["w"])  # "ntg,gd->ntd"
        x = x + red.sum(y_k) + blk["attn"]["proj"]["b"]  # g: all-reduce (n,t,d)
        mm, ln2 = layer_norm.fwd(x, blk["ln2"]["gamma"], blk["ln2"]["beta"], eps=eps)
        # f: identity forward; the MLP's first product split by columns, f = F/P.
        hid, fc = dense.fwd(mm, blk["mlp"]["fc"]["w"], blk["mlp"]["fc"]["b"])  # "ntd,df->ntf"
        act, act_res = gelu.fwd(hid)
        y_k, out = dense.fwd(act, blk["mlp"]["out"]["w"])  # "ntf,fd->ntd": row-split
        x = x + red.sum(y_k) + blk["mlp"]["out"]["b"]  # g: all-reduce (n,t,d)
        blocks.append((ln1, qkv_res, att, proj, ln2, fc, act_res, out))
    xf, lnf = layer_norm.fwd(x, params["ln_f"]["gamma"], params["ln_f"]["beta"], eps=eps)

    # The vocabulary-parallel head: the chunked kernel on this device's columns (d, v),
    # the row statistics combined over the model axis (pmax (n·t,), psum (3, n·t)).
    xf = xf.reshape(n * t, model.d)
    w_head = tok.T if model.tied else params["head"]["w"]  # (d, v)
    labels = targets.reshape(-1).astype(jnp.int32)
    flat_where = None if where is None else where.reshape(-1)
    head_opts = _head_options(model, xf.dtype, red)
    loss, lse, su = _xent.loss_and_lse(xf, w_head, None, labels, flat_where, None, **head_opts)
    valid = valid_rows(labels, flat_where, batch_shape=(n * t,))
    head = (xf, w_head, labels, flat_where, lse, su)
    return loss, valid, (tok_res, own, blocks, lnf, head, (n, t))


def _backward(model: GPT, axes, state, seed):
    """Reverse loop on one device from the seed ``(n·t,) = ∂L/∂loss``: this device's part
    of every gradient (not yet summed over the data axis), like the parameters."""
    m, p = axes
    red = Reduce(m)
    tok_res, own, blocks, lnf, (xf, w_head, labels, where, lse, su), (n, t) = state
    eps, h = model.eps, model.heads // p
    head_opts = _head_options(model, xf.dtype, red)
    # dx = psum(Σ_chunks dz·W_head,kᵀ)  "nv,dv->nd": the head's all-reduce (n·t, d)
    dxf, dw_head, _, _ = _xent.grads_recompute(
        xf, w_head, None, labels, where, None, lse, su, seed, **head_opts
    )
    dx, dgf, dbf = layer_norm.bwd(lnf, dxf.reshape(n, t, model.d), eps=eps)
    grads_blocks = []
    for ln1, qkv_res, att, proj, ln2, fc, act_res, out in reversed(blocks):
        # MLP branch. g's backward is the identity: dx is the same on every device.
        db_out = _sum_nt(dx)
        dact, dw_out, _ = dense.bwd(out, dx)  # "ntd,fd->ntf"
        (dhid,) = gelu.bwd(act_res, dact)
        dm_k, dw_fc, db_fc = dense.bwd(fc, dhid)  # "ntf,df->ntd": a partial sum over f
        dm = red.sum(dm_k)  # f backward: all-reduce (n,t,d)
        dxm, dg2, db2 = layer_norm.bwd(ln2, dm, eps=eps)
        dx = dx + dxm
        # Attention branch.
        db_proj = _sum_nt(dx)
        do, dw_proj, _ = dense.bwd(proj, dx)  # "ntd,gd->ntg"
        dq, dk, dv, _ = attention.bwd(
            att, _split_heads(do, h), causal=True, strategy=model.attention
        )  # (n, h, t, e) each, through dS = P ⊙ (dP − rowsum(dP ⊙ P))
        da_k, dw_qkv, db_qkv = dense.bwd(qkv_res, _join_qkv(dq, dk, dv))  # partial over c
        da = red.sum(da_k)  # f backward: all-reduce (n,t,d)
        dxa, dg1, db1 = layer_norm.bwd(ln1, da, eps=eps)
        dx = dx + dxa
        grads_blocks.append({
            "ln1": {"gamma": dg1, "beta": db1},
            "attn": {"qkv": {"w": dw_qkv, "b": db_qkv}, "proj": {"w": dw_proj, "b": db_proj}},
            "ln2": {"gamma": dg2, "beta": db2},
            "mlp": {"fc": {"w": dw_fc, "b": db_fc}, "out": {"w": dw_out, "b": db_out}},
        })  # fmt: skip
    # The embedding: g's backward is the identity; each device scatters into its own rows.
    _, dtok = embedding.bwd(tok_res, jnp.where(own[..., None], dx, 0.0))  # "nt,ntd->vd"
    pos_sum = jnp.sum(dx, axis=0, dtype=_checks.accum_dtype(dx.dtype))  # "ntd->td"
    dpos = jnp.zeros((model.context, model.d), dx.dtype).at[:t].set(pos_sum.astype(dx.dtype))
    grads: dict[str, Any] = {"tok": dtok, "pos": dpos, "blocks": grads_blocks[::-1]}
    grads["ln_f"] = {"gamma": dgf, "beta": dbf}
    if model.tied:  # W_head,k = tok_kᵀ: both uses of this device's rows add
        grads["tok"] = (dtok + dw_head.T).astype(dtok.dtype)
    else:
        grads["head"] = {"w": dw_head.astype(w_head.dtype)}
    return grads


def _head_options(model: GPT, dtype, red: Reduce) -> dict[str, Any]:
    return dict(
        v=model.vocab, ignore_index=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
        chunk_size=None, acc=_xent.acc_dtype(None, dtype), default_chunk=DEFAULT_CHUNK, red=red,
    )  # fmt: skip


def _local(model, axis, axes, params, ids, targets, where):
    """One device: forward, the global valid count, backward, the data-parallel sums."""
    data = Reduce(axis)
    loss, valid, state = _forward(model, axes, params, ids, targets, where)
    count = jnp.maximum(data.sum(jnp.sum(valid)), 1).astype(loss.dtype)  # psum: one scalar
    total = data.sum(jnp.sum(jnp.where(valid, loss, 0.0)))  # psum: one scalar
    seed = jnp.where(valid, 1.0 / count, 0.0).astype(loss.dtype)  # ∂ mean / ∂ loss_k
    grads = _backward(model, axes, state, seed)
    # The data-parallel all-reduce: every gradient this device holds, summed over the
    # data shards in the accumulation dtype (|θ|/P of the split parts, all of the others).
    grads = jax.tree.map(lambda g: data.sum(_acc(g)).astype(g.dtype), grads)
    return total / count, grads


def _core(model, mesh, axis, model_axis, rules, params, ids, targets, where):
    del rules  # the cache key only: the loop reads the rules from the ops when traced
    model.check_inputs(params, ids, targets, where)  # traced: shapes only
    _check_batch(mesh, axis, ids.shape[0])
    p = axis_size(mesh, model_axis, "model_axis")
    specs = _layout.param_specs(model, model_axis)
    local = functools.partial(_local, model, axis, (model_axis, p))
    row = P(axis)
    return call(local, mesh, (params, ids, targets, where), (specs, row, row, row), (P(), specs))


# ------------------------------------------------------------------------ checks


def _check_batch(mesh, axis, n):
    parts = axis_size(mesh, axis, "axis")
    if n % parts:
        raise not_divisible(
            "ids", "the batch size n", n, parts, axis,
            f"pad the batch to n = {round_up(n, parts)} with where=False sequences (they change "
            "nothing)",
        )  # fmt: skip


def _check_model(model, mesh, axis, model_axis):
    if not isinstance(model, GPT):
        raise TypeError(f"model: expected a jaxbp.GPT, got {type(model).__name__}")
    no_dropout(model)
    axis_size(mesh, axis, "axis")
    if model_axis is None:
        return
    if model_axis == axis:
        raise ValueError(f"model_axis: expected a mesh axis other than axis={axis!r}")
    parts = axis_size(mesh, model_axis, "model_axis")
    h = model.heads
    if h % parts:
        fits = [k for k in range(parts, model.d + 1, parts) if model.d % k == 0]
        near = sorted(fits, key=lambda k: abs(k - h))[:2]
        fix = (
            f"heads = {' or '.join(map(str, sorted(near)))}"
            if near
            else (f"heads a multiple of {parts} that divides d = {model.d}")
        )
        raise not_divisible(
            "model", "the number of heads", h, parts, model_axis, f"a GPT with {fix}"
        )
    if model.vocab % parts:
        raise not_divisible(
            "model", "the vocabulary size", model.vocab, parts, model_axis,
            f"pad the vocabulary to vocab = {round_up(model.vocab, parts)} with ids that never "
            "occur",
        )  # fmt: skip


def value_and_grad(
    model: GPT, mesh: Mesh, *, axis: str | None = "data", model_axis: str | None = None
) -> Callable:
    """``f(params, ids (N, t), targets (N, t), *, where=None) -> (mean loss, grads)`` for a
    :class:`jaxbp.GPT` on a mesh: the batch split over ``axis``, the blocks, the token table
    and the head split over ``model_axis`` (Megatron-LM's tensor and vocabulary
    parallelism), the collectives written into the explicit loop (module docstring).

    The loss and gradients are :func:`jaxbp.value_and_grad`'s for the same model, the mean
    over valid tokens exact however unevenly ``where`` masks the shards. ``params`` may come
    unplaced or laid out any way; the gradients come back laid out as
    :func:`jaxbp.parallel.gpt_param_specs` says (split parts ``1/P`` per device, the rest
    replicated), which is where :func:`jaxbp.parallel.shard` puts parameters given those
    specs, so an optax update keeps every array where it is. ``f.jitted(params, ids,
    targets, where)`` is the compiled step (:mod:`jaxbp._step`).

    Errors, before anything is compiled: a mesh without ``axis`` or ``model_axis``; the
    heads or the vocabulary not divisible by the model axis; the batch ``N`` not divisible
    by the data axis (each naming the sizes and what would divide).
    """
    _check_model(model, mesh, axis, model_axis)
    step = _step.compiled_on_mesh(_core, model, mesh, axis, model_axis, rules(*_LOOP_OPS))

    def check(params, ids, targets, *, where=None):
        if host_readable(params, ids, targets, where):
            params, ids, targets, where = model.check_inputs(params, ids, targets, where)[:4]
        else:  # global arrays spanning other processes: shapes only
            model.check_params(params)
        _check_batch(mesh, axis, jnp.shape(ids)[0])
        return params, ids, targets, where

    return _step.entry(step, check, "value_and_grad", value_and_grad.__doc__)
