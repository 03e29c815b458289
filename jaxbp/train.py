"""Train an MLP on the bundled digits data set with the hand-written gradients.

Index letters::

    n  examples in a minibatch      i  input features (64 pixels)      c  classes (10)
    s  minibatch steps in an epoch

``jaxbp train`` fits ``MLP(sizes)`` with softmax cross-entropy on the 8×8 digits
(:func:`jaxbp.datasets.load_digits`, a fixed 80/20 split) with an optax optimizer. The gradient
is :func:`jaxbp.value_and_grad` — the explicit reverse loop over the ``_bwd`` rules, no
``jax.grad`` — and every epoch is one jitted ``jax.lax.scan`` over its ``s`` minibatches
``x (s, n, i)``, ``labels (s, n)``. ``--check`` trains again from the same seed with
``jax.grad`` of the plain-jnp network and reports how closely the two loss curves agree.

Where the gradient comes from is decided in one place, :func:`_grad_fn`: a gradient function
``(params, x (n, i), labels (n,), key) -> (mean loss, grads)``, traced inside the scan, with
a fresh PRNG key per step for gradient transforms that need randomness.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import reference
from ._nonfinite import (
    NonFiniteError,
    finite_or_none,
    guarded_update,
    leaf_paths,
    nonfinite_outcome,
)
from .checkpoint import Checkpointer, CheckpointError, Interrupted, check_same, read_meta
from .datasets import load_digits
from .model import value_and_grad
from .nn import MLP
from .per_example import clipped_grad
from .privacy import check_dp, examples_setting, privacy_text, spent

__all__ = ["TrainResult", "train", "DEFAULTS", "NonFiniteError", "guarded_update"]

DEFAULTS: dict[str, Any] = {
    "sizes": (64, 128, 10),
    "activation": "relu",
    "optimizer": "adam",
    "lr": 3e-3,
    "epochs": 30,
    "batch_size": 64,
    "seed": 0,
}
OPTIMIZERS = ("adam", "adamw", "sgd")
# Relative to the reference curve's max-abs. The two runs agree to ~1e-7 per step (float32
# round-off) until a relu kink is crossed differently; from there the trajectories drift a
# little. Seeds 0-7 with the defaults gave 9e-8 to 1.04e-5, hence 1e-4 over a whole run.
CHECK_TOLERANCE = 1e-4
# What a resumed run must share with its checkpoint (``epochs`` may grow).
RESUME_FIELDS = ("model", "sizes", "activation", "optimizer", "lr", "batch_size", "seed",
                 "dp_clip", "noise")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    ``losses`` is the mean training loss of every epoch ``(epochs,)``; ``step_losses`` every
    minibatch's ``(epochs·s,)``; ``test_accuracy`` and ``test_losses`` the held-out accuracy
    and mean loss after every epoch ``(epochs,)``.
    ``check`` (with ``check=True``) holds the reference run's curve and the largest
    difference between the two step-loss curves, absolute and relative to the reference
    curve's max-abs (the convention of docs/edge_cases.md), passed at ``CHECK_TOLERANCE``.
    ``skipped`` are the (1-based) steps not applied because they were not finite (their
    ``step_losses`` entry is the non-finite loss); ``resumed_from`` the checkpoint's epoch.
    """

    config: dict[str, Any]
    losses: tuple[float, ...]
    step_losses: tuple[float, ...]
    test_accuracy: tuple[float, ...]
    train_accuracy: float
    seconds: float
    params: Any = dataclasses.field(repr=False, default=None)
    check: dict[str, Any] | None = None
    skipped: tuple[int, ...] = ()
    resumed_from: int | None = None
    test_losses: tuple[float, ...] = ()

    @property
    def accuracy(self) -> float:
        """Held-out accuracy after the last epoch."""
        return self.test_accuracy[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (parameters left out)."""
        return {
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items()},
            "losses": finite_or_none(self.losses),
            "step_losses": finite_or_none(self.step_losses),
            "test_accuracy": list(self.test_accuracy),
            "test_losses": finite_or_none(self.test_losses),
            "accuracy": self.accuracy,
            "train_accuracy": self.train_accuracy,
            "seconds": self.seconds,
            "check": self.check,
            "nonfinite_steps": len(self.skipped),
            "skipped_steps": list(self.skipped),
            "resumed_from": self.resumed_from,
        }


def _optimizer(name: str, lr: float) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr, weight_decay=1e-4)
    if name == "sgd":
        return optax.sgd(lr, momentum=0.9)
    raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)}, got {name!r}")


def _grad_fn(model: MLP, args: Any) -> Callable:
    """The gradient used for training: ``(params, x (n, i), labels (n,), key) -> (loss, grads)``.

    ``args`` is the parsed command line (or any object with the same attributes):
    ``args.reference`` picks ``jax.grad`` of the plain-jnp network instead of the
    hand-written reverse loop. Extend here (a clipped, noised gradient, …) and add the
    matching arguments in :func:`add_arguments`; ``key`` is a fresh PRNG key per step.

    ``args.dp_clip`` (``--dp-clip C``) and ``args.noise`` (``--noise σ``) select DP-SGD:
    :func:`jaxbp.clipped_grad` (``vmap(grad)`` with ``args.reference``) with ``where`` (the
    Poisson-sampled batch) and ``batch_size=args.batch_size`` (:mod:`jaxbp.privacy`).
    """
    dp_clip = getattr(args, "dp_clip", None)
    noise = float(getattr(args, "noise", 0.0) or 0.0)
    check_dp(dp_clip, noise, getattr(args, "delta", None))
    if dp_clip is not None:  # DP-SGD: per-example clipping to C, Gaussian noise σ·C
        build = reference.clipped_grad if getattr(args, "reference", False) else clipped_grad
        dp = build(model, l2_clip=dp_clip, noise_multiplier=noise, batch_size=args.batch_size,
                   return_loss=True)  # fmt: skip

        def dp_grad_fn(params, x, labels, key, where):
            loss, grads, _ = dp(params, x, labels, where=where, key=key)
            return loss, grads

        return dp_grad_fn
    if getattr(args, "reference", False):
        vg = reference.value_and_grad(model)
    else:
        vg = value_and_grad(model)

    def grad_fn(params, x, labels, key):
        del key  # plain gradients need no randomness
        return vg(params, x, labels)

    return grad_fn


def _epoch_fn(
    model: MLP, opt: optax.GradientTransformation, grad_fn: Callable, steps: int,
    max_nonfinite: int = 3, rate: float | None = None,
):  # fmt: skip
    """One jitted epoch: ``jax.lax.scan`` over ``steps`` minibatches.

    ``epoch(params, opt_state, bad_run, x, labels, key) -> (params, opt_state, losses (s,),
    runs (s,), flags)``: ``runs`` the skipped steps in a row after each step, ``flags`` the
    :func:`guarded_update` flags of every step. Batches: a shuffle (the remainder dropped);
    with ``rate`` (DP-SGD), Poisson sampling as the accountant assumes: ``grad_fn`` gets the
    whole set and ``where (N,)``, each example in it with probability ``rate``.
    """

    @jax.jit
    def epoch(params, opt_state, bad_run, x, labels, key):
        k_perm, k_steps = jax.random.split(key)
        n_train = x.shape[0]
        batch = n_train // steps
        order = jax.random.permutation(k_perm, n_train)[: steps * batch].reshape(steps, batch)

        def step(carry, inputs):
            params, opt_state, bad_run = carry
            idx, k = inputs  # idx (n,)
            if rate is None:
                loss, grads = grad_fn(params, x[idx], labels[idx], k)
            else:
                k_sample, k_noise = jax.random.split(k)
                where = jax.random.bernoulli(k_sample, rate, (n_train,))  # (N,)
                loss, grads = grad_fn(params, x, labels, k_noise, where)
            params, opt_state, bad_run, flags = guarded_update(
                opt, params, opt_state, bad_run, loss, grads, max_nonfinite
            )
            return (params, opt_state, bad_run), (loss, bad_run, flags)

        keys = jax.random.split(k_steps, steps)
        carry = (params, opt_state, jnp.asarray(bad_run, jnp.int32))
        (params, opt_state, _), (losses, runs, flags) = jax.lax.scan(step, carry, (order, keys))
        return params, opt_state, losses, runs, flags  # losses (s,)

    return epoch


def _accuracy_fn(model: MLP):
    @jax.jit
    def accuracy(params, x, labels):
        logits = model.apply(params, x)  # (n, c)
        hits = jnp.argmax(logits, axis=-1).astype(labels.dtype) == labels
        return jnp.mean(hits.astype(jnp.float32))

    return accuracy


def _run(model, args, split, log: Callable[[str], None] | None, ckpt=None, progress=None):
    """Train; ``ckpt`` (a :class:`Checkpointer`) saves every ``args.checkpoint_every`` epochs
    and, with ``args.resume``, first restores the latest checkpoint."""
    cfg = args
    if progress is not None:
        progress(0, cfg.epochs, "initialising the model", begin=True)
    opt = _optimizer(cfg.optimizer, cfg.lr)
    n_train = split.x_train.shape[0]
    if not 1 <= cfg.batch_size <= n_train:
        raise ValueError(f"batch_size: expected 1 to {n_train}, got {cfg.batch_size}")
    steps = n_train // cfg.batch_size
    limit = getattr(cfg, "max_nonfinite", 3)
    dp = None if getattr(cfg, "dp_clip", None) is None else examples_setting(  # (ε, δ) spent
        cfg.batch_size, cfg.dp_clip, getattr(cfg, "noise", 0.0), n_train,
        getattr(cfg, "delta", None))  # fmt: skip
    epoch = _epoch_fn(model, opt, _grad_fn(model, cfg), steps, limit,
                      None if dp is None else dp["rate"])  # fmt: skip
    accuracy = _accuracy_fn(model)
    test_loss = jax.jit(model.mean_loss)
    x_tr, y_tr = jnp.asarray(split.x_train, jnp.float32), jnp.asarray(split.y_train, jnp.int32)
    x_te, y_te = jnp.asarray(split.x_test, jnp.float32), jnp.asarray(split.y_test, jnp.int32)
    k_init, k_train = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params = model.init(k_init, jnp.float32)
    opt_state = opt.init(params)
    history = {"losses": [], "step_losses": [], "test_accuracy": [], "test_losses": [],
               "skipped": []}  # fmt: skip
    first, bad_run, resumed = 0, 0, None
    if ckpt is not None and getattr(cfg, "resume", False):
        template = {"params": params, "opt_state": opt_state, "key": k_train}
        resumed, state, meta = ckpt.restore(template)
        params, opt_state, k_train = state["params"], state["opt_state"], state["key"]
        first, bad_run, history = meta["done"], meta["bad_run"], meta["history"]
        history.setdefault("test_losses", [])
        if log is not None:
            log(f"resumed from the checkpoint at epoch {resumed} in {ckpt.directory}")
    paths = leaf_paths(params)
    every = getattr(cfg, "checkpoint_every", 1)
    if progress is not None:
        note = "compiling the epoch" if first < cfg.epochs else ""
        progress(first, cfg.epochs, note, begin=True)
    start = time.perf_counter()
    done = first
    try:
        for e in range(first, cfg.epochs):
            t0 = time.perf_counter()
            params, opt_state, batch_losses, runs, flags = epoch(
                params, opt_state, bad_run, x_tr, y_tr, jax.random.fold_in(k_train, e)
            )
            batch_losses = np.asarray(batch_losses, np.float64)
            skipped, stop = nonfinite_outcome(e * steps, flags, runs, limit, paths, batch_losses)
            history["skipped"] += skipped
            if stop is not None:
                history["step_losses"] += batch_losses[: stop[0] - e * steps].tolist()
                message = stop[2]
                if ckpt is not None and ckpt.saved:
                    message += f"; the last checkpoint, epoch {ckpt.saved}, is in {ckpt.directory}"
                raise NonFiniteError(message, stop[0], stop[1], history)
            bad_run = int(np.asarray(runs)[-1])
            acc = float(accuracy(params, x_te, y_te))
            finite = batch_losses[np.isfinite(batch_losses)]
            history["losses"].append(float(finite.mean()) if finite.size else float("nan"))
            history["step_losses"] += batch_losses.tolist()
            history["test_accuracy"].append(acc)
            history["test_losses"].append(float(test_loss(params, x_te, y_te)))
            done = e + 1
            if ckpt is not None and ((e + 1) % every == 0 or e + 1 == cfg.epochs):
                state = {"params": params, "opt_state": opt_state, "key": k_train}
                meta = {"model": "mlp", "config": _saved_config(cfg), "unit": "epoch",
                        "done": e + 1, "bad_run": bad_run, "history": history}  # fmt: skip
                ckpt.save(e + 1, state, meta)
            note = f"loss {history['losses'][-1]:.4f}  accuracy {acc:.4f}"
            if history["skipped"]:
                note += f"  non-finite steps skipped {len(history['skipped'])}"
            if dp is not None:
                dp["epsilon"] = spent(dp, (e + 1) * steps)
                note += f"  {privacy_text(dp)}"
            if progress is not None:
                progress(e + 1, cfg.epochs, note)
            if log is not None:
                log(
                    f"epoch {e + 1:3d}/{cfg.epochs}  train loss {history['losses'][-1]:.4f}  "
                    f"test accuracy {acc:.4f}  ({time.perf_counter() - t0:.2f} s)"
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
    train_acc = float(accuracy(params, x_tr, y_tr))
    if dp is not None:
        if dp["epsilon"] is None:  # no epoch ran here (resumed at the end): account now
            dp["epsilon"] = spent(dp, done * steps)
        history["privacy"] = {**dp["setting"], "epsilon": dp["epsilon"]}
    return params, history, train_acc, seconds, resumed


def _saved_config(cfg) -> dict[str, Any]:
    """The configuration a checkpoint records (what :data:`RESUME_FIELDS` compares)."""
    return _dp_defaults(
        {"model": "mlp", **{k: _json(getattr(cfg, k, None)) for k in RESUME_FIELDS[1:]},
         "epochs": cfg.epochs}
    )  # fmt: skip


def _dp_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """No ``--dp-clip`` and ``--noise`` is ``dp_clip=None, noise=0.0`` however it was given."""
    return {**config, "dp_clip": config.get("dp_clip"), "noise": float(config.get("noise") or 0)}


def _json(value):
    return list(value) if isinstance(value, tuple) else value


def check_config(sizes, activation, optimizer, epochs, batch_size):
    """Clear ``ValueError``s for a bad configuration, before anything is traced."""
    model = MLP(tuple(sizes), activation, "softmax_cross_entropy")
    split = load_digits()
    if model.sizes[0] != split.x_train.shape[1] or model.sizes[-1] != split.num_classes:
        raise ValueError(
            f"sizes: the digits need {split.x_train.shape[1]} inputs and {split.num_classes} "
            f"outputs, got {model.sizes}"
        )
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)}, got {optimizer!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected a positive int, got {epochs!r}")
    n_train = split.x_train.shape[0]
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n_train:
        raise ValueError(f"batch_size: expected an int from 1 to {n_train}, got {batch_size!r}")
    return model, split


def train(
    sizes=DEFAULTS["sizes"],
    *,
    activation: str = DEFAULTS["activation"],
    optimizer: str = DEFAULTS["optimizer"],
    lr: float = DEFAULTS["lr"],
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    seed: int = DEFAULTS["seed"],
    check: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    keep: int = 3,
    resume: bool = False,
    max_nonfinite: int = 3,
    **extra: Any,
) -> TrainResult:
    """Train ``MLP(sizes, activation)`` on the digits with the hand-written gradients.

    Args:
      sizes: layer widths ``(64, …, 10)``: 64 pixels in, 10 digits out.
      activation: hidden activation (one of ``jaxbp.ACTIVATIONS``).
      optimizer: ``adam``, ``adamw`` (weight decay 1e-4) or ``sgd`` (momentum 0.9).
      lr: learning rate.
      epochs: passes over the 1438 training examples (a shuffled epoch drops the remainder;
        with ``dp_clip``, ``⌊1438/batch_size⌋`` steps of Poisson-sampled batches).
      batch_size: minibatch size ``n``.
      seed: seed of the initialisation and the shuffling.
      check: also train with ``jax.grad`` (reference) from the same seed and compare curves.
      log: called with one progress line per epoch (``print`` on the command line).
      progress: called as ``progress(epochs_done, epochs, note, begin=True)`` while the run
        sets up and compiles, then as ``progress(epochs_done, epochs, note)`` after each
        epoch (a progress bar on the command line).
      checkpoint_dir: save checkpoints there (needs ``jaxbp[checkpoint]``).
      checkpoint_every: epochs between two checkpoints (the last epoch is always saved).
      keep: how many of the latest checkpoints to keep.
      resume: continue the latest checkpoint in ``checkpoint_dir`` (its configuration must
        be this one; ``epochs`` may be larger).
      max_nonfinite: stop after this many non-finite steps in a row (none is applied).
      **extra: further options read by :func:`_grad_fn` (attributes of its ``args``):
        ``dp_clip``, ``noise``, ``delta`` for DP-SGD, whose setting and ``(ε, δ)`` spent land in
        ``result.config["privacy"]`` (:mod:`jaxbp.privacy`).

    Returns:
      A :class:`TrainResult`; ``result.accuracy`` is the held-out accuracy (359 examples).

    Raises:
      NonFiniteError: after ``max_nonfinite`` non-finite steps in a row.
      jaxbp.checkpoint.CheckpointError: a folder that holds no checkpoint (with
        ``resume``), another program's files, or a checkpoint of another configuration.
      jaxbp.checkpoint.Interrupted: SIGINT (or SIGTERM, where the caller turns it into a
        ``KeyboardInterrupt``) during training, after the pending save is on disk.
    """
    model, split = check_config(sizes, activation, optimizer, epochs, batch_size)
    check_run_options(checkpoint_every, keep, max_nonfinite, resume, checkpoint_dir)
    config = dict(
        sizes=model.sizes, activation=activation, optimizer=optimizer, lr=lr, epochs=epochs,
        batch_size=batch_size, seed=seed, **extra,
    )  # fmt: skip
    run_options = dict(checkpoint_every=checkpoint_every, max_nonfinite=max_nonfinite)
    args = _Args(**config, **run_options, reference=False, resume=resume)
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = Checkpointer(checkpoint_dir, keep=keep, resume=resume)
    try:
        if ckpt is not None and resume:
            check_resume(ckpt.directory, {"model": "mlp", **config})
        params, history, train_acc, seconds, resumed = _run(model, args, split, log, ckpt,
                                                            progress)  # fmt: skip
        if "privacy" in history:  # DP-SGD: the setting and the (ε, δ) spent
            config["privacy"] = history.pop("privacy")
    finally:
        if ckpt is not None:
            ckpt.close()
    step_losses = history["step_losses"]
    check_info = None
    if check:
        ref_args = _Args(**config, **run_options, reference=True)
        _, ref, _, ref_seconds, _ = _run(model, ref_args, split, None)
        a, b = np.asarray(step_losses), np.asarray(ref["step_losses"])
        diff = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b))
        abs_diff = float(np.max(diff))
        rel = abs_diff / max(float(np.nanmax(np.abs(b))), 1e-30)
        check_info = {
            "reference_step_losses": ref["step_losses"],
            "max_abs_difference": abs_diff,
            "reference_losses": ref["losses"],
            "reference_test_accuracy": ref["test_accuracy"],
            "reference_test_losses": ref["test_losses"],
            "reference_seconds": ref_seconds,
            "max_rel_difference": rel,
            "tolerance": CHECK_TOLERANCE,
            "passed": bool(rel <= CHECK_TOLERANCE),
        }
    return TrainResult(
        config=config,
        losses=tuple(history["losses"]),
        step_losses=tuple(step_losses),
        test_accuracy=tuple(history["test_accuracy"]),
        test_losses=tuple(history["test_losses"]),
        train_accuracy=train_acc,
        seconds=seconds,
        params=params,
        check=check_info,
        skipped=tuple(history["skipped"]),
        resumed_from=resumed,
    )


def check_run_options(checkpoint_every, keep, max_nonfinite, resume, checkpoint_dir) -> None:
    """Clear ``ValueError``s for the checkpoint and non-finite options (both models)."""
    for name, value in (("checkpoint_every", checkpoint_every), ("keep", keep),
                        ("max_nonfinite", max_nonfinite)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected an int ≥ 1, got {value!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume: needs checkpoint_dir, the folder of the checkpoints")


def check_resume(directory: str, config: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``CheckpointError`` naming the field and both values when the latest checkpoint in
    ``directory`` is not of this MLP configuration; its ``(epoch, meta)`` otherwise."""
    done, meta = read_meta(directory)
    saved = meta.get("config", {})
    saved = _dp_defaults({"model": meta.get("model"), **saved})
    check_same(saved, _dp_defaults(config), RESUME_FIELDS, directory)
    if config["epochs"] < done:
        raise CheckpointError(
            f"epochs: the checkpoint in {directory!r} is at epoch {done}, this run asks for "
            f"{config['epochs']} epochs in all"
        )
    return done, meta


class _Args:
    """Attribute access to the training options (what :func:`_grad_fn` reads)."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
