"""jaxbp.compare(loss_fn, grad_fn, params, *batch): a learner's hand-written backprop of a
2-layer MLP with softmax + cross-entropy, right and wrong in each classic way, diagnosed.

Each wrong backprop is written the way a learner writes it (NumPy-style jnp, the mistake
inline), and each test first checks, with an oracle independent of jaxbp (``jax.grad`` of
the loss, the batch size, a transpose), that the mistake really gives what its name says.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp import handcheck, mistakes

LEAVES = ["[0]['b']", "[0]['w']", "[1]['b']", "[1]['w']"]


def _problem(n=6, i=4, h=5, c=3, dtype=jnp.float64, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    params = [
        {"w": jax.random.normal(k[0], (i, h), dtype), "b": jax.random.normal(k[1], (h,), dtype)},
        {"w": jax.random.normal(k[2], (h, c), dtype), "b": jax.random.normal(k[3], (c,), dtype)},
    ]
    x = jax.random.normal(k[4], (n, i), dtype)
    y = jax.nn.one_hot(jnp.arange(n) % c, c, dtype=dtype)  # one-hot labels (n, c)
    return params, x, y


def mean_loss(params, x, y):
    """The learner's loss: sigmoid hidden layer, softmax, cross-entropy, mean over the batch."""
    a1 = 1 / (1 + jnp.exp(-(x @ params[0]["w"] + params[0]["b"])))
    p = jax.nn.softmax(a1 @ params[1]["w"] + params[1]["b"])
    return -jnp.mean(jnp.sum(y * jnp.log(p), axis=1))


def sum_loss(params, x, y):
    return mean_loss(params, x, y) * x.shape[0]


def backprop(mistake=None):
    """The learner's backprop of ``mean_loss``, right, or wrong in one or more ways."""

    def grad_fn(params, x, y):
        n = x.shape[0]
        (W1, b1), (W2, b2) = ((p["w"], p["b"]) for p in params)
        a1 = 1 / (1 + jnp.exp(-(x @ W1 + b1)))  # (n, h)
        p = jax.nn.softmax(a1 @ W2 + b2)  # (n, c)
        dz2 = (p - y) / n  # ∂L/∂z2 (n, c)
        if mistake in ("softmax_diagonal", "softmax_diagonal+sum_for_mean"):
            dp = -y / p / n  # ∂L/∂p, then softmax' taken as p(1 − p), elementwise
            dz2 = p * (1 - p) * dp
        if mistake in ("sum_for_mean", "softmax_diagonal+sum_for_mean"):
            dz2 = dz2 * n  # forgot the 1/n of the mean
        if mistake == "wrong_sign":
            dz2 = (y - p) / n
        dW2 = a1.T @ dz2  # (h, c)
        if mistake == "transposed":
            dW2 = dz2.T @ a1  # (c, h)
        db2 = dz2.sum(axis=0)
        da1 = dz2 @ W2.T  # (n, h)
        dz1 = da1 * a1 if mistake == "no_known" else da1 * a1 * (1 - a1)  # σ' = a(1 − a)
        dW1 = x.T @ dz1  # (i, h)
        if mistake == "transposed_square":
            dW1 = dz1.T @ x  # (h, i) = (i, h) when square
        return [{"w": dW1, "b": dz1.sum(axis=0)}, {"w": dW2, "b": db2}]

    grad_fn.__name__ = f"backprop_{mistake}"
    return grad_fn


def _diagnosed(report):
    return {d.leaf: d.mistakes for d in report.diagnoses}


def _grad_rows(report):
    return {r.leaf: r for r in report.rows if r.check == "jax.grad"}


# ------------------------------------------------------------------------ right


def test_correct_backprop_passes_every_check_with_no_diagnosis():
    params, x, y = _problem()
    report = jaxbp.compare(mean_loss, backprop(), params, x, y)
    assert isinstance(report, handcheck.HandReport)
    assert report.passed and report.diagnoses == () and report.notes == ()
    assert [(r.check, r.leaf) for r in report.rows] == [
        *(("jax.grad", leaf) for leaf in LEAVES),
        *(("finite diff", leaf) for leaf in LEAVES),
    ]
    assert {r.tolerance for r in report.rows} == {1e-12, 1e-6}
    assert report.batch == 6 and report.dtype == "float64"
    assert (
        abs(report.loss - float(optax.softmax_cross_entropy(_logits(params, x), y).mean())) < 1e-12
    )
    assert "PASSED: all 8 checks" in report.table()
    assert report.raise_if_failed() is report


def _logits(params, x):
    a1 = jax.nn.sigmoid(x @ params[0]["w"] + params[0]["b"])
    return a1 @ params[1]["w"] + params[1]["b"]


def test_float32_backprop_is_held_to_float32_tolerance_and_diagnosed_the_same():
    params, x, y = _problem(dtype=jnp.float32)
    good = jaxbp.compare(mean_loss, backprop(), params, x, y)
    assert good.passed and good.dtype == "float32"
    assert {r.tolerance for r in good.rows if r.check == "jax.grad"} == {1e-5}
    assert {r.dtype for r in good.rows if r.check == "finite diff"} == {"float64"}
    bad = jaxbp.compare(mean_loss, backprop("wrong_sign"), params, x, y)
    assert set(_diagnosed(bad).values()) == {("wrong_sign",)}


# ------------------------------------------------------------------------ each mistake


def test_softmax_elementwise_derivative_is_diagnosed_on_every_leaf_below_it():
    params, x, y = _problem()
    wrong = backprop("softmax_diagonal")
    # Oracle: the learner's dz2 is diag(J)·∂L/∂p, which for one-hot y is −y(1 − p)/n.
    p = jax.nn.softmax(_logits(params, x))
    assert jnp.allclose(wrong(params, x, y)[1]["b"], (-y * (1 - p)).sum(0) / 6, atol=1e-15)
    report = jaxbp.compare(mean_loss, wrong, params, x, y)
    assert not report.passed
    assert _diagnosed(report) == dict.fromkeys(LEAVES, ("softmax_diagonal",))
    assert "s(1 − s) ⊙ g" in report.table() and "s ⊙ (g − ⟨s, g⟩)" in report.table()


def test_wrong_sign_is_diagnosed():
    params, x, y = _problem()
    wrong = backprop("wrong_sign")
    truth = jax.grad(mean_loss)(params, x, y)
    assert jax.tree.all(jax.tree.map(lambda a, b: jnp.allclose(a, -b), wrong(params, x, y), truth))
    report = jaxbp.compare(mean_loss, wrong, params, x, y)
    assert _diagnosed(report) == dict.fromkeys(LEAVES, ("wrong_sign",))
    assert "wrong sign" in report.table()


def test_sum_where_the_loss_is_a_mean_is_diagnosed_with_the_batch_size():
    params, x, y = _problem(n=7)
    wrong = backprop("sum_for_mean")
    truth = jax.grad(mean_loss)(params, x, y)
    assert jnp.allclose(wrong(params, x, y)[0]["w"], 7 * truth[0]["w"])
    report = jaxbp.compare(mean_loss, wrong, params, x, y)
    assert _diagnosed(report) == dict.fromkeys(LEAVES, ("sum_for_mean",))
    assert "n = 7" in report.table()


def test_mean_where_the_loss_is_a_sum_is_diagnosed():
    params, x, y = _problem(n=5)
    report = jaxbp.compare(sum_loss, backprop(), params, x, y)  # backprop divides by n
    assert _diagnosed(report) == dict.fromkeys(LEAVES, ("mean_for_sum",))
    assert "1/n = 1/5" in report.table()


def test_transposed_leaf_of_another_shape_is_diagnosed_not_rejected():
    params, x, y = _problem(h=5, c=3)
    wrong = backprop("transposed")
    assert wrong(params, x, y)[1]["w"].shape == (3, 5)  # params[1]['w'] is (5, 3)
    report = jaxbp.compare(mean_loss, wrong, params, x, y)
    assert _diagnosed(report) == {"[1]['w']": ("transposed",)}
    rows = _grad_rows(report)
    assert not rows["[1]['w']"].passed and rows["[1]['w']"].shape == (5, 3)
    assert all(rows[leaf].passed for leaf in LEAVES if leaf != "[1]['w']")
    assert "shape (3, 5) where params has (5, 3)" in report.table()


def test_transposed_square_leaf_is_diagnosed():
    params, x, y = _problem(i=4, h=4)
    report = jaxbp.compare(mean_loss, backprop("transposed_square"), params, x, y)
    assert _diagnosed(report) == {"[0]['w']": ("transposed",)}


def test_two_mistakes_together_are_both_named():
    params, x, y = _problem()
    report = jaxbp.compare(mean_loss, backprop("softmax_diagonal+sum_for_mean"), params, x, y)
    assert _diagnosed(report) == dict.fromkeys(LEAVES, ("softmax_diagonal", "sum_for_mean"))


def test_a_mistake_of_no_known_kind_says_so():
    params, x, y = _problem()
    report = jaxbp.compare(mean_loss, backprop("no_known"), params, x, y)  # σ' = a, not a(1−a)
    assert _diagnosed(report) == {"[0]['b']": (), "[0]['w']": ()}
    assert all(d.text == mistakes.NO_MATCH for d in report.diagnoses)
    assert "no known mistake matches" in report.table()


def test_a_non_finite_leaf_is_no_known_mistake_and_never_passes():
    params, x, y = _problem()

    def nan_grad(params, x, y):
        g = backprop()(params, x, y)
        g[1]["b"] = g[1]["b"].at[0].set(jnp.nan)
        return g

    report = jaxbp.compare(mean_loss, nan_grad, params, x, y)
    assert _diagnosed(report) == {"[1]['b']": ()}
    assert "not finite" in report.diagnoses[0].text
    assert not _grad_rows(report)["[1]['b']"].passed


# ------------------------------------------------------------------------ the softmax seen


@pytest.mark.parametrize(
    "softmax_loss",
    [
        lambda z, y: -jnp.sum(y * jax.nn.log_softmax(z), axis=1),
        lambda z, y: optax.softmax_cross_entropy(z, y),
        lambda z, y: -jnp.sum(y * jnp.log(jaxbp.softmax(z)), axis=1),
        lambda z, y: -jnp.sum(y * jaxbp.log_softmax(z), axis=1),
        lambda z, y: -jnp.sum(y * jnp.log(jaxbp.reference.softmax(z)), axis=1),
    ],
    ids=["jax.nn.log_softmax", "optax", "jaxbp.softmax", "jaxbp.log_softmax", "reference"],
)
def test_softmax_mistake_is_seen_through_every_softmax_and_log_softmax(softmax_loss):
    params, x, y = _problem()

    def loss(params, x, y):
        return jnp.mean(softmax_loss(_logits(params, x), y))

    assert jnp.allclose(loss(params, x, y), mean_loss(params, x, y), atol=1e-12)
    report = jaxbp.compare(loss, backprop("softmax_diagonal"), params, x, y, fd=False)
    assert _diagnosed(report) == dict.fromkeys(LEAVES, ("softmax_diagonal",))


def test_an_inline_softmax_cannot_be_seen_and_the_report_says_so():
    params, x, y = _problem()

    def inline(params, x, y):
        e = jnp.exp(_logits(params, x))
        return -jnp.mean(jnp.sum(y * jnp.log(e / e.sum(axis=1, keepdims=True)), axis=1))

    report = jaxbp.compare(inline, backprop("softmax_diagonal"), params, x, y, fd=False)
    assert _diagnosed(report) == dict.fromkeys(LEAVES, ())
    assert any("softmax_diagonal not checked" in note for note in report.notes)
    # the other mistakes are still seen
    report = jaxbp.compare(inline, backprop("wrong_sign"), params, x, y, fd=False)
    assert set(_diagnosed(report).values()) == {("wrong_sign",)}


def test_a_failing_softmax_run_is_a_note_and_the_other_mistakes_are_still_named(monkeypatch):
    params, x, y = _problem()

    def broken():
        raise RuntimeError("no softmax today")

    monkeypatch.setattr(handcheck, "diagonal_softmax", broken)
    report = jaxbp.compare(mean_loss, backprop("wrong_sign"), params, x, y, fd=False)
    assert set(_diagnosed(report).values()) == {("wrong_sign",)}
    assert any("no softmax today" in note for note in report.notes)


def test_a_jitted_loss_already_compiled_still_shows_its_softmax():
    params, x, y = _problem()
    jitted = jax.jit(mean_loss)
    jax.grad(jitted)(params, x, y)  # traced and cached with the true softmax
    report = jaxbp.compare(jitted, backprop("softmax_diagonal"), params, x, y, fd=False)
    assert set(_diagnosed(report).values()) == {("softmax_diagonal",)}


# ------------------------------------------------------------------------ bad input


def test_grad_fn_with_a_missing_leaf_is_an_error_naming_it():
    params, x, y = _problem()

    def missing(params, x, y):
        g = backprop()(params, x, y)
        del g[1]["b"]
        return g

    with pytest.raises(ValueError, match=r"missing \[1\]\['b'\]"):
        jaxbp.compare(mean_loss, missing, params, x, y)


def test_grad_fn_returning_loss_and_grads_gets_a_hint():
    params, x, y = _problem()
    both = lambda p, x, y: (mean_loss(p, x, y), backprop()(p, x, y))  # noqa: E731
    with pytest.raises(ValueError, match=r"structure of params.*\(loss, grads\)"):
        jaxbp.compare(mean_loss, both, params, x, y)


def test_leaf_of_another_shape_is_an_error_naming_it():
    params, x, y = _problem()

    def summed(params, x, y):
        g = backprop()(params, x, y)
        g[1]["b"] = g[1]["b"][None]  # (1, c) for (c,)
        return g

    with pytest.raises(ValueError, match=r"\[1\]\['b'\]: expected shape \(3,\).*got \(1, 3\)"):
        jaxbp.compare(mean_loss, summed, params, x, y)


def test_reversed_shape_that_is_not_the_transpose_is_an_error_naming_it():
    params, x, y = _problem(h=5, c=3)

    def reshaped(params, x, y):
        g = backprop()(params, x, y)
        g[1]["w"] = g[1]["w"].reshape(3, 5)  # the right shape for a transpose, not its values
        return g

    with pytest.raises(ValueError, match=r"\[1\]\['w'\].*not the transposed gradient"):
        jaxbp.compare(mean_loss, reshaped, params, x, y)


def test_leaf_of_another_dtype_is_an_error_naming_it():
    params, x, y = _problem(dtype=jnp.float32)

    def promoted(params, x, y):
        g = backprop()(params, x, y)
        g[0]["w"] = np.asarray(g[0]["w"], np.float64)  # NumPy's default dtype crept in
        return g

    with pytest.raises(TypeError, match=r"\[0\]\['w'\]: expected float32.*got float64"):
        jaxbp.compare(mean_loss, promoted, params, x, y)


def test_a_loss_that_is_not_a_scalar_is_an_error():
    params, x, y = _problem()
    per_example = lambda p, x, y: -jnp.sum(y * jnp.log(jax.nn.softmax(_logits(p, x))), 1)  # noqa: E731
    with pytest.raises(ValueError, match=r"loss_fn.*scalar.*\(6,\)"):
        jaxbp.compare(per_example, backprop(), params, x, y)


def test_bad_arguments_are_errors_naming_them():
    params, x, y = _problem()
    with pytest.raises(TypeError, match="grad_fn: expected a function"):
        handcheck.compare(mean_loss, "backprop", params, x, y)
    with pytest.raises(TypeError, match=r"params\[0\]\['w'\]: expected a floating"):
        jaxbp.compare(mean_loss, backprop(), [{"w": jnp.ones((2, 2), jnp.int32)}], x, y)
    with pytest.raises(ValueError, match="dtype"):
        jaxbp.compare(mean_loss, backprop(), params, x, y, dtype=jnp.int32)
    with pytest.raises(ValueError, match="fd_directions"):
        jaxbp.compare(mean_loss, backprop(), params, x, y, fd_directions=0)


# ------------------------------------------------------------------------ the report


def test_report_serialises_to_json_with_its_diagnoses():
    params, x, y = _problem()
    report = jaxbp.compare(mean_loss, backprop("wrong_sign"), params, x, y, fd_directions=2)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is False and d["batch"] == 6 and d["fd_directions"] == 2
    assert [g["mistakes"] for g in d["diagnoses"]] == [["wrong_sign"]] * 4
    assert {r["shape"][0] for r in d["rows"] if r["check"] == "finite diff"} == {2}
    with pytest.raises(AssertionError, match="wrong sign"):
        report.raise_if_failed()


def test_finite_differences_catch_a_wrong_gradient_of_a_loss_jax_cannot_check_alone():
    """The finite-difference rows are an oracle of their own: for ``L = Σ w³``, ``∇L = 3w²``."""
    w = jnp.array([[0.5, -1.0], [2.0, 0.25]], jnp.float64)
    loss = lambda w: jnp.sum(w**3)  # noqa: E731
    good = jaxbp.compare(loss, lambda w: 3 * w**2, w)
    assert good.passed and good.batch == 0
    bad = jaxbp.compare(loss, lambda w: 3 * w, w)
    fd = [r for r in bad.rows if r.check == "finite diff"]
    assert len(fd) == 1 and not fd[0].passed


def test_float64_is_switched_on_for_the_finite_differences_when_it_is_off():
    params, x, y = _problem(dtype=jnp.float32)
    off = getattr(jax, "enable_x64", None)  # newer JAX; older: jax.experimental.disable_x64
    with off(False) if off is not None else jax.experimental.disable_x64():
        report = jaxbp.compare(mean_loss, backprop(), params, x, y)
        assert not jax.config.jax_enable_x64
    assert report.passed
    assert {r.dtype for r in report.rows if r.check == "finite diff"} == {"float64"}


def test_model_compare_still_dispatches_to_the_model_path():
    model = jaxbp.MLP((4, 5, 3), "relu", "softmax_cross_entropy")
    params = model.init(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 4), jnp.float64)
    report = jaxbp.compare(model, params, x, jnp.arange(6) % 3, fd=False)
    assert report.passed and report.sizes == (4, 5, 3)


@settings(max_examples=8)
@given(
    n=st.integers(2, 5),
    i=st.integers(1, 4),
    h=st.integers(1, 4),
    c=st.integers(2, 4),
    mistake=st.sampled_from(["softmax_diagonal", "wrong_sign", "sum_for_mean"]),
)
def test_every_shape_gets_the_mistake_it_has(n, i, h, c, mistake):
    params, x, y = _problem(n=n, i=i, h=h, c=c, seed=n + i + h + c)
    report = jaxbp.compare(mean_loss, backprop(mistake), params, x, y, fd=False)
    assert _diagnosed(report) and set(_diagnosed(report).values()) == {(mistake,)}
