"""Argument types and output of the ``jaxbp`` command line.

Each type raises ``argparse.ArgumentTypeError``: argparse turns it into "argument --x:
message", the subcommand's usage and exit status 2, before any work starts. Every
subcommand takes ``--json PATH`` (``-``: the JSON alone on standard output, the text on
standard error).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import stat
import sys
from typing import Any, TextIO


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


def rate(value: str) -> float:
    """A probability in ``[0, 1)`` (``--dropout``)."""
    x = _float(value)
    if not 0.0 <= x < 1.0:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1), got {value!r}")
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


def _int(value: str, low: int, expected: str) -> int:
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    if k < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return k


def positive_int(value: str) -> int:
    """An integer ``≥ 1`` (``--batch``, ``--epochs``, ``--fd-directions``)."""
    return _int(value, 1, "a positive integer")


def nonnegative_int(value: str) -> int:
    """An integer ``≥ 0`` (``--warmup``, ``--sample-chars``)."""
    return _int(value, 0, "an integer ≥ 0")


def json_path(value: str) -> str:
    """``-`` (standard output) or a file path that can be written: checked now, by opening it
    as the end of the run will (``os.access`` says yes to root for any file), so that a typo
    or a read-only place fails before the work rather than after it."""
    if value == "-":
        return value
    path = os.path.abspath(os.path.expanduser(value))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"cannot write {value!r}: it is a directory")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot write {value!r}: no directory {parent!r}")
    exists = os.path.lexists(path)
    try:
        _open_for_writing(path)
    except OSError as e:
        how = "" if exists else "creating it failed: "
        reason = e.strerror or str(e)
        raise argparse.ArgumentTypeError(f"cannot write {value!r}: {how}{reason}") from None
    return value


def plot_path(value: str) -> str:
    """``--plot PATH``: a file that can be written, in a format matplotlib writes (from its
    extension: ``.png``, ``.pdf``, ``.svg``, …), with matplotlib installed (the ``plots``
    extra); all checked now, before any work."""
    from ..plots import require_matplotlib, supported_formats

    if value == "-":
        raise argparse.ArgumentTypeError("expected a file such as loss.png, got '-'")
    try:
        require_matplotlib()
    except ImportError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    ext = os.path.splitext(value)[1].lstrip(".").lower()
    formats = supported_formats()
    if ext not in formats:
        raise argparse.ArgumentTypeError(
            f"expected a file name ending in .{', .'.join(formats)}, got {value!r}"
        )
    return json_path(value)


def write_plot(path: str | None, draw, data: Any, out: TextIO) -> None:
    """Draw ``draw(data)`` (a :mod:`jaxbp.plots` function) into ``path`` when one is given,
    and say where it went on ``out``."""
    if path is None:
        return
    from ..plots import save_figure

    save_figure(draw(data), path)
    print(f"figure written to {path}", file=out)


def _open_for_writing(path: str) -> None:
    """Open ``path`` for writing and close it, changing nothing: an existing file is opened
    for appending (nothing written, nothing truncated), a new one is created and removed. A
    named pipe or socket is left unopened (opening one would block, or end its reader's
    input); for those, and for a full disk, the write at the end reports (:func:`write_json`)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(path)
        return
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND))


def text_stream(args) -> TextIO:
    """Where the human-readable text goes: standard error when ``--json -`` takes stdout."""
    return sys.stderr if getattr(args, "json", None) == "-" else sys.stdout


class OutputError(Exception):
    """The results could not be written at the end of a run (they are printed already):
    ``jaxbp`` prints this one line and exits with status 1."""


def write_json(path: str | None, data: Any, indent: int = 1) -> None:
    """Write ``data`` as JSON to ``path``, or to standard output for ``-``; raises
    :class:`OutputError` (one line, naming the path and the reason) when that fails."""
    if path is None:
        return
    text = json.dumps(data, indent=indent)
    try:
        if path == "-":
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            return
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        where = "standard output" if path == "-" else repr(path)
        raise OutputError(
            f"--json: could not write {where}: {e.strerror or e} (the results are printed above)"
        ) from None


def names(value: str, choices: tuple[str, ...]) -> list[str]:
    names = list(choices) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in names if v not in choices]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"expected 'all' or a comma list of {', '.join(choices)}; got {value!r}"
        )
    return names


def sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected at least two positive widths like 64,32,10, got {value!r}"
        )
    return sizes


def choice_list(choices: tuple[str, ...]):
    def parse(value: str) -> list[str]:
        return names(value, choices)

    parse.__name__ = "list"  # argparse names the type in some messages
    return parse


def mesh_axes(value: str) -> dict[str, int]:
    """``data=2,model=4`` → ``{"data": 2, "model": 4}`` (``--mesh``): sizes of the axes
    ``data`` and ``model``, each at most once, each a positive integer."""
    out: dict[str, int] = {}
    for part in value.split(","):
        name, eq, size = part.strip().partition("=")
        if not eq or name not in ("data", "model") or name in out or not size.isdigit():
            raise argparse.ArgumentTypeError(
                f"expected axis sizes like data=2,model=4 (axes data and model), got {value!r}"
            )
        out[name] = int(size)
        if out[name] < 1:
            raise argparse.ArgumentTypeError(f"expected positive axis sizes, got {value!r}")
    return out
