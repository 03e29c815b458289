"""jaxbp.plots: each figure draws the right arrays with the right titles; ``--plot`` writes a
picture; without matplotlib ``--plot`` is a usage error; ``import jaxbp`` never loads it."""

import ast
import pathlib
import struct
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp import plots
from jaxbp.cli import main
from jaxbp.explain_attention import explain_attention
from jaxbp.gradcheck import Report, Row
from jaxbp.train import TrainResult
from jaxbp.train_gpt import GPTTrainResult

matplotlib = pytest.importorskip("matplotlib")

ROOT = pathlib.Path(jaxbp.__file__).parent


def _images(fig) -> list:
    return [im for ax in fig.axes for im in ax.get_images()]


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def _png_size(path) -> tuple[int, int]:
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------ explain


@pytest.fixture(scope="module")
def explanation():
    return jaxbp.explain((4, 5, 3), 2, seed=0)


def _softmax_jacobian_oracle(z):
    """diag(p) − p pᵀ from jax.jacobian of jax.nn.softmax, in float64."""
    return np.asarray(jax.jacobian(jax.nn.softmax)(np.asarray(z, np.float64)))


def test_explain_figure_draws_j_dloss_dp_their_product_and_p_minus_y(explanation):
    sm = explanation.softmax
    for example in (0, 1):
        fig = plots.explain_figure(explanation, example)
        J, g, prod, pmy = (np.asarray(im.get_array()) for im in _images(fig))
        p, y = sm["p"][example], sm["y"][example]
        # independent oracles: autodiff's softmax Jacobian at log p, −y/p, and p − y
        assert np.allclose(J, _softmax_jacobian_oracle(np.log(p)), atol=1e-12)
        assert np.allclose(g[:, 0], -y / p, atol=1e-12)
        assert np.allclose(prod[:, 0], p - y, atol=1e-12)
        assert np.allclose(pmy[:, 0], p - y, atol=1e-12)
        titles = _titles(fig)
        assert "J = diag(p) − p pᵀ\n(c, c) = (3, 3)" in titles
        assert "∂loss/∂p = −y/p\n(c,) = (3,)" in titles
        assert "J·∂loss/∂p\n(c,) = (3,)" in titles and "p − y\n(c,) = (3,)" in titles
        assert f"example {example} of n = 2" in fig.get_suptitle()
        labels = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]
        assert sum("← label" in t for t in labels) == 1


def test_explain_figure_colours_are_centred_at_zero_and_cells_carry_their_numbers(explanation):
    fig = plots.explain_figure(explanation)
    for im in _images(fig):
        lo, hi = im.get_clim()
        assert lo == pytest.approx(-hi) and hi > 0
    J_axes = fig.axes[0]
    texts = [t.get_text() for t in J_axes.texts]
    assert len(texts) == 9  # a number in each of the (3, 3) cells
    assert f"{explanation.softmax['jacobian'][0][0, 0]:.2f}" in texts


def test_explain_figure_for_many_classes_has_colour_bars_instead_of_numbers():
    e = jaxbp.explain((4, 5, 24), 1)
    fig = plots.explain_figure(e)
    assert not fig.axes[0].texts
    assert len(_images(fig)) == 4
    assert sum(ax.get_label() == "<colorbar>" for ax in fig.axes) == 4
    assert "(c, c) = (24, 24)" in fig.axes[0].get_title()


def test_explain_figure_refuses_an_example_outside_the_batch(explanation):
    for bad in (2, -1, 0.5, True):
        with pytest.raises(ValueError, match="example: expected an int from 0 to 1"):
            plots.explain_figure(explanation, bad)


# ------------------------------------------------------------------ attention


def test_attention_figure_draws_p_dp_rowsum_and_ds_masked_above_the_diagonal():
    walk = explain_attention(5, 3, seed=1)
    fig = plots.attention_figure(walk)
    P, dP, r, dS, Ji, dPi, dSi = (np.ma.filled(im.get_array(), np.nan) for im in _images(fig))
    t = 5
    above = np.triu(np.ones((t, t), bool), k=1)
    a = walk.arrays
    # masked keys are drawn grey (NaN), the rest is the head's values
    assert np.isnan(P[above]).all() and np.isnan(dS[above]).all()
    assert np.allclose(P[~above], a["P"][~above]) and np.allclose(dP, a["dP"])
    # the collapse, recomputed here: dS = P ⊙ (dP − rowsum(dP ⊙ P))
    rowsum = (a["dP"] * a["P"]).sum(-1)
    assert np.allclose(r[:, 0], rowsum)
    assert np.allclose(dS[~above], (a["P"] * (a["dP"] - rowsum[:, None]))[~above])
    # the last row through its explicit Jacobian, from autodiff of jax.nn.softmax
    i = t - 1
    assert np.allclose(Ji, _softmax_jacobian_oracle(np.log(a["P"][i])), atol=1e-12)
    assert np.allclose(dPi[:, 0], a["dP"][i]) and np.allclose(dSi[:, 0], dS[i])
    titles = _titles(fig)
    assert "P = softmax(S)\n(t, s) = (5, 5)" in titles and "dS\n(t, s) = (5, 5)" in titles
    assert "rowsum(dP ⊙ P)\n(t, 1)" in titles
    assert f"J{i} = diag(P{i}) − P{i} P{i}ᵀ\n(s, s) = (5, 5)" in titles
    assert "dS = P ⊙ (dP − rowsum(dP ⊙ P))" in fig.get_suptitle()
    assert _images(fig)[0].get_clim() == (0.0, 1.0)  # probabilities: 0 to 1, not centred


def test_attention_figure_with_one_position():
    fig = plots.attention_figure(explain_attention(1, 2))
    assert np.asarray(_images(fig)[0].get_array()).shape == (1, 1)


# ------------------------------------------------------------------ training


def _mlp_result(check: bool) -> TrainResult:
    steps = np.linspace(2.3, 0.1, 12)
    ref = steps + np.where(np.arange(12) % 3 == 0, 0.0, 1e-7)
    info = None
    if check:
        info = {"reference_step_losses": ref.tolist(), "reference_losses": [1.8, 0.9, 0.3],
                "reference_test_accuracy": [0.8, 0.9, 0.95], "max_abs_difference": 1e-7,
                "max_rel_difference": 1e-7 / 2.3, "tolerance": 1e-4, "passed": True}  # fmt: skip
    config = {"sizes": (64, 16, 10), "activation": "relu", "optimizer": "adam", "lr": 0.01,
              "epochs": 3, "batch_size": 128, "seed": 0}  # fmt: skip
    return TrainResult(config, (1.8, 0.9, 0.3), tuple(steps), (0.8, 0.9, 0.95), 0.97, 1.0,
                       check=info, test_losses=(1.0, 0.5, 0.35))  # fmt: skip


def test_train_figure_shows_loss_and_accuracy_against_steps():
    fig = plots.train_figure(_mlp_result(check=False))
    loss, acc = fig.axes
    assert loss.get_yscale() == "log" and "accuracy" in acc.get_ylabel()
    lines = {line.get_label(): line for line in loss.get_lines()}
    assert np.array_equal(lines["held-out (test) loss"].get_xdata(), [4, 8, 12])
    assert np.allclose(lines["held-out (test) loss"].get_ydata(), [1.0, 0.5, 0.35])
    assert len(lines["train, each minibatch (hand-written)"].get_xdata()) == 12
    assert "0.9500" in fig.get_suptitle() and "MLP 64-16-10" in fig.get_suptitle()


def test_train_figure_with_check_overlays_jax_grad_and_draws_the_difference():
    r = _mlp_result(check=True)
    fig = plots.train_figure(r)
    assert len(fig.axes) == 3
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "train, each minibatch (jax.grad)" in labels
    diff = fig.axes[2]
    assert diff.get_yscale() == "log"
    dots = next(line for line in diff.get_lines() if line.get_label().startswith("|hand"))
    expected = np.abs(np.asarray(r.step_losses) - np.asarray(r.check["reference_step_losses"]))
    assert np.allclose(dots.get_ydata(), expected[expected > 0])  # exact zeros are not drawn
    tol = next(line for line in diff.get_lines() if line.get_label().startswith("tolerance"))
    assert tol.get_ydata()[0] == pytest.approx(1e-4 * 2.3)
    assert "exactly equal at 4 of 12 steps" in diff.get_title()


def test_train_figure_of_the_gpt_shows_validation_and_the_uniform_guess():
    r = GPTTrainResult(
        config={"d": 32, "heads": 2, "layers": 1, "context": 16, "batch_size": 8, "vocab": 65},
        step_losses=tuple(np.linspace(4.2, 2.5, 40)), validation=((20, 3.0), (40, 2.6)),
        seconds=1.0, tokens_per_second=1.0, sample="",
    )  # fmt: skip
    fig = plots.train_figure(r)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert np.allclose(lines["validation"].get_ydata(), [3.0, 2.6])
    guess = next(v for k, v in lines.items() if k.startswith("uniform guess"))
    assert guess.get_ydata()[0] == pytest.approx(np.log(65))


# ------------------------------------------------------------------ compare


def _row(check, leaf, err, tol):
    shape = () if check == "loss" else (3,)  # finite diff: (directions,)
    return Row(check, leaf, shape, "float32", err, err, 1.0, tol, err <= tol)


def _report(rows, dtype="float32") -> Report:
    return Report((4, 3), "relu", "softmax_cross_entropy", dtype, 2, 1.0, 1.0, tuple(rows),
                  4, 1e-6, 0)  # fmt: skip


def test_compare_figure_puts_each_check_side_by_side_on_a_log_scale_with_its_tolerance():
    rep = _report([
        _row("loss", "mean loss", 0.0, 1e-5),
        _row("jax.grad", "[0]['w']", 3e-7, 1e-5),
        _row("jax.grad", "[0]['b']", 2e-4, 1e-5),  # a failure
        _row("finite diff", "[0]['w']", 1e-9, 1e-6),
    ])  # fmt: skip
    fig = plots.compare_figure(rep)
    grad, fd = fig.axes
    assert grad.get_title().startswith("jax.grad") and fd.get_title().startswith("finite diff")
    assert grad.get_xscale() == fd.get_xscale() == "log"
    ticks = [t.get_text() for t in grad.get_yticklabels()]
    assert ticks == ["loss ()", "[0]['w'] (3,)", "[0]['b'] (3,)"]
    assert [t.get_text() for t in fd.get_yticklabels()] == ["[0]['w'], 3 directions"]
    tol = [line.get_xdata()[0] for line in grad.get_lines() if line.get_linestyle() == ":"]
    assert tol == [1e-5]
    crosses = [line for line in grad.get_lines() if line.get_marker() == "x"]
    assert len(crosses) == 1 and crosses[0].get_xdata()[0] == 2e-4
    assert crosses[0].get_ydata()[0] == 2  # the row of [0]['b']
    zero = [line for line in grad.get_lines() if line.get_marker() == "o"][0]
    assert zero.get_xdata()[0] == grad.get_xlim()[0] * 2  # exact 0: hollow, at the left edge
    assert "1 of 4 checks FAILED" in fig.get_suptitle()


def test_compare_figure_of_a_real_sweep_colours_dtypes(capsys):
    x = np.ones((3, 4))
    model = jaxbp.MLP((4, 3))
    params = model.init(jax.random.PRNGKey(0), np.float64)
    reports = [jaxbp.compare(model, params, x, np.array([0, 1, 2]), dtype=d, fd=False)
               for d in ("float32", "float64")]  # fmt: skip
    fig = plots.compare_figure(reports)
    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == ["jax.grad", "custom_vjp"]
    assert "2 of 2 passed" in fig.get_suptitle()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["float32: tolerance 1e-05", "float64: tolerance 1e-12"]


def test_compare_figure_needs_a_report():
    with pytest.raises(ValueError, match="reports: expected at least one report"):
        plots.compare_figure([])


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize(
    "args",
    [
        ["explain"],
        ["explain", "--model", "gpt", "--positions", "3"],
        ["compare", "--sizes", "6,5,3", "--batch", "4", "--no-fd"],
        ["train", "--sizes", "64,8,10", "--epochs", "1", "--batch-size", "256", "--check"],
        ["train", "--model", "gpt", "--d", "16", "--heads", "2", "--layers", "1", "--context",
         "8", "--steps", "4", "--log-every", "2", "--batch-size", "2", "--sample-chars", "0"],
    ],
    ids=["explain", "explain-gpt", "compare", "train-check", "train-gpt"],
)  # fmt: skip
def test_each_plot_flag_writes_a_png_of_a_sensible_size(args, tmp_path, capsys):
    path = tmp_path / "figure.png"
    assert main([*args, "--plot", str(path)]) == 0
    assert f"figure written to {path}" in capsys.readouterr().out
    w, h = _png_size(path)
    assert 500 <= w <= 2200 and 300 <= h <= 2000, (w, h)
    assert 10_000 < path.stat().st_size < 2_000_000


def test_plot_writes_the_format_of_its_extension(tmp_path, capsys):
    path = tmp_path / "explain.svg"
    assert main(["explain", "--plot", str(path)]) == 0
    assert path.read_text().lstrip().startswith("<?xml") and "<svg" in path.read_text()


BAD_PLOTS = [
    ("figure.xyz", "expected a file name ending in .", "png"),
    ("-", "expected a file such as loss.png, got '-'", None),
    ("no/such/dir/f.png", "cannot write 'no/such/dir/f.png': no directory", None),
]


@pytest.mark.parametrize("value, message, also", BAD_PLOTS, ids=["extension", "dash", "dir"])
def test_bad_plot_paths_are_usage_errors(value, message, also, capsys, monkeypatch):
    monkeypatch.setattr("jaxbp.cli.explain.explain", _no_work)
    with pytest.raises(SystemExit) as e:
        main(["explain", "--plot", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --plot" in err and message in err and (also is None or also in err)


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the usage error")


@pytest.mark.parametrize("command, tool", [("compare", "jaxbp.cli.compare.compare"),
                                           ("explain", "jaxbp.cli.explain.explain"),
                                           ("train", "jaxbp.cli.train.train")])  # fmt: skip
def test_without_matplotlib_plot_is_a_usage_error_naming_the_extra(
    command, tool, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    monkeypatch.setattr(tool, _no_work)
    with pytest.raises(SystemExit) as e:
        main([command, "--plot", str(tmp_path / "f.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: jaxbp {command}" in err
    assert "`plots` extra" in err and 'pip install "jaxbp[plots]"' in err
    assert not (tmp_path / "f.png").exists()


def test_without_matplotlib_the_figure_functions_raise_import_error(explanation, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"`plots` extra of jaxbp: pip install"):
        plots.explain_figure(explanation)


# ------------------------------------------------------------------ who imports matplotlib


def test_import_jaxbp_and_its_cli_load_no_matplotlib_and_figures_need_no_pyplot():
    code = (
        "import sys, jaxbp, jaxbp.plots, jaxbp.cli\n"
        "assert not [m for m in sys.modules if m.startswith('matplotlib')], 'at import'\n"
        "fig = jaxbp.plots.explain_figure(jaxbp.explain())\n"
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
        "print(type(fig).__module__, type(fig).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["matplotlib.figure", "Figure"]


def test_only_the_drawing_kit_imports_matplotlib_and_only_inside_functions():
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set(tree.body)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n.split(".")[0] == "matplotlib" for n in names):
                found.setdefault(path.name, []).append("top level" if node in top else "inside")
    assert set(found) == {"_draw.py"}, found
    assert "top level" not in found["_draw.py"]


def test_the_public_figure_functions_are_documented_with_their_shapes():
    for name in ("explain_figure", "attention_figure", "train_figure", "compare_figure"):
        doc = getattr(plots, name).__doc__
        assert doc and "Returns:" in doc and "Figure" in doc, name
    assert "(c, c)" in plots.explain_figure.__doc__ and "(t, s)" in plots.attention_figure.__doc__


# ------------------------------------------------------------------ any shape, any numbers


@settings(max_examples=15)
@given(c=st.integers(1, 30), n=st.integers(1, 3), data=st.data())
def test_explain_figure_draws_any_example_of_any_width(c, n, data):
    rng = np.random.default_rng(c * 10 + n)
    z = rng.normal(size=(n, c)) * 3
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    labels = rng.integers(0, c, n)
    y = np.eye(c)[labels]
    J = np.stack([np.diag(q) - np.outer(q, q) for q in p])
    upstream = -y / p
    product = np.einsum("ncd,nd->nc", J, upstream)
    e = types.SimpleNamespace(softmax={
        "jacobian": J, "upstream": upstream, "product": product, "p_minus_y": p - y,
        "p": p, "y": y, "labels": labels.tolist(), "max_difference": 0.0,
    })  # fmt: skip
    k = data.draw(st.integers(0, n - 1))
    fig = plots.explain_figure(e, k)
    drawn = [np.asarray(im.get_array()) for im in _images(fig)]
    assert [a.shape for a in drawn] == [(c, c), (c, 1), (c, 1), (c, 1)]
    assert np.allclose(drawn[0], J[k]) and np.allclose(drawn[3][:, 0], p[k] - y[k])
    assert f"(c, c) = ({c}, {c})" in fig.axes[0].get_title()
    assert bool(fig.axes[0].texts) == (c <= plots.ANNOTATE_MAX)
    w, h = fig.get_size_inches()
    assert 3 < w < 17 and 2 < h < 12


ERRORS = st.one_of(st.just(0.0), st.floats(1e-17, 1.0), st.just(float("nan")),
                   st.just(float("inf")))  # fmt: skip


@settings(max_examples=15)
@given(
    rows=st.lists(st.tuples(st.sampled_from(["loss", "jax.grad", "custom_vjp", "finite diff"]),
                            st.sampled_from(["[0]['w']", "[0]['b']", "[1]['w']"]), ERRORS),
                  min_size=1, max_size=12),
    dtypes=st.lists(st.sampled_from(["float32", "float64", "bfloat16"]), min_size=1, max_size=3),
)  # fmt: skip
def test_compare_figure_draws_every_row_whatever_its_error(rows, dtypes):
    tol = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 2e-2}
    reports = []
    for d in dtypes:
        made = [Row(c, "mean loss" if c == "loss" else leaf, (3,), d, e, e, 1.0,
                    1e-6 if c == "finite diff" else tol[d], bool(e <= tol[d]))
                for c, leaf, e in rows]  # fmt: skip
        reports.append(_report(made, d))
    fig = plots.compare_figure(reports)
    dots = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_marker() in ("o", "x")]
    assert len(dots) == len(rows) * len(dtypes)
    crosses = sum(ln.get_marker() == "x" for ln in dots)
    assert crosses == sum(not r.passed for rep in reports for r in rep.rows)
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        assert all(lo < ln.get_xdata()[0] < hi for ln in ax.get_lines() if ln in dots)
