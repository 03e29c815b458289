"""``report.md`` and PNG plots from ``results.json`` (``python -m benchmarks.report DIR``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .plots import write_plots

__all__ = ["write_report", "write_plots"]


def _ms(t: float | None) -> str:
    if t is None:
        return "–"
    if t < 1e-3:
        return f"{t * 1e6:.1f} µs"
    return f"{t * 1e3:.3f} ms"


def _bytes(b: int | None) -> str:
    if b is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def _shapes(s: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items())


def _target_cells(rec: dict) -> tuple[str, str]:
    if not rec["targets"]:
        return "–", "–"
    targets, marks = [], []
    for t in rec["targets"]:
        v = t["measured"]
        val = "–" if v is None else f"{v:.3f}"
        targets.append(f"{t['metric']} {t['op']} {t['value']:g}")
        marks.append(f"{val} ✅" if t["met"] else f"{val} ❌ **miss**")
    return "<br>".join(targets), "<br>".join(marks)


def _cpu_ratio(r: dict) -> str:
    c = r.get("cpu_ratio")
    if not c or c["median"] != c["median"]:  # absent or NaN
        return "–"
    return f"{c['median']:.3f} [{c['p25']:.3f}, {c['p75']:.3f}]"


def write_report(result: dict, out: Path) -> Path:
    env = result["environment"]
    recs = result["records"]
    lines = [
        f"# jaxbp benchmarks — {env['backend']} ({env['device']}), {result['dtype']}",
        "",
        f"- jax {env['jax']}, jaxlib {env['jaxlib']}; {env['device_count']} device(s); "
        f"matmul precision: {env['matmul_precision']} ({env['matmul_precision_note']})",
        f"- started {result['started_utc']}, wall {result['wall_s']:.0f} s, "
        f"{result['reps']} interleaved repetitions per side"
        + (f" ({result['reps_note']})" if result.get("reps_note") else "")
        + (" (**--quick**: small sizes, few reps; not for claims)" if result["quick"] else ""),
        f"- roofline: `jnp.dot` {result['roofline_dot']['size']}³ in "
        f"{_ms(result['roofline_dot']['time_s'])} = "
        f"{result['roofline_dot']['flops_per_s'] / 1e9:.1f} GFLOP/s",
    ]
    if result.get("merged_runs"):
        lines.append(
            "- records merged from runs started at "
            + ", ".join(str(t) for t in result["merged_runs"])
            + " (`--merge`; each record keeps its own `run_started_utc` and load); the header "
            "lines describe the last run"
        )
    lines += [f"- {note}" for note in result.get("notes", [])]
    mach = result.get("machine", {})
    la = (mach.get("before") or {}).get("loadavg")
    lb = (mach.get("after") or {}).get("loadavg")
    if la:
        cores = mach["before"].get("cpu_count")
        lines.append(
            f"- machine load (1/5/15-min load average) before {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}"
            + (f", after {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}" if lb else "")
            + f" on {cores} cores"
        )
        if env["backend"] == "cpu" and cores and max(la[0], (lb or la)[0]) > 0.5 * cores:
            lines.append(
                "- **the machine was loaded by other work during this run**: absolute times "
                "are disturbed; ratios are interleaved A B A B … and less so, but read the "
                "spread."
            )
    if env["backend"] != "gpu":
        lines.append(
            "- no GPU figures in this report: it was run on "
            f"{env['backend']}. GPU results go to `benchmarks/results/<gpu-name>/` when the "
            "suite is run on one."
        )
    lines += [
        "",
        "A = the jaxbp side (hand-written rules), B = the side it is compared with; ratio = "
        "median of the per-pair A/B times, with its interquartile range [p25, p75]. Both "
        "sides agree numerically before they are timed. CPU-time A/B: the same pairs measured "
        "in this process's CPU seconds (all threads), less disturbed by other processes on a "
        "shared machine; targets are judged on the wall-time ratio. Memory = XLA's compiled "
        "temporary "
        "buffer size (`memory_analysis().temp_size_in_bytes`).",
        "",
        "| id | shapes | A | B | A/B [IQR] | CPU-time A/B | compile A / B | temp mem A / B "
        "| GFLOP/s A (roofline) | target | measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        if r["status"] != "ok":
            lines.append(
                f"| {r['id']} | {_shapes(r.get('shapes', {}))} | | | **{r['status']}** | | | | | "
                f"{_target_cells(r)[0]} | {r.get('reason', '')} |"
            )
            continue
        m = r["metrics"]
        if "time_a" not in m:  # a Custom record
            tcell, mcell = _target_cells(r)
            extra = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()
            )
            lines.append(
                f"| {r['id']} | {_shapes(r.get('shapes', {}))} | {extra} | | | | | | | "
                f"{tcell} | {mcell} |"
            )
            continue
        ratio = r["ratio"]
        comp = r.get("compile", {})
        cA = comp.get("A", {}).get("compile_s")
        cB = comp.get("B", {}).get("compile_s")
        memA = (r["memory"].get("A") or {}).get("temp_size_in_bytes")
        memB = (r["memory"].get("B") or {}).get("temp_size_in_bytes")
        fl = m.get("flops_per_s")
        flcell = "–" if fl is None else f"{fl / 1e9:.1f}"
        if "roofline" in m:
            flcell += f" ({m['roofline']:.2f})"
        tcell, mcell = _target_cells(r)
        others = [k[5:] for k in m if k.startswith("time_") and k not in ("time_a", "time_b")]
        extra = "".join(f"<br>{o}: {_ms(m['time_' + o])}" for o in others)
        for name, why in r.get("skipped_sides", {}).items():
            extra += f"<br>{name}: skipped ({why})"
        lines.append(
            f"| {r['id']} | {_shapes(r['shapes'])} | {_ms(m['time_a'])} | {_ms(m['time_b'])}"
            f"{extra} | {ratio['median']:.3f} [{ratio['p25']:.3f}, {ratio['p75']:.3f}] | "
            f"{_cpu_ratio(r)} | "
            f"{cA:.2f} / {cB:.2f} s | {_bytes(memA)} / {_bytes(memB)} | {flcell} | "
            f"{tcell} | {mcell} |"
        )
    misses = [r for r in recs if r.get("met") is False]
    n_targeted = sum(1 for r in recs if r["targets"])
    missed = ": " + ", ".join(r["id"] for r in misses) if misses else "."
    lines += ["", f"**{len(misses)} of {n_targeted} targeted cases miss their target**{missed}"]
    notes = [(r["id"], r["notes"]) for r in recs if r.get("notes")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {i}: {n}" for i, n in notes]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    d = Path(sys.argv[1])
    res = json.loads((d / "results.json").read_text())
    print(write_report(res, d))
    for p in write_plots(res, d):
        print(p)
