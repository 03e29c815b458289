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
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import reference
from .activations import ACTIVATIONS
from .datasets import load_digits
from .nn import MLP, value_and_grad

__all__ = ["TrainResult", "train", "DEFAULTS"]

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


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    ``losses`` is the mean training loss of every epoch ``(epochs,)``; ``step_losses`` every
    minibatch's ``(epochs·s,)``; ``test_accuracy`` the held-out accuracy after every epoch.
    ``check`` (with ``check=True``) holds the reference run's curve and the largest
    difference between the two step-loss curves, absolute and relative to the reference
    curve's max-abs (the convention of docs/edge_cases.md), passed at ``CHECK_TOLERANCE``.
    """

    config: dict[str, Any]
    losses: tuple[float, ...]
    step_losses: tuple[float, ...]
    test_accuracy: tuple[float, ...]
    train_accuracy: float
    seconds: float
    params: Any = dataclasses.field(repr=False, default=None)
    check: dict[str, Any] | None = None

    @property
    def accuracy(self) -> float:
        """Held-out accuracy after the last epoch."""
        return self.test_accuracy[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (parameters left out)."""
        return {
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items()},
            "losses": list(self.losses),
            "step_losses": list(self.step_losses),
            "test_accuracy": list(self.test_accuracy),
            "accuracy": self.accuracy,
            "train_accuracy": self.train_accuracy,
            "seconds": self.seconds,
            "check": self.check,
        }


def _optimizer(name: str, lr: float) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr, weight_decay=1e-4)
    if name == "sgd":
        return optax.sgd(lr, momentum=0.9)
    raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)}, got {name!r}")


def _check_dp(dp_clip: float | None, noise: float) -> None:
    """Clear errors for ``--dp-clip C`` / ``--noise σ`` before anything is compiled."""
    from .per_example import _check_clip_options

    if dp_clip is None:
        if noise:
            raise ValueError(f"noise: --noise {noise} needs --dp-clip C (the noise std is σ·C)")
        return
    _check_clip_options(dp_clip, noise, None, "bookkeeping")


def _grad_fn(model: MLP, args: Any) -> Callable:
    """The gradient used for training: ``(params, x (n, i), labels (n,), key) -> (loss, grads)``.

    ``args`` is the parsed command line (or any object with the same attributes):
    ``args.reference`` picks ``jax.grad`` of the plain-jnp network instead of the
    hand-written reverse loop. Extend here (a clipped, noised gradient, …) and add the
    matching arguments in :func:`add_arguments`; ``key`` is a fresh PRNG key per step.

    ``args.dp_clip`` (``--dp-clip C``) and ``args.noise`` (``--noise σ``) select DP-SGD:
    :func:`jaxbp.clipped_grad` (its ``vmap(grad)`` reference with ``args.reference``).
    """
    dp_clip = getattr(args, "dp_clip", None)
    noise = float(getattr(args, "noise", 0.0) or 0.0)
    _check_dp(dp_clip, noise)
    if dp_clip is not None:  # DP-SGD: per-example clipping to C, Gaussian noise σ·C
        from .per_example import clipped_grad

        build = reference.clipped_grad if getattr(args, "reference", False) else clipped_grad
        dp = build(model, l2_clip=dp_clip, noise_multiplier=noise, return_loss=True)

        def dp_grad_fn(params, x, labels, key):
            loss, grads, _ = dp(params, x, labels, key=key)
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


def _epoch_fn(model: MLP, opt: optax.GradientTransformation, grad_fn: Callable, steps: int):
    """One jitted epoch: shuffle, then ``jax.lax.scan`` over ``steps`` minibatches."""

    @jax.jit
    def epoch(params, opt_state, x, labels, key):
        k_perm, k_steps = jax.random.split(key)
        n_train = x.shape[0]
        batch = n_train // steps
        order = jax.random.permutation(k_perm, n_train)[: steps * batch].reshape(steps, batch)

        def step(carry, inputs):
            params, opt_state = carry
            idx, k = inputs  # idx (n,)
            loss, grads = grad_fn(params, x[idx], labels[idx], k)
            # optax mixes Python floats with int32 step counts: let it promote as it expects
            # even when the caller runs with jax_numpy_dtype_promotion="strict".
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = opt.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
            return (params, opt_state), loss

        keys = jax.random.split(k_steps, steps)
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (order, keys))
        return params, opt_state, losses  # losses (s,)

    return epoch


def _accuracy_fn(model: MLP):
    @jax.jit
    def accuracy(params, x, labels):
        logits = model.apply(params, x)  # (n, c)
        hits = jnp.argmax(logits, axis=-1).astype(labels.dtype) == labels
        return jnp.mean(hits.astype(jnp.float32))

    return accuracy


def _run(model, args, split, log: Callable[[str], None] | None):
    cfg = args
    opt = _optimizer(cfg.optimizer, cfg.lr)
    n_train = split.x_train.shape[0]
    if not 1 <= cfg.batch_size <= n_train:
        raise ValueError(f"batch_size: expected 1 to {n_train}, got {cfg.batch_size}")
    steps = n_train // cfg.batch_size
    epoch = _epoch_fn(model, opt, _grad_fn(model, cfg), steps)
    accuracy = _accuracy_fn(model)
    x_tr, y_tr = jnp.asarray(split.x_train, jnp.float32), jnp.asarray(split.y_train, jnp.int32)
    x_te, y_te = jnp.asarray(split.x_test, jnp.float32), jnp.asarray(split.y_test, jnp.int32)
    k_init, k_train = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params = model.init(k_init, jnp.float32)
    opt_state = opt.init(params)
    losses, step_losses, test_acc = [], [], []
    start = time.perf_counter()
    for e in range(cfg.epochs):
        t0 = time.perf_counter()
        params, opt_state, batch_losses = epoch(
            params, opt_state, x_tr, y_tr, jax.random.fold_in(k_train, e)
        )
        batch_losses = np.asarray(batch_losses, np.float64)
        acc = float(accuracy(params, x_te, y_te))
        losses.append(float(batch_losses.mean()))
        step_losses += batch_losses.tolist()
        test_acc.append(acc)
        if log is not None:
            log(
                f"epoch {e + 1:3d}/{cfg.epochs}  train loss {losses[-1]:.4f}  "
                f"test accuracy {acc:.4f}  ({time.perf_counter() - t0:.2f} s)"
            )
    seconds = time.perf_counter() - start
    return params, losses, step_losses, test_acc, float(accuracy(params, x_tr, y_tr)), seconds


def _check_config(sizes, activation, optimizer, epochs, batch_size):
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
    **extra: Any,
) -> TrainResult:
    """Train ``MLP(sizes, activation)`` on the digits with the hand-written gradients.

    Args:
      sizes: layer widths ``(64, …, 10)``: 64 pixels in, 10 digits out.
      activation: hidden activation (one of ``jaxbp.ACTIVATIONS``).
      optimizer: ``adam``, ``adamw`` (weight decay 1e-4) or ``sgd`` (momentum 0.9).
      lr: learning rate.
      epochs: passes over the 1438 training examples (a shuffled epoch drops the remainder).
      batch_size: minibatch size ``n``.
      seed: seed of the initialisation and the shuffling.
      check: also train with ``jax.grad`` (reference) from the same seed and compare curves.
      log: called with one progress line per epoch (``print`` on the command line).
      **extra: further options read by :func:`_grad_fn` (attributes of its ``args``).

    Returns:
      A :class:`TrainResult`; ``result.accuracy`` is the held-out accuracy (359 examples).
    """
    model, split = _check_config(sizes, activation, optimizer, epochs, batch_size)
    config = dict(
        sizes=model.sizes, activation=activation, optimizer=optimizer, lr=lr, epochs=epochs,
        batch_size=batch_size, seed=seed, **extra,
    )  # fmt: skip
    args = _Args(**config, reference=False)
    params, losses, step_losses, test_acc, train_acc, seconds = _run(model, args, split, log)
    check_info = None
    if check:
        ref_args = _Args(**config, reference=True)
        _, ref_losses, ref_steps, ref_acc, _, ref_seconds = _run(model, ref_args, split, None)
        a, b = np.asarray(step_losses), np.asarray(ref_steps)
        abs_diff = float(np.max(np.abs(a - b)))
        rel = abs_diff / max(float(np.max(np.abs(b))), 1e-30)
        check_info = {
            "reference_step_losses": ref_steps,
            "max_abs_difference": abs_diff,
            "reference_losses": ref_losses,
            "reference_test_accuracy": ref_acc,
            "reference_seconds": ref_seconds,
            "max_rel_difference": rel,
            "tolerance": CHECK_TOLERANCE,
            "passed": bool(rel <= CHECK_TOLERANCE),
        }
    return TrainResult(
        config=config,
        losses=tuple(losses),
        step_losses=tuple(step_losses),
        test_accuracy=tuple(test_acc),
        train_accuracy=train_acc,
        seconds=seconds,
        params=params,
        check=check_info,
    )


class _Args:
    """Attribute access to the training options (what :func:`_grad_fn` reads)."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


# --------------------------------------------------------------------------- command line


# Flags of one model only: their argparse default is None, so that giving one to the other
# model is a usage error; the model's own default fills them in (validate).
MLP_FLAGS = ("sizes", "activation", "optimizer", "epochs", "dp_clip", "noise")
SHARED_FLAGS = ("lr", "batch_size", "seed")


def add_arguments(parser) -> None:
    """``jaxbp train``'s arguments: the one place they are declared."""
    from . import train_gpt
    from .cli import json_path, nonnegative_float, positive_float, positive_int
    from .gradcheck import _sizes

    d, g = DEFAULTS, train_gpt.GPT_DEFAULTS
    parser.add_argument(
        "--model", choices=("mlp", "gpt"), default="mlp",
        help="mlp: an MLP on the bundled digits (default); gpt: a character-level GPT on the "
        "bundled works of Shakespeare",
    )  # fmt: skip
    parser.add_argument(
        "--lr", type=positive_float, default=None,
        help=f"learning rate (default {d['lr']}; gpt: peak {g['lr']})",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=positive_int, default=None,
        help=f"minibatch size (default {d['batch_size']}; gpt: {g['batch_size']} sequences)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    parser.add_argument(
        "--check", action="store_true",
        help="mlp: train again with jax.grad and compare the loss curves; gpt: compare the "
        "hand-written gradients with jax.grad's at step 0",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", type=json_path,
                        help="also write the curve and results as JSON (-: stdout)")  # fmt: skip
    mlp = parser.add_argument_group("--model mlp (an MLP on the digits)")
    sizes = ",".join(map(str, d["sizes"]))
    mlp.add_argument(
        "--sizes", type=_sizes, default=None,
        help=f"layer widths, 64 in and 10 out (default {sizes})",
    )  # fmt: skip
    mlp.add_argument(
        "--activation", choices=tuple(ACTIVATIONS), default=None,
        help=f"hidden activation (default {d['activation']})",
    )  # fmt: skip
    mlp.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=None,
        help=f"optax optimizer (default {d['optimizer']})",
    )  # fmt: skip
    mlp.add_argument(
        "--epochs", type=positive_int, default=None, help=f"epochs (default {d['epochs']})"
    )
    mlp.add_argument(
        "--dp-clip", type=positive_float, default=None, metavar="C",
        help="DP-SGD: clip each example's gradient to L2 norm C (jaxbp.clipped_grad)",
    )  # fmt: skip
    mlp.add_argument(
        "--noise", type=nonnegative_float, default=None, metavar="SIGMA",
        help="DP-SGD noise multiplier σ: N(0, (σ·C)²) on the clipped sum (needs --dp-clip)",
    )  # fmt: skip
    train_gpt.add_arguments(parser)


def _given(args, names) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is not None]


def validate(args) -> None:
    """Flags of the other model are refused; then, for the MLP, the digits' sizes, the batch
    size against the training set, ``--noise`` only with ``--dp-clip``; for the GPT its
    configuration. Checked before anything is compiled; the model's defaults fill in the
    flags not given."""
    from . import train_gpt

    if args.model == "gpt":
        wrong = _given(args, MLP_FLAGS)
        if wrong:
            raise ValueError(f"{wrong[0]}: only for --model mlp (the digits MLP)")
        train_gpt.check_config({**train_gpt.GPT_DEFAULTS, **train_gpt.options_from_args(args)})
        return
    wrong = _given(args, train_gpt.GPT_FLAGS)
    if wrong:
        raise ValueError(f"{wrong[0]}: only for --model gpt")
    for name in (*MLP_FLAGS, *SHARED_FLAGS):
        if getattr(args, name) is None:
            setattr(args, name, {"dp_clip": None, "noise": 0.0}.get(name, DEFAULTS.get(name)))
    _check_config(args.sizes, args.activation, args.optimizer, args.epochs, args.batch_size)
    _check_dp(args.dp_clip, args.noise)


def run(args) -> int:
    """Run ``jaxbp train`` (arguments already validated); 1 when ``--check`` finds the curves
    apart, 0 otherwise."""
    from . import train_gpt
    from .cli import text_stream, write_json

    if args.model == "gpt":
        return train_gpt.run(args)
    out = text_stream(args)
    skip = ("command", "check", "json", "model", *train_gpt.GPT_FLAGS)
    options = {k: v for k, v in vars(args).items() if k not in skip and not k.startswith("_")}
    print(
        f"Training MLP {'-'.join(map(str, args.sizes))} ({args.activation}) on the digits "
        f"(1438 train / 359 test) with hand-written gradients, {args.optimizer} lr {args.lr}, "
        f"batch {args.batch_size}",
        file=out,
    )
    result = train(check=args.check, log=lambda line: print(line, file=out), **options)
    print(
        f"done in {result.seconds:.1f} s: test accuracy {result.accuracy:.4f}, "
        f"train accuracy {result.train_accuracy:.4f}, final train loss {result.losses[-1]:.4f}",
        file=out,
    )
    status = 0
    if result.check is not None:
        c = result.check
        verdict = "agree" if c["passed"] else "DISAGREE"
        print(
            f"check: manual and jax.grad loss curves {verdict} over {len(result.step_losses)} "
            f"steps: max difference {c['max_abs_difference']:.2e}, "
            f"{c['max_rel_difference']:.2e} relative to the curve's max (tolerance "
            f"{c['tolerance']:.0e}); reference test accuracy "
            f"{c['reference_test_accuracy'][-1]:.4f}",
            file=out,
        )
        status = 0 if c["passed"] else 1
    write_json(args.json, result.to_dict())
    return status
