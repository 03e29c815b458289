"""Equinox modules whose backward is jaxbp's hand-written rules (needs ``equinox``).

Each class subclasses its ``equinox.nn`` namesake and replaces only ``__call__``: the
constructor, the field names and layouts (``Linear.weight (o, i)``, ``LayerNorm.weight`` /
``.bias``, ``Embedding.weight (v, d)``, ``MultiheadAttention.query_proj`` …), the defaults
(``eps=1e-5``, no biases in ``MultiheadAttention``) and the initialisation (the same key
gives the same weights) are Equinox's, so porting a model is changing an import, and
``isinstance(m, eqx.nn.Linear)`` still holds. ``eqx.filter_grad`` / ``jax.grad`` of a model
built from them runs the ``_bwd`` rules instead of JAX's transposes.

=========================  =====================================================================
module                     runs
=========================  =====================================================================
``Linear``                 :func:`jaxbp.dense` on ``weight.T``
``LayerNorm``, ``RMSNorm``  :func:`jaxbp.layer_norm` / :func:`jaxbp.rms_norm` over ``shape``
``Embedding``              :func:`jaxbp.embedding`
``Dropout``                :func:`jaxbp.dropout` (the key gives Equinox's mask)
``MultiheadAttention``     ``Linear`` projections and :func:`jaxbp.attention`; ``mask=`` as
                           Equinox's, plus ``causal=`` (combined with it) and ``strategy=``
``Attention``              jaxbp's own: causal self-attention of ``x (..., t, d)`` with
                           biased q/k/v/o ``Linear`` projections and ``mask=``
=========================  =====================================================================

Unlike ``eqx.nn`` they also take leading batch axes (``x (..., i)``, ids of any shape; no
``vmap`` needed, though it works). Where they differ from Equinox, on purpose: a fully
masked attention row is 0 (Equinox: the mean of the values); ``Dropout(p=1)`` gives a zero
gradient (Equinox: NaN); a dropped NaN stays NaN; out-of-range ids raise (Equinox clamps);
mixed float dtypes promote as Equinox's ``weight @ x`` does. ``MultiheadAttention`` with
``dropout_p > 0`` outside inference is a ``ValueError`` (``jaxbp.attention`` has no dropout on
the attention weights), and so is ``vo_size != qk_size``. Install with
``pip install jaxbp[modules]``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from . import _modules as m

__all__ = [
    "Linear", "LayerNorm", "RMSNorm", "Embedding", "Dropout", "MultiheadAttention", "Attention",
]  # fmt: skip

_NO_STATE = object()  # Equinox's norms return (out, state) only when given a state


def _promoted(*arrays):
    """Arrays in their common dtype, as Equinox's ``jnp`` expressions promote them."""
    dtype = jnp.result_type(*(a for a in arrays if a is not None))
    return tuple(None if a is None else jnp.asarray(a).astype(dtype) for a in arrays)


def _linear(lin: eqx.nn.Linear, x):
    """``lin`` applied as ``eqx.nn.Linear`` applies it, through :func:`jaxbp.dense`; ``x``
    may carry leading batch axes."""
    if lin.in_features == "scalar":
        x = jnp.asarray(x)[..., None]
    x, w, b = _promoted(x, lin.weight, lin.bias)
    y = m.linear(x, w.T, b)  # weight (o, i) is w (i, o) transposed
    return y[..., 0] if lin.out_features == "scalar" else y


class Linear(eqx.nn.Linear):
    """``eqx.nn.Linear`` (``weight (o, i)``, ``bias (o,)``) through :func:`jaxbp.dense`."""

    def __call__(self, x, *, key=None):
        return _linear(self, x)


def _check_tail(name: str, x, shape: tuple[int, ...]) -> None:
    if tuple(x.shape[x.ndim - len(shape) :]) != tuple(shape) or x.ndim < len(shape):
        raise ValueError(f"{name}: expected x of shape (..., *{tuple(shape)}), got {x.shape}")


class LayerNorm(eqx.nn.LayerNorm):
    """``eqx.nn.LayerNorm(shape, eps=1e-5)`` (``weight``, ``bias`` of ``shape``) through
    :func:`jaxbp.layer_norm` over the trailing ``shape`` axes."""

    def __call__(self, x, state=_NO_STATE, *, key=None):
        _check_tail("LayerNorm", x, self.shape)
        x, w, b = _promoted(x, self.weight, self.bias)
        out = m.layer_norm(x, len(self.shape), w, b, self.eps)
        return out if state is _NO_STATE else (out, state)


class RMSNorm(eqx.nn.RMSNorm):
    """``eqx.nn.RMSNorm(shape, eps=1e-5)`` (``weight``, ``bias``) through
    :func:`jaxbp.rms_norm`, then ``+ bias``."""

    def __call__(self, x, state=_NO_STATE, *, key=None):
        _check_tail("RMSNorm", x, self.shape)
        x, w, b = _promoted(x, self.weight, self.bias)
        out = m.rms_norm(x, len(self.shape), w, self.eps)
        if b is not None:
            out = out + b
        return out if state is _NO_STATE else (out, state)


class Embedding(eqx.nn.Embedding):
    """``eqx.nn.Embedding`` (``weight (v, d)``) through :func:`jaxbp.embedding`; ids of any
    integer shape ``(n...)`` → ``(n..., d)``."""

    def __call__(self, x, *, key=None):
        return m.embedding(x, self.weight)


def _dropout_active(module: eqx.nn.Dropout, inference, deterministic) -> bool:
    if deterministic is not None:
        inference = deterministic
    if inference is None:
        inference = module.inference
    return not inference and not (isinstance(module.p, int | float) and module.p == 0)


class Dropout(eqx.nn.Dropout):
    """``eqx.nn.Dropout(p=0.5, inference=False)`` through :func:`jaxbp.dropout`: the same key
    drops the same entries; ``p`` is static (a Python number)."""

    def __call__(self, x, *, key=None, inference=None, deterministic=None):
        if not _dropout_active(self, inference, deterministic):
            return x
        if key is None:
            raise RuntimeError("Dropout requires a key when running in non-deterministic mode.")
        return m.dropout(x, key, self.p)


class MultiheadAttention(eqx.nn.MultiheadAttention):
    """``eqx.nn.MultiheadAttention`` (``query_proj`` … ``output_proj``, Equinox's sizes and
    defaults) through :func:`jaxbp.attention`.

    ``__call__(query (..., t, q_size), key_ (..., s, k_size), value (..., s, v_size),
    mask=None, *, causal=False, …)``: ``mask`` (``True`` attends) broadcasts to
    ``(..., h, t, s)`` — Equinox's ``(t, s)`` and ``(h, t, s)``, or key padding ``(s,)`` —
    and combines with ``causal``. ``strategy`` (``"store"`` or ``"recompute"``) is
    :func:`jaxbp.attention`'s.
    """

    strategy: str = eqx.field(static=True, default="store")

    def __init__(self, *args, strategy: str = "store", **kwargs):
        super().__init__(*args, **kwargs)
        if self.vo_size != self.qk_size:
            raise ValueError(
                f"vo_size: jaxbp.attention takes values of the keys' head size, qk_size = "
                f"{self.qk_size}, got vo_size = {self.vo_size}; use eqx.nn.MultiheadAttention"
            )
        self.strategy = strategy

    def __call__(self, query, key_, value, mask=None, *, key=None, inference=None,
                 deterministic=None, process_heads=None, causal=False):  # fmt: skip
        p = self.dropout.p
        if not (isinstance(p, int | float) and p == 0) and _dropout_active(
            self.dropout, inference, deterministic
        ):
            raise ValueError(
                f"dropout_p: jaxbp.attention has no dropout on the attention weights, got "
                f"dropout_p={self.dropout.p} outside inference; call with inference=True, "
                "build with dropout_p=0.0 (a Dropout after the block), or use "
                "eqx.nn.MultiheadAttention"
            )
        h = self.num_heads
        q, k, v = (
            m.split_heads(_linear(p, x), h)
            for p, x in ((self.query_proj, query), (self.key_proj, key_), (self.value_proj, value))
        )
        if process_heads is not None:
            q, k, v = process_heads(q, k, v)
        o = m.attend(q, k, v, mask, causal, self.strategy)
        return _linear(self.output_proj, m.merge_heads(o))


class Attention(eqx.Module):
    """jaxbp's own causal self-attention ``x (..., t, d) -> (..., t, d)``: q/k/v/o
    :class:`Linear` projections ``(d, d)`` with biases, ``heads`` dividing ``d``;
    ``causal`` and ``strategy`` as in :func:`jaxbp.attention`; ``__call__(x, mask=None)`` with
    ``mask`` (``True`` attends) broadcast to ``(..., h, t, t)``: key padding ``(..., 1, 1, t)``
    or any bool mask, combined with ``causal``."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    heads: int = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    strategy: str = eqx.field(static=True)

    def __init__(self, d, heads, *, causal=True, strategy="store", dtype=None, key):
        m.check_heads(d, heads)
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.q = Linear(d, d, dtype=dtype, key=kq)
        self.k = Linear(d, d, dtype=dtype, key=kk)
        self.v = Linear(d, d, dtype=dtype, key=kv)
        self.o = Linear(d, d, dtype=dtype, key=ko)
        self.heads, self.causal, self.strategy = heads, causal, strategy

    def __call__(self, x, mask=None):
        q, k, v = (m.split_heads(_linear(p, x), self.heads) for p in (self.q, self.k, self.v))
        o = m.attend(q, k, v, mask, self.causal, self.strategy)
        return _linear(self.o, m.merge_heads(o))
