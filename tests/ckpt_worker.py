"""Worker for tests/test_checkpoint.py: a ``jaxbp train`` run stopped at a chosen point.

A real signal must reach a real process, so these runs happen here, in a subprocess::

    python tests/ckpt_worker.py wait-at N -- TRAIN-ARGS...
        after the progress line of step (or epoch) N, print READY and sleep: the test sends
        SIGINT, SIGTERM or SIGKILL to this process then
    python tests/ckpt_worker.py kill-in-save N -- TRAIN-ARGS...
        SIGKILL this process while orbax finalises the checkpoint of step N: every file of
        it written, the temporary folder not yet renamed (exit 3 with SKIP when this orbax
        has no atomic-rename finalisation to hook)

``TRAIN-ARGS`` are ``jaxbp train``'s arguments; the exit status is ``jaxbp train``'s.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time


def _wait_at(n: int) -> None:
    import jaxbp.cli.train as cli_train

    for name in ("train", "train_gpt"):
        work = getattr(cli_train, name)

        def wrapped(*args, _work=work, **kwargs):
            log = kwargs["log"]

            def log_then_wait(line: str) -> None:
                log(line)
                m = re.match(r"\s*(?:step|epoch)\s+(\d+)/", line)
                if m and int(m.group(1)) == n:
                    print("READY", flush=True)
                    # The test's signal ends this. Short sleeps: a process-directed signal
                    # may land on another thread (XLA's, orbax's), and Python runs its handler
                    # only when the main thread next runs bytecode; one long sleep would then
                    # last to its end (seen: 300 s).
                    for _ in range(3000):
                        time.sleep(0.1)

            kwargs["log"] = log_then_wait
            return _work(*args, **kwargs)

        setattr(cli_train, name, wrapped)


def _kill_in_save(n: int) -> None:
    try:
        from orbax.checkpoint._src.path import atomicity
    except ImportError:
        atomicity = None
    cls = getattr(atomicity, "AtomicRenameTemporaryPath", None)
    if cls is None or not hasattr(cls, "finalize"):
        print("SKIP: this orbax-checkpoint has no AtomicRenameTemporaryPath.finalize", flush=True)
        sys.exit(3)
    finalize = cls.finalize

    async def killing_finalize(self, *args, **kwargs):
        if self.get_final().name == str(n):
            print(f"KILLED in the save of {n}: {sorted(os.listdir(self.get()))}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self, *args, **kwargs)

    cls.finalize = killing_finalize


def main(argv: list[str]) -> int:
    mode, n, dashes, *train_args = argv
    assert dashes == "--", argv
    # Ctrl-C's KeyboardInterrupt even when the test runner started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    {"wait-at": _wait_at, "kill-in-save": _kill_in_save}[mode](int(n))
    from jaxbp.cli import main as jaxbp_main

    sys.stdout.reconfigure(line_buffering=True)
    return jaxbp_main(["train", *train_args])


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
