"""Performance target P11: attention backward (store and recompute) vs autodiff of plain attention.

Index letters: n batch, h heads, t query = key positions (causal self-attention), e head dim.
Sizes: n 1, h 4, e 64 (small enough for a CPU), t ∈ {128, 256, 512, 1024, 2048}; float32
unless ``--dtype`` says otherwise.

``P11/step-{strategy}-t{t}``  forward + backward, what a training step pays: A is
    ``jit(q, k, v, g ↦ jax.vjp(jaxbp.attention, q, k, v)[1](g))`` with that ``strategy``, B
    the same of ``jaxbp.reference.attention`` (``jax.nn.softmax`` with the causal mask,
    JAX's autodiff), and the same of ``jax.nn.dot_product_attention(..., is_causal=True)``
    timed beside them (the peer a user would call). Time ratio and compiled temporary
    memory ratio (``memory_ratio``): the residuals (``P (n, h, t, s)`` for store and
    autodiff, ``L (n, h, t)`` for recompute) are temporaries of the step.
``P11/bwd-{strategy}-t{t}``  the backward alone: A ``attention_bwd(res, g)`` with the
    residuals of ``attention_fwd`` passed in, B the backward of ``jax.vjp`` of the plain
    attention (its residuals passed in as a ``Partial``), as P4 does for softmax.
``P11/growth-recompute-t{t}``  compile only: the recompute step's temporary memory per byte
    of one ``(n, h, t, e)`` array, at ``2t`` ÷ at ``t``. That normalisation takes out the
    ``(t, e)``-sized arrays (queries, accumulators, ``(block, s)`` tiles with ``s = t``): a
    memory linear in ``t`` gives 1.0, a ``(t, s)`` array 2.0. Target ≤ 1.1 (P11: "flat in
    t² terms"). ``P11/growth-store-t{t}`` records the same for store (no target: it keeps
    ``P``, so it is 2). At t = 128 recompute is one block of queries (the store computation);
    128 → 256 adds the loop's fixed overhead, so that first doubling reads 1.17 (see
    benchmarks/README.md).

FLOPs (causal masking is applied by selection, so every score is computed): forward
``4·n·h·t²·e`` (``q·kᵀ`` and ``P·v``); backward ``8·n·h·t²·e`` (``dv``, ``dP``, ``dq``,
``dk``), plus ``2·n·h·t²·e`` to recompute ``S`` for ``"recompute"``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import jaxbp
from benchmarks.harness import Case, Custom, Pair, Target, register

N, H, E = 1, 4, 64
T_ALL = (128, 256, 512, 1024, 2048)
T_QUICK = (128, 512)
STRATEGIES = ("store", "recompute")


def _plain(q, k, v):
    return jaxbp.reference.attention(q, k, v, causal=True)


def _jax_nn(q, k, v):
    """``jax.nn.dot_product_attention`` (its layout ``(n, t, h, e)``; the transposes in and out
    are part of this side, and XLA folds them into the products)."""
    swap = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
    return swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v), is_causal=True))


def _step(att):
    """``jit`` of forward + backward: ``(q, k, v, g) ↦ (dq, dk, dv)`` via ``jax.vjp``."""

    def step(q, k, v, g):
        _, vjp = jax.vjp(att, q, k, v)
        return vjp(g)

    return jax.jit(step)


def _attention(strategy):
    return functools.partial(jaxbp.attention, causal=True, strategy=strategy)


def _arrays(ctx, t):
    ks = jax.random.split(ctx.key(t), 4)
    return tuple(jax.random.normal(k, (N, H, t, E), jnp.float32).astype(ctx.dtype) for k in ks)


def _flops(t, strategy, backward_only=False):
    unit = 2.0 * N * H * t * t * E  # one (t, s, e) matmul
    bwd = 4 * unit + (unit if strategy == "recompute" else 0.0)
    return bwd if backward_only else 2 * unit + bwd


def build_step(ctx, t: int, strategy: str) -> Pair:
    return Pair(
        candidate=_step(_attention(strategy)),
        baseline=_step(_plain),
        args=_arrays(ctx, t),
        flops=_flops(t, strategy),
        baseline_flops=_flops(t, "store"),
        shapes={"n": N, "h": H, "t": t, "e": E, "strategy": strategy},
        labels=(f"jaxbp.attention ({strategy})", "jax.vjp(plain attention)"),
        sides={"jax.nn.dot_product_attention": (_step(_jax_nn), _arrays(ctx, t))},
        notes="forward + backward under one jit; causal self-attention",
    )


def _bwd_only(res, g, *, strategy):
    return jaxbp.attention.bwd(res, g, causal=True, strategy=strategy)[:3]


def _vjp_bwd(vjp_fn, g):
    return vjp_fn(g)


def build_bwd(ctx, t: int, strategy: str) -> Pair:
    q, k, v, g = _arrays(ctx, t)
    _, res = jaxbp.attention.fwd(q, k, v, causal=True, strategy=strategy)
    _, vjp_fn = jax.vjp(_plain, q, k, v)  # a Partial: its residuals are jit arguments
    return Pair(
        candidate=jax.jit(functools.partial(_bwd_only, strategy=strategy)),
        baseline=jax.jit(_vjp_bwd),
        args=(res, g),
        baseline_args=(vjp_fn, g),
        flops=_flops(t, strategy, backward_only=True),
        baseline_flops=_flops(t, "store", backward_only=True),
        shapes={"n": N, "h": H, "t": t, "e": E, "strategy": strategy},
        labels=(f"attention_bwd ({strategy})", "backward of jax.vjp(plain attention)"),
        notes="backward only, residuals passed in",
    )


def _temp_per_array(t, dtype, strategy) -> tuple[int, float]:
    """Compiled temporary bytes of the step at ``t``, and that ÷ bytes of one (n, h, t, e)."""
    spec = jax.ShapeDtypeStruct((N, H, t, E), dtype)
    compiled = _step(_attention(strategy)).lower(spec, spec, spec, spec).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    return temp, temp / (N * H * t * E * jnp.dtype(dtype).itemsize)


def build_growth(ctx, t: int, strategy: str) -> Custom:
    temp_t, per_t = _temp_per_array(t, ctx.dtype, strategy)
    temp_2t, per_2t = _temp_per_array(2 * t, ctx.dtype, strategy)
    return Custom(
        metrics={
            "temp_bytes_t": temp_t,
            "temp_bytes_2t": temp_2t,
            "temp_per_array_t": per_t,
            "temp_per_array_2t": per_2t,
            "growth": per_2t / per_t,
        },
        shapes={"n": N, "h": H, "t": t, "e": E, "strategy": strategy},
        notes=(
            "compiled temporary bytes of the forward+backward step per byte of one "
            "(n, h, t, e) array, at 2t ÷ at t (1.0: linear in t; 2.0: a (t, s) array)"
        ),
    )


for _strategy in STRATEGIES:
    for _t in T_ALL:
        register(
            Case(
                id=f"P11/step-{_strategy}-t{_t}",
                group="P11",
                title=f"attention forward+backward ({_strategy}) ÷ jax.vjp of plain attention",
                build=functools.partial(build_step, t=_t, strategy=_strategy),
                targets=(Target("memory_ratio", "<=", 1.0, note="no more memory than autodiff"),)
                if _strategy == "store"
                else (),
                quick=_t in T_QUICK,
            )
        )
        register(
            Case(
                id=f"P11/bwd-{_strategy}-t{_t}",
                group="P11-bwd",
                title=f"attention backward ({_strategy}) ÷ backward of jax.vjp",
                build=functools.partial(build_bwd, t=_t, strategy=_strategy),
                quick=_t in T_QUICK,
            )
        )
    for _t in T_ALL[:-1]:
        register(
            Case(
                id=f"P11/growth-{_strategy}-t{_t}",
                group="P11-growth",
                title=f"attention step ({_strategy}): temporary memory per (t, e) array, 2t ÷ t",
                build=functools.partial(build_growth, t=_t, strategy=_strategy),
                targets=(Target("growth", "<=", 1.1, note="P11: flat in t² terms"),)
                if _strategy == "recompute"
                else (),
            )
        )
