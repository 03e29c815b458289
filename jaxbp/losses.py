"""Losses with hand-written backward rules. Per-example values, never reduced.

Index letters::

    n  batch (any leading axes)
    c  classes / outputs (the last axis)

``softmax_cross_entropy`` is the centre of the library. With logits ``z (n,c)``,
``p = softmax(z)``, labels ``y (n,c)`` (probabilities, or integer ids ``(n,)`` made one-hot),
label smoothing ``ε``, class weights ``w (c,)`` and z-loss weight ``λ``::

    y'   = (1 − ε)·y + ε/c                 smoothed labels            (n,c)
    u    = w ⊙ y'                          weighted labels            (n,c)
    lse  = log Σ_c e^{z_c}                 log-sum-exp                (n,)
    loss = Σ_c u_c (lse − z_c) + λ·lse²    = −Σ_c u_c log p_c + λ·lse²  (n,)

and the hand-written backward, for an upstream ``g = ∂L/∂loss (n,)``::

    dz = g[:,None] · (p · (Σ_c u_c + 2λ·lse)[:,None] − u)       "n,nc->nc"

which is ``g·(p − y)`` when the labels sum to 1 and no option is set. This is where the
softmax Jacobian ``(n,c,c)`` goes: ``Jᵀ·∂loss/∂p = Jᵀ·(−u/p) = p·Σu − u``, a vector per row.
Only ``lse − m (n,)`` is saved besides the inputs (``m = max_c z``, recomputed with ``p`` in
the backward). Working with the shifted logits ``z − m`` keeps ``−log p = (lse − m) − (z − m)``
accurate for large, confident logits, where ``lse − z`` would cancel.

Forward mode (each ``*_jvp``): a row of a loss's Jacobian is its backward for ``g = 1``, so
``loṡs = ⟨dz|_{g=1}, ż⟩`` plus the labels' part (probability labels and ``mse``'s target are
floating inputs and have tangents: ``⟨u̇, lse − z⟩`` with ``u̇ = (1 − ε)·w ⊙ ẏ + ẇ ⊙ y'``).

Rows with ``where=False`` or ``labels == ignore_index`` have loss 0 and gradient exactly 0
(the backward writes 0 there, so huge or infinite masked logits cannot leak NaN).
Out-of-range integer labels raise ``ValueError`` when the labels are concrete; under ``jit``
their row is NaN (loss and gradient), and :func:`jaxbp.checked` reports them.
Half-precision logits are computed and accumulated in float32; the loss is returned in
float32 and the gradient in the logits' dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks, _losscurv
from ._ce import ce_backward, ce_forward, ce_tangent, valid_rows
from ._op import declare, op_vjp

__all__ = [
    "mse", "mse_fwd", "mse_bwd", "mse_jvp",
    "sigmoid_binary_cross_entropy",
    "sigmoid_binary_cross_entropy_fwd",
    "sigmoid_binary_cross_entropy_bwd",
    "sigmoid_binary_cross_entropy_jvp",
    "softmax_cross_entropy", "softmax_cross_entropy_fwd", "softmax_cross_entropy_bwd",
    "softmax_cross_entropy_jvp",
    "valid_rows",
]  # fmt: skip


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


# --------------------------------------------------------------------------- mse


@jax.jit
def mse_fwd(pred: jax.Array, target: jax.Array):
    """Forward: ``loss (...,) = mean_c (pred − target)²``; returns ``(loss, (pred − target,))``.

    Validates shapes and dtypes like :func:`mse`."""
    _validate_mse(pred, target)
    diff = _acc(pred) - _acc(target)
    return jnp.mean(diff * diff, axis=-1), (diff.astype(pred.dtype),)


@jax.jit
def mse_bwd(res, g: jax.Array):
    """Backward: ``dpred = 2·g[:,None]·(pred − target)/c``, ``dtarget = −dpred``."""
    (diff,) = res
    d = (2.0 / diff.shape[-1]) * g[..., None].astype(_acc(diff).dtype) * _acc(diff)
    d = d.astype(diff.dtype)
    return d, -d


@jax.jit
def mse_jvp(res, tangents):
    """Forward mode: ``loṡs (...,) = (2/c)·Σ_c (pred − target) ⊙ (ṗred − ṫarget)``
    (``"nc,nc->n"``), from the tangents ``(ṗred, ṫarget)`` (``None``: zero)."""
    (diff,) = res
    dp, dt = (None if t is None else _acc(t) for t in tangents)
    delta = dp if dt is None else (-dt if dp is None else dp - dt)
    d = _acc(diff)
    if delta is None:
        return jnp.zeros(d.shape[:-1], d.dtype)
    return (2.0 / d.shape[-1]) * jnp.sum(d * delta.astype(d.dtype), axis=-1)


@declare(
    fwd=mse_fwd, bwd=mse_bwd, jvp=mse_jvp, per_example=("pred", "target"),
    curvature=_losscurv.MSE_CURVATURE,
)  # fmt: skip
def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over the last axis, per example.

    Args:
      pred: predictions ``(n, c)`` (any leading axes).
      target: targets of exactly the same shape; no broadcasting (a ``(n,)`` against
        ``(n, 1)`` is a ``ValueError``, not a silent ``(n, n)``).

    Returns:
      ``loss (n,)``, float32 for half-precision inputs.
    """
    pred, target = _validate_mse(pred, target)
    return _mse(pred, target.astype(pred.dtype))


_mse = op_vjp(mse)  # reads mse.fwd / mse.bwd when JAX traces it


def _validate_mse(pred, target):
    pred = _checks.floating("pred", pred)
    target = _checks.floating("target", target)
    _checks.min_rank("pred", pred, 1, "(..., c)")
    _checks.same_shape("target", target, "pred", pred)
    if pred.shape[-1] == 0:
        raise ValueError(f"pred: expected a non-empty last axis c, got shape {pred.shape}")
    return pred, target


# ------------------------------------------------------- sigmoid binary cross-entropy


@jax.jit
def sigmoid_binary_cross_entropy_fwd(logits: jax.Array, labels: jax.Array):
    """Forward: ``loss = softplus(z) − y·z`` elementwise; returns ``(loss, (z, y))``.

    Validates shapes and dtypes like :func:`sigmoid_binary_cross_entropy`."""
    _validate_bce(logits, labels)
    z, y = _acc(logits), labels.astype(_acc(logits).dtype)
    loss = jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))
    return loss, (logits, labels)


@jax.jit
def sigmoid_binary_cross_entropy_bwd(res, g: jax.Array):
    """Backward: ``dz = g·(σ(z) − y)``; ``dy = −g·z`` (``None`` for integer labels)."""
    logits, labels = res
    z = _acc(logits)
    y = labels.astype(z.dtype)
    gz = g.astype(z.dtype)
    dz = (gz * (jax.nn.sigmoid(z) - y)).astype(logits.dtype)
    dy = None if not jnp.issubdtype(labels.dtype, jnp.floating) else (-gz * z).astype(labels.dtype)
    return dz, dy


@jax.jit
def sigmoid_binary_cross_entropy_jvp(res, tangents):
    """Forward mode: ``loṡs = (σ(z) − y)·ż − z·ẏ`` elementwise, from the tangents ``(ż, ẏ)``
    (``ẏ`` ``None`` for integer labels)."""
    logits, labels = res
    dz, dy = tangents
    z = _acc(logits)
    out = jnp.zeros(z.shape, z.dtype)
    if dz is not None:
        out = out + (jax.nn.sigmoid(z) - labels.astype(z.dtype)) * dz.astype(z.dtype)
    if dy is not None and jnp.issubdtype(labels.dtype, jnp.floating):
        out = out - z * dy.astype(z.dtype)
    return out


@declare(
    fwd=sigmoid_binary_cross_entropy_fwd,
    bwd=sigmoid_binary_cross_entropy_bwd,
    jvp=sigmoid_binary_cross_entropy_jvp,
    per_example=("logits", "labels"),
    curvature=_losscurv.BCE_CURVATURE,
)
def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy on logits, elementwise (as optax; reduce it yourself).

    ``loss = −y·log σ(z) − (1 − y)·log(1 − σ(z)) = softplus(z) − y·z``, gradient ``σ(z) − y``.

    Args:
      logits: ``z (n, ...)``, floating.
      labels: ``y``, same shape as ``logits``: probabilities in ``[0, 1]`` (floating) or
        0/1 (integer or bool, no gradient).

    Returns:
      ``loss`` of the shape of ``logits``, float32 for half-precision inputs.
    """
    logits, labels = _validate_bce(logits, labels)
    if labels.dtype == jnp.bool_:
        labels = labels.astype(jnp.int8)
    return _bce(logits, labels)


_bce = op_vjp(sigmoid_binary_cross_entropy)


def _validate_bce(logits, labels):
    logits = _checks.floating("logits", logits)
    labels = _checks.as_array(labels)
    _checks.same_shape("labels", labels, "logits", logits)
    return logits, labels


# -------------------------------------------------------------- softmax cross-entropy


def _check_ce_options(*, label_smoothing=0.0, z_loss=0.0, **_):
    ce_float_options(label_smoothing, z_loss)


# label_smoothing and z_loss are traced (each value compiles nothing new; concrete values are
# range-checked first); ignore_index is static (it decides which rows count).
@_checks.concrete_options(_check_ce_options)
@functools.partial(jax.jit, static_argnames="ignore_index")
def softmax_cross_entropy_fwd(
    logits, labels, where=None, class_weights=None, *, label_smoothing=0.0, ignore_index=None,
    z_loss=0.0,
):  # fmt: skip
    """Forward: ``loss (n,)``; returns ``(loss, (logits, labels, where, class_weights, lse_s))``.

    Only ``lse_s = lse − max_c z (n,)`` is new in the residuals; ``p`` is recomputed from it.
    Validates shapes, dtypes and options like :func:`softmax_cross_entropy` (label values
    are not checked here: out-of-range ids give NaN rows).
    """
    _validate_ce(logits, labels, where, class_weights, label_smoothing, ignore_index, z_loss)
    loss, _, lse_s, _ = ce_forward(
        logits, labels, where, class_weights, label_smoothing=label_smoothing,
        ignore_index=ignore_index, z_loss=z_loss,
    )  # fmt: skip
    return loss, (logits, labels, where, class_weights, lse_s)


@functools.partial(jax.jit, static_argnames="ignore_index")
def softmax_cross_entropy_bwd(res, g, *, label_smoothing=0.0, ignore_index=None, z_loss=0.0):
    """Backward: ``dz = g[:,None]·(p·(Σu + 2λ·lse)[:,None] − u)``, 0 on masked rows.

    Returns ``(dlogits (n,c), dlabels, None, dclass_weights)``: ``dlabels`` is ``None`` for
    integer ids, else ``g·(1−ε)·w⊙(lse − z)``; ``dclass_weights (c,) = Σₙ g·y'⊙(lse − z)``.
    """
    logits, labels, where, class_weights, lse_s = res
    dz, dlabels, dweights = ce_backward(
        logits, labels, where, class_weights, lse_s, g, label_smoothing=label_smoothing,
        ignore_index=ignore_index, z_loss=z_loss,
    )  # fmt: skip
    if dweights is not None:
        dweights = dweights.astype(class_weights.dtype)
    return dz, dlabels, None, dweights


@functools.partial(jax.jit, static_argnames="ignore_index")
def softmax_cross_entropy_jvp(res, tangents, *, label_smoothing=0.0, ignore_index=None,
                              z_loss=0.0):  # fmt: skip
    """Forward mode: ``loṡs (n,) = ⟨p·(Σu + 2λ·lse) − u, ż⟩ + ⟨u̇, lse − z⟩`` (``"nc,nc->n"``)
    for the tangents ``(ż (n,c), ẏ (n,c) or None, None, ẇ (c,) or None)``, with
    ``u̇ = (1 − ε)·w ⊙ ẏ + ẇ ⊙ y'``: a row of the loss's Jacobian is the backward's ``dz`` for
    ``g = 1``. 0 on masked rows."""
    logits, labels, where, class_weights, lse_s = res
    return ce_tangent(
        logits, labels, where, class_weights, lse_s, tuple(tangents),
        label_smoothing=label_smoothing, ignore_index=ignore_index, z_loss=z_loss,
    )  # fmt: skip


def _validate_ce(logits, labels, where, class_weights, label_smoothing, ignore_index, z_loss):
    logits = _checks.floating("logits", logits)
    _checks.min_rank("logits", logits, 1, "(..., c)")
    batch, c = logits.shape[:-1], logits.shape[-1]
    if c == 0:
        raise ValueError(f"logits: expected at least one class (c ≥ 1), got shape {logits.shape}")
    labels = _checks.as_array(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != batch:
            raise ValueError(
                f"labels: integer class ids must have the batch shape {batch} of logits "
                f"{logits.shape}, got {labels.shape}"
            )
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape == batch and labels.shape != logits.shape:
            raise TypeError(
                f"labels: got {labels.dtype} labels of shape {labels.shape}, the batch shape: "
                "class ids must have an integer dtype (probabilities have shape (n, c))"
            )
        if labels.shape != logits.shape:
            raise ValueError(
                f"labels: probability labels must have the shape of logits {logits.shape} "
                f"(n, c), got {labels.shape}"
            )
        if ignore_index is not None:
            raise ValueError("ignore_index: only defined for integer labels; use where= instead")
    else:
        raise TypeError(
            f"labels: expected integer class ids or floating probabilities, got {labels.dtype}"
        )
    where, class_weights = validate_ce_options(
        batch, c, where, class_weights, label_smoothing, ignore_index, z_loss
    )
    return logits, labels, where, class_weights


def validate_ce_options(
    batch, c, where, class_weights, label_smoothing, ignore_index, z_loss, *, letter="c"
):  # fmt: skip
    """Check the options every softmax cross-entropy shares; returns ``(where, class_weights)``.

    ``batch`` is the batch shape ``(n,)``, ``c`` the number of classes (``letter`` names it in
    messages: ``v`` for the fused loss over a vocabulary).
    """
    if where is not None:
        where = _checks.as_array(where)
        if where.dtype != jnp.bool_:
            raise TypeError(f"where: expected a bool mask, got {where.dtype}")
        if where.shape != batch:
            raise ValueError(f"where: expected the batch shape {batch}, got {where.shape}")
    if class_weights is not None:
        class_weights = _checks.floating("class_weights", class_weights)
        if class_weights.shape != (c,):
            raise ValueError(
                f"class_weights: expected shape ({letter},) = ({c},), got {class_weights.shape}"
            )
    ce_float_options(label_smoothing, z_loss)
    _checks.static_int("ignore_index", ignore_index, allow_none=True)
    if ignore_index is not None and not isinstance(ignore_index, int | np.integer):
        raise TypeError(f"ignore_index: expected an int or None, got {ignore_index!r}")
    return where, class_weights


def ce_float_options(label_smoothing, z_loss, *, check: bool = False):
    """``(ε, λ)``: Python floats in range (else ``ValueError``), or traced scalars (checked
    under :func:`jaxbp.checked` when ``check``). Both only scale values, so the rules take
    them traced."""
    eps = _checks.traced_number(
        "label_smoothing", label_smoothing, lambda e: (0.0 <= e) & (e <= 1.0),
        "a float in [0, 1]", check=check,
    )  # fmt: skip
    lam = _checks.traced_number(
        "z_loss", z_loss, lambda z: (0.0 <= z) & (z < math.inf),  # NaN fails too
        "a finite float ≥ 0", check=check,
    )  # fmt: skip
    return eps, lam


@declare(
    fwd=softmax_cross_entropy_fwd,
    bwd=softmax_cross_entropy_bwd,
    jvp=softmax_cross_entropy_jvp,
    per_example=("logits", "labels"),
    traced=("label_smoothing", "z_loss"),
    curvature=_losscurv.CE_CURVATURE,
)
def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    where: jax.Array | None = None,
    class_weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
    z_loss: float = 0.0,
) -> jax.Array:
    """Softmax cross-entropy per example, with the fused hand-written backward.

    .. math::

        \\ell = \\sum_c w_c y'_c (\\mathrm{lse}(z) - z_c) + \\lambda\\,\\mathrm{lse}(z)^2

        \\partial\\ell/\\partial z = p\\,(\\textstyle\\sum_c w_c y'_c
            + 2\\lambda\\,\\mathrm{lse}) - w\\odot y'

    Args:
      logits: ``z (n, c)`` (any leading axes), floating.
      labels: integer class ids ``(n,)`` or probabilities ``(n, c)``, chosen by dtype.
        Probability rows need not sum to 1: the gradient is then ``p·Σy − y``, not ``p − y``.
      where: optional bool ``(n,)``; ``False`` rows get loss 0 and gradient exactly 0.
      class_weights: optional ``(c,)``; class ``k`` counts ``w_k`` times (as PyTorch's
        ``weight``, per example: ``w[y]·nll`` for ids).
      label_smoothing: ``ε`` in ``[0, 1]``; labels become ``(1 − ε)·y + ε/c`` on every row,
        the same for ids and for their one-hot form. Masked rows stay 0.
      ignore_index: integer labels equal to it are masked like ``where=False`` (static).
      z_loss: ``λ ≥ 0``; adds ``λ·lse²`` to keep the log-normaliser near 0 (PaLM).

    ``label_smoothing`` and ``z_loss`` may be traced scalars (under ``jit``/``vmap``): the
    rules take them traced, so each new value compiles nothing new; a traced value out of
    range is reported by :func:`jaxbp.checked`. ``ignore_index`` is static.

    Returns:
      ``loss (n,)``: float32 for half-precision logits, else the logits' dtype.

    Raises:
      TypeError: integer logits, float labels of the batch shape (ids meant), bool labels,
        a non-bool ``where``.
      ValueError: labels whose shape does not fit the logits, integer ids out of range
        (when concrete), a bad option.

    Example:
      >>> import jax.numpy as jnp, jaxbp
      >>> z = jnp.array([[2.0, 1.0, 0.1]])
      >>> float(jaxbp.softmax_cross_entropy(z, jnp.array([0]))[0])  # doctest: +ELLIPSIS
      0.4170...
    """
    logits, labels, where, class_weights = _validate_ce(
        logits, labels, where, class_weights, label_smoothing, ignore_index, z_loss
    )
    _checks.check_label_range(labels, logits.shape[-1], ignore_index, where=where)
    eps, lam = ce_float_options(label_smoothing, z_loss, check=True)
    return _softmax_cross_entropy(
        logits, labels, where, class_weights,
        ignore_index=None if ignore_index is None else int(ignore_index),
        label_smoothing=eps, z_loss=lam,
    )  # fmt: skip


_softmax_cross_entropy = op_vjp(softmax_cross_entropy)  # reads .fwd / .bwd when traced
