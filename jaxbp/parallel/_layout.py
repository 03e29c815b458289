"""Where the GPT's parameters live on a ``(data, model)`` mesh, and the one re-layout its
``[q | k | v]`` projection needs for heads split across devices.

Index letters::

    d  model width      H  heads of the model       F  MLP width       V  vocabulary
    P  devices on the model axis;  per device: h = H/P heads, g = d/P = h·e columns of each
                                    of q, k and v, f = F/P, v = V/P

**The layout** (:func:`param_specs`). Megatron-LM's: the projections *into* a block's
parallel region split by columns (``qkv.w (d, 3d)``, ``mlp.fc.w (d, F)`` and their biases:
``P(None, model)``), the projections *out of* it by rows (``attn.proj.w (d, d)``,
``mlp.out.w (F, d)``: ``P(model, None)``; their biases, added after the all-reduce, are
replicated); the token table by vocabulary rows (``tok (V, d)``: ``P(model, None)``), the
untied head by vocabulary columns (``head.w (d, V)``: ``P(None, model)``); layer norms and
position embeddings replicated (``P()``). Every split part is ``1/P`` per device.

**The re-layout** (:func:`to_heads`, :func:`to_blocks`). The GPT stores ``qkv.w`` as
``[q | k | v]``, each ``d`` columns of ``H`` heads, so the columns of this device's heads
are three slices ``q[k·g:(k+1)·g]``, ``k[…]``, ``v[…]``, which no sharding of a ``(d, 3d)``
array holds on one device (a sharding gives each device one contiguous block). The
parameter is therefore kept in contiguous blocks of ``3g`` columns (``P(None, model)``, the
memory of a column split) and each step moves, per device, the three ``(d+1, g)`` groups of
weights and bias to the device whose heads they are: three ``ppermute`` rounds forward, and
the same three backward for the gradient — ``6·(d+1)·g`` elements per block per device.
Megatron stores its fused projection per head (``[q₀ k₀ v₀ | q₁ k₁ v₁ | …]``) and moves
nothing; with one device on the model axis nothing moves here either.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from jax import lax

from ..gpt import GPT
from ._mesh import P

__all__ = ["param_specs", "rounds", "to_blocks", "to_heads"]


def param_specs(model: GPT, model_axis: str | None = "model") -> dict[str, Any]:
    """The ``PartitionSpec`` of every parameter of ``model`` (the structure of
    :meth:`jaxbp.GPT.init`) for tensor parallelism over ``model_axis``: the layout of the
    module docstring. ``model_axis=None``: everything replicated (``P()``)."""
    m = model_axis
    rep = {"gamma": P(), "beta": P()}
    col, row = {"w": P(None, m), "b": P(m)}, {"w": P(m, None), "b": P()}
    block = {
        "ln1": dict(rep),
        "attn": {"qkv": dict(col), "proj": dict(row)},
        "ln2": dict(rep),
        "mlp": {"fc": dict(col), "out": dict(row)},
    }
    specs: dict[str, Any] = {"tok": P(m, None), "pos": P()}
    specs["blocks"] = [block for _ in range(model.layers)]
    specs["ln_f"] = dict(rep)
    if not model.tied:
        specs["head"] = {"w": P(None, m)}
    return specs


# ------------------------------------------------------------------- the qkv re-layout


@functools.lru_cache(maxsize=32)
def rounds(p: int) -> tuple[tuple[tuple[int, int, int, int], ...], ...]:
    """Three rounds of ``(source, destination, u, j)``: device ``source`` sends its ``u``-th
    group of ``g`` columns (global group ``q = 3·source + u``) to device ``destination =
    q mod P``, which keeps it as part ``j = q div P`` (0: q, 1: k, 2: v) of its heads.

    Every device sends three groups and receives three: a 3-regular bipartite graph, which
    splits into three perfect matchings (König), so each round is one ``ppermute`` in which
    every device sends exactly one group and receives exactly one."""
    edges = [(k, (3 * k + u) % p, u, (3 * k + u) // p) for k in range(p) for u in range(3)]
    out = []
    for _ in range(3):
        chosen = _perfect_matching(edges, p)
        edges = [e for e in edges if e not in chosen]
        out.append(chosen)
    return tuple(out)


def _perfect_matching(edges, p):
    """Edges ``(source, destination, ...)`` matching every source to a distinct destination
    (Kuhn's augmenting paths; a regular bipartite graph always has such a matching)."""
    match: dict[int, tuple] = {}  # destination -> edge

    def augment(src, seen):
        for e in edges:
            if e[0] == src and e[1] not in seen:
                seen.add(e[1])
                if e[1] not in match or augment(match[e[1]][0], seen):
                    match[e[1]] = e
                    return True
        return False

    for src in range(p):
        if not augment(src, set()):  # pragma: no cover - a regular graph always matches
            raise AssertionError(f"no perfect matching of the qkv groups for P = {p}")
    return tuple(sorted(match.values()))


def _tables(rnd, p):
    send, recv = [0] * p, [0] * p
    for src, dst, u, j in rnd:
        send[src], recv[dst] = u, j
    return jnp.asarray(send, jnp.int32), jnp.asarray(recv, jnp.int32)


def to_heads(blocks: Any, axis: str | None, p: int) -> Any:
    """``(..., 3, g)``: this device's contiguous ``3g`` columns of ``[q | k | v]`` as three
    groups → ``(..., 3, g)``: the ``q``, ``k`` and ``v`` columns of this device's heads.

    Three ``ppermute`` rounds over ``axis``, each moving one ``(..., g)`` group per device
    (:func:`rounds`). With ``P = 1`` the two layouts are the same."""
    if p == 1:
        return blocks
    k = lax.axis_index(axis)
    out = jnp.zeros_like(blocks)
    for rnd in rounds(p):
        send, recv = _tables(rnd, p)
        piece = lax.dynamic_index_in_dim(blocks, send[k], axis=-2, keepdims=False)
        got = lax.ppermute(piece, axis, [(src, dst) for src, dst, _, _ in rnd])  # (d+1)·g
        out = lax.dynamic_update_index_in_dim(out, got, recv[k], axis=-2)
    return out


def to_blocks(heads: Any, axis: str | None, p: int) -> Any:
    """The inverse of :func:`to_heads` (the same rounds, reversed): the gradient of this
    device's heads' ``q, k, v`` columns back to its contiguous block of ``[q | k | v]``."""
    if p == 1:
        return heads
    k = lax.axis_index(axis)
    out = jnp.zeros_like(heads)
    for rnd in rounds(p):
        send, recv = _tables(rnd, p)
        piece = lax.dynamic_index_in_dim(heads, recv[k], axis=-2, keepdims=False)
        got = lax.ppermute(piece, axis, [(dst, src) for src, dst, _, _ in rnd])  # (d+1)·g
        out = lax.dynamic_update_index_in_dim(out, got, send[k], axis=-2)
    return out
