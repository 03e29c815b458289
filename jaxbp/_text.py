"""Plain text and JSON for the walkthroughs of :mod:`jaxbp.explain` and
:mod:`jaxbp.explain_attention`: one :class:`Step` per op, shapes, arrays, byte counts."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

__all__ = ["Step", "fmt_array", "fmt_shape", "fmt_values", "format_bytes", "io_lines", "jsonable"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the walk: the op, what goes in and out (with shapes), the rule."""

    title: str
    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    outputs: tuple[tuple[str, tuple[int, ...]], ...]
    rule: str
    notes: tuple[str, ...] = ()


def jsonable(value):
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array):
        return np.asarray(value, np.float64).tolist()
    if isinstance(value, np.floating | np.integer):
        return value.item()
    return value


def format_bytes(b: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b} B"


def fmt_shape(s) -> str:
    return str(tuple(s))


def io_lines(step: Step, indent: str) -> list[str]:
    names = [k for k, _ in step.inputs + step.outputs]
    w = max((len(k) for k in names), default=0)
    lines = [f"{indent}in   {k.ljust(w)}  {fmt_shape(s)}" for k, s in step.inputs]
    lines += [f"{indent}out  {k.ljust(w)}  {fmt_shape(s)}" for k, s in step.outputs]
    return lines


def fmt_values(a) -> str:
    a = np.asarray(a) + 0.0  # no "-0.0000"
    return np.array2string(a, precision=4, suppress_small=True, floatmode="fixed")


def fmt_array(a, indent: str) -> str:
    text = fmt_values(a)
    return "\n".join(indent + line for line in text.splitlines())
