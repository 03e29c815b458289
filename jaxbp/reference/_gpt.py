"""Reference GPT: ``jax.value_and_grad`` of a plain-jnp twin of :class:`jaxbp.GPT`.

Index letters::

    n  sequences    t  positions    d  width    h  heads    e  head width    v  vocabulary

Written with ``jax.numpy``, ``jax.nn`` and optax only — no jaxbp op and no rule helper — so
a wrong hand-written rule cannot leak into it: layer norm from ``mean``/``var``, attention
as ``softmax(q·kᵀ/√e)·v`` with a causal ``where``, GELU from ``jax.nn.gelu``, the head's
full ``(n, t, v)`` logits and ``optax.softmax_cross_entropy_with_integer_labels``. From
:class:`jaxbp.GPT` only the configuration and :meth:`~jaxbp.GPT.check_inputs` (validation)
are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from .. import _step

__all__ = ["gpt_logits", "gpt_mean_loss", "gpt_token_losses", "gpt_value_and_grad"]


def _acc(x):
    return x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 else x


def _layer_norm(x, p, eps):
    xc = _acc(x)
    mu = jnp.mean(xc, axis=-1, keepdims=True)
    var = jnp.var(xc, axis=-1, keepdims=True)
    y = (xc - mu) / jnp.sqrt(var + eps) * _acc(p["gamma"]) + _acc(p["beta"])
    return y.astype(x.dtype)


def _linear(x, p):
    return x @ p["w"] + p["b"]


def _attention(a, p, heads):
    n, t, d = a.shape
    e = d // heads
    # columns per head, [q₀ k₀ v₀ | q₁ k₁ v₁ | …]: head h's q, k, v at 3e·h + (0, e, 2e)
    cols = jnp.arange(heads)[:, None] * 3 * e + jnp.arange(e)[None, :]  # (h, e)
    qkv = _linear(a, p["qkv"])  # (n, t, 3d)
    q, k, v = (qkv[:, :, cols + j * e].transpose(0, 2, 1, 3) for j in range(3))  # (n, h, t, e)
    s = jnp.einsum("nhte,nhse->nhts", _acc(q), _acc(k)) / math.sqrt(e)
    causal = jnp.tril(jnp.ones((t, t), bool))
    probs = jax.nn.softmax(s, axis=-1, where=causal)
    o = jnp.einsum("nhts,nhse->nhte", probs, _acc(v)).astype(a.dtype)
    return _linear(o.transpose(0, 2, 1, 3).reshape(n, t, d), p["proj"])


def _gelu(z):
    return jax.nn.gelu(_acc(z), approximate=True).astype(z.dtype)


def _dropout(x, key, site, rate):
    """Inverted dropout with site ``site``'s mask, ``bernoulli(fold_in(key, site), 1 − rate)``:
    the same draws as :class:`jaxbp.GPT`'s, written here with ``jax.random`` alone."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, site), 1.0 - rate, x.shape)
    return jnp.where(keep, x * (1.0 / (1.0 - rate)), x * 0)


def gpt_logits(model, params, ids, key=None):
    """Logits ``(n, t, v)`` of the plain twin for ids ``(n, t)``; with ``key``, the
    dropout of a training step (``model.dropout``)."""
    t = ids.shape[-1]
    x = _dropout(params["tok"][ids] + params["pos"][:t], key, 0, model.dropout)
    for i, blk in enumerate(params["blocks"]):
        y = _attention(_layer_norm(x, blk["ln1"], model.eps), blk["attn"], model.heads)
        x = x + _dropout(y, key, 1 + 2 * i, model.dropout)
        m = _layer_norm(x, blk["ln2"], model.eps)
        y = _linear(_gelu(_linear(m, blk["mlp"]["fc"])), blk["mlp"]["out"])
        x = x + _dropout(y, key, 2 + 2 * i, model.dropout)
    x = _layer_norm(x, params["ln_f"], model.eps)
    w = params["tok"].T if model.tied else params["head"]["w"]
    return jnp.einsum("ntd,dv->ntv", x, w, preferred_element_type=_acc(x).dtype)


def gpt_token_losses(model, params, ids, targets, where=None, key=None):
    """Per-token cross-entropy ``(n, t)`` of the plain twin and the valid positions."""
    logits = gpt_logits(model, params, ids, key)
    per_tok = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # (n, t)
    valid = jnp.ones(ids.shape, bool) if where is None else where
    return jnp.where(valid, per_tok, 0.0), valid


def gpt_mean_loss(model, params, ids, targets, where=None, key=None):
    """Mean next-id cross-entropy over valid positions; 0 when none is valid."""
    per_tok, valid = gpt_token_losses(model, params, ids, targets, where, key)
    total = jnp.sum(per_tok)
    return total / jnp.maximum(jnp.sum(valid), 1).astype(total.dtype)


def _run(model, params, ids, targets, where=None, key=None):
    return jax.value_and_grad(lambda p: gpt_mean_loss(model, p, ids, targets, where, key))(params)


def gpt_value_and_grad(model) -> Callable:
    """``jax.jit(jax.value_and_grad)`` of the twin's mean loss: the same call and result as
    :func:`jaxbp.value_and_grad` of a :class:`jaxbp.GPT`, ``f(params, ids, targets, *,
    where=None) -> (mean loss, grads)``; ``f.jitted(params, ids, targets, where)`` is the
    compiled step (:mod:`jaxbp._step`)."""
    step = _step.compiled(_run, model)
    return _step.entry(step, model.check_inputs, "value_and_grad", gpt_value_and_grad.__doc__)
