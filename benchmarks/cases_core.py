"""P1–P4 (docs/performance.md): the manual MLP step, its roofline, dense bwd ÷ fwd, softmax VJP.

Index letters: n batch, i in, o out, c classes, w the MLP's width.

P1  ``jaxbp.value_and_grad(model).jitted`` (the explicit reverse loop) ÷ the MLP a user
    would write (:func:`plain_value_and_grad`: ``x @ w + b``, ``jax.nn.relu``, optax's
    ``softmax_cross_entropy_with_integer_labels``, under ``jax.jit(jax.value_and_grad)``),
    with ``jaxbp.reference.value_and_grad(model).jitted`` and ``jaxbp.value_and_grad(model)``
    inside a user's own ``jax.jit`` (:func:`in_user_jit`) timed beside them; MLP sizes
    ``(w, w, w, 10)`` (three dense layers, relu, softmax cross-entropy over 10 classes,
    integer labels), batch n ∈ {128, 1024} × w ∈ {256, 512, 1024}; also
    784-1024-1024-10 at n 256 and 1024, and 1024-1024-1024-1000 at n 1024.
P2  the same manual step at n 1024, w 1024: FLOP/s ÷ a large ``jnp.dot`` of the same run.
P3  ``dense_bwd`` (dx, dw, db) and ``dense_bwd_params`` (dw, db) ÷ ``dense_fwd``, n=i=o.
P4  ``softmax_bwd`` ÷ ``jax.vjp(jax.nn.softmax)``'s backward (residuals passed in, so only
    the backward is timed), with the explicit route ``Jᵀg``, ``J = softmax_jacobian(z)``
    ``(n, c, c)``, timed beside them where ``J`` fits in the memory budget.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbp
from benchmarks.harness import AgreementError, Case, Pair, Skip, Target, default_compare, register
from jaxbp.dense import dense_bwd_params

N_CLASSES = 10


# -- P1 / P2: the MLP train step ------------------------------------------------------------


def mlp_flops(sizes, n) -> float:
    """Forward ``2·n·i·o`` per layer, backward ``4·n·i·o`` less the first layer's ``dx``."""
    mats = [i * o for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    return float(2 * n * sum(mats) + 4 * n * sum(mats) - 2 * n * mats[0])


def _plain_loss(params, x, labels):
    """The mean cross-entropy of the MLP as a user writes it: jax.nn and optax only."""
    h = x
    for k, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if k < len(params) - 1:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, labels).mean()


@jax.jit
def plain_value_and_grad(params, x, labels):
    """P1's baseline: ``jax.value_and_grad`` of :func:`_plain_loss` (the same parameter tree
    as ``jaxbp.MLP``: a list of ``{"w": (i, o), "b": (o,)}``)."""
    return jax.value_and_grad(_plain_loss)(params, x, labels)


def in_user_jit(step):
    """``step`` (a transform's checked entry, ``jaxbp.value_and_grad(model)``) under a jit
    of the user's own, as a training loop calls it: the labels arrive traced, so whatever the
    entry's checks put in the program (an effect would cost ``jax.jit`` its C++ dispatch) is
    timed too."""
    return jax.jit(lambda *args: step(*args))


def build_mlp(ctx, n: int, width: int = 0, manual=None, reference=None, sizes=None) -> Pair:
    sizes = tuple(sizes) if sizes else (width, width, width, N_CLASSES)
    model = jaxbp.MLP(sizes, activation="relu", loss="softmax_cross_entropy")
    kp, kx, ky = jax.random.split(ctx.key(n * 7 + sum(sizes)), 3)
    params = model.init(kp, ctx.dtype)
    x = jax.random.normal(kx, (n, sizes[0]), jnp.float32).astype(ctx.dtype)
    labels = jax.random.randint(ky, (n,), 0, sizes[-1], jnp.int32)
    manual = manual or jaxbp.value_and_grad(model).jitted
    reference = reference or jaxbp.reference.value_and_grad(model).jitted
    return Pair(
        candidate=manual,
        baseline=plain_value_and_grad,
        args=(params, x, labels, None, None),
        baseline_args=(params, x, labels),
        flops=mlp_flops(sizes, n),
        baseline_flops=mlp_flops(sizes, n) + 2 * n * sizes[0] * sizes[1],
        shapes={"n": n, "width": max(sizes[1:-1]), "sizes": list(sizes)},
        labels=("manual", "plain jax.nn + optax"),
        sides={
            "jaxbp.reference": (reference, (params, x, labels, None, None)),
            "user-jit": (in_user_jit(jaxbp.value_and_grad(model)), (params, x, labels)),
        },
    )


P1_SIZES = [(n, w) for n in (128, 1024) for w in (256, 512, 1024)]
P1_QUICK = {(128, 256), (128, 1024), (1024, 256)}

for _n, _w in P1_SIZES:
    register(
        Case(
            id=f"P1/n{_n}-w{_w}",
            group="P1",
            title="MLP step: manual ÷ jit(value_and_grad) of a plain jax.nn + optax MLP",
            build=functools.partial(build_mlp, n=_n, width=_w),
            targets=(Target("ratio", "<=", 1.00),),
            quick=(_n, _w) in P1_QUICK,
        )
    )

# Shapes where the layout of dW = xᵀ·g matters on some CPUs (a narrow last layer, a wide
# first one, a 1000-class head): P1 must hold on any CPU, not only where it was tuned.
P1_MORE = [(256, (784, 1024, 1024, 10)), (1024, (784, 1024, 1024, 10)),
           (1024, (1024, 1024, 1024, 1000))]  # fmt: skip

for _n, _sizes in P1_MORE:
    register(
        Case(
            id=f"P1/n{_n}-" + "-".join(map(str, _sizes)),
            group="P1",
            title="MLP step: manual ÷ jit(value_and_grad) of a plain jax.nn + optax MLP",
            build=functools.partial(build_mlp, n=_n, sizes=_sizes),
            targets=(Target("ratio", "<=", 1.00),),
            quick=False,
        )
    )


def build_roofline(ctx, n: int, width: int, dot_size: int) -> Pair:
    """The manual step with a ``jnp.dot (dot_size³)`` timed in the same interleaved loop."""
    pair = build_mlp(ctx, n, width)
    if ctx.backend == "gpu":
        dot_size = max(dot_size, 8192)  # 2048³ is not a large matmul for a GPU
    ka, kb = jax.random.split(ctx.key(12345))
    a = jax.random.normal(ka, (dot_size, dot_size), jnp.float32).astype(ctx.dtype)
    b = jax.random.normal(kb, (dot_size, dot_size), jnp.float32).astype(ctx.dtype)
    dot_flops = 2.0 * dot_size**3
    pair.sides = {**pair.sides, "dot": (jax.jit(jnp.dot), (a, b))}
    pair.skip_compare = ("dot",)
    pair.shapes = {**pair.shapes, "dot": dot_size}

    def metrics(rec):
        m = rec["metrics"]
        dot_rate = dot_flops / m["time_dot"]
        return {"dot_flops_per_s": dot_rate, "roofline": m["flops_per_s"] / dot_rate}

    pair.metrics = metrics
    pair.notes = (
        f"roofline = manual step FLOP/s ÷ jnp.dot {dot_size}³ FLOP/s, interleaved in one loop"
    )
    return pair


register(
    Case(
        id="P2/n1024-w1024",
        group="P2",
        title="manual MLP step: FLOP/s ÷ large jnp.dot",
        build=functools.partial(build_roofline, n=1024, width=1024, dot_size=2048),
        quick_build=functools.partial(build_roofline, n=512, width=512, dot_size=1024),
        quick_id="P2/n512-w512",
        targets=(
            Target("roofline", ">=", 0.85, backends=("cpu",)),
            Target("roofline", ">=", 0.60, backends=("gpu",), dtypes=("bfloat16",)),
        ),
    )
)


# -- P3: dense backward ÷ forward ------------------------------------------------------------


def build_dense(ctx, size: int, with_dx: bool) -> Pair:
    n = i = o = size
    kx, kw, kb, kg = jax.random.split(ctx.key(size + with_dx), 4)
    x = jax.random.normal(kx, (n, i), jnp.float32).astype(ctx.dtype)
    w = (jax.random.normal(kw, (i, o), jnp.float32) / float(np.sqrt(i))).astype(ctx.dtype)
    b = jax.random.normal(kb, (o,), jnp.float32).astype(ctx.dtype)
    g = jax.random.normal(kg, (n, o), jnp.float32).astype(ctx.dtype)
    res = (x, w, b)
    bwd = jax.jit(jaxbp.dense.bwd if with_dx else dense_bwd_params)
    fwd = jax.jit(lambda x, w, b: jaxbp.dense.fwd(x, w, b)[0])
    tol = default_compare(
        {"float32": 1e-4, "float64": 1e-10}.get(ctx.dtype_name, 5e-2), ("dense_bwd", "jax.vjp")
    )

    def verify():
        # The two timed sides compute different things; check the backward against autodiff.
        _, vjp = jax.vjp(jaxbp.reference.dense, x, w, b)
        want = vjp(g)
        got = bwd(res, g)
        tol(tuple(got), tuple(want) if with_dx else tuple(want[1:]))

    flops = 4.0 * n * i * o if with_dx else 2.0 * n * i * o
    return Pair(
        candidate=bwd,
        baseline=fwd,
        args=(res, g),
        baseline_args=(x, w, b),
        flops=flops,
        baseline_flops=2.0 * n * i * o,
        verify=verify,
        shapes={"n": n, "i": i, "o": o},
        labels=("backward" + ("" if with_dx else " (no dx)"), "forward"),
    )


for _s in (1024, 2048):
    for _dx in (True, False):
        register(
            Case(
                id=f"P3/{'dx' if _dx else 'nodx'}-{_s}",
                group="P3" if _dx else "P3-nodx",
                title="dense backward ÷ forward" + ("" if _dx else " (no input gradient)"),
                build=functools.partial(build_dense, size=_s, with_dx=_dx),
                targets=(Target("ratio", "<=", 2.2 if _dx else 1.15),),
                quick=_s == 1024,
            )
        )


# -- P4: softmax backward ---------------------------------------------------------------------

P4_N = 128
P4_ELEMENTS = 2**17
P4_CLASSES = (10, 32, 128, 512, 1024, 2048, 8192, 32768)
P4_QUICK = (10, 512, 32768)
JACOBIAN_BUDGET = 512 * 2**20  # bytes of one (n, c, c) Jacobian on CPU


def _vjp_bwd(vjp_fn, g):
    return vjp_fn(g)[0]


def _explicit_bwd(z, g):
    jac = jaxbp.softmax_jacobian(z)  # (n, c, c), J[n, k, l] = ∂s_k/∂z_l
    return jnp.einsum("nkl,nk->nl", jac, g)  # dz = Jᵀ g


def jacobian_budget(ctx) -> int:
    if ctx.backend == "gpu":
        try:
            limit = ctx.device.memory_stats()["bytes_limit"]
            return int(limit) // 8
        except Exception:
            return 4 * 2**30
    return JACOBIAN_BUDGET


def p4_rows(c: int, quick: bool = False) -> int:
    """Rows n: at least ``P4_ELEMENTS`` elements, so small c is not all dispatch overhead."""
    return max(P4_N // (4 if quick else 1), (P4_ELEMENTS // (4 if quick else 1)) // c)


def build_softmax(ctx, c: int, n: int | None = None) -> Pair:
    n = p4_rows(c, ctx.quick) if n is None else n
    kz, kg = jax.random.split(ctx.key(c))
    z = (3.0 * jax.random.normal(kz, (n, c), jnp.float32)).astype(ctx.dtype)
    g = jax.random.normal(kg, (n, c), jnp.float32).astype(ctx.dtype)
    s, res = jaxbp.softmax.fwd(z)
    _, vjp_fn = jax.vjp(jax.nn.softmax, z)  # a Partial: its residuals are jit arguments
    manual = jax.jit(lambda res, g: jaxbp.softmax.bwd(res, g)[0])
    ref = jax.jit(_vjp_bwd)
    jac_bytes = n * c * c * jnp.dtype(ctx.dtype).itemsize
    budget = jacobian_budget(ctx)
    if jac_bytes <= budget:
        explicit = (jax.jit(_explicit_bwd), (z, g))
        note = ""
    else:
        gib = 2.0**30
        explicit = Skip(f"J (n,c,c) = {jac_bytes / gib:.1f} GiB > budget {budget / gib:.2f} GiB")
        note = f"explicit Jacobian route skipped: {explicit.reason}"
    return Pair(
        candidate=manual,
        baseline=ref,
        args=(res, g),
        baseline_args=(vjp_fn, g),
        flops=4.0 * n * c,
        shapes={"c": c, "n": n},
        sides={"explicit_jacobian": explicit},
        labels=("hand-written VJP", "jax.vjp(jax.nn.softmax)"),
        notes=note,
    )


for _c in P4_CLASSES:
    register(
        Case(
            id=f"P4/c{_c}",
            group="P4",
            title="softmax backward: hand-written ÷ jax.vjp",
            build=functools.partial(build_softmax, c=_c),
            targets=(Target("ratio", "<=", 1.05),),
            quick=_c in P4_QUICK,
        )
    )

__all__ = ["build_mlp", "build_dense", "build_softmax", "mlp_flops", "AgreementError"]
