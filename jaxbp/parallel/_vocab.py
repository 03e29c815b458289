"""Vocabulary-parallel softmax cross-entropy on a mesh axis that splits the classes.

Index letters::

    n  rows (global)       c  classes (global)      c/P  classes on one shard (P devices)
    d  model dimension     v  vocabulary (the fused loss's classes)

Logits ``z (n, c)`` are split along classes; shard ``k`` holds ``z_k (n, c/P)`` for classes
``[k·c/P, (k+1)·c/P)`` (after Megatron-LM's vocab-parallel cross-entropy). The rules are the
single-device ones, with the row reductions over the mesh axis
(:class:`jaxbp._vma.Reduce`):

* :func:`vocab_parallel_softmax_cross_entropy` runs :func:`jaxbp.losses.ce_forward` and
  :func:`jaxbp.losses.ce_backward` on each shard: forward, per row,
  ``m = pmax(max_c z_k)``, ``lse_s = log psum(Σ_c e^{z_k − m})``, and one ``psum`` of the
  label terms ``Σ_c u_k·(lse − z_k)`` and ``Σ_c u_k`` (for integer ids only the owning shard
  holds the target). Backward, with no communication (``m``, ``lse_s`` and ``Σu`` are
  saved): ``dz_k = g·(p_k·(Σ_c u + 2λ·lse) − u_k)  "n,nc->nc"``;
* :func:`vocab_parallel_linear_softmax_cross_entropy` runs the chunked kernel of
  :mod:`jaxbp._xent` (the fused loss's ``"recompute"`` strategy) on each shard's columns
  ``w_k (d, v/P)``, with the same reductions, and ``dx = psum(Σ_chunks dz·w_kᵀ)``.

Nothing of size ``(n, c)`` ever exists on one device: per-device memory is about ``1/P``
of the unsharded loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from .. import _xent
from .._checks import check_label_range
from .._vma import Reduce
from ..fused import DEFAULT_CHUNK, validate_fused
from ..losses import _validate_ce, ce_backward, ce_forward
from ._mesh import (
    PAD_CLASSES,
    PAD_ROWS,
    P,
    arg_specs,
    as_primals,
    axis_size,
    call,
    divisible,
    host_readable,
)

__all__ = [
    "vocab_parallel_softmax_cross_entropy",
    "vocab_parallel_softmax_cross_entropy_fwd",
    "vocab_parallel_softmax_cross_entropy_bwd",
    "vocab_parallel_linear_softmax_cross_entropy",
    "vocab_parallel_linear_softmax_cross_entropy_fwd",
    "vocab_parallel_linear_softmax_cross_entropy_bwd",
    "ShardedLoss",
]


# ------------------------------------------------------------ vocab-parallel cross-entropy


class ShardedLoss:
    """Softmax cross-entropy on one class shard (inside a ``shard_map`` over ``axis``), with
    the rules' signature: ``fwd(z_k, labels, where, class_weights_k, **options) -> (loss,
    res)`` and ``bwd(res, g, **options) -> (dz_k, dlabels_k, None, dclass_weights_k)``
    (``dclass_weights_k`` summed over this device's rows). The explicit loop of
    :mod:`jaxbp.nn` runs it as the loss of a model whose last layer is split over ``axis``."""

    name = "softmax_cross_entropy (class shard)"
    arg_names = per_example_args = ("z_k", "labels")  # what the tape needs of an op
    example_grads = None

    def __init__(self, axis: str, c: int):
        self.axis, self.c, self.red = axis, int(c), Reduce(axis)

    def __eq__(self, other):
        return isinstance(other, ShardedLoss) and (self.axis, self.c) == (other.axis, other.c)

    def __hash__(self):
        return hash((ShardedLoss, self.axis, self.c))

    def fwd(self, z_k, labels, where=None, class_weights=None, *, label_smoothing=0.0,
            ignore_index=None, z_loss=0.0):  # fmt: skip
        loss, m, lse_s, su = ce_forward(
            z_k, labels, where, class_weights, label_smoothing=label_smoothing,
            ignore_index=ignore_index, z_loss=z_loss, c=self.c, red=self.red,
        )  # fmt: skip
        return loss, (z_k, labels, where, class_weights, m, lse_s, su)

    def bwd(self, res, g, *, label_smoothing=0.0, ignore_index=None, z_loss=0.0):
        z_k, labels, where, class_weights, m, lse_s, su = res
        dz, dlabels, dweights = ce_backward(
            z_k, labels, where, class_weights, lse_s, g, label_smoothing=label_smoothing,
            ignore_index=ignore_index, z_loss=z_loss, c=self.c, m=m, su=su, red=self.red,
        )  # fmt: skip
        return dz, dlabels, None, dweights


def _check_layout(mesh, axis, batch_axis, classes, rows):
    """The class axis ``classes = (argument, size, what)`` divisible by ``axis``'s devices,
    the rows ``(argument, n)`` by ``batch_axis``'s (a different axis), with clear errors."""
    name, size, what = classes
    divisible(name, size, axis_size(mesh, axis, "axis"), axis, what, PAD_CLASSES)
    if batch_axis is not None:
        if batch_axis == axis:
            raise ValueError(f"batch_axis: expected a mesh axis other than axis={axis!r}")
        parts = axis_size(mesh, batch_axis, "batch_axis")
        divisible(rows[0], rows[1], parts, batch_axis, "the batch size n", PAD_ROWS)


def _specs(labels, axis, batch_axis):
    """in_specs of ``(logits, labels, where, class_weights)``."""
    label_spec = P(batch_axis) if labels.ndim == 1 else P(batch_axis, axis)
    return (P(batch_axis, axis), label_spec, P(batch_axis), P(axis))


_STATIC = ("mesh", "axis", "batch_axis", "label_smoothing", "ignore_index", "z_loss")


@functools.partial(jax.jit, static_argnames=_STATIC)
def vocab_parallel_softmax_cross_entropy_fwd(
    logits, labels, where=None, class_weights=None, *, mesh, axis="model", batch_axis=None,
    label_smoothing=0.0, ignore_index=None, z_loss=0.0,
):  # fmt: skip
    """Forward on global arrays: ``loss (n,)``, residuals ``(logits, labels, where,
    class_weights, m, lse_s, Σ_c u)``: the only new residuals are three ``(n,)`` vectors."""
    loss_op = ShardedLoss(axis, logits.shape[-1])
    opts = dict(label_smoothing=label_smoothing, ignore_index=ignore_index, z_loss=z_loss)

    def local(z_k, labels, where, cw_k):
        loss, res = loss_op.fwd(z_k, labels, where, cw_k, **opts)
        return loss, *res[4:]  # loss, m, lse_s, Σu

    row = P(batch_axis)
    loss, m, lse_s, su = call(
        local, mesh, (logits, labels, where, class_weights), _specs(labels, axis, batch_axis),
        (row, row, row, row),
    )  # fmt: skip
    return loss, (logits, labels, where, class_weights, m, lse_s, su)


@functools.partial(jax.jit, static_argnames=_STATIC)
def vocab_parallel_softmax_cross_entropy_bwd(
    res, g, *, mesh, axis="model", batch_axis=None, label_smoothing=0.0, ignore_index=None,
    z_loss=0.0,
):  # fmt: skip
    """Backward, local to each shard: ``(dlogits (n, c) sharded like logits, dlabels, None,
    dclass_weights)``; ``dlabels`` is ``None`` for integer ids. The only communication is a
    ``psum`` of ``dclass_weights`` over ``batch_axis``."""
    logits, labels, where, class_weights, m, lse_s, su = res
    loss_op = ShardedLoss(axis, logits.shape[-1])
    opts = dict(label_smoothing=label_smoothing, ignore_index=ignore_index, z_loss=z_loss)
    float_labels = not jnp.issubdtype(labels.dtype, jnp.integer)
    specs = _specs(labels, axis, batch_axis)
    row = P(batch_axis)

    def local(z_k, labels, where, cw_k, m, lse_s, su, g):
        dz, dy, _, dw = loss_op.bwd((z_k, labels, where, cw_k, m, lse_s, su), g, **opts)
        if dw is not None:
            if batch_axis is not None:  # the class weights are shared by the data shards
                dw = lax.psum(dw, batch_axis)
            dw = dw.astype(cw_k.dtype)
        return tuple(t for t in (dz, dy, dw) if t is not None)

    out_specs = (specs[0],) + ((specs[1],) if float_labels else ())
    out_specs += (P(axis),) if class_weights is not None else ()
    args = (logits, labels, where, class_weights, m, lse_s, su, g)
    outs = list(call(local, mesh, args, (*specs, row, row, row, row), out_specs))
    dz = outs.pop(0)
    dlabels = outs.pop(0) if float_labels else None
    dweights = outs.pop(0) if class_weights is not None else None
    return dz, dlabels, None, dweights


def _on_mesh(fwd, bwd):
    """A ``custom_vjp`` of ``fwd``/``bwd`` whose cotangents get their primals' layouts on an
    Explicit mesh (:func:`jaxbp.parallel._mesh.arg_specs`)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def core(options, *args):
        return fwd(*args, **dict(options))[0]

    def core_fwd(options, *args):
        out, res = fwd(*args, **dict(options))
        return out, (res, arg_specs(dict(options)["mesh"], args))

    def core_bwd(options, res, g):
        res, specs = res
        return as_primals(dict(options)["mesh"], bwd(res, g, **dict(options)), specs)

    core.defvjp(core_fwd, core_bwd)
    return core


_vp_ce = _on_mesh(
    vocab_parallel_softmax_cross_entropy_fwd, vocab_parallel_softmax_cross_entropy_bwd
)


def vocab_parallel_softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    mesh: Mesh,
    *,
    axis: str = "model",
    batch_axis: str | None = None,
    where: jax.Array | None = None,
    class_weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
    z_loss: float = 0.0,
) -> jax.Array:
    """Softmax cross-entropy per example with the classes split over the mesh axis ``axis``.

    The same values and gradients as :func:`jaxbp.softmax_cross_entropy` (same options, same
    masked-row and out-of-range-label semantics), computed so that no device ever holds more
    than its ``(n, c/P)`` slice of the logits, probabilities or gradient (Megatron-LM's
    vocab-parallel cross-entropy): the forward all-reduces the row max, the sum of
    exponentials and the per-row label terms (only the shard that owns an integer target
    holds its logit); the hand-written backward ``g·(p_k − y_k)`` is local to each shard.

    Args:
      logits: ``z (n, c)``, floating, ideally already laid out ``P(batch_axis, axis)``
        (e.g. the output of a layer whose ``w (d, c)`` is sharded ``P(None, axis)``); any
        other layout is resharded by JAX. Flatten leading axes into ``n`` first.
      labels: integer ids ``(n,)`` (laid out ``P(batch_axis)``) or probabilities ``(n, c)``
        (``P(batch_axis, axis)``).
      mesh: the :class:`jax.sharding.Mesh`.
      axis: the mesh axis the classes are split over; ``c`` must be divisible by its size.
      batch_axis: optionally, a mesh axis the rows are split over too (data parallel).
      where, class_weights, label_smoothing, ignore_index, z_loss: as
        :func:`jaxbp.softmax_cross_entropy`; ``class_weights (c,)`` is split like the classes.

    Returns:
      ``loss (n,)`` laid out ``P(batch_axis)``: float32 for half-precision logits.

    Raises:
      ValueError: an axis not in the mesh, ``c`` (or ``n``) not divisible by the axis size,
        non-2-d logits, and every error of :func:`jaxbp.softmax_cross_entropy`.
    """
    logits, labels, where, class_weights = _validate_ce(
        logits, labels, where, class_weights, label_smoothing, ignore_index, z_loss
    )
    if logits.ndim != 2:
        raise ValueError(
            f"logits: expected shape (n, c) (flatten leading axes into n), got {logits.shape}"
        )
    _check_layout(mesh, axis, batch_axis, ("logits", logits.shape[1], "the number of classes c"),
                  ("logits", logits.shape[0]))  # fmt: skip
    if host_readable(labels, where):
        check_label_range(labels, logits.shape[-1], ignore_index, where=where)
    options = (
        ("axis", axis),
        ("batch_axis", batch_axis),
        ("ignore_index", None if ignore_index is None else int(ignore_index)),
        ("label_smoothing", float(label_smoothing)),
        ("mesh", mesh),
        ("z_loss", float(z_loss)),
    )
    return _vp_ce(options, logits, labels, where, class_weights)


# ------------------------------------------------- vocab-parallel fused linear + cross-entropy


def _fused_specs(axis, batch_axis):
    """in_specs of ``(x, w, b, labels, where, class_weights)``."""
    return (P(batch_axis), P(None, axis), P(axis), P(batch_axis), P(batch_axis), P(axis))


_STATIC_FUSED = (
    "mesh", "axis", "batch_axis", "ignore_index", "label_smoothing", "z_loss", "softcap",
    "chunk_size", "accum_dtype",
)  # fmt: skip


@functools.partial(jax.jit, static_argnames=_STATIC_FUSED)
def vocab_parallel_linear_softmax_cross_entropy_fwd(
    x, w, b, labels, where=None, class_weights=None, *, mesh, axis="model", batch_axis=None,
    ignore_index=None, label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None,
    accum_dtype=None,
):  # fmt: skip
    """Forward on global arrays: ``loss (n,)``; residuals ``(x, w, b, labels, where,
    class_weights, lse (n,), Σ_v u (n,))``: two ``(n,)`` vectors are all that is new."""
    local = functools.partial(
        _xent.loss_and_lse, v=w.shape[1], ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        chunk_size=chunk_size, acc=_xent.acc_dtype(accum_dtype, x.dtype),
        default_chunk=DEFAULT_CHUNK, red=Reduce(axis),
    )  # fmt: skip
    row = P(batch_axis)
    args = (x, w, b, labels, where, class_weights)
    loss, lse, su = call(local, mesh, args, _fused_specs(axis, batch_axis), (row, row, row))
    return loss, (*args, lse, su)


@functools.partial(jax.jit, static_argnames=_STATIC_FUSED)
def vocab_parallel_linear_softmax_cross_entropy_bwd(
    res, g, *, mesh, axis="model", batch_axis=None, ignore_index=None, label_smoothing=0.0,
    z_loss=0.0, softcap=None, chunk_size=None, accum_dtype=None,
):  # fmt: skip
    """Backward: ``(dx (n,d), dw (d,v) split like w, db | None, None, None, dcw | None)``.

    ``dx = psum_axis(Σ_chunks dz·w_kᵀ)  "nk,dk->nd"`` is the only all-reduce over ``axis``;
    with ``batch_axis`` the shard's ``dw_k``, ``db_k``, ``dcw_k`` are summed over the data
    shards in the accumulation dtype, then cast."""
    x, w, b, labels, where, cw, lse, su = res
    specs = _fused_specs(axis, batch_axis)
    row = P(batch_axis)
    acc = _xent.acc_dtype(accum_dtype, x.dtype)

    def local(x, w_k, b_k, labels, where, cw_k, lse, su, g):
        dx, dw, db, dcw = _xent.grads_recompute(
            x, w_k, b_k, labels, where, cw_k, lse, su, g, v=w.shape[1],
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, chunk_size=chunk_size, acc=acc, default_chunk=DEFAULT_CHUNK,
            param_dtype=None if batch_axis is None else acc, red=Reduce(axis),
        )  # fmt: skip
        if batch_axis is not None:  # parameters are shared by the data shards
            dw, db, dcw = (None if t is None else lax.psum(t, batch_axis) for t in (dw, db, dcw))
        outs = (dw.astype(w_k.dtype), None if db is None else db.astype(b_k.dtype),
                None if dcw is None else dcw.astype(cw_k.dtype))  # fmt: skip
        return (dx, *(t for t in outs if t is not None))

    out_specs = (specs[0], specs[1]) + ((specs[2],) if b is not None else ())
    out_specs += (specs[5],) if cw is not None else ()
    args = (x, w, b, labels, where, cw, lse, su, g)
    outs = list(call(local, mesh, args, (*specs, row, row, row), out_specs))
    dx, dw = outs.pop(0), outs.pop(0)
    db = outs.pop(0) if b is not None else None
    dcw = outs.pop(0) if cw is not None else None
    return dx, dw, db, None, None, dcw


_vpf = _on_mesh(
    vocab_parallel_linear_softmax_cross_entropy_fwd,
    vocab_parallel_linear_softmax_cross_entropy_bwd,
)


def vocab_parallel_linear_softmax_cross_entropy(
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    mesh: Mesh,
    b: jax.Array | None = None,
    *,
    axis: str = "model",
    batch_axis: str | None = None,
    where: jax.Array | None = None,
    ignore_index: int | None = None,
    class_weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    accum_dtype=None,
) -> jax.Array:
    """:func:`jaxbp.linear_softmax_cross_entropy` with ``w (d, v)`` split over ``axis``.

    Each device holds ``w_k (d, v/P)`` (and ``b_k``, ``class_weights_k``) and runs the fused
    loss's chunked scheme on its columns (the ``"recompute"`` strategy: only ``lse`` and
    ``Σ_v u`` ``(n,)`` are saved, logits are recomputed chunk by chunk in the backward), so
    neither the ``(n, v)`` logits nor their ``(n, v/P)`` slice ever exist at once. The shards
    exchange per-row vectors only: the running max (``pmax``), the rescaled sums of
    exponentials, target logits and label terms (one ``psum`` of ``(3, n)``), and in the
    backward ``dx (n, d)`` (one ``psum``); ``dw_k``, ``db_k`` stay on their shard.

    Args:
      x: hidden states ``(n, d)``, replicated over ``axis`` (split over ``batch_axis``).
      w: ``(d, v)``, laid out ``P(None, axis)``; ``v`` divisible by the axis size.
      labels: integer ids ``(n,)``.
      mesh, axis, batch_axis: as :func:`vocab_parallel_softmax_cross_entropy`.
      b: optional bias ``(v,)``, laid out ``P(axis)``.
      where, ignore_index, class_weights, label_smoothing, z_loss, softcap, chunk_size,
        accum_dtype: as :func:`jaxbp.linear_softmax_cross_entropy` (``chunk_size`` counts
        columns of the local shard).

    Returns:
      ``loss (n,)`` laid out ``P(batch_axis)``, in the accumulation dtype.
    """
    x, w, b, labels, where, class_weights, accum_dtype = validate_fused(
        x, w, b, labels, where, class_weights, label_smoothing, z_loss, softcap, chunk_size,
        accum_dtype, "recompute", ignore_index,
    )  # fmt: skip
    if x.ndim != 2:
        raise ValueError(f"x: expected shape (n, d) (flatten leading axes into n), got {x.shape}")
    _check_layout(mesh, axis, batch_axis, ("w", w.shape[1], "the vocabulary size v"),
                  ("x", x.shape[0]))  # fmt: skip
    if host_readable(labels, where):
        check_label_range(labels, w.shape[1], ignore_index, where=where)
    if labels.dtype.itemsize < 4:
        labels = labels.astype(jnp.int32)  # column ids must not wrap
    options = (
        ("accum_dtype", accum_dtype),
        ("axis", axis),
        ("batch_axis", batch_axis),
        ("chunk_size", None if chunk_size is None else int(chunk_size)),
        ("ignore_index", None if ignore_index is None else int(ignore_index)),
        ("label_smoothing", float(label_smoothing)),
        ("mesh", mesh),
        ("softcap", None if softcap is None else float(softcap)),
        ("z_loss", float(z_loss)),
    )
    return _vpf(options, x, w, b, labels, where, class_weights)
