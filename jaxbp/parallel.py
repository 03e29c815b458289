"""Beyond one device: data- and vocabulary-parallel hand-written backward passes on JAX meshes.

Index letters::

    n  batch (global)          n/D  rows on one data shard      (D devices on the data axis)
    c  classes (global)        c/P  classes on one vocab shard  (P devices on the model axis)
    i  input features of a layer,  o  output features

Everything runs on JAX's own distributed engine: a :class:`jax.sharding.Mesh` (as
``jax.make_mesh`` makes it: Explicit or Auto axes), ``shard_map`` and the collectives
``psum``/``pmax`` inside it; across hosts, ``jax.distributed.initialize`` makes one global
mesh of every process's devices and the same code runs unchanged. On Explicit axes the
inputs are resharded to the layout each ``shard_map`` wants (:func:`_laid_out`), and a
cotangent gets its primal's layout where the primal's type names the mesh.

**Data parallel** (:func:`value_and_grad`). The batch is split over the mesh axis ``axis``;
parameters are replicated. Each shard runs the explicit reverse loop of
:func:`jaxbp.nn.forward_backward` on its rows, which yields the *shard's* mean over its valid
rows, ``L_k = S_k / max(N_k, 1)``. The global mean over valid rows is
``L = Σ_k S_k / N = Σ_k (max(N_k, 1) / N)·L_k`` with ``N = psum(N_k)``, and likewise for
every gradient; so each shard re-weights by ``max(N_k, 1)/max(N, 1)`` and one ``psum``
finishes the job. A shard whose rows are all masked contributes exactly 0.

**Vocabulary parallel** (:func:`vocab_parallel_softmax_cross_entropy`, after Megatron-LM's
vocab-parallel cross-entropy). Logits ``z (n, c)`` are split along classes; shard ``k``
holds ``z_k (n, c/P)`` for classes ``[k·c/P, (k+1)·c/P)``. Forward, per row::

    m    = pmax(max_c z_k)                          (n,)   one all-reduce (max)
    lse  = m + log psum(Σ_c exp(z_k − m))          (n,)   one all-reduce (sum)
    u_k  = w_k ⊙ ((1 − ε)·y_k + ε/c)                (n,c/P) the shard's slice of the labels
    loss = psum(Σ_c u_k·(lse − z_k)) + λ·lse²       (n,)   one all-reduce; for integer ids only
                                                           the owning shard's term is non-zero
                                                           (it holds the target logit)

Backward, with no communication at all (``Σu`` was reduced in the forward and saved)::

    dz_k = g[:,None] · (p_k·(Σ_c u + 2λ·lse)[:,None] − u_k)    "n,nc->nc",  p_k = exp(z_k − lse)

which is ``g·(p − y)`` on the local slice. Nothing of size ``(n, c)`` ever exists on one
device: per-device memory is about ``1/P`` of the unsharded loss.

**Both** (:func:`value_and_grad` with ``model_axis``): on a 2-d mesh ``(data, model)`` the
batch is split over ``data`` and the last layer's ``w (i, c)``, ``b (c,)`` over ``model``
(Megatron's tensor-parallel output layer): the last layer's logits exist only as shards,
the loss is the vocab-parallel one above, and its input gradient
``dh = psum_model(δ_k · w_kᵀ)  "nc,ic->ni"`` joins the replicated layers below.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import _checks, _vma
from ._checks import check_label_range
from .activations import ACTIVATIONS
from .dense import dense_bwd, dense_bwd_params, dense_fwd
from .jacobian import rules_of
from .losses import _bad_labels, _validate_ce, valid_rows
from .nn import MLP, forward_backward

__all__ = [
    "shard_map",
    "make_mesh",
    "shard",
    "value_and_grad",
    "vocab_parallel_softmax_cross_entropy",
    "vocab_parallel_softmax_cross_entropy_fwd",
    "vocab_parallel_softmax_cross_entropy_bwd",
    "vocab_parallel_linear_softmax_cross_entropy",
    "vocab_parallel_linear_softmax_cross_entropy_fwd",
    "vocab_parallel_linear_softmax_cross_entropy_bwd",
]

P = PartitionSpec


# ------------------------------------------------------------------------ JAX compat


def _shard_map_impl() -> tuple[Callable, str | None]:
    """``(shard_map, name of its replication-check keyword)`` for this JAX version."""
    fn = getattr(jax, "shard_map", None)
    if fn is None:  # JAX < 0.7: the experimental module
        from jax.experimental.shard_map import shard_map as fn  # type: ignore[no-redef]
    params = inspect.signature(fn).parameters
    check = next((k for k in ("check_vma", "check_rep") if k in params), None)
    return fn, check


def shard_map(f: Callable, *, mesh: Mesh, in_specs: Any, out_specs: Any, check: bool = False):
    """``jax.shard_map`` (or ``jax.experimental.shard_map.shard_map`` on older JAX).

    ``check`` maps to ``check_vma`` (new) or ``check_rep`` (old). It is off by default here:
    every output of jaxbp's per-shard functions that is declared replicated is the result
    of a ``psum``/``pmax`` over the axes it is replicated on.
    """
    fn, check_name = _shard_map_impl()
    kwargs = {"mesh": mesh, "in_specs": in_specs, "out_specs": out_specs}
    if check_name is not None:
        kwargs[check_name] = check
    return fn(f, **kwargs)


def make_mesh(
    shape: Sequence[int], axis_names: Sequence[str], *, devices=None, axis_types=None
) -> Mesh:
    """``jax.make_mesh(shape, axis_names, axis_types=..., devices=...)`` with clear errors.

    Users make meshes with :func:`jax.make_mesh` and every function here takes them as they
    come: its axes are ``Explicit`` by default in recent JAX (``Auto`` in older ones), and
    jaxbp lays inputs out itself on Explicit axes. This helper is that call with the shape
    checked against the device count first (``ValueError`` naming ``shape`` or
    ``axis_names``); ``devices`` defaults to all of them, across every process after
    ``jax.distributed.initialize``. On a JAX without ``jax.make_mesh`` it builds the
    :class:`~jax.sharding.Mesh` from ``devices`` in order. E.g. ``make_mesh((2, 4),
    ("data", "model"))`` on 8 devices.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(axis_names):
        raise ValueError(
            f"axis_names: expected {len(shape)} names for shape {shape}, got {axis_names}"
        )
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"shape: expected a mesh of {len(devices)} devices, got {shape} "
            f"({int(np.prod(shape))} devices)"
        )
    names = tuple(axis_names)
    jax_make_mesh = getattr(jax, "make_mesh", None)
    if jax_make_mesh is None:  # JAX < 0.4.35
        if axis_types is not None:
            raise TypeError("axis_types: this JAX has no mesh axis types")
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), names)
    kwargs = {"devices": devices}
    if axis_types is not None:
        kwargs["axis_types"] = tuple(axis_types)
    return jax_make_mesh(shape, names, **kwargs)


def shard(tree: Any, mesh: Mesh, spec: PartitionSpec | None = None) -> Any:
    """Place host arrays (every process holding the same *global* values) on ``mesh`` as
    global ``jax.Array``s laid out by ``spec`` (``P()`` replicates, ``P("data")`` splits the
    leading axis). Works with one process or many: each process fills only the shards of its
    own devices (``jax.make_array_from_callback``)."""

    sharding = NamedSharding(mesh, P() if spec is None else spec)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, tree)


# ------------------------------------------------------------------------ checks


def _axis_size(mesh: Mesh, axis: str | None, name: str) -> int:
    if axis is None:
        return 1
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"{name}: expected one of the mesh axes {mesh.axis_names}, got {axis!r}")
    return int(mesh.shape[axis])


def _divisible(name: str, size: int, parts: int, axis: str, what: str, hint: str) -> None:
    if size % parts:
        raise ValueError(
            f"{name}: expected {what} ({size}) divisible by the {parts} devices of mesh axis "
            f"{axis!r}; {hint}"
        )


_PAD_ROWS = "pad the batch with where=False rows (they change nothing) or use another mesh"
_PAD_CLASSES = (
    "pad the classes with −inf logit columns (without label smoothing) or use another mesh"
)


def _host_readable(*trees) -> bool:
    """True when every array's values can be read on this host: no shard lives in another
    process (tracers count as readable: their value checks are skipped anyway)."""

    def readable(x) -> bool:
        try:
            return bool(getattr(x, "is_fully_addressable", True))
        except Exception:  # a tracer has no placement
            return True

    return all(readable(x) for x in jax.tree.leaves(trees))


def _explicit_axes(mesh: Mesh) -> frozenset:
    """The mesh axes of type ``Explicit`` (``jax.make_mesh``'s default in newer JAX)."""
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    types = getattr(mesh, "axis_types", None) or ()
    if explicit is None:
        return frozenset()
    return frozenset(name for name, t in zip(mesh.axis_names, types, strict=False) if t == explicit)


def _on_explicit_axes(spec: PartitionSpec, axes: frozenset) -> PartitionSpec:
    """``spec`` with only the mesh axes in ``axes`` (the others are left to ``shard_map``)."""

    def keep(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        names = tuple(a for a in names if a is not None and a in axes)
        return None if not names else names[0] if len(names) == 1 else names

    return P(*(keep(e) for e in spec))


def _laid_out(mesh: Mesh, arg: Any, spec: Any) -> Any:
    """``arg`` (a pytree under the spec prefix ``spec``) resharded as ``shard_map``'s
    ``in_specs`` say, on the mesh's Explicit axes: there ``shard_map`` requires the inputs'
    own shardings to match its specs, and unsharded or otherwise sharded inputs are moved
    (``jax.sharding.reshard``). Auto axes need nothing: ``shard_map`` reshards them itself."""
    axes = _explicit_axes(mesh)
    if not axes:
        return arg
    reshard = getattr(jax.sharding, "reshard", None) or jax.reshard

    def one(s, sub):
        target = NamedSharding(mesh, _on_explicit_axes(s, axes))
        return jax.tree.map(lambda a: reshard(a, target), sub)

    return jax.tree.map(one, spec, arg, is_leaf=lambda s: isinstance(s, PartitionSpec))


def _arg_specs(mesh: Mesh, args: Sequence[Any]) -> _vma.Static:
    """The arguments' own layouts on an Explicit mesh (static, for the residuals), else
    ``None``s: a custom_vjp's cotangent must have its primal's sharding type there. An
    argument whose type names no mesh (unplaced, under ``jit`` without ``jax.set_mesh``)
    constrains nothing: its cotangent keeps the layout of the shards."""
    axes = _explicit_axes(mesh)
    typeof = getattr(jax, "typeof", None)
    if not axes or typeof is None:
        return _vma.Static((None,) * len(args))

    def spec(a):  # None where the primal's type names no mesh (it constrains nothing)
        sharding = None if a is None else getattr(typeof(a), "sharding", None)
        mesh_of = getattr(sharding, "mesh", None)
        return None if mesh_of is None or not mesh_of.axis_names else sharding.spec

    return _vma.Static(tuple(spec(a) for a in args))


def _as_primals(mesh: Mesh, cts: Sequence[Any], specs: _vma.Static) -> tuple:
    """Each cotangent resharded to its primal's layout (where :func:`_arg_specs` has one)."""
    reshard = getattr(jax.sharding, "reshard", None) or getattr(jax, "reshard", None)
    return tuple(
        ct if ct is None or spec is None else reshard(ct, NamedSharding(mesh, spec))
        for ct, spec in zip(cts, specs.value, strict=True)
    )


def _call(fn: Callable, mesh: Mesh, args: Sequence[Any], specs: Sequence[Any], out_specs: Any):
    """``shard_map(fn)(*args)`` where some ``args`` may be ``None`` (passed through as None);
    on a mesh with Explicit axes, the arguments are first laid out as ``specs`` say."""
    keep = [k for k, a in enumerate(args) if a is not None]
    args = [a if a is None else _laid_out(mesh, a, specs[k]) for k, a in enumerate(args)]

    def local(*kept):
        full: list[Any] = [None] * len(args)
        for k, v in zip(keep, kept, strict=True):
            full[k] = v
        return fn(*full)

    mapped = shard_map(
        local, mesh=mesh, in_specs=tuple(specs[k] for k in keep), out_specs=out_specs
    )
    return mapped(*(args[k] for k in keep))


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


# ------------------------------------------------------------ vocab-parallel cross-entropy


def _local_labels(labels_k, c_local, c, offset, dtype, label_smoothing, class_weights_k):
    """``u_k (n, c/P)``: this shard's slice of ``w ⊙ ((1 − ε)·y + ε/c)``."""
    if jnp.issubdtype(labels_k.dtype, jnp.integer):
        ids = offset.astype(labels_k.dtype) + jnp.arange(
            c_local, dtype=labels_k.dtype
        )  # global ids
        y = (labels_k[:, None] == ids).astype(dtype)  # one-hot, only on the owning shard
    else:
        y = labels_k.astype(dtype)
    if label_smoothing:
        y = (1.0 - label_smoothing) * y + label_smoothing / c
    u = y if class_weights_k is None else y * _acc(class_weights_k).astype(dtype)
    return y, u


def _safe_mul(u, v):
    """``u·v`` with ``0·∞ = 0``, as :mod:`jaxbp.losses`."""
    return jnp.where(u == 0, jnp.zeros_like(u), u * v)


def _vp_local_fwd(z_k, labels, where, class_weights_k, *, axis, c, label_smoothing, ignore_index,
                  z_loss):  # fmt: skip
    """Per shard: ``(loss (n,), lse (n,), Σ_c u (n,))`` from ``z_k (n, c/P)``; 3 all-reduces."""
    z = _acc(z_k)
    c_local = z.shape[-1]
    offset = lax.axis_index(axis) * c_local
    m = lax.pmax(jnp.max(z, axis=-1), axis)  # global row max (n,)
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))  # as jax.nn.logsumexp
    lse = jnp.log(lax.psum(jnp.sum(jnp.exp(z - m[:, None]), axis=-1), axis)) + m  # (n,)
    _, u = _local_labels(labels, c_local, c, offset, z.dtype, label_smoothing, class_weights_k)
    part = jnp.stack([jnp.sum(_safe_mul(u, lse[:, None] - z), axis=-1), jnp.sum(u, axis=-1)])
    loss, sum_u = lax.psum(part, axis)  # (2, n): Σ_c u·(lse − z) and Σ_c u over all shards
    if z_loss:
        loss = loss + z_loss * lse * lse
    valid = valid_rows(labels, where, ignore_index=ignore_index, batch_shape=z.shape[:-1])
    loss = jnp.where(valid, loss, 0.0)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        loss = jnp.where(_bad_labels(labels, c, ignore_index) & valid, jnp.nan, loss)
    return loss, lse, sum_u


def _vp_local_bwd(z_k, labels, where, class_weights_k, lse, sum_u, g, *, axis, batch_axis, c,
                  label_smoothing, ignore_index, z_loss):  # fmt: skip
    """Per shard, no communication (but a ``psum`` over the batch for ``dclass_weights``):
    ``dz_k = g·(p_k·(Σu + 2λ·lse) − u_k)`` ``(n, c/P)``, plus ``dlabels_k``, ``dweights_k``."""
    z = _acc(z_k)
    c_local = z.shape[-1]
    offset = lax.axis_index(axis) * c_local
    y, u = _local_labels(labels, c_local, c, offset, z.dtype, label_smoothing, class_weights_k)
    valid = valid_rows(labels, where, ignore_index=ignore_index, batch_shape=z.shape[:-1])
    gv = jnp.where(valid, g.astype(z.dtype), 0.0)[:, None]  # (n,1); masked rows exactly 0
    p = jnp.exp(z - lse[:, None])  # (n, c/P): this shard's slice of softmax(z)
    scale = sum_u + (2.0 * z_loss) * lse  # Σ_c u + 2λ·lse  (n,)
    dz = gv * (p * scale[:, None] - u)  # "n,nc->nc"
    dz = jnp.where(valid[:, None], dz, 0.0)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        dz = jnp.where((_bad_labels(labels, c, ignore_index) & valid)[:, None], jnp.nan, dz)
    dz = dz.astype(z_k.dtype)
    nll = lse[:, None] - z  # −log p_k (n, c/P)
    dlabels = None
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        w = 1.0 if class_weights_k is None else _acc(class_weights_k).astype(z.dtype)
        dy = (1.0 - label_smoothing) * gv * w * nll
        dlabels = jnp.where(valid[:, None], dy, 0.0).astype(labels.dtype)
    dweights = None
    if class_weights_k is not None:
        per_row = jnp.where(valid[:, None], _safe_mul(y, gv * nll), 0.0)
        dweights = jnp.sum(per_row, axis=0)  # "nc->c" over this shard's rows
        if batch_axis is not None:
            dweights = lax.psum(dweights, batch_axis)
        dweights = dweights.astype(class_weights_k.dtype)
    return dz, dlabels, dweights


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
    class_weights, lse (n,), Σ_c u (n,))``: the only new residuals are two ``(n,)`` vectors."""
    c = logits.shape[-1]
    local = functools.partial(
        _vp_local_fwd, axis=axis, c=c, label_smoothing=label_smoothing,
        ignore_index=ignore_index, z_loss=z_loss,
    )  # fmt: skip
    row = P(batch_axis)
    loss, lse, sum_u = _call(
        local, mesh, (logits, labels, where, class_weights), _specs(labels, axis, batch_axis),
        (row, row, row),
    )  # fmt: skip
    return loss, (logits, labels, where, class_weights, lse, sum_u)


@functools.partial(jax.jit, static_argnames=_STATIC)
def vocab_parallel_softmax_cross_entropy_bwd(
    res, g, *, mesh, axis="model", batch_axis=None, label_smoothing=0.0, ignore_index=None,
    z_loss=0.0,
):  # fmt: skip
    """Backward, local to each shard: ``(dlogits (n, c) sharded like logits, dlabels, None,
    dclass_weights)``; ``dlabels`` is ``None`` for integer ids."""
    logits, labels, where, class_weights, lse, sum_u = res
    c = logits.shape[-1]
    float_labels = not jnp.issubdtype(labels.dtype, jnp.integer)
    specs = _specs(labels, axis, batch_axis)
    row = P(batch_axis)

    def local(z_k, labels, where, cw_k, lse, sum_u, g):
        dz, dy, dw = _vp_local_bwd(
            z_k, labels, where, cw_k, lse, sum_u, g, axis=axis, batch_axis=batch_axis, c=c,
            label_smoothing=label_smoothing, ignore_index=ignore_index, z_loss=z_loss,
        )  # fmt: skip
        return tuple(t for t in (dz, dy, dw) if t is not None)

    out_specs = (specs[0],) + ((specs[1],) if float_labels else ())
    out_specs += (P(axis),) if class_weights is not None else ()
    outs = list(
        _call(
            local,
            mesh,
            (logits, labels, where, class_weights, lse, sum_u, g),
            (*specs, row, row, row),
            out_specs,
        )  # fmt: skip
    )
    dz = outs.pop(0)
    dlabels = outs.pop(0) if float_labels else None
    dweights = outs.pop(0) if class_weights is not None else None
    return dz, dlabels, None, dweights


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _vp_ce(options, logits, labels, where, class_weights):
    return vocab_parallel_softmax_cross_entropy_fwd(
        logits, labels, where, class_weights, **dict(options)
    )[0]


def _vp_ce_fwd(options, logits, labels, where, class_weights):
    out, res = vocab_parallel_softmax_cross_entropy_fwd(
        logits, labels, where, class_weights, **dict(options)
    )
    return out, (res, _arg_specs(dict(options)["mesh"], (logits, labels, where, class_weights)))


def _vp_ce_bwd(options, res, g):
    res, specs = res
    cts = vocab_parallel_softmax_cross_entropy_bwd(res, g, **dict(options))
    return _as_primals(dict(options)["mesh"], cts, specs)


_vp_ce.defvjp(_vp_ce_fwd, _vp_ce_bwd)


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
    parts = _axis_size(mesh, axis, "axis")
    _divisible("logits", logits.shape[1], parts, axis, "the number of classes c", _PAD_CLASSES)
    if batch_axis is not None:
        if batch_axis == axis:
            raise ValueError(f"batch_axis: expected a mesh axis other than axis={axis!r}")
        rows = _axis_size(mesh, batch_axis, "batch_axis")
        _divisible("logits", logits.shape[0], rows, batch_axis, "the batch size n", _PAD_ROWS)
    if _host_readable(labels, where):
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


# ------------------------------------------------------------------ data-parallel network


def _data_parallel_local(model, axis, params, x, labels, where, class_weights):
    """Per shard: the explicit loop on ``n/D`` rows, re-weighted to the global mean."""
    loss, grads, per_ex, *_ = forward_backward(model, params, x, labels, where, class_weights)
    acc = per_ex.dtype
    n_local = jnp.sum(model.valid(labels, where, n=x.shape[0])).astype(acc)
    n_total = lax.psum(n_local, axis)
    # forward_backward divided by max(N_k, 1); the global mean divides by max(N, 1).
    weight = jnp.maximum(n_local, 1.0) / jnp.maximum(n_total, 1.0)
    loss = lax.psum(loss.astype(acc) * weight, axis)
    grads = jax.tree.map(
        lambda t: lax.psum(_acc(t) * weight.astype(_acc(t).dtype), axis).astype(t.dtype), grads
    )
    return loss, grads


def _both_parallel_local(model, axis, model_axis, params, x, labels, where, class_weights):
    """Per shard of a ``(data, model)`` mesh: layers below the last replicated over ``model``,
    the last layer ``w_k (i, c/P)``, ``b_k (c/P,)`` and its logits split over ``model``."""
    act_fwd, act_bwd = rules_of(ACTIVATIONS[model.activation])
    act_opts = dict(model.activation_options)
    opts = dict(model.loss_options)
    L = model.num_layers

    dense_res, act_res, h = [], [], x
    for layer, p in enumerate(params):
        h, r = dense_fwd(h, p["w"], p["b"])  # the last one: logits z_k (n/D, c/P)
        dense_res.append(r)
        if layer < L - 1:
            h, r = act_fwd(h, **act_opts)
            act_res.append(r)

    c = model.sizes[-1]
    vp = dict(
        axis=model_axis, c=c, label_smoothing=opts.get("label_smoothing", 0.0),
        ignore_index=opts.get("ignore_index"), z_loss=opts.get("z_loss", 0.0),
    )  # fmt: skip
    per_ex, lse, sum_u = _vp_local_fwd(h, labels, where, class_weights, **vp)
    acc = per_ex.dtype
    valid = model.valid(labels, where, n=x.shape[0])
    n_total = jnp.maximum(lax.psum(jnp.sum(valid).astype(acc), axis), 1.0)
    loss = lax.psum(jnp.sum(jnp.where(valid, per_ex, 0.0)), axis) / n_total
    g = jnp.where(valid, 1.0 / n_total, 0.0).astype(acc)  # global seed ∂L/∂loss_n (n/D,)
    delta, _, _ = _vp_local_bwd(
        h, labels, where, class_weights, lse, sum_u, g, batch_axis=axis, **vp
    )  # δ_L on this shard's classes (n/D, c/P)

    grads: list[dict[str, jax.Array]] = [{} for _ in range(L)]
    for layer in reversed(range(L)):
        if layer == 0:
            dw, db = dense_bwd_params(dense_res[0], delta)
        else:
            dx, dw, db = dense_bwd(dense_res[layer], delta)  # dx (n/D, i)
            if layer == L - 1:
                dx = lax.psum(dx, model_axis)  # "nc,ic->ni" summed over the class shards
            (delta,) = act_bwd(act_res[layer - 1], dx)
        grads[layer] = {
            "w": lax.psum(_acc(dw), axis).astype(dw.dtype),
            "b": lax.psum(_acc(db), axis).astype(db.dtype),
        }
    return loss, grads


def value_and_grad(
    model: MLP, mesh: Mesh, *, axis: str = "data", model_axis: str | None = None
) -> Callable:
    """``f(params, x, labels, *, where=None, class_weights=None) -> (mean loss, grads)`` with
    the batch split over the mesh axis ``axis``: :func:`jaxbp.value_and_grad` on a mesh.

    Each device runs the hand-written reverse loop of :func:`jaxbp.nn.forward_backward` on
    its ``n/D`` rows; the loss and gradients are re-weighted by the shard's share of the
    valid rows and reduced with one ``psum`` (see the module docstring), so the mean over
    valid rows is exact however unevenly ``where``/``ignore_index`` masks the shards.
    Parameters are replicated (``P()``); ``grads`` has the structure of ``params`` and is
    replicated, so an optax update runs as it is, inside or outside ``jax.jit``.

    Args:
      model: a :class:`jaxbp.MLP` (any loss).
      mesh: a :class:`jax.sharding.Mesh`, e.g. from ``jax.make_mesh`` (Explicit or Auto
        axes; one process, or every process's devices after ``jax.distributed.initialize``).
        Mesh axes other than ``axis`` and ``model_axis`` hold replicas. Inputs may come
        unplaced or laid out any way: on Explicit axes they are resharded as needed.
      axis: the mesh axis the batch is split over. The batch size ``n`` must be divisible by
        its size (``ValueError`` otherwise; pad with ``where=False`` rows: they change
        nothing).
      model_axis: optionally, a second mesh axis over which the *last* layer's ``w (i, c)``
        and ``b (c,)`` are split along the classes, with the vocab-parallel cross-entropy on
        top (``loss="softmax_cross_entropy"`` only; ``c`` divisible by its size). The last
        layer's gradients come back laid out ``P(None, model_axis)`` / ``P(model_axis)``.

    Shapes: ``x (n, i)`` laid out ``P(axis)``, ``labels (n,)`` ids or ``(n, c)``, ``where
    (n,)`` bool, ``class_weights (c,)``. Inputs are checked before tracing (label values only
    when this process can read them); across processes pass global arrays (:func:`shard`).
    """
    if not isinstance(model, MLP):
        raise TypeError(f"model: expected a jaxbp.MLP, got {type(model).__name__}")
    data = _axis_size(mesh, axis, "axis")
    if model_axis is not None:
        if model.loss != "softmax_cross_entropy":
            raise ValueError(
                f"model_axis: the vocab-parallel last layer needs loss='softmax_cross_entropy',"
                f" got {model.loss!r}"
            )
        if model_axis == axis:
            raise ValueError(f"model_axis: expected a mesh axis other than axis={axis!r}")
        vocab = _axis_size(mesh, model_axis, "model_axis")
        _divisible(
            "model", model.sizes[-1], vocab, model_axis, "the number of classes c", _PAD_CLASSES
        )

    def param_specs():
        specs: list[Any] = [P() for _ in range(model.num_layers)]
        if model_axis is not None:
            specs[-1] = {"w": P(None, model_axis), "b": P(model_axis)}
        return specs

    @jax.jit
    def run(params, x, labels, where, class_weights):
        model.check_inputs(params, x, labels, where, class_weights)  # traced: shapes only
        _divisible("x", x.shape[0], data, axis, "the batch size n", _PAD_ROWS)
        label_spec = P(axis) if labels.ndim == 1 else P(axis, model_axis)
        if model_axis is None:
            local = functools.partial(_data_parallel_local, model, axis)
        else:
            local = functools.partial(_both_parallel_local, model, axis, model_axis)
        specs = param_specs()
        return _call(
            local, mesh, (params, x, labels, where, class_weights),
            (specs, P(axis), label_spec, P(axis), P(model_axis)), (P(), specs),
        )  # fmt: skip

    def value_and_grad_fn(params, x, labels, *, where=None, class_weights=None):
        if _host_readable(params, x, labels, where, class_weights):
            model.check_inputs(params, x, labels, where, class_weights)
        else:  # global arrays spanning other processes: shape checks at trace time only
            _validate_masks(model, labels, where, class_weights, jnp.shape(x))
        return run(params, x, labels, where, class_weights)

    value_and_grad_fn.jitted = run  # type: ignore[attr-defined]
    return value_and_grad_fn


def _validate_masks(model, labels, where, class_weights, x_shape):
    """The shape/dtype checks of :meth:`MLP.check_inputs` that need no values."""
    if model.loss == "softmax_cross_entropy":
        opts = dict(model.loss_options)
        fake = jax.ShapeDtypeStruct((x_shape[0], model.sizes[-1]), jnp.float32)
        _validate_ce(
            fake, labels, where, class_weights, opts.get("label_smoothing", 0.0),
            opts.get("ignore_index"), opts.get("z_loss", 0.0),
        )  # fmt: skip


# ------------------------------------------------- vocab-parallel fused linear + cross-entropy
#
# The chunked scheme of :mod:`jaxbp.fused` ("recompute" strategy) on each shard's columns
# ``w_k (d, v/P)``; the per-row statistics are combined across shards exactly as above.


def _vpf_row_terms(labels, where, cw_k, local, v, eps, ignore_index, axis, acc):
    """``valid, bad, Σ_v u, cw[y]`` (n,) over the whole vocabulary, from the shards' pieces."""
    valid = valid_rows(labels, where, ignore_index=ignore_index, batch_shape=labels.shape)
    bad = _bad_labels(labels, v, ignore_index) & valid
    if cw_k is None:
        ones = jnp.ones(labels.shape, acc)
        return valid, bad, ones, ones  # Σ_v u = (1 − ε)·1 + (ε/v)·v
    cwa = cw_k.astype(acc)
    v_local = cwa.shape[0]
    own = (local >= 0) & (local < v_local)  # this shard holds the target's column
    cw_y = lax.psum(jnp.where(own, cwa[jnp.clip(local, 0, v_local - 1)], 0.0), axis)
    su = (1.0 - eps) * cw_y + (eps / v) * lax.psum(jnp.sum(cwa), axis)
    return valid, bad, su, cw_y


def _vpf_local_fwd(x, w_k, b_k, labels, where, cw_k, *, axis, v, ignore_index,
                   label_smoothing, z_loss, softcap, chunk_size, accum_dtype):  # fmt: skip
    """Per shard: ``(loss, lse, Σ_v u)`` (n,), an online log-sum-exp over local chunks."""
    from . import fused

    n, v_local = x.shape[0], w_k.shape[1]
    acc = fused._acc_of(accum_dtype, x.dtype)
    eps = float(label_smoothing)
    local = labels - (lax.axis_index(axis) * v_local).astype(labels.dtype)  # ids on this shard

    def body(start, k, carry):
        m, s, zy, zc = carry  # running max, Σ e^{z − m}, z[y], Σ cw·z      (n,) each
        b_c = None if b_k is None else fused._cols(b_k, start, k, 0)
        z, _ = fused._logits(x, fused._cols(w_k, start, k, 1), b_c, acc, softcap)  # (n,k)
        _, hit = fused._smoothed(local, start, k, 0.0, v, acc)
        zy = zy + jnp.sum(jnp.where(hit, z, 0.0), axis=1)
        if eps:
            if cw_k is None:
                zc = zc + jnp.sum(z, axis=1)
            else:
                cw_c = fused._cols(cw_k, start, k, 0).astype(acc)
                zc = zc + jnp.sum(jnp.where(cw_c == 0, 0.0, cw_c * z), axis=1)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        s = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(z - m_safe[:, None]), axis=1)
        return m_new, s, zy, zc

    zeros = jnp.zeros((n,), acc)
    m0 = jnp.full((n,), -jnp.inf, acc)
    m_k, s_k, zy_k, zc_k = fused._over_chunks(
        v_local, fused._chunk(chunk_size, v_local), body, (m0, zeros, zeros, zeros)
    )
    m = lax.pmax(m_k, axis)  # global row max (n,)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    mk_safe = jnp.where(jnp.isfinite(m_k), m_k, 0.0)  # s_k is relative to it
    s_k = jnp.where(s_k > 0, s_k * jnp.exp(mk_safe - m_safe), 0.0)  # rescaled; exp ≤ 1
    s, zy, zc = lax.psum(jnp.stack([s_k, zy_k, zc_k]), axis)  # one all-reduce (3, n)
    lse = m_safe + jnp.log(s)
    valid, bad, su, cw_y = _vpf_row_terms(
        labels, where, cw_k, local, v, eps, ignore_index, axis, acc
    )
    loss = fused._finish_loss(
        lse, zy, zc, valid, bad, su, cw_y, v=v, label_smoothing=eps, z_loss=z_loss
    )
    return loss, lse, su


def _vpf_local_bwd(x, w_k, b_k, labels, where, cw_k, lse, su, g, *, axis, batch_axis, v,
                   ignore_index, label_smoothing, z_loss, softcap, chunk_size,
                   accum_dtype):  # fmt: skip
    """Per shard: ``(dx (n,d), dw_k (d,v/P), db_k, dcw_k)``, logits recomputed per chunk;
    ``dx = psum_model(Σ_chunks dz·w_cᵀ)  "nk,dk->nd"`` is the only model-axis all-reduce."""
    from . import fused

    v_local = w_k.shape[1]
    acc = fused._acc_of(accum_dtype, x.dtype)
    eps = float(label_smoothing)
    local = labels - (lax.axis_index(axis) * v_local).astype(labels.dtype)
    valid = valid_rows(labels, where, ignore_index=ignore_index, batch_shape=labels.shape)
    bad = _bad_labels(labels, v, ignore_index) & valid
    gv = jnp.where(valid, g.astype(acc), 0.0)  # (n,); masked rows: exactly 0
    scale = su + (2.0 * z_loss) * lse  # Σ_v u + 2λ·lse  (n,)

    def body(start, k, carry):
        dx, dw, db, dcw = carry
        w_c = fused._cols(w_k, start, k, 1)  # (d,k)
        b_c = None if b_k is None else fused._cols(b_k, start, k, 0)
        z, t = fused._logits(x, w_c, b_c, acc, softcap)  # (n,k), recomputed
        y, _ = fused._smoothed(local, start, k, eps, v, acc)  # y' (n,k)
        u = y if cw_k is None else y * fused._cols(cw_k, start, k, 0).astype(acc)
        p = jnp.exp(z - lse[:, None])
        dz = gv[:, None] * (p * scale[:, None] - u)  # "n,nk->nk"
        dz = jnp.where(valid[:, None], dz, 0.0)
        dz = jnp.where(bad[:, None], jnp.nan, dz)
        if cw_k is not None:  # dcw_c = Σ_n g·y'⊙(lse − z)    "nk->k"
            per_row = jnp.where(y == 0, 0.0, y * (gv[:, None] * (lse[:, None] - z)))
            per_row = jnp.where(valid[:, None], per_row, 0.0)
            dcw = lax.dynamic_update_slice_in_dim(dcw, jnp.sum(per_row, axis=0), start, 0)
        if t is not None:
            dz = dz * (1.0 - t * t)  # through z = cap·tanh(z̃/cap)
        dz_in = dz.astype(w_k.dtype)
        dx = dx + fused._mm(dz_in, w_c, (1, 1), acc)  # "nk,dk->nd"
        dw = lax.dynamic_update_slice_in_dim(dw, fused._mm(x, dz_in, (0, 0), acc), start, 1)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, jnp.sum(dz, axis=0), start, 0)  # "nk->k"
        return dx, dw, db, dcw

    carry = (
        jnp.zeros(x.shape, acc),
        jnp.zeros(w_k.shape, acc),
        None if b_k is None else jnp.zeros(b_k.shape, acc),
        None if cw_k is None else jnp.zeros(cw_k.shape, acc),
    )
    dx, dw, db, dcw = fused._over_chunks(v_local, fused._chunk(chunk_size, v_local), body, carry)
    dx = lax.psum(dx, axis)  # each shard's classes contribute to every row's dx
    if batch_axis is not None:  # parameters are shared by the data shards
        dw, db, dcw = (None if t is None else lax.psum(t, batch_axis) for t in (dw, db, dcw))
    return (
        dx.astype(x.dtype),
        dw.astype(w_k.dtype),
        None if db is None else db.astype(b_k.dtype),
        None if dcw is None else dcw.astype(cw_k.dtype),
    )


_STATIC_FUSED = (
    "mesh", "axis", "batch_axis", "ignore_index", "label_smoothing", "z_loss", "softcap",
    "chunk_size", "accum_dtype",
)  # fmt: skip


def _fused_specs(axis, batch_axis):
    """in_specs of ``(x, w, b, labels, where, class_weights)``."""
    return (P(batch_axis), P(None, axis), P(axis), P(batch_axis), P(batch_axis), P(axis))


@functools.partial(jax.jit, static_argnames=_STATIC_FUSED)
def vocab_parallel_linear_softmax_cross_entropy_fwd(
    x, w, b, labels, where=None, class_weights=None, *, mesh, axis="model", batch_axis=None,
    ignore_index=None, label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None,
    accum_dtype=None,
):  # fmt: skip
    """Forward on global arrays: ``loss (n,)``; residuals ``(x, w, b, labels, where,
    class_weights, lse (n,), Σ_v u (n,))``: two ``(n,)`` vectors are all that is new."""
    local = functools.partial(
        _vpf_local_fwd, axis=axis, v=w.shape[1], ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        chunk_size=chunk_size, accum_dtype=accum_dtype,
    )  # fmt: skip
    row = P(batch_axis)
    args = (x, w, b, labels, where, class_weights)
    loss, lse, su = _call(local, mesh, args, _fused_specs(axis, batch_axis), (row, row, row))
    return loss, (*args, lse, su)


@functools.partial(jax.jit, static_argnames=_STATIC_FUSED)
def vocab_parallel_linear_softmax_cross_entropy_bwd(
    res, g, *, mesh, axis="model", batch_axis=None, ignore_index=None, label_smoothing=0.0,
    z_loss=0.0, softcap=None, chunk_size=None, accum_dtype=None,
):  # fmt: skip
    """Backward: ``(dx (n,d), dw (d,v) split like w, db | None, None, None, dcw | None)``."""
    x, w, b, labels, where, cw, lse, su = res
    specs = _fused_specs(axis, batch_axis)
    row = P(batch_axis)

    def local(x, w_k, b_k, labels, where, cw_k, lse, su, g):
        outs = _vpf_local_bwd(
            x, w_k, b_k, labels, where, cw_k, lse, su, g, axis=axis, batch_axis=batch_axis,
            v=w.shape[1], ignore_index=ignore_index, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, chunk_size=chunk_size, accum_dtype=accum_dtype,
        )  # fmt: skip
        return tuple(t for t in outs if t is not None)

    out_specs = (specs[0], specs[1]) + ((specs[2],) if b is not None else ())
    out_specs += (specs[5],) if cw is not None else ()
    outs = list(
        _call(
            local,
            mesh,
            (x, w, b, labels, where, cw, lse, su, g),
            (*specs, row, row, row),
            out_specs,
        )  # fmt: skip
    )
    dx, dw = outs.pop(0), outs.pop(0)
    db = outs.pop(0) if b is not None else None
    dcw = outs.pop(0) if cw is not None else None
    return dx, dw, db, None, None, dcw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _vpf(options, x, w, b, labels, where, class_weights):
    return vocab_parallel_linear_softmax_cross_entropy_fwd(
        x, w, b, labels, where, class_weights, **dict(options)
    )[0]


def _vpf_fwd(options, x, w, b, labels, where, class_weights):
    out, res = vocab_parallel_linear_softmax_cross_entropy_fwd(
        x, w, b, labels, where, class_weights, **dict(options)
    )
    args = (x, w, b, labels, where, class_weights)
    return out, (res, _arg_specs(dict(options)["mesh"], args))


def _vpf_bwd(options, res, g):
    res, specs = res
    cts = vocab_parallel_linear_softmax_cross_entropy_bwd(res, g, **dict(options))
    return _as_primals(dict(options)["mesh"], cts, specs)


_vpf.defvjp(_vpf_fwd, _vpf_bwd)


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
    from . import fused

    x, w, b, labels, where, class_weights, accum_dtype = fused._validate(
        x, w, b, labels, where, class_weights, label_smoothing, z_loss, softcap, chunk_size,
        accum_dtype, "recompute", ignore_index,
    )  # fmt: skip
    if x.ndim != 2:
        raise ValueError(f"x: expected shape (n, d) (flatten leading axes into n), got {x.shape}")
    parts = _axis_size(mesh, axis, "axis")
    _divisible("w", w.shape[1], parts, axis, "the vocabulary size v", _PAD_CLASSES)
    if batch_axis is not None:
        if batch_axis == axis:
            raise ValueError(f"batch_axis: expected a mesh axis other than axis={axis!r}")
        rows = _axis_size(mesh, batch_axis, "batch_axis")
        _divisible("x", x.shape[0], rows, batch_axis, "the batch size n", _PAD_ROWS)
    if _host_readable(labels, where):
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
