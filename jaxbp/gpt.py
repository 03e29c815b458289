"""A GPT whose gradient is an explicit reverse loop over the hand-written ``_bwd`` rules.

Index letters::

    n  sequences in a batch        t  positions (≤ the model's context)
    d  model width                 h  heads        e  head width, d = h·e
    f  MLP width (4·d)             v  vocabulary

The model (pre-norm blocks, as GPT-2)::

    x₀   = tok[ids] + pos[:t]                              (n,t,d)   embedding, position_embedding
    per block:
      a    = layer_norm(x)                                  (n,t,d)
      q,k,v= split(a·W_qkv + b_qkv)                         (n,h,t,e) each; W_qkv [q₀ k₀ v₀ | q₁ …]
      o    = attention(q, k, v, causal)                     (n,h,t,e)
      x    = x + merge(o)·W_o + b_o                         (n,t,d)   residual
      m    = layer_norm(x)
      x    = x + gelu(m·W_fc + b_fc)·W_out + b_out          (n,t,f) inside
    loss = linear_softmax_cross_entropy(layer_norm(x), W_head, next ids)   (n·t,)

:func:`forward` runs this through the ``_fwd`` rules, keeps each one's residuals, and
:func:`backward` walks back through the matching ``_bwd`` rules, layer by layer::

    δ    = head_bwd(g)                 (n·t,d)  g = valid/n_valid, the mean's seed
    δ    = layer_norm_bwd(δ)
    per block, last first:
      δ   += layer_norm_bwd(dense_bwd(gelu_bwd(dense_bwd(δ))))       the MLP branch
      dO   = unmerge(dense_bwd(δ))                                    (n,h,t,e)
      dq,dk,dv = attention_bwd(dO)     through dS = P ⊙ (dP − rowsum(dP ⊙ P)), (t,t) per head
      δ   += layer_norm_bwd(dense_bwd(merge(dq, dk, dv)))             the attention branch
    dtok = embedding_bwd(δ) (+ dW_headᵀ when tied);   dpos[:t] = Σₙ δ

A residual connection copies its input to two places, so its backward adds the two
gradients: that is every ``δ +=`` above. Every rule is called through a :class:`jaxbp.Tape`,
which sends each parameter's gradient to its leaf: :class:`GPT` implements
:mod:`jaxbp.model`'s interface, so :func:`jaxbp.value_and_grad`, the per-example transforms,
DP-SGD and :func:`jaxbp.compare` run on it as on any model. No ``jax.grad``, ``jax.vjp`` or
``custom_vjp`` dispatch runs inside; :func:`jaxbp.reference.value_and_grad` computes the
same with ``jax.value_and_grad`` of a plain-jnp twin.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from ._checks import check_label_range
from ._tape import Tape, transposed
from .activations import gelu
from .attention import STRATEGIES as ATTENTION_STRATEGIES
from .attention import attention
from .dense import dense
from .dropout import dropout
from .embedding import embedding, position_embedding
from .fused import linear_softmax_cross_entropy
from .losses import valid_rows
from .norms import layer_norm

__all__ = ["GPT", "GPTParams", "forward", "backward"]

GPTParams = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class GPT:
    """A decoder-only transformer (GPT-2 layout) trained with hand-written backward passes.

    Args:
      vocab: vocabulary size ``v`` (65 characters for :func:`jaxbp.load_shakespeare`).
      d: model width ``d``.
      heads: attention heads ``h``; must divide ``d`` (head width ``e = d/h``).
      layers: number of blocks.
      context: longest sequence ``t`` the position table covers.
      tied: the head reuses the token table (``W_head = tokᵀ``), as GPT-2 does.
      mlp_ratio: MLP width ``f = mlp_ratio·d``.
      eps: layer-norm epsilon.
      attention: ``"store"`` (keep each head's ``(t, t)`` probabilities for the backward) or
        ``"recompute"`` (keep the log-sum-exp ``(t,)`` and recompute them, flash-style).
      head_strategy: the fused head's strategy (``"forward"``: gradients during the forward
        pass, no logit computed twice; ``"recompute"``: the least memory).
      dropout: the rate of :func:`jaxbp.dropout` in training, as GPT-2 places it: on the
        embeddings' sum and on each block's two branches before they join the residual
        stream (``1 + 2·layers`` masks, each from ``jax.random.fold_in(key, site)``; not on
        the attention probabilities). A training step (``jaxbp.value_and_grad`` and the other
        transforms) then needs ``dropout_key=``; :meth:`apply`, :meth:`mean_loss` and
        :meth:`generate` evaluate without dropout.

    The model is hashable and holds no arrays: parameters are a separate pytree
    (:meth:`init`), a dict ``{"tok": (v, d), "pos": (context, d), "blocks": [...],
    "ln_f": {...}, "head": {"w": (d, v)}}`` whose blocks hold ``ln1``, ``attn.qkv (d, 3d)``
    (its columns per head: ``[q₀ k₀ v₀ | q₁ k₁ v₁ | …]``, ``e`` each, as Megatron-LM),
    ``attn.proj (d, d)``, ``ln2``, ``mlp.fc (d, f)``, ``mlp.out (f, d)``. optax takes the
    gradients as they are.

    Example:
      >>> import jax, jaxbp
      >>> model = jaxbp.GPT(vocab=65, d=32, heads=4, layers=2, context=16)
      >>> params = model.init(jax.random.PRNGKey(0))
      >>> ids = jax.numpy.zeros((2, 16), jax.numpy.int32)
      >>> model.apply(params, ids).shape
      (2, 16, 65)
    """

    vocab: int
    d: int
    heads: int
    layers: int
    context: int
    tied: bool = False
    mlp_ratio: int = 4
    eps: float = 1e-5
    attention: str = "store"
    head_strategy: str = "forward"
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab", "d", "heads", "layers", "context", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.d % self.heads:
            raise ValueError(f"heads: expected a divisor of d = {self.d}, got {self.heads}")
        if self.attention not in ATTENTION_STRATEGIES:
            raise ValueError(
                f"attention: expected one of {list(ATTENTION_STRATEGIES)}, got {self.attention!r}"
            )
        if self.head_strategy not in ("forward", "recompute"):
            raise ValueError(
                f"head_strategy: expected 'forward' or 'recompute', got {self.head_strategy!r}"
            )
        if not isinstance(self.tied, bool):
            raise TypeError(f"tied: expected a bool, got {self.tied!r}")
        eps = _checks.static_number("eps", self.eps)
        if not eps > 0:
            raise ValueError(f"eps: expected a positive number, got {self.eps!r}")
        object.__setattr__(self, "eps", eps)
        rate = _checks.static_number("dropout", self.dropout)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", rate)

    @property
    def head_dim(self) -> int:
        return self.d // self.heads

    @property
    def num_params(self) -> int:
        """Number of parameters (the token table counted once when tied)."""
        d, f, v = self.d, self.mlp_ratio * self.d, self.vocab
        block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        return v * d + self.context * d + self.layers * block + 2 * d + (0 if self.tied else d * v)

    def init(self, key: jax.Array, dtype: Any = jnp.float32) -> GPTParams:
        """GPT-2's initialisation: weights ``N(0, 0.02²)``, the two projections into the
        residual stream ``N(0, (0.02/√(2·layers))²)``, biases 0, layer-norm gains 1."""
        d, f, v = self.d, self.mlp_ratio * self.d, self.vocab
        std, proj_std = 0.02, 0.02 / math.sqrt(2 * self.layers)
        keys = iter(jax.random.split(key, 3 + 4 * self.layers))

        def normal(shape, s):
            return (s * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

        def norm():
            return {"gamma": jnp.ones((d,), dtype), "beta": jnp.zeros((d,), dtype)}

        def lin(i, o, s):
            return {"w": normal((i, o), s), "b": jnp.zeros((o,), dtype)}

        params: GPTParams = {"tok": normal((v, d), std), "pos": normal((self.context, d), std)}
        params["blocks"] = [
            {
                "ln1": norm(),
                "attn": {"qkv": lin(d, 3 * d, std), "proj": lin(d, d, proj_std)},
                "ln2": norm(),
                "mlp": {"fc": lin(d, f, std), "out": lin(f, d, proj_std)},
            }
            for _ in range(self.layers)
        ]
        params["ln_f"] = norm()
        head = normal((d, v), std)
        if not self.tied:
            params["head"] = {"w": head}
        return params

    # -- forward through the public ops (differentiable with jax.grad) ---------------------

    def apply(self, params: GPTParams, ids: jax.Array) -> jax.Array:
        """Logits ``(n, t, v)`` for ids ``(n, t)`` through jaxbp's ops (their rules run under
        ``jax.grad``). The full ``(n, t, v)`` logits are formed here; training does not."""
        ids = self._check_ids(params, ids)
        return dense(self.hidden(params, ids), self.head_weight(params))

    def hidden(self, params: GPTParams, ids: jax.Array) -> jax.Array:
        """The final layer-normed hidden states ``(n, t, d)``, before the head."""
        x = position_embedding(embedding(ids, params["tok"]), params["pos"])
        for blk in params["blocks"]:
            a = layer_norm(x, blk["ln1"]["gamma"], blk["ln1"]["beta"], eps=self.eps)
            q, k, v = _split_qkv(dense(a, **blk["attn"]["qkv"]), self.heads)
            o = attention(q, k, v, causal=True, strategy=self.attention)
            x = x + dense(_merge_heads(o), **blk["attn"]["proj"])
            m = layer_norm(x, blk["ln2"]["gamma"], blk["ln2"]["beta"], eps=self.eps)
            x = x + dense(gelu(dense(m, **blk["mlp"]["fc"])), **blk["mlp"]["out"])
        return layer_norm(x, params["ln_f"]["gamma"], params["ln_f"]["beta"], eps=self.eps)

    def head_weight(self, params: GPTParams) -> jax.Array:
        """``W_head (d, v)``: ``tokᵀ`` when tied."""
        return params["tok"].T if self.tied else params["head"]["w"]

    def per_token_loss(self, params: GPTParams, ids, targets, *, where=None) -> jax.Array:
        """Cross-entropy of each next-id prediction ``(n, t)`` (0 where ``where`` is False),
        through the fused head: the ``(n·t, v)`` logits are never stored."""
        ids, targets, where = self.check_inputs(params, ids, targets, where, _EVAL)[1:4]
        n, t = ids.shape
        xf = self.hidden(params, ids).reshape(n * t, self.d)
        loss = linear_softmax_cross_entropy(
            xf, self.head_weight(params), targets.reshape(-1),
            where=None if where is None else where.reshape(-1), strategy=self.head_strategy,
        )  # fmt: skip
        return loss.reshape(n, t)

    def mean_loss(self, params: GPTParams, ids, targets, *, where=None) -> jax.Array:
        """Mean next-id cross-entropy over valid positions (nats per token); 0 if none."""
        per_tok = self.per_token_loss(params, ids, targets, where=where)
        valid = jnp.ones(per_tok.shape, bool) if where is None else jnp.asarray(where, bool)
        total = jnp.sum(jnp.where(valid, per_tok, 0.0))
        return total / jnp.maximum(jnp.sum(valid), 1).astype(total.dtype)

    def generate(
        self, params: GPTParams, key: jax.Array, prompt, steps: int, *, temperature: float = 1.0
    ) -> np.ndarray:
        """Sample ``steps`` ids after ``prompt (t₀,)``; returns the prompt and the samples.

        Each step runs :meth:`apply` on the last ``context`` ids (one compiled shape: shorter
        windows are padded at the end, which causal attention never looks at) and samples
        from ``softmax(logits / temperature)``.

        Raises:
          TypeError: a prompt that is not of an integer dtype (never cast), ``steps`` that is
            not an integer.
          ValueError: an empty prompt or one of more than one axis; an id outside
            ``[0, vocab)`` (as :func:`jaxbp.embedding`); ``steps < 0``; ``temperature ≤ 0``.
        """
        prompt = _checks.token_ids("prompt", prompt, self.vocab)  # as embedding checks ids
        steps = _checks.count("steps", steps)
        temperature = _checks.static_number("temperature", temperature)
        if not temperature > 0:
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        step = _sampler(self, temperature)
        out = list(prompt)
        for i in range(steps):
            window = out[-self.context :]
            buf = np.zeros((1, self.context), np.int32)
            buf[0, : len(window)] = window
            nxt = step(params, jnp.asarray(buf), len(window) - 1, jax.random.fold_in(key, i))
            out.append(int(nxt))
        return np.asarray(out, np.int32)

    # -- the explicit loops (jaxbp.model's interface) ------------------------------------

    def forward(self, t, params, ids, targets, where=None, key=None):
        """:func:`jaxbp.gpt.forward`: ``(per-token losses (n, t), valid (n, t), state)``."""
        return forward(self, t, params, ids, targets, where, key)

    def backward(self, t, state, seed) -> None:
        """:func:`jaxbp.gpt.backward`: the reverse loop from the per-token ``seed (n, t)``."""
        backward(self, t, state, seed)

    # -- validation ------------------------------------------------------------------------

    def _check_ids(self, params, ids) -> jax.Array:
        self.check_params(params)
        ids = _checks.integer("ids", ids)
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.context:
            raise ValueError(
                f"ids: expected shape (n, t) with 1 ≤ t ≤ context = {self.context}, got {ids.shape}"
            )
        return ids

    def check_params(self, params) -> None:
        """``ValueError`` naming the first parameter whose shape is not the model's."""
        want = _param_shapes(self)
        try:
            got = jax.tree.map(np.shape, params)
            if got == want:  # every container and shape equal: the common case, one compare
                return
            same = jax.tree.structure(got) == jax.tree.structure(want)
        except (TypeError, ValueError):
            same = False
        if not same:
            keys = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(
                f"params: expected the structure of GPT.init (keys {sorted(want)}, "
                f"{self.layers} blocks), got {keys}"
            )
        for path, (shape, ref) in _leaves_with_paths(got, want):
            if shape != ref:
                raise ValueError(f"params{path}: expected shape {ref}, got {shape}")

    def check_inputs(self, params, ids, targets, where=None, dropout_key=None):
        """Validate and convert: ``(params, ids (n, t), targets (n, t), where (n, t) or None,
        dropout_key)``; ``dropout_key`` is the PRNG key of the dropout masks (needed when
        ``dropout > 0``, unused otherwise).

        Integer ids and targets must lie in ``[0, v)``: checked here when they are concrete
        (``ValueError``); under ``jit`` an out-of-range id makes its position NaN.
        """
        ids = self._check_ids(params, ids)
        targets = _checks.integer("targets", targets)
        if targets.shape != ids.shape:
            raise ValueError(f"targets: expected the shape of ids {ids.shape}, got {targets.shape}")
        if where is not None:
            where = _checks.as_array(where)
            if where.dtype != jnp.bool_ or where.shape != ids.shape:
                raise ValueError(
                    f"where: expected a bool mask of the shape of ids {ids.shape}, "
                    f"got {where.dtype} {where.shape}"
                )
        check_label_range(ids, self.vocab, name="ids")
        check_label_range(targets, self.vocab, where=where, name="targets")
        if self.dropout > 0.0 and dropout_key is None:
            raise ValueError(
                f"dropout_key: GPT(dropout={self.dropout}) needs a PRNG key for its dropout "
                "masks in a training step (dropout_key=jax.random.key(0)); apply, mean_loss and "
                "generate evaluate without dropout"
            )
        return params, ids, targets, where, dropout_key if self.dropout > 0.0 else None


@functools.lru_cache(maxsize=64)
def _param_shapes(model: GPT):
    """The shape of every parameter, as :meth:`GPT.init` makes them (traced once per model)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    return jax.tree.map(lambda a: tuple(a.shape), shapes)


def _leaves_with_paths(got, want):
    flat_got = jax.tree_util.tree_flatten_with_path(got, is_leaf=lambda x: isinstance(x, tuple))
    flat_want = jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, tuple))
    for (path, shape), ref in zip(flat_got[0], flat_want, strict=True):
        yield jax.tree_util.keystr(path), (shape, ref)


@functools.lru_cache(maxsize=16)
def _sampler(model: GPT, temperature: float) -> Callable:
    @jax.jit
    def step(params, buf, last, key):
        logits = model.apply(params, buf)[0, last].astype(jnp.float32)  # (v,)
        return jax.random.categorical(key, logits / temperature)

    return step


# ---------------------------------------------------------------- heads: split and merge


def _split_qkv(qkv: jax.Array, heads: int):
    """``(n, t, 3d) → q, k, v (n, h, t, e)``. The columns are per head, as Megatron-LM
    stores them: ``[q₀ k₀ v₀ | q₁ k₁ v₁ | …]`` (head, then q/k/v, then ``e``), so a
    contiguous block of ``3d/P`` columns holds ``h/P`` whole heads."""
    n, t, d3 = qkv.shape
    e = d3 // (3 * heads)
    y = qkv.reshape(n, t, heads, 3, e).transpose(3, 0, 2, 1, 4)  # (3, n, h, t, e)
    return y[0], y[1], y[2]


def _join_qkv(dq, dk, dv) -> jax.Array:
    """The backward of :func:`_split_qkv`: ``dq, dk, dv (n, h, t, e) → (n, t, 3d)``."""
    n, h, t, e = dq.shape
    return jnp.stack([dq, dk, dv]).transpose(1, 3, 2, 0, 4).reshape(n, t, 3 * h * e)


def _merge_heads(o: jax.Array) -> jax.Array:
    """``(n, h, t, e) → (n, t, d)``."""
    n, h, t, e = o.shape
    return o.transpose(0, 2, 1, 3).reshape(n, t, h * e)


def _split_heads(g: jax.Array, heads: int) -> jax.Array:
    """The backward of :func:`_merge_heads`: ``(n, t, d) → (n, h, t, e)``."""
    n, t, d = g.shape
    return g.reshape(n, t, heads, d // heads).transpose(0, 2, 1, 3)


# ------------------------------------------------------------ the explicit forward/backward

_EVAL = object()  # check_inputs' dropout_key when evaluating: no dropout, no key needed


class _Dropout:
    """The dropout sites of one forward: site ``j`` (0 the embeddings, ``1 + 2i`` and
    ``2 + 2i`` block ``i``'s attention and MLP branches) draws its mask from
    ``fold_in(key, j)``; ``saved`` holds each site's residuals (a plain list: the state stays
    a pytree). No-ops at rate 0."""

    def __init__(self, rate: float, key):
        self.rate, self.key, self.saved = rate, key, []

    def fwd(self, t: Tape, x):
        if self.rate == 0.0:
            return x
        k = jax.random.fold_in(self.key, len(self.saved))
        y, res = t.fwd(dropout, x, k, rate=self.rate)
        self.saved.append(res)
        return y


def _dropout_bwd(model: GPT, t: Tape, saved: list, g, site: int):
    """The gradient through dropout site ``site`` (``g`` itself at rate 0)."""
    if model.dropout == 0.0:
        return g
    (dx,) = t.bwd(dropout, saved[site], g, rate=model.dropout)
    return dx


def forward(model: GPT, t: Tape, params: GPTParams, ids, targets, where, key=None):
    """Forward through the ops' ``fwd`` rules: ``(per-token loss (n, t), valid (n, t),
    state)``; ``state`` holds every rule's residuals, in the order :func:`backward` consumes
    them. The rules are read from the op objects (``jaxbp.dense.fwd``, ...) when traced."""
    n, tt = ids.shape
    eps, heads, strategy = model.eps, model.heads, model.attention
    x, tok_res = t.fwd(embedding, ids, params["tok"])  # (n, t, d)
    x, pos_res = t.fwd(position_embedding, x, params["pos"])  # + pos[:t]
    drop = _Dropout(model.dropout, key)
    x = drop.fwd(t, x)
    blocks = []
    for blk in params["blocks"]:
        a, ln1 = t.fwd(layer_norm, x, blk["ln1"]["gamma"], blk["ln1"]["beta"], eps=eps)
        qkv, qkv_res = t.fwd(dense, a, blk["attn"]["qkv"]["w"], blk["attn"]["qkv"]["b"])
        q, k, v = _split_qkv(qkv, heads)
        o, att = t.fwd(attention, q, k, v, None, causal=True, strategy=strategy)
        y, proj = t.fwd(dense, _merge_heads(o), blk["attn"]["proj"]["w"], blk["attn"]["proj"]["b"])
        x = x + drop.fwd(t, y)
        m, ln2 = t.fwd(layer_norm, x, blk["ln2"]["gamma"], blk["ln2"]["beta"], eps=eps)
        hid, fc = t.fwd(dense, m, blk["mlp"]["fc"]["w"], blk["mlp"]["fc"]["b"])
        act, act_res = t.fwd(gelu, hid)
        y, out = t.fwd(dense, act, blk["mlp"]["out"]["w"], blk["mlp"]["out"]["b"])
        x = x + drop.fwd(t, y)
        blocks.append((ln1, qkv_res, att, proj, ln2, fc, act_res, out))
    xf, lnf = t.fwd(layer_norm, x, params["ln_f"]["gamma"], params["ln_f"]["beta"], eps=eps)
    flat_where = None if where is None else where.reshape(-1)
    loss, head = t.fwd(
        linear_softmax_cross_entropy, xf.reshape(n * tt, model.d), model.head_weight(params),
        targets.reshape(-1), None, flat_where, strategy=model.head_strategy,
    )  # fmt: skip
    valid = valid_rows(targets, where, batch_shape=(n, tt))
    return loss.reshape(n, tt), valid, (tok_res, pos_res, blocks, lnf, head, (n, tt), drop.saved)


def backward(model: GPT, t: Tape, state, seed: jax.Array) -> None:
    """Reverse loop from a per-token seed ``(n, t) = ∂L/∂loss``; every parameter's gradient
    goes to its leaf through the tape (the tied head's ``dW_headᵀ`` adds to ``tok``'s)."""
    tok_res, pos_res, blocks, lnf, head, (n, tt), dropped = state
    eps, heads, strategy = model.eps, model.heads, model.attention
    to_head = {"w": transposed(("tok",))} if model.tied else {"w": ("head", "w")}
    dxf, _ = t.bwd(linear_softmax_cross_entropy, head, seed.reshape(-1), params=to_head,
                   strategy=model.head_strategy)  # fmt: skip
    (dx,) = t.bwd(layer_norm, lnf, dxf.reshape(n, tt, model.d), params=("ln_f",), eps=eps)
    for i, (ln1, qkv_res, att, proj, ln2, fc, act_res, out) in reversed(list(enumerate(blocks))):
        blk = ("blocks", i)
        # MLP branch: x_out = x_mid + dense(gelu(dense(layer_norm(x_mid))))
        dy = _dropout_bwd(model, t, dropped, dx, 2 + 2 * i)
        (dact,) = t.bwd(dense, out, dy, params=(*blk, "mlp", "out"))  # "ntd,fd->ntf"
        (dhid,) = t.bwd(gelu, act_res, dact)
        (dm,) = t.bwd(dense, fc, dhid, params=(*blk, "mlp", "fc"))
        (dxm,) = t.bwd(layer_norm, ln2, dm, params=(*blk, "ln2"), eps=eps)
        dx = dx + dxm  # the residual: both paths' gradients add
        # attention branch: x_mid = x_in + dense(merge(attention(split(dense(layer_norm(x_in))))))
        dy = _dropout_bwd(model, t, dropped, dx, 1 + 2 * i)
        (do,) = t.bwd(dense, proj, dy, params=(*blk, "attn", "proj"))
        dq, dk, dv = t.bwd(
            attention, att, _split_heads(do, heads), causal=True, strategy=strategy
        )  # (n, h, t, e) each, dS = P ⊙ (dP − rowsum(dP ⊙ P))
        (da,) = t.bwd(dense, qkv_res, _join_qkv(dq, dk, dv), params=(*blk, "attn", "qkv"))
        (dxa,) = t.bwd(layer_norm, ln1, da, params=(*blk, "ln1"), eps=eps)
        dx = dx + dxa
    dx = _dropout_bwd(model, t, dropped, dx, 0)
    (dx,) = t.bwd(position_embedding, pos_res, dx, params={"table": ("pos",)})  # Σₙ δ "ntd->td"
    t.bwd(embedding, tok_res, dx, params={"table": ("tok",)})  # a scatter-add into tok
