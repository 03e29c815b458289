"""P10: a GPT training step, the explicit reverse loop ÷ ``jit(value_and_grad)`` of the twin;
P12, P13: per-example gradient norms and the DP-SGD gradient of the GPT (below).

Index letters: n sequences, t positions, d width, h heads, l layers, v vocabulary.

A = ``jaxbp.value_and_grad(gpt).jitted`` (forward through the ``_fwd`` rules, then their
``_bwd`` rules in reverse, the head through the fused loss), B =
``jaxbp.reference.value_and_grad(gpt).jitted`` (``jax.jit(jax.value_and_grad)`` of the
plain-jnp twin: full logits and optax's integer-label cross-entropy), and beside them the
GPT a Flax user writes from NNX modules (benchmarks/peer_nnx.py; when flax is installed),
judged by ``ratio_vs_nnx`` (A ÷ it, medians) and ``memory_ratio_vs_nnx``, and A's entry
inside a user's own ``jax.jit`` (``user-jit``: the ids traced, as a training loop has them).
Character
vocabulary v = 65 as in ``jaxbp train --model gpt``; 4 layers; two sizes on CPU, one with a
32768-word vocabulary, a larger one in bfloat16 on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import jaxbp
from benchmarks import peer_nnx
from benchmarks.cases_core import in_user_jit
from benchmarks.harness import (
    AgreementError,
    Case,
    Pair,
    Skip,
    Target,
    default_compare,
    register,
    tolerance_for,
)

VOCAB = 65


def gpt_flops(model: jaxbp.GPT, n: int, t: int) -> float:
    """Matmul FLOPs of one step: 6 per weight per token (forward 2, backward 4), plus the
    attention products ``q·kᵀ`` and ``P·v`` (forward 2·2·t·t·d per sequence, backward twice
    that), causal masking not subtracted."""
    d, f, v = model.d, model.mlp_ratio * model.d, model.vocab
    weights = model.layers * (d * 3 * d + d * d + d * f + f * d) + d * v
    attn = model.layers * 2 * 2 * t * t * d
    return float(n * (6 * t * weights + 3 * attn))


def _nnx_side(model, params, x, y):
    """The Flax NNX GPT (benchmarks/peer_nnx.py) as an extra side, or why it is skipped."""
    if not peer_nnx.available():
        return Skip("flax is not installed (pip install 'jaxbp[modules]')")
    step, state = peer_nnx.step_for(model, params)
    return step, (state, x, y)


def _vs_nnx(rec) -> dict:
    """A ÷ the Flax NNX step: time (medians) and compiled temporary memory."""
    m, mem = rec["metrics"], rec.get("memory", {})
    if "time_flax.nnx" not in m:
        return {}
    out = {"ratio_vs_nnx": m["time_a"] / m["time_flax.nnx"]}
    a, b = mem.get("A") or {}, mem.get("flax.nnx") or {}
    if a.get("temp_size_in_bytes") and b.get("temp_size_in_bytes"):
        out["memory_ratio_vs_nnx"] = a["temp_size_in_bytes"] / b["temp_size_in_bytes"]
    return out


def build_gpt(ctx, n: int, t: int, d: int, heads: int, layers: int = 4, gpu_only=False,
              vocab: int = VOCAB):  # fmt: skip
    if gpu_only and ctx.backend != "gpu":
        return Skip(f"GPU-only size (n {n}, t {t}, d {d}): minutes per step on a CPU")
    model = jaxbp.GPT(vocab=vocab, d=d, heads=heads, layers=layers, context=t)
    kp, ki = jax.random.split(ctx.key(n * 31 + t + d))
    params = model.init(kp, ctx.dtype)
    ids = jax.random.randint(ki, (n, t + 1), 0, vocab, jnp.int32)
    x, y = ids[:, :-1], ids[:, 1:]
    flops = gpt_flops(model, n, t)
    return Pair(
        candidate=jaxbp.value_and_grad(model).jitted,
        baseline=jaxbp.reference.value_and_grad(model).jitted,
        args=(params, x, y, None),
        flops=flops,
        baseline_flops=flops,
        shapes={"n": n, "t": t, "d": d, "h": heads, "layers": layers, "v": vocab},
        labels=("manual", "jit(value_and_grad)"),
        sides={
            "flax.nnx": _nnx_side(model, params, x, y),
            "user-jit": (in_user_jit(jaxbp.value_and_grad(model)), (params, x, y)),
        },
        metrics=_vs_nnx,
        notes="beside B, a Flax NNX GPT (benchmarks/peer_nnx.py) when flax is installed",
    )


P10_CPU = [(16, 128, 128, 4), (8, 256, 256, 8)]  # (n, t, d, h)
P10_GPU = [(32, 1024, 768, 12)]

for _n, _t, _d, _h in P10_CPU:
    register(
        Case(
            id=f"P10/n{_n}-t{_t}-d{_d}",
            group="P10",
            title="GPT step: manual ÷ jit(value_and_grad) of the plain twin",
            build=functools.partial(build_gpt, n=_n, t=_t, d=_d, heads=_h),
            targets=(Target("ratio", "<=", 1.00), Target("ratio_vs_nnx", "<=", 1.00)),
            quick=(_t == 128),
        )
    )

register(
    Case(
        id="P10/n16-t128-d128-v32768",
        group="P10",
        title="GPT step, a word-piece vocabulary: manual ÷ jit(value_and_grad) of the twin",
        build=functools.partial(build_gpt, n=16, t=128, d=128, heads=4, vocab=32768),
        targets=(Target("ratio", "<=", 1.00), Target("ratio_vs_nnx", "<=", 1.00)),
        quick=False,
    )
)

for _n, _t, _d, _h in P10_GPU:
    register(
        Case(
            id=f"P10/gpu-n{_n}-t{_t}-d{_d}",
            group="P10",
            title="GPT step (GPU size): manual ÷ jit(value_and_grad) of the plain twin",
            build=functools.partial(build_gpt, n=_n, t=_t, d=_d, heads=_h, gpu_only=True),
            targets=(Target("ratio", "<=", 1.00, backends=("gpu",)),),
            quick=False,
        )
    )


# -- P12, P13: per-example gradient norms and DP-SGD on the GPT ----------------------------
#
# One example is one sequence. P12: jaxbp.per_example_grad_norms(gpt) (one unit-seeded pass
# through the explicit loops, each op's per-example rule: Gram norms for the dense layers,
# [id_t = id_s]·⟨δ_t, δ_s⟩ for the tables, the head's ⟨dz_t, dz_s⟩ over vocabulary chunks)
# ÷ jaxbp's own plain step (≤ 1.3: Opacus's ghost clipping costs 1.19× a step), and ÷
# jit(vmap(grad)) of the plain twin + norms of the materialised gradients (≤ 1.0 in time,
# ≤ 0.15 in temporary memory at v 32768). P13: jaxbp.clipped_grad(gpt, l2_clip=1) without
# noise (norms, clip factors, each parameter rule again on δ scaled per example) ÷ the
# plain step (≤ 1.35).

P12_SIZES = [  # (n, t, d, h, layers, v): the character model, and a word-piece vocabulary
    (32, 128, 128, 4, 4, VOCAB),
    (32, 128, 128, 4, 2, 32768),
]


def _gpt_problem(ctx, n, t, d, heads, layers, vocab):
    model = jaxbp.GPT(vocab=vocab, d=d, heads=heads, layers=layers, context=t)
    kp, ki = jax.random.split(ctx.key(n * 37 + t + d + vocab))
    params = model.init(kp, ctx.dtype)
    ids = jax.random.randint(ki, (n, t + 1), 0, vocab, jnp.int32)
    return model, params, ids[:, :-1], ids[:, 1:]


def _shapes(n, t, d, heads, layers, vocab):
    return {"n": n, "t": t, "d": d, "h": heads, "layers": layers, "v": vocab}


def build_norms_vs_step(ctx, n, t, d, heads, layers, vocab) -> Pair:
    model, params, x, y = _gpt_problem(ctx, n, t, d, heads, layers, vocab)
    norms_fn, step = jaxbp.per_example_grad_norms(model).jitted, jaxbp.value_and_grad(model).jitted

    def verify():
        # Different quantities (P12/vmap checks the norms against vmap(grad)); what ties them:
        # every sequence is fully valid, so the mean gradient is the mean of the per-example
        # gradients, and its norm is at most the mean of their norms (triangle inequality).
        norms = norms_fn(params, x, y, None)
        mean = step(params, x, y, None)[1]
        total = sum(float(jnp.sum(jnp.square(g.astype(jnp.float32))))
                    for g in jax.tree.leaves(mean))  # fmt: skip
        if not total**0.5 <= float(jnp.mean(norms)) * (1 + 1e-3):
            raise AgreementError(
                f"‖mean grad‖ {total**0.5:.4g} > mean ‖g_k‖ {float(jnp.mean(norms)):.4g}"
            )

    return Pair(
        candidate=norms_fn,
        baseline=step,
        args=(params, x, y, None),
        verify=verify,
        shapes=_shapes(n, t, d, heads, layers, vocab),
        labels=("per-example grad norms", "jaxbp's plain GPT step"),
        notes="A and B compute different things (norms vs the mean gradient): time only",
    )


def build_norms_vs_vmap(ctx, n, t, d, heads, layers, vocab) -> Pair:
    model, params, x, y = _gpt_problem(ctx, n, t, d, heads, layers, vocab)
    return Pair(
        candidate=jaxbp.per_example_grad_norms(model).jitted,
        baseline=jaxbp.reference.per_example_grad_norms(model).jitted,
        args=(params, x, y, None),
        shapes=_shapes(n, t, d, heads, layers, vocab),
        labels=("per-example grad norms", "jit(vmap(grad)) of the twin + norms"),
    )


def build_clipped(ctx, n, t, d, heads, layers, vocab) -> Pair:
    model, params, x, y = _gpt_problem(ctx, n, t, d, heads, layers, vocab)
    dp = jaxbp.clipped_grad(model, l2_clip=1.0).jitted
    plain = jaxbp.value_and_grad(model).jitted
    tol = tolerance_for(ctx)

    def verify():
        # Without clipping the DP gradient is the mean of the sequences' mean gradients: with
        # every token valid, the plain mean gradient.
        huge = jaxbp.clipped_grad(model, l2_clip=1e30).jitted(params, x, y, None, None)[0]
        default_compare(tol, ("clipped_grad(C=1e30)", "value_and_grad"))(
            huge, plain(params, x, y, None)[1]
        )

    return Pair(
        candidate=dp,
        baseline=plain,
        args=(params, x, y, None, None),
        baseline_args=(params, x, y, None),
        verify=verify,
        shapes=_shapes(n, t, d, heads, layers, vocab) | {"l2_clip": 1.0},
        labels=("DP-SGD grad (book-keeping, σ = 0)", "jaxbp's plain GPT step"),
        notes="gradients only (no optimizer update) on both sides",
    )


for _n, _t, _d, _h, _l, _v in P12_SIZES:
    _id = f"n{_n}-t{_t}-d{_d}-l{_l}-v{_v}"
    _kw = dict(n=_n, t=_t, d=_d, heads=_h, layers=_l, vocab=_v)
    _small = _v == VOCAB
    register(Case(
        id=f"P12/step-{_id}", group="P12",
        title="GPT per-example grad norms ÷ jaxbp's plain GPT step",
        build=functools.partial(build_norms_vs_step, **_kw),
        targets=(Target("ratio", "<=", 1.3),), quick=_small,
    ))  # fmt: skip
    register(Case(
        id=f"P12/vmap-{_id}", group="P12",
        title="GPT per-example grad norms ÷ jit(vmap(grad)) of the twin + norms",
        build=functools.partial(build_norms_vs_vmap, **_kw),
        targets=(Target("ratio", "<=", 1.0),)
        + (() if _small else (Target("memory_ratio", "<=", 0.15),)),
        quick=_small,
    ))  # fmt: skip
    register(Case(
        id=f"P13/{_id}", group="P13", title="clipped GPT step (no noise) ÷ plain GPT step",
        build=functools.partial(build_clipped, **_kw),
        targets=(Target("ratio", "<=", 1.35),), quick=_small,
    ))  # fmt: skip
