"""How two gradients are measured against each other: the tolerances, a :class:`Row` per
leaf, its error measures, float64 for a while, random finite-difference directions, and
the rows as a table. Shared by every checker (:mod:`jaxbp.gradcheck`, :mod:`jaxbp.custom`,
:mod:`jaxbp.handcheck`).

Index letters::

    k  random directions of a finite-difference check

Errors are relative to the reference's max-abs, per leaf (docs/edge_cases.md): float64
≤ 1e-12, float32 ≤ 1e-5, bfloat16 ≤ 2e-2 against ``jax.grad``; ≤ 1e-6 against central
finite differences in float64 with a step ``h = 1e-5·max(1, max|leaf|)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "TOLERANCES", "FD_TOLERANCE", "FD_STEP", "FD_DIRECTIONS", "Row", "x64", "errors", "row",
    "leaf_names", "fd_directions", "rows_table", "Verdict",
]  # fmt: skip

TOLERANCES = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}
FD_TOLERANCE = 1e-6
FD_STEP = 1e-5  # ≈ ε^(1/3) of float64: round-off (ε·|L|/h) and truncation (h²·L‴/6) balance
FD_DIRECTIONS = 4  # random unit directions per leaf


def x64():
    """Context manager turning on float64 (``jax_enable_x64``) for its body only."""
    if jax.config.jax_enable_x64:
        return contextlib.nullcontext()
    enable = getattr(jax, "enable_x64", None)
    if enable is not None:  # newer JAX: a config context manager
        return enable(True)
    from jax.experimental import enable_x64  # older JAX only: feature-detected

    return enable_x64()


@dataclasses.dataclass(frozen=True)
class Row:
    """One comparison of one leaf.

    ``max_rel_error`` is ``max|a − e| / max|e|`` (per leaf, relative to the reference's
    max-abs); ``cosine`` is ``⟨a, e⟩ / (‖a‖‖e‖)`` (1.0 when both are exactly zero).
    """

    check: str
    leaf: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    cosine: float
    tolerance: float
    passed: bool


def leaf_names(tree) -> list[str]:
    """``keystr`` of every leaf's path, in ``jax.tree.leaves`` order: ``[0]['w']``, …"""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def errors(actual, expected) -> tuple[float, float, float]:
    """``(max abs error, max abs error / max|expected|, cosine)`` in float64."""
    a = np.asarray(actual, np.float64).ravel()
    e = np.asarray(expected, np.float64).ravel()
    if a.size == 0:
        return 0.0, 0.0, 1.0
    err = float(np.max(np.abs(a - e)))
    scale = float(np.max(np.abs(e)))
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(e))):
        return math.nan, math.nan, math.nan
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    na, ne = float(np.linalg.norm(a)), float(np.linalg.norm(e))
    if na == 0 and ne == 0:
        cos = 1.0
    elif na == 0 or ne == 0:
        cos = 0.0
    else:
        cos = float(np.dot(a, e) / (na * ne))
    return err, rel, cos


def row(check, leaf, actual, expected, dtype, tol) -> Row:
    """The :class:`Row` of ``actual`` against ``expected`` (NaN never passes)."""
    err, rel, cos = errors(actual, expected)
    return Row(
        check, leaf, tuple(np.shape(expected)), str(dtype), err, rel, cos, tol,
        bool(rel <= tol),  # NaN compares False: a NaN never passes
    )  # fmt: skip


def fd_directions(leaves, k: int, seed: int):
    """``3k`` random unit directions per leaf ``(3k, *leaf.shape)`` and a step per leaf
    (``3k`` candidates: a checker that keeps steps off kinks drops a few)."""
    rng = np.random.default_rng(seed)
    m = 3 * k
    steps = [FD_STEP * max(1.0, float(jnp.max(jnp.abs(l)))) if l.size else FD_STEP for l in leaves]
    dirs = []
    for leaf in leaves:
        d = rng.standard_normal((m, *leaf.shape))
        norms = np.sqrt(np.sum(d.reshape(m, -1) ** 2, axis=1)).reshape((m,) + (1,) * leaf.ndim)
        dirs.append(jnp.asarray(d / np.maximum(norms, 1e-300), leaf.dtype))
    return dirs, steps


class Verdict:
    """What a report of :class:`Row` s says as a whole (a mixin of the reports' dataclasses,
    which hold ``rows``)."""

    rows: tuple[Row, ...]

    @property
    def passed(self) -> bool:
        """True when every row passed."""
        return all(r.passed for r in self.rows)

    @property
    def failures(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if not r.passed)


def rows_table(rows) -> list[str]:
    """The rows as text lines: a header, a rule, one line per row (``ok`` / ``FAIL``)."""
    cols = ("check", "leaf", "shape", "max abs err", "max rel err", "cosine", "tol", "")
    body = []
    for r in rows:
        shape = f"{r.shape[0]} dirs" if r.check == "finite diff" else str(r.shape)
        body.append((
            r.check, r.leaf, shape, f"{r.max_abs_error:.2e}", f"{r.max_rel_error:.2e}",
            f"{r.cosine:.8f}", f"{r.tolerance:.0e}", "ok" if r.passed else "FAIL",
        ))  # fmt: skip
    widths = [max(len(c), *(len(b[k]) for b in body)) for k, c in enumerate(cols)]
    right = {3, 4, 5, 6}

    def fmt(cells):
        out = [
            c.rjust(w) if k in right else c.ljust(w)
            for k, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return [fmt(cols), fmt(["-" * w for w in widths]), *map(fmt, body)]
