"""Per-example parameter gradients as *contributions*: what each op's per-example rule returns.

Index letters::

    n  examples                 T, S  rows of one example (tokens; 1 for an MLP's rows)
    a, b  the two axes of a parameter matrix (i, o for a dense weight; v, d for a table)

An op with parameters declares ``op.example_grads(res, g, *, examples, **options)``: for
each parameter argument, example ``k``'s gradient ``G_k`` as a contribution, never as a
``(n, a, b)`` array where an identity is cheaper. Two kinds:

``Outer(A, B)``  ``G_k = Σ_t A_kt ⊗ B_kt``, a sum of outer products of two *factors* with
                 ``T`` rows per example: a dense weight ``Σ_t x_t δ_tᵀ``, an embedding table
                 ``Σ_t onehot(id_t) δ_tᵀ``, a language-model head ``Σ_t x_t (p_t − y_t)ᵀ``.
``Full(G)``      ``G (n, *shape)`` as it is (biases, norm gains: as small as the parameter).

Factors: :class:`Rows` (an array ``(n, T, a)``), :class:`OneHot` (ids ``(n, T)`` standing
for their one-hot rows of length ``a``, never formed), and lazy factors of an op's own (the
head's ``p − y``, computed chunk by chunk over the vocabulary in :mod:`jaxbp.fused`). A
factor knows two products with another factor, per example:

    gram(A, C)   (n, T, S)   ⟨A_t, C_s⟩       Rows·Rows "nta,nsa->nts";  OneHot·OneHot
                                              [id_t = id_s] (bool);  OneHot·Rows  C_s[id_t]
    outer(A, B)  (n, a, b)   Σ_t A_t ⊗ B_t    Rows⊗Rows "nta,ntb->nab";  OneHot⊗Rows a
                                              scatter-add per example

From those the transforms get everything (:mod:`jaxbp.per_example`):

    per-example gradient    materialize(Outer(A, B)) = outer(A, B)
    ⟨G_k, G'_k⟩  (ghost)    Σ_{t,s} gram(A, A')_ts · gram(B, B')_ts       (n, T, S) only
    ‖G_k‖²                  ⟨G_k, G_k⟩

so a leaf reached by two ops (a tied embedding and head) gets the norm of the *sum*:
``‖G + G'‖² = ⟨G,G⟩ + 2⟨G,G'⟩ + ⟨G',G'⟩``. The ghost product holds ``(n, T, S)``; for two
Rows factors on each side, the ``(n, a, b)`` outer products are formed instead when that is
smaller (``T·S ≥ a·b``), as for an MLP layer where ``T = 1`` makes the ghost product
Goodfellow's ``‖x‖²·‖δ‖²``. Products run in float32 for half-precision inputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks

__all__ = [
    "Factor", "Full", "OneHot", "Outer", "Rows", "group", "gram", "inner", "materialize",
    "outer", "scale_examples", "sq_norm", "METHODS",
]  # fmt: skip

METHODS = ("auto", "ghost", "outer")


def _acc(a):
    return a.astype(_checks.accum_dtype(a.dtype))


def group(a: jax.Array, examples: int, trailing: int, name: str = "x") -> jax.Array:
    """``a (N..., k...)`` as ``(n, T, k...)``: the leading axes split into ``examples``
    examples of ``T`` rows each (example-major, as every batch in jaxbp is laid out)."""
    lead = a.shape[: a.ndim - trailing]
    rows = math.prod(lead)
    if examples < 1 or rows % examples:
        raise ValueError(
            f"{name}: expected leading axes {lead} holding {examples} examples (example-major), "
            f"got {rows} rows, not a multiple of {examples}"
        )
    return a.reshape(examples, rows // examples, *a.shape[a.ndim - trailing :])


def scale_examples(g: jax.Array, s: jax.Array) -> jax.Array:
    """``g`` with every row of example ``k`` multiplied by ``s[k]`` (``s (n,)``; ``g``'s
    leading axes example-major), in ``g``'s dtype."""
    n = s.shape[0]
    flat = _acc(g).reshape(n, -1) * s.astype(_checks.accum_dtype(g.dtype))[:, None]
    return flat.reshape(g.shape).astype(g.dtype)


# ------------------------------------------------------------------------------- factors


class Factor:
    """One side of ``Σ_t A_t ⊗ B_t``: ``rows`` rows of length ``size`` per example.

    Subclasses define ``n``, ``rows``, ``size`` and return ``NotImplemented`` from
    :meth:`gram`/:meth:`outer` for a partner they do not know (the partner is asked next).
    """

    n: int
    rows: int
    size: int

    def gram(self, other: Factor) -> Any:
        """``(n, rows, other.rows)``: ``⟨self_t, other_s⟩`` per example."""
        return NotImplemented

    def outer(self, other: Factor) -> Any:
        """``(n, size, other.size)``: ``Σ_t self_t ⊗ other_t`` per example."""
        return NotImplemented


@dataclasses.dataclass(frozen=True, eq=False)
class Rows(Factor):
    """An array of rows ``a (n, T, size)``."""

    a: jax.Array

    @property
    def n(self):
        return self.a.shape[0]

    @property
    def rows(self):
        return self.a.shape[1]

    @property
    def size(self):
        return self.a.shape[2]

    def gram(self, other):
        if isinstance(other, Rows):
            return jnp.einsum("nta,nsa->nts", _acc(self.a), _acc(other.a))
        return NotImplemented

    def outer(self, other):
        if isinstance(other, Rows):
            return jnp.einsum("nta,ntb->nab", _acc(self.a), _acc(other.a))
        return NotImplemented


@dataclasses.dataclass(frozen=True, eq=False)
class OneHot(Factor):
    """Ids ``(n, T)`` standing for one-hot rows of length ``size`` (never formed). An id
    outside ``[0, size)`` stands for a zero row (the embedding drops its gradient)."""

    ids: jax.Array
    size: int

    @property
    def n(self):
        return self.ids.shape[0]

    @property
    def rows(self):
        return self.ids.shape[1]

    def _ok(self):
        return (self.ids >= 0) & (self.ids < self.size)

    def gram(self, other):
        if isinstance(other, OneHot):
            same = self.ids[:, :, None] == other.ids[:, None, :]
            return same & self._ok()[:, :, None] & other._ok()[:, None, :]  # bool (n, T, S)
        if isinstance(other, Rows):  # ⟨onehot(id_t), c_s⟩ = c_s[id_t]
            idx = jnp.clip(self.ids, 0, self.size - 1)  # (n, T)
            at = jnp.take_along_axis(_acc(other.a), idx[:, None, :], axis=2)  # (n, S, T)
            return jnp.where(self._ok()[:, :, None], jnp.swapaxes(at, 1, 2), 0.0)
        return NotImplemented

    def outer(self, other):
        if isinstance(other, Rows):  # Σ_t onehot(id_t) ⊗ b_t: a scatter-add per example
            b = _acc(other.a)
            rows = jnp.where(self._ok(), self.ids, self.size)  # out of range: dropped
            out = jnp.zeros((self.n, self.size, b.shape[2]), b.dtype)
            example = jnp.arange(self.n)[:, None]
            return out.at[example, rows].add(b, mode="drop")
        return NotImplemented


def gram(f: Factor, h: Factor) -> jax.Array:
    """``(n, f.rows, h.rows)``: ``⟨f_t, h_s⟩`` per example, from whichever factor knows
    the other."""
    out = f.gram(h)
    if out is NotImplemented:
        out = h.gram(f)
        if out is NotImplemented:
            raise TypeError(f"no Gram product between {type(f).__name__} and {type(h).__name__}")
        out = jnp.swapaxes(out, 1, 2)
    return out


def outer(f: Factor, h: Factor) -> jax.Array:
    """``(n, f.size, h.size)``: ``Σ_t f_t ⊗ h_t`` per example."""
    if f.rows != h.rows:
        raise ValueError(f"outer: factors with {f.rows} and {h.rows} rows per example")
    out = f.outer(h)
    if out is NotImplemented:
        out = h.outer(f)
        if out is NotImplemented:
            raise TypeError(f"no outer product of {type(f).__name__} and {type(h).__name__}")
        out = jnp.swapaxes(out, 1, 2)
    return out


# ------------------------------------------------------------------------- contributions


@dataclasses.dataclass(frozen=True, eq=False)
class Outer:
    """``G_k = Σ_t left_kt ⊗ right_kt``, of shape ``(left.size, right.size)``."""

    left: Factor
    right: Factor

    @property
    def shape(self):
        return (self.left.size, self.right.size)

    @property
    def T(self) -> Outer:
        return Outer(self.right, self.left)


@dataclasses.dataclass(frozen=True, eq=False)
class Full:
    """Per-example gradients as they are: ``g (n, *shape)``."""

    g: jax.Array

    @property
    def shape(self):
        return tuple(self.g.shape[1:])

    @property
    def T(self) -> Full:
        return Full(jnp.swapaxes(self.g, -1, -2))


def materialize(c) -> jax.Array:
    """The per-example gradients ``(n, *shape)`` of a contribution (float32 for half)."""
    if isinstance(c, Full):
        return _acc(c.g)
    if isinstance(c, Outer):
        return outer(c.left, c.right)
    raise TypeError(f"expected an Outer or Full contribution, got {type(c).__name__}")


def _times(a, b):
    """``a ⊙ b`` where either may be a bool Gram (one-hot factors): in the other's dtype."""
    if a.dtype == jnp.bool_:
        return jnp.where(a, b, jnp.zeros((), b.dtype))
    if b.dtype == jnp.bool_:
        return jnp.where(b, a, jnp.zeros((), a.dtype))
    return a * b


def _sum_trailing(a):
    return jnp.sum(a.reshape(a.shape[0], -1), axis=1)


def _dense_is_smaller(c1: Outer, c2: Outer) -> bool:
    """Both sides plain rows, and the ``(n, a, b)`` outer products smaller than the
    ``(n, T, S)`` Gram matrices (``T·S ≥ a·b``)."""
    plain = all(isinstance(f, Rows) for f in (c1.left, c1.right, c2.left, c2.right))
    a, b = c1.shape
    return plain and c1.left.rows * c2.left.rows >= a * b


def inner(c1, c2, *, method: str = "auto") -> jax.Array:
    """``⟨G_k, G'_k⟩ (n,)`` of two contributions to the same parameter.

    ``method`` (for two :class:`Outer`): ``"ghost"`` (Gram matrices, ``(n, T, S)``),
    ``"outer"`` (the ``(n, a, b)`` per-example gradients) or ``"auto"`` (the smaller)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if tuple(c1.shape) != tuple(c2.shape):
        raise ValueError(f"contributions of shapes {c1.shape} and {c2.shape} to one parameter")
    if isinstance(c1, Outer) and isinstance(c2, Outer):
        ghost = method == "ghost" or (method == "auto" and not _dense_is_smaller(c1, c2))
        if ghost:
            g_left = gram(c1.left, c2.left)  # (n, T, S)
            g_right = gram(c1.right, c2.right)
            return jnp.sum(_times(g_left, g_right), axis=(1, 2))
    return _sum_trailing(materialize(c1) * materialize(c2))


def sq_norm(c, *, method: str = "auto") -> jax.Array:
    """``‖G_k‖² (n,)`` of one contribution."""
    return inner(c, c, method=method)
