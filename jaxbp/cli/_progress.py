"""Progress of long work: a tqdm bar with elapsed time and ETA on a terminal, plain lines
elsewhere.

``jaxbp train`` (both models) and ``python -m benchmarks`` hand a :class:`Progress` to the
work as its ``progress(done, total, note, begin=False)`` callback and print their lines through
:meth:`Progress.write`. On a terminal the bar appears at once, while the first step
compiles, and its clock keeps running between updates; the lines go above it. When the
stream is not a terminal, or with ``--json -`` (the text then shares a pipe with nothing
but must stay readable in a log), there is no bar: each line ends with the elapsed time
and the ETA instead, and the note of the first call (``compiling …``) is a line of its own.
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

__all__ = ["Progress", "clock"]


def clock(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on), as tqdm writes times."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``progress(done, total, note)`` and ``write(line)`` for a stream.

    Args:
      stream: where the bar and the lines go.
      unit: what is counted (``step``, ``epoch``, ``case``).
      bar: draw a bar; default: when ``stream`` is a terminal.
    """

    def __init__(self, stream: TextIO, unit: str = "step", *, bar: bool | None = None):
        self.stream, self.unit = stream, unit
        isatty = getattr(stream, "isatty", None)
        self.bar = bool(isatty and isatty()) if bar is None else bar
        self._tqdm = None
        self._start: float | None = None
        self._first = self.done = self.total = 0
        self._warm: tuple[float, int] | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(self, done: int, total: int, note: str = "", begin: bool = False) -> None:
        """``done`` of ``total`` so far; ``note`` what is going on. ``begin=True`` (a status
        before the work: initialising, compiling) sets where the count starts (a resumed run
        starts past 0), so that the rate and the ETA count only the work of this run."""
        if self._start is None:
            self._start = time.perf_counter()
            self._first = self.done = done
            if self.bar:
                self._open(done, total, note)
        if begin:
            self._first = self.done = done
            self.total = total
            if self._tqdm is not None:
                self._tqdm.n = self._tqdm.last_print_n = self._tqdm.initial = done
                self._tqdm.total = total
                self._tqdm.set_postfix_str(note)
            elif note:
                self.stream.write(f"{note} ({self.unit} {done}/{total}) …\n")
                self.stream.flush()
            return
        if self._warm is None and done > self._first:
            self._warm = (time.perf_counter(), done)  # the first update: compiled by now
        self.done, self.total = done, total
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(note, refresh=done == self._tqdm.n)
            if done != self._tqdm.n:
                self._tqdm.update(done - self._tqdm.n)

    def _open(self, done: int, total: int, note: str) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm(
            total=total, initial=done, unit=self.unit, file=self.stream, dynamic_ncols=True,
            bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit}s "
            "[{elapsed} elapsed, ETA {remaining}, {rate_fmt}]{postfix}",
            mininterval=0.2,
        )  # fmt: skip
        self._tqdm.set_postfix_str(note)
        # tqdm redraws only on update: keep the clock running while a step compiles.
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            bar = self._tqdm
            if bar is not None:
                bar.refresh()

    def eta(self) -> str:
        """``elapsed m:ss, ETA m:ss``: the rate since the first update (the first one
        includes the compile), or since the start while there is only one."""
        if self._start is None:
            return ""
        now = time.perf_counter()
        elapsed = now - self._start
        if self.total <= self.done or self.done <= self._first:
            return f"elapsed {clock(elapsed)}"
        since, made = elapsed, self.done - self._first
        if self._warm is not None and self.done > self._warm[1]:
            since, made = now - self._warm[0], self.done - self._warm[1]
        return f"elapsed {clock(elapsed)}, ETA {clock(since / made * (self.total - self.done))}"

    def write(self, line: str) -> None:
        """A line of text: above the bar, or (no bar) with the elapsed time and ETA."""
        if self._tqdm is not None:
            self._tqdm.write(line, file=self.stream)
            return
        suffix = self.eta()
        self.stream.write(f"{line}  [{suffix}]\n" if suffix else f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        """Remove the bar (its lines stay)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
