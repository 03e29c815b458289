"""The one contract, as code: an op carries its rules; a ``jax.custom_vjp`` reads them from it.

``fwd(*args, **options) -> (out, res)``, ``bwd(res, g, **options) -> cotangents`` and
``jvp(res, tangents, **options) -> tangent`` are the hand-written rules. ``op_fwd`` takes
exactly the op's positional arguments in the op's order (array options such as ``where`` may
follow), and ``op_bwd`` returns one cotangent per positional argument of ``op_fwd``, in that
order (``None`` for integer labels and masks);
``op_jvp`` takes ``fwd``'s residuals and one tangent per positional argument of ``op_fwd``
(the same convention: ``None`` for integer and bool arguments and absent ones, an array of
the argument's shape and dtype for every floating one) and returns the output's tangent, of
the output's shape and dtype; it is linear in the tangents, in plain ``jax.numpy``.
Arrays (labels, masks, class weights) are always ordinary positional arguments, never
``nondiff_argnums`` (jax#20889).

Every op, built in or built with :class:`Op`, carries the same attributes, bound once at
import (nothing looks a rule up by its name):

========================  ==================================================================
``op.fwd``, ``op.bwd``    the hand-written rules (jitted)
``op.jvp``                the hand-written forward-mode rule (jitted), or ``None``
``op.reference``          the plain-``jax.numpy`` twin (the built-in ops get theirs bound in
                          ``jaxbp/__init__.py``, after :mod:`jaxbp.reference` is imported)
``op.per_example_args``   the positional parameters that carry the batch (``x``, ``logits``)
``op.example_ndim``       trailing axes per example of the first of them (1 unless declared)
``op.arg_names``          the positional parameter names, in order
``op.name``               the name JAX shows in jaxprs (``{name}_fwd``, ``_bwd``, ``_jvp``)
``op.traced_options``     keyword options passed to the rules as traced values
``op.example_grads``      the per-example rule of an op with parameters (``None`` without):
                          ``example_grads(res, g, *, examples, **options)`` → ``{parameter
                          name: contribution}``, each example's gradient of each parameter
                          from the residuals and ``g`` (:mod:`jaxbp._contrib`)
``op.ggn_vp``,            a loss's curvature rules (``None`` on every other op), at its
``op.hessian_factor``,    logits ``z``: ``ggn_vp(res, tangents, g)`` → ``Jᵀ·(g·H)·J·ṫ``;
``op.logits_bwd``,        ``hessian_factor(res, g)`` → ``S (n…, c, k)``, ``S·Sᵀ = g·H``;
``op.sample_bwd``,        ``logits_bwd(res, dz)`` → ``Jᵀ·dz``; ``sample_bwd(res, g, key)`` →
``op.sample_logits``      ``Jᵀ·s`` for one Monte-Carlo column ``s``, ``E[s·sᵀ] = g·H``;
                          ``sample_logits(res, g, key)`` → that column ``s (n…, c)`` itself
                          (a loss with parameters: KFAC's output factor needs it)
                          (:mod:`jaxbp._losscurv`, :data:`CURVATURE_RULES`)
========================  ==================================================================

Forward mode. The public op is a ``jax.custom_vjp`` (``jax.grad`` runs ``op.bwd``), and JAX
has no forward mode through one (docs/forward_mode.md has the evidence that no public JAX
design gives both). :func:`forward_mode` builds the op's forward-mode twin from the same op
object: the same call, validation included, through a ``jax.custom_jvp`` whose rule runs
``op.fwd`` then ``op.jvp`` (``jax.jvp``, ``jacfwd``, ``linearize``, ``hessian`` run the
hand-written jvp; ``jax.grad`` of the twin transposes it). They are :mod:`jaxbp.forward_mode`.

Everything that runs the rules (``jax.grad`` through the ``custom_vjp``, the explicit loops
of :mod:`jaxbp.nn`, :mod:`jaxbp.gpt` and :mod:`jaxbp.per_example`, :func:`jaxbp.jacobian`,
:func:`jaxbp.check`, the tests, the benchmarks) takes them from these attributes, when it is
traced. Swapping one (``monkeypatch.setattr(jaxbp.relu, "bwd", wrong)``) is seen by the next
trace; the compiled steps of the explicit loops are cached per model *and* per the rules
their ops hold (:func:`rules`), so a swapped rule is traced anew, and swapping it back finds
the old compile again.

Options: a keyword option in ``op.traced_options`` (a float that only scales values, such as
``label_smoothing``, ``z_loss``, ``negative_slope``, ``eps``) reaches the rules as a traced
value, so a new value compiles nothing new (the rules do not differentiate it: a gradient
through it is NaN, never a silent 0); every other option (``axis``, ``ignore_index``,
``strategy``, ``causal``, ``softcap``, ``chunk_size``: they change shapes or control flow) is
static and hashable, and travels to the rules as one ``nondiff_argnums`` tuple.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _contract
from ._autodiff import by_jvp, by_vjp

__all__ = [
    "CURVATURE_RULES", "OP_ATTRIBUTES", "all_rules", "bind_references", "bwd_options",
    "curvature_of", "custom_vjp_op", "declare", "declare_op", "forward_mode", "jvp_rule",
    "op_vjp", "positional_names", "rules", "rules_of",
]  # fmt: skip

# A loss's curvature rules, in this order (None on an op without them).
CURVATURE_RULES = ("ggn_vp", "hessian_factor", "logits_bwd", "sample_bwd", "sample_logits")

# What every op carries (tests/test_op.py checks the built-in ops and Op instances alike).
OP_ATTRIBUTES = (
    "name", "fwd", "bwd", "jvp", "reference", "per_example_args", "example_ndim", "arg_names",
    "traced_options", "example_grads", *CURVATURE_RULES,
)  # fmt: skip


def positional_names(fn: Callable) -> tuple[str, ...]:
    """The names of ``fn``'s positional parameters, in order."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds)


def rules_of(op: Any) -> tuple[Callable, Callable]:
    """``(op.fwd, op.bwd)``; ``TypeError`` for anything that carries no rules."""
    fwd, bwd = getattr(op, "fwd", None), getattr(op, "bwd", None)
    if not (callable(fwd) and callable(bwd)):
        raise TypeError(
            f"op: expected a jaxbp op (carrying .fwd and .bwd rules) or a jaxbp.Op, got {op!r}"
        )
    return fwd, bwd


def bwd_options(bwd: Callable, options: dict) -> dict:
    """The options ``bwd`` takes: array options (``where``, ``class_weights``) live in the
    residuals, so only the keyword options (``axis``, ``label_smoothing``, ...) go to ``bwd``."""
    params = inspect.signature(bwd).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


def rules(*ops: Any) -> tuple[Callable, ...]:
    """The rules ``ops`` hold now, ``(fwd₁, bwd₁, example_grads₁, jvp₁, ggn_vp₁, …, fwd₂,
    …)``: hashable, part of the cache key of every compiled explicit loop, so that a swapped
    rule is traced anew."""
    return tuple(
        r for op in ops
        for r in (*rules_of(op), getattr(op, "example_grads", None), getattr(op, "jvp", None),
                  *curvature_of(op))
    )  # fmt: skip


def curvature_of(op: Any) -> tuple[Callable | None, ...]:
    """``op``'s curvature rules in the order of :data:`CURVATURE_RULES` (``None`` for each it
    does not carry)."""
    return tuple(getattr(op, name, None) for name in CURVATURE_RULES)


# Every op there is: the built-in ones (declared at import) and each live jaxbp.Op, in the
# order they were made. A model's loop may call any of them: the compiled steps of the
# transforms are keyed by all their rules (all_rules).
_DECLARED: list[Any] = []
_USER_OPS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_user_count = itertools.count()


def all_rules() -> tuple[Callable, ...]:
    """:func:`rules` of every op, built-in and live :class:`Op`: the cache key of a
    transform's compiled step for any model (a swapped rule anywhere is traced anew)."""
    return rules(*_DECLARED, *_USER_OPS.values())


def op_vjp(op: Any, *, traced: Sequence[str] | None = None, primal: Callable | None = None):
    """Return ``call(*args, **options)``: a ``jax.custom_vjp`` running ``op``'s rules.

    ``op.fwd``/``op.bwd`` are read each time JAX traces it (a swapped rule is used by the
    next trace). The keyword ``options`` reach ``fwd`` and ``bwd`` as keywords: those named
    in ``traced`` (default ``op.traced_options``) as traced values, saved for the backward
    with the residuals; the others static (hashable). Under ``jax.grad``/``jax.vjp`` JAX calls
    ``fwd`` and then ``bwd``; without differentiation it calls ``fwd`` and keeps only the
    output (XLA drops the unused residuals under ``jit``).

    Inside a user's ``shard_map`` (``check_vma=True``), each cotangent gets its argument's
    varying-axes type: ``psum`` over the axes it varies along beyond its argument's (what
    JAX's autodiff does for the implicit ``pvary``), see :mod:`jaxbp._vma`. ``bwd`` itself
    stays the plain rule: called directly, it returns the per-device cotangents.

    ``primal(*args, **options)``, when given, computes the output when no gradient is asked
    for (the fused loss computes its loss alone there, whatever its strategy).

    The same call runs the op's forward-mode twin (:func:`forward_mode`) instead, a
    ``jax.custom_jvp`` of ``op.fwd`` and ``op.jvp``, when that twin is what was called.
    """
    traced = tuple(getattr(op, "traced_options", ()) if traced is None else traced)
    described = (getattr(op, "name", "op"), tuple(getattr(op, "arg_names", ())))
    vjp_call = by_vjp(lambda: rules_of(op), traced, primal, described)
    jvp_call = by_jvp(
        lambda: (rules_of(op)[0], jvp_rule(op)), traced, primal, described,
        zeros_as_none=getattr(op, "jvp_takes_none", False),
    )  # fmt: skip

    def call(*args, **options):
        return (jvp_call if _FORWARD.get() is op else vjp_call)(*args, **options)

    return call


# The op whose forward-mode twin is running (set by the twin around its call of the op).
_FORWARD: contextvars.ContextVar = contextvars.ContextVar("jaxbp_forward_mode", default=None)


def jvp_rule(op: Any) -> Callable:
    """``op.jvp``; ``TypeError`` naming the op when it has none (what every forward-mode
    path meets first: the twin, ``jaxbp.jacobian(..., mode="fwd")``, the transforms)."""
    jvp = getattr(op, "jvp", None)
    if not callable(jvp):
        raise TypeError(
            f"{getattr(op, 'name', op)}: has no forward-mode rule (op.jvp is None); give it "
            "one (declare(..., jvp=...), jaxbp.Op(..., jvp=...)) or use its plain twin "
            "op.reference for jax.jvp"
        )
    return jvp


def forward_mode(op: Any) -> Callable:
    """The forward-mode twin of ``op``: the same call (arguments, options, validation), run
    through a ``jax.custom_jvp`` whose rule is ``op.fwd`` then ``op.jvp(res, tangents)``.

    ``jax.jvp``, ``jax.jacfwd``, ``jax.linearize`` and ``jax.hessian`` through it run the
    hand-written ``op.jvp`` (and JAX's derivatives of ``op.fwd``/``op.jvp`` for a second
    order); ``jax.grad`` through it runs JAX's transpose of ``op.jvp``, not ``op.bwd`` (the
    op itself is the one whose ``jax.grad`` runs ``op.bwd``). Integer and bool arguments
    get ``float0`` tangents, as ``jax.jvp`` gives them; a tangent through a traced option
    (``label_smoothing``) makes the output's tangent NaN, as the op's gradient through it.
    ``TypeError`` naming the op when it has no jvp rule.
    """
    rules_of(op)

    @functools.wraps(op, updated=())  # name, doc, signature; not a snapshot of op's rules
    def twin(*args, **options):
        jvp_rule(op)
        token = _FORWARD.set(op)
        try:
            return op(*args, **options)
        finally:
            _FORWARD.reset(token)

    twin.op = op
    return twin


def custom_vjp_op(fwd: Callable, bwd: Callable) -> Callable:
    """Return ``op(options, *args)``: a custom_vjp whose backward is ``bwd``.

    ``options`` is a tuple of ``(name, value)`` pairs passed to ``fwd`` and ``bwd`` as
    keywords (static). The low-level builder for rules that are not bound to an op object;
    jaxbp's own ops use :func:`op_vjp`, which reads the rules from the op.
    """
    call = by_vjp(lambda: (fwd, bwd), ())

    def op(options, *args):
        return call(*args, **dict(options))

    return op


def _check_per_example(name: str, names: tuple[str, ...], per_example: tuple[str, ...]) -> None:
    unknown = [n for n in per_example if n not in names]
    if unknown or not per_example:
        raise ValueError(
            f"per_example: expected a non-empty tuple of {name}'s positional parameters "
            f"{names}, got {per_example}"
        )


def _check_example_ndim(example_ndim: Any) -> int:
    if not isinstance(example_ndim, int) or isinstance(example_ndim, bool) or example_ndim < 0:
        raise ValueError(f"example_ndim: expected an int ≥ 0, got {example_ndim!r}")
    return example_ndim


def declare(
    *,
    fwd: Callable,
    bwd: Callable,
    per_example: Sequence[str],
    example_ndim: int = 1,
    traced: Sequence[str] = (),
    example_grads: Callable | None = None,
    jvp: Callable | None = None,
    curvature: Mapping[str, Callable] | None = None,
    jvp_takes_none: bool = True,
) -> Callable:
    """Decorator of a built-in op: bind its rules and its signature's meaning to it.

    ``per_example`` names the positional parameters that carry the batch, one row per
    example (``x``, ``z``, ``logits``, ``labels``, ``target``); every other positional
    parameter is a parameter shared by all examples (a weight ``(i, o)``, a bias ``(o,)``),
    whatever its shape happens to be. The first per-example parameter has shape
    ``(n..., k...)`` with ``example_ndim`` trailing axes ``k...`` per example (default 1:
    ``(n..., k)``; 0 for integer ids ``(n...)``; 3 for attention's ``(n..., h, t, e)``): its
    leading axes are the batch. ``traced`` names the options the rules take as traced
    values; ``example_grads`` is the per-example rule of an op with parameters; ``jvp`` its
    forward-mode rule (``op.jvp``, ``None`` without), which takes ``None`` for the tangent of
    an argument that has none (a symbolic zero: no product with zeros is compiled) unless
    ``jvp_takes_none=False`` (then zeros of the argument's shape, as a user's
    :class:`jaxbp.Op` gets them); ``curvature`` maps some of
    :data:`CURVATURE_RULES` to a loss's curvature rules. Sets the
    attributes of :data:`OP_ATTRIBUTES` (``reference`` is ``None`` until
    ``jaxbp/__init__.py`` binds it)::

        @declare(fwd=dense_fwd, bwd=dense_bwd, per_example=("x",))
        def dense(x, w, b=None): ...
    """
    per_example = tuple(per_example)
    example_ndim = _check_example_ndim(example_ndim)
    for what, fn in (("fwd", fwd), ("bwd", bwd)):
        if not callable(fn):
            raise TypeError(f"{what}: expected a callable rule, got {fn!r}")
    if jvp is not None and not callable(jvp):
        raise TypeError(f"jvp: expected a callable rule or None, got {jvp!r}")
    curvature = _contract.check_curvature(curvature, CURVATURE_RULES)

    def decorate(op: Callable) -> Callable:
        names = positional_names(op)
        _check_per_example(op.__name__, names, per_example)
        op.name = op.__name__
        op.fwd, op.bwd, op.jvp = fwd, bwd, jvp
        op.jvp_takes_none = jvp_takes_none
        op.reference = None
        op.per_example_args = per_example
        op.example_ndim = example_ndim
        op.arg_names = names
        op.traced_options = tuple(traced)
        op.example_grads = example_grads
        for name in CURVATURE_RULES:
            setattr(op, name, curvature.get(name))
        _DECLARED.append(op)
        return op

    return decorate


def declare_op(
    *,
    per_example: Sequence[str],
    fwd: Callable | None = None,
    bwd: Callable | None = None,
    example_ndim: int = 1,
) -> Callable:
    """Deprecated: use :func:`declare` (or build the op with :class:`jaxbp.Op`).

    The same declaration; the rules are now required (they are bound to the op, never found
    by name beside it)."""
    warnings.warn(
        "jaxbp._op.declare_op is deprecated: use jaxbp._op.declare(fwd=..., bwd=..., "
        "per_example=...) or build the op with jaxbp.Op",
        DeprecationWarning,
        stacklevel=2,
    )
    if fwd is None or bwd is None:
        raise TypeError("declare_op: give both fwd and bwd (rules are bound to the op)")
    return declare(fwd=fwd, bwd=bwd, per_example=per_example, example_ndim=example_ndim)


def bind_references(pairs: Sequence[tuple[Any, Callable]]) -> None:
    """``op.reference = ref`` for each ``(op, ref)``: the built-in ops' plain twins, bound once
    by ``jaxbp/__init__.py`` (the reference package imports after the rules)."""
    for op, ref in pairs:
        op.reference = ref
