"""Per-example gradients, their norms without materialising them, and DP-SGD clipping, for
any model written as explicit loops (:mod:`jaxbp.model`): the MLP, the GPT, yours.

Index letters::

    n  examples         T  rows of one example (1 for an MLP; t tokens for a GPT)
    i  input features of a layer      o  output features of a layer

**Definitions.** An example's loss ``ℓ_k`` is the model's mean loss on that example alone:
an MLP row's loss; a sequence's mean over its valid tokens. Its gradient ``g_k = ∇_θ ℓ_k``
is *unscaled* (not divided by the batch size) and exactly 0 for an example with nothing
valid (``where=False``, ``ignore_index``); it is what ``jax.vmap(jax.grad)`` of one example's
loss gives (:func:`jaxbp.reference.per_example_grads`).

**One backward pass, asked per op.** The transform runs the model's forward and backward
loops once, seeded with ``1/n_valid(k)`` on example ``k``'s valid units (instead of the
``1/n_valid`` of the batch mean): rows of different examples never mix in a rule's
backward, so each op's output gradient ``g``, row by row, belongs to one example's own
loss. The tape (:mod:`jaxbp._tape`) recorded every parameter rule's ``(res, g)``; the
transform asks each op for its per-example rule, ``op.example_grads(res, g, examples=n)``,
which returns each parameter's per-example gradient as a *contribution*
(:mod:`jaxbp._contrib`) and this module never looks at a layer::

    dense      w: Σ_t x_t δ_tᵀ        ‖·‖² = Σ_{t,s} ⟨x_t,x_s⟩⟨δ_t,δ_s⟩  (‖x‖²‖δ‖², T = 1)
    embedding  table: Σ_t onehot(id_t) δ_tᵀ   ‖·‖² = Σ_{t,s} [id_t = id_s]⟨δ_t,δ_s⟩
    head       w: Σ_t x_t dz_tᵀ      ‖·‖² = Σ_{t,s} ⟨x_t,x_s⟩⟨dz_t,dz_s⟩, over vocabulary chunks
    norms      γ: Σ_t δ_t ⊙ x̂_t,  β: Σ_t δ_t               (n, d), as they are

A leaf reached by two ops (a head tied to the token table) gets the norm of the sum of its
contributions, cross terms included.

**DP-SGD** (Abadi et al. 2016), :func:`clipped_grad`::

    c_k = min(1, C/‖g_k‖)                     (n,)   1 where ‖g_k‖ = 0: no division by zero
    ĝ   = (Σ_k c_k g_k + N(0, σ²C²·I)) / m     m = number of valid examples (or batch_size=)

by *book-keeping* (Bu et al. 2023): every backward rule is linear in its upstream gradient,
so each recorded parameter rule re-run with ``g`` scaled by ``c_k/m`` on example ``k``'s rows
gives the clipped sum, ``dw = Σ_t x_tᵀ (c ⊙ δ)_t``: the cost of a plain step plus the norms.
``method="two_pass"`` instead runs the model's backward loop again, seeded with ``c_k/m``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks, _step
from ._contrib import (
    Factor,
    Full,
    OneHot,
    Outer,
    Rows,
    inner,
    materialize,
    scale_examples,
    sq_norm,
)
from ._op import all_rules, bwd_options
from ._tape import Tape, assemble
from ._vma import LOCAL, Reduce
from .dense import dense
from .model import (
    check_model,
    checker,
    entry,
    example_seed,
    examples_valid,
    mean_and_seed,
    run,
    sum_over,
)

__all__ = [
    "per_example_grads", "per_example_grad_norms", "clipped_grad", "forward_backward_weighted",
    "contributions", "dense_per_example_grads", "dense_grad_sq_norms", "ghost_norm_is_cheaper",
    "Factor", "Full", "OneHot", "Outer", "Rows", "inner", "materialize", "sq_norm",
]  # fmt: skip

CLIP_METHODS = ("bookkeeping", "two_pass")


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


# ------------------------------------------------------------------ asking each op


def contributions(t: Tape, examples: int) -> dict[tuple, list]:
    """``{leaf path: [contribution, …]}``: every recorded parameter rule's per-example
    gradients, from the op's ``example_grads`` rule (``TypeError`` naming an op without one)."""
    out: dict[tuple, list] = {}
    for rec in t.parameter_records():
        rule = getattr(rec.op, "example_grads", None)
        if rule is None:
            raise TypeError(
                f"{rec.op.name}: has no per-example rule (op.example_grads), which the "
                "per-example transforms need for an op with parameters; give it one "
                "(jaxbp.Op(..., example_grads=...), docs/per_example.md)"
            )
        given = rule(rec.res, rec.g, examples=examples, **bwd_options(rule, rec.options))
        for name, path, flip in rec.params.values():
            if name not in given:
                raise TypeError(
                    f"{rec.op.name}: its per-example rule gives no contribution for the "
                    f"parameter {name!r} (it gave {sorted(given)})"
                )
            c = given[name]
            out.setdefault(path, []).append(c.T if flip else c)
    return out


def _sq_norms(contribs: dict[tuple, list], n: int, dtype) -> jax.Array:
    """``Σ_leaves ‖Σ_c G_c‖² (n,)``: each leaf's contributions summed before the norm, in
    ``dtype``'s accumulation dtype (float32 for half precision)."""
    total = jnp.zeros((n,), _checks.accum_dtype(dtype))
    for cs in contribs.values():
        for a, ca in enumerate(cs):
            total = total + sq_norm(ca).astype(total.dtype)
            for cb in cs[a + 1 :]:
                total = total + 2.0 * inner(ca, cb).astype(total.dtype)
    return total


def _grads(contribs: dict[tuple, list]) -> dict[tuple, jax.Array]:
    return {path: sum(materialize(c) for c in cs) for path, cs in contribs.items()}


def _n(losses) -> int:
    return losses.shape[0]


def _unit(model, params, batch):
    """The unit-seeded pass: ``(tape, losses, valid, per-example valid (n,))``."""
    t, losses, valid, _ = run(model, params, batch, example_seed)
    return t, losses, valid, examples_valid(valid)


def _norms(contribs, n, params):
    """``‖g_k‖ (n,)`` in float32 for half-precision parameters, else in their dtype."""
    leaves = jax.tree.leaves(params)
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    return jnp.sqrt(jnp.maximum(_sq_norms(contribs, n, dtype), 0.0))


# ------------------------------------------------------------------------ transforms


def _per_example_grads_core(model, rules, params, *batch):
    del rules  # the cache key only: the tape reads the rules from the ops when traced
    t, losses, _, _ = _unit(model, params, batch)
    return assemble(params, _grads(contributions(t, _n(losses))), what="per-example gradient",
                    batch=_n(losses))  # fmt: skip


def _per_example_grad_norms_core(model, rules, params, *batch):
    del rules
    t, losses, _, _ = _unit(model, params, batch)
    return _norms(contributions(t, _n(losses)), _n(losses), params)


def per_example_grads(model: Any) -> Callable:
    """``f(params, *batch) -> grads`` per example, each leaf with a leading ``n``.

    Row ``k`` is ``∇_θ ℓ_k``, the gradient of example ``k``'s own loss (module docstring),
    0 for an example with nothing valid; it equals ``jax.vmap(jax.grad)`` of one example's
    loss (:func:`jaxbp.reference.per_example_grads`). One unit-seeded backward pass, then
    each op's per-example rule, materialised: memory is ``n`` times the parameters (for
    norms use :func:`per_example_grad_norms`). The batch is the model's: ``(x, labels, *,
    where, class_weights)`` for an MLP, ``(ids, targets, *, where)`` for a GPT.
    ``f.jitted(params, *batch)`` is the compiled step (:mod:`jaxbp._step`).
    """
    check_model(model, "per_example_grads")
    return entry(model, _per_example_grads_core, "per_example_grads", per_example_grads.__doc__)


def per_example_grad_norms(model: Any) -> Callable:
    """``f(params, *batch) -> norms (n,)``: ``‖∇_θ ℓ_k‖₂`` over all parameters, never
    forming per-example gradients where a cheaper identity exists (module docstring: Gram
    "ghost" norms for sequences, ``‖x‖²‖δ‖²`` for MLP rows, the head's ``⟨dz_t, dz_s⟩`` over
    vocabulary chunks). 0 for an example with nothing valid; float32 for half-precision
    parameters. ``f.jitted(params, *batch)`` is the compiled step (:mod:`jaxbp._step`).
    """
    check_model(model, "per_example_grad_norms")
    return entry(
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


def _denominator(count, batch_size, dtype):
    if batch_size is not None:
        return jnp.asarray(batch_size, dtype)
    return jnp.maximum(count, 1).astype(dtype)


def _divide(tree, m):
    return jax.tree.map(lambda g: (_acc(g) / m.astype(_acc(g).dtype)).astype(g.dtype), tree)


def clip_step(model, config, params, batch, key, red: Reduce = LOCAL):
    """One DP-SGD step on this device's examples: ``(grads, norms)`` (``(loss, grads,
    norms)`` with ``return_loss``); ``config = (method, batch_size, l2_clip,
    noise_multiplier, return_loss)``.

    Each example's norm and clip factor are its own, computed where its rows are; with a
    mesh's data axis in ``red`` (:func:`jaxbp.parallel.clipped_grad`), the number of valid
    examples and the clipped sum are summed over it (one ``psum`` each) before the noise,
    which every device draws from the same ``key``: the same draws as on one device."""
    method, batch_size, l2_clip, noise_multiplier, return_loss = config
    noisy = noise_multiplier > 0.0
    t = Tape()
    losses, valid, state = model.forward(t, params, *batch)
    unit = example_seed(losses, valid)
    model.backward(t, state, unit)
    n = _n(losses)
    norms = _norms(contributions(t, n), n, params)  # ‖g_k‖ (n,)
    clip = jnp.asarray(l2_clip).astype(norms.dtype)
    m = _denominator(red.sum(jnp.sum(examples_valid(valid))), batch_size, norms.dtype)
    factors = _clip_factors(norms, clip)  # c_k (n,)
    # With noise, the clipped *sum* is formed, noised, then divided; without, scale by c_k/m.
    scale = factors if noisy else factors / m
    if method == "two_pass":
        again = Tape()
        seed = unit * scale.astype(unit.dtype).reshape((-1,) + (1,) * (unit.ndim - 1))
        model.backward(again, state, seed)
        grads = again.gradients(params)
    else:  # book-keeping: each parameter rule again, with g scaled per example

        def rescaled(rec):
            g = scale_examples(rec.g, scale)
            return tuple(rec.op.bwd(rec.res, g, **bwd_options(rec.op.bwd, rec.options)))

        grads = t.gradients(params, rescaled)
    grads = sum_over(red, grads)  # the clipped sum over the data axis: one psum per leaf
    if noisy:
        std = jnp.asarray(noise_multiplier).astype(norms.dtype) * clip
        grads = _divide(_add_noise(grads, key, std), m)
    if return_loss:
        return mean_and_seed(losses, valid, red)[0], grads, norms
    return grads, norms


def _clipped_grad_core(model, rules, config, params, *args):
    del rules  # the cache key only: the tape reads the rules from the ops when traced
    *batch, key = args
    return clip_step(model, config, params, batch, key)


def clipped_grad(
    model: Any,
    *,
    l2_clip: float,
    noise_multiplier: float = 0.0,
    batch_size: int | None = None,
    method: str = "bookkeeping",
    return_loss: bool = False,
) -> Callable:
    """DP-SGD gradient: ``f(params, *batch, key=None) -> (grads, per_example_norms)``.

    ``grads`` has the structure of ``params``; ``per_example_norms (n,)`` are the
    *unclipped* ``‖g_k‖`` (0 for an example with nothing valid)::

        c_k   = min(1, C/‖g_k‖)          1 where ‖g_k‖ = 0 (no division by zero)
        grads = (Σ_k c_k·g_k + N(0, (σ·C)²·I)) / m

    Args:
      model: any model of :mod:`jaxbp.model`'s interface (:class:`jaxbp.MLP`,
        :class:`jaxbp.GPT`, yours): the batch is the model's (``x, labels, *, where,
        class_weights`` for an MLP; ``ids, targets, *, where`` for a GPT).
      l2_clip: ``C > 0``, finite.
      noise_multiplier: ``σ ≥ 0``; with ``σ > 0`` every call needs ``key``.
      batch_size: the divisor ``m``. ``None`` (default): the number of examples with
        something valid (at least 1), so padding examples contribute nothing and are not
        counted. For an MLP a huge ``C`` with ``σ = 0`` then gives exactly
        :func:`jaxbp.value_and_grad`'s mean gradient (for a GPT, the mean of the sequences'
        mean gradients: the same when every sequence has as many valid tokens). Pass the
        (expected) batch size for the fixed-denominator estimator of Poisson-sampled DP-SGD.
      method: ``"bookkeeping"`` (default): one backward pass; every parameter rule is run
        again on its residuals with ``g`` scaled by ``c_k/m`` on example ``k``'s rows.
        ``"two_pass"``: the model's backward loop again, seeded with ``c_k/m``. Neither
        materialises per-example gradients.
      return_loss: also return the (unclipped) mean loss over valid units, first:
        ``(loss, grads, per_example_norms)``, for logging in a training loop.

    Noise: one ``jax.random.split`` subkey per parameter leaf, in ``params``' leaf order.
    ``f.jitted(params, *batch, key)`` is the compiled step (:mod:`jaxbp._step`; ``l2_clip``
    and ``noise_multiplier`` are part of its configuration; ``key`` last, ``None`` without
    noise); both work under ``jax.vmap``/``jax.jit``.
    """
    check_model(model, "clipped_grad")
    l2_clip, noise_multiplier = check_clip_options(l2_clip, noise_multiplier, batch_size, method)
    config = (method, batch_size, l2_clip, noise_multiplier, bool(return_loss))
    step = _step.compiled(_clipped_grad_core, model, all_rules(), config)
    check_batch = checker(model)

    def check(params, *args, key=None, **kwargs):
        _check_key(key, noise_multiplier)
        return (*check_batch(params, *args, **kwargs), key if noise_multiplier > 0.0 else None)

    return _step.entry(step, check, "clipped_grad", clipped_grad.__doc__)


def forward_backward_weighted(model: Any, params, *batch, seed):
    """The model's loops seeded per unit: ``(losses, grads)``, ``grads`` the gradient of
    ``Σ seed·losses`` over valid units (``seed`` the shape of ``losses``). Unjitted (call it
    inside ``jax.jit``); no ``jax.grad``."""
    t = Tape()
    losses, valid, state = model.forward(t, params, *batch)
    model.backward(t, state, jnp.where(valid, jnp.asarray(seed).astype(losses.dtype), 0.0))
    return losses, t.gradients(params)


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


def _layer_contributions(a, delta):
    """The dense op's own per-example rule on a layer's input and output gradient."""
    a, delta = _check_layer(a, delta)
    w = jnp.zeros((a.shape[-1], delta.shape[-1]), a.dtype)
    b = jnp.zeros((delta.shape[-1],), a.dtype)
    return dense.example_grads((a, w, b), delta, examples=a.shape[0])


def dense_per_example_grads(a: jax.Array, delta: jax.Array) -> dict[str, jax.Array]:
    """Per-example gradients of a dense layer: ``{"w": (n, i, o), "b": (n, o)}``.

    Args:
      a: the layer's input, ``(n, i)`` or ``(n, t, i)``.
      delta: ``∂ℓ_k/∂z`` at the layer's output for each example's own loss, ``(n, o)`` or
        ``(n, t, o)``.

    ``w``: ``"ni,no->nio"`` (``"nti,nto->nio"`` with a sequence axis); ``b``: ``δ``
    (``"nto->no"``). This *does* materialise ``(n, i, o)``; see :func:`dense_grad_sq_norms`.
    """
    c = _layer_contributions(a, delta)
    return {name: materialize(v).astype(delta.dtype) for name, v in c.items()}


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
    c = _layer_contributions(a, delta)
    if a.ndim == 2:
        method = "auto"  # T = 1: the ghost product is ‖a‖²·‖δ‖²
    sq = sq_norm(c["w"], method=method)
    return sq + sq_norm(c["b"]) if bias else sq


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
