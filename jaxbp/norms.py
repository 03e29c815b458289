"""Layer norm and RMS norm with hand-written (compact) backward rules.

Index letters::

    n  batch (any leading axes)
    d  model dimension (the normalised last axis)

Layer norm of one row ``x (d,)``, with ``γ, β (d,)``::

    μ = mean(x)    σ = √(mean((x − μ)²) + ε)    x̂ = (x − μ)/σ    y = γ ⊙ x̂ + β

Its Jacobian ``∂x̂/∂x = (I − 1·1ᵀ/d − x̂·x̂ᵀ/d)/σ`` is a full ``(d, d)`` matrix per row, but it
is symmetric with that structure, so the vector-Jacobian product collapses (as softmax's
does) to three ``(n, d)`` terms and two row means. With ``ĝ = g ⊙ γ``::

    dx = (ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂)) / σ     "nd,n->nd"
    dγ = Σₙ g ⊙ x̂                                 "nd,nd->d"
    dβ = Σₙ g                                     "nd->d"

RMS norm: ``r = √(mean(x²) + ε)``, ``x̂ = x/r``, ``y = γ ⊙ x̂``, and the same collapse without
the mean terms::

    dx = (ĝ − x̂ ⊙ mean(ĝ ⊙ x̂)) / r                "nd,n->nd"
    dγ = Σₙ g ⊙ x̂                                 "nd,nd->d"

Forward mode uses the same symmetric Jacobian on the tangent: ``ẋ̂ = (ẋ − mean(ẋ) − x̂ ⊙
mean(ẋ ⊙ x̂))/σ`` and ``ẏ = γ ⊙ ẋ̂ + γ̇ ⊙ x̂ + β̇`` (RMS norm: no mean term, no ``β̇``).

Residuals: the input ``x`` (which the layer before, or the residual stream, keeps alive
anyway), the per-row statistics ``μ, 1/σ (n,)`` (``1/r`` for RMS norm) and ``γ``; ``x̂`` is
recomputed in the backward (one subtract and multiply), as llm.c's layernorm does. Saving
``x̂`` instead would add a new ``(n, d)`` array and, for half-precision inputs, round it.

Statistics and the backward run in float32 for half-precision inputs (the variance of a
float16 row near 6e4 overflows float16, not float32); outputs and gradients come back in the
input dtype. The variance is two-pass (``mean((x − μ)²)``, no ``E[x²] − μ²`` cancellation).
A constant row has ``x̂ = 0`` and ``σ = √ε``: finite output ``β`` and finite gradient when
``ε > 0`` (with ``ε = 0`` it is 0/0, NaN, as in every implementation). A NaN anywhere in a
row makes that row's output and gradient NaN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from . import _checks
from ._contrib import Full, group
from ._op import declare, op_vjp

__all__ = [
    "layer_norm", "layer_norm_fwd", "layer_norm_bwd", "layer_norm_jvp",
    "layer_norm_example_grads",
    "rms_norm", "rms_norm_fwd", "rms_norm_bwd", "rms_norm_jvp", "rms_norm_example_grads",
]  # fmt: skip


def _validate(x, params, eps, check=False):
    """``x (..., d)`` floating with ``d ≥ 1``; each of ``params`` (name, array) ``(d,)`` of
    ``x``'s dtype; ``eps`` a finite number ``≥ 0``, or a traced scalar (range checked under
    :func:`jaxbp.checked` when ``check``)."""
    x = _checks.floating("x", x)
    _checks.min_rank("x", x, 1, "(..., d)")
    d = x.shape[-1]
    if d == 0:
        raise ValueError(f"x: expected a non-empty last axis d, got shape {x.shape}")
    out = []
    for name, p in params:
        p = _checks.floating(name, p)
        if p.shape != (d,):
            raise ValueError(f"{name}: expected shape (d,) = ({d},) to match x {x.shape}, "
                             f"got {p.shape}")  # fmt: skip
        if p.dtype != x.dtype:
            raise TypeError(f"{name}: expected the dtype of x ({x.dtype}), got {p.dtype}")
        out.append(p)
    eps = _checks.traced_number(
        "eps", eps, lambda e: (0.0 <= e) & (e < math.inf), "a finite float ≥ 0", check=check
    )  # NaN fails too
    return x, out, eps


def _validate_layer_norm(x, gamma, beta, eps, check=False):
    x, (gamma, beta), eps = _validate(x, (("gamma", gamma), ("beta", beta)), eps, check)
    return x, gamma, beta, eps


def _validate_rms_norm(x, gamma, eps, check=False):
    x, (gamma,), eps = _validate(x, (("gamma", gamma),), eps, check)
    return x, gamma, eps


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


def _sum_rows(a, like):
    """``Σₙ a`` over every leading axis, ``"nd->d"``, cast to ``like``'s dtype."""
    return jnp.sum(a.reshape(-1, a.shape[-1]), axis=0).astype(like.dtype)


def _check_eps(*, eps=0.0, **_):
    _checks.traced_number("eps", eps, lambda e: (0.0 <= e) & (e < math.inf), "a finite float ≥ 0")


# ------------------------------------------------------------------------------ layer norm


@_checks.concrete_options(_check_eps)  # a concrete eps is range-checked first
@jax.jit  # eps is traced: each value compiles nothing new
def layer_norm_fwd(x: jax.Array, gamma: jax.Array, beta: jax.Array, *, eps: float = 1e-5):
    """Forward: ``y (..., d) = γ ⊙ (x − μ)/σ + β``; returns ``(y, (x, μ, 1/σ, γ))``.

    ``μ, 1/σ`` have shape ``(...,)`` (float32 for half-precision ``x``). Validates like the op.
    """
    x, gamma, beta, eps = _validate_layer_norm(x, gamma, beta, eps)
    xa = _acc(x)
    mu = jnp.mean(xa, axis=-1)  # (n,)
    xc = xa - mu[..., None]
    var = jnp.mean(xc * xc, axis=-1)  # two-pass variance (n,)
    rstd = jax.lax.rsqrt(var + _checks.as_scalar(eps, xa.dtype))  # 1/σ (n,)
    y = xc * rstd[..., None] * _acc(gamma) + _acc(beta)
    return y.astype(x.dtype), (x, mu, rstd, gamma)


@jax.jit  # eps is traced: each value compiles nothing new
def layer_norm_bwd(res, g: jax.Array, *, eps: float = 1e-5):
    """Backward: ``(dx (..., d), dγ (d,), dβ (d,))`` from ``g (..., d)``.

    ``dx = (ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂))/σ`` with ``ĝ = g ⊙ γ`` (``"nd,n->nd"``),
    ``dγ = Σₙ g ⊙ x̂`` (``"nd,nd->d"``), ``dβ = Σₙ g`` (``"nd->d"``). ``eps`` is accepted for
    the contract and not used: ``1/σ`` is saved.
    """
    del eps
    x, mu, rstd, gamma = res
    ga = _acc(g)
    xhat = (_acc(x) - mu[..., None]) * rstd[..., None]  # x̂ recomputed (n, d)
    gh = ga * _acc(gamma)  # ĝ = g ⊙ γ
    mean_gh = jnp.mean(gh, axis=-1, keepdims=True)  # mean(ĝ)       (n, 1)
    mean_ghx = jnp.mean(gh * xhat, axis=-1, keepdims=True)  # mean(ĝ ⊙ x̂)  (n, 1)
    dx = (gh - mean_gh - xhat * mean_ghx) * rstd[..., None]
    return dx.astype(x.dtype), _sum_rows(ga * xhat, gamma), _sum_rows(ga, gamma)


@jax.jit
def layer_norm_jvp(res, tangents, *, eps: float = 1e-5):
    """Forward mode: ``ẏ = γ ⊙ ẋ̂ + γ̇ ⊙ x̂ + β̇`` with ``ẋ̂ = (ẋ − mean(ẋ) − x̂ ⊙ mean(ẋ ⊙ x̂))/σ``
    (``"nd,n->nd"``: the same symmetric Jacobian as the backward), for the tangents
    ``(ẋ (..., d), γ̇ (d,), β̇ (d,))``."""
    del eps
    x, mu, rstd, gamma = res
    dx, dgamma, dbeta = tangents
    xhat = (_acc(x) - mu[..., None]) * rstd[..., None]
    dxhat = None
    if dx is not None:
        dxa = _acc(dx)
        dxhat = dxa - jnp.mean(dxa, axis=-1, keepdims=True)
        dxhat = (dxhat - xhat * jnp.mean(dxa * xhat, axis=-1, keepdims=True)) * rstd[..., None]
    dy = _checks.tangent_sum(
        None if dxhat is None else dxhat * _acc(gamma),
        None if dgamma is None else xhat * _acc(dgamma),
        None if dbeta is None else jnp.broadcast_to(_acc(dbeta), xhat.shape),
    )
    return dy.astype(x.dtype)


def layer_norm_example_grads(res, g: jax.Array, *, examples: int, eps: float = 1e-5):
    """Per-example rule: ``dγ_k = Σ_t g_t ⊙ x̂_t``, ``dβ_k = Σ_t g_t``, each ``(n, d)`` (as
    small as the activations' row sums: formed as they are)."""
    del eps
    x, mu, rstd, _ = res
    xhat = (_acc(x) - mu[..., None]) * rstd[..., None]
    ga = group(_acc(g), examples, 1, "g")
    return {"gamma": Full(jnp.sum(ga * group(xhat, examples, 1, "x"), axis=1)),
            "beta": Full(jnp.sum(ga, axis=1))}  # fmt: skip


@declare(
    fwd=layer_norm_fwd, bwd=layer_norm_bwd, jvp=layer_norm_jvp, per_example=("x",),
    traced=("eps",),
    example_grads=layer_norm_example_grads,
)  # fmt: skip
def layer_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, *, eps: float = 1e-5) -> jax.Array:
    """Layer norm over the last axis, ``γ ⊙ (x − μ)/√(σ² + ε) + β``, with the compact backward.

    Args:
      x: ``(..., d)``, floating; every leading axis is the batch ``n``.
      gamma: scale ``γ (d,)``, the dtype of ``x``.
      beta: shift ``β (d,)``, the dtype of ``x``.
      eps: ``ε ≥ 0`` added to the variance (a number, or a traced scalar).

    Returns:
      ``y (..., d)`` in the dtype of ``x`` (statistics in float32 for half precision).

    Raises:
      TypeError: non-floating or mismatched dtypes; an ``eps`` that is not a number.
      ValueError: ``gamma``/``beta`` not ``(d,)``, an empty ``d``, ``eps`` negative or not finite.

    The gradient is :func:`layer_norm_bwd`:
    ``dx = (ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂))/σ`` with ``ĝ = g ⊙ γ`` (``"nd,n->nd"``), never the
    ``(d, d)`` Jacobian.

    Example:
      >>> import jax.numpy as jnp, jaxbp
      >>> x = jnp.array([[1.0, 2.0, 3.0]])
      >>> y = jaxbp.layer_norm(x, jnp.ones(3), jnp.zeros(3), eps=0.0)
      >>> [round(float(v), 4) for v in y[0]]
      [-1.2247, 0.0, 1.2247]
    """
    x, gamma, beta, eps = _validate_layer_norm(x, gamma, beta, eps, check=True)
    return _layer_norm(x, gamma, beta, eps=eps)


_layer_norm = op_vjp(layer_norm)  # reads layer_norm.fwd / .bwd when JAX traces it


# -------------------------------------------------------------------------------- rms norm


@_checks.concrete_options(_check_eps)
@jax.jit  # eps is traced: each value compiles nothing new
def rms_norm_fwd(x: jax.Array, gamma: jax.Array, *, eps: float = 1e-6):
    """Forward: ``y (..., d) = γ ⊙ x/√(mean(x²) + ε)``; returns ``(y, (x, 1/r, γ))``.

    ``1/r`` has shape ``(...,)`` (float32 for half-precision ``x``). Validates like the op.
    """
    x, gamma, eps = _validate_rms_norm(x, gamma, eps)
    xa = _acc(x)
    rinv = jax.lax.rsqrt(jnp.mean(xa * xa, axis=-1) + _checks.as_scalar(eps, xa.dtype))  # 1/r (n,)
    y = xa * rinv[..., None] * _acc(gamma)
    return y.astype(x.dtype), (x, rinv, gamma)


@jax.jit  # eps is traced: each value compiles nothing new
def rms_norm_bwd(res, g: jax.Array, *, eps: float = 1e-6):
    """Backward: ``(dx (..., d), dγ (d,))`` from ``g (..., d)``.

    ``dx = (ĝ − x̂ ⊙ mean(ĝ ⊙ x̂))/r`` with ``ĝ = g ⊙ γ``, ``x̂ = x/r`` (``"nd,n->nd"``);
    ``dγ = Σₙ g ⊙ x̂`` (``"nd,nd->d"``). ``eps`` is accepted and not used (``1/r`` is saved).
    """
    del eps
    x, rinv, gamma = res
    ga = _acc(g)
    xhat = _acc(x) * rinv[..., None]
    gh = ga * _acc(gamma)
    mean_ghx = jnp.mean(gh * xhat, axis=-1, keepdims=True)  # (n, 1)
    dx = (gh - xhat * mean_ghx) * rinv[..., None]
    return dx.astype(x.dtype), _sum_rows(ga * xhat, gamma)


@jax.jit
def rms_norm_jvp(res, tangents, *, eps: float = 1e-6):
    """Forward mode: ``ẏ = γ ⊙ (ẋ − x̂ ⊙ mean(ẋ ⊙ x̂))/r + γ̇ ⊙ x̂`` (``"nd,n->nd"``), for the
    tangents ``(ẋ (..., d), γ̇ (d,))``."""
    del eps
    x, rinv, gamma = res
    dx, dgamma = tangents
    xhat = _acc(x) * rinv[..., None]
    dxhat = None
    if dx is not None:
        dxa = _acc(dx)
        dxhat = (dxa - xhat * jnp.mean(dxa * xhat, axis=-1, keepdims=True)) * rinv[..., None]
    dy = _checks.tangent_sum(
        None if dxhat is None else dxhat * _acc(gamma),
        None if dgamma is None else xhat * _acc(dgamma),
    )
    return dy.astype(x.dtype)


def rms_norm_example_grads(res, g: jax.Array, *, examples: int, eps: float = 1e-6):
    """Per-example rule: ``dγ_k = Σ_t g_t ⊙ x̂_t (n, d)``, ``x̂ = x/r``."""
    del eps
    x, rinv, _ = res
    xhat = _acc(x) * rinv[..., None]
    ga = group(_acc(g), examples, 1, "g")
    return {"gamma": Full(jnp.sum(ga * group(xhat, examples, 1, "x"), axis=1))}


@declare(
    fwd=rms_norm_fwd, bwd=rms_norm_bwd, jvp=rms_norm_jvp, per_example=("x",), traced=("eps",),
    example_grads=rms_norm_example_grads,
)  # fmt: skip
def rms_norm(x: jax.Array, gamma: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """RMS norm over the last axis, ``γ ⊙ x/√(mean(x²) + ε)``, with the compact backward.

    Args:
      x: ``(..., d)``, floating; every leading axis is the batch ``n``.
      gamma: scale ``γ (d,)``, the dtype of ``x``.
      eps: ``ε ≥ 0`` added to the mean square (a number, or a traced scalar).

    Returns:
      ``y (..., d)`` in the dtype of ``x`` (statistics in float32 for half precision).

    Raises:
      TypeError: non-floating or mismatched dtypes; an ``eps`` that is not a number.
      ValueError: ``gamma`` not ``(d,)``, an empty ``d``, ``eps`` negative or not finite.

    The gradient is :func:`rms_norm_bwd`: ``dx = (ĝ − x̂ ⊙ mean(ĝ ⊙ x̂))/r`` (``"nd,n->nd"``).

    Example:
      >>> import jax.numpy as jnp, jaxbp
      >>> y = jaxbp.rms_norm(jnp.array([[3.0, 4.0]]), jnp.ones(2), eps=0.0)
      >>> [round(float(v), 4) for v in y[0]]
      [0.8485, 1.1314]
    """
    x, gamma, eps = _validate_rms_norm(x, gamma, eps, check=True)
    return _rms_norm(x, gamma, eps=eps)


_rms_norm = op_vjp(rms_norm)
