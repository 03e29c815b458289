"""Plain-jnp oracles for the Flax NNX / Equinox wrappers (tests/test_nnx.py, test_eqx.py)."""

import jax
import jax.numpy as jnp

import jaxbp

HAS_TRANSFORMER_OPS = all(
    hasattr(jaxbp, n) for n in ("layer_norm", "rms_norm", "embedding", "attention")
)


def dense(x, w, b):
    return x @ w + b


def layer_norm(x, gamma, beta, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * gamma + beta


def rms_norm(x, gamma, eps):
    return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + eps) * gamma


def embedding(ids, table):
    return table[ids]


def attention(x, p, heads, causal):
    """``p``: ``{"q": (w, b), "k": ..., "v": ..., "o": ...}``; x ``(n, t, d)``."""
    n, t, d = x.shape
    e = d // heads

    def split(y):
        return y.reshape(n, t, heads, e).transpose(0, 2, 1, 3)

    q, k, v = (split(x @ p[c][0] + p[c][1]) for c in "qkv")
    s = jnp.einsum("nhte,nhse->nhts", q, k) / jnp.sqrt(jnp.asarray(e, x.dtype))
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    o = jnp.einsum("nhts,nhse->nhte", jax.nn.softmax(s, axis=-1), v)
    o = o.transpose(0, 2, 1, 3).reshape(n, t, d)
    return o @ p["o"][0] + p["o"][1]


def loss_weights(shape, dtype=jnp.float64):
    """A fixed, non-uniform cotangent so every output element matters differently."""
    return jnp.sin(jnp.arange(jnp.prod(jnp.array(shape)), dtype=dtype)).reshape(shape) + 0.5
