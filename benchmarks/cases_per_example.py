"""P7–P8 (docs/performance.md): per-example gradient norms without per-example gradients;
the DP-SGD step.

Index letters: n batch, i in, o out, t tokens per example, d width, c classes.

P7  ``jaxbp.per_example_grad_norms(model)`` (``‖a‖²·‖δ‖²`` from one unit-seeded reverse
    loop) ÷ ``jit(vmap(grad))`` + norms of the materialised per-example gradients
    (``jaxbp.reference.per_example_grad_norms``), batch 1024, MLP 784-512-512-10.
P7-seq  a sequence model ``(n, t, i) → dense → tanh → dense → CE per token, Σ_t``: norms
    from the hand-written rules and :func:`jaxbp.per_example.dense_grad_sq_norms` (``auto``:
    Gram "ghost" norms where ``t² < i·o``) ÷ ``jit(vmap(grad))`` + norms; the forced
    ``ghost`` and ``outer`` formulas are timed beside them.
P8  ``jaxbp.clipped_grad(model, l2_clip=1, noise_multiplier=σ)`` (norms, clipping,
    book-keeping: one backward pass) ÷ the plain manual gradient ``jaxbp.value_and_grad``,
    once with σ = 0 (the clipping) and once with σ = 1 (clipping + ``jax.random.normal``
    noise on every parameter, whose cost grows with the parameter count, not the batch);
    the ``two_pass`` method (a second, re-seeded reverse loop) and the noise alone are
    timed beside them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxbp
from benchmarks.harness import Case, Pair, Target, default_compare, register, tolerance_for
from jaxbp import per_example as pe

N_CLASSES = 10


def _mlp(ctx, n, sizes):
    model = jaxbp.MLP(sizes, activation="relu", loss="softmax_cross_entropy")
    kp, kx, ky = jax.random.split(ctx.key(n + sum(sizes)), 3)
    params = model.init(kp, ctx.dtype)
    x = jax.random.normal(kx, (n, sizes[0]), jnp.float32).astype(ctx.dtype)
    labels = jax.random.randint(ky, (n,), 0, sizes[-1], jnp.int32)
    return model, params, x, labels


# -- P7: per-example norms, MLP ---------------------------------------------------------------


def build_norms(ctx, n: int, sizes: tuple[int, ...]) -> Pair:
    model, params, x, labels = _mlp(ctx, n, sizes)
    manual = jaxbp.per_example_grad_norms(model).jitted  # a jax.jit (jaxbp/_step.py)
    reference = jaxbp.reference.per_example_grad_norms(model).jitted
    mats = sum(i * o for i, o in zip(sizes[:-1], sizes[1:], strict=True))
    return Pair(
        candidate=manual,
        baseline=reference,
        args=(params, x, labels, None, None),
        # forward 2·n·Σio, δ chain 2·n·Σio less the first layer; norms O(n·Σ(i+o)).
        flops=float(4 * n * mats - 2 * n * sizes[0] * sizes[1]),
        shapes={"n": n, "sizes": list(sizes)},
        labels=("‖a‖²‖δ‖² norms", "jit(vmap(grad)) + norms"),
    )


for _quick, (_n, _sizes) in (
    (False, (1024, (784, 512, 512, 10))),
    (True, (256, (784, 256, 256, 10))),
):
    register(
        Case(
            id=f"P7/n{_n}-{'-'.join(map(str, _sizes))}",
            group="P7",
            title="per-example grad norms ÷ jit(vmap(grad)) + norms",
            build=functools.partial(build_norms, n=_n, sizes=_sizes),
            targets=(Target("ratio", "<=", 0.05), Target("memory_ratio", "<=", 0.02)),
            quick=_quick,
        )
    )


# -- P7-seq: a sequence model -----------------------------------------------------------------


def _seq_params(ctx, i, d, c):
    k1, k2 = jax.random.split(ctx.key(i * d + c))
    w1 = (jax.random.normal(k1, (i, d), jnp.float32) / np.sqrt(i)).astype(ctx.dtype)
    w2 = (jax.random.normal(k2, (d, c), jnp.float32) / np.sqrt(d)).astype(ctx.dtype)
    return [{"w": w1, "b": jnp.zeros((d,), ctx.dtype)}, {"w": w2, "b": jnp.zeros((c,), ctx.dtype)}]


def seq_norms_manual(params, x, labels, method="auto"):
    """Per-example gradient norms ``(n,)`` of the sequence model from the ``_fwd``/``_bwd`` rules.

    ``x (n, t, i)``, ``labels (n, t)``; ``ℓ_k = Σ_t CE(z_kt, y_kt)``, so the seed is 1 per token.
    """
    dense, tanh, ce = jaxbp.dense, jaxbp.tanh, jaxbp.softmax_cross_entropy  # their rules
    z1, r1 = dense.fwd(x, params[0]["w"], params[0]["b"])  # (n, t, d)
    h, ra = tanh.fwd(z1)
    z2, r2 = dense.fwd(h, params[1]["w"], params[1]["b"])  # (n, t, c)
    per_tok, rl = ce.fwd(z2, labels)  # (n, t)
    d2 = ce.bwd(rl, jnp.ones_like(per_tok))[0]  # (n, t, c)
    dh = dense.bwd(r2, d2)[0]  # (n, t, d)
    (d1,) = tanh.bwd(ra, dh)
    sq = pe.dense_grad_sq_norms(x, d1, method=method) + pe.dense_grad_sq_norms(h, d2, method=method)
    return jnp.sqrt(sq)


def seq_norms_reference(params, x, labels):
    """``jit(vmap(grad))`` of each example's summed per-token loss, then the norms."""

    def loss_one(p, xk, yk):
        z = jnp.tanh(xk @ p[0]["w"] + p[0]["b"]) @ p[1]["w"] + p[1]["b"]
        return jnp.sum(jaxbp.reference.softmax_cross_entropy(z, yk))

    g = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, x, labels)
    sq = sum(
        jnp.sum(leaf.reshape(leaf.shape[0], -1).astype(jnp.float32) ** 2, axis=-1)
        for leaf in jax.tree.leaves(g)
    )
    return jnp.sqrt(sq)


def build_seq(ctx, n: int, t: int, i: int, d: int) -> Pair:
    params = _seq_params(ctx, i, d, N_CLASSES)
    kx, ky = jax.random.split(ctx.key(n * t))
    x = jax.random.normal(kx, (n, t, i), jnp.float32).astype(ctx.dtype)
    labels = jax.random.randint(ky, (n, t), 0, N_CLASSES, jnp.int32)
    args = (params, x, labels)
    return Pair(
        candidate=jax.jit(seq_norms_manual),
        baseline=jax.jit(seq_norms_reference),
        args=args,
        sides={
            "ghost": (jax.jit(functools.partial(seq_norms_manual, method="ghost")), args),
            "outer": (jax.jit(functools.partial(seq_norms_manual, method="outer")), args),
        },
        shapes={"n": n, "t": t, "i": i, "d": d, "c": N_CLASSES},
        labels=("rule-based norms (auto)", "jit(vmap(grad)) + norms"),
        notes=(
            f"ghost cheaper by the t² < i·o rule: layer 1 {pe.ghost_norm_is_cheaper(t, i, d)}, "
            f"layer 2 {pe.ghost_norm_is_cheaper(t, d, N_CLASSES)}"
        ),
    )


for _quick, (_n, _t, _i, _d) in ((False, (256, 16, 256, 256)), (True, (64, 8, 128, 128))):
    register(
        Case(
            id=f"P7-seq/n{_n}-t{_t}-i{_i}-d{_d}",
            group="P7-seq",
            title="sequence per-example grad norms ÷ jit(vmap(grad)) + norms",
            build=functools.partial(build_seq, n=_n, t=_t, i=_i, d=_d),
            targets=(),  # P7's targets (docs/performance.md) are for the MLP: reported only
            quick=_quick,
        )
    )


# -- P8: DP-SGD step ÷ plain step -------------------------------------------------------------


def build_dp(ctx, n: int, sizes: tuple[int, ...], noise_multiplier: float) -> Pair:
    model, params, x, labels = _mlp(ctx, n, sizes)
    key = ctx.key(99)

    def dp_fn(method, sigma):
        return jaxbp.clipped_grad(model, l2_clip=1.0, noise_multiplier=sigma, method=method).jitted

    dp = dp_fn("bookkeeping", noise_multiplier)
    dp_two = dp_fn("two_pass", noise_multiplier)
    plain = jaxbp.value_and_grad(model).jitted
    dp_args = (params, x, labels, key, None, None)
    tol = tolerance_for(ctx)

    def verify():
        # The timed sides compute different things: check that without clipping and noise
        # the DP gradient is the plain mean gradient, and that the two methods agree.
        huge = jaxbp.clipped_grad(model, l2_clip=1e30)(params, x, labels)[0]
        plain_grads = plain(params, x, labels, None, None)[1]
        default_compare(tol, ("clipped_grad(C=1e30)", "value_and_grad"))(huge, plain_grads)
        default_compare(tol, ("bookkeeping", "two_pass"))(dp(*dp_args), dp_two(*dp_args))

    sides = {"two_pass": (dp_two, dp_args)}
    what = "clipping only (σ = 0)"
    if noise_multiplier > 0:
        sides["clip only"] = (dp_fn("bookkeeping", 0.0), dp_args)
        sides["noise only"] = (
            jax.jit(lambda p, k: pe._add_noise(p, k, noise_multiplier)),
            (params, key),
        )
        what = f"clipping + Gaussian noise σ = {noise_multiplier} (jax.random.normal)"
    return Pair(
        candidate=dp,
        baseline=plain,
        args=dp_args,
        baseline_args=(params, x, labels, None, None),
        verify=verify,
        sides=sides,
        skip_compare=tuple(sides),
        shapes={"n": n, "sizes": list(sizes), "l2_clip": 1.0, "noise_multiplier": noise_multiplier},
        labels=("DP-SGD grad (book-keeping)", "plain manual grad"),
        notes=f"A: {what}; gradients only (no optimizer update) on both sides",
    )


for _quick, (_n, _sizes) in (
    (False, (1024, (784, 512, 512, 10))),
    (True, (256, (784, 256, 256, 10))),
):
    for _sigma in (0.0, 1.0):
        register(
            Case(
                id=f"P8/n{_n}-{'-'.join(map(str, _sizes))}-{'noise' if _sigma else 'clip'}",
                group="P8",
                title="DP-SGD step ÷ plain step" + (" (with noise)" if _sigma else " (clipping)"),
                build=functools.partial(build_dp, n=_n, sizes=_sizes, noise_multiplier=_sigma),
                targets=(
                    Target("ratio", "<=", 1.25, backends=("cpu",)),
                    Target("ratio", "<=", 1.15, backends=("gpu",)),
                ),
                quick=_quick,
            )
        )
