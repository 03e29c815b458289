"""The same ops as :mod:`jaxbp`, written in plain ``jax.numpy`` and differentiated by JAX.

Same names, same signatures, same shapes, same validation: a test or a benchmark swaps
``jaxbp.op`` for ``jaxbp.reference.op``. Nothing here has a custom rule; ``jax.grad`` of these
functions runs JAX's own transposes. They are also what forward mode (``jax.jvp``,
``jax.jacfwd``) should use, since a ``custom_vjp`` does not support it.

Masked rows use the "double where" (jax#19490): the logits of a masked row are replaced by 0
*before* the log-softmax, so an infinite masked logit cannot send NaN into the gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _checks
from ..dense import _validate as _validate_dense
from ..losses import _bad_labels, _labels_matrix, _validate_ce, check_label_range, valid_rows
from ..softmax import _validate as _validate_softmax

__all__ = [
    "dense", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softplus",
    "softmax", "log_softmax", "mse", "sigmoid_binary_cross_entropy", "softmax_cross_entropy",
    "value_and_grad", "linear_softmax_cross_entropy",
    "per_example_grads", "per_example_grad_norms", "clipped_grad",
]  # fmt: skip


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


def _elementwise(f):
    def op(z, **options):
        z = _checks.floating("z", z)
        return f(_acc(z), **options).astype(z.dtype)

    op.__name__ = f.__name__
    op.__doc__ = f"Reference: ``{f.__name__}`` in plain jnp, differentiated by JAX."
    return op


def dense(x, w, b=None):
    """Reference dense: ``x (..., i) @ w (i, o) + b (o,)``."""
    x, w, b = _validate_dense(x, w, b)
    y = x @ w
    return y if b is None else y + b


def relu(z):
    """Reference relu: ``jax.nn.relu`` (derivative 0 at 0)."""
    return _elementwise(jax.nn.relu)(z)


def _leaky_relu(z, negative_slope):
    # z > 0, not jax.nn's z >= 0: the derivative at exactly 0 is negative_slope, as jaxbp's.
    return jnp.where(z > 0, z, negative_slope * z)


def leaky_relu(z, *, negative_slope=0.01):
    """Reference leaky relu ``where(z > 0, z, negative_slope·z)`` (slope at 0: the left one)."""
    return _elementwise(_leaky_relu)(z, negative_slope=negative_slope)


def sigmoid(z):
    """Reference sigmoid: ``jax.nn.sigmoid``."""
    return _elementwise(jax.nn.sigmoid)(z)


def tanh(z):
    """Reference tanh: ``jnp.tanh``."""
    return _elementwise(jnp.tanh)(z)


def gelu(z, *, approximate=True):
    """Reference GELU: ``jax.nn.gelu``."""
    return _elementwise(jax.nn.gelu)(z, approximate=approximate)


def softplus(z):
    """Reference softplus: ``jax.nn.softplus``."""
    return _elementwise(jax.nn.softplus)(z)


def softmax(z, *, axis=-1):
    """Reference softmax: ``jax.nn.softmax`` (JAX's own derivative rule)."""
    z, axis = _validate_softmax(z, axis)
    return jax.nn.softmax(_acc(z), axis=axis).astype(z.dtype)


def log_softmax(z, *, axis=-1):
    """Reference log-softmax: ``jax.nn.log_softmax``."""
    z, axis = _validate_softmax(z, axis)
    return jax.nn.log_softmax(_acc(z), axis=axis).astype(z.dtype)


def mse(pred, target):
    """Reference MSE: ``mean((pred − target)², axis=-1)``, no broadcasting."""
    pred = _checks.floating("pred", pred)
    target = _checks.floating("target", target)
    _checks.min_rank("pred", pred, 1, "(..., c)")
    _checks.same_shape("target", target, "pred", pred)
    return jnp.mean((_acc(pred) - _acc(target)) ** 2, axis=-1)


def sigmoid_binary_cross_entropy(logits, labels):
    """Reference BCE on logits: ``−y·log σ(z) − (1 − y)·log(1 − σ(z))`` elementwise."""
    logits = _checks.floating("logits", logits)
    labels = jnp.asarray(labels)
    _checks.same_shape("labels", labels, "logits", logits)
    z = _acc(logits)
    y = labels.astype(z.dtype)
    return -y * jax.nn.log_sigmoid(z) - (1 - y) * jax.nn.log_sigmoid(-z)


def softmax_cross_entropy(
    logits, labels, *, where=None, class_weights=None, label_smoothing=0.0, ignore_index=None,
    z_loss=0.0,
):  # fmt: skip
    """Reference softmax cross-entropy: ``−Σ w⊙y'·log_softmax(z) + λ·lse²`` per example."""
    logits, labels, where, class_weights = _validate_ce(
        logits, labels, where, class_weights, label_smoothing, ignore_index, z_loss
    )
    c = logits.shape[-1]
    check_label_range(labels, c, ignore_index, where=where)
    z = _acc(logits)
    valid = valid_rows(labels, where, ignore_index=ignore_index, batch_shape=z.shape[:-1])
    z = jnp.where(valid[..., None], z, 0.0)  # the first "where": masked rows never reach exp
    if jnp.issubdtype(labels.dtype, jnp.integer):  # out-of-range ids (under jit): NaN row,
        bad = _bad_labels(labels, c, ignore_index) & valid  # NaN gradient too, never finite
        z = z + jnp.where(bad, jnp.nan, 0.0)[..., None]
    u = _labels_matrix(labels, c, z.dtype, label_smoothing)
    if class_weights is not None:
        u = u * _acc(class_weights).astype(z.dtype)
    logp = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.where(u == 0, 0.0, logp)  # 0·(−∞) is 0 here, and its gradient too
    loss = -jnp.sum(u * logp, axis=-1)
    if z_loss:
        lse = jax.nn.logsumexp(z, axis=-1)
        loss = loss + z_loss * lse**2
    loss = jnp.where(valid, loss, 0.0)  # the second "where"
    if jnp.issubdtype(labels.dtype, jnp.integer):
        loss = jnp.where(_bad_labels(labels, c, ignore_index) & valid, jnp.nan, loss)
    return loss


def linear_softmax_cross_entropy(
    x, w, labels, b=None, *, where=None, ignore_index=None, class_weights=None,
    label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None, accum_dtype=None,
    strategy="recompute",
):  # fmt: skip
    """Reference fused loss: the full ``(n, v)`` logits ``x·w + b`` (accumulated in float32
    for half precision), optional ``cap·tanh(z/cap)``, then :func:`softmax_cross_entropy`.
    ``chunk_size`` and ``strategy`` are accepted and ignored."""
    from ..fused import _acc_of
    from ..fused import _validate as _validate_fused

    x, w, b, labels, where, class_weights, accum_dtype = _validate_fused(
        x, w, b, labels, where, class_weights, label_smoothing, z_loss, softcap, chunk_size,
        accum_dtype, strategy, ignore_index,
    )  # fmt: skip
    acc = _acc_of(accum_dtype, x.dtype)
    z = jnp.einsum("...d,dv->...v", x, w, preferred_element_type=acc)
    if b is not None:
        z = z + b.astype(acc)
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return softmax_cross_entropy(
        z, labels, where=where, class_weights=class_weights, label_smoothing=label_smoothing,
        ignore_index=ignore_index, z_loss=z_loss,
    )  # fmt: skip


def value_and_grad(model):
    """``jax.jit(jax.value_and_grad)`` of ``model``'s mean loss built from these plain-jnp ops.

    Same call signature as :func:`jaxbp.value_and_grad`: ``f(params, x, labels, *,
    where=None, class_weights=None) -> (mean loss, grads)``.
    """
    from ..nn import reference_value_and_grad

    return reference_value_and_grad(model)


def per_example_grads(model):
    """``jax.vmap(jax.grad)`` of each example's own loss, 0 on masked rows.

    Same call signature and result as :func:`jaxbp.per_example_grads`.
    """
    from ..per_example import reference_per_example_grads

    return reference_per_example_grads(model)


def per_example_grad_norms(model):
    """L2 norms ``(n,)`` of the materialised ``vmap(grad)`` per-example gradients."""
    from ..per_example import reference_per_example_grad_norms

    return reference_per_example_grad_norms(model)


def clipped_grad(model, *, l2_clip, noise_multiplier=0.0, batch_size=None, return_loss=False):
    """DP-SGD from materialised ``vmap(grad)`` gradients: as :func:`jaxbp.clipped_grad`."""
    from ..per_example import reference_clipped_grad

    return reference_clipped_grad(
        model, l2_clip=l2_clip, noise_multiplier=noise_multiplier, batch_size=batch_size,
        return_loss=return_loss,
    )  # fmt: skip
