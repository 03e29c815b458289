"""The contract, checked: a rule that breaks it gets an error naming the op, the rule, what
was expected and what came, as early as it can be known.

========================  ==================================================================
when                      what
========================  ==================================================================
construction (``Op``)     :func:`check_signatures`: ``fwd`` and ``reference`` take the op's
                          positional arguments and every option, ``bwd`` takes ``(res, g)``
                          and ``jvp`` ``(res, tangents)`` and every option, the traced
                          options are options with numbers for defaults
each call (``Op``)        :func:`check_options`: a static option holds a concrete, hashable
                          value (a traced one would be compiled in, and cannot be)
first trace (every op)    :func:`check_fwd_output`: ``fwd`` returns ``(out, res)``;
                          :func:`check_cotangents`: ``bwd`` returns a tuple of one cotangent
                          per positional argument, each ``None`` or of its argument's shape
                          and dtype (``None`` or ``float0`` for integer arguments);
                          :func:`check_tangent`: ``jvp`` returns one array of the output's
                          shape and dtype
========================  ==================================================================

The checks read only shapes, dtypes and signatures: they cost nothing once compiled.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks

__all__ = [
    "avals", "check_cotangents", "check_count", "check_curvature", "check_fwd_output",
    "check_options", "check_signatures", "check_tangent", "check_tangent_count",
]  # fmt: skip


# ------------------------------------------------------------------ at construction


def check_curvature(curvature: Any, names: Sequence[str]) -> dict[str, Callable]:
    """``{rule name: rule}`` from a mapping of some of ``names`` (a loss's curvature rules,
    :data:`jaxbp._op.CURVATURE_RULES`) to callables; ``{}`` for ``None``."""
    if curvature is None:
        return {}
    if not isinstance(curvature, Mapping):
        raise TypeError(
            f"curvature: expected a mapping of some of {tuple(names)} to rules, got "
            f"{type(curvature).__name__}"
        )
    unknown = sorted(set(curvature) - set(names))
    if unknown:
        raise ValueError(f"curvature: unknown rule(s) {unknown}; expected some of {tuple(names)}")
    for name, rule in curvature.items():
        if not callable(rule):
            raise TypeError(f"curvature[{name!r}]: expected a callable rule, got {rule!r}")
    return dict(curvature)


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without one: nothing to check
        return None


def _takes(sig: inspect.Signature, positional: int, options: Sequence[str]) -> str | None:
    """Why ``sig`` cannot be called with ``positional`` arguments and ``options`` as
    keywords, or ``None`` when it can."""
    try:
        sig.bind(*([None] * positional), **dict.fromkeys(options))
    except TypeError as e:
        return str(e)
    return None


def _wanted(names: Sequence[str], options: Sequence[str]) -> str:
    opts = ", *, " + ", ".join(options) if options else ""
    return f"({', '.join(names)}{opts})"


def check_signatures(
    name: str,
    fwd: Callable,
    bwd: Callable,
    reference: Callable,
    arg_names: Sequence[str],
    options: Mapping[str, Any],
    traced: Sequence[str],
    jvp: Callable | None = None,
) -> None:
    """At construction: each rule can be called the way the op will call it (``jvp``, the
    forward-mode rule, only when given).

    ``TypeError`` naming the op, the rule, the call it must accept and its signature;
    ``ValueError`` for ``traced`` options that are not options. Also refused: ``fwd``
    taking the reference's parameter names in another order (a swapped argument)."""
    unknown = [k for k in traced if k not in options]
    if unknown:
        raise ValueError(
            f"{name}: traced_options {unknown} are not options; expected names among "
            f"{list(options)} (declare each with its default in options=)"
        )
    for k in traced:
        value = options[k]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(
                f"{name}: traced option {k!r} must have a number for default (the rules take it "
                f"as a traced scalar), got {value!r}"
            )
    opts = list(options)
    calls = (
        ("fwd", fwd, list(arg_names), len(arg_names)),
        ("bwd", bwd, ["res", "g"], 2),
        ("reference", reference, list(arg_names), len(arg_names)),
    )
    if jvp is not None:
        calls += (("jvp", jvp, ["res", "tangents"], 2),)
    for rule, fn, names, positional in calls:
        sig = _signature(fn)
        why = None if sig is None else _takes(sig, positional, opts)
        if why is not None:
            what = {"bwd": "(res, g)", "jvp": "(res, tangents)"}.get(
                rule, f"the op's arguments {tuple(arg_names)}"
            )
            raise TypeError(
                f"{name}: the {rule} rule must take {what} and the options {opts}, as "
                f"{rule}{_wanted(names, opts)}; got {rule}{sig} ({why})"
            )
    sig = _signature(fwd)
    if sig is not None:
        got = [
            p.name
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ][: len(arg_names)]
        if sorted(got) == sorted(arg_names) and got != list(arg_names):
            raise TypeError(
                f"{name}: the fwd rule takes the reference's arguments in another order: "
                f"expected fwd({', '.join(arg_names)}, ...) as "
                f"reference{inspect.signature(reference)}, got fwd{sig}"
            )


# ------------------------------------------------------------------ at each call


def check_options(name: str, options: Mapping[str, Any], traced: Sequence[str]) -> None:
    """At a call: every static option concrete and hashable; every traced one numeric."""
    for k, value in options.items():
        if k in traced:
            if not _checks.is_concrete(value):
                continue
            arr = np.asarray(value)
            if isinstance(value, bool) or arr.dtype.kind not in "iuf":
                raise TypeError(f"{name}: traced option {k!r} must be a number, got {value!r}")
            continue
        if not _checks.is_concrete(value):
            raise TypeError(
                f"{name}: option {k!r} is static (its value is compiled in), got a traced value "
                f"{value!r}; pass a Python value, or build the op with "
                f"traced_options=({k!r},) so that its rules take it traced"
            )
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                f"{name}: option {k!r} is static and must be hashable (a Python value), got "
                f"{type(value).__name__}; arrays are positional arguments"
            ) from None


# ------------------------------------------------------------------ at the first trace


def check_fwd_output(name: str, result: Any) -> tuple[Any, Any]:
    """``fwd``'s result as ``(out, res)``; ``TypeError`` otherwise."""
    if not isinstance(result, tuple | list) or len(result) != 2:
        got = f"a value of type {type(result).__name__}" + (
            f" of length {len(result)}" if isinstance(result, tuple | list) else ""
        )
        raise TypeError(f"{name}: the fwd rule must return a pair (out, res), got {got}")
    return result[0], result[1]


def _dtype(x: Any) -> Any:
    dtype = getattr(x, "dtype", None)
    return jnp.result_type(x) if dtype is None else dtype  # PRNG key dtypes included


def _leaves(tree: Any) -> tuple[Any, Any]:
    return jax.tree.flatten(tree, is_leaf=lambda v: v is None)


def avals(args: Sequence[Any]) -> tuple:
    """Static (hashable) shapes and dtypes of ``args``, each argument a pytree:
    ``((treedef, ((shape, dtype) | None, ...)), ...)``."""
    out = []
    for a in args:
        leaves, tree = _leaves(a)
        out.append(
            (tree, tuple(None if x is None else (tuple(np.shape(x)), _dtype(x)) for x in leaves))
        )
    return tuple(out)


def _arg(arg_names: Sequence[str], k: int) -> str:
    return repr(arg_names[k]) if k < len(arg_names) else f"{k}"


def check_count(name: str, cts: Any, names: Sequence[str]) -> tuple:
    """``cts`` as a tuple of one cotangent per argument in ``names``: ``TypeError`` for
    anything but a tuple or list, ``ValueError`` for another count."""
    if not isinstance(cts, tuple | list):
        raise TypeError(
            f"{name}: the bwd rule must return a tuple of {len(names)} cotangent(s), one per "
            f"positional argument {tuple(names)}, got a value of type {type(cts).__name__}"
        )
    if len(cts) != len(names):
        raise ValueError(
            f"{name}: the bwd rule must return {len(names)} cotangent(s), one per positional "
            f"argument {tuple(names)} (None for an integer one), got {len(cts)}"
        )
    return tuple(cts)


def check_cotangents(name: str, cts: Any, primal: tuple, arg_names: Sequence[str] = ()) -> tuple:
    """``bwd``'s cotangents against the primal arguments' :func:`avals`, as a tuple.

    ``TypeError`` for a result that is not a tuple (or list) and for a wrong dtype;
    ``ValueError`` for a wrong count or shape. Each message names the op, the ``bwd`` rule,
    the argument, what was expected and what came."""
    names = tuple(arg_names) + tuple(f"argument {k}" for k in range(len(arg_names), len(primal)))
    check_count(name, cts, names)
    for k, (ct, (tree, want)) in enumerate(zip(cts, primal, strict=True)):
        if ct is None:
            continue
        leaves, ct_tree = _leaves(ct)
        if ct_tree != tree:
            raise ValueError(
                f"{name}: the bwd rule's cotangent for {_arg(names, k)} must have the "
                f"structure of the argument {tree}, got {ct_tree}"
            )
        for leaf, w in zip(leaves, want, strict=True):
            _check_leaf(name, _arg(names, k), leaf, w)
    return tuple(cts)


def _check_leaf(name: str, arg: str, ct: Any, want: Any) -> None:
    if ct is None:
        return
    if want is None:
        raise ValueError(f"{name}: the bwd rule's cotangent for {arg} (None) must be None")
    shape, dtype = want
    got_shape, got_dtype = tuple(np.shape(ct)), _dtype(ct)
    exact = jnp.issubdtype(dtype, jnp.inexact)
    if not exact:  # integer or bool argument: no cotangent (float0 zeros at most)
        if got_dtype != jax.dtypes.float0:
            raise TypeError(
                f"{name}: the bwd rule's cotangent for {arg} ({dtype} {shape}, not "
                f"differentiable) must be None, got {got_dtype} {got_shape}"
            )
    elif got_dtype != dtype:
        raise TypeError(
            f"{name}: the bwd rule's cotangent for {arg} must have the argument's dtype "
            f"{dtype}, got {got_dtype} (shape {got_shape})"
        )
    if got_shape != shape:
        raise ValueError(
            f"{name}: the bwd rule's cotangent for {arg} must have the argument's shape "
            f"{shape}, got {got_shape}"
        )


def check_tangent_count(name: str, tangents: Any, names: Sequence[str]) -> tuple:
    """``tangents`` as a tuple of one tangent per argument in ``names`` (what a ``jvp`` rule
    is given): ``TypeError`` for anything but a tuple or list, ``ValueError`` for another
    count."""
    if not isinstance(tangents, tuple | list) or len(tangents) != len(names):
        got = (
            f"{len(tangents)}" if isinstance(tangents, tuple | list)
            else f"a value of type {type(tangents).__name__}"
        )  # fmt: skip
        error = ValueError if isinstance(tangents, tuple | list) else TypeError
        raise error(
            f"{name}: the jvp rule takes a tuple of {len(names)} tangent(s), one per positional "
            f"argument {tuple(names)} (None for an integer one), got {got}"
        )
    return tuple(tangents)


def check_tangent(name: str, tangent: Any, out: Any) -> Any:
    """``jvp``'s result against the output ``out``: one array of ``out``'s shape and dtype.

    ``TypeError`` for anything but an array and for a wrong dtype, ``ValueError`` for a wrong
    shape; each message names the op, the ``jvp`` rule, what was expected and what came."""
    shape, dtype = tuple(np.shape(out)), _dtype(out)
    if tangent is None or isinstance(tangent, tuple | list | dict):
        got = "None" if tangent is None else f"a {type(tangent).__name__}"
        raise TypeError(
            f"{name}: the jvp rule must return the output's tangent, one array of shape {shape} "
            f"and dtype {dtype}, got {got}"
        )
    got_shape, got_dtype = tuple(np.shape(tangent)), _dtype(tangent)
    if got_dtype != dtype:
        raise TypeError(
            f"{name}: the jvp rule's tangent must have the output's dtype {dtype}, got "
            f"{got_dtype} (shape {got_shape})"
        )
    if got_shape != shape:
        raise ValueError(
            f"{name}: the jvp rule's tangent must have the output's shape {shape}, got {got_shape}"
        )
    return tangent
