"""The GGN's diagonal and KFAC factors of any model, from its loss's factor columns carried
back through the model's own reverse loop.

Index letters::

    n  examples (the leading axis of the model's losses)
    P  unit positions within an example (1 for an MLP row; t tokens for a GPT)
    c  logits of a unit (classes, vocabulary, outputs)
    k  columns of a unit's factor (c, or c + 1 with a z-loss)
    m  columns carried back: P·k (exact) or ``samples`` (mc)
    i, o  a dense layer's input and output features

The mean loss's GGN is ``G = Σ_u J_uᵀ·(g·H_u)·J_u`` (``g = 1/N`` the mean's seed, 0 on masked
units), and each loss op gives a factor ``S_u (c, k)`` with ``S_u·S_uᵀ = g·H_u``
(``op.hessian_factor``; :mod:`jaxbp._losscurv`). So ``G = Σ_u Σ_j (J_uᵀ s_uj)(J_uᵀ s_uj)ᵀ``
over the columns ``s_uj``: one backward pass per column, with the column as the loss's
logits cotangent (``op.logits_bwd`` in place of its ``bwd``; the model's reverse loop
carries it down, :class:`jaxbp.Tape`'s ``backward_rule``).

**Diagonal.** ``diag(G) = Σ_n Σ_cols (per-example gradient of the column)²``: the columns
of one example mix in no other example's gradient, so one pass carries the same column
position ``(p, j)`` of every example at once and the per-example contributions
(:mod:`jaxbp._contrib`, each op's ``example_grads``) give each example's share, squared
per example (a dense layer with one row per example: ``Σ_n (x_n²)ᵀ(δ_n²)`` "ni,no->io",
never ``(n, i, o)``; elsewhere the per-example gradients are formed). A token's logits
depend on every earlier position, so a sequence needs a pass per ``(token, column)``:
``m = t·k`` passes (``vmap``-ed), each the cost of one backward of the batch with
per-example gradients: fine for small models, ``t·v`` times a step for a GPT.

**Monte Carlo.** ``s = op.sample_bwd``'s column (``E[s·sᵀ] = g·H``, a label drawn from the
model's own distribution per unit): one pass carries every unit's sample; the cross terms
between the units of one example vanish in expectation (independent draws, ``E[s] = 0``),
so the squared per-example gradients are unbiased for ``diag(G)``. ``samples`` averages
that many draws (``m = samples`` passes).

**KFAC** (Martens & Grosse 2015; Botev et al. 2017 for the exact columns, "KFLR"). For a
dense layer ``y = x·w + b`` called at units ``u`` (its rows), with ``ā = [x_u, 1]`` and the
output gradient ``δ_u,col`` of each carried column::

    A = Σ_u valid_u·ā_u·ā_uᵀ / N         (i+1, i+1)   the mean over the N valid units
    G = Σ_cols Σ_u δ_u,col·δ_u,colᵀ       (o, o)       the 1/N rides in the seed

and ``A ⊗ G`` approximates the GGN block of ``[w; b]`` (``(i+1)·o`` square) in the layout
``vec([w; b])`` row-major, ``w (i, o)`` then ``b`` as row ``i``: the entry
``((a, o), (a', o'))`` is ``A[a, a']·G[o, o']`` (``jnp.kron(A, G)``). It is exact when
one unit carries the whole loss (``N = 1``: the block is ``ā·āᵀ ⊗ Σ_j δ_j·δ_jᵀ``), e.g. a
deep linear network with MSE on one example; otherwise it assumes ``ā`` and ``δ``
independent across units. With ``method="mc"``, ``G`` is the
average over ``samples`` draws (unbiased for the exact columns' ``G``). The fused LM head
is a dense layer too: its ``A`` from its input rows, its ``G`` from the columns at its
logits (``(v, v)``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks, _step
from ._contrib import Outer, Rows, materialize
from ._op import all_rules, bwd_options, curvature_of
from ._tape import Tape, _keystr, assemble
from .dense import dense
from .model import check_model, checker, mean_and_seed
from .per_example import contributions

__all__ = ["METHODS", "diag_ggn", "kfac_factors"]

METHODS = ("exact", "mc")


def _is_loss(op: Any) -> bool:
    return any(rule is not None for rule in curvature_of(op))


def _has_params(op: Any) -> bool:
    return any(a not in op.per_example_args for a in op.arg_names)


def _needs(op: Any, method: str) -> dict[str, Callable | None]:
    """The rules ``method`` asks of the loss op, or a ``TypeError`` naming the op."""
    want = {"logits_bwd": getattr(op, "logits_bwd", None)}
    if method == "exact":
        want["hessian_factor"] = getattr(op, "hessian_factor", None)
    elif _has_params(op):
        want["sample_logits"] = getattr(op, "sample_logits", None)  # the column at z itself
    else:
        want["sample_bwd"] = getattr(op, "sample_bwd", None)
    missing = [name for name, rule in want.items() if rule is None]
    if missing:
        raise TypeError(
            f"{op.name}: has no {' or '.join(missing)}, which the {method} curvature "
            f"columns need of a loss op (jaxbp.Op(..., curvature={{...}}), docs/curvature.md)"
        )
    return want


class _Probe(Tape):
    """A plain backward that records each loss op's ``(op, res, g, options)``."""

    def __init__(self):
        super().__init__("rules")
        self.losses: list[tuple] = []

    def backward_rule(self, op, bwd):
        if not _is_loss(op):
            return bwd

        def rule(res, g, **options):
            self.losses.append((op, res, g, options))
            return bwd(res, g, **options)

        rule.__signature__ = inspect.signature(bwd)
        return rule


class _Column(Tape):
    """The reverse loop for one carried column ``dz (*B, c)``: the loss op's cotangents are
    ``op.logits_bwd(res, dz)``; its own parameter records are kept apart (their
    per-example rule would read ``g``, not ``dz``)."""

    def __init__(self, dz):
        super().__init__("rules")
        self.dz = dz

    def backward_rule(self, op, bwd):
        if not _is_loss(op):
            return bwd

        def rule(res, g, **options):
            del g
            return op.logits_bwd(res, self.dz, **bwd_options(op.logits_bwd, options))

        rule.__signature__ = inspect.signature(bwd)
        return rule

    def parameter_records(self):
        return [r for r in self.records if r.params and not _is_loss(r.op)]

    def head_records(self):
        return [r for r in self.records if r.params and _is_loss(r.op)]


def _probe(model, params, batch, method):
    """Forward once, a plain backward to find the loss op: ``(state, seed, n, valid, loss,
    tape)`` with ``loss = (op, res, g, options)``; ``TypeError`` naming the op that starts
    the backward loop when no op there has curvature rules."""
    t = _Probe()
    losses, valid, state = model.forward(t, params, *batch)
    _, seed = mean_and_seed(losses, valid)
    model.backward(t, state, seed)
    if not t.losses and t.records:
        raise TypeError(
            f"{t.records[0].op.name}: has no curvature rules (hessian_factor, logits_bwd, "
            f"sample_bwd), which the curvature columns need of the loss op that starts "
            f"{type(model).__name__}'s backward loop (jaxbp.Op(..., curvature={{...}}))"
        )
    if len(t.losses) != 1:
        raise TypeError(
            f"model: the curvature columns need exactly one loss op with curvature rules "
            f"(op.hessian_factor, op.sample_bwd, ...) in {type(model).__name__}'s backward "
            f"loop, found {len(t.losses)}"
        )
    _needs(t.losses[0][0], method)
    return state, seed, losses.shape[0], valid, t.losses[0], t


def _exact_columns(loss, n):
    """``(m, *B, c)``: every column ``(p, j)`` of the factor at position ``p`` alone."""
    op, res, g, options = loss
    s = op.hessian_factor(res, g, **bwd_options(op.hessian_factor, options))  # (*B, c, k)
    shape, (c, k) = s.shape[:-2], s.shape[-2:]
    s = s.reshape(n, -1, c, k)  # (n, P, c, k), examples first
    positions = s.shape[1]
    cols = jnp.einsum("npcj,pq->pjnqc", s, jnp.eye(positions, dtype=s.dtype))
    return cols.reshape(positions * k, *shape, c)


def _mc_columns(loss, key, samples):
    """``(samples, *B, c)``: one Monte-Carlo column per unit and draw."""
    op, res, g, options = loss
    if _has_params(op):
        opts = bwd_options(op.sample_logits, options)
        return jax.vmap(lambda k: op.sample_logits(res, g, k, **opts))(
            jax.random.split(key, samples)
        )  # fmt: skip
    opts = bwd_options(op.sample_bwd, options)
    return jax.vmap(lambda k: op.sample_bwd(res, g, k, **opts)[0])(
        jax.random.split(key, samples)
    )  # fmt: skip


# The columns carried back at once: as many as keep about this many bytes of the forward's
# residuals (a proxy for one column's backward temporaries) in flight; the rest in sequence.
COLUMN_BYTES = 512 * 2**20


def _sum_over_columns(one: Callable, cols: jax.Array, state: Any) -> Any:
    """``Σ_j one(cols[j])`` (a pytree): the columns vmapped in batches that keep about
    :data:`COLUMN_BYTES` in flight, the batches summed in a ``lax.scan`` (a GPT's exact
    ``t·v`` columns never run all at once). The last batch is padded with zero columns,
    which add exactly nothing (every result is quadratic in its column)."""
    m = cols.shape[0]
    per_column = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state)
                     if hasattr(a, "dtype"))  # fmt: skip
    size = max(1, min(m, COLUMN_BYTES // max(1, per_column)))

    def batch_sum(chunk):
        return jax.tree.map(lambda a: jnp.sum(a, axis=0), jax.vmap(one)(chunk))

    if size == m:
        return batch_sum(cols)
    batches = -(-m // size)
    pad = jnp.zeros((batches * size - m, *cols.shape[1:]), cols.dtype)
    chunks = jnp.concatenate([cols, pad]).reshape(batches, size, *cols.shape[1:])
    total = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(batch_sum, chunks[0])
    )
    total, _ = jax.lax.scan(
        lambda acc, chunk: (jax.tree.map(jnp.add, acc, batch_sum(chunk)), None), total, chunks
    )  # fmt: skip
    return total


def _columns(model, params, batch, method, samples, key):
    state, seed, n, valid, loss, probe = _probe(model, params, batch, method)
    cols = _exact_columns(loss, n) if method == "exact" else _mc_columns(loss, key, samples)
    scale = 1.0 if method == "exact" else 1.0 / samples
    return state, seed, n, valid, loss, probe, cols, scale


def _head_example_grads(rec, dz, n):
    """``{path: (n, *shape)}``: a loss op's own parameters per example, ``logits_bwd`` of
    ``dz`` kept to one example at a time (the op's ``example_grads`` would read ``g``)."""
    op = rec.op
    opts = bwd_options(op.logits_bwd, rec.options)

    def one(e):
        mask = (jnp.arange(n) == e).astype(dz.dtype)
        kept = (dz.reshape(n, -1) * mask[:, None]).reshape(dz.shape)
        return op.logits_bwd(rec.res, kept, **opts)

    cts = jax.vmap(one)(jnp.arange(n))
    out = {}
    for i, (_, path, flip) in rec.params.items():
        out[path] = jnp.swapaxes(cts[i], -1, -2) if flip else cts[i]
    return out


def _acc(a):
    return a.astype(_checks.accum_dtype(a.dtype))


def _squares(cs: list) -> jax.Array:
    """``Σ_n G_n²`` of a leaf's per-example gradient ``G_n = Σ cs``: one row per example
    ``Σ_n (a_n²)ᵀ(b_n²)``, else the per-example gradients formed and squared."""
    if len(cs) == 1 and isinstance(cs[0], Outer):
        left, right = cs[0].left, cs[0].right
        if isinstance(left, Rows) and isinstance(right, Rows) and left.rows == 1:
            return jnp.einsum("nta,ntb->ab", _acc(left.a) ** 2, _acc(right.a) ** 2)
    total = sum(materialize(c) if not isinstance(c, jax.Array) else _acc(c) for c in cs)
    return jnp.sum(total**2, axis=0)


def _diag_core(model, rules, method, samples, params, *args):
    del rules  # the cache key only
    *batch, key = args
    state, seed, n, _, _, _, cols, scale = _columns(model, params, batch, method, samples, key)

    paths = {}

    def one(dz):
        t = _Column(dz)
        model.backward(t, state, seed)
        per_leaf = contributions(t, n)
        for rec in t.head_records():
            for path, g in _head_example_grads(rec, dz, n).items():
                per_leaf.setdefault(path, []).append(g)
        paths.update({_keystr(p): p for p in per_leaf})
        return {_keystr(p): _squares(cs) for p, cs in per_leaf.items()}

    total = jax.tree.map(lambda a: scale * a, _sum_over_columns(one, cols, state))
    return assemble(params, {paths[k]: v for k, v in total.items()}, what="GGN diagonal")


def _check(model, method, samples):
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected a positive int, got {samples!r}")
    if method == "exact" and samples != 1:
        raise ValueError(f"samples: only for method='mc', got {samples} with method='exact'")
    check_batch = checker(model)

    def check(params, *args, key=None, **kwargs):
        if method == "mc" and key is None:
            raise TypeError("key: method='mc' draws its columns and needs key=jax.random.key(…)")
        if method == "exact" and key is not None:
            raise TypeError("key: method='exact' draws nothing, expected no key")
        return (*check_batch(params, *args, **kwargs), key)

    return check


def diag_ggn(model: Any, method: str = "exact", samples: int = 1) -> Callable:
    """``f(params, *batch, key=None) -> diag(G)``, a pytree like ``params``: the diagonal of
    the generalised Gauss–Newton matrix of the model's mean loss (the one
    :func:`jaxbp.ggn_vector_product` multiplies by).

    ``method="exact"``: every column of every unit's loss factor carried back (module
    docstring: ``P·k`` backward passes with per-example gradients, vmapped; a GPT's ``P``
    is its ``t`` tokens, ``k`` its vocabulary). ``method="mc"``: ``samples`` Monte-Carlo
    columns per unit drawn from the model's own distribution (``key`` needed), unbiased,
    their error shrinking as ``1/√samples``. For a :class:`jaxbp.MLP`: ``f(params, x (n, i),
    labels, *, where=None, class_weights=None, key=None)``; for a :class:`jaxbp.GPT`:
    ``f(params, ids (n, t), targets (n, t), *, where=None, key=None)``. Masked units count
    for nothing. ``f.jitted(params, *batch, key)`` is the compiled step.

    Raises:
      ValueError: ``method`` not one of ``"exact"``, ``"mc"``; ``samples`` not a positive
        int, or given with ``"exact"``.
      TypeError: ``method="mc"`` without ``key`` (or a key with ``"exact"``); a loss op
        without the rules needed (``hessian_factor``/``logits_bwd``; ``sample_bwd``), an
        op with parameters without ``example_grads`` (naming the op); what
        :func:`jaxbp.value_and_grad` raises for the batch.
    """
    check_model(model, "diag_ggn")
    check = _check(model, method, samples)
    step = _step.compiled(_diag_core, model, all_rules(), method, samples)
    return _step.entry(step, check, "diag_ggn", diag_ggn.__doc__)


# ------------------------------------------------------------------------------- KFAC


def _input_rows(rec, valid):
    """``(ā (R, i[+1]), weights (R,))``: the layer's input rows with a ones column where it
    has a bias, weighted by the units' validity where the rows are the units."""
    x, b = rec.res[0], rec.res[2]  # dense (x, w, b); the fused head (x, w, b, …)
    rows = _acc(x.reshape(-1, x.shape[-1]))
    if b is not None:
        rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)
    flat = valid.reshape(-1)
    weights = flat if flat.shape[0] == rows.shape[0] else jnp.ones(rows.shape[:1], bool)
    return rows, weights.astype(rows.dtype)


def _w_path(rec) -> str:
    for name, path, _ in rec.params.values():
        if name == "w":
            return _keystr(path)
    raise TypeError(f"{rec.op.name}: sends no w to a parameter leaf")


def _layers(t: Tape) -> list:
    """The dense layers' records (each ``jaxbp.dense`` call with parameters, and a loss op
    with parameters: the fused head), in the order the backward loop met them."""
    return [r for r in t.records if r.params and (r.op is dense or _is_loss(r.op))]


def _kfac(model, method, samples, params, *args):
    *batch, key = args
    state, seed, n, valid, _, probe, cols, scale = _columns(
        model, params, batch, method, samples, key
    )  # fmt: skip
    out = {}
    for rec in _layers(probe):
        path = _w_path(rec)
        if path in out:
            raise ValueError(f"params{path}: reached by two dense layers; KFAC keys one each")
        rows, weights = _input_rows(rec, valid)
        count = jnp.maximum(jnp.sum(weights), 1.0)
        out[path] = {"A": jnp.einsum("r,ra,rb->ab", weights, rows, rows) / count}

    def one(dz):
        t = _Column(dz)
        model.backward(t, state, seed)
        gs = {}
        for rec in _layers(t):
            d = dz if _is_loss(rec.op) else rec.g
            d = _acc(d.reshape(-1, d.shape[-1]))
            gs[_w_path(rec)] = d.T @ d  # "ro,rp->op"
        return gs

    gs = jax.tree.map(lambda a: scale * a, _sum_over_columns(one, cols, state))
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return {p: {"A": f["A"].astype(dtype), "G": gs[p].astype(dtype)} for p, f in out.items()}


def _kfac_step(model, rules, method, samples, params, *args):
    del rules  # the cache key only
    return _kfac(model, method, samples, params, *args)


def kfac_factors(model: Any, method: str = "exact", samples: int = 1) -> Callable:
    """``f(params, *batch, key=None) -> {path: {"A": (i+1, i+1), "G": (o, o)}}``: KFAC's
    Kronecker factors of every dense layer of the model's loop (each :func:`jaxbp.dense`
    call, and the fused LM head), for the model's mean loss.

    Keyed by the parameter path the loop sends the layer's ``w (i, o)`` to, as
    ``jax.tree_util.keystr`` writes it (``"[0]['w']"`` for an MLP's first layer,
    ``"['blocks'][0]['attn']['qkv']['w']"``, ``"['head']['w']"``; a tied head's is
    ``"['tok']"``, whose leaf enters transposed). With ``ā = [a, 1]`` the layer's input
    rows with a ones column (``(i, i)`` without a bias) and ``δ`` its output gradient for
    each carried column (module docstring)::

        A = Σ_u ā_u·ā_uᵀ / N   over the N valid units        (i+1, i+1)
        G = Σ_cols Σ_u δ_u·δ_uᵀ, the seed's 1/N inside       (o, o)

    so that ``jnp.kron(A, G)`` approximates the GGN block of ``vec([w; b])`` (``w`` row-major
    ``(i, o)``, ``b`` as its last row ``i``), exactly when one unit carries the loss.
    ``method="exact"``: the loss factor's columns (KFLR; a GPT's columns per ``(token,
    column)``, as :func:`diag_ggn`); ``"mc"``: ``samples`` Monte-Carlo columns (``key``
    needed). Arguments and errors as :func:`diag_ggn`; ``f.jitted(params, *batch,
    key)`` is the compiled step.
    """
    check_model(model, "kfac_factors")
    check = _check(model, method, samples)
    step = _step.compiled(_kfac_step, model, all_rules(), method, samples)
    return _step.entry(step, check, "kfac_factors", kfac_factors.__doc__)
