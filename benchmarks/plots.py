"""PNG plots of a run's ``results.json`` (``python -m benchmarks.report DIR`` redraws them).

Two kinds of case group, drawn differently:

* **sweeps** (:data:`SWEEPS`: P4 over ``c``, P5 over ``v``, P11 and P11-bwd over ``t``): one
  size grows, so lines — median time per call (log–log, with a grey ``∝ size^k`` guide where
  the growth is the point), the A/B ratio with its interquartile range, and XLA's temporary
  memory per side (log–log);
* **discrete configurations** (every other group with timed sides): grouped bars, one group
  per configuration and one bar per side (median time, the interquartile range as the error
  bar), and below them each configuration's A/B ratio against its target.

``p4_softmax_cost_vs_c.png`` adds the softmax backward's cost per row against ``c`` with the
explicit Jacobian's ``O(c²)`` beside the VJP's ``O(c)``.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["SWEEPS", "write_plots", "plot_softmax"]

# group -> (the size that grows, the power of the growth drawn as a guide or None, whether
# to draw the temporary memory: where its growth is the point)
SWEEPS: dict[str, tuple[str, int | None, bool]] = {
    "P4": ("c", 1, False),
    "P5": ("v", 1, True),
    "P11": ("t", 2, True),
    "P11-bwd": ("t", 2, True),
}
SWEEP_TITLES = {
    "P4": "softmax backward: hand-written VJP vs jax.vjp, over the classes c",
    "P5": "fused linear + softmax-CE vs the full (n, v) logits, over the vocabulary v",
    "P11": "attention forward + backward vs jax.vjp of plain attention, over t",
    "P11-bwd": "attention backward vs the backward of jax.vjp, over t",
}
_DPI = 110


def write_plots(result: dict, out: Path) -> list[Path]:
    """Every group's PNG (``<group>_time.png``) and P4's cost per row; ``[]`` without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    recs = [r for r in result["records"] if r["status"] == "ok" and "time_a" in r["metrics"]]
    groups: dict[str, list[dict]] = {}
    for r in recs:
        groups.setdefault(r["case"], []).append(r)
    paths = []
    for group, rs in groups.items():
        if group in SWEEPS and len({r["shapes"].get(SWEEPS[group][0]) for r in rs}) > 1:
            fig = _sweep(group, rs, result, plt)
        else:
            fig = _bars(group, rs, result, plt)
        path = Path(out) / f"{group.lower()}_time.png"
        fig.savefig(path, dpi=_DPI, metadata={"Software": None})
        plt.close(fig)
        paths.append(path)
    p4 = plot_softmax(result, Path(out), plt)
    if p4 is not None:
        paths.append(p4)
    return paths


def _sides(r: dict) -> list[tuple[str, str]]:
    """``(key in r["times"], label)`` of every timed side: A, B, then any others."""
    la, lb = r.get("labels") or ["A", "B"]
    out = [("A", la), ("B", lb)]
    out += [(k, k.replace("_", " ")) for k in r.get("times", {}) if k not in ("A", "B")]
    return out


def _quartiles(r: dict, side: str) -> tuple[float, float, float]:
    t = r["times"][side]
    return t["median"], t["p25"], t["p75"]


def _subtitle(result: dict) -> str:
    env = result["environment"]
    return f"{env['device']}, {result['dtype']}; bars and error bars: median and IQR"


def _varying(rs: list[dict]) -> list[str]:
    """The shapes that tell a group's configurations apart, less a number that a list shows
    in every configuration (``width`` beside the layer ``sizes``)."""
    union = list(dict.fromkeys(k for r in rs for k in r["shapes"]))  # records may differ
    keys = [k for k in union if len({repr(r["shapes"].get(k)) for r in rs}) > 1]

    def shown(k, r):
        lists = [r["shapes"][j] for j in keys if isinstance(r["shapes"].get(j), list)]
        return any(r["shapes"].get(k) in values for values in lists)

    return [k for k in keys if any(isinstance(r["shapes"].get(k), list) for r in rs)
            or not all(shown(k, r) for r in rs)]  # fmt: skip


def _config_label(r: dict, keys: list[str]) -> str:
    """One line a shape: ``n=128``, a list such as the layer sizes as ``784-512-512-10``."""
    parts = []
    for k in keys:
        v = r["shapes"].get(k)
        if v is None:  # a shape this configuration does not have (an MLP beside a GPT)
            continue
        if isinstance(v, list):
            parts.append("-".join(map(str, v)))
        else:
            parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return "\n".join(parts) or r["id"].split("/", 1)[-1]


def _common_title(rs: list[dict]) -> str:
    """The records' title, or what their titles share: ``DP-SGD step ÷ plain step
    (clipping)`` and ``… (with noise)`` give ``DP-SGD step ÷ plain step``."""
    import os

    titles = {r["title"] for r in rs}
    if len(titles) == 1:
        return titles.pop()
    return os.path.commonprefix(sorted(titles)).rstrip(" (,:") or rs[0]["title"]


def _targets(rs: list[dict]) -> list[float]:
    return sorted({t["value"] for r in rs for t in r["targets"] if t["metric"] == "ratio"})


def _bars(group: str, rs: list[dict], result: dict, plt):
    """Discrete configurations: grouped bars of each side's time, then the A/B ratios."""
    import numpy as np

    keys = _varying(rs)
    sides: list[tuple[str, str]] = []
    for r in rs:
        sides += [s for s in _sides(r) if s[0] not in [k for k, _ in sides]]
    k, width = len(rs), 0.8 / len(sides)
    fig, (ax, axr) = plt.subplots(
        2, 1, figsize=(max(6.4, 1.0 + k * (0.5 + 0.35 * len(sides))), 6.6), sharex=True,
        gridspec_kw={"height_ratios": [3, 2]}, layout="constrained",
    )  # fmt: skip
    x = np.arange(k)
    lo_hi = []
    for j, (side, label) in enumerate(sides):
        pos, med, err = [], [], [[], []]
        for i, r in enumerate(rs):
            if side in r.get("times", {}):
                m, p25, p75 = _quartiles(r, side)
                pos.append(x[i] + (j - (len(sides) - 1) / 2) * width)
                med.append(m * 1e3)
                err[0].append((m - p25) * 1e3)
                err[1].append((p75 - m) * 1e3)
        ax.bar(pos, med, width, yerr=err, capsize=2, label=label, color=f"C{j}",
               error_kw={"lw": 0.8})  # fmt: skip
        lo_hi += med
    if lo_hi and max(lo_hi) / max(min(lo_hi), 1e-12) > 30:
        ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms)")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_title(f"{group}: {_common_title(rs)}\n{_subtitle(result)}", fontsize=9)

    for i, r in enumerate(rs):
        q = r["ratio"]
        own = [t["met"] for t in r["targets"] if t["metric"] == "ratio"]  # a ratio target
        c = "0.4" if not own else ("C2" if all(own) else "C3")
        axr.errorbar(x[i], q["median"], yerr=[[q["median"] - q["p25"]], [q["p75"] - q["median"]]],
                     fmt="o", color=c, ms=6, capsize=4)  # fmt: skip
        axr.annotate(f"{q['median']:.3f}", (x[i], q["median"]), xytext=(7, -3),
                     textcoords="offset points", fontsize=7)  # fmt: skip
    axr.axhline(1.0, color="0.3", lw=0.8)
    for t in _targets(rs):
        axr.axhline(t, color="C3", ls=":", lw=1.2, label=f"target A/B ≤ {t:g}")
    axr.set_ylabel("A/B per pair\n(median, IQR)", fontsize=8)
    axr.set_title(f"A/B = {sides[0][1]} ÷ {sides[1][1]}", fontsize=8)
    spread = [r["ratio"]["p25"] for r in rs] + [r["ratio"]["p75"] for r in rs] + [1.0]
    if max(spread) / max(min(spread), 1e-12) > 10:  # ratios far below 1: a log scale
        axr.set_yscale("log")
    axr.margins(x=0.5 / k, y=0.2)
    axr.grid(True, axis="y", alpha=0.3)
    if _targets(rs):
        axr.legend(fontsize=7, loc="lower right")
    axr.set_xticks(x, [_config_label(r, keys) for r in rs], fontsize=7)
    axr.set_xlabel("configuration (green: ratio target met, red: missed, grey: none)", fontsize=8)
    return fig


def _descriptor(r: dict, key: str) -> str:
    """What tells a sweep's series apart: its id without the group and the size,
    ``P11/step-store-t256`` → ``step-store``."""
    tail = r["id"].split("/", 1)[-1]
    return re.sub(rf"-?{re.escape(key)}{r['shapes'][key]}$", "", tail)


def _sweep(group: str, rs: list[dict], result: dict, plt):
    """One size grows: time (log–log), the A/B ratio, temporary memory (log–log)."""
    key, power, has_memory = SWEEPS[group]
    series: dict[str, list[dict]] = {}
    for r in rs:
        series.setdefault(_descriptor(r, key), []).append(r)
    # When the batch n changes along the sweep (P4 keeps n·c about fixed), time per row.
    per_row = len({r["shapes"].get("n") for r in rs}) > 1
    scale = {id(r): (1e6 / r["shapes"]["n"] if per_row else 1e3) for r in rs}
    rows = 3 if has_memory else 2
    fig, axes = plt.subplots(
        rows, 1, figsize=(7.0, 2.5 * rows + 1.4), sharex=True, layout="constrained",
        gridspec_kw={"height_ratios": [3, 2, 2][:rows]},
    )  # fmt: skip
    ax, axr = axes[0], axes[1]
    label_count: dict[str, int] = {}
    for members in series.values():
        for _, label in _sides(members[0]):
            label_count[label] = label_count.get(label, 0) + 1
    styles = {"A": ("o", "-"), "B": ("s", "--")}
    colour = 0
    anchor = None
    for desc, members in series.items():
        members.sort(key=lambda r: r["shapes"][key])
        xs = [r["shapes"][key] for r in members]
        for side, label in _sides(members[0]):
            timed = [(x, r) for x, r in zip(xs, members, strict=True) if side in r["times"]]
            pts = [(x, *(v * scale[id(r)] for v in _quartiles(r, side))) for x, r in timed]
            if not pts:
                continue
            px, med, p25, p75 = zip(*pts, strict=True)
            marker, ls = styles.get(side, ("^", ":"))
            name = label + (f"  [{desc}]" if label_count[label] > 1 and desc else "")
            ax.errorbar(px, med,
                        yerr=[[m - a for m, a in zip(med, p25, strict=True)],
                              [b - m for m, b in zip(med, p75, strict=True)]],
                        marker=marker, ls=ls, ms=4, capsize=2, color=f"C{colour}",
                        label=name)  # fmt: skip
            if has_memory and side in ("A", "B"):
                mem = [((r.get("memory") or {}).get(side) or {}).get("temp_size_in_bytes")
                       for r in members]  # fmt: skip
                mp = [(x, m / 2**20) for x, m in zip(xs, mem, strict=True) if m]
                if mp:
                    axes[2].plot(*zip(*mp, strict=True), marker=marker, ls=ls, ms=4,
                                 color=f"C{colour}", label=name)  # fmt: skip
            if side == "B" and anchor is None:
                anchor = (px[-1], med[-1])
            colour += 1
        q = [r["ratio"] for r in members]
        line = axr.errorbar(
            xs, [v["median"] for v in q], marker="o", ms=4, capsize=3, label=desc or "A/B",
            yerr=[[v["median"] - v["p25"] for v in q], [v["p75"] - v["median"] for v in q]],
        )  # fmt: skip
        for t in _targets(members):
            tint = line.lines[0].get_color() if len(series) > 1 else "C3"
            axr.axhline(t, color=tint, ls=":", lw=1.2,
                        label=f"{desc + ' ' if desc else ''}target A/B ≤ {t:g}")  # fmt: skip
    xs_all = sorted({r["shapes"][key] for r in rs})
    if power and anchor is not None:
        x1, y1 = anchor
        ax.plot(xs_all, [y1 * (x / x1) ** power for x in xs_all], color="0.5", ls=":", lw=1.2,
                label=f"∝ {key}{'²' if power == 2 else ''} (guide)")  # fmt: skip
    axr.axhline(1.0, color="0.3", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylabel("median time per row (µs)" if per_row else "median time per call (ms)")
    ax.legend(fontsize=6.5)
    axr.set_ylabel("A/B per pair\n(median, IQR)", fontsize=8)
    axr.legend(fontsize=6.5)
    if has_memory:
        axes[2].set_yscale("log")
        axes[2].set_ylabel("XLA temporary\nmemory (MiB)", fontsize=8)
        axes[2].legend(fontsize=6.5)
    for a in axes:
        a.grid(True, which="both", alpha=0.3)
    axes[-1].set_xticks(xs_all, [str(x) for x in xs_all], fontsize=7)
    axes[-1].minorticks_off()
    axes[-1].set_xlabel(f"{key} (log scale)")
    title = SWEEP_TITLES.get(group, rs[0]["title"])
    env = result["environment"]
    ax.set_title(f"{group}: {title}\n{env['device']}, {result['dtype']}; error bars: IQR",
                 fontsize=9)  # fmt: skip
    return fig


def plot_softmax(result: dict, out: Path, plt) -> Path | None:
    """P4: softmax backward cost per row vs c, log–log, with O(c) and O(c²) guides."""
    rs = [
        r
        for r in result["records"]
        if r["case"] == "P4" and r["status"] == "ok" and "time_a" in r["metrics"]
    ]
    if len(rs) < 2:
        return None
    rs.sort(key=lambda r: r["shapes"]["c"])
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    la, lb = rs[0].get("labels", ["A", "B"])
    for key, label, style in (
        ("time_a", la, "o-"),
        ("time_b", lb, "s--"),
        ("time_explicit_jacobian", "explicit Jacobian Jᵀg, J (n,c,c)", "^-"),
    ):
        pts = [
            (r["shapes"]["c"], r["metrics"][key] / r["shapes"]["n"] * 1e9)
            for r in rs
            if key in r["metrics"]
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label)
    cs = [r["shapes"]["c"] for r in rs]
    a0 = rs[-1]["metrics"]["time_a"] / rs[-1]["shapes"]["n"] * 1e9 / cs[-1]
    ax.plot(cs, [a0 * c for c in cs], ":", color="gray", label="∝ c")
    ex = [r for r in rs if "time_explicit_jacobian" in r["metrics"]]
    if ex:
        e = ex[-1]
        e0 = e["metrics"]["time_explicit_jacobian"] / e["shapes"]["n"] * 1e9 / e["shapes"]["c"] ** 2
        ax.plot(cs, [e0 * c * c for c in cs], "-.", color="gray", label="∝ c²")
        cut = [r["shapes"]["c"] for r in rs if "explicit_jacobian" in r.get("skipped_sides", {})]
        if cut:
            ax.axvline(min(cut), color="red", alpha=0.3)
            ax.text(min(cut), ax.get_ylim()[0] * 2, " explicit J skipped\n (too large)", fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("classes c")
    ax.set_ylabel("backward time per row (ns)")
    env = result["environment"]
    ax.set_title(
        f"P4 softmax backward cost vs c: VJP O(c), explicit Jacobian O(c²)\n"
        f"{env['device']}, {result['dtype']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "p4_softmax_cost_vs_c.png"
    fig.savefig(path, dpi=_DPI, metadata={"Software": None})
    plt.close(fig)
    return path
