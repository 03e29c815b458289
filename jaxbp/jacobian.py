"""Explicit Jacobians of any jaxbp op, built from its hand-written backward by ``jax.vmap``.

Index letters::

    n  batch (the leading axes the op treats independently)
    c  classes / features of the output      (for dense: o)
    k  features of the argument              (for dense's x: i)

A backward rule computes one vector-Jacobian product ``gᵀJ`` per call. Feeding it every
basis vector ``e_c`` of the output, all at once under ``jax.vmap``, stacks the rows of ``J``:
that is the whole Jacobian, taken from the very rule that training runs. For a batch the
examples are independent, so one basis cotangent broadcast over ``n`` yields every example's
row at once: the result is per-example, ``(n, c, k)``, not the ``(n·c, n·k)`` block-diagonal
matrix of the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._op import bwd_options, jvp_rule, positional_names, rules_of

__all__ = ["jacobian", "linearized", "rules_of", "per_example_args"]


def per_example_args(op: Callable) -> tuple[str, ...]:
    """The names of ``op``'s per-example positional arguments, as the op declares them."""
    names = getattr(op, "per_example_args", None)
    if names is None:
        raise TypeError(
            f"op: {getattr(op, '__name__', op)!r} does not declare which arguments are "
            "per-example; build it with jaxbp.Op(..., per_example=(...)) or set "
            "op.per_example_args to a tuple of its positional parameter names"
        )
    return tuple(names)


def linearized(op: Any, args: Sequence, options: dict) -> tuple[Any, Callable]:
    """``(out, push)``: ``op.fwd`` run once on ``args``, and ``push(given)`` the output's
    tangent from ``op.jvp`` for the tangents ``given`` (``{position: tangent}``), zeros on
    the other floating arguments and ``None`` on the rest (integer ones, absent ones, array
    options). ``TypeError`` naming the op when it has no jvp rule."""
    jvp = jvp_rule(op)
    fwd = rules_of(op)[0]
    out, res = fwd(*args, **options)
    names = positional_names(fwd) or tuple(getattr(op, "arg_names", ()))
    static = bwd_options(jvp, options)

    def floating(a: Any) -> bool:
        return a is not None and jnp.issubdtype(jnp.result_type(a), jnp.inexact)

    def push(given: dict) -> Any:
        tangents = tuple(
            given[i] if i in given
            else jnp.zeros(jnp.shape(args[i]), jnp.result_type(args[i]))
            if i < len(args) and floating(args[i]) else None
            for i in range(max(len(names), len(args)))
        )  # fmt: skip
        return jvp(res, tangents, **static)

    return out, push


def jacobian(op: Callable, *args, argnum: int = 0, mode: str = "rev", **options) -> jax.Array:
    """Explicit per-example Jacobian of ``op`` w.r.t. ``args[argnum]``, from ``op_bwd`` (or
    ``op_jvp``).

    Args:
      op: a public jaxbp op (``jaxbp.softmax``, ``jaxbp.dense``, ``jaxbp.relu``,
        ``jaxbp.softmax_cross_entropy``, ...) or a :class:`jaxbp.Op`: its rules are
        ``op.fwd``/``op.bwd``.
      *args: its positional arguments, as for ``op``.
      argnum: which argument to differentiate.
      mode: ``"rev"`` (default): row by row, one ``op.bwd`` call per output feature ``c``;
        ``"fwd"``: column by column, one ``op.jvp`` call per feature ``k`` of the argument
        (``jax.jacfwd``-style; cheaper when the argument has fewer features than the output,
        ``TypeError`` naming the op when it has no jvp rule). Both give the same array.
      **options: the op's keyword options (``axis`` excepted: the feature axis is the last);
        array options such as ``where`` and ``class_weights`` are held fixed.

    Returns:
      With output ``(n..., c)`` (or ``(n...)`` for a per-example loss) and the argument:

      * per-example argument ``(n..., k)`` (``x``, ``z``, ``logits``, probability
        ``labels``, ``target``: the op's ``per_example_args``): ``J (n..., c, k)``
        (``(n..., k)`` for a loss), ``J[n, c, k] = ∂out[n, c]/∂arg[n, k]``;
      * shared parameter (a weight ``(i, o)`` or a bias ``(o,)``, whatever its shape):
        ``J (n..., c, i, o)``, each example's output against the shared parameter.

      Which is which comes from the op's declaration (``op.per_example_args``, see
      :mod:`jaxbp._op`), never from the shapes. An op whose examples have
      several axes declares how many (``op.example_ndim``): attention's examples are
      ``(h, t, e)``, so ``J (n..., h, t, e, h, s, e)`` for ``k``; embedding's integer ids
      ``(n...)`` have none, so ``J (n..., d, v, d)`` for the table.

    Example (the softmax Jacobian from the softmax backward)::

      >>> import jax.numpy as jnp, jaxbp
      >>> J = jaxbp.jacobian(jaxbp.softmax, jnp.zeros((5, 3)))
      >>> J.shape
      (5, 3, 3)
    """
    if mode not in ("rev", "fwd"):
        raise ValueError(f"mode: expected 'rev' or 'fwd', got {mode!r}")
    fwd, bwd = rules_of(op)
    if mode == "fwd":
        jvp_rule(op)
    names = tuple(getattr(op, "arg_names", None) or positional_names(op))
    per_example = per_example_args(op)
    if not 0 <= argnum < len(args):
        raise ValueError(f"argnum: expected an index into the {len(args)} arguments, got {argnum}")
    # The public op validates; use it to fail early with the op's own messages.
    op(*args, **options)
    arg = jnp.asarray(args[argnum])
    if not jnp.issubdtype(arg.dtype, jnp.floating):
        raise TypeError(f"argnum: argument {argnum} has dtype {arg.dtype}, which has no Jacobian")
    if mode == "fwd":
        return _by_columns(op, args, argnum, options, names, per_example)
    out, res = fwd(*args, **options)
    static = bwd_options(bwd, options)
    # Batching comes from the declaration, never from shapes: the first per-example argument
    # is (n..., k...) with op.example_ndim trailing axes k... (1 unless declared otherwise),
    # so the batch is its leading axes; a shared parameter (a weight (i, o), a bias (o,)) is
    # shared whatever its shape, even when it equals an input's.
    lead = jnp.asarray(args[names.index(per_example[0])])
    nb = lead.ndim - getattr(op, "example_ndim", 1)  # number of batch axes
    # out (n..., c...): c... is () for a loss (n,), (c,) for a layer, (h, t, e) for attention
    batch, feat = out.shape[:nb], out.shape[nb:]
    n_feat = math.prod(feat)
    batched = argnum < len(names) and names[argnum] in per_example

    def vjp_of(g):
        return bwd(res, g.astype(out.dtype), **static)[argnum]

    if batched:
        if arg.shape[: len(batch)] != batch:
            raise ValueError(
                f"argnum: per-example argument {names[argnum]!r} must lead with the batch "
                f"shape {batch}, got {arg.shape}"
            )
        basis = jnp.eye(n_feat, dtype=out.dtype).reshape((n_feat, *feat))
        rows = jax.vmap(lambda e: vjp_of(jnp.broadcast_to(e, out.shape)))(basis)  # (c, n, k)
        rows = jnp.moveaxis(rows, 0, len(batch))  # (n, c, k)
        return rows.reshape(*batch, *feat, *arg.shape[len(batch) :])
    basis = jnp.eye(out.size, dtype=out.dtype).reshape((out.size, *out.shape))
    rows = jax.vmap(vjp_of)(basis)  # (n·c, i, o)
    return rows.reshape(*out.shape, *arg.shape)


def _by_columns(op, args, argnum, options, names, per_example):
    """:func:`jacobian` with ``mode="fwd"``: ``op.jvp`` on every basis tangent ``e_k`` of the
    argument, under ``jax.vmap`` (broadcast over the batch for a per-example argument)."""
    arg = jnp.asarray(args[argnum])
    out, push = linearized(op, args, options)
    lead = jnp.asarray(args[names.index(per_example[0])])
    nb = lead.ndim - getattr(op, "example_ndim", 1)
    batch = out.shape[:nb]
    if argnum < len(names) and names[argnum] in per_example:
        if arg.shape[:nb] != batch:
            raise ValueError(
                f"argnum: per-example argument {names[argnum]!r} must lead with the batch "
                f"shape {batch}, got {arg.shape}"
            )
        feat = arg.shape[nb:]
        n_feat = math.prod(feat)
        basis = jnp.eye(n_feat, dtype=arg.dtype).reshape((n_feat, *feat))
        cols = jax.vmap(lambda e: push({argnum: jnp.broadcast_to(e, arg.shape)}))(basis)
        cols = cols.reshape(n_feat, *out.shape)  # (k, n, c)
        cols = jnp.moveaxis(cols, 0, -1)  # (n, c, k)
        return cols.reshape(*out.shape, *feat)
    basis = jnp.eye(arg.size, dtype=arg.dtype).reshape((arg.size, *arg.shape))
    cols = jax.vmap(lambda e: push({argnum: e}))(basis)  # (i·o, n, c)
    return jnp.moveaxis(cols, 0, -1).reshape(*out.shape, *arg.shape)
