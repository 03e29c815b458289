"""The one contract, as code: build a ``jax.custom_vjp`` from a jitted ``fwd``/``bwd`` pair.

``fwd(*args, **options) -> (out, res)`` and ``bwd(res, g, **options) -> cotangents`` are the
hand-written rules. Options are static and hashable (``axis``, ``label_smoothing``, ...); they
travel to the rule as one ``nondiff_argnums`` tuple of ``(name, value)`` pairs. Arrays
(labels, masks, class weights) are always ordinary positional arguments, never
``nondiff_argnums`` (jax#20889).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax


def custom_vjp_op(fwd: Callable, bwd: Callable) -> Callable:
    """Return ``op(options, *args)``: a custom_vjp whose backward is ``bwd``.

    ``options`` is a tuple of ``(name, value)`` pairs passed to ``fwd`` and ``bwd`` as
    keywords. Under ``jax.grad``/``jax.vjp`` JAX calls ``fwd`` and then ``bwd``; without
    differentiation it calls ``fwd`` and keeps only the output (XLA drops the unused
    residuals under ``jit``).
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def op(options, *args):
        return fwd(*args, **dict(options))[0]

    def op_fwd(options, *args):
        return fwd(*args, **dict(options))

    def op_bwd(options, res, g):
        return tuple(bwd(res, g, **dict(options)))

    op.defvjp(op_fwd, op_bwd)
    return op
