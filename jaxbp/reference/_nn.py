"""Reference network: ``jax.value_and_grad`` of a plain-jnp MLP built from the reference ops.

Index letters::

    n  batch            i  input features           c  classes (the last layer's width)

Everything that computes a value is written here with :mod:`jaxbp.reference`'s own ops:
the forward loop over ``params``, the per-example and mean losses, the valid-row mask. From
:class:`jaxbp.MLP` only the configuration and :meth:`~jaxbp.MLP.check_inputs` (validation)
are used, so a wrong hand-written rule cannot leak into the oracle. A :class:`jaxbp.GPT`
has its own twin (:mod:`jaxbp.reference._gpt`); any other model of :mod:`jaxbp.model`'s
interface is differentiated through its own forward loop run on the ops' plain twins
(``Tape("reference")``): no hand-written rule runs there either.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .. import _step
from ..gpt import GPT
from ..model import check_model, checker, reference_loss
from ..nn import MLP
from ._gpt import gpt_value_and_grad
from ._ops import (
    dense,
    gelu,
    leaky_relu,
    mse,
    relu,
    sigmoid,
    sigmoid_binary_cross_entropy,
    silu,
    softmax_cross_entropy,
    softplus,
    swish,
    tanh,
)

__all__ = ["value_and_grad"]

_ACTIVATIONS = {
    "relu": relu, "leaky_relu": leaky_relu, "sigmoid": sigmoid, "tanh": tanh, "gelu": gelu,
    "softplus": softplus, "silu": silu, "swish": swish,
}  # fmt: skip


def forward(model: MLP, params, x):
    """Outputs ``(n, c)``: ``dense → act → … → dense`` with the reference ops."""
    act = _ACTIVATIONS[model.activation]
    options = dict(model.activation_options)
    h = x
    for layer, p in enumerate(params):
        h = dense(h, p["w"], p["b"])
        if layer < len(params) - 1:
            h = act(h, **options)
    return h


def per_example_loss(model: MLP, params, x, labels, class_weights=None):
    """Per-example losses ``(n,)`` (softmax CE writes 0 on ``ignore_index`` rows)."""
    out = forward(model, params, x)
    if model.loss == "softmax_cross_entropy":
        return softmax_cross_entropy(
            out, labels, class_weights=class_weights, **dict(model.loss_options)
        )
    if model.loss == "mse":
        return mse(out, labels)
    return jnp.mean(sigmoid_binary_cross_entropy(out, labels), axis=-1)


def valid(model: MLP, labels, where, n):
    """Bool ``(n,)``: ``where`` (all rows by default), minus ``ignore_index`` integer labels."""
    keep = jnp.ones((n,), bool) if where is None else jnp.asarray(where, bool)
    ignore = dict(model.loss_options).get("ignore_index")
    if ignore is not None and jnp.issubdtype(labels.dtype, jnp.integer):
        keep = keep & (labels != ignore)
    return keep


def mean_loss(model: MLP, params, x, labels, where=None, class_weights=None):
    """Mean of the per-example losses over valid rows; 0 when no row is valid."""
    per_ex = per_example_loss(model, params, x, labels, class_weights)
    if where is None and dict(model.loss_options).get("ignore_index") is None:
        return jnp.mean(per_ex)  # every row counts: no mask in the program (as a user writes)
    keep = valid(model, labels, where, x.shape[0])
    total = jnp.sum(jnp.where(keep, per_ex, 0.0))
    return total / jnp.maximum(jnp.sum(keep), 1).astype(total.dtype)


def _value_and_grad_core(model, params, x, labels, where, class_weights):
    def loss(p):
        return mean_loss(model, p, x, labels, where, class_weights)

    return jax.value_and_grad(loss)(params)


def _twin_core(model, params, *batch):
    return jax.value_and_grad(lambda p: reference_loss(model, p, *batch))(params)


def value_and_grad(model) -> Callable:
    """``jax.jit(jax.value_and_grad)`` of ``model``'s mean loss built from the plain-jnp ops.

    Same call signature and result as :func:`jaxbp.value_and_grad`: for an MLP ``f(params,
    x (n, i), labels, *, where=None, class_weights=None) -> (mean loss, grads)``; inputs are
    validated (and lists or NumPy arrays converted) before tracing. ``f.jitted(params, x,
    labels, where, class_weights)`` is the compiled step (:mod:`jaxbp._step`). For a
    :class:`jaxbp.GPT`: ``f(params, ids, targets, *, where=None)``, the plain twin of
    :mod:`jaxbp.reference._gpt`. For any other model: ``jax.value_and_grad`` of its forward
    loop run through the ops' plain twins (:func:`jaxbp.model.reference_loss`).
    """
    if isinstance(model, GPT):
        return gpt_value_and_grad(model)
    if isinstance(model, MLP):
        step = _step.compiled(_value_and_grad_core, model)
        return _step.entry(step, model.check_inputs, "value_and_grad", value_and_grad.__doc__)
    check_model(model, "reference.value_and_grad")
    step = _step.compiled(_twin_core, model)
    return _step.entry(step, checker(model), "value_and_grad", value_and_grad.__doc__)
