"""Any model on a mesh: data parallelism and DP-SGD for every model of :mod:`jaxbp.model`'s
interface (yours, the MLP, the GPT), each device running the model's own two loops on its
rows inside one ``shard_map``.

Index letters, per device::

    n  examples on this device (N = n·D in the batch)      D  devices on the data axis

**value_and_grad**, on each device (:func:`jaxbp.model.value_and_grad_step`)::

    losses, valid, state = model.forward(t, params, *rows)    (n, …)     this device's rows
    N    = psum(Σ valid)                                        one scalar
    seed = valid / max(N, 1)                                    ∂(mean over the batch)/∂loss
    model.backward(t, state, seed)
    grads = psum(Σ the tape's cotangents)                       every parameter, once
    loss  = psum(Σ valid·losses) / max(N, 1)                    one scalar

The seed is the global mean's, so the result is exact however unevenly the masks split the
batch (a device with nothing valid adds 0; nothing valid anywhere gives 0 and zero
gradients, as on one device).

**clipped_grad**, on each device (:func:`jaxbp.per_example.clip_step`)::

    ‖g_k‖, c_k = min(1, C/‖g_k‖)        (n,)   an example's gradient is on its own device
    m     = psum(#examples with something valid)   (or batch_size=)
    grads = psum(Σ_k c_k·g_k)                      the clipped sum: one psum per leaf
    grads = (grads + N(0, σ²C²·I)) / m             the same key on every device: the draws
                                                   of one device's jaxbp.clipped_grad

The batch's arguments are split over ``axis`` along their leading (examples) axis, except
those the model declares the same for every example (``batch_axes``, :mod:`jaxbp.model`),
which every device gets whole; parameters are replicated and the gradients come back
replicated, the per-example norms split like the batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from .. import _step
from .._op import all_rules
from .._vma import Reduce
from ..model import batch_axes, check_model, checker, value_and_grad_step
from ..per_example import _check_key, check_clip_options, clip_step
from ._mesh import P, axis_size, call, host_readable, no_dropout, not_divisible, round_up

__all__ = ["clipped_grad", "value_and_grad"]


# ------------------------------------------------------------------------ the batch


def _names(model, count: int) -> list[str]:
    """The batch arguments' names, from ``model.forward(t, params, *batch)``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[2:]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [names[k] if k < len(names) else f"batch[{k}]" for k in range(count)]


def check_rows(model, mesh: Mesh, axis: str, batch) -> None:
    """Every per-example argument has the same number of examples ``n`` on its leading axis,
    divisible by the devices of ``axis``: ``ValueError`` naming the argument and the sizes
    otherwise (shapes only: runs before compiling, and again when traced)."""
    parts = axis_size(mesh, axis, "axis")
    first = None
    for name, arg, ax in zip(_names(model, len(batch)), batch, batch_axes(model, batch),
                             strict=True):  # fmt: skip
        if arg is None or ax is None:
            continue
        for leaf in jax.tree.leaves(arg):
            shape = tuple(jnp.shape(leaf))
            if first is None and shape:
                first = (name, shape[0])
            if not shape or shape[0] != first[1]:
                raise ValueError(
                    f"{name}: expected the examples on its leading axis (n = "
                    f"{first[1] if first else '?'}, as {first[0] if first else 'the batch'}), "
                    f"got shape {shape}; an argument that is the same for every example needs "
                    f"None at its place in {type(model).__name__}.batch_axes"
                )
    if first is not None and first[1] % parts:
        raise not_divisible(
            first[0], "the batch size n", first[1], parts, axis,
            f"pad the batch to n = {round_up(first[1], parts)} with examples that have nothing "
            "valid (they change nothing)",
        )  # fmt: skip


def _specs(model, axis: str, batch) -> tuple:
    return tuple(P() if ax is None else P(axis) for ax in batch_axes(model, batch))


def _checked(model, params, args, kwargs) -> tuple:
    """``(params, *batch)``: the model's ``check_inputs`` where this process can read the
    values; for global arrays spanning other processes, its shape checks alone (traced) and
    the arguments in the order of its signature."""
    check = checker(model)
    if host_readable(params, args, kwargs) or getattr(model, "check_inputs", None) is None:
        return tuple(check(params, *args, **kwargs))
    jax.eval_shape(lambda p, a, k: check(p, *a, **k), params, args, kwargs)
    bound = inspect.signature(check).bind(params, *args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _start(model, mesh, axis, model_axis, what):
    check_model(model, f"parallel.{what}")
    no_dropout(model)
    axis_size(mesh, axis, "axis")
    if model_axis is not None:
        raise ValueError(
            f"model_axis: tensor parallelism is written for jaxbp.MLP and jaxbp.GPT; a "
            f"{type(model).__name__} runs data parallel (model_axis=None), got {model_axis!r}"
        )


# ------------------------------------------------------------------------ value_and_grad


def _value_and_grad_core(model, mesh, axis, rules, params, *batch):
    del rules  # the cache key only: the loops read the rules from the ops when traced
    check_rows(model, mesh, axis, batch)

    def local(params, *rows):
        return value_and_grad_step(model, params, rows, Reduce(axis))

    specs = (P(), *_specs(model, axis, batch))
    return call(local, mesh, (params, *batch), specs, (P(), P()))


def value_and_grad(
    model: Any, mesh: Mesh, *, axis: str = "data", model_axis: str | None = None
) -> Callable:
    """:func:`jaxbp.value_and_grad` of any model on a mesh, the batch split over ``axis``:
    ``f(params, *batch) -> (mean loss, grads)`` (module docstring); ``f.jitted(params,
    *batch)`` is the compiled step."""
    _start(model, mesh, axis, model_axis, "value_and_grad")
    step = _step.compiled_on_mesh(_value_and_grad_core, model, mesh, axis, all_rules())

    def check(params, *args, **kwargs):
        params, *batch = _checked(model, params, args, kwargs)
        check_rows(model, mesh, axis, batch)
        return (params, *batch)

    return _step.entry(step, check, "value_and_grad", value_and_grad.__doc__)


# ------------------------------------------------------------------------ DP-SGD


def _clipped_grad_core(model, mesh, axis, rules, config, params, *args):
    del rules
    *batch, key = args
    check_rows(model, mesh, axis, batch)

    def local(params, *rest):
        return clip_step(model, config, params, rest[:-1], rest[-1], Reduce(axis))

    norms = P(axis)  # per example: split like the batch
    out = (P(), P(), norms) if config[-1] else (P(), norms)
    specs = (P(), *_specs(model, axis, batch), P())
    return call(local, mesh, (params, *batch, key), specs, out)


def clipped_grad(
    model: Any,
    mesh: Mesh,
    *,
    axis: str = "data",
    l2_clip: float,
    noise_multiplier: float = 0.0,
    batch_size: int | None = None,
    method: str = "bookkeeping",
    return_loss: bool = False,
) -> Callable:
    """DP-SGD on a mesh: :func:`jaxbp.clipped_grad` of any model with the batch split over
    ``axis``, ``f(params, *batch, key=None) -> (grads, per_example_norms)`` (``(loss,
    grads, per_example_norms)`` with ``return_loss``).

    Each example's norm and clip factor are computed on the device that holds it; the
    clipped sums and the number of valid examples are summed over ``axis`` once; the noise
    is drawn after that sum from the same ``key`` on every device, one subkey per parameter
    leaf in leaf order, exactly as :func:`jaxbp.clipped_grad` draws it: the result is one
    device's (module docstring). The options mean what they mean there. ``grads`` comes back
    replicated, the norms ``(N,)`` split over ``axis`` like the batch; ``f.jitted(params,
    *batch, key)`` is the compiled step (``key`` ``None`` without noise).

    Errors, before anything is compiled: a model without the interface, a mesh without
    ``axis``, a batch whose size is not divisible by it (naming the sizes), bad options.
    """
    _start(model, mesh, axis, None, "clipped_grad")
    l2_clip, noise_multiplier = check_clip_options(l2_clip, noise_multiplier, batch_size, method)
    config = (method, batch_size, l2_clip, noise_multiplier, bool(return_loss))
    step = _step.compiled_on_mesh(_clipped_grad_core, model, mesh, axis, all_rules(), config)

    def check(params, *args, key=None, **kwargs):
        _check_key(key, noise_multiplier)
        params, *batch = _checked(model, params, args, kwargs)
        check_rows(model, mesh, axis, batch)
        return (params, *batch, key if noise_multiplier > 0.0 else None)

    return _step.entry(step, check, "clipped_grad", clipped_grad.__doc__)
