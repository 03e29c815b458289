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

A step whose loss, gradient or update is not finite is not applied
(:func:`jaxbp.train.guarded_update`); ``max_nonfinite`` of them in a row stop the run. With
``checkpoint_dir`` a checkpoint is saved every ``checkpoint_every`` steps (a multiple of
``log_every``, so the stretches, and with them the draws of training windows, are the same
with checkpoints or without) and ``resume=True`` continues the latest one exactly: the
parameters, the optimizer state, the step and the NumPy generator's state that draws the
training windows.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import parallel, reference
from ._nonfinite import (
    NonFiniteError,
    finite_or_none,
    guarded_update,
    leaf_paths,
    nonfinite_outcome,
)
from ._train_mesh import (
    CURVE_CHECK_TOLERANCE,
    characters_only,
    compare_curves,
    mesh_devices,
    mesh_sizes,
    mesh_text,
    on_mesh,
)
from .checkpoint import Checkpointer, Interrupted, check_same, read_meta
from .datasets import load_shakespeare
from .gpt import GPT
from .model import value_and_grad
from .per_example import check_clip_options
from .privacy import dp_setting, poisson_windows, privacy_text, spent
from .train import check_run_options

__all__ = [
    "GPT_DEFAULTS",
    "GPTTrainResult",
    "train_gpt",
    "check_gradients",
    "mesh_devices",
]

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
    "dropout": 0.0,  # GPT(dropout=...): embeddings and each block's two branches
    "dp_clip": None,  # DP-SGD: clip each sequence's gradient to this L2 norm (jaxbp.privacy)
    "noise": 0.0,  # DP-SGD: the noise multiplier σ
    "delta": None,  # DP-SGD: δ of the (ε, δ) reported; default 10^⌊log₁₀(1/N)⌋
}
# float32, relative to the reference gradient's max-abs per leaf (the library's float32 bound).
GRAD_CHECK_TOLERANCE = 1e-5
# What a resumed run must share with its checkpoint (all that changes the numbers).
RESUME_FIELDS = ("model", "vocab", "d", "heads", "layers", "context", "batch_size", "steps",
                 "lr", "warmup", "weight_decay", "log_every", "eval_batches", "seed",
                 "dropout", "dp_clip", "noise")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GPTTrainResult:
    """What :func:`train_gpt` returns.

    ``step_losses (steps,)`` is every minibatch's training loss; ``validation`` the
    ``(step, loss)`` pairs measured at each progress line (nats per character); ``sample``
    the generated text; ``check`` (with ``check=True``) the per-leaf comparison of the
    step-0 gradients with ``jax.grad`` of the plain twin (at the resumed step when resumed);
    ``skipped`` the (1-based) steps not applied because they were not finite;
    ``resumed_from`` the checkpoint's step.
    """

    config: dict[str, Any]
    step_losses: tuple[float, ...]
    validation: tuple[tuple[int, float], ...]
    seconds: float
    tokens_per_second: float
    sample: str
    params: Any = dataclasses.field(repr=False, default=None)
    check: dict[str, Any] | None = None
    skipped: tuple[int, ...] = ()
    resumed_from: int | None = None

    @property
    def validation_loss(self) -> float:
        """Validation loss after the last step."""
        return self.validation[-1][1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (parameters left out)."""
        return {
            "config": dict(self.config),
            "step_losses": finite_or_none(self.step_losses),
            "validation": [list(v) for v in self.validation],
            "validation_loss": self.validation_loss,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "sample": self.sample,
            "check": self.check,
            "nonfinite_steps": len(self.skipped),
            "skipped_steps": list(self.skipped),
            "resumed_from": self.resumed_from,
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
    if cfg["dp_clip"] is not None or cfg["noise"]:
        check_clip_options(cfg["dp_clip"] if cfg["dp_clip"] is not None else 1.0, cfg["noise"],
                           None, "bookkeeping")  # fmt: skip
        if cfg["dp_clip"] is None:
            raise ValueError("noise: needs dp_clip (DP-SGD clips each sequence's gradient)")
        if mesh is not None:
            raise ValueError("dp_clip: DP-SGD training runs on one device (no mesh)")
    rate = cfg["dropout"]
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: expected a rate in [0, 1), got {rate!r}")
    if rate > 0.0 and mesh is not None:
        raise ValueError("dropout: the mesh step draws no dropout masks; train with dropout on one "
                         "device (no mesh)")  # fmt: skip
    delta = cfg["delta"]
    if delta is not None and not (isinstance(delta, float) and 0.0 < delta < 1.0):
        raise ValueError(f"delta: expected a number in (0, 1), got {delta!r}")
    chars = GPT_DEFAULTS["vocab"]
    if isinstance(cfg["vocab"], bool) or not isinstance(cfg["vocab"], int) or cfg["vocab"] < chars:
        raise ValueError(f"vocab: expected an int ≥ {chars} (the characters), got {cfg['vocab']!r}")
    data, model_parts = mesh_sizes(mesh)
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
    return GPT(vocab=vocab, d=cfg["d"], heads=cfg["heads"], layers=cfg["layers"],
               context=cfg["context"], dropout=float(rate))  # fmt: skip


def _optimizer(cfg) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg["lr"], max(cfg["warmup"], 1), max(cfg["steps"], cfg["warmup"] + 1),
        end_value=cfg["lr"] / 10,
    )  # fmt: skip
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=cfg["weight_decay"]),
    )


def _stretch_fn(core: Callable, opt: optax.GradientTransformation, max_nonfinite: int = 3):
    """``s`` training steps in one jitted scan over minibatches ``x, y (s, n, t)`` (and,
    for DP-SGD, ``where (s, n, t)`` and a key per step): ``stretch(params, opt_state,
    bad_run, *batches) -> (params, opt_state, losses (s,), runs (s,), flags)``
    (:func:`jaxbp.train.guarded_update`'s flags of every step); ``core(params, *batch)``
    gives one step's ``(loss, grads)``."""

    @jax.jit
    def stretch(params, opt_state, bad_run, *batches):
        def step(carry, batch):
            params, opt_state, bad_run = carry
            loss, grads = core(params, *batch)
            params, opt_state, bad_run, flags = guarded_update(
                opt, params, opt_state, bad_run, loss, grads, max_nonfinite
            )
            return (params, opt_state, bad_run), (loss, bad_run, flags)

        carry = (params, opt_state, jnp.asarray(bad_run, jnp.int32))
        (params, opt_state, _), (losses, runs, flags) = jax.lax.scan(step, carry, batches)
        return params, opt_state, losses, runs, flags

    return stretch


def check_gradients(model: GPT, params, x, y) -> dict[str, Any]:
    """Hand-written vs ``jax.grad`` of the plain twin on one batch: per-leaf relative error
    (max-abs difference over the reference leaf's max-abs), and the loss difference."""
    key = jax.random.PRNGKey(0) if model.dropout else None  # the same masks in both
    loss, grads = value_and_grad(model)(params, x, y, dropout_key=key)
    ref_loss, ref_grads = reference.value_and_grad(model)(params, x, y, dropout_key=key)
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
    progress: Callable[[int, int, str], None] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    keep: int = 3,
    resume: bool = False,
    max_nonfinite: int = 3,
    **options: Any,
) -> GPTTrainResult:
    """Train a character-level GPT on Shakespeare with the hand-written gradients.

    Args:
      check: compare the step-0 gradients with ``jax.grad`` of the plain twin first; with
        ``mesh``, train again on one device instead and compare the loss curves.
      log: called with each progress line (``print`` on the command line).
      mesh: ``{"data": D, "model": P}``: train on ``D·P`` devices (module docstring); the
        batch size must be a multiple of ``D``, the heads of ``P``.
      progress: called as ``progress(steps_done, steps, note, begin=True)`` while the run
        sets up and compiles, then as ``progress(steps_done, steps, note)`` after each
        stretch (a progress bar on the command line).
      checkpoint_dir: save checkpoints there (needs ``jaxbp[checkpoint]``).
      checkpoint_every: steps between two checkpoints, a multiple of ``log_every`` (default
        ``log_every``); the last step is always saved.
      keep: how many of the latest checkpoints to keep.
      resume: continue the latest checkpoint in ``checkpoint_dir`` (same configuration).
      max_nonfinite: stop after this many non-finite steps in a row (none is applied).
      **options: any of :data:`GPT_DEFAULTS` — ``d``, ``heads``, ``layers``, ``context``
        (the model), ``batch_size`` ``n``, ``steps``, ``lr`` (peak), ``warmup`` (steps),
        ``weight_decay``, ``log_every`` (steps per progress line and validation),
        ``eval_batches`` (validation windows: ``eval_batches × n`` of them), ``seed``,
        ``sample_chars`` and ``temperature`` (the closing sample), ``vocab`` (65, or more
        for a vocabulary padded with ids that never occur).

    Returns:
      A :class:`GPTTrainResult`; ``result.validation_loss`` is in nats per character.

    Raises:
      jaxbp.train.NonFiniteError: after ``max_nonfinite`` non-finite steps in a row.
      jaxbp.checkpoint.CheckpointError: a folder with no checkpoint (with ``resume``),
        another program's files, or a checkpoint of another configuration.
      jaxbp.checkpoint.Interrupted: SIGINT (or SIGTERM turned into a ``KeyboardInterrupt``)
        during training, after the pending save is on disk.
    """
    unknown = sorted(set(options) - set(GPT_DEFAULTS))
    if unknown:
        raise TypeError(f"unexpected option(s) {unknown}; options are {list(GPT_DEFAULTS)}")
    cfg = {**GPT_DEFAULTS, **options}
    model = check_config(cfg, mesh)
    devices = None if mesh is None else mesh_devices(mesh)  # before JAX starts its backends
    every = check_checkpoint_every(checkpoint_every, cfg["log_every"])
    check_run_options(every, keep, max_nonfinite, resume, checkpoint_dir)
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = Checkpointer(checkpoint_dir, keep=keep, resume=resume)
    try:
        if ckpt is not None and resume:
            check_resume(ckpt.directory, cfg)
        result = _train(model, cfg, check and mesh is None, log, progress, ckpt, every,
                        max_nonfinite, mesh, devices)  # fmt: skip
    finally:
        if ckpt is not None:
            ckpt.close()
    if check and mesh is not None:  # the same steps on one device: the same curve?
        one = train_gpt(**{**options, "vocab": model.vocab, "sample_chars": 0})
        info = compare_curves(result.step_losses, one.step_losses)
        if log is not None:
            verdict = "agree" if info["passed"] else "DISAGREE"
            log(
                f"check: the loss curves on the mesh {mesh_text(mesh)} and on one device "
                f"{verdict} over {info['steps']} steps: max difference "
                f"{info['max_abs_difference']:.2e}, {info['max_rel_difference']:.2e}"
                f" relative to the curve's max (tolerance {CURVE_CHECK_TOLERANCE:.0e})"
            )
        result = dataclasses.replace(result, check=info)
    return result


def check_checkpoint_every(checkpoint_every: int | None, log_every: int) -> int:
    """``checkpoint_every`` (default ``log_every``); ``ValueError`` unless a multiple of it."""
    if checkpoint_every is None:
        return log_every
    if (
        not isinstance(checkpoint_every, int)
        or checkpoint_every % log_every
        or not (checkpoint_every > 0)
    ):
        raise ValueError(
            f"checkpoint_every: expected a positive multiple of log_every = {log_every} (a "
            f"checkpoint ends a stretch of steps), got {checkpoint_every!r}"
        )
    return checkpoint_every


def check_resume(directory: str, cfg: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``CheckpointError`` naming the field and both values when the latest checkpoint in
    ``directory`` is not of this GPT configuration; its ``(step, meta)`` otherwise."""
    done, meta = read_meta(directory)
    saved = {"model": meta.get("model"), **meta.get("config", {})}
    check_same(saved, {"model": "gpt", **cfg}, RESUME_FIELDS, directory)
    return done, meta


def _train(model, cfg, check, log, progress, ckpt, every, limit, mesh, devices) -> GPTTrainResult:
    if progress is not None:
        progress(0, cfg["steps"], "initialising the model", begin=True)
    text = load_shakespeare()
    n, t = cfg["batch_size"], cfg["context"]
    rng = np.random.default_rng(cfg["seed"])
    k_init, k_sample = jax.random.split(jax.random.PRNGKey(cfg["seed"]))
    drop_key = jax.random.fold_in(jax.random.PRNGKey(cfg["seed"]), 0xD0)  # step i: fold_in i
    params = model.init(k_init)
    plain = value_and_grad(model).jitted
    # step(params, x, y, key): key draws the dropout masks (unused at dropout 0)
    step, everywhere = (lambda p, x, y, k: plain(p, x, y, None, k)), (lambda p: p)
    put = lambda a, spec: jnp.asarray(a)  # noqa: E731 - one device: where JAX puts it
    if mesh is not None:  # the parameters split over the mesh, the step on every device
        on, params, everywhere, put = on_mesh(model, params, mesh, devices)
        step = lambda p, x, y, k: on(p, x, y, None)  # noqa: E731 - no dropout on a mesh
    dp = dp_setting(model, cfg, text) if cfg["dp_clip"] is not None else None
    if dp is not None:
        step = dp["step"]
    opt = _optimizer(cfg)
    opt_state = opt.init(params)
    stretch = _stretch_fn(step, opt, limit)
    val_rng = np.random.default_rng(12345)  # the same validation windows in every run
    vx, vy = text.batch(val_rng, cfg["eval_batches"] * n, t, split="validation")
    vx, vy = put(vx, parallel.P()), put(vy, parallel.P())
    eval_loss = jax.jit(lambda p, x, y: model.mean_loss(p, x, y))
    history: dict[str, list] = {"step_losses": [], "validation": [], "skipped": []}
    done, bad_run, resumed = 0, 0, None
    if ckpt is not None and ckpt.saved is not None:
        resumed, state, meta = ckpt.restore({"params": params, "opt_state": opt_state})
        params, opt_state = state["params"], state["opt_state"]
        done, bad_run, history = meta["done"], meta["bad_run"], meta["history"]
        rng.bit_generator.state = meta["data_rng"]
        if log is not None:
            log(f"resumed from the checkpoint at step {resumed} in {ckpt.directory}")
    paths = leaf_paths(params)

    check_info = None
    if check:
        x0, y0 = text.batch(np.random.default_rng(cfg["seed"] + 1), n, t)
        check_info = check_gradients(model, params, x0, y0)
        if log is not None:
            verdict = "agree" if check_info["passed"] else "DISAGREE"
            log(
                f"check at step {done}: hand-written and jax.grad gradients {verdict}: largest "
                f"relative error {check_info['max_rel_error']:.2e} ({check_info['worst_leaf']}) "
                f"over {check_info['leaves']} leaves, loss {check_info['loss']:.6f} vs "
                f"{check_info['reference_loss']:.6f} (tolerance {GRAD_CHECK_TOLERANCE:.0e})"
            )

    if progress is not None:
        note = "compiling the training step" if done < cfg["steps"] else ""
        progress(done, cfg["steps"], note, begin=True)
    first = done
    start = time.perf_counter()
    try:
        while done < cfg["steps"]:
            s = min(cfg["log_every"], cfg["steps"] - done)
            t0 = time.perf_counter()
            if dp is None:
                xs, ys = text.batch(rng, s * n, t)
                xs, ys = xs.reshape(s, n, t), ys.reshape(s, n, t)
                rows = parallel.P(None, "data")  # (s, n, t): the sequences split over data
                keys = jax.vmap(lambda k: jax.random.fold_in(drop_key, k))(jnp.arange(s) + done)
                batches = (put(xs, rows), put(ys, rows), put(keys, parallel.P()))
            else:  # Poisson-sampled windows, padded rows masked; a noise key per step
                xs, ys, where, _ = poisson_windows(text.train, rng, dp["rate"], t, s)
                keys = jax.vmap(lambda k: jax.random.fold_in(dp["key"], k))(jnp.arange(s) + done)
                batches = (jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(where), keys)
            params, opt_state, losses, runs, flags = stretch(params, opt_state, bad_run, *batches)
            losses = np.asarray(losses, np.float64)
            skipped, stop = nonfinite_outcome(done, flags, runs, limit, paths, losses)
            history["skipped"] += skipped
            if stop is not None:
                history["step_losses"] += losses[: stop[0] - done].tolist()
                message = stop[2]
                if ckpt is not None and ckpt.saved:
                    message += f"; the last checkpoint, step {ckpt.saved}, is in {ckpt.directory}"
                raise NonFiniteError(message, stop[0], stop[1], history)
            bad_run = int(np.asarray(runs)[-1])
            done += s
            history["step_losses"] += losses.tolist()
            val = float(eval_loss(everywhere(params), vx, vy))
            history["validation"].append((done, val))
            if ckpt is not None and (done % every == 0 or done == cfg["steps"]):
                meta = {"model": "gpt", "config": {**cfg, "vocab": model.vocab}, "unit": "step",
                        "done": done, "bad_run": bad_run, "history": history,
                        "data_rng": rng.bit_generator.state}  # fmt: skip
                ckpt.save(done, {"params": params, "opt_state": opt_state}, meta)
            mean = losses[np.isfinite(losses)].mean() if np.isfinite(losses).any() else np.nan
            note = f"loss {mean:.4f}  validation {val:.4f}"
            if dp is not None:
                dp["epsilon"] = spent(dp, done)
                note += f"  {privacy_text(dp)}"
            if history["skipped"]:
                note += f"  non-finite steps skipped {len(history['skipped'])}"
            if progress is not None:
                progress(done, cfg["steps"], note)
            if log is not None:
                rate = s * n * t / (time.perf_counter() - t0)
                log(
                    f"step {done:5d}/{cfg['steps']}  train loss {mean:.4f}  "
                    f"validation loss {val:.4f}  ({rate:,.0f} chars/s)"
                    + (f"  skipped {len(history['skipped'])} non-finite steps"
                       if history["skipped"] else "")
                    + ("" if dp is None else f"  {privacy_text(dp)}")
                )  # fmt: skip
    except KeyboardInterrupt as exc:
        if ckpt is not None:
            ckpt.wait()
        signum = getattr(exc, "signum", signal.SIGINT)
        raise Interrupted(signum, done, ckpt.saved if ckpt is not None else None) from None
    seconds = time.perf_counter() - start
    sample = ""
    if cfg["sample_chars"]:
        chars, sampler = characters_only(model, everywhere(params), text.vocab_size)
        ids = chars.generate(
            sampler, k_sample, text.encode("\n"), cfg["sample_chars"],
            temperature=cfg["temperature"],
        )  # fmt: skip
        sample = text.decode(ids[1:])
    return GPTTrainResult(
        config={
            **cfg,
            "vocab": model.vocab,
            "num_params": model.num_params,
            "mesh": mesh,
            "privacy": None if dp is None else {**dp["setting"], "epsilon": dp["epsilon"]},
        },
        step_losses=tuple(history["step_losses"]),
        validation=tuple((int(k), float(v)) for k, v in history["validation"]),
        seconds=seconds,
        tokens_per_second=(done - first) * n * t / max(seconds, 1e-9),
        sample=sample,
        params=params,
        check=check_info,
        skipped=tuple(history["skipped"]),
        resumed_from=resumed,
    )
