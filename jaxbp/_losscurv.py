"""The curvature of the losses at their logits: the rules a curvature transform asks each
loss op for (bound as ``op.ggn_vp``, ``op.hessian_factor``, ``op.logits_bwd``,
``op.sample_bwd`` by ``declare(curvature=...)``; ``None`` on every other op).

Index letters::

    n  units (any leading axes): a row of softmax cross-entropy or MSE, an element of BCE
    c  classes / outputs (the last axis)
    k  columns of a factor: c, or c + 1 for softmax cross-entropy with a z-loss

For each unit's loss ``ℓ(z)``, ``H = ∂²ℓ/∂z² (c, c)`` is its Hessian at the logits::

    softmax CE   H = α·(diag(p) − p·pᵀ) + 2λ·p·pᵀ,  α = Σ_c u + 2λ·lse,  u = w ⊙ y'
    BCE          H = diag(σ(z)·(1 − σ(z)))           (each element its own unit)
    MSE          H = (2/c)·I

(the softmax CE gradient is ``α·p − u``; differentiating ``α·p`` again gives both terms).
The rules, for the per-unit seed ``g (n…)`` (the mean's ``1/N``, 0 on masked units; the
``g`` the op's ``bwd`` takes; BCE takes it per element, or per row as ``g/c`` on each
element), the op's arguments ``t`` and its map ``J`` from them to the logits (the identity
here; :mod:`jaxbp._fusedcurv` has the fused head's ``z̃ = x·w + b`` and its softcap)::

    ggn_vp(res, tangents, g)     Jᵀ·(g·H)·J·ṫ       g·H·ż here: "nc,ncd,nd->nc", never (c, c)
    hessian_factor(res, g)       S (n…, c, k)       S·Sᵀ = g·H per unit
    logits_bwd(res, dz)          Jᵀ·dz              (dz, None, …) here
    sample_bwd(res, g, key)      Jᵀ·s               one Monte-Carlo column, E[s·sᵀ] = g·H

``tangents`` holds one entry per positional argument of ``op.fwd``
(:func:`jaxbp._tape.rule_arg_names`): the logits' tangent (``None`` for zero), and ``None``
for every argument that does not reach the logits (labels, masks, class weights, MSE's
target; anything else there is a ``TypeError``). The cotangents come back like ``op.bwd``'s,
one per argument, ``None`` off the logits' path.

The square roots: ``diag(p) − p·pᵀ = (diag(√p) − p·√pᵀ)·(diag(√p) − √p·pᵀ)`` (``Σ p = 1``),
so softmax cross-entropy's factor is ``S = √g·[√α·(diag(√p) − p·√pᵀ) | √(2λ)·p]``; BCE's
``diag(√(g·σ(1−σ)))``, MSE's ``√(2g/c)·I``. The Monte-Carlo column draws a label from the
model's own distribution, ``ŷ ~ p``, and a sign ``ε = ±1``::

    s = √g·(√α·(p − onehot(ŷ)) + ε·√(2λ)·p)     E[(p − e_ŷ)(p − e_ŷ)ᵀ] = diag(p) − p·pᵀ,
                                                 E[ε] = 0, E[ε²] = 1: E[s·sᵀ] = g·H
    BCE: s = √g·(σ − ŷ), ŷ ~ Bernoulli(σ);  MSE: s = √(2g/c)·ξ, ξ ~ N(0, I)

Where ``α < 0`` (a z-loss with ``lse < −Σu/2λ``: logits all far below 0) ``H`` is not
positive semi-definite and has no real square root: the factor and the Monte-Carlo column
are NaN on that unit (``√α``), never silently something else; ``ggn_vp`` is still the exact
``g·H·ż`` there. A negative ``g`` gives NaN the same way. Masked units give exactly 0,
out-of-range integer labels NaN (as the ``bwd`` rules). Computed in float32 for half
precision; results in the logits' dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import _checks
from ._ce import _ce_parts

__all__ = [
    "CE_CURVATURE", "BCE_CURVATURE", "MSE_CURVATURE", "softmax_column", "softmax_factor",
    "softmax_hvp", "tangents_of",
]  # fmt: skip


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


# ------------------------------------------------- the softmax pieces (the fused head's too)


def _two_lam(z_loss, dtype):
    """``2λ``: ``0.0`` for a static zero, else a scalar in ``dtype``."""
    return 0.0 if _checks.is_static_zero(z_loss) else 2.0 * _checks.as_scalar(z_loss, dtype)


def softmax_hvp(p, zdot, pz, alpha, z_loss):
    """``H·ż = α·p⊙ż + (2λ − α)·⟨p, ż⟩·p`` on the columns of ``p``, ``ż`` (n, k) (a chunk of
    them, or all); ``pz = ⟨p, ż⟩ (n,)`` over *every* column, ``α (n,)``."""
    coef = _two_lam(z_loss, p.dtype) - alpha  # (n,)
    return alpha[..., None] * p * zdot + (coef * pz)[..., None] * p  # "n,nk->nk"


def softmax_factor(p, alpha, gv, z_loss, *, column: bool):
    """``S (n, c, k) = √g·[√α·(diag(√p) − p·√pᵀ) | √(2λ)·p]``, the last column only with
    ``column``; NaN where ``α < 0`` or ``g < 0`` (no real factor)."""
    r = jnp.sqrt(p)  # (n,c)
    eye = jnp.eye(p.shape[-1], dtype=p.dtype)
    block = r[..., :, None] * eye - p[..., :, None] * r[..., None, :]  # "nc,nd->ncd"
    s = jnp.sqrt(alpha)[..., None, None] * block
    if column:
        s = jnp.concatenate([s, jnp.sqrt(_two_lam(z_loss, p.dtype)) * p[..., None]], axis=-1)
    return jnp.sqrt(gv)[..., None, None] * s


def softmax_column(p, alpha, gv, z_loss, onehot, sign):
    """One Monte-Carlo column ``s = √g·(√α·(p − onehot(ŷ)) + ε·√(2λ)·p)`` (n, c)."""
    s = jnp.sqrt(alpha)[..., None] * (p - onehot)
    if not _checks.is_static_zero(z_loss):
        s = s + (sign * jnp.sqrt(_two_lam(z_loss, p.dtype)))[..., None] * p
    return jnp.sqrt(gv)[..., None] * s


def tangents_of(op_name, tangents, names, keep, primals):
    """The tangents at the indices ``keep`` (those that reach the logits), each ``None`` or of
    its primal's shape; every other entry must be ``None`` (it does not reach the logits)."""
    tangents = tuple(tangents)
    if len(tangents) != len(names):
        raise ValueError(
            f"tangents: {op_name}.ggn_vp expected one per argument of the forward rule "
            f"{names}, got {len(tangents)}"
        )
    for i, (name, t) in enumerate(zip(names, tangents, strict=True)):
        if i not in keep and t is not None:
            raise TypeError(
                f"tangents[{i}] ({name}): expected None, {name} does not reach the logits "
                f"(the GGN's J maps the arguments to the logits), got {type(t).__name__}"
            )
    for i, primal in zip(keep, primals, strict=True):
        t = tangents[i]
        if t is not None and primal is None:
            raise TypeError(
                f"tangents[{i}] ({names[i]}): expected None, the op was called without "
                f"{names[i]}, got {type(t).__name__}"
            )
        if t is not None and (jnp.shape(t) != jnp.shape(primal)):
            raise ValueError(
                f"tangents[{i}] ({names[i]}): expected the shape of {names[i]} "
                f"{jnp.shape(primal)}, got {jnp.shape(t)}"
            )
    return tuple(tangents[i] for i in keep)


def _seed(g, shape, what="the batch shape", name="g"):
    if jnp.shape(g) != tuple(shape):
        raise ValueError(f"{name}: expected {what} {tuple(shape)}, got {jnp.shape(g)}")
    return g


def _finish(a, valid, bad, dtype):
    """0 on masked units, NaN on bad ones, in ``dtype``; ``valid``/``bad (n…)`` broadcast."""
    extra = (None,) * (a.ndim - valid.ndim)
    a = jnp.where(valid[(..., *extra)], a, 0.0)
    return jnp.where(bad[(..., *extra)], jnp.nan, a).astype(dtype)


# ------------------------------------------------------------------- softmax cross-entropy

_CE_ARGS = ("logits", "labels", "where", "class_weights")


def _ce(res, g, label_smoothing, ignore_index, z_loss):
    """``p (n,c)``, ``α (n,)``, ``g (n,)`` (0 where masked), ``valid``, ``bad``."""
    logits, labels, where, class_weights, lse_s = res
    zs, m, u, valid, bad = _ce_parts(
        logits, labels, where, class_weights, label_smoothing, ignore_index
    )
    p = jnp.exp(zs - lse_s[..., None])  # (n,c), as the backward recomputes it
    alpha = jnp.sum(u, axis=-1)  # Σ_c u
    if not _checks.is_static_zero(z_loss):  # + 2λ·lse
        alpha = alpha + _checks.scaled(_checks.as_scalar(z_loss, p.dtype), 2.0 * (lse_s + m))
    gv = jnp.where(valid, _seed(g, logits.shape[:-1]).astype(p.dtype), 0.0)
    return p, alpha, gv, valid, bad


@functools.partial(jax.jit, static_argnames="ignore_index")
def softmax_cross_entropy_ggn_vp(
    res, tangents, g, *, label_smoothing=0.0, ignore_index=None, z_loss=0.0
):  # fmt: skip
    """``(g·H·ż (n,c), None, None, None)``: ``g·(α·p⊙ż + (2λ − α)·⟨p,ż⟩·p)``."""
    logits = res[0]
    (zdot,) = tangents_of("softmax_cross_entropy", tangents, _CE_ARGS, (0,), (logits,))
    p, alpha, gv, valid, bad = _ce(res, g, label_smoothing, ignore_index, z_loss)
    zd = jnp.zeros_like(p) if zdot is None else zdot.astype(p.dtype)
    hz = softmax_hvp(p, zd, jnp.sum(p * zd, axis=-1), alpha, z_loss)
    return _finish(gv[..., None] * hz, valid, bad, logits.dtype), None, None, None


def softmax_cross_entropy_hessian_factor(
    res, g, *, label_smoothing=0.0, ignore_index=None, z_loss=0.0
):  # fmt: skip
    """``S (n, c, k)``, ``S·Sᵀ = g·H``: ``k = c``, or ``c + 1`` unless ``z_loss`` is a Python
    0 (a traced ``z_loss`` keeps its column, exactly 0 when ``λ = 0``)."""
    return _ce_factor(res, g, label_smoothing=label_smoothing, ignore_index=ignore_index,
                      z_loss=z_loss, column=not _checks.is_static_zero(z_loss))  # fmt: skip


@functools.partial(jax.jit, static_argnames=("ignore_index", "column"))
def _ce_factor(res, g, *, label_smoothing, ignore_index, z_loss, column):
    p, alpha, gv, valid, bad = _ce(res, g, label_smoothing, ignore_index, z_loss)
    s = softmax_factor(p, alpha, gv, z_loss, column=column)
    return _finish(s, valid, bad, res[0].dtype)


@jax.jit
def softmax_cross_entropy_logits_bwd(res, dz, **_):
    """``(dz, None, None, None)``: the logits are the op's first argument."""
    dz = _seed(dz, res[0].shape, "the shape of logits", "dz")
    return dz.astype(res[0].dtype), None, None, None


@functools.partial(jax.jit, static_argnames="ignore_index")
def softmax_cross_entropy_sample_bwd(
    res, g, key, *, label_smoothing=0.0, ignore_index=None, z_loss=0.0
):  # fmt: skip
    """``(s (n,c), None, None, None)``: ``ŷ ~ p`` per row (``key`` split in two: the labels,
    then the z-loss signs ``ε``), ``s = √g·(√α·(p − onehot(ŷ)) + ε·√(2λ)·p)``."""
    p, alpha, gv, valid, bad = _ce(res, g, label_smoothing, ignore_index, z_loss)
    key_y, key_e = jax.random.split(key)
    y_hat = jax.random.categorical(key_y, jnp.log(p), axis=-1)  # (n,)
    onehot = (y_hat[..., None] == jnp.arange(p.shape[-1])).astype(p.dtype)
    sign = jax.random.rademacher(key_e, gv.shape, p.dtype)  # ε (n,)
    s = softmax_column(p, alpha, gv, z_loss, onehot, sign)
    return _finish(s, valid, bad, res[0].dtype), None, None, None


CE_CURVATURE = {
    "ggn_vp": softmax_cross_entropy_ggn_vp,
    "hessian_factor": softmax_cross_entropy_hessian_factor,
    "logits_bwd": softmax_cross_entropy_logits_bwd,
    "sample_bwd": softmax_cross_entropy_sample_bwd,
}


# ---------------------------------------------------------- sigmoid binary cross-entropy

_BCE_ARGS = ("logits", "labels")


def _bce(res, g):
    """``σ (n…,c)``, ``h = σ(1−σ)`` and the per-element seed: ``g`` of the op's output shape
    (as its ``bwd`` takes), or of the batch shape (the per-example mean over ``c``: ``g/c``)."""
    z = _acc(res[0])
    shape = z.shape
    if jnp.shape(g) == shape[:-1] and len(shape) > 0:
        g = jnp.broadcast_to(g[..., None] / shape[-1], shape)
    g = _seed(g, shape, f"the shape of logits (or its batch shape {shape[:-1]}):")
    sig = jax.nn.sigmoid(z)
    return sig, sig * jax.nn.sigmoid(-z), g.astype(z.dtype)


@jax.jit
def sigmoid_binary_cross_entropy_ggn_vp(res, tangents, g):
    """``(g⊙σ(1−σ)⊙ż, None)``."""
    (zdot,) = tangents_of("sigmoid_binary_cross_entropy", tangents, _BCE_ARGS, (0,), res[:1])
    _, h, gz = _bce(res, g)
    hz = gz * h * (0.0 if zdot is None else zdot.astype(h.dtype))
    return hz.astype(res[0].dtype), None


@jax.jit
def sigmoid_binary_cross_entropy_hessian_factor(res, g):
    """``S (n…, c, c) = diag(√(g·σ(1−σ)))`` (``g`` per element; per row: ``/c``)."""
    _, h, gz = _bce(res, g)
    d = jnp.sqrt(gz * h)
    return (d[..., :, None] * jnp.eye(d.shape[-1], dtype=d.dtype)).astype(res[0].dtype)


@jax.jit
def sigmoid_binary_cross_entropy_logits_bwd(res, dz):
    """``(dz, None)``."""
    return _seed(dz, res[0].shape, "the shape of logits", "dz").astype(res[0].dtype), None


@jax.jit
def sigmoid_binary_cross_entropy_sample_bwd(res, g, key):
    """``(√g⊙(σ − ŷ), None)``, ``ŷ ~ Bernoulli(σ)`` independently per element."""
    sig, _, gz = _bce(res, g)
    y_hat = jax.random.bernoulli(key, sig).astype(sig.dtype)
    return (jnp.sqrt(gz) * (sig - y_hat)).astype(res[0].dtype), None


BCE_CURVATURE = {
    "ggn_vp": sigmoid_binary_cross_entropy_ggn_vp,
    "hessian_factor": sigmoid_binary_cross_entropy_hessian_factor,
    "logits_bwd": sigmoid_binary_cross_entropy_logits_bwd,
    "sample_bwd": sigmoid_binary_cross_entropy_sample_bwd,
}


# -------------------------------------------------------------------------------- mse

_MSE_ARGS = ("pred", "target")


def _mse(res, g):
    """``2g/c (n…)`` in the accumulation dtype."""
    (diff,) = res
    acc = _checks.accum_dtype(diff.dtype)
    return (2.0 / diff.shape[-1]) * _seed(g, diff.shape[:-1]).astype(acc)


@jax.jit
def mse_ggn_vp(res, tangents, g):
    """``((2g/c)·ṗ, None)``: the target does not reach the prediction."""
    (pdot,) = tangents_of("mse", tangents, _MSE_ARGS, (0,), res)
    h = _mse(res, g)[..., None]
    out = h * (0.0 if pdot is None else pdot.astype(h.dtype))
    return jnp.broadcast_to(out, res[0].shape).astype(res[0].dtype), None


@jax.jit
def mse_hessian_factor(res, g):
    """``S (n…, c, c) = √(2g/c)·I``."""
    c, dtype = res[0].shape[-1], res[0].dtype
    root = jnp.sqrt(_mse(res, g))[..., None, None]
    return (root * jnp.eye(c, dtype=root.dtype)).astype(dtype)


@jax.jit
def mse_logits_bwd(res, dz):
    """``(dz, None)``."""
    return _seed(dz, res[0].shape, "the shape of pred", "dz").astype(res[0].dtype), None


@jax.jit
def mse_sample_bwd(res, g, key):
    """``(√(2g/c)·ξ, None)``, ``ξ ~ N(0, I) (n…, c)``."""
    root = jnp.sqrt(_mse(res, g))[..., None]
    xi = jax.random.normal(key, res[0].shape, root.dtype)
    return (root * xi).astype(res[0].dtype), None


MSE_CURVATURE = {
    "ggn_vp": mse_ggn_vp,
    "hessian_factor": mse_hessian_factor,
    "logits_bwd": mse_logits_bwd,
    "sample_bwd": mse_sample_bwd,
}
