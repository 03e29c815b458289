"""Training the GPT on a mesh: the devices, the parameters placed, the curve compared.

Index letters: ``D`` devices on the ``data`` axis, ``P`` on the ``model`` axis.

:func:`jaxbp.train_gpt.train_gpt` with ``mesh={"data": D, "model": P}`` runs
:func:`jaxbp.parallel.value_and_grad` of the GPT on ``D·P`` devices (simulated ones on a CPU):
the batch split over ``data``, the blocks, the token table and the head over ``model``, the
vocabulary padded to a multiple of ``P`` with ids that never occur. What that needs is here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from . import parallel
from .gpt import GPT

__all__ = [
    "CURVE_CHECK_TOLERANCE", "MESH_AXES", "characters_only", "compare_curves", "mesh_devices",
    "mesh_sizes", "mesh_text", "on_mesh",
]  # fmt: skip

# float32, a loss curve on a mesh against one device's, relative to the curve's max-abs (the
# bound of ``jaxbp train --check`` for the MLP's curves).
CURVE_CHECK_TOLERANCE = 1e-4
MESH_AXES = ("data", "model")


def mesh_sizes(mesh: dict[str, int] | None) -> tuple[int, int]:
    """``(D, P)`` of ``mesh={"data": D, "model": P}`` (each 1 when absent)."""
    if mesh is None:
        return 1, 1
    if not isinstance(mesh, dict) or not set(mesh) <= set(MESH_AXES):
        raise ValueError(f"mesh: expected a dict of sizes of {MESH_AXES}, got {mesh!r}")
    for name, size in mesh.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh: expected a positive int for {name!r}, got {size!r}")
    return mesh.get("data", 1), mesh.get("model", 1)


def mesh_devices(mesh: dict[str, int]) -> list:
    """The first ``D·P`` devices for ``mesh={"data": D, "model": P}``; ``ValueError`` when
    there are fewer.

    On a CPU the devices are simulated: unless the process already chose a CPU device count
    (``XLA_FLAGS=--xla_force_host_platform_device_count``, ``jax_num_cpu_devices``), it asks
    for ``D·P`` CPU devices, which works only before JAX has started its backends. On a GPU
    machine the default devices are the GPUs and nothing is simulated.
    """
    count = int(np.prod(mesh_sizes(mesh)))
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        if jax.config.values.get("jax_num_cpu_devices", None) == -1:
            try:
                jax.config.update("jax_num_cpu_devices", count)
            except RuntimeError:  # the backends started already: count the devices they have
                pass
    devices = jax.devices()
    if len(devices) < count:
        raise ValueError(
            f"mesh: {mesh_text(mesh)} needs {count} devices, this process has "
            f"{len(devices)} {devices[0].platform} device(s) (simulated CPU devices must be "
            f"asked for before JAX starts: XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{count})"
        )
    return devices[:count]


def mesh_text(mesh: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


def on_mesh(model: GPT, params, mesh: dict[str, int], devices: list):
    """For :func:`jaxbp.parallel.value_and_grad` on a ``(data, model)`` mesh: the compiled
    step, the parameters placed on the mesh, a function that replicates them (for the
    validation loss and the sample), and ``put(host array, spec)``, which places the same
    host values of every process on the mesh (one process or several)."""
    data, parts = mesh_sizes(mesh)
    m = jax.make_mesh((data, parts), MESH_AXES, devices=devices)
    model_axis = "model" if parts > 1 else None
    step = parallel.value_and_grad(model, m, axis="data", model_axis=model_axis).jitted
    params = parallel.shard(params, m, parallel.gpt_param_specs(model, model_axis))
    everywhere = jax.sharding.NamedSharding(m, parallel.P())
    replicate = jax.jit(lambda p: p, out_shardings=everywhere)
    return step, params, replicate, lambda a, spec: parallel.shard(a, m, spec)


def characters_only(model: GPT, params, chars: int):
    """The model and parameters with the padding ids (``≥ chars``) cut from the token table
    and the head: the same logits for the characters, and a sample never draws padding."""
    if model.vocab == chars:
        return model, params
    cut = dict(params, tok=params["tok"][:chars])
    if not model.tied:
        cut["head"] = {"w": params["head"]["w"][:, :chars]}
    return dataclasses.replace(model, vocab=chars), cut


def compare_curves(curve, reference) -> dict[str, Any]:
    """A loss curve against another: the largest difference, relative to the reference
    curve's max-abs, passed at :data:`CURVE_CHECK_TOLERANCE`."""
    a, b = np.asarray(curve, np.float64), np.asarray(reference, np.float64)
    diff = float(np.max(np.abs(a - b)))
    rel = diff / max(float(np.max(np.abs(b))), 1e-30)
    return {
        "max_abs_difference": diff,
        "max_rel_difference": rel,
        "steps": len(b),
        "tolerance": CURVE_CHECK_TOLERANCE,
        "passed": bool(rel <= CURVE_CHECK_TOLERANCE),
    }
