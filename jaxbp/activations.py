"""Elementwise activations with hand-written backward rules, all built by one factory.

Index letters::

    n  batch (any shape: these ops act on every element)

An elementwise ``y = f(z)`` has a *diagonal* Jacobian ``∂yₖ/∂zₗ = f'(zₖ)·δₖₗ``, so the
vector-Jacobian product is an elementwise product::

    dz = g ⊙ f'(z)      "n,n->n"

Forward mode is the same product with the tangent, ``ẏ = ż ⊙ f'(z)`` (the Jacobian is
diagonal, so its transpose is itself), from the same saved ``y`` or ``z``.

That is why the ``.*`` in a sigmoid + MSE backward is right, and why the same shortcut is
wrong for softmax, whose Jacobian is full (see :mod:`jaxbp.softmax`).

Each op saves the least its derivative needs: ``relu``, ``sigmoid``, ``tanh`` and
``softplus`` save only their output ``y`` (``f'`` is a function of ``y``: ``y>0``,
``y(1−y)``, ``1−y²``, ``1−e^{−y}``); ``leaky_relu``, ``gelu`` and ``silu`` save their input
``z`` (``silu``'s output ``z·σ(z)`` does not determine ``z``: it is not monotonic).
``swish`` is an alias: the very same function objects as ``silu`` (as ``jax.nn.swish``).

Conventions: at exactly 0 the derivative is the left one: 0 for ``relu`` (as ``jax.nn.relu``)
and ``negative_slope`` for ``leaky_relu`` (as PyTorch; ``jax.nn.leaky_relu`` takes 1 there,
so ``jaxbp.reference.leaky_relu`` uses ``z > 0`` too); a NaN input gives a NaN gradient (it is never
turned into a finite number). Half-precision inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erfc

from . import _checks
from ._op import declare, op_vjp

__all__ = [
    "relu", "relu_fwd", "relu_bwd", "relu_jvp",
    "leaky_relu", "leaky_relu_fwd", "leaky_relu_bwd", "leaky_relu_jvp",
    "sigmoid", "sigmoid_fwd", "sigmoid_bwd", "sigmoid_jvp",
    "tanh", "tanh_fwd", "tanh_bwd", "tanh_jvp",
    "gelu", "gelu_fwd", "gelu_bwd", "gelu_jvp",
    "softplus", "softplus_fwd", "softplus_bwd", "softplus_jvp",
    "silu", "silu_fwd", "silu_bwd", "silu_jvp",
    "swish", "swish_fwd", "swish_bwd", "swish_jvp",
    "ACTIVATIONS",
]  # fmt: skip


def _elementwise(name: str, f: Callable, df: Callable, *, saves: str, defaults: dict):
    """Build the rules ``(op_fwd, op_bwd, op_jvp)`` from ``f`` and its derivative ``df``, and
    the option check ``options(kwargs) -> dict`` the public op runs before calling its core.

    ``df`` takes what is saved: the output ``y`` when ``saves == "output"``, else the input
    ``z``. Both run in float32 for half-precision inputs; results come back in ``z``'s dtype.
    The jitted rules are named ``{name}_fwd``, ``{name}_bwd`` and ``{name}_jvp`` (in jaxprs,
    logs, profiles).
    """
    # bool options switch formulas (static); number options only scale values (traced)
    static = tuple(k for k, v in defaults.items() if isinstance(v, bool))

    def options(kwargs):
        unknown = set(kwargs) - set(defaults)
        if unknown:
            raise TypeError(f"unexpected option(s) {sorted(unknown)}; options are {list(defaults)}")
        opts = {**defaults, **kwargs}
        for k, v in kwargs.items():
            if k in static:  # Python constants, never traced values
                if not _checks.is_concrete(v) or not isinstance(v, bool | np.bool_):
                    raise TypeError(f"{k}: must be a Python bool (a static option), got {v!r}")
                opts[k] = bool(v)
            else:  # a number, or a traced scalar
                opts[k] = _checks.traced_number(k, v, lambda _: True, "a number")
        return opts

    def op_fwd(z, **opts):
        zc = z.astype(_checks.accum_dtype(z.dtype))
        y = f(zc, **opts).astype(z.dtype)
        return y, (y if saves == "output" else z,)

    def diagonal(res, v, opts):
        (r,) = res  # y or z, shape n
        rc = r.astype(_checks.accum_dtype(r.dtype))
        out = v.astype(rc.dtype) * df(rc, **opts)  # "n,n->n": the Jacobian is diagonal
        out = jnp.where(jnp.isnan(rc), rc, out)  # NaN in, NaN out (never a finite 0)
        return out.astype(v.dtype)

    def op_bwd(res, g, **opts):
        return (diagonal(res, g, opts),)  # dz = g ⊙ f'(z)

    def op_jvp(res, tangents, **opts):
        (dz,) = tangents  # ẏ = ż ⊙ f'(z): the same diagonal, times the tangent ż
        return diagonal(res, dz, opts)

    rules = {"_fwd": op_fwd, "_bwd": op_bwd, "_jvp": op_jvp}
    for suffix, rule in rules.items():
        rule.__name__ = rule.__qualname__ = name + suffix
    op_fwd, op_bwd, op_jvp = (jax.jit(r, static_argnames=static) for r in rules.values())

    def fwd(z, **kwargs):
        return op_fwd(_checks.floating("z", z), **options(kwargs))

    def bwd(res, g, **kwargs):
        return op_bwd(res, g, **options(kwargs))

    def jvp(res, tangents, **kwargs):
        return op_jvp(res, tuple(tangents), **options(kwargs))

    what = {"_fwd": "forward", "_bwd": "backward", "_jvp": "forward-mode (jvp)"}
    for rule, suffix in ((fwd, "_fwd"), (bwd, "_bwd"), (jvp, "_jvp")):
        rule.__name__ = rule.__qualname__ = name + suffix
        rule.__doc__ = (
            f"The {what[suffix]} rule of :func:`{name}` (jitted inside; options checked as "
            f"the op checks them)."
        )
    return fwd, bwd, jvp, options


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_tanh_arg(z):
    # 2u = 2·√(2/π)·(z + 0.044715·z³), written as z·(a + b·z²): every step keeps its sign,
    # so nothing cancels (the relative error of 2u is a few ulps for any z).
    a = 2.0 * _SQRT_2_OVER_PI
    return z * (a + (a * _GELU_CUBIC) * (z * z))


def _gelu(z, approximate):
    if approximate:
        # 0.5·(1 + tanh u) = σ(2u): no 1 + tanh u → 0 cancellation for z < −3.
        return z * jax.nn.sigmoid(_gelu_tanh_arg(z))
    # Φ(z) = ½·erfc(−z/√2): accurate far into the left tail, where 1 + erf(z/√2) is 0.
    return 0.5 * z * erfc(-z * _INV_SQRT_2)


def _dgelu(z, approximate):
    if approximate:
        v = _gelu_tanh_arg(z)
        dv = 2.0 * _SQRT_2_OVER_PI * (1.0 + 3 * _GELU_CUBIC * z * z)
        # d/dz z·σ(v) = σ(v) + z·σ(v)·σ(−v)·v'   (σ(v)(1 − σ(v)) = σ(v)σ(−v), no cancellation)
        s = jax.nn.sigmoid(v)
        return s + z * s * jax.nn.sigmoid(-v) * dv
    # Φ(z) + z·φ(z)
    return 0.5 * erfc(-z * _INV_SQRT_2) + z * _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)


def _silu(z):
    return z * jax.nn.sigmoid(z)


def _dsilu(z):
    # d/dz z·σ(z) = σ(z) + z·σ(z)(1 − σ(z)) = σ(z)·(1 + z·σ(−z))   (1 − σ(z) = σ(−z): no
    # cancellation for large z)
    return jax.nn.sigmoid(z) * (1.0 + z * jax.nn.sigmoid(-z))


relu_fwd, relu_bwd, relu_jvp, _relu_options = _elementwise(
    "relu",
    # max(z, 0) (NaN stays NaN) with jax.nn.relu's derivative: JAX's own derivative of the
    # rule (forward over reverse in jaxbp.hessian_vector_product) is one select, not max's
    # tie-splitting arithmetic
    jax.nn.relu,
    lambda y: (y > 0).astype(y.dtype),
    saves="output",
    defaults={},
)
leaky_relu_fwd, leaky_relu_bwd, leaky_relu_jvp, _leaky_relu_options = _elementwise(
    "leaky_relu",
    lambda z, negative_slope: jnp.where(z > 0, z, _checks.as_scalar(negative_slope, z.dtype) * z),
    lambda z, negative_slope: jnp.where(
        z > 0, 1.0, _checks.as_scalar(negative_slope, z.dtype)
    ).astype(z.dtype),
    saves="input",
    defaults={"negative_slope": 0.01},
)
sigmoid_fwd, sigmoid_bwd, sigmoid_jvp, _sigmoid_options = _elementwise(
    "sigmoid", jax.nn.sigmoid, lambda y: y * (1 - y), saves="output", defaults={}
)
tanh_fwd, tanh_bwd, tanh_jvp, _tanh_options = _elementwise(
    "tanh", jnp.tanh, lambda y: 1 - y * y, saves="output", defaults={}
)
gelu_fwd, gelu_bwd, gelu_jvp, _gelu_options = _elementwise(
    "gelu", _gelu, _dgelu, saves="input", defaults={"approximate": True}
)
softplus_fwd, softplus_bwd, softplus_jvp, _softplus_options = _elementwise(
    "softplus", lambda z: jnp.logaddexp(z, 0), lambda y: -jnp.expm1(-y), saves="output", defaults={}
)

silu_fwd, silu_bwd, silu_jvp, _silu_options = _elementwise(
    "silu", _silu, _dsilu, saves="input", defaults={}
)


@declare(fwd=relu_fwd, bwd=relu_bwd, jvp=relu_jvp, per_example=("z",))
def relu(z: jax.Array) -> jax.Array:
    """``max(z, 0)`` elementwise, any shape; gradient ``g ⊙ [y > 0]`` (0 at ``z = 0``)."""
    return _relu(_checks.floating("z", z))


@declare(
    fwd=leaky_relu_fwd, bwd=leaky_relu_bwd, jvp=leaky_relu_jvp, per_example=("z",),
    traced=("negative_slope",),
)  # fmt: skip
def leaky_relu(z: jax.Array, *, negative_slope: float = 0.01) -> jax.Array:
    """``z`` where ``z > 0`` else ``negative_slope·z``; gradient ``g`` or ``negative_slope·g``.

    At exactly ``z = 0`` the derivative is ``negative_slope``. ``negative_slope`` may be a
    traced scalar: the rules take it traced (each value compiles nothing new).
    """
    opts = _leaky_relu_options({"negative_slope": negative_slope})
    return _leaky_relu(_checks.floating("z", z), **opts)


@declare(fwd=sigmoid_fwd, bwd=sigmoid_bwd, jvp=sigmoid_jvp, per_example=("z",))
def sigmoid(z: jax.Array) -> jax.Array:
    """``1 / (1 + e^{−z})`` elementwise; gradient ``g ⊙ y(1 − y)`` from the saved output."""
    return _sigmoid(_checks.floating("z", z))


@declare(fwd=tanh_fwd, bwd=tanh_bwd, jvp=tanh_jvp, per_example=("z",))
def tanh(z: jax.Array) -> jax.Array:
    """``tanh z`` elementwise; gradient ``g ⊙ (1 − y²)`` from the saved output."""
    return _tanh(_checks.floating("z", z))


@declare(fwd=gelu_fwd, bwd=gelu_bwd, jvp=gelu_jvp, per_example=("z",))
def gelu(z: jax.Array, *, approximate: bool = True) -> jax.Array:
    """GELU ``z·Φ(z)``; ``approximate=True`` uses the tanh form (as ``jax.nn.gelu``).

    Exact form: ``½·z·erfc(−z/√2)``, gradient ``g ⊙ (Φ(z) + z·φ(z))`` with
    ``Φ(z) = ½·erfc(−z/√2)``. Tanh form: ``½·z·(1 + tanh u) = z·σ(2u)``,
    ``u = √(2/π)·(z + 0.044715·z³)``, gradient ``g ⊙ (σ(2u) + z·σ(2u)·σ(−2u)·2u')``. Both are
    written so that nothing cancels in the left tail: float32 keeps its relative precision
    down to ``z = −12`` (until the result leaves float32's normal range).
    """
    opts = _gelu_options({"approximate": approximate})
    return _gelu_op(_checks.floating("z", z), **opts)


@declare(fwd=softplus_fwd, bwd=softplus_bwd, jvp=softplus_jvp, per_example=("z",))
def softplus(z: jax.Array) -> jax.Array:
    """``log(1 + e^z)`` elementwise; gradient ``g ⊙ σ(z) = g ⊙ (1 − e^{−y})`` from the output."""
    return _softplus(_checks.floating("z", z))


@declare(fwd=silu_fwd, bwd=silu_bwd, jvp=silu_jvp, per_example=("z",))
def silu(z: jax.Array) -> jax.Array:
    """SiLU (swish) ``z·σ(z)`` elementwise; gradient ``g ⊙ σ(z)·(1 + z·σ(−z))`` from the saved
    input. ``jaxbp.swish`` is this same function (an alias, as ``jax.nn.swish``)."""
    return _silu_op(_checks.floating("z", z))


# Each op's custom_vjp reads its rules from the op object when JAX traces it.
_relu = op_vjp(relu)
_leaky_relu = op_vjp(leaky_relu)
_sigmoid = op_vjp(sigmoid)
_tanh = op_vjp(tanh)
_gelu_op = op_vjp(gelu)
_softplus = op_vjp(softplus)
_silu_op = op_vjp(silu)

swish, swish_fwd, swish_bwd, swish_jvp = silu, silu_fwd, silu_bwd, silu_jvp  # an alias

ACTIVATIONS: dict[str, Callable] = {
    "relu": relu,
    "leaky_relu": leaky_relu,
    "sigmoid": sigmoid,
    "tanh": tanh,
    "gelu": gelu,
    "softplus": softplus,
    "silu": silu,
    "swish": swish,
}
