"""softmax / log_softmax: manual backward vs reference, finite differences, residuals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from tests import strategies as sts
from tests.checks import check_finite_differences, check_manual_vs_reference
from tests.settings import DTYPES, SOFTMAX_CASES, Case


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=str)
def test_manual_gradient_matches_reference(case, dtype):
    check_manual_vs_reference(case, dtype)


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=str)
def test_gradient_matches_central_finite_differences(case):
    check_finite_differences(case)


@given(
    name=st.sampled_from(["softmax", "log_softmax"]),
    shape=sts.shapes(1, 3),
    axis_seed=st.integers(0, 5),
    scale=sts.scales,
    dtype=sts.float_dtypes,
    seed=sts.seeds,
)
@settings(max_examples=10)
def test_property_any_shape_axis_and_scale_matches_reference(
    name, shape, axis_seed, scale, dtype, seed
):
    axis = axis_seed % (2 * len(shape)) - len(shape)  # negative and positive axes
    case = Case(
        "h", name, lambda rng: {"z": sts.away_from_zero(rng, shape, scale)}, {"axis": axis},
        ("z",), seed,
    )  # fmt: skip
    check_manual_vs_reference(case, dtype)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_saves_only_its_output(name):
    z = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)
    out, res = getattr(jaxbp, name + "_fwd")(z)
    assert len(res) == 1
    np.testing.assert_array_equal(res[0], out)


def test_backward_is_s_times_g_minus_s_dot_g():
    rng = np.random.default_rng(1)
    z, g = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    s = np.exp(z - z.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    _, res = jaxbp.softmax_fwd(jnp.asarray(z))
    (dz,) = jaxbp.softmax_bwd(res, jnp.asarray(g))
    np.testing.assert_allclose(dz, s * (g - (s * g).sum(-1, keepdims=True)), rtol=1e-12)
    # The elementwise shortcut g ⊙ s(1 − s) is wrong for softmax: its Jacobian is full.
    assert not np.allclose(dz, g * s * (1 - s))


def test_rows_sum_to_one_and_gradient_of_row_sum_is_zero():
    z = jnp.asarray(np.random.default_rng(2).normal(size=(3, 7)) * 10)
    np.testing.assert_allclose(jaxbp.softmax(z).sum(-1), 1.0, rtol=1e-14)
    dz = jax.grad(lambda z: jnp.sum(jaxbp.softmax(z)))(z)
    np.testing.assert_allclose(dz, 0.0, atol=1e-15)


def test_single_neg_inf_logit_gives_exact_zero_probability_and_zero_gradient():
    z = jnp.asarray([[0.5, -jnp.inf, 1.0]])
    s = jaxbp.softmax(z)
    assert s[0, 1] == 0.0
    dz = jax.grad(lambda z: jnp.sum(jaxbp.softmax(z) * jnp.asarray([1.0, 2.0, 3.0])))(z)
    assert bool(jnp.all(jnp.isfinite(dz))) and dz[0, 1] == 0.0


def test_half_precision_is_computed_in_float32_and_returned_in_input_dtype():
    z = jnp.asarray([[1e4, 0.0, -1e4]], jnp.float16)
    s = jaxbp.softmax(z)
    assert s.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(s)))
    g = jax.grad(lambda z: jnp.sum(jaxbp.log_softmax(z).astype(jnp.float32)[:, 1]))(z)
    assert g.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("axis", [2, -3, 1.0])
def test_bad_axis_raises_value_error_naming_axis(axis):
    with pytest.raises(ValueError, match="axis"):
        jaxbp.softmax(jnp.ones((2, 3)), axis=axis)


def test_integer_and_scalar_inputs_raise_naming_z():
    with pytest.raises(TypeError, match="z"):
        jaxbp.softmax(jnp.arange(3))
    with pytest.raises(ValueError, match="z"):
        jaxbp.log_softmax(jnp.float32(1.0))
