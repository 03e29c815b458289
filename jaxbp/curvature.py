"""Second order from the hand-written rules: Hessian- and GGN-vector products of any model.

Index letters: ``p`` the parameters (a pytree, each leaf its own shape), ``v`` a direction
in parameter space (the same pytree).

:func:`hessian_vector_product` is forward over reverse: ``jax.jvp`` of the model's explicit
reverse loop (:func:`jaxbp.model.value_and_grad_step`) along ``v``. The reverse loop is the
hand-written ``op.fwd``/``op.bwd`` rules, so ``H·v`` is the directional derivative of *that*
gradient: the rules' own arithmetic is what gets differentiated (JAX's forward mode of the
plain-``jax.numpy`` rules; no ``custom_vjp`` dispatch and no ``jax.grad`` runs). A wrong
backward rule gives a wrong ``H·v``, which the tests see against ``jax.hessian`` of the
plain twin.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _step
from ._op import all_rules, forward_mode, rules_of
from ._tape import Tape, rule_arg_names
from .model import check_model, checker, mean_and_seed, value_and_grad_step

__all__ = ["check_direction", "ggn_vector_product", "hessian_vector_product"]


def check_direction(params: Any, v: Any, name: str = "v") -> Any:
    """``v`` as arrays with the structure, shapes and dtypes of ``params``: ``TypeError`` /
    ``ValueError`` naming the leaf otherwise (a direction in parameter space)."""
    want, tree = jax.tree_util.tree_flatten_with_path(params)
    try:
        got = tree.flatten_up_to(v)
    except (ValueError, TypeError) as e:
        raise TypeError(
            f"{name}: expected a pytree of the structure of params ({tree}), got "
            f"{jax.tree.structure(v)}"
        ) from e
    out = []
    for (path, p), leaf in zip(want, got, strict=True):
        where = f"{name}{jax.tree_util.keystr(path)}"
        if leaf is None or not hasattr(leaf, "shape") and not isinstance(leaf, int | float):
            raise TypeError(f"{where}: expected an array of shape {np.shape(p)}, got {leaf!r}")
        leaf = jnp.asarray(leaf)
        if leaf.shape != np.shape(p):
            raise ValueError(
                f"{where}: expected the shape of the parameter {np.shape(p)}, got {leaf.shape}"
            )
        if leaf.dtype != jnp.asarray(p).dtype:
            raise TypeError(
                f"{where}: expected the dtype of the parameter {jnp.asarray(p).dtype}, got "
                f"{leaf.dtype}"
            )
        out.append(leaf)
    return jax.tree.unflatten(tree, out)


def _hvp_core(model, rules, params, v, *batch):
    del rules  # the cache key only

    def grad(p):
        return value_and_grad_step(model, p, batch)[1]

    return jax.jvp(grad, (params,), (v,))[1]


def _with_direction(model: Any) -> Callable:
    """``check(params, *args, **kwargs)``: the last positional argument is ``v``; the rest
    is the model's batch, checked by the model; returns ``(params, v, *batch)``."""
    check = checker(model)

    def checked(params, *args, **kwargs):
        if not args:
            raise TypeError("v: expected the direction after the batch, f(params, *batch, v)")
        *batch, v = args
        params, *batch = check(params, *batch, **kwargs)
        return (params, check_direction(params, v), *batch)

    return checked


def hessian_vector_product(model: Any) -> Callable:
    """``f(params, *batch, v) -> H·v``: the Hessian of the model's mean loss (over valid
    units, as :func:`jaxbp.value_and_grad`) times a direction ``v`` with the structure,
    shapes and dtypes of ``params``; the result has them too.

    For a :class:`jaxbp.MLP`: ``f(params, x (n, i), labels, v, *, where=None,
    class_weights=None)``; for a :class:`jaxbp.GPT`: ``f(params, ids (n, t), targets (n, t),
    v, *, where=None)``; for your own model what its ``check_inputs`` takes, then ``v``.
    Forward over reverse through the hand-written rules (module docstring): about the cost
    of two gradients. ``f.jitted(params, v, *batch)`` is the compiled step.

    Raises:
      TypeError / ValueError: ``v`` of another structure, shape or dtype than ``params``
        (naming the leaf); what :func:`jaxbp.value_and_grad` raises for the batch.
    """
    check_model(model, "hessian_vector_product")
    return _entry(model, _hvp_core, "hessian_vector_product", hessian_vector_product.__doc__)


def _entry(model, core, name, doc) -> Callable:
    """``f(params, *batch, v)``: the direction checked against ``params``, the batch by the
    model; ``f.jitted(params, v, *batch)`` the compiled step (cached per model and rules)."""
    step = _step.compiled(core, model, all_rules())
    return _step.entry(step, _with_direction(model), name, doc)


# ------------------------------------------------------------------ GGN-vector products


def _is_loss(op: Any) -> bool:
    return getattr(op, "ggn_vp", None) is not None


def _to_logits(op: Any) -> frozenset:
    """The arguments on the path ``J`` maps to a loss's logits: its first per-example
    argument (``logits``, ``pred``, the fused head's ``x``) and its parameters (the head's
    ``w``, ``b``); labels, targets, masks and class weights are data, not on the path."""
    params = set(op.arg_names) - set(op.per_example_args)
    return frozenset({op.per_example_args[0], *params})


class _Linearised(Tape):
    """The forward loop, run under ``jax.jvp`` along ``v``: every op's output through its
    forward-mode twin (``op.fwd`` then the hand-written ``op.jvp``: ``J·v`` layer by layer)
    and its residuals from ``op.fwd`` on the primal values, for the reverse loop (XLA
    computes the shared forward once). At each loss op (one with ``op.ggn_vp``) its
    arguments on ``J``'s path are recorded, for their tangents; its output carries none (the
    loss's own curvature enters through ``ggn_vp``, not through ``jvp``)."""

    def __init__(self):
        super().__init__("rules")
        self.inputs: list[tuple] = []

    def fwd(self, op, *args, **options):
        primal = jax.lax.stop_gradient(args)
        out, res = rules_of(op)[0](*primal, **options)
        if _is_loss(op):  # one entry per argument of the forward rule: those on J's path
            names = rule_arg_names(op)
            reach = _to_logits(op)
            padded = args + (None,) * (len(names) - len(args))
            kept = (a if n in reach else None for n, a in zip(names, padded, strict=True))
            self.inputs.append(tuple(kept))
            return out, res
        n = len(op.arg_names)
        names = rule_arg_names(op)
        extra = {k: a for k, a in zip(names[n:], args[n:], strict=False) if a is not None}
        return forward_mode(op)(*args[:n], **extra, **options), res


class _GaussNewton(Tape):
    """The reverse loop for ``Jᵀ·(g·H)·(J·v)``: at the ``k``-th loss op, ``op.ggn_vp(res,
    tangents_k, g)`` in place of ``op.bwd(res, g)``; every other op its ``bwd``."""

    def __init__(self, tangents: list[tuple]):
        super().__init__("rules")
        self.tangents, self.seen = tangents, 0

    def backward_rule(self, op, bwd):
        if not _is_loss(op):
            return bwd
        tangents = self.tangents[self.seen]
        self.seen += 1

        def rule(res, g, **options):
            return op.ggn_vp(res, tangents, g, **options)

        rule.__signature__ = inspect.signature(bwd)  # the options bwd takes
        return rule


def _ggn_core(model, rules, params, v, *batch):
    del rules  # the cache key only

    def forward(p):  # one forward loop: J·v to the losses' inputs, the residuals as aux
        t = _Linearised()
        out = model.forward(t, p, *batch)
        return t.inputs, out

    _, tangents, (losses, valid, state) = jax.jvp(forward, (params,), (v,), has_aux=True)
    if not tangents:
        raise TypeError(
            f"model: ggn_vector_product found no loss op with curvature rules (op.ggn_vp) in "
            f"{type(model).__name__}'s forward loop"
        )
    tangents = [tuple(_no_float0(t) for t in ts) for ts in tangents]
    t = _GaussNewton(tangents)
    _, seed = mean_and_seed(losses, valid)
    model.backward(t, state, seed)
    return t.gradients(params)


def _no_float0(t):
    """``None`` for the tangent of an integer or bool argument (labels, masks): what the
    curvature rules take for an argument that does not reach the logits."""
    if t is None or t.dtype == jax.dtypes.float0:
        return None
    return t


def ggn_vector_product(model: Any) -> Callable:
    """``f(params, *batch, v) -> G·v``: the generalised Gauss–Newton matrix of the model's
    mean loss, ``G = Σ_units Jᵀ·(g·H)·J`` (``J`` the Jacobian of a unit's logits in the
    parameters, ``H`` the loss's Hessian at them, ``g`` the mean's seed ``1/N``), times a
    direction ``v`` with the structure, shapes and dtypes of ``params``.

    Two explicit passes through the rules: one forward loop giving every op's residuals and
    ``J·v`` through its forward-mode twin (``op.fwd`` then the hand-written ``op.jvp``; JAX's
    ``jax.jvp`` only carries tangents through the loop's reshapes and additions), then
    ``g·H·(J·v)`` by the loss op's ``ggn_vp`` and ``Jᵀ·(…)`` by the model's own reverse loop
    over the ``bwd`` rules.
    ``G`` is positive semi-definite where each ``H`` is (every loss here; not the fused
    head with a softcap, whose ``H`` at the pre-softcap logits includes the softcap's
    curvature). Signature as :func:`hessian_vector_product`; ``f.jitted(params, v, *batch)``.

    Raises:
      TypeError / ValueError: ``v`` of another structure, shape or dtype than ``params``
        (naming the leaf); an op in the loop without a jvp rule (naming it); a model whose
        loop has no loss op with curvature rules.
    """
    check_model(model, "ggn_vector_product")
    return _entry(model, _ggn_core, "ggn_vector_product", ggn_vector_product.__doc__)
