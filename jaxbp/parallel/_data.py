"""Data-parallel (and data × vocabulary-parallel) explicit loops of an MLP on a mesh.

Index letters::

    n  batch (global)          n/D  rows on one data shard      (D devices on the data axis)
    c  classes (global)        c/P  classes on one vocab shard  (P devices on the model axis)
    i  input features of a layer,  o  output features

**Data parallel** (:func:`value_and_grad`). The batch is split over the mesh axis ``axis``;
parameters are replicated. Each shard runs the explicit reverse loop of
:func:`jaxbp.nn.forward_backward` on its rows, which yields the *shard's* mean over its valid
rows, ``L_k = S_k / max(N_k, 1)``. The global mean over valid rows is
``L = Σ_k S_k / N = Σ_k (max(N_k, 1) / N)·L_k`` with ``N = psum(N_k)``, and likewise for
every gradient; so each shard re-weights by ``max(N_k, 1)/max(N, 1)`` and one ``psum``
finishes the job. A shard whose rows are all masked contributes exactly 0.

**Both** (``model_axis``): on a 2-d mesh ``(data, model)`` the last layer's ``w (i, c)``,
``b (c,)`` are split over ``model`` (Megatron's tensor-parallel output layer). The same loop
runs with two of its ops replaced (:class:`jaxbp.nn.LoopOps`): the loss is the
vocab-parallel cross-entropy on the shard's logits
(:class:`jaxbp.parallel._vocab.ShardedLoss`), and the last layer's input gradient
``dh = psum_model(δ_k · w_kᵀ)  "nc,ic->ni"`` is summed over the class shards
(:class:`ShardedHead`) before it joins the replicated layers below.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from .. import _checks, _step
from ..dense import dense
from ..gpt import GPT
from ..losses import _validate_ce
from ..nn import MLP, LoopOps, forward_backward, loop_ops
from ._gpt import value_and_grad as gpt_value_and_grad
from ._mesh import PAD_CLASSES, PAD_ROWS, P, axis_size, call, divisible, host_readable
from ._model import value_and_grad as model_value_and_grad
from ._vocab import ShardedLoss

__all__ = ["ShardedHead", "value_and_grad"]


class ShardedHead:
    """The last dense layer on a class shard: :func:`jaxbp.dense`'s rules (read from the op
    when traced), with the input gradient summed over the class shards of ``axis``."""

    name = "dense (class shard)"
    arg_names, per_example_args, example_grads = ("x", "w", "b"), ("x",), None

    def __init__(self, axis: str):
        self.axis = axis

    def __eq__(self, other):
        return isinstance(other, ShardedHead) and self.axis == other.axis

    def __hash__(self):
        return hash((ShardedHead, self.axis))

    def fwd(self, x, w, b=None):
        return dense.fwd(x, w, b)

    def bwd(self, res, g):
        dx, dw, db = dense.bwd(res, g)
        return lax.psum(dx, self.axis), dw, db  # "nc,ic->ni" summed over the class shards


def _ops(model: MLP, model_axis: str | None) -> LoopOps:
    ops = loop_ops(model)
    if model_axis is None:
        return ops
    loss = ShardedLoss(model_axis, model.sizes[-1])
    return LoopOps(ops.dense, ops.activation, loss, ShardedHead(model_axis))


def _acc(x):
    return x.astype(_checks.accum_dtype(x.dtype))


def _local(model, axis, ops, params, x, labels, where, class_weights):
    """Per shard: the explicit loop on ``n/D`` rows, re-weighted to the global mean."""
    loss, grads, per_ex, *_ = forward_backward(
        model, params, x, labels, where, class_weights, ops=ops
    )
    acc = per_ex.dtype
    n_local = jnp.sum(model.valid(labels, where, n=x.shape[0])).astype(acc)
    n_total = lax.psum(n_local, axis)
    # forward_backward divided by max(N_k, 1); the global mean divides by max(N, 1).
    weight = jnp.maximum(n_local, 1.0) / jnp.maximum(n_total, 1.0)
    loss = lax.psum(loss.astype(acc) * weight, axis)
    grads = jax.tree.map(
        lambda t: lax.psum(_acc(t) * weight.astype(_acc(t).dtype), axis).astype(t.dtype), grads
    )
    return loss, grads


def _core(model, mesh, axis, model_axis, rules, params, x, labels, where, class_weights):
    del rules  # the cache key only: the loop reads the rules from the ops when traced
    model.check_inputs(params, x, labels, where, class_weights)  # traced: shapes only
    divisible("x", x.shape[0], axis_size(mesh, axis, "axis"), axis, "the batch size n", PAD_ROWS)
    label_spec = P(axis) if labels.ndim == 1 else P(axis, model_axis)
    specs: list[Any] = [P() for _ in range(model.num_layers)]
    if model_axis is not None:
        specs[-1] = {"w": P(None, model_axis), "b": P(model_axis)}
    local = functools.partial(_local, model, axis, _ops(model, model_axis))
    return call(
        local, mesh, (params, x, labels, where, class_weights),
        (specs, P(axis), label_spec, P(axis), P(model_axis)), (P(), specs),
    )  # fmt: skip


def value_and_grad(
    model: MLP, mesh: Mesh, *, axis: str = "data", model_axis: str | None = None
) -> Callable:
    """``f(params, x, labels, *, where=None, class_weights=None) -> (mean loss, grads)`` with
    the batch split over the mesh axis ``axis``: :func:`jaxbp.value_and_grad` on a mesh.

    Each device runs the hand-written reverse loop of :func:`jaxbp.nn.forward_backward` on
    its ``n/D`` rows; the loss and gradients are re-weighted by the shard's share of the
    valid rows and reduced with one ``psum`` (see the module docstring), so the mean over
    valid rows is exact however unevenly ``where``/``ignore_index`` masks the shards.
    Parameters are replicated (``P()``); ``grads`` has the structure of ``params`` and is
    replicated, so an optax update runs as it is, inside or outside ``jax.jit``.
    ``f.jitted(params, x, labels, where, class_weights)`` is the compiled step
    (:mod:`jaxbp._step`: one per model, mesh, axes and rules, cached).

    For a :class:`jaxbp.GPT` the function is ``f(params, ids (n, t), targets (n, t), *,
    where=None)`` and ``model_axis`` splits every block, the token table and the head over
    that axis (Megatron-LM's tensor and vocabulary parallelism, the collectives written
    into the GPT's explicit loop), the parameters laid out as
    :func:`jaxbp.parallel.gpt_param_specs` says: see ``jaxbp.parallel._gpt`` and
    ``docs/parallel.md``. With ``model_axis=None`` a GPT runs data parallel as any model.

    Any other model of :mod:`jaxbp.model`'s interface (yours, or a GPT without
    ``model_axis``) runs data parallel: ``f(params, *batch)`` as its ``check_inputs`` takes
    it, each device running the model's own loops on its rows, the mean over valid units
    exact however unevenly they split (``jaxbp.parallel._model``).

    Args:
      model: a :class:`jaxbp.MLP` (any loss), a :class:`jaxbp.GPT`, or any model of
        :mod:`jaxbp.model`'s interface.
      mesh: a :class:`jax.sharding.Mesh`, e.g. from ``jax.make_mesh`` (Explicit or Auto
        axes; one process, or every process's devices after ``jax.distributed.initialize``).
        Mesh axes other than ``axis`` and ``model_axis`` hold replicas. Inputs may come
        unplaced or laid out any way: on Explicit axes they are resharded as needed.
      axis: the mesh axis the batch is split over. The batch size ``n`` must be divisible by
        its size (``ValueError`` otherwise; pad with ``where=False`` rows: they change
        nothing).
      model_axis: optionally, a second mesh axis over which the *last* layer's ``w (i, c)``
        and ``b (c,)`` are split along the classes, with the vocab-parallel cross-entropy on
        top (``loss="softmax_cross_entropy"`` only; ``c`` divisible by its size). The last
        layer's gradients come back laid out ``P(None, model_axis)`` / ``P(model_axis)``.

    Shapes: ``x (n, i)`` laid out ``P(axis)``, ``labels (n,)`` ids or ``(n, c)``, ``where
    (n,)`` bool, ``class_weights (c,)``. Inputs are checked before tracing (label values only
    when this process can read them); across processes pass global arrays
    (:func:`jaxbp.parallel.shard`).
    """
    if isinstance(model, GPT) and model_axis is not None:
        return gpt_value_and_grad(model, mesh, axis=axis, model_axis=model_axis)
    if not isinstance(model, MLP):  # yours, or a GPT data parallel: its own loops per device
        return model_value_and_grad(model, mesh, axis=axis, model_axis=model_axis)
    axis_size(mesh, axis, "axis")
    if model_axis is not None:
        if model.loss != "softmax_cross_entropy":
            raise ValueError(
                f"model_axis: the vocab-parallel last layer needs loss='softmax_cross_entropy',"
                f" got {model.loss!r}"
            )
        if model_axis == axis:
            raise ValueError(f"model_axis: expected a mesh axis other than axis={axis!r}")
        vocab = axis_size(mesh, model_axis, "model_axis")
        divisible(
            "model", model.sizes[-1], vocab, model_axis, "the number of classes c", PAD_CLASSES
        )
    rules = _ops(model, model_axis).rules()
    step = _step.compiled_on_mesh(_core, model, mesh, axis, model_axis, rules)

    def check(params, x, labels, *, where=None, class_weights=None):
        if host_readable(params, x, labels, where, class_weights):
            return model.check_inputs(params, x, labels, where, class_weights)
        # global arrays spanning other processes: shape checks at trace time only
        _validate_masks(model, labels, where, class_weights, jnp.shape(x))
        return params, x, labels, where, class_weights

    return _step.entry(step, check, "value_and_grad", value_and_grad.__doc__)


def _validate_masks(model, labels, where, class_weights, x_shape):
    """The shape/dtype checks of :meth:`MLP.check_inputs` that need no values."""
    if model.loss == "softmax_cross_entropy":
        opts = dict(model.loss_options)
        fake = jax.ShapeDtypeStruct((x_shape[0], model.sizes[-1]), jnp.float32)
        _validate_ce(
            fake, labels, where, class_weights, opts.get("label_smoothing", 0.0),
            opts.get("ignore_index"), opts.get("z_loss", 0.0),
        )  # fmt: skip
