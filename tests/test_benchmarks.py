"""Smoke tests of the benchmark harness at tiny sizes (no timing assertions)."""

import dataclasses
import functools
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

import jaxbp
from benchmarks import cli, harness
from benchmarks import plots as bench_plots
from benchmarks.cases_core import build_mlp, build_softmax, mlp_flops


@pytest.fixture
def ctx():
    return harness.Context(
        dtype=jnp.dtype(jnp.float32), quick=True, backend=jax.default_backend(),
        device=jax.devices()[0], reps=3,
    )  # fmt: skip


@pytest.fixture
def tiny_cases():
    """Register two tiny cases for the duration of a test, then remove them."""
    added = [
        harness.register(
            harness.Case(
                id="TEST/mlp-n8-w16",
                group="TEST",
                title="tiny MLP step",
                build=functools.partial(build_mlp, n=8, width=16),
                targets=(harness.Target("ratio", "<=", 1e9),),
            )
        ),
        harness.register(
            harness.Case(
                id="TEST/softmax-c8",
                group="TEST-softmax",
                title="tiny softmax backward",
                build=functools.partial(build_softmax, c=8, n=4),
                targets=(harness.Target("ratio", "<=", 1e-9),),  # cannot be met
            )
        ),
    ]
    yield added
    for case in added:
        harness.CASES.remove(case)


def test_run_writes_results_json_with_one_record_per_case_and_report(tmp_path, tiny_cases, capsys):
    rc = cli.main(["--quick", "--cases", "TEST/", "--reps", "2", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out  # not a terminal: plain lines with the elapsed time and ETA
    assert re.search(r"\[1/2\] TEST/\S+ .*\[elapsed \d+:\d\d, ETA \d+:\d\d\]", out), out
    assert "measuring the roofline" in out and "\r" not in out
    result = json.loads((tmp_path / "results.json").read_text())
    env = result["environment"]
    for key in ("backend", "device", "jax", "jaxlib", "matmul_precision"):
        assert env[key]
    assert result["roofline_dot"]["flops_per_s"] > 0
    recs = {r["id"]: r for r in result["records"]}
    assert set(recs) == {"TEST/mlp-n8-w16", "TEST/softmax-c8"}
    for rec in recs.values():
        assert rec["status"] == "ok", rec.get("reason")
        assert rec["agreement"] == "checked"
        for key in ("case", "shapes", "dtype", "backend", "device", "jax", "jaxlib"):
            assert key in rec
        assert rec["times"]["A"]["n"] == rec["times"]["B"]["n"] == 2
        assert rec["ratio"]["p25"] <= rec["ratio"]["median"] <= rec["ratio"]["p75"]
        assert set(rec["compile"]) >= {"A", "B"}
        assert rec["compile"]["A"]["compile_s"] > 0
    mlp = recs["TEST/mlp-n8-w16"]
    assert mlp["flops"] == mlp_flops((16, 16, 16, 10), 8)
    assert mlp["targets"][0]["met"] is True
    assert recs["TEST/softmax-c8"]["targets"][0]["met"] is False
    # The explicit-Jacobian route is timed beside the two sides.
    assert "time_explicit_jacobian" in recs["TEST/softmax-c8"]["metrics"]
    report = (tmp_path / "report.md").read_text()
    assert "TEST/mlp-n8-w16" in report and "ratio <= 1e-09" in report
    assert "**miss**" in report
    if env["backend"] != "gpu":
        assert "no GPU figures" in report


def test_agreement_check_fails_a_deliberately_wrong_rule_before_timing(ctx):
    def wrong_softmax_bwd(res, g):
        (s,) = res
        return s * g  # forgets the −s⟨s, g⟩ term

    def build(ctx):
        pair = build_softmax(ctx, c=8, n=4)
        pair.candidate = jax.jit(wrong_softmax_bwd)
        return pair

    case = harness.Case(id="TEST/wrong", group="TEST", title="wrong rule", build=build)
    rec = harness.run_case(case, ctx, harness.environment())
    assert rec["status"] == "failed"
    assert "disagreement" in rec["reason"]
    assert "times" not in rec  # never timed
    assert rec["met"] is None


def test_wrong_mlp_gradient_is_caught_and_target_counts_as_missed(ctx):
    model = jaxbp.MLP((16, 16, 16, 10))
    manual = jaxbp.value_and_grad(model).jitted

    @jax.jit
    def off_by_one_percent(*args):
        loss, grads = manual(*args)
        return loss, jax.tree.map(lambda t: t * 1.01, grads)

    case = harness.Case(
        id="TEST/wrong-mlp",
        group="TEST",
        title="wrong step",
        build=functools.partial(build_mlp, n=8, width=16, manual=off_by_one_percent),
        targets=(harness.Target("ratio", "<=", 1e9),),
    )
    rec = harness.run_case(case, ctx, harness.environment())
    assert rec["status"] == "failed"
    assert rec["targets"][0]["met"] is False


def test_case_ids_select_by_glob_prefix_or_regex(tiny_cases):
    ids = lambda pat: [c.id for c in harness.select(pat, quick=False) if c.id.startswith("TEST")]  # noqa: E731
    assert ids("TEST/mlp*") == ["TEST/mlp-n8-w16"]
    assert ids("TEST/") == ["TEST/mlp-n8-w16", "TEST/softmax-c8"]
    assert ids("^TEST/(soft)") == ["TEST/softmax-c8"]
    assert ids("nothing-like-this") == []


def test_duplicate_case_id_is_refused(tiny_cases):
    with pytest.raises(ValueError, match="already registered"):
        harness.register(tiny_cases[0])


# ------------------------------------------------- plots, from the committed CPU results

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks/results/cpu/results.json"


@pytest.fixture(scope="module")
def committed():
    pytest.importorskip("matplotlib")
    return json.loads(RESULTS.read_text())


def _ok(result, group):
    return [r for r in result["records"] if r["case"] == group and r["status"] == "ok"]


def test_plots_from_the_committed_results_write_one_png_per_timed_group(committed, tmp_path):
    paths = bench_plots.write_plots(committed, tmp_path)
    timed = {r["case"] for r in committed["records"]
             if r["status"] == "ok" and "time_a" in r["metrics"]}  # fmt: skip
    names = {p.name for p in paths}
    assert names == {f"{g.lower()}_time.png" for g in timed} | {"p4_softmax_cost_vs_c.png"}
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_discrete_configurations_are_grouped_bars_with_their_interquartile_range(committed):
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    rs = _ok(committed, "P10")
    fig = bench_plots._bars("P10", rs, committed, plt)
    ax, ratio_ax = fig.axes
    assert ax.get_xscale() == "linear"  # categories, not an "n" axis
    labels = [t.get_text() for t in ratio_ax.get_xticklabels()]
    # one label a configuration, naming the shapes that differ between them
    assert labels == [
        "\n".join(f"{k}={r['shapes'][k]}" for k in ("n", "t", "d", "h", "v")) for r in rs
    ]
    bars_of = [c for c in ax.containers if isinstance(c, BarContainer)]  # a side each
    sides = ["A", "B", *(k for k in rs[0]["times"] if k not in ("A", "B"))]
    assert len(bars_of) == len(sides)
    for bars, side in zip(bars_of, sides, strict=True):
        heights = [b.get_height() for b in bars.patches]
        assert heights == pytest.approx([r["times"][side]["median"] * 1e3 for r in rs])
        segments = bars.errorbar.lines[2][0].get_segments()
        drawn = [v for s in segments for v in s[:, 1]]
        iqr = [r["times"][side][q] * 1e3 for r in rs for q in ("p25", "p75")]
        assert drawn == pytest.approx(iqr)
    plt.close(fig)


@pytest.mark.parametrize("group, key, panels", [("P4", "c", 2), ("P11", "t", 3), ("P5", "v", 3)])
def test_sweeps_are_log_scaled_lines_over_their_size(committed, group, key, panels):
    import matplotlib.pyplot as plt

    rs = _ok(committed, group)
    fig = bench_plots._sweep(group, [r for r in rs if "time_a" in r["metrics"]], committed, plt)
    assert len(fig.axes) == panels  # time, A/B ratio, and memory where its growth is the point
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert fig.axes[-1].get_xlabel() == f"{key} (log scale)"
    if group == "P4":  # n changes with c: the time per row, in µs
        line = ax.containers[0].lines[0]
        rs = sorted(rs, key=lambda r: r["shapes"]["c"])
        assert list(line.get_xdata()) == [r["shapes"]["c"] for r in rs]
        expected = [r["times"]["A"]["median"] / r["shapes"]["n"] * 1e6 for r in rs]
        assert list(line.get_ydata()) == pytest.approx(expected)
        assert "per row" in ax.get_ylabel()
    plt.close(fig)


# Size letters of case ids and titles, and the build keyword each names.
SIZE_KEYWORDS = {"n": "n", "w": "width", "v": "v", "d": "d", "c": "c", "t": "t", "i": "i"}


def _named_sizes(case):
    """``{keyword: value}`` of every size the id (``n1024``, ``w512``) or the title
    (``n 4096 d 512``) names."""
    import re

    named = {}
    for letter, value in re.findall(r"(?:^|[/-])([a-z])(\d+)(?=$|-)", case.id.split("/", 1)[1]):
        named.setdefault(("id", SIZE_KEYWORDS.get(letter)), int(value))
    for letter, value in re.findall(r"\b([ndvtc]) (\d+)\b", case.title):
        named.setdefault(("title", SIZE_KEYWORDS.get(letter)), int(value))
    return {k: v for k, v in named.items() if k[1] is not None}


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_every_case_id_and_title_name_the_sizes_that_run(quick):
    harness.load_case_modules()
    checked = 0
    for case in harness.select(None, quick=quick):
        build = case.quick_build if quick and case.quick_build else case.build  # what runs
        if not isinstance(build, functools.partial):
            continue
        runs = build.keywords
        for (where, keyword), value in _named_sizes(case).items():
            if keyword in runs:
                assert runs[keyword] == value, (
                    f"{case.id}: its {where} names {keyword} {value}, the build runs "
                    f"{keyword} {runs[keyword]} ({case.title!r})"
                )
                checked += 1
    assert checked > 20


def test_a_quick_case_runs_lists_and_records_under_its_quick_id(ctx):
    case = harness.Case(
        id="TEST/softmax-c64",
        group="TEST",
        title="softmax backward, c 64",
        build=functools.partial(build_softmax, c=64, n=4),
        quick_build=functools.partial(build_softmax, c=8, n=4),
        quick_id="TEST/softmax-c8",
        quick_title="softmax backward, c 8",
    )
    harness.register(case)
    try:
        for pattern in ("TEST/softmax-c64", "TEST/softmax-c8", "TEST/"):
            assert [c.id for c in harness.select(pattern, quick=True)] == ["TEST/softmax-c8"]
        assert [c.id for c in harness.select("TEST/", quick=False)] == ["TEST/softmax-c64"]
        record = harness.run_case(case, ctx, harness.environment())  # ctx.quick is True
        assert record["id"] == "TEST/softmax-c8" and record["title"] == "softmax backward, c 8"
        assert record["status"] == "ok", record
        with pytest.raises(ValueError, match="'TEST/softmax-c8' is already registered"):
            harness.register(dataclasses.replace(case, id="TEST/softmax-c8", quick_id=None))
    finally:
        harness.CASES[:] = [c for c in harness.CASES if not c.id.startswith("TEST/")]


# ------------------------------------------------- P14: curvature-vector products


@pytest.mark.parametrize("product", ["ggn", "hvp", "kfac"])
@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_curvature_cases_build_agree_with_the_twin_and_time(ctx, product, model):
    from benchmarks import cases_curvature as cc

    if model == "mlp":
        build = functools.partial(cc.build_mlp, product=product, n=8, sizes=(12, 8, 5))
    else:
        build = functools.partial(cc.build_gpt, product=product, n=2, t=8, d=16, heads=2,
                                  layers=1)  # fmt: skip
    case = harness.Case(id=f"TEST/{product}-{model}", group="TEST", title="tiny", build=build)
    rec = harness.run_case(case, ctx, harness.environment())
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["agreement"] == "checked" and rec["times"]["A"]["n"] == 3
    assert rec["shapes"]["product"] == product and rec["shapes"]["model"] == model


@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_curvature_case_fails_when_the_hessian_stands_in_for_the_ggn(ctx, model):
    """A planted mistake: H·u is not G·u (the logits' own curvature), and the agreement
    check sees it before timing."""
    from benchmarks import cases_curvature as cc

    def build(ctx):
        if model == "mlp":
            pair = cc.build_mlp(ctx, "ggn", n=8, sizes=(12, 8, 5))
            pair.candidate = jaxbp.hessian_vector_product(jaxbp.MLP((12, 8, 5))).jitted
        else:
            pair = cc.build_gpt(ctx, "ggn", n=2, t=8, d=16, heads=2, layers=1)
            gpt = jaxbp.GPT(vocab=cc.VOCAB, d=16, heads=2, layers=1, context=8)
            pair.candidate = jaxbp.hessian_vector_product(gpt).jitted
        return pair

    case = harness.Case(id="TEST/wrong-ggn", group="TEST", title="H for G", build=build)
    rec = harness.run_case(case, ctx, harness.environment())
    assert rec["status"] == "failed" and "disagreement" in rec["reason"]
    assert "times" not in rec


def test_kfac_case_fails_when_the_factors_are_wrong(ctx, monkeypatch):
    """A planted mistake: the input factor without its bias column's ones (A of the raw
    rows), which the case's own check against āᵀā/N sees before timing."""
    from benchmarks import cases_curvature as cc
    from jaxbp import kfac

    def rows_without_ones(rec, valid):
        x = rec.res[0]
        rows = x.reshape(-1, x.shape[-1])
        if rec.res[2] is not None:
            rows = jnp.concatenate([rows, jnp.zeros((rows.shape[0], 1), rows.dtype)], axis=1)
        return rows, jnp.ones(rows.shape[:1], rows.dtype)

    monkeypatch.setattr(kfac, "_input_rows", rows_without_ones)
    jaxbp._step.compiled.cache_clear()  # steps traced before the plant would hide it
    build = functools.partial(cc.build_mlp, product="kfac", n=8, sizes=(12, 8, 5))
    case = harness.Case(id="TEST/wrong-kfac", group="TEST", title="A without ones", build=build)
    rec = harness.run_case(case, ctx, harness.environment())
    jaxbp._step.compiled.cache_clear()  # nor may the planted step outlive the test
    assert rec["status"] == "failed" and "A of layer 0" in rec["reason"], rec.get("reason")


def test_a_group_of_different_models_is_labelled_by_the_shapes_each_has():
    records = [
        {"id": "P14/a", "shapes": {"product": "ggn", "model": "mlp", "n": 8, "sizes": [4, 2]}},
        {"id": "P14/b", "shapes": {"product": "ggn", "model": "gpt", "n": 2, "t": 8}},
    ]
    keys = bench_plots._varying(records)
    assert bench_plots._config_label(records[0], keys) == "model=mlp\nn=8\n4-2"
    assert bench_plots._config_label(records[1], keys) == "model=gpt\nn=2\nt=8"
