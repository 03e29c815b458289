"""Input validation shared by every op: clear errors at trace time.

Shapes and dtypes are static under ``jit``, so every check here runs while tracing and
raises a ``TypeError`` (wrong dtype) or ``ValueError`` (wrong shape) whose message names
the argument, what was expected and what came.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

# Checked mode is a switch of the trace context. A ``checkify.debug_check`` in a program puts
# an effect in its jaxpr, and ``jax.jit`` dispatches a program with effects through Python
# (no C++ fast path): ~150 µs more a call on a 2-core CPU; a user-jitted MLP step at n 128,
# w 256 took 1.44× the plain one's time. So the checks are traced only under
# :func:`checked`, which turns this switch on; it is part of ``jit``'s trace key, so a
# program traced plain is traced again when ``checked`` calls it (warm caches included) and
# the plain program stays free of checks. A JAX without the switch's API gets the checks
# always (correct, only slower to dispatch).
try:  # pragma: no cover - the branch taken depends on the installed JAX
    from jax._src import config as _jax_config

    _CHECKED_MODE = _jax_config.bool_state(
        "jaxbp_checked_mode", False,
        "jaxbp: trace jaxbp's value checks (set by jaxbp.checked; not a user setting)",
        include_in_jit_key=True, include_in_trace_context=True,
    )  # fmt: skip
except Exception:  # noqa: BLE001 - any failure of a private API means: no switch
    _CHECKED_MODE = None


def checks_traced() -> bool:
    """Whether value checks go into the program being traced: under :func:`checked` (or
    always, where this JAX has no switch for it)."""
    return _CHECKED_MODE is None or bool(_CHECKED_MODE.value)


def debug_check(pred: Any, msg: str, **fmt: Any) -> None:
    """``checkify.debug_check(pred, msg, **fmt)`` when :func:`checks_traced`."""
    if checks_traced():
        checkify.debug_check(pred, msg, **fmt)


def as_array(x: Any) -> Any:
    """``x`` as an array: a ``jax.Array`` (or a shape-only ``jax.ShapeDtypeStruct``, validated
    as it is) unchanged, anything else through ``jnp.asarray``. An entry's checks run on every
    eager call: ``jnp.asarray`` of an array that is already one costs ~25 µs there."""
    return x if isinstance(x, jax.Array | jax.ShapeDtypeStruct) else jnp.asarray(x)


def floating(name: str, x: Any) -> jax.Array:
    """Return ``x`` as an array, raising ``TypeError`` unless its dtype is floating."""
    x = as_array(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype} (shape {x.shape})")
    return x


def integer(name: str, x: Any) -> jax.Array:
    """Return ``x`` as an array, raising ``TypeError`` unless its dtype is integer."""
    x = as_array(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {x.dtype} (shape {x.shape})")
    return x


def count(name: str, value: Any) -> int:
    """``value`` as a Python ``int ≥ 0`` (a number of steps): ``TypeError`` for anything that
    is not an integer (a float, a bool, a traced value), ``ValueError`` for a negative one."""
    if isinstance(value, bool) or not is_concrete(value):
        raise TypeError(f"{name}: expected an integer ≥ 0, got {value!r}")
    try:
        k = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer ≥ 0, got {value!r}") from None
    if k < 0:
        raise ValueError(f"{name}: expected an integer ≥ 0, got {k}")
    return k


def token_ids(name: str, ids: Any, v: int) -> np.ndarray:
    """Concrete ids ``(t,)`` for an eager loop (sampling): at least one, of an integer dtype
    (``TypeError`` for floats: never cast), each in ``[0, v)`` as :func:`jaxbp.embedding`
    checks its ids (``ValueError`` naming ``name``, the bad id and its index). A scalar is
    one id; more than one axis is a ``ValueError``."""
    if not is_concrete(ids):
        raise TypeError(f"{name}: expected concrete ids (a list or an array), got {ids!r}")
    arr = np.asarray(ids)
    if arr.ndim > 1:
        raise ValueError(f"{name}: expected ids of shape (t,), got shape {arr.shape}")
    if arr.size < 1:
        raise ValueError(f"{name}: expected at least one id, got shape {arr.shape}")
    arr = np.asarray(integer(name, arr)).reshape(-1)
    check_label_range(arr, v, name=name)
    return arr.astype(np.int32)


def min_rank(name: str, x: jax.Array, rank: int, letters: str) -> None:
    if x.ndim < rank:
        raise ValueError(f"{name}: expected shape {letters} (at least {rank}-d), got {x.shape}")


def same_shape(name: str, x: jax.Array, other_name: str, other: jax.Array) -> None:
    """No broadcasting: ``x`` must have exactly ``other``'s shape."""
    if x.shape != other.shape:
        raise ValueError(
            f"{name}: expected the shape of {other_name} {other.shape} (no broadcasting), "
            f"got {x.shape}"
        )


def _traced_option(name: str, value: Any, kind: str) -> TypeError:
    return TypeError(
        f"{name}: must be a Python {kind}, got a traced value {value!r}: it is a static "
        "option, fixed when the function is traced; pass a Python constant, or mark the "
        "argument static (jax.jit(..., static_argnames=...)) if it comes from outside"
    )


def static_number(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    """``value`` as a Python ``float``: a static option (``negative_slope``, ``z_loss``...).

    Raises ``TypeError`` naming ``name`` for a traced value (inside ``jit``/``vmap``/``grad``)
    and for anything that is not a real number (a bool, a string, an array of several
    values). Range checks are the caller's.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)  # a Python number: nothing to read back
    if not is_concrete(value):
        raise _traced_option(name, value, "number")
    arr = np.asarray(value)  # a concrete array option: its value is the point
    if (
        isinstance(value, bool)
        or arr.shape != ()
        or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer))
    ):
        raise TypeError(f"{name}: must be a Python number, got {value!r}")
    return float(arr)


def traced_number(
    name: str, value: Any, valid: Callable[[Any], Any], expected: str, *, check: bool = False
) -> Any:
    """A float option that only scales values (``label_smoothing``, ``z_loss``, ``eps``,
    ``negative_slope``): a Python number, or a traced scalar (a new value compiles nothing).

    A concrete value is returned as a Python ``float`` after ``valid(value)`` (else a
    ``ValueError`` naming ``name`` and saying ``expected``); a traced one is returned as it
    is, a scalar, and with ``check`` its range becomes a ``checkify.debug_check`` under
    :func:`checked` (reported there, as out-of-range labels are). Anything else is a ``TypeError``.
    """
    if is_concrete(value):
        number = static_number(name, value)
        if not valid(number):
            raise ValueError(f"{name}: expected {expected}, got {value!r}")
        return number
    x = jnp.asarray(value)
    if x.shape != () or not (
        jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
    ):
        raise TypeError(f"{name}: expected a number (a scalar), got {x.dtype} of shape {x.shape}")
    if jnp.issubdtype(x.dtype, jnp.integer):
        x = x.astype(jnp.result_type(float))  # the option is a float (and may get a cotangent)
    if check:
        debug_check(valid(x), f"{name}: expected {expected}, got {{v}}", v=x)
    return x


def concrete_options(check: Callable[..., Any]) -> Callable:
    """Decorator of a jitted rule whose float options are traced: ``check(**options)`` runs
    on the call's keyword options first, so concrete values out of range raise (the
    ``ValueError`` naming the option) before the jit, where they would be tracers."""

    def decorate(rule: Callable) -> Callable:
        @functools.wraps(rule)
        def checked_rule(*args, **options):
            check(**options)
            return rule(*args, **options)

        return checked_rule

    return decorate


def is_static_zero(value: Any) -> bool:
    """True for a Python 0 (an option whose term can be left out at trace time); a traced
    option may hold any value, so its term stays."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def tangent_sum(*terms: Any) -> Any:
    """The sum of the terms that are not ``None`` (a forward-mode rule's terms, one per
    argument whose tangent is not zero); ``None`` when every term is."""
    given = [t for t in terms if t is not None]
    if not given:
        return None
    out = given[0]
    for t in given[1:]:
        out = out + t
    return out


def scaled(weight: Any, a: jax.Array) -> jax.Array:
    """``weight·a`` with ``0·∞ = 0``: a traced weight of 0 switches its term off exactly."""
    if is_static_zero(weight):
        return jnp.zeros_like(a)
    return jnp.where(weight == 0, jnp.zeros_like(a), weight * a)


def as_scalar(value: Any, dtype: Any) -> Any:
    """A traced or array option in ``dtype`` (strict promotion); Python numbers as they are."""
    return value if isinstance(value, int | float) else jnp.asarray(value).astype(dtype)


def static_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """``value`` as a Python ``int``: a static option (``axis``, ``ignore_index``...).

    Raises ``TypeError`` naming ``name`` for a traced value; other checks are the caller's.
    """
    if value is None and allow_none:
        return None
    if not is_concrete(value):
        raise _traced_option(name, value, "int")
    return value


# The class of every traced value (jit, vmap, grad, shard_map): public as jax.core.Tracer in
# this JAX and newer ones; feature-detected, in case a later JAX moves it.
_TRACER = getattr(getattr(jax, "core", None), "Tracer", None)


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds values now (no tracer inside jit/vmap/grad among its leaves).

    A type check, never a device-to-host copy: an eager call on a device array costs
    nothing here (the label-range check then reads the labels once, on purpose)."""
    leaves = jax.tree.leaves(x)
    if _TRACER is not None:
        return not any(isinstance(a, _TRACER) for a in leaves)
    try:  # no public Tracer class: ask JAX to convert (a host copy, the old way)
        for a in leaves:
            np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False
    return True


def accum_dtype(dtype: Any) -> Any:
    """float32 for half-precision inputs, the input dtype otherwise."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def check_label_range(labels, c, ignore_index=None, *, where=None, name="labels") -> None:
    """Integer ids must lie in ``[0, c)`` (or equal ``ignore_index``); masked rows are exempt.

    Concrete ids (eager calls) raise ``ValueError`` naming ``name``, the first bad value and
    its index. Traced ids (inside ``jit``, ``vmap``, ``grad``, ``shard_map``) cannot raise:
    the op poisons the affected rows with NaN, and under :func:`checked` this adds a
    ``jax.experimental.checkify.debug_check`` to the traced program, which ``checked``
    reports. A plain trace gets nothing (no effect, so ``jit`` keeps its fast dispatch);
    checked mode is part of ``jit``'s trace key, so whichever way ``jit`` and
    :func:`checked` are composed, and whatever ``jit``'s cache holds, the checked call runs a
    program with the check. Every op that takes integer ids checks them here. Float labels
    pass through.
    """
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        return
    allowed = f"[0, {c})" + ("" if ignore_index is None else f" or {ignore_index}")
    if is_concrete(labels) and (where is None or is_concrete(where)):
        lab = np.asarray(labels)
        bad = (lab < 0) | (lab >= c)
        if ignore_index is not None:
            bad &= lab != ignore_index
        if where is not None:
            bad &= np.asarray(where, bool)
        if bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name}: expected class ids in {allowed}, got {int(lab[pos])} at index {pos} "
                f"({int(bad.sum())} out of range)"
            )
        return
    if not checks_traced():
        return  # a plain trace: the op's rows are NaN; nothing else enters the program
    bad = (labels < 0) | (labels >= c)
    if ignore_index is not None:
        bad = bad & (labels != ignore_index)
    if where is not None:
        bad = bad & jnp.asarray(where, bool)
    # Elementwise ops and reductions only (no dynamic index): fine on sharded ids too.
    index = jnp.arange(bad.size, dtype=jnp.int32).reshape(bad.shape)  # row-major position
    first = jnp.min(jnp.where(bad, index, bad.size))
    debug_check(
        ~jnp.any(bad),
        f"{name}: expected class ids in {allowed}, got {{v}} at flat index {{i}} "
        f"({{count}} out of range)",
        v=jnp.sum(jnp.where(index == first, labels, jnp.zeros((), labels.dtype))),
        i=first,
        count=jnp.sum(bad),
    )


def checked(fn: Callable) -> Callable:
    r"""Checked mode: ``checked(f)(*args) -> (err, out)`` with jaxbp's value checks on.

    Checks that need values (integer labels in range) cannot raise inside ``jit``: there
    the affected rows are NaN. Under ``checked`` (``checkify.checkify`` with the user
    checks) they are traced into the program as ``checkify.debug_check``\ s, so
    ``err.get()`` names the bad label and ``err.throw()`` raises; a plain trace leaves them
    out (``jit`` dispatches a program with a check's effect through Python, ~150 µs a
    call). Any composition works, in any order, warm or cold: ``jax.jit(checked(f))``,
    ``checked(jax.jit(f))`` (also after the jitted ``f`` ran, and ``f`` keeps working
    unchecked afterwards), ``checked(jax.grad(f))``::

        err, loss = jax.jit(jaxbp.checked(loss_fn))(params, x, labels)
        err.throw()
    """
    checked_fn = checkify.checkify(fn, errors=checkify.user_checks)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _CHECKED_MODE is None:
            err, out = checked_fn(*args, **kwargs)
        else:
            with _CHECKED_MODE(True):  # fn (and any jit inside it) is traced with the checks
                err, out = checked_fn(*args, **kwargs)
        return jax.tree.map(_replicated, err), out

    return wrapper


def _replicated(a: Any) -> Any:
    """An error payload replicated on its mesh: checks inside a ``shard_map`` on a mesh with
    Explicit axes leave one payload per device, sharded, and ``checkify``'s ``err.get()``
    sorts them, which JAX refuses along a sharded axis."""
    typeof = getattr(jax, "typeof", None)
    sharding = getattr(typeof(a), "sharding", None) if typeof is not None else None
    spec = getattr(sharding, "spec", None)
    if spec is None or all(s is None for s in spec) or not hasattr(sharding, "update"):
        return a
    reshard = getattr(jax.sharding, "reshard", None) or getattr(jax, "reshard", None)
    return reshard(a, sharding.update(spec=jax.sharding.PartitionSpec()))
