"""Train a character-level GPT on the bundled works of Shakespeare with hand-written gradients.

Index letters::

    n  sequences in a minibatch     t  positions (the context)     v  vocabulary (65 chars)
    s  steps between two progress lines

``jaxbp train --model gpt`` fits :class:`jaxbp.GPT` to :func:`jaxbp.load_shakespeare`'s
training text (the first 90%) with AdamW, a warm-up then cosine learning-rate schedule and
gradient clipping at global norm 1. The gradient is :func:`jaxbp.value_and_grad` — the
explicit reverse loop over the ``_bwd`` rules — and each stretch of ``s`` steps between two
progress lines is one jitted ``jax.lax.scan`` over ``s`` minibatches ``(s, n, t)``. The
validation loss (nats per character, on fixed windows of the last 10% of the text) is
printed with each progress line; a sample of generated text ends the run. ``--check``
compares the hand-written gradients with ``jax.grad`` of the plain-jnp twin at step 0.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import parallel, reference
from .datasets import load_shakespeare
from .gpt import GPT
from .model import value_and_grad

__all__ = ["GPT_DEFAULTS", "GPTTrainResult", "train_gpt", "check_gradients", "mesh_devices"]

GPT_DEFAULTS: dict[str, Any] = {
    "vocab": 65,  # the characters of the text; more: ids that never occur (a padded vocabulary)
    "d": 128,
    "heads": 4,
    "layers": 4,
    "context": 64,
    "batch_size": 32,
    "steps": 1000,
    "lr": 3e-3,
    "warmup": 50,
    "weight_decay": 0.1,
    "log_every": 50,
    "eval_batches": 8,
    "seed": 0,
    "sample_chars": 300,
    "temperature": 0.8,
}
# float32, relative to the reference gradient's max-abs per leaf (the library's float32 bound).
GRAD_CHECK_TOLERANCE = 1e-5
# float32, a loss curve on a mesh against one device's, relative to the curve's max-abs (the
# bound of ``jaxbp train --check`` for the MLP's curves).
CURVE_CHECK_TOLERANCE = 1e-4
MESH_AXES = ("data", "model")


@dataclasses.dataclass(frozen=True)
class GPTTrainResult:
    """What :func:`train_gpt` returns.

    ``step_losses (steps,)`` is every minibatch's training loss; ``validation`` the
    ``(step, loss)`` pairs measured at each progress line (nats per character); ``sample``
    the generated text; ``check`` (with ``check=True``) the per-leaf comparison of the
    step-0 gradients with ``jax.grad`` of the plain twin.
    """

    config: dict[str, Any]
    step_losses: tuple[float, ...]
    validation: tuple[tuple[int, float], ...]
    seconds: float
    tokens_per_second: float
    sample: str
    params: Any = dataclasses.field(repr=False, default=None)
    check: dict[str, Any] | None = None

    @property
    def validation_loss(self) -> float:
        """Validation loss after the last step."""
        return self.validation[-1][1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (parameters left out)."""
        return {
            "config": dict(self.config),
            "step_losses": list(self.step_losses),
            "validation": [list(v) for v in self.validation],
            "validation_loss": self.validation_loss,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "sample": self.sample,
            "check": self.check,
        }


def check_config(cfg: dict[str, Any], mesh: dict[str, int] | None = None) -> GPT:
    """Clear ``ValueError``s for a bad configuration, before anything is compiled; the GPT,
    its vocabulary padded to a multiple of the ``model`` axis of ``mesh``."""
    for name in ("batch_size", "steps", "log_every", "eval_batches", "warmup"):
        value = cfg[name]
        low = 0 if name == "warmup" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an int ≥ {low}, got {value!r}")
    for name in ("lr", "temperature"):
        if not (isinstance(cfg[name], int | float) and math.isfinite(cfg[name]) and cfg[name] > 0):
            raise ValueError(f"{name}: expected a positive number, got {cfg[name]!r}")
    if not (isinstance(cfg["weight_decay"], int | float) and cfg["weight_decay"] >= 0):
        raise ValueError(f"weight_decay: expected a number ≥ 0, got {cfg['weight_decay']!r}")
    if not isinstance(cfg["sample_chars"], int) or cfg["sample_chars"] < 0:
        raise ValueError(f"sample_chars: expected an int ≥ 0, got {cfg['sample_chars']!r}")
    chars = GPT_DEFAULTS["vocab"]
    if isinstance(cfg["vocab"], bool) or not isinstance(cfg["vocab"], int) or cfg["vocab"] < chars:
        raise ValueError(f"vocab: expected an int ≥ {chars} (the characters), got {cfg['vocab']!r}")
    data, model_parts = _mesh_sizes(mesh)
    if cfg["batch_size"] % data:
        raise ValueError(
            f"batch_size: expected a multiple of the {data} devices of the mesh's data axis, "
            f"got {cfg['batch_size']}"
        )
    if cfg["heads"] % model_parts:
        raise ValueError(
            f"heads: expected a multiple of the {model_parts} devices of the mesh's model "
            f"axis, got {cfg['heads']}"
        )
    vocab = -(-cfg["vocab"] // model_parts) * model_parts  # padded: ids that never occur
    return GPT(
        vocab=vocab, d=cfg["d"], heads=cfg["heads"], layers=cfg["layers"], context=cfg["context"]
    )


def _mesh_sizes(mesh: dict[str, int] | None) -> tuple[int, int]:
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
    count = int(np.prod(_mesh_sizes(mesh)))
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
            f"mesh: {_mesh_text(mesh)} needs {count} devices, this process has "
            f"{len(devices)} {devices[0].platform} device(s) (simulated CPU devices must be "
            f"asked for before JAX starts: XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{count})"
        )
    return devices[:count]


def _mesh_text(mesh: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


def _on_mesh(model: GPT, params, mesh: dict[str, int], devices: list):
    """For :func:`jaxbp.parallel.value_and_grad` on a ``(data, model)`` mesh: the compiled
    step, the parameters placed on the mesh, a function that replicates them (for the
    validation loss and the sample), and ``put(host array, spec)``, which places the same
    host values of every process on the mesh (one process or several)."""
    data, parts = _mesh_sizes(mesh)
    m = jax.make_mesh((data, parts), MESH_AXES, devices=devices)
    model_axis = "model" if parts > 1 else None
    step = parallel.value_and_grad(model, m, axis="data", model_axis=model_axis).jitted
    params = parallel.shard(params, m, parallel.gpt_param_specs(model, model_axis))
    everywhere = jax.sharding.NamedSharding(m, parallel.P())
    replicate = jax.jit(lambda p: p, out_shardings=everywhere)
    return step, params, replicate, lambda a, spec: parallel.shard(a, m, spec)


def _characters_only(model: GPT, params, chars: int):
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


def _optimizer(cfg) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg["lr"], max(cfg["warmup"], 1), max(cfg["steps"], cfg["warmup"] + 1),
        end_value=cfg["lr"] / 10,
    )  # fmt: skip
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=cfg["weight_decay"]),
    )


def _stretch_fn(core: Callable, opt: optax.GradientTransformation) -> Callable:
    """``s`` training steps in one jitted scan over minibatches ``x, y (s, n, t)``."""

    @jax.jit
    def stretch(params, opt_state, xs, ys):
        def step(carry, batch):
            params, opt_state = carry
            loss, grads = core(params, batch[0], batch[1], None)
            # optax mixes Python floats with int32 step counts: let it promote as it expects
            # even when the caller runs with jax_numpy_dtype_promotion="strict".
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = opt.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
            return (params, opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (xs, ys))
        return params, opt_state, losses

    return stretch


def check_gradients(model: GPT, params, x, y) -> dict[str, Any]:
    """Hand-written vs ``jax.grad`` of the plain twin on one batch: per-leaf relative error
    (max-abs difference over the reference leaf's max-abs), and the loss difference."""
    loss, grads = value_and_grad(model)(params, x, y)
    ref_loss, ref_grads = reference.value_and_grad(model)(params, x, y)
    rows = []
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads), strict=True
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = float(np.max(np.abs(a - b)))
        rows.append((jax.tree_util.keystr(path), err / max(float(np.max(np.abs(b))), 1e-30)))
    worst = max(rows, key=lambda r: r[1])
    loss_rel = abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)
    return {
        "loss": float(loss),
        "reference_loss": float(ref_loss),
        "loss_rel_difference": loss_rel,
        "max_rel_error": worst[1],
        "worst_leaf": worst[0],
        "leaves": len(rows),
        "tolerance": GRAD_CHECK_TOLERANCE,
        "passed": bool(worst[1] <= GRAD_CHECK_TOLERANCE and loss_rel <= GRAD_CHECK_TOLERANCE),
    }


def train_gpt(
    *,
    check: bool = False,
    log: Callable[[str], None] | None = None,
    mesh: dict[str, int] | None = None,
    **options: Any,
) -> GPTTrainResult:
    """Train a character-level GPT on Shakespeare with the hand-written gradients.

    Args:
      check: compare the step-0 gradients with ``jax.grad`` of the plain twin first; with
        ``mesh``, train again on one device instead and compare the loss curves.
      log: called with each progress line (``print`` on the command line).
      mesh: ``{"data": D, "model": P}``: train on ``D·P`` devices (module docstring); the
        batch size must be a multiple of ``D``, the heads of ``P``.
      **options: any of :data:`GPT_DEFAULTS` — ``d``, ``heads``, ``layers``, ``context``
        (the model), ``batch_size`` ``n``, ``steps``, ``lr`` (peak), ``warmup`` (steps),
        ``weight_decay``, ``log_every`` (steps per progress line and validation),
        ``eval_batches`` (validation windows: ``eval_batches × n`` of them), ``seed``,
        ``sample_chars`` and ``temperature`` (the closing sample), ``vocab`` (65, or more
        for a vocabulary padded with ids that never occur).

    Returns:
      A :class:`GPTTrainResult`; ``result.validation_loss`` is in nats per character.
    """
    unknown = sorted(set(options) - set(GPT_DEFAULTS))
    if unknown:
        raise TypeError(f"unexpected option(s) {unknown}; options are {list(GPT_DEFAULTS)}")
    cfg = {**GPT_DEFAULTS, **options}
    model = check_config(cfg, mesh)
    devices = None if mesh is None else mesh_devices(mesh)  # before JAX starts its backends
    text = load_shakespeare()
    n, t = cfg["batch_size"], cfg["context"]
    rng = np.random.default_rng(cfg["seed"])
    k_init, k_sample = jax.random.split(jax.random.PRNGKey(cfg["seed"]))
    params = model.init(k_init)
    step, everywhere = value_and_grad(model).jitted, lambda p: p
    put = lambda a, spec: jnp.asarray(a)  # noqa: E731 - one device: where JAX puts it
    if mesh is not None:  # the parameters split over the mesh, the step on every device
        step, params, everywhere, put = _on_mesh(model, params, mesh, devices)
    opt = _optimizer(cfg)
    opt_state = opt.init(params)
    stretch = _stretch_fn(step, opt)
    val_rng = np.random.default_rng(12345)  # the same validation windows in every run
    vx, vy = text.batch(val_rng, cfg["eval_batches"] * n, t, split="validation")
    vx, vy = put(vx, parallel.P()), put(vy, parallel.P())
    eval_loss = jax.jit(lambda p, x, y: model.mean_loss(p, x, y))

    check_info = None
    if check and mesh is None:
        x0, y0 = text.batch(np.random.default_rng(cfg["seed"] + 1), n, t)
        check_info = check_gradients(model, params, x0, y0)
        if log is not None:
            verdict = "agree" if check_info["passed"] else "DISAGREE"
            log(
                f"check at step 0: hand-written and jax.grad gradients {verdict}: largest "
                f"relative error {check_info['max_rel_error']:.2e} ({check_info['worst_leaf']}) "
                f"over {check_info['leaves']} leaves, loss {check_info['loss']:.6f} vs "
                f"{check_info['reference_loss']:.6f} (tolerance {GRAD_CHECK_TOLERANCE:.0e})"
            )

    step_losses: list[float] = []
    validation: list[tuple[int, float]] = []
    start = time.perf_counter()
    done = 0
    while done < cfg["steps"]:
        s = min(cfg["log_every"], cfg["steps"] - done)
        xs, ys = text.batch(rng, s * n, t)
        xs, ys = xs.reshape(s, n, t), ys.reshape(s, n, t)
        t0 = time.perf_counter()
        rows = parallel.P(None, "data")  # (s, n, t): each step's sequences split over data
        params, opt_state, losses = stretch(params, opt_state, put(xs, rows), put(ys, rows))
        losses = np.asarray(losses, np.float64)
        done += s
        step_losses += losses.tolist()
        val = float(eval_loss(everywhere(params), vx, vy))
        validation.append((done, val))
        if log is not None:
            rate = s * n * t / (time.perf_counter() - t0)
            log(
                f"step {done:5d}/{cfg['steps']}  train loss {losses.mean():.4f}  "
                f"validation loss {val:.4f}  ({rate:,.0f} chars/s)"
            )
    seconds = time.perf_counter() - start
    if check and mesh is not None:  # the same steps on one device: the same curve?
        one = train_gpt(**{**options, "vocab": model.vocab, "sample_chars": 0})
        check_info = compare_curves(step_losses, one.step_losses)
        if log is not None:
            verdict = "agree" if check_info["passed"] else "DISAGREE"
            log(
                f"check: the loss curves on the mesh {_mesh_text(mesh)} and on one device "
                f"{verdict} over {check_info['steps']} steps: max difference "
                f"{check_info['max_abs_difference']:.2e}, {check_info['max_rel_difference']:.2e}"
                f" relative to the curve's max (tolerance {CURVE_CHECK_TOLERANCE:.0e})"
            )
    sample = ""
    if cfg["sample_chars"]:
        chars, sampler = _characters_only(model, everywhere(params), text.vocab_size)
        ids = chars.generate(
            sampler, k_sample, text.encode("\n"), cfg["sample_chars"],
            temperature=cfg["temperature"],
        )  # fmt: skip
        sample = text.decode(ids[1:])
    return GPTTrainResult(
        config={**cfg, "vocab": model.vocab, "num_params": model.num_params, "mesh": mesh},
        step_losses=tuple(step_losses),
        validation=tuple(validation),
        seconds=seconds,
        tokens_per_second=cfg["steps"] * n * t / seconds,
        sample=sample,
        params=params,
        check=check_info,
    )
