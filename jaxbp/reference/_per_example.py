"""Reference per-example transforms: ``jax.vmap(jax.grad)`` of each example's own loss.

Index letters::

    n  batch            i  input features of a layer      o  output features of a layer

The per-example gradients are materialised (``w (n, i, o)``, ``b (n, o)``) from the plain-jnp
network of :mod:`jaxbp.reference._nn`; norms, clipping and noise are computed from them here.
Only validation is shared with :mod:`jaxbp.per_example` (options, key, inputs).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .. import _checks, _step
from ..per_example import _check_key, check_clip_options
from ._nn import _check_model, mean_loss, per_example_loss, valid

__all__ = ["per_example_grads", "per_example_grad_norms", "clipped_grad"]


def _wide(g):
    return g.astype(_checks.accum_dtype(g.dtype))


def _grads(model, params, x, labels, where, class_weights):
    """``(grads, valid)``: ``vmap(grad(ℓ_k))`` with a leading ``n`` on every leaf, 0 on rows
    that do not count."""

    def loss_one(p, xk, yk):
        return per_example_loss(model, p, xk[None], yk[None], class_weights)[0]

    grads = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, x, labels)
    keep = valid(model, labels, where, x.shape[0])

    def mask(g):
        return jnp.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)), g, jnp.zeros_like(g))

    return jax.tree.map(mask, grads), keep


def _norms(grads):
    """``‖g_k‖₂ (n,)`` over every leaf, in float32 for half precision."""
    total = 0.0
    for g in jax.tree.leaves(grads):
        flat = _wide(g).reshape(g.shape[0], -1)
        total = total + jnp.sum(flat * flat, axis=1)
    return jnp.sqrt(total)


def _grads_core(model, params, x, labels, where, class_weights):
    return _grads(model, params, x, labels, where, class_weights)[0]


def _norms_core(model, params, x, labels, where, class_weights):
    return _norms(_grads(model, params, x, labels, where, class_weights)[0])


def _entry(model, core, name, doc):
    _check_model(model)
    step = _step.compiled(core, model)

    def check(params, x, labels, *, where=None, class_weights=None):
        return model.check_inputs(params, x, labels, where, class_weights)

    return _step.entry(step, check, name, doc)


def per_example_grads(model) -> Callable:
    """Reference: ``jax.vmap(jax.grad(ℓ_k))`` of the plain-jnp network, 0 on masked rows.

    Same call signature and result as :func:`jaxbp.per_example_grads`: ``w (n, i, o)``,
    ``b (n, o)`` per layer.
    """
    return _entry(model, _grads_core, "per_example_grads", per_example_grads.__doc__)


def per_example_grad_norms(model) -> Callable:
    """Reference: the L2 norms ``(n,)`` of the materialised ``vmap(grad)`` gradients."""
    return _entry(model, _norms_core, "per_example_grad_norms", per_example_grad_norms.__doc__)


def _clipped_core(
    model, batch_size, l2_clip, noise_multiplier, return_loss, params, x, labels, key, where,
    class_weights,
):  # fmt: skip
    noisy = noise_multiplier > 0.0
    grads, keep = _grads(model, params, x, labels, where, class_weights)
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
        return mean_loss(model, params, x, labels, where, class_weights), grads, norms
    return grads, norms


def clipped_grad(
    model, *, l2_clip, noise_multiplier=0.0, batch_size=None, return_loss=False
) -> Callable:
    """Reference DP-SGD: materialise ``vmap(grad)``, clip each row, sum, add noise, divide.

    Same signature, result and noise draws as :func:`jaxbp.clipped_grad`:
    ``f(params, x, labels, key=None, where=None, class_weights=None) -> (grads, norms)``
    (``(loss, grads, norms)`` with ``return_loss``).
    """
    _check_model(model)
    l2_clip, noise_multiplier = check_clip_options(
        l2_clip, noise_multiplier, batch_size, "bookkeeping"
    )
    step = _step.compiled(
        _clipped_core, model, batch_size, l2_clip, noise_multiplier, bool(return_loss)
    )

    def check(params, x, labels, key=None, where=None, class_weights=None):
        _check_key(key, noise_multiplier)
        params, x, labels, where, class_weights = model.check_inputs(
            params, x, labels, where, class_weights
        )
        return params, x, labels, key if noise_multiplier > 0.0 else None, where, class_weights

    return _step.entry(step, check, "clipped_grad", clipped_grad.__doc__)
