"""Walk one backward pass step by step: every op, every shape, every rule in index letters.

Index letters::

    n  batch      i  input features of a layer      o  output features of a layer
    c  classes    d  a second class index (the Jacobian's columns)

This answers two questions people ask about softmax and backpropagation:

1. *How do the shapes line up when softmax's derivative is a Jacobian?* Per example the
   softmax Jacobian is a ``(c, c)`` matrix (``(n, c, c)`` for the batch) and the loss's
   gradient ``∂L/∂p`` is a vector ``(c,)``. They meet in a matrix-vector product,
   ``δ = J·∂L/∂p`` (einsum ``"ncd,nd->nc"``), which gives a vector ``(c,)`` per example
   again — and for cross-entropy that vector is simply ``p − y``.
2. *Why does the sigmoid + MSE code use an elementwise product (MATLAB's ``.*``)?* Because
   an elementwise activation's Jacobian is diagonal, and a diagonal matrix times a vector is
   the elementwise product of its diagonal with the vector. Softmax's Jacobian is not
   diagonal, so the elementwise product gives wrong numbers there.

:func:`explain` computes every step with jaxbp's own rules and Jacobians and returns an
:class:`Explanation`; ``.text()`` is what ``jaxbp explain`` prints.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import reference
from ._text import Step, fmt_array, fmt_shape, fmt_values, format_bytes, io_lines, jsonable
from .activations import ACTIVATIONS, sigmoid
from .dense import dense, dense_bwd, dense_bwd_params, dense_fwd
from .gradcheck import x64
from .jacobian import jacobian
from .model import value_and_grad
from .nn import MLP
from .softmax import softmax, softmax_jacobian

__all__ = ["Step", "Explanation", "explain"]


@dataclasses.dataclass(frozen=True)
class Explanation:
    """The result of :func:`explain`.

    ``forward`` and ``backward`` are the steps; ``softmax`` holds the Jacobian step's arrays
    (``jacobian (n, c, c)``, ``upstream (n, c)`` = ∂loss/∂p, ``product (n, c)``,
    ``p_minus_y (n, c)``, ``max_difference``); ``elementwise`` the sigmoid + MSE comparison;
    ``gradient_check`` the max difference of every gradient to ``jax.grad``;
    ``full_jacobian`` the all-explicit route (when asked for).
    """

    sizes: tuple[int, ...]
    batch: int
    activation: str
    dtype: str
    forward: tuple[Step, ...]
    backward: tuple[Step, ...]
    softmax: dict[str, Any]
    elementwise: dict[str, Any]
    gradient_check: dict[str, float]
    full_jacobian: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays become nested lists, shapes lists."""
        return jsonable(dataclasses.asdict(self))

    def text(self) -> str:
        """The walkthrough as plain text, as ``jaxbp explain`` prints it."""
        return _render(self)


def _np(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(_np(a) - _np(b)), initial=0.0))


# --------------------------------------------------------------------------- the walk


# The full-Jacobian route holds every explicit Jacobian of the network (float64); refuse it
# beyond this many bytes rather than run out of memory.
FULL_JACOBIAN_MAX_BYTES = 2**30


def full_jacobian_bytes(sizes, batch: int) -> tuple[int, str, tuple[int, ...]]:
    """``(bytes, name, shape)``: the float64 bytes of every explicit Jacobian the
    full-Jacobian route forms for ``sizes``/``batch``, and the largest of them.

    Softmax ``(n, c, c)``; per layer ``l`` (``i`` in, ``o`` out) ``∂z/∂W (n, o, i, o)``,
    ``∂z/∂b (n, o, o)`` and, below the last, ``∂z/∂a (n, o, i)``, ``∂a/∂z (n, i, i)``.
    """
    sizes = tuple(int(s) for s in sizes)
    n, c = int(batch), sizes[-1]
    shapes = [("∂p/∂z", (n, c, c))]
    for layer in range(len(sizes) - 1, 0, -1):
        i, o = sizes[layer - 1], sizes[layer]
        shapes += [(f"∂z{layer}/∂W{layer}", (n, o, i, o)), (f"∂z{layer}/∂b{layer}", (n, o, o))]
        if layer > 1:
            shapes += [(f"∂z{layer}/∂a{layer - 1}", (n, o, i)),
                       (f"∂a{layer - 1}/∂z{layer - 1}", (n, i, i))]  # fmt: skip
    name, shape = max(shapes, key=lambda ns: math.prod(ns[1]))
    return 8 * sum(math.prod(s) for _, s in shapes), name, shape


def check_full_jacobian(sizes, batch, name) -> None:
    need, big, shape = full_jacobian_bytes(sizes, batch)
    if need > FULL_JACOBIAN_MAX_BYTES:
        raise ValueError(
            f"{name}: the full-Jacobian route would need {format_bytes(need)} ({need} bytes) "
            f"for its Jacobians (the largest, {big}, has shape {shape}); the limit is "
            f"{format_bytes(FULL_JACOBIAN_MAX_BYTES)}: use smaller sizes or batch, or leave out "
            "the full Jacobians"
        )


def explain(
    sizes=(4, 5, 3),
    batch: int = 2,
    *,
    activation: str = "relu",
    seed: int = 0,
    full_jacobian: bool = False,
) -> Explanation:
    """One backward pass of an MLP with softmax cross-entropy, from the loss to layer 1.

    Args:
      sizes: layer widths, input first: ``(i, h₁, …, c)``; the last is the number of classes.
      batch: the batch size ``n``.
      activation: the hidden activation (one of ``jaxbp.ACTIVATIONS``).
      seed: seed of the inputs, labels and parameters.
      full_jacobian: also compute the gradient with explicit Jacobians all the way
        (``(n, c, c)``, ``(n, o, i)``, ``(n, i, i)``, ``(n, o, i, o)``, …) and compare it with
        the fused rules. ``ValueError`` when they would take more than
        ``FULL_JACOBIAN_MAX_BYTES`` (:func:`full_jacobian_bytes`).

    Returns:
      An :class:`Explanation` (float64). ``.text()`` reads as a walkthrough.
    """
    model = MLP(tuple(sizes), activation, "softmax_cross_entropy")
    if batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    if full_jacobian:
        check_full_jacobian(model.sizes, batch, "full_jacobian")
    with x64():
        return _explain(model, batch, seed, full_jacobian)


def _explain(model: MLP, n: int, seed: int, full: bool) -> Explanation:
    f64 = jnp.float64
    sizes, L, c = model.sizes, model.num_layers, model.sizes[-1]
    kx, ky, kp, kz = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = model.init(kp, f64)
    x = jax.random.normal(kx, (n, sizes[0]), f64)
    labels = jax.random.randint(ky, (n,), 0, c, jnp.int32)
    y = jax.nn.one_hot(labels, c, dtype=f64)  # (n, c)
    act = ACTIVATIONS[model.activation]
    act_fwd, act_bwd = act.fwd, act.bwd  # the rules the op carries
    sh = lambda a: tuple(int(s) for s in np.shape(a))  # noqa: E731

    # ---- forward: keep what the backward needs
    forward: list[Step] = [Step("x (the input)", (), (("x", sh(x)),), "")]
    a, dense_res, act_res, zs = x, [], [], []
    for l, p in enumerate(params, start=1):
        z, r = dense_fwd(a, p["w"], p["b"])
        dense_res.append(r)
        zs.append(z)
        forward.append(
            Step(
                f"z{l} = a{l - 1}·W{l} + b{l}" if l > 1 else "z1 = x·W1 + b1",
                (("a" + str(l - 1) if l > 1 else "x", sh(a)), (f"W{l}", sh(p["w"]))),
                ((f"z{l}", sh(z)),),
                '"ni,io->no"',
            )
        )
        if l < L:
            a, r = act_fwd(z)
            act_res.append(r)
            forward.append(
                Step(
                    f"a{l} = {model.activation}(z{l})",
                    ((f"z{l}", sh(z)),),
                    ((f"a{l}", sh(a)),),
                    '"ni->ni" (elementwise)',
                )  # fmt: skip
            )
    logits = zs[-1]
    prob = jax.nn.softmax(logits, axis=-1)
    per_ex = -jnp.sum(y * jnp.log(prob), axis=-1)
    forward += [
        Step(f"p = softmax(z{L})", ((f"z{L}", sh(logits)),), (("p", sh(prob)),), '"nc->nc"'),
        Step(
            "loss_n = −Σ_c y·log p",
            (("p", sh(prob)), ("y", sh(y))),
            (("loss", sh(per_ex)),),
            '"nc,nc->n"',
        ),  # fmt: skip
        Step("L = mean_n loss_n", (("loss", sh(per_ex)),), (("L", ()),), '"n->"'),
    ]

    # ---- backward
    backward: list[Step] = []
    g = jnp.full((n,), 1.0 / n, f64)  # ∂L/∂loss_n
    backward.append(
        Step(
            "mean over the batch",
            (("L", ()),),
            (("g = ∂L/∂loss", sh(g)),),
            "g_n = 1/n",
            (f"Every example gets the same weight 1/n = {1.0 / n:.4g}.",),
        )  # fmt: skip
    )
    dloss_dp = -y / prob  # ∂loss_n/∂p (n, c): the gradient of −Σ y log p
    dL_dp = g[:, None] * dloss_dp  # "n,nc->nc"
    backward.append(
        Step(
            "cross-entropy: ∂L/∂p = g·(−y/p)",
            (("g", sh(g)), ("y", sh(y)), ("p", sh(prob))),
            (("∂L/∂p", sh(dL_dp)),),
            '"n,nc->nc"',
            ("One number per class and example: a vector (c,) per example, (n, c) in all.",),
        )
    )
    J = softmax_jacobian(logits)  # (n, c, c) = diag(p) − p pᵀ
    J_from_bwd = jacobian(softmax, logits)  # the same, from softmax_bwd
    product = jnp.einsum("ncd,nd->nc", J, dloss_dp)  # J·∂loss/∂p, per example
    delta = jnp.einsum("ncd,nd->nc", J, dL_dp)  # δ_L = ∂L/∂z_L (n, c)
    fused = g[:, None] * (prob - y)
    backward.append(
        Step(
            f"softmax: δ{L} = J·∂L/∂p",
            (("J = diag(p) − p pᵀ", sh(J)), ("∂L/∂p", sh(dL_dp))),
            ((f"δ{L} = ∂L/∂z{L}", sh(delta)),),
            '"ncd,nd->nc"  (a matrix-vector product per example)',
            (
                "J is a (c, c) matrix per example; ∂L/∂p is a (c,) vector per example.",
                "Matrix times vector gives a (c,) vector per example again: no shape mismatch.",
                "(J is symmetric, so Jᵀ·g and J·g are the same.)",
                f"J·(−y/p) = p − y:   max |J·(−y/p) − (p − y)| = {_maxdiff(product, prob - y):.2e}",
                f"so δ{L} = g·(p − y), the fused rule:   max difference = "
                f"{_maxdiff(delta, fused):.2e}",
            ),
        )
    )
    softmax_info = {
        "jacobian": _np(J),
        "jacobian_from_softmax_bwd_max_difference": _maxdiff(J, J_from_bwd),
        "upstream": _np(dloss_dp),
        "product": _np(product),
        "p_minus_y": _np(prob - y),
        "max_difference": _maxdiff(product, prob - y),
        "delta": _np(delta),
        "fused_delta": _np(fused),
        "fused_max_difference": _maxdiff(delta, fused),
        "p": _np(prob),
        "y": _np(y),
        "labels": np.asarray(labels).tolist(),
    }

    # Through the layers, top to bottom, with the hand-written rules.
    grads: list[dict[str, jax.Array]] = [{} for _ in range(L)]
    d = delta
    for l in range(L, 0, -1):
        res = dense_res[l - 1]
        a_in = "x" if l == 1 else f"a{l - 1}"
        ins = ((f"δ{l}", sh(d)), (a_in, sh(res[0])), (f"W{l}", sh(res[1])))
        if l == 1:
            dw, db = dense_bwd_params(res, d)
            grads[0] = {"w": dw, "b": db}
            backward.append(
                Step(
                    "dense 1 (the first layer)",
                    ins,
                    (("∂L/∂W1", sh(dw)), ("∂L/∂b1", sh(db))),
                    '∂L/∂W1 = xᵀ·δ1 "ni,no->io";  ∂L/∂b1 = Σ_n δ1 "no->o"',
                    ("∂L/∂x = δ1·W1ᵀ is not computed: nobody needs the input's gradient.",),
                )
            )
            break
        dx, dw, db = dense_bwd(res, d)
        grads[l - 1] = {"w": dw, "b": db}
        backward.append(
            Step(
                f"dense {l}",
                ins,
                ((f"∂L/∂W{l}", sh(dw)), (f"∂L/∂b{l}", sh(db)), (f"∂L/∂a{l - 1}", sh(dx))),
                f'∂L/∂W{l} = a{l - 1}ᵀ·δ{l} "ni,no->io";  ∂L/∂b{l} = Σ_n δ{l} "no->o";  '
                f'∂L/∂a{l - 1} = δ{l}·W{l}ᵀ "no,io->ni"',
            )
        )
        (d,) = act_bwd(act_res[l - 2], dx)
        z = zs[l - 2]
        backward.append(
            Step(
                f"{model.activation}: δ{l - 1} = ∂L/∂a{l - 1} ⊙ {model.activation}'(z{l - 1})",
                ((f"∂L/∂a{l - 1}", sh(dx)), (f"z{l - 1}", sh(z))),
                ((f"δ{l - 1}", sh(d)),),
                '"ni,ni->ni"  (elementwise)',
                (
                    f"The Jacobian of {model.activation} is diagonal, (n, i, i) = "
                    f"{(n, sh(z)[1], sh(z)[1])}: J·g is just diag(J) ⊙ g.",
                ),
            )
        )

    _, ref_grads = reference.value_and_grad(model)(params, x, labels)
    _, manual_grads = value_and_grad(model)(params, x, labels)
    check = {}
    for l in range(L):
        for k in ("w", "b"):
            check[f"{'W' if k == 'w' else 'b'}{l + 1}"] = max(
                _maxdiff(grads[l][k], ref_grads[l][k]), _maxdiff(manual_grads[l][k], grads[l][k])
            )

    full_info = _full_jacobian(model, y, g, prob, zs, dense_res, manual_grads) if full else None
    return Explanation(
        sizes=sizes,
        batch=n,
        activation=model.activation,
        dtype="float64",
        forward=tuple(forward),
        backward=tuple(backward),
        softmax=softmax_info,
        elementwise=_elementwise_case(kz, n, c, prob, dloss_dp, y),
        gradient_check=check,
        full_jacobian=full_info,
    )


def _elementwise_case(key, n, c, prob, dloss_dp, y) -> dict[str, Any]:
    """Sigmoid + MSE: the Jacobian is diagonal, so ``.*`` is right; for softmax it is not."""
    kz, kt = jax.random.split(key)
    z = jax.random.normal(kz, (n, c), jnp.float64)
    t = jax.random.uniform(kt, (n, c), jnp.float64)
    a = jax.nn.sigmoid(z)
    upstream = 2.0 * (a - t) / c  # ∂mse/∂a, mse = mean_c (a − t)²
    J = jacobian(sigmoid, z)  # (n, c, c), from sigmoid_bwd
    diag = jnp.diagonal(J, axis1=-2, axis2=-1)  # (n, c)
    off = J - jax.vmap(jnp.diag)(diag)
    matvec = jnp.einsum("ncd,nd->nc", J, upstream)
    elementwise = diag * upstream  # MATLAB's (a − t) .* σ'(z)

    Js = softmax_jacobian(jnp.log(prob))  # the softmax example's Jacobian again
    s_diag = jnp.diagonal(Js, axis1=-2, axis2=-1)
    s_elementwise = s_diag * dloss_dp
    s_matvec = jnp.einsum("ncd,nd->nc", Js, dloss_dp)  # = p − y
    return {
        "sigmoid_jacobian": _np(J),
        "sigmoid_diagonal": _np(diag),
        "sigmoid_prime": _np(a * (1 - a)),
        "sigmoid_off_diagonal_max_abs": float(np.max(np.abs(_np(off)))),
        "sigmoid_matvec": _np(matvec),
        "sigmoid_elementwise": _np(elementwise),
        "sigmoid_max_difference": _maxdiff(matvec, elementwise),
        "softmax_elementwise": _np(s_elementwise),
        "softmax_matvec": _np(s_matvec),
        "softmax_max_difference": _maxdiff(s_matvec, s_elementwise),
        "softmax_p_minus_y_max_difference": _maxdiff(s_matvec, prob - y),
    }


def _full_jacobian(model, y, g, prob, zs, dense_res, grads) -> dict[str, Any]:
    """The gradient through explicit Jacobians only, compared with the fused rules."""
    L = model.num_layers
    act = ACTIVATIONS[model.activation]
    shapes: list[tuple[str, tuple[int, ...]]] = []
    r = jnp.einsum("nc,ncd->nd", g[:, None] * (-y / prob), softmax_jacobian(zs[-1]))
    shapes.append(("∂p/∂z (softmax)", tuple(softmax_jacobian(zs[-1]).shape)))
    out: list[dict[str, jax.Array]] = [{} for _ in range(L)]
    for l in range(L, 0, -1):
        a_in, w, b = dense_res[l - 1]
        Jw = jacobian(dense, a_in, w, b, argnum=1)  # (n, o, i, o)
        Jb = jacobian(dense, a_in, w, b, argnum=2)  # (n, o, o)
        out[l - 1] = {
            "w": jnp.einsum("no,noip->ip", r, Jw),
            "b": jnp.einsum("no,nop->p", r, Jb),
        }
        shapes += [(f"∂z{l}/∂W{l}", tuple(Jw.shape)), (f"∂z{l}/∂b{l}", tuple(Jb.shape))]
        if l > 1:
            Jx = jacobian(dense, a_in, w, b, argnum=0)  # (n, o, i)
            Ja = jacobian(act, zs[l - 2])  # (n, i, i), diagonal
            r = jnp.einsum("no,noi,nij->nj", r, Jx, Ja)
            shapes.append((f"∂z{l}/∂a{l - 1}", tuple(Jx.shape)))
            shapes.append((f"∂a{l - 1}/∂z{l - 1}", tuple(Ja.shape)))
    diffs = {}
    for l in range(L):
        diffs[f"W{l + 1}"] = _maxdiff(out[l]["w"], grads[l]["w"])
        diffs[f"b{l + 1}"] = _maxdiff(out[l]["b"], grads[l]["b"])
    entries = sum(int(np.prod(s)) for _, s in shapes)
    return {"jacobians": [[k, list(s)] for k, s in shapes], "entries": entries,
            "max_difference": diffs}  # fmt: skip


# --------------------------------------------------------------------------- text


def _render(e: Explanation) -> str:
    c, n = e.sizes[-1], e.batch
    arrow = " → ".join(map(str, e.sizes))
    out = [
        "One backward pass, from the loss down to the first layer",
        "=" * 56,
        f"Network: {arrow}, {e.activation} between layers, softmax + cross-entropy on top.",
        f"Batch n = {n}, {c} classes, {e.dtype}. Shapes are Python tuples: (n, c) = {(n, c)}.",
        "Index letters: n batch, i a layer's inputs, o its outputs, c classes, d classes again.",
        "",
        "Forward pass (what the backward pass will need)",
    ]
    w = max(len(s.title) for s in e.forward)
    for s in e.forward:
        shape = fmt_shape(s.outputs[0][1])
        out.append(f"  {s.title.ljust(w)}  {shape.ljust(9)}  {s.rule}".rstrip())
    out += ["", "Backward pass (each step takes the gradient from the step above)"]
    for k, s in enumerate(e.backward, start=1):
        out.append(f"{k:2d}. {s.title}")
        out += io_lines(s, "      ")
        out.append(f"      rule {s.rule}")
        out += [f"      {note}" for note in s.notes]
        if s.title.startswith("softmax"):
            sm = e.softmax
            out += [
                "      Example 0 (label " + str(sm["labels"][0]) + "):",
                "        J = diag(p) − p pᵀ     " + fmt_shape(np.shape(sm["jacobian"])[1:]),
                fmt_array(sm["jacobian"][0], "          "),
                "        ∂loss/∂p = −y/p      " + fmt_shape(np.shape(sm["upstream"])[1:]),
                fmt_array(sm["upstream"][0], "          "),
                "        J·∂loss/∂p           " + fmt_shape(np.shape(sm["product"])[1:]),
                fmt_array(sm["product"][0], "          "),
                "        p − y                " + fmt_shape(np.shape(sm["p_minus_y"])[1:]),
                fmt_array(sm["p_minus_y"][0], "          "),
                "      J is jaxbp.softmax_jacobian(z); jaxbp.jacobian(jaxbp.softmax, z) builds",
                "      the same J from softmax_bwd (max difference "
                f"{sm['jacobian_from_softmax_bwd_max_difference']:.1e}).",
                "      Training never forms J: softmax_cross_entropy_bwd returns g·(p − y).",
            ]
    out += ["", "Check: every gradient above against jax.grad of the same network"]
    for k, v in e.gradient_check.items():
        out.append(f"  ∂L/∂{k.ljust(4)} max difference {v:.2e}")

    el = e.elementwise
    out += [
        "",
        "When is an elementwise product (MATLAB's .*) right?",
        "  Sigmoid + MSE: a = σ(z), loss = mean_c (a − t)², ∂loss/∂a = 2(a − t)/c   (n, c)",
        "  The sigmoid Jacobian jaxbp.jacobian(jaxbp.sigmoid, z) has shape "
        f"{fmt_shape(np.shape(el['sigmoid_jacobian']))}, but it is diagonal:",
        f"    largest off-diagonal entry {el['sigmoid_off_diagonal_max_abs']:.1e}; example 0:",
        fmt_array(el["sigmoid_jacobian"][0], "      "),
        "    diag(J) = σ(z)(1 − σ(z)):",
        fmt_array(el["sigmoid_diagonal"][0], "      "),
        "  A diagonal matrix times a vector is the elementwise product of its diagonal with it:",
        f"    max |J·g − diag(J) ⊙ g| = {el['sigmoid_max_difference']:.1e}   → .* is right here.",
        "  Softmax: J is full, so the elementwise shortcut is wrong. With g = ∂loss/∂p = −y/p:",
        "    example 0:  diag(J) ⊙ g  (wrong)  " + fmt_values(el["softmax_elementwise"][0]),
        "                J·g          (right)  " + fmt_values(el["softmax_matvec"][0]),
        f"    over the batch they differ by up to {el['softmax_max_difference']:.3g}; J·g = p − y "
        f"(max difference {el['softmax_p_minus_y_max_difference']:.1e}).",
        "  So: use the matrix-vector product J·g per example (einsum \"ncd,nd->nc\"), or better",
        "  its closed form for softmax + cross-entropy, p − y: no Jacobian needed.",
    ]  # fmt: skip
    if e.full_jacobian is not None:
        fj = e.full_jacobian
        out += ["", "Full-Jacobian route (explicit Jacobians all the way, then Jacobian products)"]
        wj = max(len(k) for k, _ in fj["jacobians"])
        out += [f"  {k.ljust(wj)}  {fmt_shape(s)}" for k, s in fj["jacobians"]]
        out.append(f"  {fj['entries']} Jacobian entries in all; the fused rules form none of them.")
        for k, v in fj["max_difference"].items():
            out.append(f"  ∂L/∂{k.ljust(4)} full-Jacobian route vs fused rules: {v:.2e}")
    return "\n".join(out)
