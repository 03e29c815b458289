"""The tape: how a model's explicit loops call the rules, and where parameter gradients go.

A model written as an explicit loop (:class:`jaxbp.MLP`, :class:`jaxbp.GPT`, or your own,
see :mod:`jaxbp.model`) calls every rule through a :class:`Tape` ``t``::

    h, res = t.fwd(jaxbp.dense, x, p["w"], p["b"])             # runs dense.fwd
    (dx,)  = t.bwd(jaxbp.dense, res, g, params=("layers", 0))   # runs dense.bwd

``t.bwd`` returns the cotangents of the op's per-example arguments (``x``, ``logits``,
``q, k, v``, …: those in ``op.per_example_args``), in order, and sends the cotangents of its
parameters (``w``, ``b``, ``gamma``, ``table``, …: its other positional arguments) to the
parameter leaves named by ``params``; a model never assembles a gradient tree itself. The
tape records each call: ``(op, res, g, options, where each parameter goes)``. What happens
to the records is the transform's business:

* :func:`jaxbp.value_and_grad` sums each leaf's cotangents (:meth:`Tape.gradients`); a leaf
  that two calls reach (tied weights) gets both, added;
* the per-example transforms ask each op for its per-example rule (``op.example_grads``) on
  the same ``res`` and ``g``: per-example gradients, or their norms without forming them;
* DP-SGD by book-keeping re-runs each parameter rule with ``g`` scaled per example.

The parameter cotangents computed by ``t.bwd`` and not used by a transform cost nothing
under ``jit``: XLA removes them.

``params`` is a path prefix (a tuple of dict keys and list indices), each parameter
argument's name appended (``("layers", 0)`` sends ``w`` to ``params["layers"][0]["w"]``), or
a dict ``{argument name: path}`` (``{"table": ("tok",)}``) naming every parameter argument,
where a path may be :func:`transposed` (a tied output head ``w = tokᵀ``:
``{"w": transposed(("tok",))}``) or ``None`` (a frozen weight: its cotangent is dropped).

The tape also runs the *same* forward loop through other implementations of the ops, for
the oracles: ``Tape("reference")`` calls ``op.reference`` (plain ``jax.numpy``) and
``Tape("custom_vjp")`` calls the op itself, so that ``jax.grad`` of the loop's loss
differentiates the plain twins, or runs the hand-written rules through ``custom_vjp``.
There ``t.fwd`` returns ``(out, None)`` and no backward runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks
from ._op import bwd_options, positional_names, rules_of

__all__ = ["MODES", "Record", "Tape", "Transposed", "key_path", "rule_arg_names", "transposed"]

MODES = ("rules", "reference", "custom_vjp")

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Transposed:
    """A parameter path whose leaf enters the op transposed (``w = leafᵀ``)."""

    path: Path


def transposed(path: Sequence[Any]) -> Transposed:
    """Mark a parameter path as entering the op transposed: ``{"w": transposed(("tok",))}``
    for an output head tied to the token table (``w (d, v) = tok (v, d)ᵀ``)."""
    return Transposed(_path(path))


def _path(path) -> Path:
    if isinstance(path, str | int):
        return (path,)
    if not isinstance(path, Sequence):
        raise TypeError(f"params: expected a path (a tuple of keys and indices), got {path!r}")
    return tuple(path)


def key_path(keys) -> Path:
    """A ``jax.tree_util`` key path as a plain tuple: ``[DictKey('w')]`` → ``('w',)``."""
    out = []
    for k in keys:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            raise TypeError(f"params: unsupported key {k!r} in a parameter path")
    return tuple(out)


def rule_arg_names(op: Any) -> tuple[str, ...]:
    """The names of the positional arguments of ``op.fwd``, in order (one cotangent each
    comes back from ``op.bwd``): the op's arguments, then its array options (``where``,
    ``class_weights``) where the rule takes them positionally."""
    names = positional_names(rules_of(op)[0])
    return names if len(names) >= len(op.arg_names) else tuple(op.arg_names)


@dataclasses.dataclass
class Record:
    """One ``t.bwd`` call: the op, its residuals, its output gradient ``g``, the options, the
    parameter arguments ``{index: (name, path, is_transposed)}`` and the cotangents."""

    op: Any
    res: Any
    g: Any
    options: dict
    params: dict[int, tuple[str, Path, bool]]
    cotangents: tuple


class Tape:
    """The rules' runner for one trace of a model's explicit loops (module docstring).

    Args:
      mode: ``"rules"`` (``op.fwd``/``op.bwd``, recorded), ``"reference"`` (forward through
        ``op.reference``) or ``"custom_vjp"`` (forward through the op itself).
    """

    def __init__(self, mode: str = "rules"):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        self.records: list[Record] = []

    # -- forward ---------------------------------------------------------------------------

    def fwd(self, op: Any, *args, **options) -> tuple[Any, Any]:
        """``op.fwd(*args, **options)`` → ``(out, res)``; in the oracle modes ``(out, None)``
        with ``out`` from ``op.reference`` or ``op`` (array options passed positionally to
        ``fwd``, such as ``where``, become keywords there)."""
        if self.mode == "rules":
            return rules_of(op)[0](*args, **options)
        call = op.reference if self.mode == "reference" else op
        if call is None:
            raise TypeError(f"{op.name}: has no reference twin (op.reference is None)")
        n = len(op.arg_names)
        names = rule_arg_names(op)
        extra = {name: a for name, a in zip(names[n:], args[n:], strict=False) if a is not None}
        return call(*args[:n], **extra, **options), None

    # -- backward --------------------------------------------------------------------------

    def bwd(self, op: Any, res: Any, g: Any, *, params=None, **options) -> tuple:
        """``op.bwd(res, g, **options)``; returns the cotangents of the op's per-example
        arguments (``op.per_example_args``, in order) and sends those of its parameters to
        the leaves named by ``params`` (module docstring)."""
        if self.mode != "rules":
            raise RuntimeError(f"{op.name}: t.bwd runs only on a Tape('rules')")
        bwd = rules_of(op)[1]
        cts = tuple(self.backward_rule(op, bwd)(res, g, **bwd_options(bwd, options)))
        names = rule_arg_names(op)
        if len(cts) != len(names):
            raise ValueError(
                f"{op.name}: the backward rule returned {len(cts)} cotangents, expected "
                f"{len(names)} (one per argument of the forward rule {names})"
            )
        where = _places(op, names, cts, params)
        self.records.append(Record(op, res, g, dict(options), where, cts))
        return tuple(cts[names.index(a)] for a in op.per_example_args)

    def backward_rule(self, op: Any, bwd: Callable) -> Callable:
        """The rule ``t.bwd`` runs for ``op``: its ``bwd``. A transform's tape may run another
        rule of the same signature there (the curvature transforms run a loss's ``ggn_vp`` or
        its factor's columns in place of its ``bwd``); the options are those ``bwd`` takes."""
        del op
        return bwd

    # -- what the records give ------------------------------------------------------------

    def parameter_records(self) -> list[Record]:
        """The records that send a cotangent to some parameter leaf."""
        return [r for r in self.records if r.params]

    def gradients(self, params, cotangents: Callable[[Record], tuple] | None = None):
        """The gradient tree (the structure of ``params``): each leaf the sum of the
        cotangents sent to it (transposed where the path says so), zeros where none went.

        ``cotangents(record)`` gives each record's cotangents (default: those its ``t.bwd``
        computed); DP-SGD's book-keeping passes the rule re-run with scaled ``g``.
        """
        sums: dict[Path, Any] = {}
        for rec in self.parameter_records():
            cts = rec.cotangents if cotangents is None else cotangents(rec)
            for i, (name, path, flip) in rec.params.items():
                ct = cts[i].T if flip else cts[i]
                if path in sums and sums[path].shape != ct.shape:
                    raise ValueError(
                        f"params{_keystr(path)}: {rec.op.name}'s {name} sends a gradient of "
                        f"shape {ct.shape} where one of shape {sums[path].shape} went before"
                    )
                sums[path] = ct if path not in sums else _add(sums[path], ct)
        return assemble(params, sums, what="gradient")


def _add(a, b):
    acc = _checks.accum_dtype(jnp.result_type(a))
    return (a.astype(acc) + b.astype(acc)).astype(a.dtype)


def assemble(params, values: Mapping[Path, Any], *, what: str, batch: int | None = None):
    """A tree like ``params`` from ``{path: value}``; zeros where no value (with a leading
    ``batch`` axis when given). A path that names no leaf, or a value of another shape,
    is a ``ValueError`` naming it."""
    values = dict(values)

    def leaf(keys, p):
        path = key_path(keys)
        shape = tuple(jnp.shape(p)) if batch is None else (batch, *jnp.shape(p))
        value = values.pop(path, None)
        if value is None:
            return jnp.zeros(shape, jnp.result_type(p))
        if tuple(value.shape) != shape:
            raise ValueError(
                f"params{_keystr(path)}: the {what} sent there has shape {tuple(value.shape)}, "
                f"expected {shape}"
            )
        return value.astype(jnp.result_type(p))

    tree = jax.tree_util.tree_map_with_path(leaf, params)
    if values:
        bad = ", ".join(f"params{_keystr(p)}" for p in values)
        raise ValueError(f"params: the loop sent a {what} to {bad}, which is not a leaf of params")
    return tree


def _keystr(path: Path) -> str:
    return "".join(f"[{k!r}]" for k in path)


def _places(op, names, cts, params) -> dict[int, tuple[str, Path, bool]]:
    """``{cotangent index: (argument name, leaf path, transposed)}`` for the op's parameter
    arguments (positional arguments of the op that are not per-example)."""
    param_args = [
        i for i, name in enumerate(names)
        if name in op.arg_names and name not in op.per_example_args and cts[i] is not None
    ]  # fmt: skip
    if params is None:
        if param_args:
            missing = tuple(names[i] for i in param_args)
            raise TypeError(
                f"{op.name}: the cotangents of its parameters {missing} need a place: pass "
                "params=path (a tuple of keys, each argument's name appended) or "
                "params={name: path} to t.bwd"
            )
        return {}
    if isinstance(params, Mapping):
        unknown = sorted(set(params) - {names[i] for i in param_args})
        if unknown:
            raise TypeError(
                f"{op.name}: params names {unknown}, which are not parameters with a cotangent "
                f"here; expected some of {[names[i] for i in param_args]}"
            )
        missing = [names[i] for i in param_args if names[i] not in params]
        if missing:
            raise TypeError(
                f"{op.name}: params gives no place for {missing}; map each parameter to a "
                "path, or to None to drop its cotangent (a frozen weight)"
            )
        out = {}
        for i in param_args:
            spec = params[names[i]]
            if spec is None:
                continue  # declared frozen: dropped
            flip = isinstance(spec, Transposed)
            out[i] = (names[i], spec.path if flip else _path(spec), flip)
        return out
    prefix = _path(params)
    return {i: (names[i], (*prefix, names[i]), False) for i in param_args}
