"""Flax NNX modules whose backward is jaxbp's hand-written rules (needs ``flax``).

Each class subclasses its ``flax.nnx`` namesake and replaces only ``__call__``: the
constructor, the parameter names and layouts (``Linear.kernel (i, o)`` / ``.bias``,
``LayerNorm.scale`` / ``.bias``, ``Embed.embedding (v, d)``, ``MultiHeadAttention.query.kernel
(d, h, e)`` …), the defaults (``epsilon=1e-6``) and the initialisation (the same ``Rngs``
give the same parameters) are Flax's, so porting a model is changing an import, and
``isinstance(m, nnx.Linear)`` still holds. ``nnx.grad`` / ``jax.grad`` of a model built from
them runs the ``_bwd`` rules instead of JAX's transposes.

=========================  =====================================================================
module                     runs
=========================  =====================================================================
``Linear``                 :func:`jaxbp.dense`
``LayerNorm``, ``RMSNorm``  :func:`jaxbp.layer_norm` / :func:`jaxbp.rms_norm` (last axis)
``Embed``                  :func:`jaxbp.embedding`; ``attend`` through :func:`jaxbp.dense`
``Dropout``                :func:`jaxbp.dropout` (the same ``Rngs`` give Flax's mask)
``MultiHeadAttention``     :func:`jaxbp.dense` projections and :func:`jaxbp.attention`;
                           ``mask=`` and ``is_causal=`` as Flax's, grouped key/value heads
``Attention``              jaxbp's own: causal self-attention of ``x (..., t, d)`` with biased
                           q/k/v/o :class:`Linear` projections and ``mask=``
=========================  =====================================================================

Settings of the Flax modules that jaxbp's ops do not have (``precision``, a custom
``dot_general``, ``reduction_axes`` other than the last, ``axis_name``, a norm ``mask``,
attention-weight dropout outside ``deterministic`` mode, ``decode``, ``normalize_qk``,
``sow_weights``, a custom ``attention_fn``, shardings) are a ``ValueError`` naming the setting.
Where they differ from Flax on purpose: a fully masked attention row is 0 (Flax: the mean of
the values); a dropped NaN stays NaN; out-of-range ids raise when concrete (Flax fills NaN);
the layer norm's variance is two-pass (Flax's default ``use_fast_variance`` is
``E[x²] − E[x]²``: the same within rounding for centred data). Dtypes promote as Flax's
``promote_dtype`` does. Install with ``pip install jaxbp[modules]``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes
from jax import lax

from . import _modules as m

__all__ = [
    "Linear", "LayerNorm", "RMSNorm", "Embed", "Dropout", "MultiHeadAttention", "Attention",
]  # fmt: skip


def _value(param):
    return None if param is None else param[...]


def _no_sharding(module: str, **shardings) -> None:
    for name, value in shardings.items():
        if value is not None:
            raise ValueError(f"{name}: {module} takes no sharding (jaxbp's ops keep their inputs')")


class Linear(nnx.Linear):
    """``nnx.Linear`` (``kernel (i, o)``, ``bias (o,)``) through :func:`jaxbp.dense`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        m.unsupported(
            "jaxbp.nnx.Linear", "flax.nnx.Linear", precision=(self.precision, None),
            dot_general=(self.dot_general, lax.dot_general),
            preferred_element_type=(getattr(self, "preferred_element_type", None), None),
        )  # fmt: skip

    def __call__(self, inputs, out_sharding=None):
        _no_sharding("jaxbp.nnx.Linear", out_sharding=out_sharding)
        x, kernel, bias = self.promote_dtype(
            (inputs, self.kernel[...], _value(self.bias)), dtype=self.dtype
        )
        return m.linear(x, kernel, bias)


def _check_norm(module: str, norm) -> None:
    m.unsupported(
        module, module.replace("jaxbp", "flax"),
        reduction_axes=(_axes(norm.reduction_axes), (-1,)),
        feature_axes=(_axes(norm.feature_axes), (-1,)), axis_name=(norm.axis_name, None),
    )  # fmt: skip


def _axes(axes) -> tuple:
    return tuple(axes) if isinstance(axes, tuple | list) else (axes,)


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm(num_features, epsilon=1e-6)`` (``scale``, ``bias``) through
    :func:`jaxbp.layer_norm` over the last axis."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_norm("jaxbp.nnx.LayerNorm", self)

    def __call__(self, x, *, mask=None):
        m.unsupported("jaxbp.nnx.LayerNorm", "flax.nnx.LayerNorm", mask=(mask, None))
        x, scale, bias = self.promote_dtype(
            (x, _value(self.scale), _value(self.bias)), dtype=self.dtype
        )
        return m.layer_norm(x, 1, scale, bias, self.epsilon)


class RMSNorm(nnx.RMSNorm):
    """``nnx.RMSNorm(num_features, epsilon=1e-6)`` (``scale``) through
    :func:`jaxbp.rms_norm` over the last axis."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_norm("jaxbp.nnx.RMSNorm", self)

    def __call__(self, x, mask=None):
        m.unsupported("jaxbp.nnx.RMSNorm", "flax.nnx.RMSNorm", mask=(mask, None))
        x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
        return m.rms_norm(x, 1, scale, self.epsilon)


class Embed(nnx.Embed):
    """``nnx.Embed(num_embeddings, features)`` (``embedding (v, d)``) through
    :func:`jaxbp.embedding`; ``attend(query (..., d)) -> (..., v)`` through
    :func:`jaxbp.dense`."""

    def __call__(self, inputs, out_sharding=None):
        _no_sharding("jaxbp.nnx.Embed", out_sharding=out_sharding)
        if not jnp.issubdtype(jnp.asarray(inputs).dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        (table,) = self.promote_dtype((self.embedding[...],), dtype=self.dtype, inexact=False)
        return m.embedding(inputs, table)

    def attend(self, query, out_sharding=None):
        _no_sharding("jaxbp.nnx.Embed.attend", out_sharding=out_sharding)
        query, table = self.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
        return m.linear(query, table.T, None)


class Dropout(nnx.Dropout):
    """``nnx.Dropout(rate, broadcast_dims=(), deterministic=False, rngs=...)`` through
    :func:`jaxbp.dropout`: the key is drawn from ``rngs`` as Flax draws it, so the same
    ``Rngs`` drop the same entries; ``rate`` is static (a Python number)."""

    def __call__(self, inputs, *, deterministic=None, rngs=None):
        deterministic = first_from(
            deterministic, self.deterministic,
            error_msg="No `deterministic` argument was provided to Dropout as either a "
            "__call__ argument or class attribute",
        )  # fmt: skip
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:  # zeros and a zero gradient; Flax asks for no key either
            return m.dropout(inputs, None, 1.0)
        return m.dropout(inputs, _key(self, rngs), self.rate, self.broadcast_dims)


def _key(module: Dropout, rngs):
    """The key ``nnx.Dropout`` would draw: from ``rngs`` (a key, a stream, or ``Rngs``'s
    stream of ``module.rng_collection``), else from the stream the module was built with."""
    rngs = first_from(
        rngs, getattr(module, "rngs", None),
        error_msg="`deterministic` is False, but no `rngs` argument was provided to Dropout "
        "as either a __call__ argument or class attribute.",
    )  # fmt: skip
    if isinstance(rngs, nnx.Rngs):
        return rngs[module.rng_collection]()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    return rngs  # a key


class MultiHeadAttention(nnx.MultiHeadAttention):
    """``nnx.MultiHeadAttention`` (``query``/``key``/``value`` kernels ``(d, h, e)``, ``out``
    kernel ``(h, e, d_out)``, Flax's sizes and defaults) through :func:`jaxbp.dense` and
    :func:`jaxbp.attention`.

    ``__call__(inputs_q (..., t, d), inputs_k=None, inputs_v=None, *, mask=None,
    is_causal=False, deterministic=None, rngs=None)``: ``mask`` (bool or Flax's float 1/0,
    ``True`` attends) broadcasts to ``(..., h, t, s)`` and combines with ``is_causal``; key
    padding is ``nnx.make_attention_mask(q_valid, k_valid)`` or ``valid[..., None, None, :]``.
    ``strategy`` (``"store"`` or ``"recompute"``) is :func:`jaxbp.attention`'s.
    """

    def __init__(self, *args, strategy: str = "store", **kwargs):
        super().__init__(*args, **kwargs)
        self.strategy = strategy
        name, flax = "jaxbp.nnx.MultiHeadAttention", "flax.nnx.MultiHeadAttention"
        m.unsupported(
            name, flax, precision=(self.precision, None),
            attention_fn=(self.attention_fn, nnx.dot_product_attention),
            normalize_qk=(self.normalize_qk, False), decode=(bool(self.decode), False),
            qkv_dot_general=(getattr(self, "qkv_dot_general", None), None),
            out_dot_general=(getattr(self, "out_dot_general", None), None),
            qkv_dot_general_cls=(getattr(self, "qkv_dot_general_cls", None), None),
            out_dot_general_cls=(getattr(self, "out_dot_general_cls", None), None),
        )  # fmt: skip

    def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
                 deterministic=None, rngs=None, sow_weights=False, decode=None,
                 is_causal=False, out_sharding=None, qkv_sharding=None):  # fmt: skip
        name, flax = "jaxbp.nnx.MultiHeadAttention", "flax.nnx.MultiHeadAttention"
        m.unsupported(name, flax, sow_weights=(sow_weights, False), decode=(bool(decode), False))
        _no_sharding(name, out_sharding=out_sharding, qkv_sharding=qkv_sharding)
        if self.dropout_rate > 0.0 and not first_from(
            deterministic, self.deterministic,
            error_msg="No `deterministic` argument was provided to MultiHeadAttention",
        ):  # fmt: skip
            raise ValueError(
                f"dropout_rate: jaxbp.attention has no dropout on the attention weights, got "
                f"dropout_rate={self.dropout_rate} with deterministic=False; call with "
                f"deterministic=True, build with dropout_rate=0.0, or use {flax}"
            )
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError("`inputs_k` cannot be None if `inputs_v` is not None.")
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(
                f"Incompatible input dimension, got {inputs_q.shape[-1]} but module expects "
                f"{self.in_features}."
            )
        q, k, v = (
            _general_in(lin, x)
            for lin, x in ((self.query, inputs_q), (self.key, inputs_k), (self.value, inputs_v))
        )
        q, k, v = _promote_like(self.dtype, q, k, v)
        o = m.attend(q, k, v, mask, bool(is_causal), self.strategy)
        return _general_out(self.out, o)


def _promote_like(dtype, *arrays):
    """``arrays`` in one dtype, as Flax's attention function promotes them."""
    return dtypes.promote_dtype(arrays, dtype=dtype)


def _general_in(lin: nnx.LinearGeneral, x):
    """A projection ``(..., d) -> (..., h, e)``: the kernel ``(d, h, e)`` as ``(d, h·e)``."""
    kernel, bias = lin.kernel[...], _value(lin.bias)
    x, kernel, bias = lin.promote_dtype((x, kernel, bias), dtype=lin.dtype)
    d, h, e = kernel.shape
    y = m.linear(x, kernel.reshape(d, h * e), None if bias is None else bias.reshape(h * e))
    return y.reshape(*y.shape[:-1], h, e)


def _general_out(lin: nnx.LinearGeneral, o):
    """The output projection ``(..., h, e) -> (..., d_out)``: the kernel ``(h, e, d_out)`` as
    ``(h·e, d_out)``."""
    kernel, bias = lin.kernel[...], _value(lin.bias)
    o, kernel, bias = lin.promote_dtype((o, kernel, bias), dtype=lin.dtype)
    h, e, d_out = kernel.shape
    return m.linear(m.merge_heads(o), kernel.reshape(h * e, d_out), bias)


class Attention(nnx.Module):
    """jaxbp's own causal self-attention ``x (..., t, d) -> (..., t, d)``: q/k/v/o
    :class:`Linear` projections ``(d, d)`` with biases, ``heads`` dividing ``d``;
    ``causal`` and ``strategy`` as in :func:`jaxbp.attention`; ``__call__(x, mask=None)`` with
    ``mask`` (``True`` attends) broadcast to ``(..., h, t, t)``: key padding ``(..., 1, 1, t)``
    or any bool mask, combined with ``causal``."""

    def __init__(self, d, heads, *, causal=True, strategy="store", dtype=None,
                 param_dtype=jnp.float32, rngs):  # fmt: skip
        m.check_heads(d, heads)
        self.heads, self.causal, self.strategy = heads, causal, strategy
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q, self.k, self.v, self.o = (Linear(d, d, **kw) for _ in range(4))

    def __call__(self, x, mask=None):
        q, k, v = (m.split_heads(p(x), self.heads) for p in (self.q, self.k, self.v))
        o = m.attend(q, k, v, mask, self.causal, self.strategy)
        return self.o(m.merge_heads(o))
