"""A gradient written by hand, outside jaxbp, checked and diagnosed:
``jaxbp.compare(loss_fn, grad_fn, params, *batch)``.

Index letters::

    n  batch (the leading axis of the batch's first array)
    i  input features      o  output features
    k  random directions of the finite-difference check

You wrote ``loss_fn(params, *batch) -> ()`` in ``jax.numpy`` and ``grad_fn(params, *batch)
-> grads`` by hand, the way a course does backpropagation. :func:`compare` reports, per leaf
of ``params`` (``[0]['w'] (i, o)``, …), with the error measures and tolerances of
:func:`jaxbp.compare` of a model:

* ``jax.grad``     ``grad_fn`` against ``jax.grad(loss_fn)``, in the dtype of ``params``;
* ``finite diff``  ``grad_fn`` again in float64 against central differences
  ``(L(θ + h·d) − L(θ − h·d)) / 2h`` of ``loss_fn`` in float64, along ``k`` random unit
  directions ``d`` of each leaf (``h = 1e-5·max(1, max|leaf|)``), as ``⟨∇L, d⟩ (k,)``.

A leaf that is wrong against ``jax.grad`` gets a diagnosis: the classic mistake it matches
(transposed, wrong sign, a sum for a mean or a mean for a sum, softmax's elementwise
derivative ``s(1 − s)`` for its Jacobian; :mod:`jaxbp.mistakes`), alone or together, or "no
known mistake matches". The softmax mistake is seen only through calls of
``jax.nn.softmax``/``log_softmax`` and jaxbp's (and ``jaxbp.reference``'s): a softmax
written inline with ``jnp.exp`` cannot be seen, and the report's notes then say so.

Bad input: ``grad_fn`` returning a tree of another structure, or a leaf of another dtype or
shape, is a ``ValueError``/``TypeError`` naming the leaf; a 2-D (or higher) leaf whose shape
is the reverse of the parameter's is held against the transposed gradient first, and is an
error only when it does not match it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._measure import (
    FD_DIRECTIONS,
    FD_STEP,
    FD_TOLERANCE,
    TOLERANCES,
    Row,
    Verdict,
    fd_directions,
    leaf_names,
    row,
    rows_table,
    x64,
)
from .mistakes import Diagnosis, diagnose, diagonal_softmax

__all__ = ["HandReport", "compare"]


@dataclasses.dataclass(frozen=True)
class HandReport(Verdict):
    """The result of :func:`compare`: a :class:`jaxbp.gradcheck.Row` per (check, leaf) and a
    :class:`Diagnosis` per leaf that is wrong against ``jax.grad``."""

    loss_fn: str
    grad_fn: str
    dtype: str
    batch: int
    loss: float
    rows: tuple[Row, ...]
    diagnoses: tuple[Diagnosis, ...]
    fd_directions: int
    fd_step: float
    seed: int
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (lists, floats, strings, bools)."""
        d = dataclasses.asdict(self)
        d["rows"] = [{**dataclasses.asdict(r), "shape": list(r.shape)} for r in self.rows]
        d["diagnoses"] = [
            {**dataclasses.asdict(g), "mistakes": list(g.mistakes)} for g in self.diagnoses
        ]
        d["notes"] = list(self.notes)
        d["passed"] = self.passed
        return d

    def table(self) -> str:
        """A plain-text table, one line per row, the diagnoses, and a verdict line."""
        lines = [
            f"compare {self.loss_fn} with its hand-written gradient {self.grad_fn}  "
            f"dtype={self.dtype}  batch={self.batch}  seed={self.seed}",
            f"loss: {self.loss:.10g}",
            *rows_table(self.rows),
        ]
        leaves: dict[str, list[str]] = {}  # the leaves of each diagnosis, in order
        for g in self.diagnoses:
            leaves.setdefault(g.text, []).append(g.leaf)
        lines += [f"diagnosis {' '.join(names)}: {text}" for text, names in leaves.items()]
        lines += [f"note: {n}" for n in self.notes]
        lines += [
            "jax.grad:    grad_fn vs jax.grad(loss_fn), in the dtype of params",
            "finite diff: ⟨grad_fn, d⟩ in float64 vs (L(θ+hd) − L(θ−hd))/2h, random unit d",
            "Errors are relative to the reference's max-abs, per leaf.",
        ]
        bad = len(self.failures)
        lines.append(
            f"PASSED: all {len(self.rows)} checks within tolerance"
            if not bad
            else f"FAILED: {bad} of {len(self.rows)} checks out of tolerance"
        )
        return "\n".join(lines)

    def raise_if_failed(self) -> HandReport:
        """Raise ``AssertionError`` with the table when a check failed; else return self."""
        if not self.passed:
            raise AssertionError(f"{self.grad_fn}: gradient check failed\n{self.table()}")
        return self


# --------------------------------------------------------------------------- checks


def _cast(tree, dtype):
    """Floating arrays in ``dtype``; integer ones (labels, ids) and Python numbers as they are."""

    def one(a):
        floating = jnp.issubdtype(getattr(a, "dtype", int), jnp.floating)
        return jnp.asarray(a, dtype) if floating else a

    return jax.tree.map(one, tree)


def _batch_size(batch) -> int:
    """``n``: the leading axis of the batch's first array with one (0 when none has)."""
    return next((int(np.shape(a)[0]) for a in jax.tree.leaves(batch) if np.ndim(a)), 0)


_TRACE_ERRORS = getattr(jax.errors, "JAXTypeError", TypeError)  # a tracer used as a value


def _grad_of(loss_fn, p, b):
    try:
        return jax.grad(loss_fn)(p, *b)
    except _TRACE_ERRORS as e:
        raise TypeError(
            f"loss_fn: jax.grad cannot differentiate it ({type(e).__name__}); write it with "
            "jax.numpy (jnp), not NumPy, and without Python branches on array values"
        ) from e


def _loss_value(loss_fn, p, b) -> float:
    out = jnp.asarray(loss_fn(p, *b))
    if out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            "loss_fn(params, *batch): expected a floating scalar loss (shape ()), got "
            f"{out.dtype} of shape {out.shape}" + (" (reduce it: .mean())" if out.ndim else "")
        )
    return float(out)


def _check_grads(got, params, names, call: str):
    """``got``'s leaves, each the dtype of its parameter and its shape or the reverse of it
    (a transposed leaf, judged by the diagnosis); else an error naming the leaf."""
    leaves, treedef = jax.tree.flatten(params)
    got_leaves, got_def = jax.tree.flatten(got)
    if got_def != treedef:
        theirs = leaf_names(got)
        missing = [k for k in names if k not in theirs]
        extra = [k for k in theirs if k not in names]
        hint = ""
        if isinstance(got, tuple) and len(got) == 2 and jax.tree.structure(got[1]) == treedef:
            hint = "; it looks like (loss, grads): return the gradients alone"
        detail = (
            f"missing {', '.join(missing) or '-'}; extra {', '.join(extra) or '-'}"
            if missing or extra
            else f"{got_def} where params is {treedef}"
        )
        raise ValueError(
            f"{call}: expected a tree with the structure of params, got another: {detail}{hint}"
        )
    out = []
    for name, g, p in zip(names, got_leaves, leaves, strict=True):
        dtype = getattr(g, "dtype", None)
        if dtype is not None and np.dtype(dtype) != p.dtype:
            raise TypeError(
                f"{call}{name}: expected {p.dtype}, the dtype of params{name}, got {dtype} "
                "(compute it in the dtype of its inputs, or cast it with .astype"
                + ("; fd=False skips the float64 run)" if "float64" in call else ")")
            )
        g = jnp.asarray(g, p.dtype)
        if g.shape != p.shape and not (g.ndim >= 2 and g.shape == p.shape[::-1]):
            raise ValueError(
                f"{call}{name}: expected shape {p.shape}, the shape of params{name}, got {g.shape}"
            )
        out.append(g)
    return out


def _fd_rows(loss_fn, grad_fn, params, batch, names, grads, k, seed):
    """``finite diff`` rows in float64 (inside :func:`x64`); ``grads`` the float64 gradient
    of ``grad_fn``, or ``None`` to compute it here."""
    p = _cast(params, jnp.float64)
    b = _cast(batch, jnp.float64)
    if grads is None:
        grads = _check_grads(grad_fn(p, *b), p, names, "grad_fn(params in float64, *batch)")
    leaves, treedef = jax.tree.flatten(p)
    dirs, steps = fd_directions(leaves, k, seed)
    loss = jax.jit(lambda q: loss_fn(q, *b))
    try:
        loss(p)
    except _TRACE_ERRORS:
        loss = lambda q: loss_fn(q, *b)  # Python branches on values: evaluated eagerly
    rows = []
    for j, (name, leaf, g, h) in enumerate(zip(names, leaves, grads, steps, strict=True)):
        if g.shape != leaf.shape:  # a transposed leaf: no directional derivative to compare
            rows.append(Row("finite diff", name, (k,), "float64", math.inf, math.inf, math.nan,
                            FD_TOLERANCE, False))  # fmt: skip
            continue
        exact, numeric = [], []
        for dj in dirs[j][:k]:
            at = [[x + s * h * dj if i == j else x for i, x in enumerate(leaves)] for s in (1, -1)]
            lp, lm = (float(loss(jax.tree.unflatten(treedef, a))) for a in at)
            numeric.append((lp - lm) / (2 * h))
            exact.append(float(jnp.vdot(dj, g)))
        rows.append(row("finite diff", name, exact, numeric, "float64", FD_TOLERANCE))
    return rows


# --------------------------------------------------------------------------- compare


def compare(
    loss_fn: Callable,
    grad_fn: Callable,
    params,
    *batch,
    dtype: Any = None,
    fd: bool = True,
    fd_directions: int = FD_DIRECTIONS,
    seed: int = 0,
) -> HandReport:
    """Check a gradient written by hand against ``jax.grad`` and finite differences, and name
    the classic mistake a wrong leaf matches.

    Args:
      loss_fn: ``loss_fn(params, *batch)`` → the scalar loss, in ``jax.numpy``.
      grad_fn: ``grad_fn(params, *batch)`` → the gradient of that loss, a tree of the
        structure of ``params`` (``[{"w": (i, o), "b": (o,)}, ...]``), written by hand.
      params: a tree of floating arrays.
      *batch: the rest of the arguments of both (inputs ``(n, i)``, labels ``(n,)``, ...);
        ``n``, the batch size of the scaling diagnoses, is the leading axis of its first array.
      dtype: the dtype of the ``jax.grad`` comparison; ``params`` and the floating arrays of
        ``batch`` are cast to it. Default: the dtype of ``params``' first leaf.
      fd: also check against central finite differences (``grad_fn`` and ``loss_fn`` run
        again in float64: write them to follow their inputs' dtype).
      fd_directions: ``k``, random unit directions per leaf.
      seed: seed of those directions.

    Returns:
      A :class:`HandReport`: ``.passed``, ``.table()``, ``.to_dict()``,
      ``.raise_if_failed()``, and ``.diagnoses``, one per leaf wrong against ``jax.grad``,
      naming what it matches (module docstring), or "no known mistake matches".

    The softmax mistake is seen only through ``jax.nn.softmax``/``log_softmax`` and jaxbp's
    (and their ``jaxbp.reference`` twins) called as such: a softmax written inline with
    ``jnp.exp`` cannot be seen, and the report's notes say so. A loss with kinks (``relu``)
    may, rarely, put a finite-difference step across one: another ``seed`` tells.

    Example::

      >>> import jax.numpy as jnp, jaxbp
      >>> loss_fn = lambda w, x: jnp.mean(jnp.sum((x @ w) ** 2, axis=1))
      >>> grad_fn = lambda w, x: 2 * x.T @ (x @ w)         # forgot 1/n: a sum for a mean
      >>> w, x = jnp.ones((3, 2)), jnp.arange(12.0).reshape(4, 3) / 10
      >>> report = jaxbp.compare(loss_fn, grad_fn, w, x, fd=False)
      >>> report.passed, report.diagnoses[0].mistakes
      (False, ('sum_for_mean',))
    """
    leaves = jax.tree.leaves(params)
    names = leaf_names(params)
    for arg, f in (("loss_fn", loss_fn), ("grad_fn", grad_fn)):
        if not callable(f):
            raise TypeError(f"{arg}: expected a function of (params, *batch), got {f!r}")
    if not leaves:
        raise ValueError(f"params: expected a tree of floating arrays, got no array: {params!r}")
    for name, leaf in zip(names, leaves, strict=True):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"params{name}: expected a floating array, got {jnp.result_type(leaf)}")
    dtype = jnp.dtype(jnp.result_type(leaves[0]) if dtype is None else dtype)
    tname = str(dtype)
    if tname not in TOLERANCES:
        raise ValueError(f"dtype: expected one of {sorted(TOLERANCES)}, got {tname}")
    if fd_directions < 1:
        raise ValueError(f"fd_directions: expected a positive int, got {fd_directions!r}")
    n, tol = _batch_size(batch), TOLERANCES[tname]

    with x64() if tname == "float64" else contextlib.nullcontext():
        p, b = _cast(params, dtype), _cast(batch, dtype)
        loss = _loss_value(loss_fn, p, b)
        got = _check_grads(grad_fn(p, *b), p, names, "grad_fn(params, *batch)")
        expected = jax.tree.leaves(_grad_of(loss_fn, p, b))
        rows, wrong = [], []
        for name, u, e in zip(names, got, expected, strict=True):
            r = (
                row("jax.grad", name, u, e, tname, tol)
                if u.shape == e.shape  # else a transposed leaf, for the diagnosis
                else Row("jax.grad", name, e.shape, tname, math.inf, math.inf, math.nan, tol, False)
            )
            rows.append(r)
            if not r.passed:
                wrong.append((name, u, e))
        notes, diagnoses, diag = [], [], None
        if wrong:
            try:
                with diagonal_softmax() as seen, jax.disable_jit():  # jitted code traced anew
                    diag = jax.tree.leaves(_grad_of(loss_fn, p, b))
            except Exception as e:  # a diagnosis aid: never the reason a check fails
                seen, diag = ["failed"], None
                notes.append(f"softmax_diagonal not checked: its jax.grad run raised {e!r}")
            if not seen:
                diag = None
                notes.append(
                    "softmax_diagonal not checked: loss_fn called no jax.nn.softmax, "
                    "jax.nn.log_softmax, jaxbp.softmax or jaxbp.log_softmax (or their "
                    "jaxbp.reference twins) that the check could see (an inline softmax of "
                    "jnp.exp cannot be seen)"
                )
        index = {name: j for j, name in enumerate(names)}
        for name, u, e in wrong:
            d = None if diag is None else diag[index[name]]
            diagnoses.append(diagnose(name, u, e, d, n, tol))
            if u.shape != e.shape and "transposed" not in diagnoses[-1].mistakes:
                raise ValueError(
                    f"grad_fn(params, *batch){name}: expected shape {e.shape}, the shape of "
                    f"params{name}, got {u.shape}, and it is not the transposed gradient either"
                )

    if fd:
        with x64():
            g64 = got if tname == "float64" else None
            fd_rows = _fd_rows(loss_fn, grad_fn, params, batch, names, g64, fd_directions, seed)
        rows += fd_rows
        if any(not r.passed for r in fd_rows) and not wrong:
            notes.append(
                "finite differences disagree with a gradient that matches jax.grad: the loss "
                "may have a kink within a step (relu); another seed tells"
            )
    return HandReport(
        loss_fn=getattr(loss_fn, "__name__", repr(loss_fn)),
        grad_fn=getattr(grad_fn, "__name__", repr(grad_fn)),
        dtype=tname,
        batch=n,
        loss=loss,
        rows=tuple(rows),
        diagnoses=tuple(diagnoses),
        fd_directions=fd_directions if fd else 0,
        fd_step=FD_STEP if fd else 0.0,
        seed=seed,
        notes=tuple(notes),
    )


def or_hand_written(model_compare: Callable) -> Callable:
    """``model_compare`` that takes ``compare(loss_fn, grad_fn, params, *batch)`` too: two
    functions first go to :func:`compare`, anything else to ``model_compare``."""

    @functools.wraps(model_compare)
    def dispatch(*args, **kwargs):
        if len(args) >= 2 and callable(args[0]) and callable(args[1]):
            return compare(*args, **kwargs)
        return model_compare(*args, **kwargs)

    return dispatch
