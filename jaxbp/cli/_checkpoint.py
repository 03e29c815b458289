"""``jaxbp train``'s checkpoint and non-finite-step options, their checks, and how a run
that is interrupted or stopped ends.

``--checkpoint-dir DIR`` saves checkpoints with orbax-checkpoint (the ``checkpoint`` extra),
``--resume`` continues the latest one; both are checked before any work: orbax installed,
the folder usable, and on ``--resume`` the checkpoint's configuration against the flags
given (a flag not given takes the checkpoint's value). A run ends with exit status 130
(SIGINT) or 143 (SIGTERM) when interrupted, after the pending save is on disk, and 1 when
``--max-nonfinite`` non-finite steps in a row stopped it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from .._nonfinite import NonFiniteError, finite_or_none
from ..checkpoint import (
    EXTRA,
    CheckpointError,
    Interrupted,
    check_folder,
    check_same,
    orbax,
    read_meta,
)
from ._args import positive_int, write_json

__all__ = ["add_arguments", "validate", "ending"]


def add_arguments(parser) -> None:
    """The checkpoint flags and ``--max-nonfinite`` (both models)."""
    group = parser.add_argument_group("checkpoints and non-finite steps (both models)")
    group.add_argument(
        "--checkpoint-dir", metavar="DIR", default=None,
        help=f'save checkpoints in DIR with orbax-checkpoint (pip install "jaxbp[{EXTRA}]")',
    )  # fmt: skip
    group.add_argument(
        "--checkpoint-every", metavar="N", type=positive_int, default=None,
        help="epochs (mlp, default 1) or steps (gpt, a multiple of --log-every, default "
        "--log-every) between two checkpoints; the last is always saved",
    )  # fmt: skip
    group.add_argument("--keep", metavar="K", type=positive_int, default=None,
                       help="keep the K latest checkpoints (default 3)")  # fmt: skip
    group.add_argument(
        "--resume", action="store_true",
        help="continue the latest checkpoint in --checkpoint-dir; flags not given take the "
        "checkpoint's values, flags given must match them",
    )  # fmt: skip
    group.add_argument(
        "--max-nonfinite", metavar="K", type=positive_int, default=3,
        help="stop after K steps in a row whose loss or gradient is not finite; such steps "
        "are never applied (default 3)",
    )  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(args, own_flags, resume_fields) -> None:
    """Checks of the checkpoint flags, before any work; with ``--resume``, the flags of this
    model (``own_flags``) not given are filled in from the checkpoint and those given must
    match it on ``resume_fields``. ``ValueError`` (a usage error) naming the flag otherwise."""
    if args.checkpoint_dir is None:
        if args.resume:
            raise ValueError("--resume: needs --checkpoint-dir DIR, the folder of the checkpoints")
        for name in ("checkpoint_every", "keep"):
            if getattr(args, name) is not None:
                raise ValueError(f"{_flag(name)}: needs --checkpoint-dir DIR")
        return
    if args.keep is None:
        args.keep = 3
    try:
        orbax()
        check_folder(args.checkpoint_dir, resume=args.resume)
    except ImportError as e:
        raise ValueError(f"--checkpoint-dir: {e}") from None
    except CheckpointError as e:
        raise ValueError("--" + str(e).replace("_", "-", 1)) from None
    if not args.resume:
        return
    try:
        done, meta = read_meta(args.checkpoint_dir)
    except CheckpointError as e:
        raise ValueError("--" + str(e).replace("_", "-", 1)) from None
    saved = {"model": meta.get("model"), **meta.get("config", {})}
    given = {name: getattr(args, name) for name in ("model", *own_flags)}
    given = {k: v for k, v in given.items() if v is not None}
    fields = [k for k in ("model", *resume_fields) if k in given]
    check_same({_flag(k): saved.get(k) for k in fields}, {_flag(k): given[k] for k in fields},
               [_flag(k) for k in fields], args.checkpoint_dir)  # fmt: skip
    if args.model == "gpt" and saved.get("vocab") != 65:
        raise CheckpointError(
            f"vocab: the checkpoint in {args.checkpoint_dir!r} has a vocabulary of "
            f"{saved.get('vocab')}, the bundled Shakespeare has 65 characters"
        )
    for name in own_flags:
        if getattr(args, name) is None and saved.get(name) is not None:
            value = saved[name]
            setattr(args, name, tuple(value) if isinstance(value, list) else value)
    if args.model == "mlp" and args.epochs < done:
        raise ValueError(
            f"--epochs: the checkpoint in {args.checkpoint_dir!r} is at epoch {done}, this "
            f"run asks for {args.epochs} in all"
        )


def _terminate(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` (a ``KeyboardInterrupt``) inside the block, so the
    run ends as it does on Ctrl-C: the pending checkpoint written, a message, a status."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if old is None else old)


def ending(args, error: BaseException, unit: str, total: int) -> int:
    """The exit status and message of a run that did not finish: interrupted (130 or 143),
    stopped by non-finite steps (1, with what it had done in the JSON), or a checkpoint that
    cannot be used (1)."""
    if isinstance(error, KeyboardInterrupt):
        signum = getattr(error, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        done = getattr(error, "done", None)
        saved = getattr(error, "saved", None)
        where = f" at {unit} {done} of {total}" if done is not None else ""
        if saved:
            again = "the same command" + ("" if args.resume else " with --resume")
            tail = (
                f"; the last checkpoint ({unit} {saved}) is in {args.checkpoint_dir}: run "
                f"{again} to continue"
            )
        elif args.checkpoint_dir:
            tail = f"; no checkpoint was saved yet in {args.checkpoint_dir}"
        else:
            tail = "; nothing was saved (--checkpoint-dir DIR keeps the work)"
        print(f"interrupted by {name}{where}{tail}", file=sys.stderr)
        return 128 + int(signum)
    if isinstance(error, NonFiniteError):
        print(f"error: {error}", file=sys.stderr)
        partial = dict(error.result or {})
        losses = partial.pop("step_losses", [])
        data = {"error": str(error), "step": error.step, "leaf": error.leaf,
                "step_losses": finite_or_none(losses),
                "skipped_steps": partial.get("skipped", []),
                "nonfinite_steps": len(partial.get("skipped", []))}  # fmt: skip
        write_json(args.json, data)
        return 1
    if isinstance(error, CheckpointError):
        print(f"error: {error}", file=sys.stderr)
        return 1
    raise error
