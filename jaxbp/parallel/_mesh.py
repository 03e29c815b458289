"""Meshes and layouts for :mod:`jaxbp.parallel`: ``shard_map`` across JAX versions, mesh
construction with clear errors, placing host arrays, and laying inputs out on Explicit axes.

A :class:`jax.sharding.Mesh` as ``jax.make_mesh`` makes it has Explicit axes (newer JAX) or
Auto ones (older); on Explicit axes ``shard_map`` wants its inputs laid out as its
``in_specs`` say, so :func:`call` reshards them first (:func:`laid_out`), and a
``custom_vjp``'s cotangent gets its primal's layout where the primal's type names the mesh
(:func:`arg_specs`, :func:`as_primals`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .. import _vma

__all__ = ["P", "make_mesh", "shard", "shard_map"]

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


def shard(tree: Any, mesh: Mesh, spec: Any = None) -> Any:
    """Place host arrays (every process holding the same *global* values) on ``mesh`` as
    global ``jax.Array``s laid out by ``spec`` (``P()`` replicates, ``P("data")`` splits the
    leading axis), or by a pytree of specs with ``tree``'s structure (e.g.
    :func:`jaxbp.parallel.gpt_param_specs`). Works with one process or many: each process
    fills only the shards of its own devices (``jax.make_array_from_callback``)."""

    def one(x, s):
        x, sharding = np.asarray(x), NamedSharding(mesh, s)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    if spec is None or isinstance(spec, PartitionSpec):
        return jax.tree.map(lambda x: one(x, P() if spec is None else spec), tree)
    return jax.tree.map(one, tree, spec)


# ------------------------------------------------------------------------ checks


def axis_size(mesh: Mesh, axis: str | None, name: str) -> int:
    if axis is None:
        return 1
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"{name}: expected one of the mesh axes {mesh.axis_names}, got {axis!r}")
    return int(mesh.shape[axis])


def no_dropout(model: Any) -> None:
    """``ValueError`` for a model whose training step draws dropout masks (``model.dropout >
    0``): a step on a mesh would draw each device's rows' masks from the same key, the same
    mask on every shard, not one device's draws."""
    rate = getattr(model, "dropout", 0.0)
    if isinstance(rate, int | float) and rate > 0.0:
        raise ValueError(
            f"model: {type(model).__name__}(dropout={rate}) on a mesh: jaxbp.parallel draws no "
            "dropout masks (every device would draw the same mask for its rows); train it on "
            "one device, or with dropout=0"
        )


def divisible(name: str, size: int, parts: int, axis: str, what: str, hint: str) -> None:
    if size % parts:
        raise ValueError(
            f"{name}: expected {what} ({size}) divisible by the {parts} devices of mesh axis "
            f"{axis!r}; {hint}"
        )


def _divisors(k: int) -> str:
    ds = [q for q in range(1, k + 1) if k % q == 0]
    return ", ".join(map(str, ds[:-1])) + (" or " if len(ds) > 1 else "") + str(ds[-1])


def not_divisible(name: str, what: str, size: int, parts: int, axis: str, fix: str):
    """The ``ValueError`` for ``size`` not divisible by the ``parts`` devices of ``axis``:
    the sizes, the axis sizes that would divide it, and ``fix``."""
    return ValueError(
        f"{name}: expected {what} ({size}) divisible by the {parts} devices of mesh axis "
        f"{axis!r}; a {axis!r} axis of {_divisors(size)} devices divides it, or {fix}"
    )


def round_up(size: int, parts: int) -> int:
    """The least multiple of ``parts`` that is ``≥ size``."""
    return -(-size // parts) * parts


PAD_ROWS = "pad the batch with where=False rows (they change nothing) or use another mesh"
PAD_CLASSES = (
    "pad the classes with −inf logit columns (without label smoothing) or use another mesh"
)


def host_readable(*trees) -> bool:
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


def laid_out(mesh: Mesh, arg: Any, spec: Any) -> Any:
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


def arg_specs(mesh: Mesh, args: Sequence[Any]) -> _vma.Static:
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


def as_primals(mesh: Mesh, cts: Sequence[Any], specs: _vma.Static) -> tuple:
    """Each cotangent resharded to its primal's layout (where :func:`arg_specs` has one)."""
    reshard = getattr(jax.sharding, "reshard", None) or getattr(jax, "reshard", None)
    return tuple(
        ct if ct is None or spec is None else reshard(ct, NamedSharding(mesh, spec))
        for ct, spec in zip(cts, specs.value, strict=True)
    )


def call(fn: Callable, mesh: Mesh, args: Sequence[Any], specs: Sequence[Any], out_specs: Any):
    """``shard_map(fn)(*args)`` where some ``args`` may be ``None`` (passed through as None);
    on a mesh with Explicit axes, the arguments are first laid out as ``specs`` say."""
    keep = [k for k, a in enumerate(args) if a is not None]
    args = [a if a is None else laid_out(mesh, a, specs[k]) for k, a in enumerate(args)]

    def local(*kept):
        full: list[Any] = [None] * len(args)
        for k, v in zip(keep, kept, strict=True):
            full[k] = v
        return fn(*full)

    mapped = shard_map(
        local, mesh=mesh, in_specs=tuple(specs[k] for k in keep), out_specs=out_specs
    )
    return mapped(*(args[k] for k in keep))
