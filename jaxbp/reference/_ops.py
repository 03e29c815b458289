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
from ..fused import validate_fused as _validate_fused
from ..losses import _validate_ce
from ..softmax import _validate as _validate_softmax
from ..softmax import _validate_where

__all__ = [
    "dense", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softplus", "silu", "swish",
    "softmax", "log_softmax", "mse", "sigmoid_binary_cross_entropy", "softmax_cross_entropy",
    "linear_softmax_cross_entropy",
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


def silu(z):
    """Reference SiLU: ``jax.nn.silu`` (``z·σ(z)``)."""
    return _elementwise(jax.nn.silu)(z)


swish = silu  # an alias, as jaxbp.swish is jaxbp.silu


def softmax(z, *, axis=-1, where=None):
    """Reference softmax: ``jax.nn.softmax`` (JAX's own derivative rule), ``where=`` as its."""
    z, axis = _validate_softmax(z, axis)
    where = _validate_where(z, where)
    return jax.nn.softmax(_acc(z), axis=axis, where=where).astype(z.dtype)


def log_softmax(z, *, axis=-1, where=None):
    """Reference log-softmax: ``jax.nn.log_softmax`` (``−inf`` where masked)."""
    z, axis = _validate_softmax(z, axis)
    where = _validate_where(z, where)
    return jax.nn.log_softmax(_acc(z), axis=axis, where=where).astype(z.dtype)


def mse(pred, target):
    """Reference MSE: ``mean((pred − target)², axis=-1)``, no broadcasting."""
    pred = _checks.floating("pred", pred)
    target = _checks.floating("target", target)
    _checks.min_rank("pred", pred, 1, "(..., c)")
    _checks.same_shape("target", target, "pred", pred)
    target = target.astype(pred.dtype)  # as jaxbp.mse: the target in the prediction's dtype
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
    _checks.check_label_range(labels, c, ignore_index, where=where)
    z = _acc(logits)
    integer = jnp.issubdtype(labels.dtype, jnp.integer)
    masked = where is not None or (integer and ignore_index is not None)
    valid = jnp.ones(z.shape[:-1], bool) if where is None else where
    if integer and ignore_index is not None:
        valid = valid & (labels != ignore_index)
    if masked:  # (no mask given: none in the program, as a user writes it)
        z = jnp.where(valid[..., None], z, 0.0)  # the first "where": masked rows never reach exp
    if integer:  # jax.nn.one_hot: an id outside [0, c) gives a row of zeros
        y = jax.nn.one_hot(labels, c, dtype=z.dtype)
        # An out-of-range id (only possible under jit) poisons its row: NaN loss and gradient.
        out_of_range = valid & ((labels < 0) | (labels >= c))
        z = z + jnp.where(out_of_range, jnp.nan, 0.0)[..., None]
    else:
        y = labels.astype(z.dtype)
    if label_smoothing:  # every class gets ε/c, the label keeps 1 − ε on top of its share
        y = y * (1.0 - label_smoothing) + jnp.full_like(y, label_smoothing / c)
    u = y if class_weights is None else y * _acc(class_weights).astype(z.dtype)
    logp = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.where(u == 0, 0.0, logp)  # 0·(−∞) is 0 here, and its gradient too
    loss = -jnp.sum(u * logp, axis=-1)
    if z_loss:
        lse = jax.nn.logsumexp(z, axis=-1)
        loss = loss + z_loss * lse**2
    if masked:
        loss = jnp.where(valid, loss, 0.0)  # the second "where"
    if integer:
        loss = jnp.where(out_of_range, jnp.nan, loss)
    return loss


def linear_softmax_cross_entropy(
    x, w, labels, b=None, *, where=None, ignore_index=None, class_weights=None,
    label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None, accum_dtype=None,
    strategy="recompute",
):  # fmt: skip
    """Reference fused loss: the full ``(n, v)`` logits ``x·w + b`` (accumulated in float32
    for half precision), optional ``cap·tanh(z/cap)``, then :func:`softmax_cross_entropy`.
    ``chunk_size`` and ``strategy`` are accepted and ignored."""
    x, w, b, labels, where, class_weights, accum_dtype = _validate_fused(
        x, w, b, labels, where, class_weights, label_smoothing, z_loss, softcap, chunk_size,
        accum_dtype, strategy, ignore_index,
    )  # fmt: skip
    acc = _checks.accum_dtype(x.dtype) if accum_dtype is None else jnp.dtype(accum_dtype)
    z = jnp.einsum("...d,dv->...v", x, w, preferred_element_type=acc)
    if b is not None:
        z = z + b.astype(acc)
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return softmax_cross_entropy(
        z, labels, where=where, class_weights=class_weights, label_smoothing=label_smoothing,
        ignore_index=ignore_index, z_loss=z_loss,
    )  # fmt: skip
