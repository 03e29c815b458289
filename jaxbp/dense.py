"""Dense (fully connected) layer with a hand-written backward.

Index letters::

    n  batch (any leading axes of x flatten into n)
    i  input features
    o  output features

Forward ``y = x·w + b``: ``x (n,i)``, ``w (i,o)``, ``b (o,)`` → ``y (n,o)``. Backward, for an
upstream gradient ``g = ∂L/∂y (n,o)``::

    dx = g·wᵀ    "no,io->ni"
    dw = xᵀ·g    "ni,no->io"
    db = Σₙ g    "no->o"

Forward mode, for tangents ``ẋ (n,i)``, ``ẇ (i,o)``, ``ḃ (o,)``: the product rule,
``ẏ = ẋ·w + x·ẇ + ḃ`` (``"ni,io->no"`` twice), from the same residuals.

The residuals are ``(x, w)``: exactly what the two matrix products need; ``b`` is kept only
so the backward knows whether a bias cotangent is owed (it is never read).
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from ._contrib import Full, Outer, Rows, group
from ._op import declare, op_vjp

__all__ = [
    "dense", "dense_fwd", "dense_bwd", "dense_jvp", "dense_bwd_params", "dense_example_grads",
]  # fmt: skip


def _validate(x, w, b):
    x = _checks.floating("x", x)
    w = _checks.floating("w", w)
    _checks.min_rank("x", x, 1, "(..., i)")
    if w.ndim != 2:
        raise ValueError(f"w: expected shape (i, o), got {w.shape}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"x: expected last axis i = {w.shape[0]} to match w (i, o) = {w.shape}, "
            f"got x shape {x.shape}"
        )
    if x.dtype != w.dtype:
        raise TypeError(f"w: expected the dtype of x ({x.dtype}), got {w.dtype}")
    if b is not None:
        b = _checks.floating("b", b)
        if b.shape != (w.shape[1],):
            raise ValueError(f"b: expected shape (o,) = ({w.shape[1]},), got {b.shape}")
        if b.dtype != w.dtype:
            raise TypeError(f"b: expected the dtype of w ({w.dtype}), got {b.dtype}")
    return x, w, b


@jax.jit
def dense_fwd(x: jax.Array, w: jax.Array, b: jax.Array | None = None):
    """Forward: ``y (..., o) = x (..., i) · w (i, o) [+ b (o,)]``; returns ``(y, (x, w, b))``.

    Validates shapes and dtypes like :func:`dense`."""
    _validate(x, w, b)
    y = jnp.einsum("...i,io->...o", x, w)
    if b is not None:
        y = y + b
    return y, (x, w, b)


@jax.jit
def dense_bwd(res, g: jax.Array):
    """Backward: ``(dx (..., i), dw (i, o), db (o,) or None)`` from ``g (..., o)``."""
    x, w, b = res
    dx = jnp.einsum("...o,io->...i", g, w)  # "no,io->ni"
    dw, db = dense_bwd_params(res, g)
    return dx, dw, db


@jax.jit
def dense_jvp(res, tangents):
    """Forward mode: ``ẏ (..., o) = ẋ·w + x·ẇ + ḃ`` (``"ni,io->no"``) for the tangents
    ``(ẋ (..., i), ẇ (i, o), ḃ (o,))``, a linear map of them; a ``None`` tangent (zero, or no
    bias) leaves its term out, and ``ḃ`` alone is broadcast over the rows."""
    x, w, _ = res
    dx, dw, db = tangents
    dy = _checks.tangent_sum(
        None if dx is None else jnp.einsum("...i,io->...o", dx, w),
        None if dw is None else jnp.einsum("...i,io->...o", x, dw),
    )
    if dy is None:
        return jnp.broadcast_to(db, (*x.shape[:-1], w.shape[1])).astype(x.dtype)
    return dy if db is None else dy + db


@jax.jit
def dense_bwd_params(res, g: jax.Array):
    """The parameter half of the backward, ``(dw (i, o), db (o,) or None)``.

    A network's first layer needs no input gradient: calling this instead of
    :func:`dense_bwd` skips the ``g·wᵀ`` product (a third of the layer's backward FLOPs).
    """
    x, w, b = res
    i, o = w.shape
    x2, g2 = x.reshape(-1, i), g.reshape(-1, o)
    dw = _xt_dot(x2, g2)  # "ni,no->io"
    db = (
        None
        if b is None
        else jnp.sum(g2, axis=0, dtype=_checks.accum_dtype(g.dtype)).astype(b.dtype)
    )
    return dw, db


def _xt_cpu(x2, g2):
    # XLA:CPU's fast matmul kernels take the contracted axis last on the left operand; a dot
    # contracting both operands' first axis (n) may fall back to a slower generic kernel
    # (2x slower for i=1024, o=10 on one machine). One explicit transpose of x (n·i copies
    # against n·i·o multiply-adds), kept apart from the dot by an optimization barrier so
    # that XLA does not fold it back into the dot's dimension numbers, gets the fast kernel.
    return jax.lax.optimization_barrier(x2.T) @ g2  # "in,no->io"


def _plain_dw(x2, g2):
    return jnp.einsum("ni,no->io", x2, g2)  # what autodiff emits: XLA's own choice


# Which layout wins depends on the CPU (its vector width, XLA's kernels for it) and on the
# shape: measured on one 2-core AMD EPYC (AVX2), the transpose halves dW time when o = 10
# and is a wash (0.95-1.04x) for square layers; on an AVX-512 machine it made whole MLP
# steps 7-15% slower, and a dW measured faster alone (1024x512x512) still made the whole
# step 7% slower there. Timing small products on a busy machine is noisy (the same shape
# measured 0.6x and 1.0x a minute apart), and a layout chosen by a timing can differ from
# one run to the next, and so can the last bits of dW. So by default dW is the dot autodiff
# emits (XLA's own choice: the manual step compiles to the reference's matmuls, and the
# same program every run); JAXBP_DW_LAYOUT=auto measures the two layouts once per shape and
# dtype on this CPU and takes the transpose where it took at most 90% of the plain dot's
# time; JAXBP_DW_LAYOUT=transpose forces it.
_DW_MIN_MACS = 1 << 20  # below this, both take microseconds: keep XLA's choice untimed
_DW_WIN = 0.9  # with "auto": the transpose only at most 90% of the plain dot's time
_DW_LAYOUT_ENV = "JAXBP_DW_LAYOUT"  # "plain" (default), "auto" or "transpose"
_dw_choice: dict[tuple, bool] = {}


def _time_pairs(fa, fb, args, reps: int = 7) -> tuple[float, float]:
    """Median seconds of ``fa`` and ``fb`` on ``args`` (NumPy arrays, put on the CPU),
    interleaved A B A B after a warm-up.

    Called while JAX traces the rule (always: ``dense_bwd`` runs inside ``jit``/``grad``),
    where a call on concrete arrays is staged into the traced program instead of run, so
    only its tracing would be timed. JAX's trace state is per thread: the timing runs in a
    thread of its own, where nothing is being traced, and the calls run."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_time_pairs_untraced, fa, fb, args, reps).result()


def _time_pairs_untraced(fa, fb, args, reps):
    cpu = jax.devices("cpu")[0]
    args = [jax.device_put(a, cpu) for a in args]
    for f in (fa, fb):
        jax.block_until_ready(f(*args))
    ta, tb = [], []
    for _ in range(reps):
        for f, out in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            out.append(time.perf_counter() - t0)
    return sorted(ta)[reps // 2], sorted(tb)[reps // 2]


def _use_transpose_on_cpu(n: int, i: int, o: int, dtype) -> bool:
    """True when ``xᵀ @ g`` through an explicit transpose is clearly faster than the plain
    dot on this machine's CPU for these sizes (measured once, then cached)."""
    mode = os.environ.get(_DW_LAYOUT_ENV, "plain")
    if mode not in ("auto", "plain", "transpose"):
        raise ValueError(f"{_DW_LAYOUT_ENV}: expected 'auto', 'plain' or 'transpose', got {mode!r}")
    if mode != "auto":
        return mode == "transpose"
    if n * i * o < _DW_MIN_MACS:
        return False
    key = (n, i, o, jnp.dtype(dtype).name)
    if key not in _dw_choice:
        rng = np.random.default_rng(0)
        args = [rng.standard_normal(shape).astype(jnp.dtype(dtype)) for shape in ((n, i), (n, o))]
        t_xt, t_plain = _time_pairs(jax.jit(_xt_cpu), jax.jit(_plain_dw), args)
        _dw_choice[key] = t_xt <= _DW_WIN * t_plain
    return _dw_choice[key]


def _xt_dot(x2, g2):
    """``dw (i, o) = xᵀ·g``, ``"ni,no->io"``: XLA's own dot, or on CPU an explicit transpose
    of x where ``JAXBP_DW_LAYOUT`` asks for it (see above)."""
    (n, i), o = x2.shape, g2.shape[1]
    if not _use_transpose_on_cpu(n, i, o, x2.dtype):
        return _plain_dw(x2, g2)
    return jax.lax.platform_dependent(x2, g2, cpu=_xt_cpu, default=_plain_dw)


def dense_example_grads(res, g: jax.Array, *, examples: int):
    """Per-example rule: each example's ``dw (i, o)`` and ``db (o,)`` as contributions.

    With the example's rows ``x_t (i,)`` and ``δ_t = g_t (o,)`` (``T = 1`` for ``(n, i)``
    inputs, ``t`` tokens for ``(n, t, i)``)::

        dw_k = Σ_t x_t δ_tᵀ     Outer(Rows x (n,T,i), Rows δ (n,T,o))   "nti,nto->nio"
        db_k = Σ_t δ_t          (n, o)                                   "nto->no"

    Norms come from Gram matrices (``‖dw_k‖² = Σ_{t,s} ⟨x_t,x_s⟩⟨δ_t,δ_s⟩``, Goodfellow's
    ``‖x‖²‖δ‖²`` when ``T = 1``) unless the ``(n, i, o)`` products are smaller.
    """
    x, w, b = res
    x3, g3 = group(x, examples, 1, "x"), group(g, examples, 1, "g")
    out = {"w": Outer(Rows(x3), Rows(g3))}
    if b is not None:
        out["b"] = Full(jnp.sum(g3, axis=1, dtype=_checks.accum_dtype(g.dtype)))
    return out


@declare(
    fwd=dense_fwd, bwd=dense_bwd, jvp=dense_jvp, per_example=("x",),
    example_grads=dense_example_grads,
)  # fmt: skip
def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """Dense layer ``y = x·w + b`` whose gradient is the hand-written :func:`dense_bwd`.

    Args:
      x: inputs ``(..., i)``; leading axes are the batch ``n``.
      w: weights ``(i, o)``, same dtype as ``x``.
      b: optional bias ``(o,)``, same dtype as ``w``.

    Returns:
      ``y (..., o)`` in the dtype of ``x``.

    Raises:
      TypeError: non-floating or mismatched dtypes.
      ValueError: ``x``'s last axis differs from ``w``'s first, or ``b`` is not ``(o,)``.

    Example:
      >>> import jax.numpy as jnp, jaxbp
      >>> jaxbp.dense(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
      (2, 4)
    """
    x, w, b = _validate(x, w, b)
    return _dense(x, w, b)


_dense = op_vjp(dense)  # reads dense.fwd / dense.bwd when JAX traces it
