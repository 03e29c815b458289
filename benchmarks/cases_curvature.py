"""P14 (docs/curvature.md): GGN- and Hessian-vector products of a whole model from the
hand-written rules ÷ JAX's autodiff of the plain twin.

Index letters: n batch (sequences for the GPT), t positions, d width, v vocabulary, c classes
(the MLP's 10, the GPT's v), i in, o out; ``θ`` the parameters (a pytree) and ``u`` a
direction shaped like them.

P14/ggn  ``jaxbp.ggn_vector_product(model).jitted(params, u, *batch)``: ``J·u`` through every
    op's hand-written ``jvp`` rule, the loss's ``ggn_vp`` (``g·H·(J·u)``), ``Jᵀ·(…)`` through
    the ``bwd`` rules ÷ :func:`twin_ggn_vp`: ``jax.jvp`` of the plain twin's logits, the
    softmax cross-entropy's Hessian ``(diag(p) − p·pᵀ)/N`` applied to the tangent in plain
    jnp, then ``jax.vjp`` of the same logits (what a JAX user writes for ``G·u``).
P14/hvp  ``jaxbp.hessian_vector_product(model).jitted(params, u, *batch)`` (``jax.jvp`` of the
    explicit reverse loop) ÷ ``jax.jvp(jax.grad(twin's mean loss))`` (forward over reverse
    autodiff of the plain twin).

P14/kfac ``jaxbp.kfac_factors(model, method="mc").jitted`` (KFAC: ``A = E[ā·āᵀ]`` of every
    dense layer's inputs, ``G = E[δ·δᵀ]`` from one Monte-Carlo column drawn from the model's
    own distribution) ÷ ``jaxbp.value_and_grad(model).jitted``, the plain manual step a
    KFAC optimiser takes beside it; target ≤ 1.5. The MLP also times ``method="exact"``
    (KFLR: its 10 factor columns) beside them. The sides compute different things, so the
    harness checks the factors instead: the first layer's ``A`` against ``āᵀā/N`` of the
    inputs, and (MLP) the exact last layer's ``G`` against ``Σ_u (diag(p_u) − p_u·p_uᵀ)/N``
    from the twin's logits; (GPT) the first ``qkv``'s ``A`` from the twin's layer norm.

All on the MLP 784-512-512-10 (relu, softmax cross-entropy) at n 1024 and on the GPT at
n 16, t 128, d 128, h 4, 4 layers, v 65 (the character model of ``jaxbp train --model gpt``;
its head is the fused ``linear_softmax_cross_entropy``, the twin's full ``(n, t, v)``
logits). The twins are written with ``x @ w + b``, ``jax.nn`` and optax (the MLP here, the
GPT :func:`jaxbp.reference._gpt.gpt_logits` / ``gpt_mean_loss``), no jaxbp rule inside.
Target: A/B ≤ 1.0 for both products, ≤ 1.5 for the KFAC factors. The harness checks A
against B before timing (the products), every leaf within the dtype's tolerance relative
to B's max-abs (float32: 1e-4).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

import jaxbp
from benchmarks.harness import AgreementError, Case, Pair, Target, register
from jaxbp.reference._gpt import _layer_norm, gpt_logits, gpt_mean_loss

VOCAB = 65
LABELS = ("jaxbp (hand-written rules)", "JAX autodiff of the plain twin")


def _acc(x):
    return x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 else x


def _direction(key, params):
    """A random direction ``u`` with the structure, shapes and dtypes of ``params``."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree,
        [jax.random.normal(k, p.shape, jnp.float32).astype(p.dtype)
         for k, p in zip(keys, leaves, strict=True)],
    )  # fmt: skip


def twin_ggn_vp(logits_fn, params, u, *data):
    """``G·u`` of the mean softmax cross-entropy by JAX's autodiff of ``logits_fn(params,
    *data) (…, c)``: ``ż = J·u`` by ``jax.jvp``, ``(diag(p) − p·pᵀ)·ż / N`` in plain jnp
    (``N`` the number of rows of the logits), ``Jᵀ·(…)`` by ``jax.vjp``."""

    def logits(p):
        return logits_fn(p, *data)

    z, zdot = jax.jvp(logits, (params,), (u,))
    p, zd = jax.nn.softmax(_acc(z), axis=-1), _acc(zdot)
    hz = p * (zd - jnp.sum(p * zd, axis=-1, keepdims=True)) / (z.size // z.shape[-1])
    _, pullback = jax.vjp(logits, params)
    return pullback(hz.astype(z.dtype))[0]


def twin_hvp(loss_fn, params, u, *data):
    """``H·u`` of ``loss_fn(params, *data)`` by ``jax.jvp(jax.grad(loss_fn))``."""
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, *data), (params,), (u,))[1]


# -- the MLP ------------------------------------------------------------------------------


def mlp_logits(params, x):
    """The twin's logits ``(n, c)``: ``x @ w + b`` and ``jax.nn.relu``."""
    h = x
    for k, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if k < len(params) - 1:
            h = jax.nn.relu(h)
    return h


def mlp_mean_loss(params, x, labels):
    """The twin's mean loss: optax's integer-label cross-entropy of :func:`mlp_logits`."""
    return optax.softmax_cross_entropy_with_integer_labels(mlp_logits(params, x), labels).mean()


def _mlp_problem(ctx, n, sizes):
    model = jaxbp.MLP(sizes, activation="relu", loss="softmax_cross_entropy")
    kp, kx, ky, ku = jax.random.split(ctx.key(n + 3 * sum(sizes)), 4)
    params = model.init(kp, ctx.dtype)
    x = jax.random.normal(kx, (n, sizes[0]), jnp.float32).astype(ctx.dtype)
    labels = jax.random.randint(ky, (n,), 0, sizes[-1], jnp.int32)
    return model, params, _direction(ku, params), x, labels


def _close(name, got, want, tol=1e-4):
    """``AgreementError`` unless ``got`` is within ``tol`` of ``want`` relative to its
    max-abs."""
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    err = float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))
    if not err <= tol:
        raise AgreementError(f"{name}: relative error {err:.3g} > {tol:g}")


def _input_factor(rows):
    """``A = āᵀā/N`` with ``ā = [rows, 1]`` (N rows), in float32."""
    a = rows.reshape(-1, rows.shape[-1]).astype(jnp.float32)
    a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
    return a.T @ a / a.shape[0]


def _kfac_pair(ctx, model, params, batch, verify, shapes, sides=None) -> Pair:
    key = ctx.key(7)
    mc = jaxbp.kfac_factors(model, method="mc").jitted
    return Pair(
        candidate=mc,
        baseline=jaxbp.value_and_grad(model).jitted,
        args=(params, *batch, key),
        baseline_args=(params, *batch),
        verify=verify,
        sides=sides or {},
        skip_compare=tuple(sides or {}),
        shapes={"product": "kfac", **shapes},
        labels=("jaxbp.kfac_factors (mc, 1 sample)", "jaxbp.value_and_grad (plain manual step)"),
        notes="A: every dense layer's A and G; B: the loss and its gradient",
    )


def build_mlp(ctx, product: str, n: int, sizes: tuple[int, ...]) -> Pair:
    model, params, u, x, labels = _mlp_problem(ctx, n, sizes)
    if product == "kfac":
        exact = jaxbp.kfac_factors(model, method="exact").jitted

        def verify():
            got = exact(params, x, labels, None, None, None)
            _close("A of layer 0", got["[0]['w']"]["A"], _input_factor(x))
            p = jax.nn.softmax(_acc(mlp_logits(params, x)), axis=-1)
            hess = (jnp.diag(jnp.sum(p, axis=0)) - p.T @ p) / n  # Σ_u diag(p_u) − p_u·p_uᵀ
            _close(f"G of layer {len(sizes) - 2}", got[f"[{len(sizes) - 2}]['w']"]["G"], hess)

        return _kfac_pair(
            ctx, model, params, (x, labels, None, None), verify,
            {"model": "mlp", "n": n, "sizes": list(sizes)},
            sides={"exact (KFLR, 10 columns)": (exact, (params, x, labels, None, None, None))},
        )  # fmt: skip
    if product == "ggn":
        mine = jaxbp.ggn_vector_product(model).jitted
        twin = jax.jit(lambda p, u, x, labels: twin_ggn_vp(mlp_logits, p, u, x))
    else:
        mine = jaxbp.hessian_vector_product(model).jitted
        twin = jax.jit(functools.partial(twin_hvp, mlp_mean_loss))
    return Pair(
        candidate=mine,
        baseline=twin,
        args=(params, u, x, labels, None, None),
        baseline_args=(params, u, x, labels),
        shapes={"product": product, "model": "mlp", "n": n, "sizes": list(sizes)},
        labels=LABELS,
    )


# -- the GPT ------------------------------------------------------------------------------


def _gpt_problem(ctx, n, t, d, heads, layers):
    model = jaxbp.GPT(vocab=VOCAB, d=d, heads=heads, layers=layers, context=t)
    kp, ki, ku = jax.random.split(ctx.key(n * 41 + t + d), 3)
    params = model.init(kp, ctx.dtype)
    ids = jax.random.randint(ki, (n, t + 1), 0, VOCAB, jnp.int32)
    return model, params, _direction(ku, params), ids[:, :-1], ids[:, 1:]


def build_gpt(ctx, product: str, n: int, t: int, d: int, heads: int, layers: int) -> Pair:
    model, params, u, x, y = _gpt_problem(ctx, n, t, d, heads, layers)
    if product == "kfac":
        mc = jaxbp.kfac_factors(model, method="mc").jitted

        def verify():
            got = mc(params, x, y, None, ctx.key(7))
            x0 = params["tok"][x] + params["pos"][:t]
            rows = _layer_norm(x0, params["blocks"][0]["ln1"], model.eps)
            _close("A of blocks[0].attn.qkv", got["['blocks'][0]['attn']['qkv']['w']"]["A"],
                   _input_factor(rows))  # fmt: skip

        shapes = {"model": "gpt", "n": n, "t": t, "d": d, "h": heads, "layers": layers}
        return _kfac_pair(ctx, model, params, (x, y, None), verify, {**shapes, "v": VOCAB})
    if product == "ggn":
        mine = jaxbp.ggn_vector_product(model).jitted
        logits = functools.partial(gpt_logits, model)  # (params, ids) -> (n, t, v)
        twin = jax.jit(lambda p, u, ids, targets: twin_ggn_vp(logits, p, u, ids))
    else:
        mine = jaxbp.hessian_vector_product(model).jitted
        twin = jax.jit(functools.partial(twin_hvp, functools.partial(gpt_mean_loss, model)))
    return Pair(
        candidate=mine,
        baseline=twin,
        args=(params, u, x, y, None),
        baseline_args=(params, u, x, y),
        shapes={
            "product": product,
            "model": "gpt",
            "n": n,
            "t": t,
            "d": d,
            "h": heads,
            "layers": layers,
            "v": VOCAB,
        },
        labels=LABELS,
    )


_TITLES = {  # one prefix: the group's plot is titled by what its records' titles share
    "ggn": "curvature ÷ baseline: GGN-vector product ÷ autodiff of the twin (jax.jvp, H, jax.vjp)",
    "hvp": "curvature ÷ baseline: Hessian-vector product ÷ autodiff of the twin (jax.jvp of "
    "jax.grad)",
    "kfac": "curvature ÷ baseline: KFAC factors (Monte Carlo) ÷ the plain manual step",
}
_TARGETS = {"ggn": 1.0, "hvp": 1.0, "kfac": 1.5}

MLP_SIZES = (1024, (784, 512, 512, 10))  # (n, sizes)
MLP_QUICK = (256, (784, 256, 256, 10))
GPT_SIZES = dict(n=16, t=128, d=128, heads=4, layers=4)
GPT_QUICK = dict(n=4, t=64, d=64, heads=4, layers=2)


def _mlp_id(product, n, sizes):
    return f"P14/{product}-mlp-n{n}-{'-'.join(map(str, sizes))}"


def _mlp_title(product, n, sizes):
    return f"{_TITLES[product]}: MLP {'-'.join(map(str, sizes))}, n {n}"


def _gpt_id(product, n, t, d, heads, layers):
    return f"P14/{product}-gpt-n{n}-t{t}-d{d}-l{layers}"


def _gpt_title(product, n, t, d, heads, layers):
    return f"{_TITLES[product]}: GPT n {n} t {t} d {d}, {layers} layers, v {VOCAB}"


for _p in ("ggn", "hvp", "kfac"):
    register(
        Case(
            id=_mlp_id(_p, *MLP_SIZES),
            group="P14",
            title=_mlp_title(_p, *MLP_SIZES),
            build=functools.partial(build_mlp, product=_p, n=MLP_SIZES[0], sizes=MLP_SIZES[1]),
            targets=(Target("ratio", "<=", _TARGETS[_p]),),
            quick_build=functools.partial(
                build_mlp, product=_p, n=MLP_QUICK[0], sizes=MLP_QUICK[1]
            ),
            quick_id=_mlp_id(_p, *MLP_QUICK),
            quick_title=_mlp_title(_p, *MLP_QUICK),
        )
    )
    register(
        Case(
            id=_gpt_id(_p, **GPT_SIZES),
            group="P14",
            title=_gpt_title(_p, **GPT_SIZES),
            build=functools.partial(build_gpt, product=_p, **GPT_SIZES),
            targets=(Target("ratio", "<=", _TARGETS[_p]),),
            quick_build=functools.partial(build_gpt, product=_p, **GPT_QUICK),
            quick_id=_gpt_id(_p, **GPT_QUICK),
            quick_title=_gpt_title(_p, **GPT_QUICK),
        )
    )
