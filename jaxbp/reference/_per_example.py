"""Reference per-example transforms: ``jax.vmap(jax.grad)`` of each example's own loss.

Index letters::

    n  examples         i  input features of a layer      o  output features of a layer
    t  tokens of one sequence

The per-example gradients are materialised (``w (n, i, o)``, ``b (n, o)``, …) and norms,
clipping and noise are computed from them here:

* :class:`jaxbp.MLP`: ``vmap`` over rows of ``grad`` of the plain-jnp network's loss of one
  row (:mod:`jaxbp.reference._nn`);
* :class:`jaxbp.GPT`: ``vmap`` over sequences of ``grad`` of the plain twin's mean loss on
  one sequence (:mod:`jaxbp.reference._gpt`);
* any other model (and a GPT with dropout, whose masks are drawn for the whole batch):
  ``jax.jacrev`` of the vector of the examples' own mean losses, its forward loop run
  through the ops' plain twins (``Tape("reference")``).

Only validation is shared with :mod:`jaxbp.per_example` (options, key, inputs).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .. import _checks, _step
from .._tape import Tape
from ..gpt import GPT
from ..model import check_model, checker, reference_loss
from ..nn import MLP
from ..per_example import _check_key, check_clip_options
from ._gpt import gpt_mean_loss
from ._nn import mean_loss, per_example_loss, valid

__all__ = ["per_example_grads", "per_example_grad_norms", "clipped_grad"]


def _wide(g):
    return g.astype(_checks.accum_dtype(g.dtype))


def _mlp_grads(model, params, x, labels, where=None, class_weights=None):
    def loss_one(p, xk, yk):
        return per_example_loss(model, p, xk[None], yk[None], class_weights)[0]

    grads = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, x, labels)
    return grads, valid(model, labels, where, x.shape[0])


def _gpt_grads(model, params, ids, targets, where=None, key=None):
    del key  # no dropout here (a GPT with dropout takes _tape_grads: the batch's own masks)

    def loss_one(p, ids_k, targets_k, where_k):
        wk = None if where_k is None else where_k[None]
        return gpt_mean_loss(model, p, ids_k[None], targets_k[None], wk)

    axes = (None, 0, 0, None if where is None else 0)
    grads = jax.vmap(jax.grad(loss_one), in_axes=axes)(params, ids, targets, where)
    keep = jnp.ones(ids.shape[:1], bool) if where is None else jnp.any(where, axis=1)
    return grads, keep


def _tape_grads(model, params, *batch):
    def means(p):
        losses, ok, _ = model.forward(Tape("reference"), p, *batch)
        axes = tuple(range(1, losses.ndim))
        count = jnp.maximum(jnp.sum(ok, axis=axes), 1).astype(losses.dtype)
        return jnp.sum(jnp.where(ok, losses, 0.0), axis=axes) / count, ok

    grads, ok = jax.jacrev(means, has_aux=True)(params)
    return grads, jnp.any(ok.reshape(ok.shape[0], -1), axis=1)


def _grads(model, params, *batch):
    """``(grads, keep)``: every example's own gradient, a leading ``n`` on every leaf, 0 for
    examples that do not count (``keep (n,)`` False)."""
    if isinstance(model, MLP):
        grads, keep = _mlp_grads(model, params, *batch)
    elif isinstance(model, GPT) and model.dropout == 0.0:
        grads, keep = _gpt_grads(model, params, *batch)
    else:
        grads, keep = _tape_grads(model, params, *batch)

    def mask(g):
        return jnp.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)), g, jnp.zeros_like(g))

    return jax.tree.map(mask, grads), keep


def _mean(model, params, *batch):
    if isinstance(model, MLP):
        return mean_loss(model, params, *batch)
    if isinstance(model, GPT):
        return gpt_mean_loss(model, params, *batch)
    return reference_loss(model, params, *batch)


def _norms(grads):
    """``‖g_k‖₂ (n,)`` over every leaf, in float32 for half precision."""
    total = 0.0
    for g in jax.tree.leaves(grads):
        flat = _wide(g).reshape(g.shape[0], -1)
        total = total + jnp.sum(flat * flat, axis=1)
    return jnp.sqrt(total)


def _grads_core(model, params, *batch):
    return _grads(model, params, *batch)[0]


def _norms_core(model, params, *batch):
    return _norms(_grads(model, params, *batch)[0])


def _entry(model, core, name, doc):
    check_model(model, f"reference.{name}")
    return _step.entry(_step.compiled(core, model), checker(model), name, doc)


def per_example_grads(model) -> Callable:
    """Reference: ``jax.vmap(jax.grad)`` of each example's own loss in plain jnp, 0 for an
    example with nothing valid (module docstring).

    Same call signature and result as :func:`jaxbp.per_example_grads`.
    """
    return _entry(model, _grads_core, "per_example_grads", per_example_grads.__doc__)


def per_example_grad_norms(model) -> Callable:
    """Reference: the L2 norms ``(n,)`` of the materialised ``vmap(grad)`` gradients."""
    return _entry(model, _norms_core, "per_example_grad_norms", per_example_grad_norms.__doc__)


def _clipped_core(model, batch_size, l2_clip, noise_multiplier, return_loss, params, *args):
    *batch, key = args
    noisy = noise_multiplier > 0.0
    grads, keep = _grads(model, params, *batch)
    norms = _norms(grads)  # ‖g_k‖ (n,)
    clip = jnp.asarray(l2_clip).astype(norms.dtype)
    # min(1, C/‖g_k‖), written so that ‖g_k‖ = 0 never divides
    scale = jnp.minimum(1.0, clip / jnp.maximum(norms, clip))
    if batch_size is None:
        m = jnp.maximum(jnp.sum(keep), 1).astype(norms.dtype)
    else:
        m = jnp.asarray(batch_size, norms.dtype)
    leaves, treedef = jax.tree.flatten(grads)
    keys = jax.random.split(key, len(leaves)) if noisy else [None] * len(leaves)
    out = []
    for g, k in zip(leaves, keys, strict=True):
        wide = _wide(g)
        s = jnp.sum(scale.astype(wide.dtype).reshape((-1,) + (1,) * (g.ndim - 1)) * wide, 0)
        if noisy:  # one subkey per leaf, in leaf order, N(0, (σ·C)²) in the wide dtype
            std = jnp.asarray(noise_multiplier).astype(wide.dtype) * clip.astype(wide.dtype)
            s = s + jax.random.normal(k, s.shape, wide.dtype) * std
        out.append((s / m.astype(wide.dtype)).astype(g.dtype))
    grads = jax.tree.unflatten(treedef, out)
    if return_loss:
        return _mean(model, params, *batch), grads, norms
    return grads, norms


def clipped_grad(
    model, *, l2_clip, noise_multiplier=0.0, batch_size=None, return_loss=False
) -> Callable:
    """Reference DP-SGD: materialise ``vmap(grad)``, clip each row, sum, add noise, divide.

    Same signature, result and noise draws as :func:`jaxbp.clipped_grad`:
    ``f(params, *batch, key=None) -> (grads, norms)`` (``(loss, grads, norms)`` with
    ``return_loss``); ``f.jitted(params, *batch, key)``.
    """
    check_model(model, "reference.clipped_grad")
    l2_clip, noise_multiplier = check_clip_options(
        l2_clip, noise_multiplier, batch_size, "bookkeeping"
    )
    step = _step.compiled(
        _clipped_core, model, batch_size, l2_clip, noise_multiplier, bool(return_loss)
    )
    check_batch = checker(model)

    def check(params, *args, key=None, **kwargs):
        _check_key(key, noise_multiplier)
        return (*check_batch(params, *args, **kwargs), key if noise_multiplier > 0.0 else None)

    return _step.entry(step, check, "clipped_grad", clipped_grad.__doc__)
