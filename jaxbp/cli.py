"""The ``jaxbp`` command line: ``jaxbp compare | explain | train``.

Each subcommand lives in its own module, which owns its arguments (``add_arguments``) and
its work (``run(args) -> exit status``); this file only wires them into one ``argparse``
parser. Every subcommand takes ``--json PATH`` for machine-readable output (``--json -``:
the JSON alone on standard output, the text on standard error).

    jaxbp compare   manual gradients vs jax.grad vs finite differences; exit 1 on a mismatch
    jaxbp explain   one backward pass, step by step, with every shape and the Jacobians
    jaxbp train     an MLP on the bundled digits data set with the hand-written gradients
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["build_parser", "main"]


# ------------------------------------------------------------------ argument types and output
# Each raises argparse.ArgumentTypeError: argparse turns it into "argument --x: message",
# the subcommand's usage and exit status 2, before any work starts.


def _float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if math.isnan(x):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
    return x


def unit_float(value: str) -> float:
    """A number in ``[0, 1]`` (``--label-smoothing``)."""
    x = _float(value)
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    return x


def nonnegative_float(value: str) -> float:
    """A finite number ``≥ 0`` (``--z-loss``, ``--noise``)."""
    x = _float(value)
    if not 0.0 <= x < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number ≥ 0, got {value!r}")
    return x


def positive_float(value: str) -> float:
    """A finite number ``> 0`` (``--lr``, ``--dp-clip``)."""
    x = _float(value)
    if not 0.0 < x < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value!r}")
    return x


def positive_int(value: str) -> int:
    """An integer ``≥ 1`` (``--batch``, ``--epochs``, ``--fd-directions``)."""
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return k


def nonnegative_int(value: str) -> int:
    """An integer ``≥ 0`` (``--warmup``, ``--sample-chars``)."""
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {value!r}") from None
    if k < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {value!r}")
    return k


def json_path(value: str) -> str:
    """``-`` (standard output) or a file path that can be written: checked now, so that a
    typo in the directory fails before the work rather than after it."""
    if value == "-":
        return value
    path = os.path.abspath(os.path.expanduser(value))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"cannot write {value!r}: it is a directory")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot write {value!r}: no directory {parent!r}")
    target = path if os.path.exists(path) else parent
    if not os.access(target, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {value!r}: permission denied")
    return value


def text_stream(args) -> TextIO:
    """Where the human-readable text goes: standard error when ``--json -`` takes stdout."""
    return sys.stderr if getattr(args, "json", None) == "-" else sys.stdout


def write_json(path: str | None, data: Any, indent: int = 1) -> None:
    """Write ``data`` as JSON to ``path``, or to standard output for ``-``."""
    import json

    if path is None:
        return
    if path == "-":
        json.dump(data, sys.stdout, indent=indent)
        sys.stdout.write("\n")
        sys.stdout.flush()
        return
    with open(path, "w") as f:
        json.dump(data, f, indent=indent)


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
        p.set_defaults(_run=module.run, _validate=getattr(module, "validate", None), _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``jaxbp`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    float64 is switched on first (``jax_enable_x64``): ``compare``'s finite differences and
    ``explain``'s exact differences need it; every array in jaxbp names its dtype, so
    ``train`` still runs in float32.

    Bad values, options that do not apply (``--label-smoothing`` with ``--loss mse``) and
    unknown options are usage errors of the subcommand (its usage, exit status 2) raised
    before any work; each subcommand's ``validate(args)`` checks what one value alone
    cannot.
    """
    import jax

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
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
