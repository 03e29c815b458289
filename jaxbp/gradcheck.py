"""Manual gradients against ``jax.grad`` and against central finite differences.

Index letters::

    n  batch      i  input features      c  classes (the network's last width)
    k  random directions of the finite-difference check

:func:`compare` runs one model (an MLP, a GPT, any model of :mod:`jaxbp.model`'s
interface) on one batch three or four ways and reports, per parameter leaf (``[0]['w']
(i, o)``, ``['blocks'][0]['attn']['qkv']['w'] (d, 3d)``, …):

* ``jax.grad``    the hand-written reverse loop (:func:`jaxbp.value_and_grad`) against
  ``jax.value_and_grad`` of the model's plain-jnp twin (:func:`jaxbp.reference.
  value_and_grad`), in the requested dtype;
* ``custom_vjp``  ``jax.grad`` of the model's forward loop through jaxbp's ops (so JAX runs
  the hand-written ``_bwd`` rules through ``custom_vjp``) against the same reference;
* ``finite diff`` the manual gradient, recomputed in float64, against central differences
  ``(L(θ + h·d) − L(θ − h·d)) / 2h`` of the float64 loss along ``k`` random unit directions
  ``d`` of each leaf, compared as directional derivatives ``⟨∇L, d⟩ (k,)``. Directions whose
  step would cross a kink of ``relu``/``leaky_relu`` are redrawn.

Errors are relative to the reference's max-abs (docs/edge_cases.md): float64 ≤ 1e-12,
float32 ≤ 1e-5, bfloat16 ≤ 2e-2 against ``jax.grad``; ≤ 1e-6 against finite differences.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import handcheck, reference
from ._measure import (
    FD_DIRECTIONS,
    FD_STEP,
    FD_TOLERANCE,
    TOLERANCES,
    Row,
    Verdict,
    rows_table,
    x64,
)
from ._measure import fd_directions as _fd_directions
from ._measure import leaf_names as _leaf_names
from ._measure import row as _row
from ._tape import Tape
from .model import check_model, checker, mean_and_seed, reference_loss, value_and_grad
from .nn import MLP

__all__ = ["TOLERANCES", "FD_TOLERANCE", "Row", "Report", "compare", "x64"]

_KINKED = ("relu", "leaky_relu")


@dataclasses.dataclass(frozen=True)
class Report(Verdict):
    """The result of :func:`compare`: a row per (check, leaf) and the losses.

    ``model`` describes the model in one line; ``sizes``, ``activation`` and ``loss`` are an
    MLP's configuration (empty for any other model)."""

    sizes: tuple[int, ...]
    activation: str
    loss: str
    dtype: str
    batch: int
    loss_manual: float
    loss_reference: float
    rows: tuple[Row, ...]
    fd_directions: int
    fd_step: float
    seed: int
    notes: tuple[str, ...] = ()
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (lists, floats, strings, bools)."""
        d = dataclasses.asdict(self)
        d["sizes"] = list(self.sizes)
        d["rows"] = [{**dataclasses.asdict(r), "shape": list(r.shape)} for r in self.rows]
        d["notes"] = list(self.notes)
        d["passed"] = self.passed
        return d

    def table(self) -> str:
        """A plain-text table, one line per row, and a verdict line."""
        what = (
            f"MLP {'-'.join(map(str, self.sizes))}  activation={self.activation}  loss={self.loss}"
            if self.sizes
            else self.model
        )
        head = f"{what}  dtype={self.dtype}  batch={self.batch}  seed={self.seed}"
        lines = [
            head,
            f"loss: manual {self.loss_manual:.10g}   reference {self.loss_reference:.10g}",
        ]
        lines += rows_table(self.rows)
        lines += [f"note: {n}" for n in self.notes]
        lines += [
            "jax.grad:    the hand-written reverse loop vs jax.grad of the plain-jnp twin",
            "custom_vjp:  jax.grad through jaxbp's ops (their _bwd rules) vs the same",
            "finite diff: ⟨manual grad, d⟩ in float64 vs (L(θ+hd) − L(θ−hd))/2h, random unit d",
            "Errors are relative to the reference's max-abs, per leaf.",
        ]
        bad = len(self.failures)
        lines.append(
            f"PASSED: all {len(self.rows)} checks within tolerance"
            if not bad
            else f"FAILED: {bad} of {len(self.rows)} checks out of tolerance"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


def _cast(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), tree)


def _cast_floats(labels, dtype):
    """Float labels (probabilities, targets) in ``dtype``; integer ids as they are."""
    labels = jnp.asarray(labels)
    return labels.astype(dtype) if jnp.issubdtype(labels.dtype, jnp.floating) else labels


class _KinkTape(Tape):
    """The forward loop through the plain twins (``Tape("reference")``), recording the
    inputs of the ops with a kink (``relu``, ``leaky_relu``): finite differences must not
    step across one."""

    def __init__(self):
        super().__init__("reference")
        self.kinked: list = []

    def fwd(self, op, *args, **options):
        if getattr(op, "name", None) in _KINKED:
            self.kinked.append(args[0])
        return super().fwd(op, *args, **options)


def _fd_loss(model, p, batch):
    """``(mean loss, kinked inputs)`` of the model's forward loop run on the plain twins."""
    t = _KinkTape()
    losses, valid, _ = model.forward(t, p, *batch)
    return mean_and_seed(losses, valid)[0], t.kinked


def _fd_evaluate(model, params, dirs, steps, batch):
    """For every candidate direction of every leaf: ``L(θ + h·d)``, ``L(θ − h·d)`` and whether
    the step keeps the sign of every input of a kinked op (relu/leaky_relu). Traceable:
    vmapped over the directions of each leaf."""
    leaves, treedef = jax.tree.flatten(params)
    _, base = _fd_loss(model, params, batch)

    def same_signs(kinked):
        same = [jnp.all(jnp.sign(a) == jnp.sign(b)) for a, b in zip(base, kinked, strict=True)]
        return jnp.all(jnp.asarray(same)) if same else jnp.asarray(True)

    # One vmapped program over every (leaf, direction) pair: the perturbation of pair (j, ·)
    # is h_j·d in leaf j and zero elsewhere, stacked to (leaves·3k, *leaf.shape) per leaf.
    m = dirs[0].shape[0]
    deltas = [
        jnp.concatenate([
            (h * d_stack if i == j else jnp.zeros((m, *leaf.shape), leaf.dtype))
            for j in range(len(leaves))
        ])
        for i, (leaf, h, d_stack) in enumerate(zip(leaves, steps, dirs, strict=True))
    ]  # fmt: skip

    def at(delta_leaves):
        delta = jax.tree.unflatten(treedef, delta_leaves)
        lp, kp = _fd_loss(model, jax.tree.map(jnp.add, params, delta), batch)
        lm, km = _fd_loss(model, jax.tree.map(jnp.subtract, params, delta), batch)
        return lp, lm, same_signs(kp) & same_signs(km)

    lp, lm, ok = jax.vmap(at)(deltas)  # (leaves·3k,) each
    shape = (len(leaves), m)
    return list(zip(lp.reshape(shape), lm.reshape(shape), ok.reshape(shape), strict=True))


def _fd_rows(names, dirs, steps, grads, results, k):
    """Rows comparing ``⟨grads, d⟩`` with the central differences of the first ``k``
    kink-free directions of each leaf."""
    rows, notes = [], []
    gleaves = jax.tree.leaves(grads)
    for name, leaf_dirs, h, g, (lp, lm, ok) in zip(
        names, dirs, steps, gleaves, results, strict=True
    ):
        ok = np.asarray(ok)
        keep = np.flatnonzero(ok)[:k]
        fd = (np.asarray(lp, np.float64)[keep] - np.asarray(lm, np.float64)[keep]) / (2.0 * h)
        exact = np.asarray(jnp.tensordot(leaf_dirs, g, axes=g.ndim), np.float64)[keep]
        dropped = int(np.sum(~ok[: keep[-1] + 1])) if keep.size else ok.size
        if dropped:
            notes.append(f"{name}: {dropped} direction(s) dropped to keep the step off a kink")
        if keep.size < k:
            notes.append(f"{name}: only {keep.size} of {k} kink-free directions found")
        row = _row("finite diff", name, exact, fd, "float64", FD_TOLERANCE)
        rows.append(dataclasses.replace(row, shape=(int(keep.size),)))
    return rows, notes


# --------------------------------------------------------------------------- compare


def _cast_batch(batch, dtype):
    """Float arrays of the batch (inputs, float labels, class weights) in ``dtype``;
    integer ids and bool masks as they are; ``None`` stays ``None``."""
    return tuple(None if b is None else _cast_floats(b, dtype) for b in batch)


def _describe(model) -> str:
    if isinstance(model, MLP):
        return ""
    fields = getattr(model, "__dataclass_fields__", None)
    if fields:
        inner = ", ".join(f"{k}={getattr(model, k)!r}" for k in fields)
        return f"{type(model).__name__}({inner})"
    return repr(model)


@handcheck.or_hand_written  # compare(loss_fn, grad_fn, params, *batch): jaxbp.handcheck
def compare(
    model: Any,
    params,
    *batch,
    dtype: Any = None,
    fd: bool = True,
    fd_directions: int = FD_DIRECTIONS,
    seed: int = 0,
    **batch_options,
) -> Report:
    """Compare the hand-written gradient of ``model`` with ``jax.grad`` and finite differences.

    Args:
      model: any model of :mod:`jaxbp.model`'s interface: a :class:`jaxbp.MLP`, a
        :class:`jaxbp.GPT`, one of yours.
      params: its parameters.
      *batch: the model's inputs, as :func:`jaxbp.value_and_grad` of it takes them: ``x,
        labels`` for an MLP, ``ids, targets`` for a GPT; keyword inputs (``where=``,
        ``class_weights=``) go in ``**batch_options``.
      dtype: the dtype of the ``jax.grad`` comparison (``float32``, ``float64``, ``bfloat16``);
        ``params`` and the batch's float arrays are cast to it (integer ids and bool masks
        are not). Default: the dtype of the first parameter.
      fd: also check against central finite differences (always in float64).
      fd_directions: random unit directions per leaf for the finite differences, ``k``.
      seed: seed of those directions.

    Returns:
      A :class:`Report`; ``report.passed`` is True when every row is within tolerance
      (docs/edge_cases.md), ``report.table()`` prints it, ``report.to_dict()`` serialises it.

    The references: ``jax.grad`` of the model's plain-jnp twin (:func:`jaxbp.reference.
    value_and_grad`: the MLP's and GPT's own twins, or the model's forward loop run on the
    ops' plain twins), ``jax.grad`` of the forward loop through the ops themselves (their
    ``custom_vjp`` runs the rules), and finite differences of the twin's loss. float64 is
    switched on (``jax_enable_x64``) for the duration of the call when needed; inputs are
    validated with the model's clear errors first.
    ``compare(loss_fn, grad_fn, params, *batch)`` checks a gradient you wrote by hand, outside
    jaxbp, and names the classic mistake it matches: :func:`jaxbp.handcheck.compare`.
    """
    check_model(model, "compare")
    if dtype is None:
        leaves = jax.tree.leaves(params)
        dtype = jnp.asarray(leaves[0]).dtype if leaves else jnp.float32
    dtype = jnp.dtype(dtype)
    name = str(dtype)
    if name not in TOLERANCES:
        raise ValueError(f"dtype: expected one of {sorted(TOLERANCES)}, got {name}")
    if fd_directions < 1:
        raise ValueError(f"fd_directions: expected a positive int, got {fd_directions!r}")
    needs_x64 = fd or name == "float64"
    check = checker(model)
    with x64() if needs_x64 else contextlib.nullcontext():
        cast_options = {k: _cast_batch((v,), dtype)[0] for k, v in batch_options.items()}
        p, *args = check(_cast(params, dtype), *_cast_batch(batch, dtype), **cast_options)
        p64 = _cast(params, jnp.float64) if fd else None
        args64 = _cast_batch(args, jnp.float64) if fd else None
        dirs, steps = _fd_directions(jax.tree.leaves(p64), fd_directions, seed) if fd else ([], [])
        manual = value_and_grad(model).jitted
        twin = reference.value_and_grad(model).jitted

        @jax.jit  # every route in one compiled program
        def routes(p, args, p64, args64, dirs):
            out = {
                "manual": manual(p, *args),
                "reference": twin(p, *args),
                "custom_vjp": jax.grad(
                    lambda q: reference_loss(model, q, *args, mode="custom_vjp")
                )(p),
            }
            if fd:
                # The manual gradient again in float64 (the same one when dtype is float64).
                out["manual64"] = out["manual"][1] if name == "float64" else manual(p64, *args64)[1]
                out["fd"] = _fd_evaluate(model, p64, dirs, steps, args64)
            return out

        r = routes(p, tuple(args), p64, None if args64 is None else tuple(args64), dirs)
        (loss_m, g_m), (loss_r, g_r), g_c = r["manual"], r["reference"], r["custom_vjp"]

        tol = TOLERANCES[name]
        rows = [_row("loss", "mean loss", loss_m, loss_r, name, tol)]
        names = _leaf_names(p)
        for leaf, a, e in zip(names, jax.tree.leaves(g_m), jax.tree.leaves(g_r), strict=True):
            rows.append(_row("jax.grad", leaf, a, e, name, tol))
        for leaf, a, e in zip(names, jax.tree.leaves(g_c), jax.tree.leaves(g_r), strict=True):
            rows.append(_row("custom_vjp", leaf, a, e, name, tol))

        notes: list[str] = []
        if fd:
            fd_rows, notes = _fd_rows(names, dirs, steps, r["manual64"], r["fd"], fd_directions)
            rows += fd_rows
        mlp = isinstance(model, MLP)
        return Report(
            sizes=model.sizes if mlp else (),
            activation=model.activation if mlp else "",
            loss=model.loss if mlp else "",
            dtype=name,
            batch=int(jnp.shape(args[0])[0]) if args else 0,
            loss_manual=float(loss_m),
            loss_reference=float(loss_r),
            rows=tuple(rows),
            fd_directions=fd_directions if fd else 0,
            fd_step=FD_STEP if fd else 0.0,
            seed=seed,
            notes=tuple(notes),
            model=_describe(model),
        )
