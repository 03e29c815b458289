"""Your own ops on jaxbp's contract: :class:`Op` builds one, :func:`check` checks any op.

An op is three functions you write:

* ``fwd(*args, **options) -> (out, res)``: the forward pass and what the backward needs;
* ``bwd(res, g, **options) -> cotangents``: one cotangent per positional argument of ``fwd``
  (``None`` for an integer argument), from the residuals ``res`` and the output cotangent
  ``g`` (same shape as ``out``);
* ``reference(*args, **options)``: the same forward in plain ``jax.numpy``, differentiated
  by JAX; it is the oracle :func:`check` compares against.

Keyword options are static (hashable: floats, ints, strings, bools): each value compiles
once, and they reach ``bwd`` as keywords. Arrays are positional arguments, never options.

:func:`check` runs the library's own three-way comparison on any op, in float64:

* ``custom_vjp``  ``jax.vjp`` of the op (JAX runs ``fwd`` then ``bwd``) vs ``jax.vjp`` of the
  reference, with one random cotangent;
* ``fwd/bwd``     ``bwd(fwd(*args)[1], g)`` called directly vs the same reference;
* ``finite diff`` ``⟨∇, d⟩`` vs ``(L(a + h·d) − L(a − h·d)) / 2h`` with
  ``L = Σ g ⊙ op(...)``, along a few random unit directions ``d`` of each argument;

plus a ``forward`` row (the op's output vs the reference's) and, for an op with a forward-mode
rule ``jvp(res, tangents, **options)``, per argument along a random tangent:

* ``custom_jvp``  ``jax.jvp`` of the op's forward-mode twin (``fwd`` then ``jvp``) vs
  ``jax.jvp`` of the reference;
* ``jvp``         ``jvp(fwd(*args)[1], tangents)`` called directly vs the same;
* ``jvp fd``      the same tangent vs ``(op(a + h·t) − op(a − h·t)) / 2h``.
 Errors are relative to the
expected value's max-abs; tolerances are float64 ≤ 1e-12 against the reference, ≤ 1e-6
against finite differences.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._op import bwd_options, forward_mode, positional_names, rules_of
from ._userop import Op
from .gradcheck import FD_STEP, FD_TOLERANCE, TOLERANCES, Row, x64
from .jacobian import linearized

__all__ = ["Op", "CheckReport", "check"]


# --------------------------------------------------------------------------- checking


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """The result of :func:`check`: one :class:`jaxbp.gradcheck.Row` per (check, argument).

    ``rows[i].leaf`` is the argument's name (``"x"``, ``"w"``); for ``finite diff`` rows the
    ``shape`` is ``(k,)``, the number of directions.
    """

    op: str
    options: dict[str, Any]
    rows: tuple[Row, ...]
    fd_directions: int
    fd_step: float
    seed: int

    @property
    def passed(self) -> bool:
        """True when every row passed."""
        return all(r.passed for r in self.rows)

    @property
    def failures(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if not r.passed)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "op": self.op,
            "options": {k: v if isinstance(v, int | float | str | bool) else repr(v)
                        for k, v in self.options.items()},
            "rows": [{**dataclasses.asdict(r), "shape": list(r.shape)} for r in self.rows],
            "fd_directions": self.fd_directions,
            "fd_step": self.fd_step,
            "seed": self.seed,
            "passed": self.passed,
        }  # fmt: skip

    def table(self) -> str:
        """A plain-text table, one line per row, and a verdict line."""
        opts = "  ".join(f"{k}={v!r}" for k, v in self.options.items())
        lines = [f"check {self.op}  {opts}  dtype=float64  seed={self.seed}".rstrip()]
        cols = ("check", "argument", "shape", "max abs err", "max rel err", "tol", "")
        body = [
            (
                r.check, r.leaf,
                f"{r.shape[0]} dirs" if r.check == "finite diff" else str(r.shape),
                f"{r.max_abs_error:.2e}", f"{r.max_rel_error:.2e}", f"{r.tolerance:.0e}",
                "ok" if r.passed else "FAIL",
            )
            for r in self.rows
        ]  # fmt: skip
        widths = [max(len(c), *(len(b[k]) for b in body)) for k, c in enumerate(cols)]

        def fmt(cells):
            out = [
                c.rjust(w) if k in (3, 4, 5) else c.ljust(w)
                for k, (c, w) in enumerate(zip(cells, widths, strict=True))
            ]
            return "  ".join(out).rstrip()

        lines += [fmt(cols), fmt(["-" * w for w in widths]), *map(fmt, body)]
        lines += [
            "forward:     op(*args) vs reference(*args)",
            "custom_vjp:  jax.vjp of the op (fwd, then bwd) vs jax.vjp of the reference",
            "fwd/bwd:     bwd(fwd(*args)[1], g) called directly vs the same",
            "finite diff: ⟨grad, d⟩ vs (L(a+hd) − L(a−hd))/2h, L = Σ g·op(...), random unit d",
        ]
        if any(r.check.startswith(("jvp", "custom_jvp")) for r in self.rows):
            lines += [
                "custom_jvp:  jax.jvp of jaxbp.forward_mode.of(op) (fwd, then jvp) vs jax.jvp "
                "of the reference",
                "jvp:         jvp(fwd(*args)[1], tangents) called directly vs the same",
                "jvp fd:      that tangent vs (op(a+ht) − op(a−ht))/2h, random unit t",
            ]
        bad = self.failures
        lines.append(
            f"PASSED: all {len(self.rows)} checks within tolerance"
            if not bad
            else f"FAILED: {len(bad)} of {len(self.rows)} checks out of tolerance "
            f"({', '.join(sorted({f'{r.check} {r.leaf}' for r in bad}))})"
        )
        return "\n".join(lines)

    def raise_if_failed(self) -> CheckReport:
        """Raise ``AssertionError`` with the table when a check failed; else return self."""
        if not self.passed:
            raise AssertionError(f"{self.op}: gradient check failed\n{self.table()}")
        return self


def _errors(actual, expected) -> tuple[float, float]:
    """``(max abs error, max abs error / max|expected|)`` in float64; NaN never passes."""
    a = np.asarray(actual, np.float64).ravel()
    e = np.asarray(expected, np.float64).ravel()
    if a.shape != e.shape:
        return math.inf, math.inf
    if a.size == 0:
        return 0.0, 0.0
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(e))):
        return math.nan, math.nan
    err = float(np.max(np.abs(a - e)))
    scale = float(np.max(np.abs(e)))
    return err, (err / scale if scale > 0 else (0.0 if err == 0 else math.inf))


def _row(check_name, arg, actual, expected, tol) -> Row:
    err, rel = _errors(actual, expected)
    return Row(
        check_name, arg, tuple(np.shape(expected)), "float64", err, rel, math.nan, tol,
        bool(rel <= tol),
    )  # fmt: skip


def _resolve(op: Callable):
    """``(name, call, fwd, bwd, reference, argument names)``, from the op's attributes."""
    ref = getattr(op, "reference", None)
    if (
        ref is None
        or not callable(getattr(op, "fwd", None))
        or not callable(getattr(op, "bwd", None))
    ):
        raise TypeError(
            "op: expected a jaxbp.Op or a public jaxbp op (carrying .fwd/.bwd rules and its "
            f"plain twin from jaxbp.reference as .reference), got {op!r}"
        )
    fwd, bwd = rules_of(op)
    names = tuple(getattr(op, "arg_names", None) or positional_names(op))
    return getattr(op, "name", op.__name__), op, fwd, bwd, ref, names


def _is_float(a) -> bool:
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


def _jvp_rows(op, args, fl, floats, arg_name, as_fn, key, step, options) -> list[Row]:
    """The forward-mode rows of :func:`check`: per floating argument, one random unit
    tangent (zeros on the others) through the twin, the rule and finite differences."""
    tol = TOLERANCES["float64"]
    _, push = linearized(op, args, options)
    twin, ref, call = as_fn(forward_mode(op)), as_fn(op.reference), as_fn(op)
    rows = []
    for j, i in enumerate(floats):
        key, sub = jax.random.split(key)
        t = jax.random.normal(sub, np.shape(args[i]), jnp.float64)
        t = t / jnp.sqrt(jnp.sum(t * t))
        ts = [jnp.zeros_like(a) for a in fl]
        ts[j] = t
        _, expected = jax.jvp(ref, tuple(fl), tuple(ts))
        _, via_twin = jax.jvp(twin, tuple(fl), tuple(ts))
        direct = push({i: t})
        plus, minus = list(fl), list(fl)
        plus[j], minus[j] = fl[j] + step * t, fl[j] - step * t
        numeric = (call(*plus) - call(*minus)) / (2 * step)
        rows += [
            _row("custom_jvp", arg_name[i], via_twin, expected, tol),
            _row("jvp", arg_name[i], direct, expected, tol),
            _row("jvp fd", arg_name[i], direct, numeric, FD_TOLERANCE),
        ]
    return rows


def check(
    op: Callable, *args, seed: int = 0, directions: int = 3, step: float = FD_STEP, **options
) -> CheckReport:
    """Check an op's hand-written backward the way jaxbp checks its own, in float64.

    Args:
      op: a :class:`jaxbp.Op` or a public jaxbp op (``jaxbp.softmax``, ``jaxbp.dense``...):
        its rules are ``op.fwd``/``op.bwd``, its plain twin ``op.reference``.
      *args: the op's positional arguments; floating ones are cast to float64 (and each is
        checked), integer ones (labels) are passed as they are.
      seed: seeds the random cotangent and the finite-difference directions.
      directions: ``k``, random unit directions per argument for finite differences.
      step: ``h`` of the central differences.
      **options: the op's keyword options.

    Returns:
      A :class:`CheckReport`: ``.passed``, ``.table()``, ``.to_dict()``,
      ``.raise_if_failed()``; a row per (check, floating argument) with the max abs and
      relative error and the tolerance (1e-12 against the reference, 1e-6 against finite
      differences); the forward-mode rows (``custom_jvp``, ``jvp``, ``jvp fd``) only when
      the op has a ``jvp`` rule. Float64 is switched on for the duration of the call if it is off.

    Example::

      >>> import jax.numpy as jnp, jaxbp
      >>> jaxbp.check(jaxbp.softmax, jnp.arange(6.0).reshape(2, 3)).passed
      True
    """
    name, call, fwd, bwd, ref, names = _resolve(op)
    tol = TOLERANCES["float64"]
    with x64():
        args = tuple(jnp.asarray(a, jnp.float64) if _is_float(jnp.asarray(a)) else a for a in args)
        floats = [i for i, a in enumerate(args) if _is_float(a)]
        if not floats:
            raise TypeError(f"args: {name} got no floating argument to differentiate")
        arg_name = [names[i] if i < len(names) else f"args[{i}]" for i in range(len(args))]

        def as_fn(f):
            def fn(*fl):
                full = list(args)
                for i, a in zip(floats, fl, strict=True):
                    full[i] = a
                return f(*full, **options)

            return fn

        fl = [args[i] for i in floats]
        out_ref, vjp_ref = jax.vjp(as_fn(ref), *fl)
        key_g, key_d = jax.random.split(jax.random.PRNGKey(seed))
        g = jax.random.normal(key_g, jnp.shape(out_ref), jnp.float64)
        expected = vjp_ref(g)
        out_op, vjp_op = jax.vjp(as_fn(call), *fl)
        via_vjp = vjp_op(g)
        _, res = fwd(*args, **options)
        direct = tuple(bwd(res, g.astype(out_op.dtype), **bwd_options(bwd, options)))
        rows = [_row("forward", "out", out_op, out_ref, tol)]
        for j, i in enumerate(floats):
            rows.append(_row("custom_vjp", arg_name[i], via_vjp[j], expected[j], tol))
        for j, i in enumerate(floats):
            d = direct[i] if i < len(direct) else None
            actual = np.full(np.shape(args[i]), np.nan) if d is None else d
            rows.append(_row("fwd/bwd", arg_name[i], actual, expected[j], tol))

        loss = jax.jit(lambda *a: jnp.sum(g * as_fn(call)(*a)))
        for j, i in enumerate(floats):
            key_d, sub = jax.random.split(key_d)
            dirs = jax.random.normal(sub, (directions, *np.shape(args[i])), jnp.float64)
            norms = jnp.sqrt(jnp.sum(dirs**2, axis=tuple(range(1, dirs.ndim))))
            dirs = dirs / norms.reshape((-1,) + (1,) * (dirs.ndim - 1))
            manual = [float(jnp.sum(via_vjp[j] * d)) for d in dirs]
            numeric = []
            for d in dirs:
                plus = list(fl)
                minus = list(fl)
                plus[j] = fl[j] + step * d
                minus[j] = fl[j] - step * d
                numeric.append(float((loss(*plus) - loss(*minus)) / (2 * step)))
            rows.append(_row("finite diff", arg_name[i], manual, numeric, FD_TOLERANCE))
        if getattr(op, "jvp", None) is not None:
            rows += _jvp_rows(op, args, fl, floats, arg_name, as_fn, key_d, step, options)
    return CheckReport(name, dict(options), tuple(rows), directions, float(step), seed)
