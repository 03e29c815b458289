"""Checkpoints of a training run, saved and restored with orbax-checkpoint.

``jaxbp train --checkpoint-dir DIR`` (:func:`jaxbp.train.train`,
:func:`jaxbp.train_gpt.train_gpt`) keeps its work in ``DIR``: one orbax step folder
``DIR/<step>/`` per checkpoint, holding two items,

* ``state``: a pytree of arrays — the parameters, the optimizer state, and for the MLP the
  data-order PRNG key — saved with ``ocp.args.StandardSave`` (exact bytes: a resumed run
  computes with the very numbers the interrupted one had);
* ``meta``: JSON — :data:`FORMAT`, the model, its configuration, the step, the run of
  non-finite steps so far, the data-order random state where it is not a key (the GPT's
  NumPy generator), and the curve so far (so a resumed run reports the whole run).

Saves are asynchronous (training goes on while the files are written) and atomic: orbax
writes into ``DIR/<step>.orbax-checkpoint-tmp`` and renames it to ``DIR/<step>`` only when
every file is written, so a run killed during a save leaves a temporary folder that is never
loaded (and is removed when the folder is opened again). SIGINT and SIGTERM arriving while a
save is being handed to orbax are held until it has been.

orbax-checkpoint is an optional dependency (``pip install "jaxbp[checkpoint]"``); it is
imported only when a checkpoint is asked for, and :func:`orbax` says which extra to install.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax

__all__ = [
    "EXTRA",
    "FORMAT",
    "Checkpointer",
    "CheckpointError",
    "Interrupted",
    "check_folder",
    "check_same",
    "orbax",
    "read_meta",
    "restore",
]

FORMAT = "jaxbp-train-checkpoint/1"
EXTRA = "checkpoint"
_TMP = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used as asked: none in it, another program's
    files, a checkpoint of another configuration. The message names the folder or field."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during training: ``signum``, the steps done, the last checkpoint."""

    def __init__(self, signum: int, done: int = 0, saved: int | None = None):
        super().__init__(signum, done, saved)
        self.signum, self.done, self.saved = signum, done, saved


def orbax():
    """``orbax.checkpoint``, or an ``ImportError`` that names the extra to install."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            f'checkpoints need orbax-checkpoint: pip install "jaxbp[{EXTRA}]" ({e})'
        ) from None
    return ocp


def _entries(directory: str) -> tuple[list[int], list[str]]:
    """The step folders of ``directory`` and what else is in it (orbax's temporary folders
    of unfinished saves are neither)."""
    steps, foreign = [], []
    for name in sorted(os.listdir(directory)):
        if name.isdigit() and os.path.isdir(os.path.join(directory, name)):
            steps.append(int(name))
        elif _TMP not in name:
            foreign.append(name)
    return sorted(steps), foreign


def _check_folder(directory: str, *, must_exist: bool) -> None:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint_dir: {directory!r} is a file, not a folder")
    if must_exist and not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint_dir: no folder {directory!r}, so no checkpoint in it")


def check_folder(directory: str, *, resume: bool) -> str:
    """The absolute path of ``directory`` if a run can use it: to resume, a folder that holds
    checkpoints; for a new run, a new or empty folder. :class:`CheckpointError` naming the
    folder otherwise (another program's files, checkpoints a new run would mix with)."""
    directory = os.path.abspath(os.path.expanduser(directory))
    _check_folder(directory, must_exist=resume)
    if not os.path.isdir(directory):
        return directory
    steps, foreign = _entries(directory)
    if foreign:
        raise CheckpointError(
            f"checkpoint_dir: {directory!r} holds files that are not jaxbp checkpoints "
            f"({', '.join(map(repr, foreign[:3]))}); choose a new or empty folder"
        )
    if resume and not steps:
        raise CheckpointError(f"checkpoint_dir: no checkpoint in {directory!r}")
    if steps and not resume:
        raise CheckpointError(
            f"checkpoint_dir: {directory!r} already holds checkpoints (the latest at step "
            f"{steps[-1]}): continue them with --resume (resume=True), or choose a new or "
            "empty folder"
        )
    return directory


def restore(directory: str, template: Any, step: int | None = None):
    """``(step, state, meta)`` of the latest checkpoint in ``directory`` (or of ``step``),
    read only: nothing in the folder changes (a run may be writing into it). ``state`` takes
    the structure, shapes and dtypes of ``template`` (a freshly initialised state)."""
    directory = os.path.abspath(os.path.expanduser(directory))
    step, meta = read_meta(directory, step)
    ocp = orbax()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    path = os.path.join(directory, str(step))
    try:
        restored = ocp.StandardCheckpointer().restore(os.path.join(path, "state"), abstract)
        state = jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(restored))
    except Exception as e:  # noqa: BLE001 - a tree of other shapes, or missing files
        raise CheckpointError(
            f"checkpoint_dir: the state in {path!r} does not fit this run's model "
            f"({type(e).__name__}: {str(e)[:300]})"
        ) from None
    return step, state, meta


def read_meta(directory: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """``(step, meta)`` of the latest complete checkpoint in ``directory`` (or of ``step``).

    Raises :class:`CheckpointError` naming the folder when it holds no checkpoint or holds
    files that are not jaxbp training checkpoints, and ``ImportError`` naming the extra when
    orbax-checkpoint is missing. Reads only the small JSON item.
    """
    directory = os.path.abspath(os.path.expanduser(directory))
    _check_folder(directory, must_exist=True)
    steps, foreign = _entries(directory)
    if not steps:
        extra = f" (it holds {', '.join(map(repr, foreign[:3]))})" if foreign else ""
        raise CheckpointError(f"checkpoint_dir: no checkpoint in {directory!r}{extra}")
    step = steps[-1] if step is None else step
    ocp = orbax()
    path = os.path.join(directory, str(step))
    if not os.path.isdir(os.path.join(path, "meta")):
        raise CheckpointError(
            f"checkpoint_dir: {path!r} is not a jaxbp training checkpoint (no 'meta' item; "
            f"it holds {sorted(os.listdir(path))[:4]})"
        )
    try:
        meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
            os.path.join(path, "meta"), args=ocp.args.JsonRestore()
        )
    except Exception as e:  # noqa: BLE001 - any failure to read it means "not ours"
        raise CheckpointError(
            f"checkpoint_dir: {path!r} is not a readable jaxbp training checkpoint "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(
            f"checkpoint_dir: {path!r} is not a jaxbp training checkpoint (format {got!r}, "
            f"expected {FORMAT!r})"
        )
    return step, meta


def _plain(value: Any) -> Any:
    """JSON's view of a configuration value (tuples are lists)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def check_same(saved: dict[str, Any], wanted: dict[str, Any], fields, directory: str) -> None:
    """``CheckpointError`` naming the first of ``fields`` whose value in the checkpoint's
    configuration ``saved`` differs from this run's ``wanted``, with both values."""
    for name in fields:
        a, b = _plain(saved.get(name)), _plain(wanted.get(name))
        if a != b:
            show = (lambda v: ",".join(map(str, v))) if isinstance(a, list) else repr
            raise CheckpointError(
                f"{name}: the checkpoint in {directory!r} was trained with {show(a)}, this run "
                f"asks for {show(b)}; a resumed run must have the checkpoint's configuration"
            )


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block are delivered when it ends (main
    thread only; elsewhere Python runs no signal handler anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


class Checkpointer:
    """The checkpoints of one run in ``directory``: ``save`` every so often, ``restore`` the
    latest on resume, ``close`` at the end (waits for the last save).

    Args:
      directory: the folder (created if missing).
      keep: how many of the latest checkpoints to keep (older ones are deleted).
      resume: ``True`` to continue the latest checkpoint; ``False`` refuses a folder that
        already holds checkpoints (the run would mix with them) or other files.
    """

    def __init__(self, directory: str, *, keep: int = 3, resume: bool = False):
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"keep: expected an int ≥ 1, got {keep!r}")
        self.directory = check_folder(directory, resume=resume)
        ocp = orbax()
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            ),
        )
        self.saved: int | None = self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start saving ``state`` (a pytree of arrays) and ``meta`` (JSON) as ``step``; it
        finishes in the background. ``meta`` is copied now: the trainers go on appending to
        the lists it holds (the loss history) while the background save writes it."""
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(state),
            meta=self._ocp.args.JsonSave(copy.deepcopy({"format": FORMAT, **meta})),
        )
        with _signals_held():
            self._manager.save(step, args=args)
        self.saved = step

    def restore(self, template: Any) -> tuple[int, Any, dict[str, Any]]:
        """``(step, state, meta)`` of the latest checkpoint (:func:`restore`)."""
        return restore(self.directory, template)

    def wait(self) -> None:
        """Block until the saves started so far are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the last save and release orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()
