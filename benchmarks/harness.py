"""The benchmark harness: a case registry, side-by-side timing, memory, FLOP/s, records.

How to add cases (no change to this file or to ``__main__`` needed)
-------------------------------------------------------------------

Write a module ``benchmarks/cases_<topic>.py``; every ``cases_*.py`` in this package is
imported at start-up. In it, register one :class:`Case` per configuration::

    from benchmarks.harness import Case, Pair, Target, register

    def _build(ctx, n, v):                    # ctx: Context (dtype, quick, backend, key)
        x, w, labels = ...                    # arrays in ctx.dtype
        return Pair(
            candidate=jax.jit(fused_loss_and_grad),   # A: the jaxbp side
            baseline=jax.jit(full_logits_grad),       # B: what it is compared with
            args=(x, w, labels),                      # both sides are called f(*args)
            flops=...,                                # analytical FLOPs of A (optional)
            shapes={"n": n, "v": v},
        )

    for n, v in [(4096, 32768)]:
        register(Case(
            id=f"P5/n{n}-v{v}", group="P5", title="fused linear+CE memory",
            build=functools.partial(_build, n=n, v=v),
            targets=(Target("memory_ratio", "<=", 0.05),),
            quick=False,                          # leave it out of --quick
        ))

The harness then, for every case: builds the pair; lowers and compiles both sides (the
compile time is recorded apart); checks that A and B agree numerically **before** timing
(``Pair.compare``, default: every output leaf within the dtype's tolerance relative to
B's max-abs; ``Pair.verify`` runs an extra check of its own instead, for pairs whose
outputs are not comparable, such as backward vs forward); warms up; times A B A B …
interleaved; and writes one record. A case whose check fails is recorded with
``status: "failed"`` and is not timed.

Metrics a :class:`Target` can name (``record["metrics"]``): ``ratio`` (median of per-pair
time A/B), ``time_a``/``time_b`` (median seconds), ``memory_ratio`` (compiled temporary
bytes A/B), ``roofline`` (A's achieved FLOP/s ÷ the large ``jnp.dot`` of the same run),
``flops_per_s``, and whatever the optional ``Pair.metrics(measured) -> dict`` adds.
``Pair.sides`` times further functions in the same interleaved loop (e.g. an explicit
Jacobian route), reported beside A and B; a side that cannot run is given as a
:class:`Skip` with its reason. A case that does not fit the A-vs-B mould can return a
:class:`Custom` (metrics computed by the case itself, e.g. gradients equal across a mesh).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import math
import pkgutil
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Case", "Pair", "Target", "Skip", "Custom", "Context", "CASES", "register",
    "load_case_modules", "select", "run_case", "environment", "AgreementError", "TOLERANCE",
]  # fmt: skip

# Agreement tolerances, relative to the baseline's max-abs per output leaf. Looser than the
# unit tests' (docs/edge_cases.md) because benchmark shapes sum over thousands of terms, and on
# GPUs float32 matmuls run in TF32 by default.
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2}
TOLERANCE_TF32 = 2e-2


class AgreementError(AssertionError):
    """The two sides of a case disagree beyond tolerance: the case is not timed."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A target from docs/performance.md: ``metrics[metric] <op> value``, e.g. ``ratio <= 1.0``.

    ``backends`` / ``dtypes`` restrict where the target applies (``None``: everywhere).
    """

    metric: str
    op: str  # "<=" or ">="
    value: float
    backends: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] | None = None
    note: str = ""

    def applies(self, backend: str, dtype: str) -> bool:
        return (self.backends is None or backend in self.backends) and (
            self.dtypes is None or dtype in self.dtypes
        )

    def met(self, value: float | None) -> bool | None:
        if value is None or not math.isfinite(value):
            return None
        return value <= self.value if self.op == "<=" else value >= self.value

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


@dataclasses.dataclass(frozen=True)
class Skip:
    """A side that is not run, with the reason written into the record."""

    reason: str


@dataclasses.dataclass
class Pair:
    """What a case's ``build(ctx)`` returns: side A (``candidate``) vs side B (``baseline``).

    Both are jitted callables (``jax.jit`` results: the harness calls ``.lower``), called as
    ``f(*args)`` (B as ``f(*baseline_args)`` when given).
    """

    candidate: Callable
    baseline: Callable
    args: tuple
    baseline_args: tuple | None = None
    flops: float | None = None  # analytical FLOPs of one call of A
    baseline_flops: float | None = None
    shapes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    compare: Callable[[Any, Any], None] | None = None  # raise AgreementError on mismatch
    verify: Callable[[], None] | None = None  # replaces compare (A, B not comparable)
    tolerance: float | None = None
    sides: Mapping[str, tuple[Callable, tuple] | Skip] = dataclasses.field(default_factory=dict)
    metrics: Callable[[dict], dict] | None = None  # extra metrics from the measured record
    labels: tuple[str, str] = ("manual", "reference")
    skip_compare: tuple[str, ...] = ()  # extra sides that compute something else
    notes: str = ""


@dataclasses.dataclass
class Custom:
    """A case measured by itself: the harness only records ``metrics`` and checks targets."""

    metrics: Mapping[str, Any]
    shapes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    notes: str = ""


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration. ``id`` is unique, ``group`` the row of
    docs/performance.md (``P1``…)."""

    id: str
    group: str
    title: str
    build: Callable[[Context], Pair | Custom]
    targets: tuple[Target, ...] = ()
    quick: bool = True  # part of --quick
    quick_build: Callable[[Context], Pair | Custom] | None = None  # smaller sizes in --quick
    # With a quick_build: the id and title naming the sizes it runs (default: the full ones).
    quick_id: str | None = None
    quick_title: str | None = None

    def as_run(self, quick: bool) -> Case:
        """The case as it runs: in ``--quick`` with a ``quick_build``, that build under the id
        and title that name its sizes (``P9/vocab-n1024-v32768`` runs as
        ``P9/vocab-n128-v8192``); otherwise the case itself."""
        if not (quick and self.quick_build):
            return self
        return dataclasses.replace(
            self, id=self.quick_id or self.id, title=self.quick_title or self.title,
            build=self.quick_build, quick_build=None, quick_id=None, quick_title=None,
        )  # fmt: skip


@dataclasses.dataclass
class Context:
    """What a case builder sees."""

    dtype: Any
    quick: bool
    backend: str
    device: Any
    reps: int
    seed: int = 0
    dot_flops_per_s: float | None = None
    budget_s: float = 0.0  # seconds per case: cheap cases get up to 4·reps repetitions

    def key(self, salt: int = 0) -> jax.Array:
        return jax.random.PRNGKey(self.seed * 1000 + salt)

    @property
    def dtype_name(self) -> str:
        return jnp.dtype(self.dtype).name


CASES: list[Case] = []


def register(case: Case) -> Case:
    """Add ``case`` to the registry; ids must be unique."""
    taken = {i for c in CASES for i in (c.id, c.quick_id) if i}
    for cid in (case.id, case.quick_id):
        if cid and cid in taken:
            raise ValueError(f"case id {cid!r} is already registered")
    CASES.append(case)
    return case


def load_case_modules() -> list[str]:
    """Import every ``benchmarks/cases_*.py`` (each registers its cases on import)."""
    import benchmarks

    names = sorted(
        m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("cases_")
    )
    for name in names:
        importlib.import_module(f"benchmarks.{name}")
    return names


def select(pattern: str | None, *, quick: bool) -> list[Case]:
    """Cases whose id matches ``pattern``: comma-separated globs or regular expressions; each
    as it runs (:meth:`Case.as_run`), matched by its running id or its full one.

    A part is a glob (``P1*``, ``P4/c1??``; matched against the whole id, or as a prefix when
    it has no wildcard: ``P3`` selects every P3 case) unless it contains a character only a
    regex has (``^$|()+\\{``), e.g. ``^P(1|2)/``, which is searched for in the id.
    """
    chosen = [c for c in CASES if c.quick or not quick]
    cases = [c.as_run(quick) for c in chosen]
    if not pattern:
        return cases
    parts = [p.strip() for p in pattern.split(",") if p.strip()]

    def match(cid: str) -> bool:
        for p in parts:
            if any(ch in p for ch in "^$|()+\\{"):
                if re.search(p, cid):
                    return True
            elif fnmatch.fnmatchcase(cid, p) or (
                not any(ch in p for ch in "*?[") and cid.startswith(p)
            ):
                return True
        return False

    return [run for c, run in zip(chosen, cases, strict=True) if match(run.id) or match(c.id)]


# -- measurement --------------------------------------------------------------------------


def environment() -> dict:
    """Backend, device, versions and matmul precision, for every record."""
    import jaxlib

    dev = jax.devices()[0]
    precision = jax.config.jax_default_matmul_precision
    backend = jax.default_backend()
    if backend == "gpu":
        note = (
            "default precision: float32 matmuls run in TF32 on NVIDIA GPUs since Ampere"
            if precision is None
            else f"jax_default_matmul_precision={precision}"
        )
    else:
        note = "default precision: full float32 on CPU" if precision is None else str(precision)
    return {
        "backend": backend,
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "matmul_precision": precision if precision is not None else "default",
        "matmul_precision_note": note,
        "x64": bool(jax.config.jax_enable_x64),
    }


def _block(out):
    return jax.block_until_ready(out)


def compile_side(fn: Callable, args: tuple) -> dict:
    """Lower and compile apart, timing each; the compiled object and its memory analysis."""
    if not hasattr(fn, "lower"):  # a plain callable: jit it (a no-op wrapper if it jits inside)
        fn = jax.jit(fn)
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = None
    try:
        ma = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        ma = None
    if ma is not None:
        mem = {
            k: int(getattr(ma, k))
            for k in (
                "temp_size_in_bytes",
                "argument_size_in_bytes",
                "output_size_in_bytes",
                "alias_size_in_bytes",
                "generated_code_size_in_bytes",
            )
            if getattr(ma, k, None) is not None
        }
    return {
        "compiled": compiled,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "memory": mem,
    }


def _calibrate(call: Callable[[], Any], min_sample_s: float) -> int:
    """Calls per timing sample so one sample lasts at least ``min_sample_s`` (timeit's idea)."""
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            _block(call())
        dt = time.perf_counter() - t0
        if dt >= min_sample_s or number >= 1 << 14:
            return number
        number = max(number * 2, int(number * min_sample_s / max(dt, 1e-7)) + 1)


def interleaved(
    calls: Mapping[str, Callable[[], Any]],
    reps: int,
    *,
    warmup: int,
    min_sample_s: float,
    cpu_samples: dict[str, list[float]] | None = None,
    budget_s: float = 0.0,
    max_reps: int | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each side, sampled A B C A B C … ``reps`` times after warm-up.

    ``cpu_samples``, when given, is filled with this process's CPU seconds per call (all
    threads, ``time.process_time``): less disturbed than wall time when other processes
    share the cores, though it also counts the thread pool's spinning.

    With ``budget_s``, cheap cases get more repetitions: as many rounds as fit in the
    budget, at least ``reps`` and at most ``max_reps`` (default ``4·reps``).
    """
    for call in calls.values():
        for _ in range(warmup):
            _block(call())
    number = {name: _calibrate(call, min_sample_s) for name, call in calls.items()}
    if budget_s > 0:
        t0 = time.perf_counter()
        for name, call in calls.items():
            for _ in range(number[name]):
                out = call()
            _block(out)
        round_s = time.perf_counter() - t0
        cap = max_reps if max_reps is not None else 4 * reps
        reps = max(reps, min(cap, int(budget_s / max(round_s, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    cpu = cpu_samples if cpu_samples is not None else {}
    for name in calls:
        cpu[name] = []
    for _ in range(reps):
        for name, call in calls.items():
            k = number[name]
            c0 = time.process_time()
            t0 = time.perf_counter()
            for _ in range(k):
                out = call()
            _block(out)
            t1 = time.perf_counter()
            samples[name].append((t1 - t0) / k)
            cpu[name].append((time.process_time() - c0) / k)
    return samples


def _stats(xs: Sequence[float]) -> dict:
    a = np.asarray(xs, np.float64)
    return {
        "median": float(np.median(a)),
        "p10": float(np.percentile(a, 10)),
        "p25": float(np.percentile(a, 25)),
        "p75": float(np.percentile(a, 75)),
        "p90": float(np.percentile(a, 90)),
        "n": int(a.size),
    }


def default_compare(tol: float, names=("A", "B")) -> Callable[[Any, Any], None]:
    def compare(a, b):
        la, ta = jax.tree.flatten(a)
        lb, tb = jax.tree.flatten(b)
        if ta != tb:
            raise AgreementError(f"output structures differ: {ta} vs {tb}")
        for k, (x, y) in enumerate(zip(la, lb, strict=True)):
            x = np.asarray(jnp.asarray(x, jnp.float32) if x.dtype == jnp.bfloat16 else x)
            y = np.asarray(jnp.asarray(y, jnp.float32) if y.dtype == jnp.bfloat16 else y)
            if x.shape != y.shape:
                raise AgreementError(f"output leaf {k}: shape {x.shape} vs {y.shape}")
            x, y = x.astype(np.float64), y.astype(np.float64)
            if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
                raise AgreementError(f"output leaf {k}: non-finite values")
            scale = max(float(np.max(np.abs(y), initial=0.0)), 1e-30)
            err = float(np.max(np.abs(x - y), initial=0.0)) / scale
            if err > tol:
                raise AgreementError(
                    f"output leaf {k} {x.shape}: {names[0]} vs {names[1]} relative error "
                    f"{err:.3e} > tolerance {tol:.1e}"
                )

    return compare


def tolerance_for(ctx: Context) -> float:
    tol = TOLERANCE.get(ctx.dtype_name, 1e-4)
    if ctx.backend == "gpu" and ctx.dtype_name == "float32":
        precision = jax.config.jax_default_matmul_precision
        if precision in (None, "default", "bfloat16", "tensorfloat32"):
            tol = max(tol, TOLERANCE_TF32)
    return tol


def _peak_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def run_case(case: Case, ctx: Context, env: Mapping[str, Any]) -> dict:
    """Build, compile, check and time one case; return its record (never raises)."""
    case = case.as_run(ctx.quick)  # the id and build of the sizes that run
    record: dict[str, Any] = {
        "id": case.id,
        "case": case.group,
        "title": case.title,
        "dtype": ctx.dtype_name,
        **{k: env[k] for k in ("backend", "device", "jax", "jaxlib", "matmul_precision")},
        "quick": ctx.quick,
        "status": "ok",
        "targets": [],
        "metrics": {},
    }
    try:
        pair = case.build(ctx)
        if isinstance(pair, Skip):
            record["status"] = "skipped"
            record["reason"] = pair.reason
            return record
        if isinstance(pair, Custom):
            record["shapes"] = dict(pair.shapes)
            record["metrics"] = dict(pair.metrics)
            record["notes"] = pair.notes
        else:
            _measure_pair(pair, ctx, record)
    except AgreementError as err:
        record["status"] = "failed"
        record["reason"] = f"disagreement: {err}"
    except Exception as err:  # a broken case must not stop the run
        record["status"] = "error"
        record["reason"] = f"{type(err).__name__}: {err}"
    for t in case.targets:
        if not t.applies(ctx.backend, ctx.dtype_name):
            continue
        value = record["metrics"].get(t.metric)
        record["targets"].append(
            {
                "metric": t.metric,
                "op": t.op,
                "value": t.value,
                "measured": value,
                "met": t.met(value) if record["status"] == "ok" else False,
                "note": t.note,
            }
        )
    record["met"] = all(t["met"] for t in record["targets"]) if record["targets"] else None
    return record


def _measure_pair(pair: Pair, ctx: Context, record: dict) -> None:
    a_args = pair.args
    b_args = pair.baseline_args if pair.baseline_args is not None else pair.args
    record["shapes"] = dict(pair.shapes)
    record["labels"] = list(pair.labels)
    record["notes"] = pair.notes
    sides: dict[str, tuple[Callable, tuple]] = {"A": (pair.candidate, a_args)}
    sides["B"] = (pair.baseline, b_args)
    skipped = {}
    for name, side in pair.sides.items():
        if isinstance(side, Skip):
            skipped[name] = side.reason
        else:
            sides[name] = side
    compiled = {name: compile_side(fn, args) for name, (fn, args) in sides.items()}
    record["compile"] = {
        name: {"lower_s": c["lower_s"], "compile_s": c["compile_s"]} for name, c in compiled.items()
    }
    record["memory"] = {name: c["memory"] for name, c in compiled.items()}
    calls = {
        name: (lambda c=compiled[name]["compiled"], a=args: c(*a))
        for name, (_, args) in sides.items()
    }
    # Agreement before timing.
    if pair.verify is not None:
        pair.verify()
    else:
        compare = pair.compare or default_compare(
            pair.tolerance if pair.tolerance is not None else tolerance_for(ctx), pair.labels
        )
        out_b = _block(calls["B"]())
        compare(_block(calls["A"]()), out_b)
        for name in sides:
            if name not in ("A", "B", *pair.skip_compare):
                compare(_block(calls[name]()), out_b)
    record["agreement"] = "checked"
    reps = ctx.reps
    cpu_samples: dict[str, list[float]] = {}
    samples = interleaved(
        calls,
        reps,
        warmup=2 if ctx.quick else 3,
        min_sample_s=0.002 if ctx.quick else 0.005,
        cpu_samples=cpu_samples,
        budget_s=ctx.budget_s,
    )
    if ctx.device is not None and ctx.backend == "gpu":
        record["peak_bytes_in_use"] = _peak_bytes(ctx.device)
    ratios = [a / b for a, b in zip(samples["A"], samples["B"], strict=True)]
    times = {name: _stats(s) for name, s in samples.items()}
    record["times"] = times
    record["ratio"] = _stats(ratios)
    record["skipped_sides"] = skipped
    record["cpu_times"] = {name: _stats(s) for name, s in cpu_samples.items()}
    record["cpu_ratio"] = _stats(
        [a / b for a, b in zip(cpu_samples["A"], cpu_samples["B"], strict=True) if b > 0]
        or [float("nan")]
    )
    m = record["metrics"]
    m["time_a"] = times["A"]["median"]
    m["time_b"] = times["B"]["median"]
    m["ratio"] = record["ratio"]["median"]
    m["cpu_ratio"] = record["cpu_ratio"]["median"]
    for name in sides:
        if name not in ("A", "B"):
            m[f"time_{name}"] = times[name]["median"]
            m[f"ratio_{name}"] = float(
                np.median([s / b for s, b in zip(samples[name], samples["B"], strict=True)])
            )
    ma, mb = record["memory"]["A"], record["memory"]["B"]
    if ma and mb and mb.get("temp_size_in_bytes"):
        m["memory_ratio"] = ma["temp_size_in_bytes"] / mb["temp_size_in_bytes"]
    if pair.flops:
        record["flops"] = pair.flops
        m["flops_per_s"] = pair.flops / m["time_a"]
        if ctx.dot_flops_per_s:
            m["roofline"] = m["flops_per_s"] / ctx.dot_flops_per_s
    if pair.baseline_flops:
        record["baseline_flops"] = pair.baseline_flops
        m["flops_per_s_b"] = pair.baseline_flops / m["time_b"]
    if pair.metrics is not None:
        m.update(pair.metrics(record))
        if "roofline" in m and m.get("dot_flops_per_s"):
            record["roofline_dot"] = m["dot_flops_per_s"]


def measure_dot(ctx: Context, size: int, reps: int) -> dict:
    """FLOP/s of a large ``jnp.dot`` (size³), the roofline every case is compared with."""
    k1, k2 = jax.random.split(ctx.key(999))
    a = jax.random.normal(k1, (size, size), jnp.float32).astype(ctx.dtype)
    b = jax.random.normal(k2, (size, size), jnp.float32).astype(ctx.dtype)
    c = compile_side(jax.jit(jnp.dot), (a, b))
    samples = interleaved({"dot": lambda: c["compiled"](a, b)}, reps, warmup=2, min_sample_s=0.005)[
        "dot"
    ]
    t = statistics.median(samples)
    return {"size": size, "time_s": t, "flops": 2.0 * size**3, "flops_per_s": 2.0 * size**3 / t}
