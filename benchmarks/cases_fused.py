"""docs/performance.md P5–P6: fused linear + softmax cross-entropy vs full-logits ``jax.grad``.

Index letters: n tokens, d model dimension, v vocabulary.

Side A: ``jit(value_and_grad)`` of ``mean(jaxbp.linear_softmax_cross_entropy(x, w, labels))``
w.r.t. ``(x, w)``, for each strategy (``recompute``, ``forward``). Side B: the same of
``jaxbp.reference.linear_softmax_cross_entropy`` (full ``(n, v)`` logits, JAX's autodiff).

P5  compiled temporary memory A/B (``memory_ratio``) at n 4096, d 512, v {16384, 32768,
    65536}; and ``P5/growth``: A's temporary bytes at 2v ÷ at v (compile only).
P5  also against the strongest plain baseline, optax's
    ``softmax_cross_entropy_with_integer_labels`` on full logits ``x·w`` under
    ``jit(value_and_grad)`` (``P5/optax-*``): time ≤ 1.05 and temporary memory ≤ 0.05.
P6  time A/B (``ratio``) for both strategies; on a GPU also n 8192, d 2304, v 256000 in
    bfloat16 (skipped elsewhere), where the harness adds the device's peak bytes.
``--quick``: n 512, d 64, the same vocabularies (so that the memory ratios, which depend
on chunk/v and not on n, stay meaningful).

The P5 memory targets are attached to the ``recompute`` strategy (the default) only: the
``forward`` strategy keeps a float32 ``(d, v)`` gradient in its residuals and ``(k, v)``
token chunks by design (docs/fused.md), so its memory is recorded without a target.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

import jaxbp
from benchmarks.harness import Case, Custom, Pair, Skip, Target, register

CPU_VOCABS = (16384, 32768, 65536)
N, D = 4096, 512
QUICK_N, QUICK_D = 512, 64


def loss_and_grad(op, **kw):
    """``jit(value_and_grad)`` of the mean loss w.r.t. ``(x, w)``."""

    def mean_loss(x, w, labels):
        return jnp.mean(op(x, w, labels, **kw))

    return jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1)))


def _arrays(ctx, n, d, v, dtype):
    kx, kw, ky = jax.random.split(ctx.key(n + d + v), 3)
    x = jax.random.normal(kx, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (d, v), jnp.float32) / d**0.5).astype(dtype)
    labels = jax.random.randint(ky, (n,), 0, v, jnp.int32)
    return x, w, labels


def _build(ctx, n, d, v, strategy, dtype=None, gpu_only=False):
    if gpu_only and ctx.backend != "gpu":
        return Skip("GPU-only size (n 8192, d 2304, v 256000): the full-logits side needs ~25 GB")
    dtype = ctx.dtype if dtype is None else dtype
    flops_fused = (8 if strategy == "recompute" else 6) * n * d * v
    return Pair(
        candidate=loss_and_grad(jaxbp.linear_softmax_cross_entropy, strategy=strategy),
        baseline=loss_and_grad(jaxbp.reference.linear_softmax_cross_entropy),
        args=_arrays(ctx, n, d, v, dtype),
        flops=float(flops_fused),
        baseline_flops=float(6 * n * d * v),
        shapes={"n": n, "d": d, "v": v, "strategy": strategy, "dtype": jnp.dtype(dtype).name},
        labels=(f"fused ({strategy})", "full-logits jit(grad)"),
        notes="A: hand-written chunked backward; B: jax.grad of the (n, v) logits",
    )


def _optax_loss_and_grad():
    """``jit(value_and_grad)`` of optax's integer-label CE on the full ``(n, v)`` logits."""

    def mean_loss(x, w, labels):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ w, labels))

    return jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1)))


def _build_optax(ctx, n, d, v):
    pair = _build(ctx, n, d, v, "recompute")
    pair.baseline = _optax_loss_and_grad()
    pair.labels = ("fused (recompute)", "optax full-logits jit(grad)")
    pair.notes = "A: hand-written chunked backward; B: optax integer-label CE on (n, v) logits"
    return pair


def _temp_bytes(n, d, v, dtype, strategy):
    args = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    f = loss_and_grad(jaxbp.linear_softmax_cross_entropy, strategy=strategy)
    return f.lower(*args).compile().memory_analysis().temp_size_in_bytes


def _growth(ctx, n, d, v, strategy):
    small = _temp_bytes(n, d, v, ctx.dtype, strategy)
    big = _temp_bytes(n, d, 2 * v, ctx.dtype, strategy)
    return Custom(
        metrics={"temp_bytes_v": small, "temp_bytes_2v": big, "growth": big / small},
        shapes={"n": n, "d": d, "v": v, "strategy": strategy},
        notes="compiled temporary bytes of the fused value_and_grad at 2v ÷ at v",
    )


_TIME = {"recompute": 1.35, "forward": 1.10}

for _strategy in ("recompute", "forward"):
    for _v in CPU_VOCABS:
        targets = [
            Target("ratio", "<=", _TIME[_strategy], note=f"P6 ({_strategy})"),
            Target("ratio", "<=", 1.0, backends=("gpu",), note="P6 on GPU"),
        ]
        if _v == 32768 and _strategy == "recompute":
            targets.append(Target("memory_ratio", "<=", 0.05, note="P5"))
        register(
            Case(
                id=f"P5/{_strategy}-v{_v}",
                group="P5",
                title=f"fused linear+softmax-CE ({_strategy}) vs full-logits grad, n {N} d {D}",
                build=functools.partial(_build, n=N, d=D, v=_v, strategy=_strategy),
                quick_build=functools.partial(
                    _build, n=QUICK_N, d=QUICK_D, v=_v, strategy=_strategy
                ),
                quick_title=f"fused linear+softmax-CE ({_strategy}) vs full-logits grad, "
                f"n {QUICK_N} d {QUICK_D}",
                targets=tuple(targets),
            )
        )
    register(
        Case(
            id=f"P5/growth-{_strategy}-v32768",
            group="P5",
            title=f"fused ({_strategy}) temporary memory when v doubles, n {N} d {D}",
            build=functools.partial(_growth, n=N, d=D, v=32768, strategy=_strategy),
            quick_build=functools.partial(
                _growth, n=QUICK_N, d=QUICK_D, v=32768, strategy=_strategy
            ),
            quick_title=f"fused ({_strategy}) temporary memory when v doubles, n {QUICK_N} "
            f"d {QUICK_D}",
            targets=(Target("growth", "<=", 1.1, note="P5: memory independent of v"),)
            if _strategy == "recompute"
            else (),
        )
    )
    register(
        Case(
            id=f"P6/{_strategy}-gpu-v256000-bf16",
            group="P6",
            title=f"fused ({_strategy}), n 8192 d 2304 v 256000, bfloat16 (GPU only)",
            build=functools.partial(
                _build,
                n=8192,
                d=2304,
                v=256000,
                strategy=_strategy,
                dtype=jnp.bfloat16,
                gpu_only=True,
            ),  # fmt: skip
            targets=(
                Target("ratio", "<=", 1.0, backends=("gpu",), note="P6 on GPU"),
                *(
                    (Target("memory_ratio", "<=", 0.05, backends=("gpu",), note="P5, LLM size"),)
                    if _strategy == "recompute"
                    else ()
                ),
            ),
            quick=False,
        )
    )

for _v in CPU_VOCABS:
    register(
        Case(
            id=f"P5/optax-v{_v}",
            group="P5",
            title=f"fused (recompute) vs optax on full logits, n {N} d {D}",
            build=functools.partial(_build_optax, n=N, d=D, v=_v),
            quick_build=functools.partial(_build_optax, n=QUICK_N, d=QUICK_D, v=_v),
            quick_title=f"fused (recompute) vs optax on full logits, n {QUICK_N} d {QUICK_D}",
            targets=(
                Target("ratio", "<=", 1.05, note="P5 vs optax"),
                Target("memory_ratio", "<=", 0.05, note="P5 vs optax"),
            ),
        )
    )
