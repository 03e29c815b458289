"""The one contract, as code: build a ``jax.custom_vjp`` from a jitted ``fwd``/``bwd`` pair.

``fwd(*args, **options) -> (out, res)`` and ``bwd(res, g, **options) -> cotangents`` are the
hand-written rules. Options are static and hashable (``axis``, ``label_smoothing``, ...); they
travel to the rule as one ``nondiff_argnums`` tuple of ``(name, value)`` pairs. Arrays
(labels, masks, class weights) are always ordinary positional arguments, never
``nondiff_argnums`` (jax#20889).

Every public op ``op(*args, **options)`` also declares (:func:`declare_op`) which of its
positional arguments are per-example and which are shared parameters; ``op_fwd`` takes exactly
``op``'s positional arguments in ``op``'s order (array options such as ``where`` may follow),
and ``op_bwd`` returns one cotangent per positional argument of ``op_fwd``, in that order
(``None`` for integer labels and masks).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax

from . import _vma


def custom_vjp_op(fwd: Callable, bwd: Callable) -> Callable:
    """Return ``op(options, *args)``: a custom_vjp whose backward is ``bwd``.

    ``options`` is a tuple of ``(name, value)`` pairs passed to ``fwd`` and ``bwd`` as
    keywords. Under ``jax.grad``/``jax.vjp`` JAX calls ``fwd`` and then ``bwd``; without
    differentiation it calls ``fwd`` and keeps only the output (XLA drops the unused
    residuals under ``jit``).

    Inside a user's ``shard_map`` (``check_vma=True``), each cotangent gets its argument's
    varying-axes type: ``psum`` over the axes it varies along beyond its argument's (what
    JAX's autodiff does for the implicit ``pvary``), see :mod:`jaxbp._vma`. ``bwd`` itself
    stays the plain rule: called directly, it returns the per-device cotangents.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def op(options, *args):
        return fwd(*args, **dict(options))[0]

    def op_fwd(options, *args):
        out, res = fwd(*args, **dict(options))
        # Inside a shard_map: each argument's varying axes, static, for the cotangents.
        return out, (res, _vma.Static(tuple(_vma.of(a) for a in args)))

    def op_bwd(options, res, g):
        res, vmas = res
        return _vma.fit_cotangents(tuple(bwd(res, g, **dict(options))), vmas.value)

    op.defvjp(op_fwd, op_bwd)
    return op


def positional_names(fn: Callable) -> tuple[str, ...]:
    """The names of ``fn``'s positional parameters, in order."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds)


def declare_op(
    *,
    per_example: tuple[str, ...],
    fwd: Callable | None = None,
    bwd: Callable | None = None,
    example_ndim: int = 1,
) -> Callable:
    """Decorator: declare a public op's signature for :func:`jaxbp.jacobian` (and the tests).

    ``per_example`` names the positional parameters that carry the batch, one row per
    example (``x``, ``z``, ``logits``, ``labels``, ``target``); every other positional
    parameter is a parameter shared by all examples (a weight ``(i, o)``, a bias ``(o,)``),
    whatever its shape happens to be. The first per-example parameter has shape
    ``(n..., k...)`` with ``example_ndim`` trailing axes ``k...`` per example (default 1:
    ``(n..., k)``; 0 for integer ids ``(n...)``; 3 for attention's ``(n..., h, t, e)``): its
    leading axes are the batch. ``fwd``/``bwd`` name the rules when they are not
    ``{op}_fwd``/``{op}_bwd`` in the op's module. Sets ``op.per_example_args``,
    ``op.example_ndim`` and, when given, ``op.rules``; a user-built op may set these
    attributes directly::

        @declare_op(per_example=("x",), fwd=my_fwd, bwd=my_bwd)
        def my_layer(x, w): ...
    """
    per_example = tuple(per_example)
    if (fwd is None) != (bwd is None):
        raise TypeError("declare_op: give both fwd and bwd, or neither")
    if not isinstance(example_ndim, int) or isinstance(example_ndim, bool) or example_ndim < 0:
        raise ValueError(f"example_ndim: expected an int ≥ 0, got {example_ndim!r}")

    def decorate(op: Callable) -> Callable:
        names = positional_names(op)
        unknown = [n for n in per_example if n not in names]
        if unknown or not per_example:
            raise ValueError(
                f"per_example: expected a non-empty tuple of {op.__name__}'s positional "
                f"parameters {names}, got {per_example}"
            )
        op.per_example_args = per_example
        op.example_ndim = example_ndim
        if fwd is not None:
            op.rules = (fwd, bwd)
        return op

    return decorate
