"""Explicit sharding: the hand-written rules under plain ``jit`` on ``jax.make_mesh`` meshes.

``jax.make_mesh`` gives Explicit axes by default, and with them a value's sharding is part
of its type (``jax.typeof(x)`` prints ``float32[8@data,4]``). JAX then refuses any op whose
output sharding would be a guess: a dot contracting a sharded axis (``dw = xᵀ·g`` with the
batch split over ``data``), a gather of replicated rows by sharded ids, a loop carry that
starts replicated and comes back sharded. Its own autodiff settles each one by a typing
rule: a cotangent has its primal's type. A hand-written rule gets the same answer here by
running under ``jax.sharding.auto_axes``: inside, the explicit axes are Auto and XLA's
partitioner places every intermediate (it inserts the all-reduce of ``dw``); at the
boundary every result gets a type:

* a backward rule's cotangents: each its own argument's sharding, JAX's rule;
* a forward rule's output and residuals, and a model step's results: the sharding of the
  argument they are shaped like. The same shape as an argument: that argument's sharding
  (``w``'s for a gradient of ``w``); otherwise the longest run of leading axes equal to an
  argument's (the batch: ``(n, o)`` from ``x (n, i)``, a loss ``(n,)`` from ``logits (n, c)``)
  with that argument's sharding on those axes and none on the rest; a scalar is replicated.

A sharding never changes a value, only where it lives: a shape that matches an argument by
coincidence costs communication, never correctness.

With no Explicit axis among the arguments or in ``jax.set_mesh``'s mesh (one device, Auto
meshes, inside a ``shard_map``, JAX versions without sharding in types) :func:`run` is
``fn(*args)`` and nothing here does anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["mesh_of", "run", "spec_of", "specs_of"]

_sharding = jax.sharding
_HAVE = all(
    hasattr(_sharding, name) for name in ("auto_axes", "get_abstract_mesh", "use_abstract_mesh")
) and hasattr(jax, "typeof")


def _aval(x: Any):
    try:
        return jax.typeof(x)
    except TypeError:  # not an array (a Python scalar option)
        return None


def _explicit(mesh: Any) -> bool:
    return bool(getattr(mesh, "explicit_axes", ()))


def mesh_of(tree: Any):
    """The abstract mesh with Explicit axes that ``jax.set_mesh`` set, or that a leaf of
    ``tree`` is typed on; ``None`` when there is none (nothing to do)."""
    if not _HAVE:
        return None
    ctx = _sharding.get_abstract_mesh()
    if _explicit(ctx):
        return ctx
    for leaf in jax.tree.leaves(tree):
        mesh = getattr(getattr(_aval(leaf), "sharding", None), "mesh", None)
        if _explicit(mesh):
            return mesh
    return None


def spec_of(x: Any):
    """``x``'s ``PartitionSpec``, one entry per axis; ``None`` for ``None`` or a non-array."""
    aval = None if x is None else _aval(x)
    spec = getattr(getattr(aval, "sharding", None), "spec", None)
    if spec is None or not hasattr(aval, "shape"):
        return None
    entries = tuple(spec) + (None,) * (len(aval.shape) - len(spec))
    return _sharding.PartitionSpec(*entries)


def specs_of(args: tuple) -> tuple:
    """:func:`spec_of` of each argument (the types a backward rule's cotangents take)."""
    return tuple(spec_of(a) for a in args)


def _like(shape: tuple, known: list[tuple[tuple, tuple]]):
    """The spec of a result of ``shape`` from ``known`` ``(shape, spec entries)`` pairs."""
    P = _sharding.PartitionSpec
    for s, entries in known:
        if s == shape:
            return P(*entries)
    best, best_k = None, 0
    for s, entries in known:
        k = 0
        while k < min(len(s), len(shape)) and s[k] == shape[k]:
            k += 1
        if k > best_k and any(e is not None for e in entries[:k]):
            best, best_k = entries, k
    if best is None:
        return P()
    return P(*best[:best_k], *(None,) * (len(shape) - best_k))


def run(fn: Callable, args: tuple, out_specs: Callable | None = None) -> Any:
    """``fn(*args)``, under ``auto_axes`` when an argument is typed on Explicit axes.

    ``out_specs(shapes) -> specs`` types the results (a pytree of ``PartitionSpec`` matching
    ``jax.eval_shape``'s ``shapes``); by default each result takes the sharding of the
    argument it is shaped like (the module docstring)."""
    mesh = mesh_of(args)
    if mesh is None:
        return fn(*args)
    P = _sharding.PartitionSpec
    ctx = contextlib.nullcontext()
    if not _explicit(_sharding.get_abstract_mesh()):  # typed inputs, no jax.set_mesh
        ctx = _sharding.use_abstract_mesh(mesh)
    with ctx:
        shapes = jax.eval_shape(_sharding.auto_axes(fn, out_sharding=P()), *args)
        if out_specs is None:
            known = [(tuple(jax.typeof(a).shape), tuple(s)) for a in jax.tree.leaves(args)
                     if (s := spec_of(a)) is not None]  # fmt: skip
            specs = jax.tree.map(lambda s: _like(tuple(s.shape), known), shapes)
        else:
            specs = out_specs(shapes)
        return _sharding.auto_axes(fn, out_sharding=specs)(*args)
