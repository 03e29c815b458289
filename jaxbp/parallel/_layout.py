"""Where the GPT's parameters live on a ``(data, model)`` mesh.

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

The GPT stores ``qkv.w``'s columns per head, ``[q₀ k₀ v₀ | q₁ k₁ v₁ | …]``, as Megatron-LM
stores its fused projection, so device ``k``'s contiguous block of ``3g`` columns holds the
``q``, ``k`` and ``v`` of its heads ``[k·h, (k+1)·h)`` and a column split is a split by heads:
nothing moves between devices to put a head together.
"""

from __future__ import annotations

from typing import Any

from ..gpt import GPT
from ._mesh import P

__all__ = ["param_specs"]


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
