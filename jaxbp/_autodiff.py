"""How JAX runs an op's rules: a ``jax.custom_vjp`` of ``fwd``/``bwd`` (the op: ``jax.grad``
runs ``bwd``) and a ``jax.custom_jvp`` of ``fwd``/``jvp`` (its forward-mode twin: ``jax.jvp``
runs ``jvp``). :mod:`jaxbp._op` builds both for every op, from the rules the op holds.

Options: the static ones travel as one sorted tuple of ``(name, value)`` pairs, a
``nondiff_argnums`` argument (hashable); the traced ones (``op.traced_options``) as a dict of
values, an ordinary argument whose cotangent is NaN and whose tangent makes the output's
tangent NaN: the rules do not differentiate them, and say so rather than give 0.

On Explicit mesh axes every rule runs under ``auto_axes`` (:mod:`jaxbp._sharding`); inside a
user's ``shard_map`` each cotangent is fitted to its primal's varying axes and the output's
tangent to the output's (:mod:`jaxbp._vma`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _contract, _sharding, _vma

__all__ = ["by_jvp", "by_vjp"]


def by_vjp(
    get: Callable,
    traced: tuple[str, ...],
    primal: Callable | None = None,
    described: tuple[str, tuple[str, ...]] = ("op", ()),
) -> Callable:
    """``call(*args, **options)``: a ``custom_vjp`` of ``fwd`` and ``bwd``; ``get()`` gives
    the rules ``(fwd, bwd)`` at trace time. ``described``: the op's name and argument names,
    for the errors of a rule that breaks the contract (:mod:`jaxbp._contract`)."""
    name, arg_names = described

    def fwd_rule(*args, **options):
        return _contract.check_fwd_output(name, get()[0](*args, **options))

    def bwd_rule(primal_avals, res, g, **options):
        cts = get()[1](res, g, **options)
        return _contract.check_cotangents(name, cts, primal_avals, arg_names)

    # On Explicit mesh axes every rule runs under auto_axes (jaxbp._sharding): the results
    # typed like the arguments, the cotangents exactly like their primals.
    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def core(static, dynamic, *args):
        if primal is not None:
            return _sharding.run(lambda d, *a: primal(*a, **dict(static), **d), (dynamic, *args))
        return _sharding.run(lambda d, *a: fwd_rule(*a, **dict(static), **d)[0], (dynamic, *args))

    def core_fwd(static, dynamic, *args):
        out, res = _sharding.run(lambda d, *a: fwd_rule(*a, **dict(static), **d), (dynamic, *args))
        # Each argument's varying axes (inside a shard_map), sharding (on Explicit axes), shape
        # and dtype, static, for the cotangents.
        types = (tuple(_vma.of(a) for a in args), _sharding.specs_of(args), _contract.avals(args))
        return out, (res, dynamic, _vma.Static(types))

    def core_bwd(static, saved, g):
        res, dynamic, types = saved
        vmas, specs, primal_avals = types.value

        def cotangent_specs(shapes):
            return tuple(None if c is None else s for c, s in zip(shapes, specs, strict=True))

        cts = _sharding.run(
            lambda r, g, d: bwd_rule(primal_avals, r, g, **dict(static), **d),
            (res, g, dynamic),
            cotangent_specs,
        )
        # The rules do not differentiate their traced options: a gradient taken through one
        # is NaN (never a silent 0); a gradient not asked for through it is dropped unseen.
        nan = jax.tree.map(lambda v: jnp.full(jnp.shape(v), jnp.nan, jnp.result_type(v)), dynamic)
        return (nan, *_vma.fit_cotangents(cts, vmas))

    core.defvjp(core_fwd, core_bwd)
    return functools.partial(_split_options, core, traced)


def _split_options(core: Callable, traced: tuple[str, ...], *args, **options):
    """``core(static, dynamic, *args)``: the static options as one sorted tuple (hashable),
    the traced ones in a dict of values."""
    static = tuple(sorted((k, v) for k, v in options.items() if k not in traced))
    dynamic = {k: options[k] for k in traced if k in options}
    return core(static, dynamic, *args)


def _zero(t: Any) -> bool:
    """A tangent that is zero by construction: symbolic, ``float0`` (integer), ``None``."""
    return t is None or isinstance(t, jax.custom_derivatives.SymbolicZero) or (
        getattr(t, "dtype", None) == jax.dtypes.float0
    )  # fmt: skip


def _floating(a: Any) -> bool:
    return a is not None and jnp.issubdtype(getattr(a, "dtype", None) or jnp.result_type(a),
                                            jnp.inexact)  # fmt: skip


def by_jvp(
    get: Callable,
    traced: tuple[str, ...],
    primal: Callable | None = None,
    described: tuple[str, tuple[str, ...]] = ("op", ()),
    *,
    zeros_as_none: bool = False,
) -> Callable:
    """``call(*args, **options)``: a ``custom_jvp`` whose rule is ``fwd`` then ``jvp``;
    ``get()`` gives the rules ``(fwd, jvp)`` at trace time (it raises for an op without a
    jvp rule). The primal alone is :func:`by_vjp`'s.

    The rule gets one tangent per argument: ``None`` for an integer or bool one; for a
    floating argument whose tangent is zero by construction (a symbolic zero: a constant, a
    weight not in the direction) ``None`` too when ``zeros_as_none`` (the rule leaves its
    term out: XLA does not remove a product with a zero array), else zeros of its shape.
    When no argument has a tangent the rule is not run: the output's tangent is zero."""
    name, _ = described

    def fwd_rule(*args, **options):
        return _contract.check_fwd_output(name, get()[0](*args, **options))

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def core(static, dynamic, *args):
        if primal is not None:
            return _sharding.run(lambda d, *a: primal(*a, **dict(static), **d), (dynamic, *args))
        return _sharding.run(lambda d, *a: fwd_rule(*a, **dict(static), **d)[0], (dynamic, *args))

    def core_jvp(static, primals, tangents):
        dynamic, *args = primals
        t_dynamic, *t_args = tangents
        jvp = get()[1]
        out, res = _sharding.run(lambda d, *a: fwd_rule(*a, **dict(static), **d), (dynamic, *args))
        given = [None if _zero(t) else t for t in t_args]
        if all(t is None for t in given):
            t_out = _vma.pvary(jnp.zeros_like(out), _vma.of(out))
            return out, _nan_through_options(t_out, t_dynamic)

        def rule(res, given, dynamic, args):
            # one tangent per argument: the given one; zeros of a floating argument's shape
            # and dtype (and varying axes) where none was given; None for integer ones
            ts = tuple(
                t if t is not None
                else None if zeros_as_none or not _floating(a)
                else _vma.pvary(jnp.zeros(jnp.shape(a), a.dtype), _vma.of(a))
                for t, a in zip(given, args, strict=True)
            )  # fmt: skip
            return jvp(res, ts, **dict(static), **dynamic)

        spec = _sharding.spec_of(out)
        t_out = _sharding.run(rule, (res, given, dynamic, args), lambda _: spec)
        t_out = _contract.check_tangent(name, t_out, out)
        return out, _vma.pvary(_nan_through_options(t_out, t_dynamic), _vma.of(out))

    core.defjvp(core_jvp, symbolic_zeros=True)
    return functools.partial(_split_options, core, traced)


def _nan_through_options(t_out: jax.Array, t_dynamic: dict) -> jax.Array:
    """The rules do not differentiate their traced options: a tangent through one makes the
    output's tangent NaN (never a silent 0), as a gradient through it is NaN."""
    for t in t_dynamic.values():
        if not _zero(t):
            t_out = t_out + (jnp.nan * t).astype(t_out.dtype)
    return t_out
