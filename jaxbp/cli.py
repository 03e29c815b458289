"""The ``jaxbp`` command line: ``jaxbp compare | explain | train``.

Each subcommand lives in its own module, which owns its arguments (``add_arguments``) and
its work (``run(args) -> exit status``); this file only wires them into one ``argparse``
parser. Every subcommand takes ``--json PATH`` for machine-readable output.

    jaxbp compare   manual gradients vs jax.grad vs finite differences; exit 1 on a mismatch
    jaxbp explain   one backward pass, step by step, with every shape and the Jacobians
    jaxbp train     an MLP on the bundled digits data set with the hand-written gradients
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser with its three subcommands."""
    import importlib

    from . import __version__

    parser = argparse.ArgumentParser(
        prog="jaxbp",
        description="Hand-written backward passes in JAX: check, explain, train with them.",
    )
    parser.add_argument("--version", action="version", version=f"jaxbp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{compare,explain,train}", required=True)
    # By full name: ``jaxbp.explain`` the attribute is the function, not the module.
    for name, module_name in (("compare", "gradcheck"), ("explain", "explain"), ("train", "train")):
        module = importlib.import_module(f"{__package__}.{module_name}")
        doc = (module.__doc__ or "").strip().splitlines()[0].replace("``", "")
        p = sub.add_parser(name, help=doc, description=doc)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``jaxbp`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    float64 is switched on first (``jax_enable_x64``): ``compare``'s finite differences and
    ``explain``'s exact differences need it; every array in jaxbp names its dtype, so
    ``train`` still runs in float32.
    """
    import jax

    jax.config.update("jax_enable_x64", True)
    args = build_parser().parse_args(None if argv is None else list(argv))
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
