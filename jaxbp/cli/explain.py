"""``jaxbp explain``: one backward pass, step by step, with every shape and the Jacobians.

The arguments, their checks, and the printing; the work is :func:`jaxbp.explain.explain`
(``--model mlp``) and :func:`jaxbp.explain_attention.explain_attention` (``--model gpt``).
"""

from __future__ import annotations

import numpy as np

from .._text import format_bytes
from ..activations import ACTIVATIONS
from ..explain import (
    FULL_JACOBIAN_MAX_BYTES,
    Explanation,
    check_full_jacobian,
    explain,
)
from ..explain_attention import explain_attention
from ..plots import attention_figure, explain_figure
from ._args import json_path, plot_path, positive_int, sizes, text_stream, write_json, write_plot

EXPLAIN_MLP_DEFAULTS = {"sizes": (4, 5, 3), "batch": 2, "activation": "relu"}
EXPLAIN_GPT_DEFAULTS = {"positions": 4, "head_dim": 3}


def add_arguments(parser) -> None:
    """``jaxbp explain``'s arguments."""
    parser.add_argument(
        "--model", choices=("mlp", "gpt"), default="mlp",
        help="mlp: one backward pass of a small MLP with softmax + cross-entropy (default); "
        "gpt: one causal attention head's backward, the (t, t) Jacobian per row",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of data and parameters")
    parser.add_argument("--json", metavar="PATH", type=json_path,
                        help="also write the result as JSON ('-': stdout)")  # fmt: skip
    parser.add_argument(
        "--plot", metavar="PATH", type=plot_path,
        help="also draw the softmax step (mlp: J (c, c) · ∂loss/∂p = p − y for example 0; "
        "gpt: P, dP, dS of the head) as a picture (PNG, PDF, SVG; needs the plots extra)",
    )  # fmt: skip
    mlp = parser.add_argument_group("--model mlp")
    mlp.add_argument(
        "--sizes", type=sizes, default=None,
        help="layer widths, input first; the last is the number of classes (default 4,5,3)",
    )  # fmt: skip
    mlp.add_argument("--batch", type=positive_int, default=None, help="batch size n (default 2)")
    mlp.add_argument(
        "--activation", choices=tuple(ACTIVATIONS), default=None,
        help="hidden activation (default relu)",
    )  # fmt: skip
    mlp.add_argument(
        "--full-jacobian", action="store_true", default=None,
        help="also compute the gradient with explicit Jacobians all the way (refused when "
        f"they would take more than {format_bytes(FULL_JACOBIAN_MAX_BYTES)})",
    )  # fmt: skip
    gpt = parser.add_argument_group("--model gpt")
    gpt.add_argument("--positions", type=positive_int, default=None,
                     help="positions t of the head (default 4)")  # fmt: skip
    gpt.add_argument("--head-dim", type=positive_int, default=None,
                     help="head width e (default 3)")  # fmt: skip


def validate(args) -> None:
    """Flags of the other model are refused; ``--full-jacobian`` only for sizes whose
    Jacobians fit (:func:`full_jacobian_bytes`). Defaults fill in the flags not given."""
    mine, other = (
        (EXPLAIN_GPT_DEFAULTS, (*EXPLAIN_MLP_DEFAULTS, "full_jacobian"))
        if args.model == "gpt"
        else (EXPLAIN_MLP_DEFAULTS, tuple(EXPLAIN_GPT_DEFAULTS))
    )
    wrong = ["--" + n.replace("_", "-") for n in other if getattr(args, n) is not None]
    if wrong:
        raise ValueError(f"{wrong[0]}: not for --model {args.model}")
    for name, value in mine.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.model == "mlp":
        args.full_jacobian = bool(args.full_jacobian)
        if args.full_jacobian:
            check_full_jacobian(args.sizes, args.batch, "--sizes/--batch")


def run(args) -> int:
    """Run ``jaxbp explain`` (arguments already validated); 0 when every difference it shows
    is at float64 round-off."""
    if args.model == "gpt":
        walk = explain_attention(args.positions, args.head_dim, seed=args.seed)
        print(walk.text(), file=text_stream(args))
        write_json(args.json, walk.to_dict())
        write_plot(args.plot, attention_figure, walk, text_stream(args))
        return 0 if walk.passed else 1
    e = explain(args.sizes, args.batch, activation=args.activation, seed=args.seed,
                full_jacobian=args.full_jacobian)  # fmt: skip
    print(e.text(), file=text_stream(args))
    write_json(args.json, e.to_dict())
    write_plot(args.plot, explain_figure, e, text_stream(args))
    return 0 if _consistent(e) else 1


def _consistent(e: Explanation, tol: float = 1e-12) -> bool:
    """True when every identity the walkthrough claims holds to ``tol`` (relative)."""
    scale = max(1.0, float(np.max(np.abs(e.softmax["p_minus_y"]))))
    checks = [
        e.softmax["max_difference"],
        e.softmax["fused_max_difference"],
        e.elementwise["sigmoid_max_difference"],
        *e.gradient_check.values(),
    ]
    if e.full_jacobian is not None:
        checks += list(e.full_jacobian["max_difference"].values())
    return all(v <= tol * scale for v in checks)
