"""``jaxbp train``: an MLP on the bundled digits, or a character-level GPT on Shakespeare,
with the hand-written gradients.

The arguments, their checks, and the printing; the work is :func:`jaxbp.train.train`
(``--model mlp``) and :func:`jaxbp.train_gpt.train_gpt` (``--model gpt``). Checkpoints and
non-finite steps: :mod:`jaxbp.cli._checkpoint`; the progress bar: :mod:`jaxbp.cli._progress`.
"""

from __future__ import annotations

from typing import Any

from ..activations import ACTIVATIONS
from ..datasets import load_shakespeare
from ..plots import train_figure
from ..train import DEFAULTS, OPTIMIZERS, RESUME_FIELDS, check_dp, train
from ..train import check_config as check_mlp_config
from ..train_gpt import (
    GPT_DEFAULTS,
    check_checkpoint_every,
    check_config,
    mesh_devices,
    train_gpt,
)
from ..train_gpt import RESUME_FIELDS as GPT_RESUME_FIELDS
from . import _checkpoint
from ._args import (
    json_path,
    mesh_axes,
    nonnegative_float,
    nonnegative_int,
    plot_path,
    positive_float,
    positive_int,
    rate,
    sizes,
    text_stream,
    write_json,
    write_plot,
)
from ._progress import Progress

_KINDS = {
    "positive_int": positive_int,
    "nonnegative_int": nonnegative_int,
    "nonnegative_float": nonnegative_float,
    "positive_float": positive_float,
    "rate": rate,
}


# Flags of one model only: their argparse default is None, so that giving one to the other
# model is a usage error; the model's own default fills them in (validate).
MLP_FLAGS = ("sizes", "activation", "optimizer", "epochs")
SHARED_FLAGS = ("lr", "batch_size", "seed", "dp_clip", "noise", "delta")


def add_arguments(parser) -> None:
    """``jaxbp train``'s arguments: the one place they are declared."""
    d, g = DEFAULTS, GPT_DEFAULTS
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
        "hand-written gradients with jax.grad's at step 0 (with --mesh: train again on one "
        "device and compare the loss curves)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", type=json_path,
                        help="also write the curve and results as JSON (-: stdout)")  # fmt: skip
    parser.add_argument(
        "--plot", metavar="PATH", type=plot_path,
        help="also draw the loss (and the MLP's accuracy) against steps; with --check the "
        "jax.grad run too (PNG, PDF, SVG; needs the plots extra)",
    )  # fmt: skip
    mlp = parser.add_argument_group("--model mlp (an MLP on the digits)")
    default_sizes = ",".join(map(str, d["sizes"]))
    mlp.add_argument(
        "--sizes", type=sizes, default=None,
        help=f"layer widths, 64 in and 10 out (default {default_sizes})",
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
    parser.add_argument(
        "--dp-clip", type=positive_float, default=None, metavar="C",
        help="DP-SGD: clip each example's gradient (gpt: each sequence's) to L2 norm C "
        "(jaxbp.clipped_grad), on Poisson-sampled batches, reporting the (ε, δ) spent "
        "(dp_accounting, the privacy extra)",
    )  # fmt: skip
    parser.add_argument(
        "--noise", type=nonnegative_float, default=None, metavar="SIGMA",
        help="DP-SGD noise multiplier σ: N(0, (σ·C)²) on the clipped sum (needs --dp-clip)",
    )  # fmt: skip
    parser.add_argument(
        "--delta", type=positive_float, default=None,
        help="DP-SGD: δ of the (ε, δ) reported, in (0, 1) (default 10^⌊log₁₀(1/N)⌋, N the "
        "examples: 1e-4 for the digits, 1e-7 for the text's windows; needs --dp-clip)",
    )  # fmt: skip
    _add_gpt_arguments(parser)
    _checkpoint.add_arguments(parser)


def _given(args, names) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is not None]


def validate(args) -> None:
    """Flags of the other model are refused; then, for the MLP, the digits' sizes, the batch
    size against the training set, ``--noise`` only with ``--dp-clip``; for the GPT its
    configuration. Checked before anything is compiled; the model's defaults fill in the
    flags not given."""
    if args.model == "gpt":
        wrong = _given(args, MLP_FLAGS)
        if wrong:
            raise ValueError(f"{wrong[0]}: only for --model mlp (the digits MLP)")
        _checkpoint.validate(args, (*GPT_FLAGS, *SHARED_FLAGS), GPT_RESUME_FIELDS)
        check_dp(args.dp_clip, args.noise or 0.0, args.delta)
        cfg = {**GPT_DEFAULTS, **_gpt_options(args)}
        check_config(cfg, args.mesh)
        if args.mesh is not None:
            mesh_devices(args.mesh)  # enough devices (simulated ones on a CPU)?
        if args.checkpoint_every is not None:
            try:
                check_checkpoint_every(args.checkpoint_every, cfg["log_every"])
            except ValueError as e:
                raise ValueError("--checkpoint-every" + str(e)[len("checkpoint_every") :]) from None
        return
    wrong = _given(args, (*GPT_FLAGS, "mesh"))
    if wrong:
        raise ValueError(f"{wrong[0]}: only for --model gpt")
    _checkpoint.validate(args, (*MLP_FLAGS, *SHARED_FLAGS, "epochs"), RESUME_FIELDS)
    for name in (*MLP_FLAGS, *SHARED_FLAGS):
        if getattr(args, name) is None:
            setattr(args, name, {"dp_clip": None, "noise": 0.0}.get(name, DEFAULTS.get(name)))
    check_mlp_config(args.sizes, args.activation, args.optimizer, args.epochs, args.batch_size)
    check_dp(args.dp_clip, args.noise, args.delta)


def _print_privacy(privacy, out) -> None:
    """The DP-SGD summary line of either model (nothing for a run without ``--dp-clip``)."""
    if privacy is None:
        return
    spent = privacy["epsilon"]
    unit = privacy["unit"]
    print(
        f"DP-SGD: clip {privacy['l2_clip']:g}, noise σ {privacy['noise_multiplier']:g}, "
        f"Poisson sampling q = {privacy['sampling_rate']:.3g} ({privacy[unit]:,} {unit}): "
        + (f"(ε, δ) = ({spent:.3g}, {privacy['delta']:.0e}), {privacy['accountant']}"
           if spent is not None else 'ε not accounted: pip install "jaxbp[privacy]"'),
        file=out,
    )  # fmt: skip


def run(args) -> int:
    """Run ``jaxbp train`` (arguments already validated); 1 when ``--check`` finds the curves
    apart, 0 otherwise."""
    if args.model == "gpt":
        return _run_gpt(args)
    out = text_stream(args)
    skip = ("command", "check", "json", "plot", "model", "checkpoint_every", "keep", *GPT_FLAGS)
    options = {k: v for k, v in vars(args).items() if k not in skip and not k.startswith("_")}
    if args.checkpoint_dir is not None:
        options.update(checkpoint_every=args.checkpoint_every or 1, keep=args.keep)
    print(
        f"Training MLP {'-'.join(map(str, args.sizes))} ({args.activation}) on the digits "
        f"(1438 train / 359 test) with hand-written gradients, {args.optimizer} lr {args.lr}, "
        f"batch {args.batch_size}",
        file=out,
    )
    bar = Progress(out, "epoch", bar=None if args.json != "-" else False)
    try:
        with bar, _checkpoint.sigterm_interrupts():
            result = train(check=args.check, log=bar.write, progress=bar, **options)
    except (KeyboardInterrupt, _checkpoint.CheckpointError, _checkpoint.NonFiniteError) as e:
        return _checkpoint.ending(args, e, "epoch", args.epochs)
    print(
        f"done in {result.seconds:.1f} s: test accuracy {result.accuracy:.4f}, "
        f"train accuracy {result.train_accuracy:.4f}, final train loss {result.losses[-1]:.4f}"
        + _skipped(result.skipped),
        file=out,
    )
    _print_privacy(result.config.get("privacy"), out)
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
    write_plot(args.plot, train_figure, result, out)
    return status


# ``jaxbp train`` flags that only the GPT takes, with their kind and help; their argparse
# default is None so that giving one to ``--model mlp`` can be refused.
GPT_FLAGS: dict[str, tuple[str, str]] = {
    "d": ("positive_int", "model width"),
    "heads": ("positive_int", "attention heads (divides --d)"),
    "layers": ("positive_int", "transformer blocks"),
    "context": ("positive_int", "sequence length t"),
    "steps": ("positive_int", "training steps"),
    "warmup": ("nonnegative_int", "learning-rate warm-up steps"),
    "weight_decay": ("nonnegative_float", "AdamW weight decay"),
    "log_every": ("positive_int", "steps per progress line (and validation loss)"),
    "eval_batches": ("positive_int", "validation windows, in batches"),
    "sample_chars": ("nonnegative_int", "characters to generate at the end (0: none)"),
    "temperature": ("positive_float", "sampling temperature"),
    "dropout": ("rate", "dropout rate on the embeddings and each block's two branches"),
}


def _add_gpt_arguments(parser) -> None:
    """The GPT's flags of ``jaxbp train`` (``--model gpt``)."""
    group = parser.add_argument_group("--model gpt (a character-level GPT on Shakespeare)")
    for name, (kind, text) in GPT_FLAGS.items():
        group.add_argument(
            "--" + name.replace("_", "-"), type=_KINDS[kind], default=None,
            help=f"{text} (default {GPT_DEFAULTS[name]})",
        )  # fmt: skip
    group.add_argument(
        "--mesh", type=mesh_axes, default=None, metavar="data=D,model=P",
        help="train on D·P devices: the batch split over data, the blocks, token table and "
        "head over model (tensor and vocabulary parallelism; the vocabulary padded to a "
        "multiple of P); on a CPU, D·P simulated devices; with --check, the loss curve is "
        "compared with one device's",
    )  # fmt: skip


def _gpt_options(args) -> dict[str, Any]:
    """The :func:`train_gpt` options of parsed arguments (shared flags included)."""
    options = {name: getattr(args, name) for name in GPT_FLAGS if getattr(args, name) is not None}
    for name in SHARED_FLAGS:
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


def _mesh_text(mesh) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


def _skipped(steps) -> str:
    if not steps:
        return ""
    shown = ", ".join(map(str, steps[:5])) + (", …" if len(steps) > 5 else "")
    return f"; {len(steps)} non-finite steps skipped (steps {shown})"


def _run_gpt(args) -> int:
    """Run ``jaxbp train --model gpt`` (arguments already validated); 1 when ``--check``
    finds the gradients apart, 0 otherwise."""
    out = text_stream(args)
    options = _gpt_options(args)
    cfg = {**GPT_DEFAULTS, **options}
    model = check_config(cfg, args.mesh)
    text = load_shakespeare()
    print(
        f"Training GPT d={model.d} heads={model.heads} layers={model.layers} "
        f"context={model.context} ({model.num_params:,} parameters) on Shakespeare "
        f"({text.train.size:,} train / {text.validation.size:,} validation characters) with "
        f"hand-written gradients: {cfg['steps']} steps of {cfg['batch_size']}×{cfg['context']} "
        f"characters, AdamW peak lr {cfg['lr']}"
        + (f", dropout {model.dropout}" if model.dropout else "")
        + ("" if args.mesh is None else f", on a {_mesh_text(args.mesh)} mesh of "
           f"{mesh_devices(args.mesh)[0].platform} devices (vocabulary {model.vocab})"),
        file=out,
    )  # fmt: skip
    run_options = dict(max_nonfinite=args.max_nonfinite, mesh=args.mesh)
    if args.checkpoint_dir is not None:
        run_options.update(checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                           checkpoint_every=args.checkpoint_every, keep=args.keep)  # fmt: skip
    bar = Progress(out, "step", bar=None if args.json != "-" else False)
    try:
        with bar, _checkpoint.sigterm_interrupts():
            result = train_gpt(check=args.check, log=bar.write, progress=bar, **options,
                               **run_options)  # fmt: skip
    except (KeyboardInterrupt, _checkpoint.CheckpointError, _checkpoint.NonFiniteError) as e:
        return _checkpoint.ending(args, e, "step", cfg["steps"])
    print(
        f"done in {result.seconds:.1f} s ({result.tokens_per_second:,.0f} chars/s): "
        f"validation loss {result.validation_loss:.4f} nats/char" + _skipped(result.skipped),
        file=out,
    )
    _print_privacy(result.config.get("privacy"), out)
    if result.sample:
        print(f"sample (temperature {cfg['temperature']}):\n" + result.sample, file=out)
    write_json(args.json, result.to_dict())
    write_plot(args.plot, train_figure, result, out)
    return 0 if result.check is None or result.check["passed"] else 1
