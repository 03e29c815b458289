"""Input validation shared by every op: clear errors at trace time.

Shapes and dtypes are static under ``jit``, so every check here runs while tracing and
raises a ``TypeError`` (wrong dtype) or ``ValueError`` (wrong shape) whose message names
the argument, what was expected and what came.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


def _as_array(x: Any) -> Any:
    # Shape-only stand-ins (jax.ShapeDtypeStruct) are validated as they are.
    return x if isinstance(x, jax.Array | jax.ShapeDtypeStruct) else jnp.asarray(x)


def floating(name: str, x: Any) -> jax.Array:
    """Return ``x`` as an array, raising ``TypeError`` unless its dtype is floating."""
    x = _as_array(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype} (shape {x.shape})")
    return x


def integer(name: str, x: Any) -> jax.Array:
    """Return ``x`` as an array, raising ``TypeError`` unless its dtype is integer."""
    x = _as_array(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {x.dtype} (shape {x.shape})")
    return x


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
    if not is_concrete(value):
        raise _traced_option(name, value, "number")
    arr = np.asarray(value)
    if (
        isinstance(value, bool)
        or arr.shape != ()
        or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer))
    ):
        raise TypeError(f"{name}: must be a Python number, got {value!r}")
    return float(arr)


def static_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """``value`` as a Python ``int``: a static option (``axis``, ``ignore_index``...).

    Raises ``TypeError`` naming ``name`` for a traced value; other checks are the caller's.
    """
    if value is None and allow_none:
        return None
    if not is_concrete(value):
        raise _traced_option(name, value, "int")
    return value


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds values now (not a tracer inside jit/vmap/grad)."""
    try:
        np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False
    return True


def accum_dtype(dtype: Any) -> Any:
    """float32 for half-precision inputs, the input dtype otherwise."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


_CHECKING: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxbp_checking", default=False)


def checking() -> bool:
    """True while :func:`checked` traces a function: value checks become checkify checks."""
    return _CHECKING.get()


def checked(fn: Callable) -> Callable:
    """Checked mode: ``checked(f)(*args) -> (err, out)`` with jaxbp's value checks on.

    Checks that need values (integer labels in range) cannot raise under ``jit``; there the
    affected rows are NaN. Under ``checked`` they are also ``checkify`` checks, so
    ``err.throw()`` (or ``err.get()``) names the bad label. Works with ``jax.jit`` around it::

        err, loss = jax.jit(jaxbp.checked(loss_fn))(params, x, labels)
        err.throw()
    """
    checked_fn = checkify.checkify(fn, errors=checkify.user_checks)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        token = _CHECKING.set(True)
        try:
            return checked_fn(*args, **kwargs)
        finally:
            _CHECKING.reset(token)

    return wrapper
