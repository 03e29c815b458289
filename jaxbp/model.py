"""Models as explicit loops over the rules: the interface every transform asks for.

A model is any hashable object (a frozen dataclass is the easy way: it is the cache key of
the compiled steps) with two methods, each an explicit loop over the ops' rules called
through a :class:`jaxbp.Tape` ``t``::

    forward(t, params, *batch) -> (losses, valid, state)
    backward(t, state, seed) -> None

* ``forward`` runs the ops' forward rules (``t.fwd(op, *args)`` → ``(out, res)``) and
  returns the per-unit losses ``(n, ...)`` with the *examples on the leading axis* (``(n,)``
  for an MLP, ``(n, t)`` tokens for a GPT), ``valid`` (bool, the same shape: the units that
  count) and whatever ``backward`` needs (the residuals);
* ``backward`` walks back through the matching backward rules (``t.bwd(op, res, g,
  params=path)`` → the cotangents of the op's per-example arguments), starting from
  ``seed`` (the shape of ``losses``: ``∂L/∂loss``) at the loss op, adding the gradients of
  a residual connection's two paths, and sending each parameter's cotangent to its leaf
  with ``params=`` (:mod:`jaxbp._tape`). It returns nothing: the tape holds what it sent.

Optionally ``check_inputs(params, *args, **kwargs) -> (params, *batch)``: validate and
convert the inputs (clear errors before tracing) and return the step's arguments
positionally; without it the transforms take ``f(params, *batch)`` as given. And
optionally ``batch_axes``: one entry per argument of the batch, ``0`` where its leading axis
holds the examples, ``None`` where it is the same for every example (an MLP's
``class_weights``); without it every argument is per example. The mesh transforms
(:mod:`jaxbp.parallel`) split the first kind over the data axis and copy the second.

Every transform is written once against this interface and never looks at a model's
type (:class:`jaxbp.MLP` and :class:`jaxbp.GPT` implement it like any model):

* :func:`value_and_grad` seeds each valid unit with ``1/n_valid`` (the mean over valid
  units) and sums the parameter cotangents;
* :func:`jaxbp.per_example_grads`, :func:`~jaxbp.per_example_grad_norms` and
  :func:`~jaxbp.clipped_grad` seed each example's units with ``1/n_valid(k)``, so that the
  per-example gradient is that of the example's own mean loss (what ``value_and_grad``
  gives on a batch of that example alone), and ask each op for its per-example rule;
* :func:`jaxbp.parallel.value_and_grad` and :func:`jaxbp.parallel.clipped_grad` run the
  same on each device of a mesh, on its rows, with the counts and sums over the data axis
  (:func:`value_and_grad_step`, :func:`jaxbp.per_example.clip_step` with a ``Reduce``);
* :func:`jaxbp.compare` checks the result against ``jax.grad`` of the same forward loop
  run through the ops' plain twins (``Tape("reference")``), or of the model's own
  independent twin where it has one, and against finite differences.

See docs/models.md for a worked model of your own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks, _step
from ._op import all_rules
from ._tape import Tape
from ._vma import LOCAL, Reduce

__all__ = [
    "INTERFACE", "batch_axes", "check_model", "checker", "entry", "example_seed",
    "examples_valid", "mean_and_seed", "reference_loss", "run", "sum_over", "value_and_grad",
    "value_and_grad_step",
]  # fmt: skip

INTERFACE = ("forward", "backward")


def check_model(model: Any, what: str = "value_and_grad") -> None:
    """``TypeError`` naming what ``model`` lacks of the interface (module docstring)."""
    missing = [m for m in INTERFACE if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(
            f"model: {what} needs a model with forward(t, params, *batch) -> (losses, valid, "
            f"state) and backward(t, state, seed) (see jaxbp.model and docs/models.md); "
            f"{type(model).__name__} has no {' or '.join(missing)}"
        )
    try:
        hash(model)
    except TypeError:
        raise TypeError(
            f"model: expected a hashable model (e.g. a frozen dataclass: it keys the compiled "
            f"steps), got an unhashable {type(model).__name__}"
        ) from None


def checker(model: Any) -> Callable:
    """``check(params, *args, **kwargs) -> (params, *batch)``: the model's own
    ``check_inputs``, or the arguments as given."""
    check = getattr(model, "check_inputs", None)
    if check is not None:
        return check

    def as_given(params, *batch):
        return (params, *batch)

    return as_given


def batch_axes(model: Any, batch) -> tuple:
    """``model.batch_axes`` (module docstring) for the arguments of ``batch`` (those left off
    at the end need no entry), or ``0`` for every one; ``TypeError`` naming what is wrong
    with a declared one."""
    declared = getattr(model, "batch_axes", None)
    if declared is None:
        return (0,) * len(batch)
    axes = tuple(declared) if isinstance(declared, tuple | list) else ()
    if len(axes) < len(batch) or any(
        a is not None and (isinstance(a, bool) or a != 0) for a in axes
    ):  # fmt: skip
        raise TypeError(
            f"batch_axes: expected a tuple of one entry per argument of the batch ({len(batch)} "
            f"here), each 0 (the examples on its leading axis) or None (the same for every "
            f"example), got {declared!r} on {type(model).__name__}"
        )
    return axes[: len(batch)]


def _count(valid, axes):
    return jnp.maximum(jnp.sum(valid, axis=axes), 1)


def mean_and_seed(losses: jax.Array, valid: jax.Array, red: Reduce = LOCAL):
    """The mean loss over valid units and its seed ``∂mean/∂loss = valid/n_valid``.

    ``red`` sums the loss and the count over a mesh's data axis (``psum``: one scalar each),
    so that on each device's rows the seed is that of the mean over the whole batch."""
    count = jnp.maximum(red.sum(jnp.sum(valid)), 1).astype(losses.dtype)
    mean = red.sum(jnp.sum(jnp.where(valid, losses, 0.0))) / count
    return mean, jnp.where(valid, 1.0 / count, 0.0).astype(losses.dtype)


def sum_over(red: Reduce, tree):
    """Every leaf of ``tree`` summed over ``red``'s axis in its accumulation dtype (one
    ``psum`` per leaf: the data-parallel all-reduce of the gradients); as it is on one
    device."""
    if red.axis is None:
        return tree

    def one(g):
        return red.sum(g.astype(_checks.accum_dtype(g.dtype))).astype(g.dtype)

    return jax.tree.map(one, tree)


def example_seed(losses: jax.Array, valid: jax.Array) -> jax.Array:
    """Each example's own mean: ``valid/n_valid(k)`` on example ``k``'s units (the leading
    axis), so a backward from it gives every example's gradient of its own mean loss."""
    axes = tuple(range(1, losses.ndim))
    count = _count(valid, axes).astype(losses.dtype).reshape((-1,) + (1,) * len(axes))
    return jnp.where(valid, 1.0 / count, 0.0).astype(losses.dtype)


def examples_valid(valid: jax.Array) -> jax.Array:
    """``(n,)``: examples with at least one unit that counts."""
    return jnp.any(valid.reshape(valid.shape[0], -1), axis=1)


def run(model: Any, params, batch, seed_of: Callable) -> tuple[Tape, Any, Any, Any]:
    """Forward and backward through a fresh tape: ``(tape, losses, valid, seed)``."""
    t = Tape()
    losses, valid, state = model.forward(t, params, *batch)
    seed = seed_of(losses, valid)
    model.backward(t, state, seed)
    return t, losses, valid, seed


def reference_loss(model: Any, params, *batch, mode: str = "reference") -> jax.Array:
    """The model's mean loss with its forward loop run through the ops' plain twins
    (``mode="reference"``) or through the ops themselves (``"custom_vjp"``): differentiable
    with ``jax.grad``, the oracle of a model without a twin of its own."""
    losses, valid, _ = model.forward(Tape(mode), params, *batch)
    return mean_and_seed(losses, valid)[0]


def value_and_grad_step(model: Any, params, batch, red: Reduce = LOCAL):
    """``(mean loss, grads)`` from the model's loops, seeded with ``valid/n_valid``; with a
    mesh's data axis in ``red``, the count, the loss and the gradients summed over it (each
    device its own rows: the mean over the whole batch however unevenly it is masked)."""
    t = Tape()
    losses, valid, state = model.forward(t, params, *batch)
    mean, seed = mean_and_seed(losses, valid, red)
    model.backward(t, state, seed)
    return mean, sum_over(red, t.gradients(params))


def _value_and_grad_core(model, rules, params, *batch):
    del rules  # the cache key only: the tape reads the rules from the ops when traced
    return value_and_grad_step(model, params, batch)


def entry(model, core, name, doc, *config):
    """``f = checks + f.jitted`` (:mod:`jaxbp._step`) for a transform of any model: the
    compiled step is cached per model, configuration and the rules every op holds."""
    step = _step.compiled(core, model, all_rules(), *config)
    return _step.entry(step, checker(model), name, doc)


def value_and_grad(model: Any) -> Callable:
    """The hand-written ``value_and_grad`` of a model: ``f(params, *batch) -> (mean loss,
    grads)``.

    For a :class:`jaxbp.MLP`: ``f(params, x (n, i), labels (n,) or (n, c), *, where=None,
    class_weights=None)``; for a :class:`jaxbp.GPT`: ``f(params, ids (n, t), targets (n, t),
    *, where=None)``; for your own model: what its ``check_inputs`` takes.

    The mean is over valid units (rows, tokens); if none is valid the loss and every
    gradient are 0 (PyTorch returns NaN there; a step that does nothing is kinder). The
    gradients come from the model's explicit reverse loop over the hand-written ``_bwd``
    rules (no ``jax.grad``, ``jax.vjp`` or ``custom_vjp`` dispatch inside); ``grads`` has the
    structure of ``params``, so optax takes it as it is. Inputs are validated with clear
    errors first, then ``f.jitted(params, *batch)`` runs, the compiled step
    (:mod:`jaxbp._step`), which takes every argument positionally (``None`` for an absent
    one).
    """
    check_model(model)
    return entry(model, _value_and_grad_core, "value_and_grad", value_and_grad.__doc__)
