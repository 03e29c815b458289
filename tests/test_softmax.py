"""softmax / log_softmax: manual backward vs reference, finite differences, residuals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from tests import strategies as sts
from tests.helpers import assert_close, check_finite_differences, check_manual_vs_reference
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
    out, res = getattr(jaxbp, name).fwd(z)
    if name == "log_softmax":  # its output, and the mask (None here)
        assert len(res) == 2 and res[1] is None
    else:
        assert len(res) == 1
    np.testing.assert_array_equal(res[0], out)


def test_backward_is_s_times_g_minus_s_dot_g():
    rng = np.random.default_rng(1)
    z, g = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    s = np.exp(z - z.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    _, res = jaxbp.softmax_fwd(jnp.asarray(z))
    dz, dwhere = jaxbp.softmax_bwd(res, jnp.asarray(g))
    assert dwhere is None  # the mask's cotangent
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


# ------------------------------------------------------------------------- where= masks

M = jnp.asarray([[True, False, True, True], [False, False, False, False], [True] * 4])
ZM = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4)))
GM = jnp.asarray(np.random.default_rng(6).normal(size=(3, 4)))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_where_matches_jax_nn_value_and_gradient(name):
    ours = functools.partial(getattr(jaxbp, name), where=M)
    theirs = functools.partial(getattr(jax.nn, name), where=M)
    (a, va), (b, vb) = jax.vjp(ours, ZM), jax.vjp(theirs, ZM)
    assert_close((a, va(GM)), (b, vb(GM)), jnp.float64)


def test_softmax_where_by_hand_masked_entries_are_zero_and_a_fully_masked_row_is_all_zero():
    s = np.asarray(jaxbp.softmax(ZM, where=M))
    z0 = np.asarray(ZM[0])[[0, 2, 3]]
    np.testing.assert_allclose(s[0, [0, 2, 3]], np.exp(z0) / np.exp(z0).sum(), rtol=1e-15)
    assert s[0, 1] == 0.0
    np.testing.assert_array_equal(s[1], 0.0)
    dz = jax.grad(lambda z: jnp.sum(jaxbp.softmax(z, where=M) * GM))(ZM)
    np.testing.assert_array_equal(dz[1], 0.0)
    assert dz[0, 1] == 0.0 and bool(jnp.all(jnp.isfinite(dz)))


def test_log_softmax_where_gives_minus_inf_at_masked_entries_and_zero_gradient_there():
    ls = jaxbp.log_softmax(ZM, where=M)
    assert ls[0, 1] == -jnp.inf and bool(jnp.all(ls[1] == -jnp.inf))
    np.testing.assert_allclose(jnp.exp(ls[0]).sum(), 1.0, rtol=1e-15)
    # Reduce with jnp.where, never ℓ·0: the gradient is 0 at masked entries and rows.
    dz = jax.grad(lambda z: jnp.sum(jnp.where(M, jaxbp.log_softmax(z, where=M), 0.0) * GM))(ZM)
    np.testing.assert_array_equal(dz[1], 0.0)
    assert dz[0, 1] == 0.0 and bool(jnp.all(jnp.isfinite(dz)))
    gm = np.asarray(GM[0]) * np.asarray(M[0])
    p = np.exp(np.asarray(ls[0]))
    np.testing.assert_allclose(dz[0], gm - p * gm.sum(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("huge", [1e30, jnp.inf, -jnp.inf, jnp.nan], ids=str)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_masked_entries_with_huge_or_nan_logits_do_not_leak(name, huge):
    op = getattr(jaxbp, name)
    z = ZM.at[0, 1].set(huge).at[1].set(huge)
    clean = op(ZM, where=M)
    out = op(z, where=M)
    np.testing.assert_array_equal(out, clean)
    dz = jax.grad(lambda z: jnp.sum(jnp.where(M, op(z, where=M), 0.0) * GM))(z)
    assert bool(jnp.all(jnp.isfinite(dz))) and dz[0, 1] == 0.0
    np.testing.assert_array_equal(dz[1], 0.0)


def test_where_broadcasts_along_rows_and_columns():
    cols = jnp.asarray([True, False, True, True])
    a = jaxbp.softmax(ZM, where=cols)
    np.testing.assert_array_equal(a, jaxbp.softmax(ZM, where=jnp.broadcast_to(cols, (3, 4))))
    rows = jnp.asarray([[True], [False], [True]])
    np.testing.assert_array_equal(jaxbp.log_softmax(ZM, where=rows)[1], -jnp.inf)
    b = jaxbp.softmax(ZM.T, axis=0, where=M.T)
    np.testing.assert_allclose(b.T, jaxbp.softmax(ZM, where=M), rtol=1e-15)


def test_softmax_with_where_still_saves_only_its_output():
    s, res = jaxbp.softmax_fwd(ZM, M)
    assert len(res) == 1
    np.testing.assert_array_equal(res[0], s)
    out, (saved, where) = jaxbp.log_softmax_fwd(ZM, M)
    assert where is M or bool(jnp.all(where == M))
    dz, dwhere = jaxbp.log_softmax_bwd((saved, where), GM)
    assert dwhere is None and dz.shape == (3, 4)


def test_jacobian_with_a_mask_is_jax_nn_softmaxs():
    J = jaxbp.jacobian(jaxbp.softmax, ZM, where=M)
    want = jax.vmap(jax.jacrev(lambda z, m: jax.nn.softmax(z, where=m)))(ZM, M)
    assert_close(J, want, jnp.float64)


@pytest.mark.parametrize(
    ("where", "error"),
    [(jnp.ones((3, 4)), TypeError), (jnp.ones((4, 3), bool), ValueError),
     (jnp.ones((2, 3, 4), bool), ValueError)],
    ids=["float-mask", "wrong-shape", "widening"],
)  # fmt: skip
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "softmax_fwd", "log_softmax_fwd"])
def test_bad_where_raises_naming_where(name, where, error):
    fn = getattr(jaxbp, name)
    with pytest.raises(error, match="where"):
        fn(ZM, where=where) if not name.endswith("_fwd") else fn(ZM, where)
