"""jaxbp.dense: manual backward vs jax.grad of the reference, finite differences, properties."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp.dense import dense_bwd_params
from tests import strategies as sts
from tests.checks import check_finite_differences, check_manual_vs_reference
from tests.helpers import assert_close
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
