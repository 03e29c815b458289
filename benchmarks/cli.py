"""``python -m benchmarks``: run the registered cases and write JSON, Markdown and plots.

Progress: a bar with elapsed time and ETA over the cases on a terminal, the case lines above
it; plain lines with the elapsed time and ETA when standard output is not a terminal
(:class:`jaxbp.cli._progress.Progress`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks import harness
from jaxbp.cli._progress import Progress

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Time jaxbp's hand-written backward passes against jax.grad (docs/performance.md)."
        ),
    )
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    p.add_argument(
        "--cases",
        metavar="PATTERN",
        help="case ids to run: comma-separated globs (P1*,P4/c10*) or a regex",
    )
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default benchmarks/results/<device>[-<dtype>][-quick]/)",
    )
    p.add_argument(
        "--reps", type=int, help="interleaved repetitions per side (default 30; 7 with --quick)"
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the records of an existing DIR/results.json whose ids this run does not "
        "redo (to add case groups to a committed run)",
    )
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--seed", type=int, default=0)
    return p


def device_slug(env: dict) -> str:
    if env["backend"] == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-") or env["backend"]


def default_out(env: dict, dtype: str, quick: bool) -> Path:
    name = device_slug(env)
    if dtype != "float32":
        name += f"-{dtype}"
    if quick:
        name += "-quick"
    return Path(__file__).resolve().parent / "results" / name


def machine_load() -> dict:
    """Load average and core count, so a report can say when the machine was busy."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"loadavg": list(load) if load else None, "cpu_count": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    modules = harness.load_case_modules()
    cases = harness.select(args.cases, quick=args.quick)
    if args.list:
        for c in cases:
            print(f"{c.id:32s} {c.title}")
        return 0
    if not cases:
        print(f"no case matches {args.cases!r}", file=sys.stderr)
        return 2
    env = harness.environment()
    reps = args.reps if args.reps is not None else (7 if args.quick else 30)
    ctx = harness.Context(
        dtype=jnp.dtype(args.dtype),
        quick=args.quick,
        backend=env["backend"],
        device=jax.devices()[0],
        reps=reps,
        seed=args.seed,
        budget_s=0.0 if (args.quick or args.reps is not None) else 6.0,
    )
    out = Path(args.out) if args.out else default_out(env, args.dtype, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"jaxbp benchmarks: {len(cases)} cases, backend {env['backend']} ({env['device']}), "
        f"dtype {args.dtype}, {reps} interleaved reps, jax {env['jax']}, "
        f"matmul precision {env['matmul_precision']} -> {out}",
        flush=True,
    )
    load_before = machine_load()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t_start = time.perf_counter()
    dot_size = 1024 if args.quick else (2048 if env["backend"] == "cpu" else 8192)
    records = []
    with Progress(sys.stdout, "case") as bar:
        bar(0, len(cases), f"measuring the roofline (jnp.dot {dot_size}³)", begin=True)
        dot = harness.measure_dot(ctx, dot_size, reps=5 if args.quick else 10)
        ctx.dot_flops_per_s = dot["flops_per_s"]
        bar.write(
            f"  roofline: jnp.dot {dot_size}³ {dot['time_s'] * 1e3:.2f} ms = "
            f"{dot['flops_per_s'] / 1e9:.1f} GFLOP/s"
        )
        for k, case in enumerate(cases, 1):
            bar(k - 1, len(cases), case.id)
            t0 = time.perf_counter()
            rec = harness.run_case(case, ctx, env)
            rec["wall_s"] = time.perf_counter() - t0
            rec["run_started_utc"] = started
            rec["machine_load"] = machine_load()["loadavg"]
            records.append(rec)
            bar(k, len(cases), case.id)
            bar.write(f"  [{k}/{len(cases)}] {progress_line(rec)}")
    wall = time.perf_counter() - t_start
    load_after = machine_load()
    result = {
        "environment": env,
        "dtype": args.dtype,
        "quick": args.quick,
        "reps": reps,
        "reps_note": "at least this many interleaved pairs; cheap cases get up to 4x as many "
        "within ~6 s (times.A.n in each record)"
        if ctx.budget_s
        else "exactly this many interleaved pairs",
        "case_modules": modules,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "started_utc": started,
        "wall_s": wall,
        "machine": {"before": load_before, "after": load_after},
        "roofline_dot": dot,
        "records": records,
    }
    if args.merge and (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
        ids = {r["id"] for r in records}
        kept = [r for r in old.get("records", []) if r["id"] not in ids]
        order = {i: k for k, c in enumerate(harness.CASES) for i in (c.quick_id, c.id) if i}
        result["records"] = sorted(kept + records, key=lambda r: order.get(r["id"], len(order)))
        result["merged_runs"] = old.get("merged_runs", [old.get("started_utc")]) + [started]
    (out / "results.json").write_text(json.dumps(result, indent=1, default=_json_default))
    from benchmarks import report

    report.write_report(result, out)
    if not args.no_plots:
        for path in report.write_plots(result, out):
            print(f"  plot: {path}")
    failed = [r["id"] for r in records if r["status"] in ("failed", "error")]
    missed = [r["id"] for r in records if r.get("met") is False and r["status"] == "ok"]
    print(
        f"done in {wall:.0f} s: {len(records)} cases, {len(failed)} failed, "
        f"{len(missed)} missed targets -> {out / 'report.md'}"
    )
    return 1 if failed else 0


def _json_default(obj):
    try:
        return float(obj)
    except (TypeError, ValueError):
        return str(obj)


def progress_line(rec: dict) -> str:
    if rec["status"] != "ok":
        return f"{rec['id']:28s} {rec['status'].upper()}: {rec.get('reason', '')}"
    m = rec["metrics"]
    parts = [f"{rec['id']:28s}"]
    if "time_a" in m and "time_b" in m:
        parts.append(f"A {m['time_a'] * 1e3:8.3f} ms  B {m['time_b'] * 1e3:8.3f} ms")
    r = rec.get("ratio")
    if r:
        parts.append(f"A/B {r['median']:.3f} [{r['p25']:.3f}, {r['p75']:.3f}]")
    if "roofline" in m:
        parts.append(f"roofline {m['roofline']:.2f}")
    for t in rec["targets"]:
        mark = "ok" if t["met"] else "MISS"
        parts.append(f"{t['metric']} {t['op']} {t['value']:g}: {mark}")
    return "  ".join(parts)
