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
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import reference
from .datasets import load_shakespeare
from .gpt import GPT
from .model import value_and_grad

__all__ = ["GPT_DEFAULTS", "GPTTrainResult", "train_gpt", "check_gradients"]

GPT_DEFAULTS: dict[str, Any] = {
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


def check_config(cfg: dict[str, Any]) -> GPT:
    """Clear ``ValueError``s for a bad configuration, before anything is compiled."""
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
    return GPT(
        vocab=65, d=cfg["d"], heads=cfg["heads"], layers=cfg["layers"], context=cfg["context"]
    )


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
    *, check: bool = False, log: Callable[[str], None] | None = None, **options: Any
) -> GPTTrainResult:
    """Train a character-level GPT on Shakespeare with the hand-written gradients.

    Args:
      check: compare the step-0 gradients with ``jax.grad`` of the plain twin first.
      log: called with each progress line (``print`` on the command line).
      **options: any of :data:`GPT_DEFAULTS` — ``d``, ``heads``, ``layers``, ``context``
        (the model), ``batch_size`` ``n``, ``steps``, ``lr`` (peak), ``warmup`` (steps),
        ``weight_decay``, ``log_every`` (steps per progress line and validation),
        ``eval_batches`` (validation windows: ``eval_batches × n`` of them), ``seed``,
        ``sample_chars`` and ``temperature`` (the closing sample).

    Returns:
      A :class:`GPTTrainResult`; ``result.validation_loss`` is in nats per character.
    """
    unknown = sorted(set(options) - set(GPT_DEFAULTS))
    if unknown:
        raise TypeError(f"unexpected option(s) {unknown}; options are {list(GPT_DEFAULTS)}")
    cfg = {**GPT_DEFAULTS, **options}
    model = check_config(cfg)
    text = load_shakespeare()
    n, t = cfg["batch_size"], cfg["context"]
    rng = np.random.default_rng(cfg["seed"])
    k_init, k_sample = jax.random.split(jax.random.PRNGKey(cfg["seed"]))
    params = model.init(k_init)
    opt = _optimizer(cfg)
    opt_state = opt.init(params)
    stretch = _stretch_fn(value_and_grad(model).jitted, opt)
    val_rng = np.random.default_rng(12345)  # the same validation windows in every run
    vx, vy = text.batch(val_rng, cfg["eval_batches"] * n, t, split="validation")
    vx, vy = jnp.asarray(vx), jnp.asarray(vy)
    eval_loss = jax.jit(lambda p, x, y: model.mean_loss(p, x, y))

    check_info = None
    if check:
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
        params, opt_state, losses = stretch(params, opt_state, jnp.asarray(xs), jnp.asarray(ys))
        losses = np.asarray(losses, np.float64)
        done += s
        step_losses += losses.tolist()
        val = float(eval_loss(params, vx, vy))
        validation.append((done, val))
        if log is not None:
            rate = s * n * t / (time.perf_counter() - t0)
            log(
                f"step {done:5d}/{cfg['steps']}  train loss {losses.mean():.4f}  "
                f"validation loss {val:.4f}  ({rate:,.0f} chars/s)"
            )
    seconds = time.perf_counter() - start
    sample = ""
    if cfg["sample_chars"]:
        ids = model.generate(
            params, k_sample, text.encode("\n"), cfg["sample_chars"],
            temperature=cfg["temperature"],
        )  # fmt: skip
        sample = text.decode(ids[1:])
    return GPTTrainResult(
        config={**cfg, "vocab": model.vocab, "num_params": model.num_params},
        step_losses=tuple(step_losses),
        validation=tuple(validation),
        seconds=seconds,
        tokens_per_second=cfg["steps"] * n * t / seconds,
        sample=sample,
        params=params,
        check=check_info,
    )
