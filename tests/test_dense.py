"""jaxbp.dense: manual backward vs jax.grad of the reference, finite differences, properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp.dense import dense_bwd_params
from tests import strategies as sts
from tests.helpers import assert_close, check_finite_differences, check_manual_vs_reference
from tests.settings import DENSE_CASES, DTYPES, Case


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_manual_gradient_matches_reference(case, dtype):
    check_manual_vs_reference(case, dtype)


@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_gradient_matches_central_finite_differences(case):
    check_finite_differences(case)


def test_backward_is_the_documented_matrix_products():
    rng = np.random.default_rng(0)
    x, w, b, g = (jnp.asarray(rng.normal(size=s)) for s in [(4, 3), (3, 5), (5,), (4, 5)])
    _, res = jaxbp.dense_fwd(x, w, b)
    dx, dw, db = jaxbp.dense_bwd(res, g)
    xn, wn, gn = np.asarray(x), np.asarray(w), np.asarray(g)
    np.testing.assert_allclose(dx, gn @ wn.T, rtol=1e-12)
    np.testing.assert_allclose(dw, xn.T @ gn, rtol=1e-12)
    np.testing.assert_allclose(db, gn.sum(0), rtol=1e-12)


def test_bwd_params_equals_the_parameter_half_of_dense_bwd():
    case = DENSE_CASES[0]
    a = case.arrays(jnp.float64)
    out, res = jaxbp.dense_fwd(a["x"], a["w"], a["b"])
    g = jnp.ones_like(out)
    _, dw, db = jaxbp.dense_bwd(res, g)
    dw2, db2 = dense_bwd_params(res, g)
    assert_close((dw2, db2), (dw, db), jnp.float64)


def test_no_bias_gives_no_bias_cotangent():
    a = DENSE_CASES[1].arrays(jnp.float64)
    out, res = jaxbp.dense_fwd(a["x"], a["w"])
    assert jaxbp.dense_bwd(res, jnp.ones_like(out))[2] is None


@given(
    batch=sts.batch_shapes(0, 3),
    i=sts.sizes,
    o=sts.sizes,
    bias=st.booleans(),
    dtype=sts.float_dtypes,
    seed=sts.seeds,
    scale=sts.scales,
)
@settings(max_examples=10)
def test_property_any_shape_and_scale_matches_reference(batch, i, o, bias, dtype, seed, scale):
    def make(rng):
        d = {"x": rng.normal(size=(*batch, i)) * scale, "w": rng.normal(size=(i, o))}
        if bias:
            d["b"] = rng.normal(size=(o,))
        return d

    diff = ("x", "w", "b") if bias else ("x", "w")
    check_manual_vs_reference(Case("dense-h", "dense", make, diff=diff, seed=seed), dtype)


@pytest.mark.parametrize(
    ("x", "w", "b", "error", "argument"),
    [
        ((4, 3), (2, 5), None, ValueError, "x"),
        ((4, 3), (3,), None, ValueError, "w"),
        ((4, 3), (3, 5), (4,), ValueError, "b"),
    ],
    ids=["x-last-axis-mismatch", "w-not-2d", "b-wrong-length"],
)
def test_bad_shapes_raise_naming_the_argument(x, w, b, error, argument):
    bb = None if b is None else jnp.ones(b)
    with pytest.raises(error, match=argument):
        jaxbp.dense(jnp.ones(x), jnp.ones(w), bb)


def test_bad_dtypes_raise_type_error_naming_the_argument():
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    with pytest.raises(TypeError, match="x"):
        jaxbp.dense(jnp.ones((2, 3), jnp.int32), w)
    with pytest.raises(TypeError, match="w"):
        jaxbp.dense(x, w.astype(jnp.float32))
    with pytest.raises(TypeError, match="b"):
        jaxbp.dense(x, w, jnp.ones(4, jnp.float32))


_dense_mod = __import__("sys").modules["jaxbp.dense"]


@pytest.mark.parametrize("layout", ["plain", "transpose"])
def test_both_dw_layouts_give_the_documented_product(monkeypatch, layout):
    # dW = xᵀ·g whichever layout the CPU measurement picks; a 32·32·1024 product is above
    # the untimed threshold, so the forced layout is the one compiled.
    monkeypatch.setenv("JAXBP_DW_LAYOUT", layout)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1024, 32)))
    w = jnp.asarray(rng.standard_normal((32, 32)))
    g = jnp.asarray(rng.standard_normal((1024, 32)))
    assert _dense_mod._use_transpose_on_cpu(1024, 32, 32, x.dtype) is (layout == "transpose")
    dw, _ = dense_bwd_params.__wrapped__((x, w, None), g)  # trace now: the env var applies
    np.testing.assert_allclose(dw, np.asarray(x).T @ np.asarray(g), rtol=1e-12)


def test_dw_layout_setting_is_validated(monkeypatch):
    monkeypatch.setenv("JAXBP_DW_LAYOUT", "fastest")
    with pytest.raises(ValueError, match="JAXBP_DW_LAYOUT"):
        _dense_mod._use_transpose_on_cpu(1024, 1024, 1024, jnp.float32)


def test_dw_layout_is_xla_own_dot_unless_asked_and_timing_never_runs(monkeypatch):
    """The default is the dot autodiff emits, the same program every run: nothing timed."""
    monkeypatch.delenv("JAXBP_DW_LAYOUT", raising=False)
    calls = []
    monkeypatch.setattr(_dense_mod, "_time_pairs", lambda *a, **k: calls.append(1) or (0.1, 1.0))
    monkeypatch.setattr(_dense_mod, "_dw_choice", {})
    assert _dense_mod._use_transpose_on_cpu(1024, 1024, 10, jnp.float32) is False
    assert calls == []


def test_dw_layout_auto_is_measured_once_per_shape_and_small_products_are_not_timed(
    monkeypatch,
):
    monkeypatch.setenv("JAXBP_DW_LAYOUT", "auto")
    calls = []
    monkeypatch.setattr(_dense_mod, "_time_pairs", lambda *a, **k: calls.append(1) or (1.0, 1.0))
    monkeypatch.setattr(_dense_mod, "_dw_choice", {})
    assert _dense_mod._use_transpose_on_cpu(8, 8, 8, jnp.float32) is False
    assert calls == []
    # equal times: not "clearly faster", so XLA's own layout is kept
    assert _dense_mod._use_transpose_on_cpu(1024, 1024, 10, jnp.float32) is False
    assert _dense_mod._use_transpose_on_cpu(1024, 1024, 10, jnp.float32) is False
    assert calls == [1]
    monkeypatch.setattr(_dense_mod, "_time_pairs", lambda *a, **k: (0.5, 1.0))
    assert _dense_mod._use_transpose_on_cpu(1024, 1024, 11, jnp.float32) is True


def test_dw_layout_timing_runs_the_programs_even_inside_a_trace():
    """The layout is chosen while JAX traces dense_bwd, where a call on concrete arrays is
    staged into the traced program instead of run: the timing must run them (it once timed
    only their tracing, so the choice was noise)."""
    runs = []

    def record(x):
        runs.append(1)
        return x

    def counted(x):
        return jax.pure_callback(record, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    fa, fb = jax.jit(counted), jax.jit(counted)
    arg = np.ones(3, np.float32)

    def traced(z):
        _dense_mod._time_pairs(fa, fb, [arg], reps=3)
        return z

    jax.jit(traced)(1.0)
    assert len(runs) == 2 * (1 + 3)  # a warm-up and 3 timed calls of each, all executed
