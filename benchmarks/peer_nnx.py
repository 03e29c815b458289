"""P10's peer: the GPT a Flax user would write, from Flax NNX modules.

``nnx.Embed``, ``nnx.LayerNorm`` (ε 1e-5, as ``jaxbp.GPT``), ``nnx.Linear``,
``jax.nn.dot_product_attention(..., is_causal=True)``, ``jax.nn.gelu`` (tanh form) and
optax's integer-label cross-entropy on full logits, stepped with ``jax.value_and_grad``
under ``jax.jit`` in NNX's functional form (``nnx.split`` once, ``nnx.merge`` inside the
jitted step: the form Flax recommends where call overhead matters, and the one the harness
can lower to read its compiled memory). The architecture and the parameter layout are
``jaxbp.GPT``'s (pre-norm blocks; ``attn.qkv``'s columns per head, ``[q₀ k₀ v₀ | q₁ …]``),
so that :func:`step_for` can start from a ``jaxbp.GPT``'s parameters and return its
gradients in ``jaxbp.GPT``'s tree: the harness then checks both sides agree before timing.

Index letters: n sequences, t positions, d width, h heads, e = d/h, f = 4d, v vocabulary.
Needs ``flax`` (the ``modules`` extra); :func:`available` says whether it is installed.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import jax
import jax.numpy as jnp
import optax


def available() -> bool:
    return importlib.util.find_spec("flax") is not None


def _model(gpt, dtype):
    from flax import nnx

    d, h, f, v, t = gpt.d, gpt.heads, gpt.mlp_ratio * gpt.d, gpt.vocab, gpt.context

    def lin(i, o, bias=True):
        return nnx.Linear(i, o, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))

    def norm():
        return nnx.LayerNorm(d, epsilon=gpt.eps, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))

    class Block(nnx.Module):
        def __init__(self):
            self.ln1, self.qkv, self.proj = norm(), lin(d, 3 * d), lin(d, d)
            self.ln2, self.fc, self.out = norm(), lin(d, f), lin(f, d)

        def __call__(self, x):  # (n, t, d)
            n, tt, _ = x.shape
            qkv = self.qkv(self.ln1(x)).reshape(n, tt, h, 3, d // h)  # per head: q, k, v
            o = jax.nn.dot_product_attention(qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :],
                                              is_causal=True)  # (n, t, h, e)  # fmt: skip
            x = x + self.proj(o.reshape(n, tt, d))
            return x + self.out(jax.nn.gelu(self.fc(self.ln2(x)), approximate=True))

    class FlaxGPT(nnx.Module):
        def __init__(self):
            self.tok = nnx.Embed(v, d, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
            self.pos = nnx.Param(jnp.zeros((t, d), dtype))
            self.blocks = nnx.List([Block() for _ in range(gpt.layers)]) if hasattr(
                nnx, "List") else [Block() for _ in range(gpt.layers)]  # fmt: skip
            self.ln_f, self.head = norm(), lin(d, v, bias=False)

        def __call__(self, ids):  # (n, t) → logits (n, t, v)
            x = self.tok(ids) + self.pos[: ids.shape[1]]
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln_f(x))

    return FlaxGPT()


def _loss(model, ids, targets):
    logits = model(ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _to_jaxbp(g: Any, layers: int) -> dict:
    """The NNX gradient state as ``jaxbp.GPT``'s parameter tree (names only; no arithmetic)."""

    def lin(m, bias=True):
        return {"w": m["kernel"], "b": m["bias"]} if bias else {"w": m["kernel"]}

    def norm(m):
        return {"gamma": m["scale"], "beta": m["bias"]}

    blocks = [
        {"ln1": norm(b["ln1"]), "attn": {"qkv": lin(b["qkv"]), "proj": lin(b["proj"])},
         "ln2": norm(b["ln2"]), "mlp": {"fc": lin(b["fc"]), "out": lin(b["out"])}}
        for b in (g["blocks"][i] for i in range(layers))
    ]  # fmt: skip
    return {"tok": g["tok"]["embedding"], "pos": g["pos"], "blocks": blocks,
            "ln_f": norm(g["ln_f"]), "head": lin(g["head"], bias=False)}  # fmt: skip


def step_for(gpt, params: dict) -> tuple[Any, Any]:
    """``(step, state)``: ``step(state, ids, targets) -> (mean loss, grads)`` jitted, the
    grads in ``jaxbp.GPT``'s tree; ``state`` the NNX parameters set to ``params``."""
    from flax import nnx

    if gpt.tied or gpt.dropout:
        raise ValueError("the Flax NNX peer is the untied GPT without dropout")
    dtype = params["tok"].dtype
    model = _model(gpt, dtype)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()

    def put(path, value):
        node = pure
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = jnp.asarray(value)

    put(("tok", "embedding"), params["tok"])
    put(("pos",), params["pos"])
    for name, src in (("ln_f", params["ln_f"]),) + tuple(
        (("blocks", i, ln), b[ln]) for i, b in enumerate(params["blocks"]) for ln in ("ln1", "ln2")
    ):  # fmt: skip
        path = name if isinstance(name, tuple) else (name,)
        put((*path, "scale"), src["gamma"])
        put((*path, "bias"), src["beta"])
    for i, b in enumerate(params["blocks"]):
        for name, src in (("qkv", b["attn"]["qkv"]), ("proj", b["attn"]["proj"]),
                          ("fc", b["mlp"]["fc"]), ("out", b["mlp"]["out"])):  # fmt: skip
            put(("blocks", i, name, "kernel"), src["w"])
            put(("blocks", i, name, "bias"), src["b"])
    put(("head", "kernel"), params["head"]["w"])
    nnx.replace_by_pure_dict(state, pure)

    @jax.jit
    def step(state, ids, targets):
        loss, grads = jax.value_and_grad(lambda s: _loss(nnx.merge(graphdef, s), ids, targets))(
            state
        )
        pure_grads = nnx.to_pure_dict(grads) if hasattr(nnx, "to_pure_dict") else (
            grads.to_pure_dict())  # fmt: skip
        return loss, _to_jaxbp(pure_grads, gpt.layers)

    return step, state
