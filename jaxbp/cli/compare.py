"""``jaxbp compare``: manual gradients vs jax.grad vs finite differences; exit 1 on a mismatch.

The arguments, their checks, and the printing; the work is :func:`jaxbp.gradcheck.compare`.
``--model mlp`` (default) sweeps MLP configurations on synthetic data or the digits;
``--model gpt`` checks a small GPT on windows of the bundled Shakespeare.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..activations import ACTIVATIONS
from ..attention import STRATEGIES as ATTENTION_STRATEGIES
from ..datasets import load_digits, load_shakespeare
from ..gpt import GPT
from ..gradcheck import FD_DIRECTIONS, compare, x64
from ..nn import LOSSES, MLP
from ..plots import compare_figure
from ._args import (
    choice_list,
    json_path,
    nonnegative_float,
    plot_path,
    positive_int,
    sizes,
    text_stream,
    unit_float,
    write_json,
    write_plot,
)

DTYPES = ("float32", "float64", "bfloat16")
# --model gpt: a GPT small enough for float64 finite differences in seconds.
GPT_COMPARE = {"d": 16, "heads": 2, "layers": 2, "context": 16, "batch": 4,
               "attention": "store"}  # fmt: skip
MLP_DEFAULTS = {"sizes": (64, 32, 10), "batch": 32, "activation": ["relu"],
                "loss": ["softmax_cross_entropy"], "dataset": "synthetic"}  # fmt: skip
# Flags of one model only (argparse default None: giving one to the other model is a usage
# error; validate fills in the model's own default).
MLP_ONLY = ("sizes", "activation", "loss", "dataset", "label_smoothing", "z_loss")
GPT_ONLY = ("d", "heads", "layers", "context", "attention", "tied")


def add_arguments(parser) -> None:
    """``jaxbp compare``'s arguments."""
    parser.add_argument(
        "--model", choices=("mlp", "gpt"), default="mlp",
        help="mlp: MLP configurations (default); gpt: a small GPT on windows of Shakespeare",
    )  # fmt: skip
    parser.add_argument(
        "--batch", type=positive_int, default=None,
        help=f"batch size n (default {MLP_DEFAULTS['batch']}; gpt: {GPT_COMPARE['batch']} "
        "sequences)",
    )  # fmt: skip
    mlp = parser.add_argument_group("--model mlp")
    mlp.add_argument(
        "--sizes",
        type=sizes,
        default=None,
        help="layer widths, input first (default 64,32,10)",
    )
    mlp.add_argument(
        "--activation",
        type=choice_list(tuple(ACTIVATIONS)),
        default=None,
        help=f"one of {', '.join(ACTIVATIONS)}, a comma list, or 'all' (default relu)",
    )
    mlp.add_argument(
        "--loss",
        type=choice_list(tuple(LOSSES)),
        default=None,
        help=f"one of {', '.join(LOSSES)}, a comma list, or 'all' (default softmax_cross_entropy)",
    )
    gpt = parser.add_argument_group("--model gpt")
    for flag in ("d", "heads", "layers", "context"):
        gpt.add_argument(f"--{flag}", type=positive_int, default=None,
                         help=f"default {GPT_COMPARE[flag]}")  # fmt: skip
    gpt.add_argument("--attention", choices=ATTENTION_STRATEGIES, default=None,
                     help="attention strategy (default store)")  # fmt: skip
    gpt.add_argument("--tied", action="store_const", const=True, default=None,
                     help="tie the head to the token table")  # fmt: skip
    parser.add_argument(
        "--dtype",
        type=choice_list(DTYPES),
        default=["float32"],
        help="float32, float64, bfloat16, a comma list, or 'all' (default float32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data, parameters, directions")
    mlp.add_argument(
        "--dataset",
        choices=("synthetic", "digits"),
        default=None,
        help="random inputs (default), or the first --batch digits (needs sizes 64,…,10)",
    )
    parser.add_argument(
        "--fd-directions",
        type=positive_int,
        default=None,
        help=f"random directions per leaf for finite differences (default {FD_DIRECTIONS})",
    )
    parser.add_argument("--no-fd", action="store_true", help="skip the finite-difference check")
    mlp.add_argument(
        "--label-smoothing",
        type=unit_float,
        default=None,
        help="softmax_cross_entropy's label_smoothing in [0, 1] (default 0)",
    )
    mlp.add_argument(
        "--z-loss",
        type=nonnegative_float,
        default=None,
        help="softmax_cross_entropy's z_loss ≥ 0 (default 0)",
    )
    parser.add_argument(
        "--json", metavar="PATH", type=json_path, help="also write the reports as JSON (-: stdout)"
    )
    parser.add_argument(
        "--plot", metavar="PATH", type=plot_path,
        help="also draw every leaf's max relative error against its tolerance (PNG, PDF, SVG; "
        "needs the plots extra)",
    )  # fmt: skip


def validate(args) -> None:
    """What no single value shows: options that do not apply, the digits' sizes."""
    mine, other = (GPT_ONLY, MLP_ONLY) if args.model == "gpt" else (MLP_ONLY, GPT_ONLY)
    for flag in other:
        if getattr(args, flag) is not None:
            raise ValueError(
                f"--{flag.replace('_', '-')}: only for --model "
                f"{'mlp' if args.model == 'gpt' else 'gpt'}, got --model {args.model}"
            )
    defaults = GPT_COMPARE if args.model == "gpt" else {**MLP_DEFAULTS, "label_smoothing": 0.0,
                                                         "z_loss": 0.0}  # fmt: skip
    for flag in (*mine, "batch"):
        if getattr(args, flag, None) is None:
            setattr(args, flag, defaults.get(flag, False))
    if args.no_fd and args.fd_directions is not None:
        raise ValueError("--fd-directions: does not apply with --no-fd")
    if args.model == "gpt":
        if args.d % args.heads:
            raise ValueError(f"--heads: expected a divisor of --d {args.d}, got {args.heads}")
        return
    if "softmax_cross_entropy" not in args.loss:
        for flag, value in (("--label-smoothing", args.label_smoothing), ("--z-loss", args.z_loss)):
            if value:
                raise ValueError(
                    f"{flag}: only for --loss softmax_cross_entropy, got --loss "
                    f"{','.join(args.loss)}"
                )
    if args.dataset == "digits":
        split = load_digits()
        i, c = split.x_train.shape[1], split.num_classes
        if args.sizes[0] != i or args.sizes[-1] != c:
            raise ValueError(
                f"--sizes: the digits data set needs {i} inputs and {c} classes, got "
                f"{','.join(map(str, args.sizes))}"
            )
        if args.batch > split.x_train.shape[0]:
            raise ValueError(f"--batch: expected 1 to {split.x_train.shape[0]}, got {args.batch}")


def _batch(model: MLP, dataset: str, batch: int, seed: int):
    """Inputs ``x (n, i)`` float64 and labels for the model's loss (ids, or ``(n, c)`` floats)."""
    i, c = model.sizes[0], model.sizes[-1]
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    if dataset == "digits":
        split = load_digits()
        if i != split.x_train.shape[1] or c != split.num_classes:
            raise ValueError(
                f"--sizes: the digits data set needs {split.x_train.shape[1]} inputs and "
                f"{split.num_classes} classes, got sizes {model.sizes}"
            )
        if not 1 <= batch <= split.x_train.shape[0]:
            raise ValueError(f"--batch: expected 1 to {split.x_train.shape[0]}, got {batch}")
        x = jnp.asarray(split.x_train[:batch], jnp.float64)
        ids = jnp.asarray(split.y_train[:batch], jnp.int32)
    else:
        x = jax.random.normal(kx, (batch, i), jnp.float64)
        ids = jax.random.randint(ky, (batch,), 0, c, jnp.int32)
    if model.loss == "softmax_cross_entropy":
        return x, ids
    if model.loss == "sigmoid_binary_cross_entropy":
        return x, jax.nn.one_hot(ids, c, dtype=jnp.float64)
    return x, jax.random.normal(ky, (batch, c), jnp.float64)  # mse targets


def _gpt_reports(args, fd_directions):
    """One report per dtype: a small GPT on ``--batch`` windows of the bundled Shakespeare."""
    text = load_shakespeare()
    model = GPT(text.vocab_size, args.d, args.heads, args.layers, args.context,
                tied=bool(args.tied), attention=args.attention)  # fmt: skip
    ids, targets = text.batch(np.random.default_rng(args.seed), args.batch, args.context)
    params = model.init(jax.random.PRNGKey(args.seed + 1), jnp.float64)
    return [
        compare(
            model,
            params,
            ids,
            targets,
            dtype=dtype,
            fd=not args.no_fd,
            fd_directions=fd_directions,
            seed=args.seed,
        )  # fmt: skip
        for dtype in args.dtype
    ]


def run(args) -> int:
    """Run ``jaxbp compare`` (arguments already validated); 0 when every comparison passes,
    1 otherwise."""
    out = text_stream(args)
    fd_directions = FD_DIRECTIONS if args.fd_directions is None else args.fd_directions
    reports = []
    with x64():
        for report in _gpt_reports(args, fd_directions) if args.model == "gpt" else ():
            reports.append(report)
            print(report.table(), file=out)
            print(file=out)
        for dtype in args.dtype if args.model == "mlp" else ():
            for activation in args.activation:
                for loss in args.loss:
                    opts = {}
                    if loss == "softmax_cross_entropy":
                        opts = {k: v for k, v in (("label_smoothing", args.label_smoothing),
                                                  ("z_loss", args.z_loss)) if v}  # fmt: skip
                    model = MLP(args.sizes, activation, loss, loss_options=opts)
                    x, labels = _batch(model, args.dataset, args.batch, args.seed)
                    params = model.init(jax.random.PRNGKey(args.seed + 1), jnp.float64)
                    report = compare(
                        model, params, x, labels, dtype=dtype, fd=not args.no_fd,
                        fd_directions=fd_directions, seed=args.seed,
                    )  # fmt: skip
                    reports.append(report)
                    print(report.table(), file=out)
                    print(file=out)
    passed = all(r.passed for r in reports)
    if len(reports) > 1:
        bad = [f"{r.activation}/{r.loss}/{r.dtype}" if r.sizes else r.dtype
               for r in reports if not r.passed]  # fmt: skip
        print(
            f"{len(reports) - len(bad)} of {len(reports)} configurations passed"
            + (f"; failed: {', '.join(bad)}" if bad else ""),
            file=out,
        )
    write_json(args.json, {"passed": passed, "reports": [r.to_dict() for r in reports]}, 2)
    write_plot(args.plot, compare_figure, reports, out)
    return 0 if passed else 1
