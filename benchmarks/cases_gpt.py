"""P10: a GPT training step, the explicit reverse loop ÷ ``jit(value_and_grad)`` of the twin.

Index letters: n sequences, t positions, d width, h heads, l layers, v vocabulary.

A = ``jaxbp.value_and_grad(gpt).jitted`` (forward through the ``_fwd`` rules, then their
``_bwd`` rules in reverse, the head through the fused loss), B =
``jaxbp.reference.value_and_grad(gpt).jitted`` (``jax.jit(jax.value_and_grad)`` of the
plain-jnp twin: full logits and optax's integer-label cross-entropy). Character vocabulary
v = 65 as in ``jaxbp train --model gpt``; 4 layers; two sizes on CPU, a larger one in
bfloat16 on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import jaxbp
from benchmarks.harness import Case, Pair, Skip, Target, register

VOCAB = 65


def gpt_flops(model: jaxbp.GPT, n: int, t: int) -> float:
    """Matmul FLOPs of one step: 6 per weight per token (forward 2, backward 4), plus the
    attention products ``q·kᵀ`` and ``P·v`` (forward 2·2·t·t·d per sequence, backward twice
    that), causal masking not subtracted."""
    d, f, v = model.d, model.mlp_ratio * model.d, model.vocab
    weights = model.layers * (d * 3 * d + d * d + d * f + f * d) + d * v
    attn = model.layers * 2 * 2 * t * t * d
    return float(n * (6 * t * weights + 3 * attn))


def build_gpt(ctx, n: int, t: int, d: int, heads: int, layers: int = 4, gpu_only=False):
    if gpu_only and ctx.backend != "gpu":
        return Skip(f"GPU-only size (n {n}, t {t}, d {d}): minutes per step on a CPU")
    model = jaxbp.GPT(vocab=VOCAB, d=d, heads=heads, layers=layers, context=t)
    kp, ki = jax.random.split(ctx.key(n * 31 + t + d))
    params = model.init(kp, ctx.dtype)
    ids = jax.random.randint(ki, (n, t + 1), 0, VOCAB, jnp.int32)
    x, y = ids[:, :-1], ids[:, 1:]
    flops = gpt_flops(model, n, t)
    return Pair(
        candidate=jaxbp.value_and_grad(model).jitted,
        baseline=jaxbp.reference.value_and_grad(model).jitted,
        args=(params, x, y, None),
        flops=flops,
        baseline_flops=flops,
        shapes={"n": n, "t": t, "d": d, "h": heads, "layers": layers, "v": VOCAB},
        labels=("manual", "jit(value_and_grad)"),
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
            targets=(Target("ratio", "<=", 1.00),),
            quick=(_t == 128),
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
