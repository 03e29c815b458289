"""Per-example gradients, their norms without materialising them, and DP-SGD clipping.

Index letters::

    n  batch            i  input features of a layer      o  output features of a layer
    t  sequence (tokens per example, for layer-level functions on (n, t, i) inputs)

The explicit loop of :mod:`jaxbp.nn` knows, for every dense layer ``l``, its input
``a_l (n, i)`` and the gradient at its output ``δ_l = ∂ℓ/∂z_l (n, o)``. Run with a seed of 1
per example (not the ``1/n`` of a mean), row ``k`` of ``δ_l`` belongs to example ``k``'s own
loss ``ℓ_k`` alone, so per-example quantities come almost free (Goodfellow 2015)::

    g_k(w_l) = a_k δ_kᵀ               (i, o)   "ni,no->nio"
    g_k(b_l) = δ_k                    (o,)
    ‖g_k(w_l)‖² = ‖a_k‖²·‖δ_k‖²        (n,)     never forming the (n, i, o) outer products
    ‖g_k‖²  = Σ_l ‖δ_k‖²·(‖a_k‖² + 1)  weights and biases of every layer

With a sequence axis, ``a (n, t, i)`` and ``δ (n, t, o)``, the weight gradient is
``G_k = Σ_t a_t δ_tᵀ`` and its norm comes from two Gram matrices ("ghost norm")::

    ‖G_k‖_F² = Σ_{t,s} (a_t·a_s)(δ_t·δ_s)     "nti,nsi->nts" ⊙ "nto,nso->nts"

which holds ``(n, t, t)`` instead of ``(n, i, o)``: cheaper when ``t² < i·o``
(:func:`dense_grad_sq_norms` chooses by that rule).

**Definitions.** ``ℓ_k`` is ``model.per_example_loss`` of row ``k`` (class weights, label
smoothing and z-loss included). The per-example gradient is ``g_k = ∇_θ ℓ_k``, *unscaled*
(not divided by the batch size), and exactly 0 for rows that do not count (``where=False``,
``ignore_index``). The mean gradient of :func:`jaxbp.value_and_grad` is ``Σ_k g_k / n_valid``.

**DP-SGD** (Abadi et al. 2016), :func:`clipped_grad`::

    c_k = min(1, C/‖g_k‖)                     (n,)   1 where ‖g_k‖ = 0: no division by zero
    ĝ   = (Σ_k c_k g_k + N(0, σ²C²·I)) / m     m = number of valid rows (or batch_size=)

computed by *book-keeping* (Bu et al. 2023): every backward rule is linear in its upstream
gradient and every row's ``δ`` depends on its own seed alone, so the ``δ_l`` of one backward
pass with unit seeds, rescaled per row, are those of a pass seeded with ``c_k/m``. The clipped
sum is then one weighted parameter backward per layer, ``dw = aᵀ(c ⊙ δ)`` ``"ni,no->io"``:
the cost of a plain step plus the norms. ``method="two_pass"`` instead runs the reverse
loop a second time, seeded with ``c_k/m`` (:func:`jaxbp.nn.backward` on the forward's
residuals, which are kept: the forward runs once); the two agree.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import _checks, _step
from .dense import dense
from .nn import MLP, backward, forward, loop_ops

__all__ = [
    "per_example_grads",
    "per_example_grad_norms",
    "clipped_grad",
    "forward_backward_weighted",
    "dense_per_example_grads",
    "dense_grad_sq_norms",
    "ghost_norm_is_cheaper",
]

CLIP_METHODS = ("bookkeeping", "two_pass")


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


# ------------------------------------------------------------------ layer-level functions


def _check_layer(a, delta):
    a = _checks.floating("a", a)
    delta = _checks.floating("delta", delta)
    if a.ndim not in (2, 3):
        raise ValueError(f"a: expected shape (n, i) or (n, t, i), got {a.shape}")
    if delta.ndim != a.ndim or delta.shape[:-1] != a.shape[:-1]:
        want = "(n, o)" if a.ndim == 2 else "(n, t, o)"
        raise ValueError(
            f"delta: expected shape {want} with the leading axes {a.shape[:-1]} of a, "
            f"got {delta.shape}"
        )
    return a, delta


def ghost_norm_is_cheaper(t: int, i: int, o: int) -> bool:
    """True when the Gram ("ghost") norm holds less than the outer product: ``t² < i·o``.

    The ghost norm keeps two ``(n, t, t)`` Gram matrices and costs ``2·n·t²·(i + o)``
    multiply-adds; the outer product keeps ``(n, i, o)`` and costs ``n·t·i·o``.
    """
    return t * t < i * o


def dense_per_example_grads(a: jax.Array, delta: jax.Array) -> dict[str, jax.Array]:
    """Per-example gradients of a dense layer: ``{"w": (n, i, o), "b": (n, o)}``.

    Args:
      a: the layer's input, ``(n, i)`` or ``(n, t, i)``.
      delta: ``∂ℓ_k/∂z`` at the layer's output for each example's own loss, ``(n, o)`` or
        ``(n, t, o)``.

    ``w``: ``"ni,no->nio"`` (``"nti,nto->nio"`` with a sequence axis); ``b``: ``δ``
    (``"nto->no"``). This *does* materialise ``(n, i, o)``; see :func:`dense_grad_sq_norms`.
    """
    a, delta = _check_layer(a, delta)
    if a.ndim == 2:
        return {"w": jnp.einsum("ni,no->nio", a, delta), "b": delta}
    b = jnp.sum(delta, axis=1, dtype=_checks.accum_dtype(delta.dtype)).astype(delta.dtype)
    return {"w": jnp.einsum("nti,nto->nio", a, delta), "b": b}


def dense_grad_sq_norms(
    a: jax.Array, delta: jax.Array, *, bias: bool = True, method: str = "auto"
) -> jax.Array:
    """Squared L2 norms ``(n,)`` of a dense layer's per-example gradients, never ``(n, i, o)``.

    Args:
      a: the layer's input, ``(n, i)`` or ``(n, t, i)``.
      delta: ``∂ℓ_k/∂z`` for each example's own loss, ``(n, o)`` or ``(n, t, o)``.
      bias: include the bias gradient's ``‖Σ_t δ_t‖²``.
      method: for ``(n, t, i)`` inputs, ``"ghost"`` (Gram matrices ``(n, t, t)``),
        ``"outer"`` (the ``(n, i, o)`` outer products, summed over ``t``) or ``"auto"``:
        ghost when :func:`ghost_norm_is_cheaper` (``t² < i·o``). ``(n, i)`` inputs always use
        ``‖a‖²·‖δ‖²``, which needs neither.

    Returns:
      ``‖g_k(w)‖² [+ ‖g_k(b)‖²]`` per example, in float32 for half-precision inputs.

    Identities (shapes in the index letters)::

        (n, i):    ‖a_k‖²·‖δ_k‖²                    "ni,ni->n" · "no,no->n"
        ghost:     Σ_{t,s} (a_t·a_s)(δ_t·δ_s)       "nti,nsi->nts" ⊙ "nto,nso->nts" → n
        outer:     ‖Σ_t a_t δ_tᵀ‖_F²                "nti,nto->nio" → n
    """
    if method not in ("auto", "ghost", "outer"):
        raise ValueError(f"method: expected 'auto', 'ghost' or 'outer', got {method!r}")
    a, delta = _check_layer(a, delta)
    a, delta = _acc(a), _acc(delta)
    if a.ndim == 2:
        d2 = jnp.sum(delta * delta, axis=-1)  # (n,)
        sq = jnp.sum(a * a, axis=-1) * d2
        return sq + d2 if bias else sq
    _, t, i = a.shape
    o = delta.shape[-1]
    if method == "auto":
        method = "ghost" if ghost_norm_is_cheaper(t, i, o) else "outer"
    if method == "ghost":
        gram_a = jnp.einsum("nti,nsi->nts", a, a)  # (n, t, t)
        gram_d = jnp.einsum("nto,nso->nts", delta, delta)  # (n, t, t)
        sq = jnp.sum(gram_a * gram_d, axis=(1, 2))
    else:
        g = jnp.einsum("nti,nto->nio", a, delta)  # (n, i, o)
        sq = jnp.sum(g * g, axis=(1, 2))
    if bias:
        db = jnp.sum(delta, axis=1)  # (n, o)
        sq = sq + jnp.sum(db * db, axis=-1)
    return sq


# ---------------------------------------------------- the explicit loop, per-row seeded


def forward_backward_weighted(
    model: MLP, params, x, labels, seed, *, where=None, class_weights=None
):
    """The explicit loop seeded per row: gradients of ``Σ_k s_k·ℓ_k`` over valid rows.

    :func:`jaxbp.nn.forward_backward` seeds every valid row with ``1/n_valid`` (the mean);
    here the caller picks ``s (n,)``. Unjitted (call it inside ``jax.jit``); no ``jax.grad``.

    Returns:
      ``(per_example_loss (n,), grads, deltas, acts)``: the losses as the loss rule gives
      them (softmax cross-entropy writes 0 on masked rows); ``grads`` has the structure of
      ``params``; ``deltas[l] = s_k·∂ℓ_k/∂z_l (n, o)`` (0 on rows that do not count) and
      ``acts[l]`` is layer ``l``'s input ``(n, i)``.
    """
    per_ex, valid, state = forward(model, params, x, labels, where, class_weights)
    seed = jnp.where(valid, jnp.asarray(seed).astype(per_ex.dtype), 0.0)
    grads, deltas, acts = backward(model, state, seed)
    return per_ex, grads, deltas, acts


def _unit_deltas(model, params, x, labels, where, class_weights):
    """``(per_ex, valid, deltas, acts, state)`` of the unit-seeded pass (no parameter grads)."""
    per_ex, valid, state = forward(model, params, x, labels, where, class_weights)
    seed = valid.astype(per_ex.dtype)  # 1 per counted row: each δ row is its own ∂ℓ_k/∂z
    _, deltas, acts = backward(model, state, seed, param_grads=False)
    return per_ex, valid, deltas, acts, state


def _sq_norms(deltas, acts):
    """``Σ_l ‖δ_k‖²·(‖a_k‖² + 1)`` per row, ``(n,)``: weights and biases of every layer."""
    return sum(dense_grad_sq_norms(a, d, bias=True) for a, d in zip(acts, deltas, strict=True))


# ------------------------------------------------------------------------ public API
#
# Each transform is f = input checks + f.jitted, the compiled step (jaxbp/_step.py): one per
# model, options and rules, cached, so building the same transform twice compiles nothing.


def _check_model(model):
    if not isinstance(model, MLP):
        raise TypeError(f"model: expected a jaxbp.MLP, got {type(model).__name__}")


def _transform(model, core, name, doc, *config):
    """``f(params, x, labels, *, where=None, class_weights=None)`` around the compiled step
    ``core(model, rules, *config, params, x, labels, where, class_weights)``
    (:mod:`jaxbp._step`)."""
    _check_model(model)
    step = _step.compiled(core, model, loop_ops(model).rules(), *config)

    def check(params, x, labels, *, where=None, class_weights=None):
        return model.check_inputs(params, x, labels, where, class_weights)

    return _step.entry(step, check, name, doc)


def _per_example_grads_core(model, rules, params, x, labels, where, class_weights):
    del rules  # the cache key only: the loop reads the rules from the ops when traced
    _, _, deltas, acts, _ = _unit_deltas(model, params, x, labels, where, class_weights)
    return [dense_per_example_grads(a, d) for a, d in zip(acts, deltas, strict=True)]


def _per_example_grad_norms_core(model, rules, params, x, labels, where, class_weights):
    del rules
    _, _, deltas, acts, _ = _unit_deltas(model, params, x, labels, where, class_weights)
    return jnp.sqrt(_sq_norms(deltas, acts))


def per_example_grads(model: MLP) -> Callable:
    """``f(params, x, labels, *, where=None, class_weights=None) -> grads`` per example.

    Each leaf gets a leading batch axis: ``w (n, i, o)``, ``b (n, o)``. Row ``k`` is
    ``∇_θ ℓ_k``, the gradient of example ``k``'s *own* loss (unscaled: not divided by the
    batch size), and 0 for rows with ``where=False`` or ``ignore_index`` labels; it equals
    ``jax.vmap(jax.grad(per-example loss))`` (:func:`jaxbp.reference.per_example_grads`). Built
    from one unit-seeded reverse loop: ``w = "ni,no->nio"(a, δ)``, ``b = δ``. ``f.jitted``
    is the compiled step (:mod:`jaxbp._step`). Memory is ``n`` times the parameters; for
    norms use :func:`per_example_grad_norms`.
    """
    return _transform(
        model, _per_example_grads_core, "per_example_grads", per_example_grads.__doc__
    )


def per_example_grad_norms(model: MLP) -> Callable:
    """``f(params, x, labels, *, where=None, class_weights=None) -> norms (n,)``.

    ``‖∇_θ ℓ_k‖₂`` over all parameters, from ``‖a‖²·‖δ‖²`` (weights) and ``‖δ‖²`` (biases)
    of one unit-seeded reverse loop; no ``(n, i, o)`` array is ever formed. 0 on rows that do
    not count. float32 for half-precision inputs. ``f.jitted`` is the compiled step
    (:mod:`jaxbp._step`).
    """
    return _transform(
        model, _per_example_grad_norms_core, "per_example_grad_norms",
        per_example_grad_norms.__doc__,
    )  # fmt: skip


def _clip_factors(norms, l2_clip):
    """``min(1, C/‖g‖)`` ``(n,)`` with no division by zero (``‖g‖ = 0`` gives 1)."""
    over = norms > l2_clip
    return jnp.where(over, l2_clip / jnp.where(over, norms, 1.0), 1.0).astype(norms.dtype)


def _add_noise(tree, key, std):
    """Add independent ``N(0, std²)`` to every entry of ``tree`` (one subkey per leaf)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = []
    for k, leaf in zip(keys, leaves, strict=True):
        acc = _acc(leaf)
        noise = jax.random.normal(k, leaf.shape, acc.dtype) * jnp.asarray(std).astype(acc.dtype)
        noisy.append((acc + noise).astype(leaf.dtype))
    return jax.tree.unflatten(treedef, noisy)


def check_clip_options(l2_clip, noise_multiplier, batch_size, method):
    try:
        l2_clip = float(l2_clip)
    except (TypeError, ValueError):
        raise TypeError(f"l2_clip: expected a positive float, got {l2_clip!r}") from None
    if not (l2_clip > 0.0 and math.isfinite(l2_clip)):
        raise ValueError(f"l2_clip: expected a finite float > 0, got {l2_clip!r}")
    try:
        noise_multiplier = float(noise_multiplier)
    except (TypeError, ValueError):
        raise TypeError(
            f"noise_multiplier: expected a float ≥ 0, got {noise_multiplier!r}"
        ) from None
    if not (noise_multiplier >= 0.0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier: expected a finite float ≥ 0, got {noise_multiplier!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size: expected None or an int ≥ 1, got {batch_size!r}")
    if method not in CLIP_METHODS:
        raise ValueError(f"method: expected one of {list(CLIP_METHODS)}, got {method!r}")
    return l2_clip, noise_multiplier


def _check_key(key, noise_multiplier):
    if noise_multiplier > 0.0 and key is None:
        raise ValueError(
            f"key: noise_multiplier={noise_multiplier} > 0 needs a PRNG key "
            "(e.g. jax.random.key(0)), got None"
        )


def _denominator(valid, batch_size, dtype):
    if batch_size is not None:
        return jnp.asarray(batch_size, dtype)
    return jnp.maximum(jnp.sum(valid), 1).astype(dtype)


def _mean_loss(per_ex, valid):
    """The mean loss over valid rows, as :func:`jaxbp.value_and_grad` reports it."""
    count = jnp.maximum(jnp.sum(valid), 1).astype(per_ex.dtype)
    return jnp.sum(jnp.where(valid, per_ex, 0.0)) / count


def _divide(tree, m):
    return jax.tree.map(lambda g: (_acc(g) / m.astype(_acc(g).dtype)).astype(g.dtype), tree)


def _clipped_grad_core(
    model, rules, method, batch_size, l2_clip, noise_multiplier, return_loss, params, x,
    labels, key, where, class_weights,
):  # fmt: skip
    del rules  # the cache key only: the loop reads the rules from the ops when traced
    noisy = noise_multiplier > 0.0
    per_ex, valid, deltas, acts, state = _unit_deltas(
        model, params, x, labels, where, class_weights
    )
    norms = jnp.sqrt(_sq_norms(deltas, acts))  # ‖g_k‖ (n,)
    clip = jnp.asarray(l2_clip).astype(norms.dtype)
    m = _denominator(valid, batch_size, norms.dtype)
    factors = _clip_factors(norms, clip)  # c_k (n,)
    # With noise, the clipped *sum* is formed, noised, then divided; without, seed c_k/m.
    seed = factors if noisy else factors / m
    if method == "two_pass":
        grads, _, _ = backward(model, state, jnp.where(valid, seed.astype(per_ex.dtype), 0.0))
    else:  # book-keeping: δ is linear in the seed, so rescale the unit-seeded rows
        grads = []
        for res, d in zip(state[2], deltas, strict=True):
            d_seeded = (seed.astype(_acc(d).dtype)[:, None] * _acc(d)).astype(d.dtype)
            _, dw, db = dense.bwd(res, d_seeded)  # "ni,no->io", "no->o" (dx dropped by XLA)
            grads.append({"w": dw, "b": db})
    if noisy:
        std = jnp.asarray(noise_multiplier).astype(norms.dtype) * clip
        grads = _divide(_add_noise(grads, key, std), m)
    if return_loss:
        return _mean_loss(per_ex, valid), grads, norms
    return grads, norms


def clipped_grad(
    model: MLP,
    *,
    l2_clip: float,
    noise_multiplier: float = 0.0,
    batch_size: int | None = None,
    method: str = "bookkeeping",
    return_loss: bool = False,
) -> Callable:
    """DP-SGD gradient: ``f(params, x, labels, key=None, where=None, class_weights=None)``.

    Returns ``(grads, per_example_norms)``: ``grads`` has the structure of ``params``,
    ``per_example_norms (n,)`` are the *unclipped* ``‖g_k‖`` (0 on rows that do not count)::

        c_k   = min(1, C/‖g_k‖)          1 where ‖g_k‖ = 0 (no division by zero)
        grads = (Σ_k c_k·g_k + N(0, (σ·C)²·I)) / m

    Args:
      model: a :class:`jaxbp.MLP`.
      l2_clip: ``C > 0``, finite.
      noise_multiplier: ``σ ≥ 0``; with ``σ > 0`` every call needs ``key``.
      batch_size: the divisor ``m``. ``None`` (default): the number of valid rows (at
        least 1), so padding rows (``where=False``) and ``ignore_index`` rows contribute
        nothing and are not counted, and a huge ``C`` with ``σ = 0`` gives exactly
        :func:`jaxbp.value_and_grad`'s mean gradient. Pass the (expected) batch size for the
        fixed-denominator estimator of Poisson-sampled DP-SGD.
      method: ``"bookkeeping"`` (default): one backward pass; the unit-seeded ``δ`` are
        rescaled by ``c_k/m`` and each layer's parameter gradient is ``"ni,no->io"`` of
        ``a`` and ``c⊙δ``. ``"two_pass"``: run the reverse loop (:func:`jaxbp.nn.backward`)
        again on the forward's residuals, seeded with ``c_k/m``. Per-example gradients are never
        materialised by either.

      return_loss: also return the (unclipped) mean loss over valid rows, first:
        ``(loss, grads, per_example_norms)``, for logging in a training loop.

    Noise: one ``jax.random.split`` subkey per parameter leaf, in ``params``' leaf order.
    ``f.jitted(params, x, labels, key, where, class_weights)`` is the compiled step
    (:mod:`jaxbp._step`; ``l2_clip`` and ``noise_multiplier`` are part of its configuration);
    both work under ``jax.vmap``/``jax.jit``.
    """
    _check_model(model)
    l2_clip, noise_multiplier = check_clip_options(l2_clip, noise_multiplier, batch_size, method)
    step = _step.compiled(
        _clipped_grad_core, model, loop_ops(model).rules(), method, batch_size, l2_clip,
        noise_multiplier, bool(return_loss),
    )  # fmt: skip

    def check(params, x, labels, key=None, where=None, class_weights=None):
        _check_key(key, noise_multiplier)
        params, x, labels, where, class_weights = model.check_inputs(
            params, x, labels, where, class_weights
        )
        return params, x, labels, key if noise_multiplier > 0.0 else None, where, class_weights

    return _step.entry(step, check, "clipped_grad", clipped_grad.__doc__)


# The vmap(grad) references live in jaxbp.reference (per_example_grads, per_example_grad_norms,
# clipped_grad). The old names below still resolve, with a warning, for existing callers.
_MOVED = {
    "reference_per_example_grads": "per_example_grads",
    "reference_per_example_grad_norms": "per_example_grad_norms",
    "reference_clipped_grad": "clipped_grad",
}


def __getattr__(name):
    if name in _MOVED:
        import importlib  # breaks a cycle: jaxbp.reference imports this module

        new = _MOVED[name]
        warnings.warn(
            f"jaxbp.per_example.{name} is deprecated: use jaxbp.reference.{new}",
            DeprecationWarning, stacklevel=2,
        )  # fmt: skip
        return getattr(importlib.import_module("jaxbp.reference"), new)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
