"""The ``jaxbp`` command line: ``jaxbp compare | explain | train | generate``.

Each subcommand has its own module here, which declares its arguments (``add_arguments``),
checks what one value alone cannot (``validate``), calls the tool that does the work and
prints (``run(args) -> exit status``); this file only wires them into one ``argparse``
parser. Nothing here computes: the tools (:mod:`jaxbp.gradcheck`, :mod:`jaxbp.explain`,
:mod:`jaxbp.train`, ...) return data. Every subcommand takes ``--json PATH`` for
machine-readable output (``--json -``: the JSON alone on standard output, the text on
standard error).

    jaxbp compare   manual gradients vs jax.grad vs finite differences; exit 1 on a mismatch
    jaxbp explain   one backward pass, step by step, with every shape and the Jacobians
    jaxbp train     an MLP on the bundled digits data set with the hand-written gradients
    jaxbp generate  text sampled from a GPT checkpoint of ``jaxbp train --model gpt``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax

from .. import __version__
from . import compare, explain, generate, train
from ._args import OutputError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="jaxbp",
        description="Hand-written backward passes in JAX: check, explain, train with them, "
        "sample from a trained GPT.",
    )
    parser.add_argument("--version", action="version", version=f"jaxbp {__version__}")
    commands = {"compare": compare, "explain": explain, "train": train, "generate": generate}
    sub = parser.add_subparsers(
        dest="command", metavar="{" + ",".join(commands) + "}", required=True
    )
    for name, module in commands.items():
        doc = _summary(module.__doc__)
        p = sub.add_parser(name, help=doc, description=doc)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _validate=getattr(module, "validate", None), _parser=p)
    return parser


def _summary(doc: str | None) -> str:
    """A subcommand's help: the first paragraph of its module docstring, on one line (a
    sentence may span several lines)."""
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(first.split()).replace("``", "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``jaxbp`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    float64 is switched on first (``jax_enable_x64``): ``compare``'s finite differences and
    ``explain``'s exact differences need it; every array in jaxbp names its dtype, so
    ``train`` still runs in float32.

    Bad values, options that do not apply (``--label-smoothing`` with ``--loss mse``) and
    unknown options are usage errors of the subcommand (its usage, exit status 2) raised
    before any work; each subcommand's ``validate(args)`` checks what one value alone
    cannot. The ``--json`` path is opened then (created and removed if new); should writing
    it still fail at the end (a full disk), the results are printed already, the reason is
    one line on standard error and the exit status is 1.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(None if argv is None else list(argv))
    sub = getattr(args, "_parser", parser)
    if extra:
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    if args._validate is not None:
        try:
            args._validate(args)
        except ValueError as e:
            sub.error(str(e))
    jax.config.update("jax_enable_x64", True)
    try:
        return int(args._run(args))
    except OutputError as e:  # the results are printed; only writing them out failed
        print(f"jaxbp {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
