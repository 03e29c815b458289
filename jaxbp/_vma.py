"""Varying manual axes (vma): hand-written rules inside a user's ``shard_map``.

Inside ``jax.shard_map(..., check_vma=True)`` (the default) every value's type records the
mesh axes along which it may differ from device to device (``jax.typeof(x).vma``, or
``.manual_axis_type.varying`` in newer JAX). JAX's
autodiff keeps those types consistent by itself: where an invariant weight meets a
varying batch, it inserts an implicit ``pvary``, whose transpose is a ``psum``. A
hand-written backward must do the same: the cotangent of an argument has the argument's
type, so a cotangent that varies along axes its primal does not (``dw = xᵀ·g`` for a
replicated ``w``) is summed over those axes. That sum is the gradient JAX's autodiff
gives for the same program. Loop carries (``fori_loop``, ``scan``) and ``cond`` branches
must also have one type on every iteration: they start with the vma of the values they
will hold.

Outside ``shard_map``, or with ``check_vma=False``, every vma is empty and nothing here
does anything. On a JAX without vma types (before 0.6) the same holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["LOCAL", "Reduce", "Static", "fit_cotangents", "of", "pvary", "pvary_tree", "union"]


def of(x: Any) -> frozenset:
    """The mesh axes ``x`` varies along (empty outside ``shard_map`` and for ``None``)."""
    if x is None:
        return frozenset()
    typeof = getattr(jax, "typeof", None)
    try:
        aval = typeof(x) if typeof is not None else jax.core.get_aval(x)
    except TypeError:  # not an array (a Python scalar option): invariant
        return frozenset()
    mat = getattr(aval, "manual_axis_type", None)  # JAX ≥ 0.10: .manual_axis_type.varying
    if mat is not None:
        return frozenset(getattr(mat, "varying", None) or ())
    return frozenset(getattr(aval, "vma", None) or ())  # JAX 0.6-0.9: .vma


def union(*xs: Any) -> frozenset:
    """Every axis any of ``xs`` (arrays, ``None`` or pytrees of them) varies along."""
    out: frozenset = frozenset()
    for leaf in jax.tree.leaves(xs):
        out |= of(leaf)
    return out


def pvary(x: Any, axes: frozenset) -> Any:
    """``x`` typed as varying along ``axes`` too (values unchanged; ``None`` stays)."""
    if x is None:
        return None
    missing = tuple(sorted(frozenset(axes) - of(x)))
    if not missing:
        return x
    pcast = getattr(lax, "pcast", None)  # JAX ≥ 0.8
    if pcast is not None:
        return pcast(x, missing, to="varying")
    pvary_fn = getattr(lax, "pvary", None)  # JAX 0.6-0.9
    return x if pvary_fn is None else pvary_fn(x, missing)


def pvary_tree(tree: Any, axes: frozenset) -> Any:
    """:func:`pvary` on every leaf of ``tree``."""
    return jax.tree.map(lambda x: pvary(x, axes), tree)


def fit(ct: Any, primal_vma: frozenset) -> Any:
    """The cotangent ``ct`` with exactly ``primal_vma``: ``psum`` over the axes it varies
    along beyond its primal's (the transpose of the implicit ``pvary``), ``pvary`` to those
    it lacks. ``None`` (integer labels, masks) stays ``None``."""
    if ct is None:
        return None
    extra = tuple(sorted(of(ct) - primal_vma))
    if extra:
        ct = lax.psum(ct, extra)
    return pvary(ct, primal_vma)


def fit_cotangents(cts: tuple, primal_vmas: tuple) -> tuple:
    """:func:`fit` for each cotangent against its primal's recorded vma."""
    return tuple(fit(ct, v) for ct, v in zip(cts, primal_vmas, strict=True))


class Static:
    """A pytree with no leaves: ``value`` rides along as static aux data (in residuals)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"Static({self.value!r})"


jax.tree_util.register_pytree_node(Static, lambda s: ((), s.value), lambda aux, _: Static(aux))


@dataclasses.dataclass(frozen=True)
class Reduce:
    """How per-row statistics combine across class (vocabulary) shards: over the mesh axis
    ``axis`` (``pmax``/``psum``, inside a ``shard_map``), or not at all (``axis=None``, one
    device: :data:`LOCAL`). The softmax cross-entropy rules (:mod:`jaxbp.losses`) and the
    chunked kernel (:mod:`jaxbp._xent`) take one, so the vocabulary-parallel losses of
    :mod:`jaxbp.parallel` are the same code with the reductions over the mesh axis."""

    axis: str | None = None

    def max(self, a):
        return a if self.axis is None else lax.pmax(a, self.axis)

    def sum(self, a):
        return a if self.axis is None else lax.psum(a, self.axis)

    def first_column(self, c_local: int, dtype) -> Any:
        """The global id of this shard's first class column (0 on one device)."""
        if self.axis is None:
            return jnp.zeros((), dtype)
        return (lax.axis_index(self.axis) * c_local).astype(dtype)


LOCAL = Reduce()
