"""Elementwise activations: manual backward vs reference, finite differences, residuals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from tests import strategies as sts
from tests.helpers import check_finite_differences, check_manual_vs_reference
from tests.settings import ACTIVATION_CASES, DTYPES, Case


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=str)
def test_manual_gradient_matches_reference(case, dtype):
    check_manual_vs_reference(case, dtype)


@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=str)
def test_gradient_matches_central_finite_differences(case):
    check_finite_differences(case)


_OPTIONS = {
    "relu": [{}],
    "leaky_relu": [{}, {"negative_slope": 0.3}],
    "sigmoid": [{}],
    "tanh": [{}],
    "gelu": [{"approximate": True}, {"approximate": False}],
    "softplus": [{}],
    "silu": [{}],
}


@given(
    name=st.sampled_from(sorted(_OPTIONS)),
    which=st.integers(0, 1),
    shape=sts.shapes(0, 3),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    dtype=sts.float_dtypes,
    seed=sts.seeds,
)
@settings(max_examples=12)
def test_property_any_shape_scale_and_option_matches_reference(
    name, which, shape, scale, dtype, seed
):
    options = _OPTIONS[name][which % len(_OPTIONS[name])]
    if name == "gelu":
        # Far left, the reference (jax.nn.gelu) computes z·(1 + tanh(·)): its cancellation,
        # not the rule, sets the error there, so keep |z| ≤ 3 for the 1e-12 bound.
        scale = min(scale, 1.5)
    case = Case(
        "h",
        name,
        lambda rng: {"z": sts.away_from_zero(rng, shape, scale)},
        options,
        ("z",),
        seed,
    )
    check_manual_vs_reference(case, dtype)


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh", "softplus"])
def test_output_saving_activations_keep_only_their_output(name):
    z = jnp.linspace(-3.0, 3.0, 12, dtype=jnp.float32).reshape(3, 4)
    out, res = getattr(jaxbp, name).fwd(z)
    assert len(res) == 1
    assert res[0].shape == out.shape and res[0].dtype == out.dtype
    np.testing.assert_array_equal(res[0], out)


@pytest.mark.parametrize("name", ["leaky_relu", "gelu"])
def test_input_saving_activations_keep_only_their_input(name):
    z = jnp.linspace(-3.0, 3.0, 12, dtype=jnp.float32).reshape(3, 4)
    _, res = getattr(jaxbp, name).fwd(z)
    assert len(res) == 1
    np.testing.assert_array_equal(res[0], z)


def test_backward_is_elementwise_product_with_derivative():
    z = jnp.asarray([-2.0, -0.5, 0.5, 2.0])
    g = jnp.asarray([1.0, 2.0, 3.0, 4.0])
    s = 1 / (1 + np.exp(-np.asarray(z)))
    _, res = jaxbp.sigmoid_fwd(z)
    np.testing.assert_allclose(jaxbp.sigmoid_bwd(res, g)[0], np.asarray(g) * s * (1 - s), 1e-14)
    _, res = jaxbp.tanh_fwd(z)
    t = np.tanh(np.asarray(z))
    np.testing.assert_allclose(jaxbp.tanh_bwd(res, g)[0], np.asarray(g) * (1 - t * t), 1e-14)


def test_unknown_option_raises_type_error():
    with pytest.raises(TypeError, match="slope"):
        jaxbp.leaky_relu(jnp.ones(3), slope=0.1)


@pytest.mark.parametrize("name", sorted(_OPTIONS))
def test_integer_input_raises_type_error_naming_z(name):
    with pytest.raises(TypeError, match="z"):
        getattr(jaxbp, name)(jnp.arange(3))


def test_registry_holds_every_activation():
    assert set(jaxbp.ACTIVATIONS) == set(_OPTIONS) | {"swish"}
    for name, fn in jaxbp.ACTIVATIONS.items():
        assert fn is getattr(jaxbp, name)


def test_activation_grad_has_input_dtype_for_bfloat16():
    z = jnp.asarray([-1.0, 0.5, 2.0], jnp.bfloat16)
    for name in _OPTIONS:
        f = getattr(jaxbp, name)
        g = jax.grad(lambda z, f=f: jnp.sum(f(z).astype(jnp.float32)))(z)
        assert g.dtype == jnp.bfloat16, name


# ------------------------------------------------------------------ GELU far into the tails
# Oracles in float64 from scipy, at the very float32 points the op sees:
#   exact  x·Φ(x),  Φ = scipy.special.ndtr;  derivative Φ(x) + x·φ(x)
#   tanh   x·σ(v),  v = 2√(2/π)(x + 0.044715x³), σ = scipy.special.expit (so ½(1 + tanh(v/2))
#          without its cancellation);  derivative σ(v) + x·σ(v)σ(−v)·v'
_GELU_Z32 = np.linspace(-12.0, 5.0, 1701).astype(np.float32)
_TINY32 = float(np.finfo(np.float32).tiny)


def _gelu_oracle(approximate):
    x = _GELU_Z32.astype(np.float64)
    if approximate:
        v = 2.0 * np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)
        dv = 2.0 * np.sqrt(2.0 / np.pi) * (1.0 + 3 * 0.044715 * x**2)
        s = scipy.special.expit(v)
        terms = (s, x * s * scipy.special.expit(-v) * dv)
        # Where σ(v) itself is below float32's normal range the float32 result is ~0.
        representable = s > 2 * _TINY32
    else:
        terms = (scipy.special.ndtr(x), x * np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi))
        representable = np.ones_like(x, bool)
    return x * terms[0], terms, representable


def _gelu_value_and_grad(approximate):
    def f(z):
        return jaxbp.gelu(z, approximate=approximate)

    return jax.jit(lambda z: (f(z), jax.vmap(jax.grad(f))(z)))


_GELU_VG = {a: _gelu_value_and_grad(a) for a in (True, False)}


@pytest.mark.parametrize("approximate", [False, True], ids=["erf", "tanh"])
def test_gelu_float32_value_and_derivative_keep_relative_precision_from_minus_12_to_5(approximate):
    value, terms, ok = _gelu_oracle(approximate)
    got, dgot = (np.asarray(a, np.float64) for a in _GELU_VG[approximate](_GELU_Z32))
    assert got.dtype == dgot.dtype == np.float64  # (cast above; the op ran in float32)
    assert ok.sum() > 1400  # [−10, 5] at least (tanh form), all of [−12, 5] (exact form)
    np.testing.assert_allclose(got[ok], value[ok], rtol=2e-5, atol=0)
    # The derivative crosses 0 near z = −0.75 (a sum of two terms of opposite sign): there
    # relative error is measured against the size of the terms, |Φ| + |z·φ|.
    deriv, scale = terms[0] + terms[1], np.abs(terms[0]) + np.abs(terms[1])
    err = np.abs(dgot - deriv)
    assert np.all(err[ok] <= 2e-5 * scale[ok]), _GELU_Z32[ok][np.argmax(err[ok] / scale[ok])]
    # Below float32's normal range: 0 or a denormal, never a wrong sign or a large value.
    assert np.all(np.abs(got[~ok]) <= 1e-34) and np.all(np.abs(dgot[~ok]) <= 1e-34)
    assert np.all(got[~ok] <= 0.0)


def test_exact_gelu_far_left_tail_values_match_x_times_phi():
    # −5.294529 once came out −7.89e-07 (true −3.16e-07) and −6 came out −0.0 (true −5.9e-09).
    z = np.asarray([-5.294529, -6.0, -8.0], np.float32)
    expected = z.astype(np.float64) * scipy.special.ndtr(z.astype(np.float64))
    assert abs(expected[0] + 3.16e-07) < 1e-9 and abs(expected[1] + 5.9e-09) < 1e-10
    got = np.asarray(jaxbp.gelu(jnp.asarray(z), approximate=False), np.float64)
    np.testing.assert_allclose(got, expected, rtol=2e-5)


# ---------------------------------------------------------------------------- silu / swish


def test_swish_is_silu_under_a_second_name():
    assert jaxbp.swish is jaxbp.silu
    assert jaxbp.swish_fwd is jaxbp.silu_fwd and jaxbp.swish_bwd is jaxbp.silu_bwd
    assert jaxbp.ACTIVATIONS["swish"] is jaxbp.ACTIVATIONS["silu"] is jaxbp.silu
    assert jaxbp.reference.swish is jaxbp.reference.silu


def test_silu_saves_its_input_and_its_derivative_matches_float64_numpy_far_out():
    z = np.linspace(-40.0, 40.0, 161)
    s = scipy.special.expit(z)
    want = s * (1.0 + z * scipy.special.expit(-z))  # σ(z) + z·σ(z)·(1 − σ(z))
    _, res = jaxbp.silu_fwd(jnp.asarray(z, jnp.float32))
    assert len(res) == 1 and res[0].dtype == jnp.float32
    (dz,) = jaxbp.silu_bwd(res, jnp.ones(161, jnp.float32))
    np.testing.assert_allclose(np.asarray(dz, np.float64), want, rtol=2e-6, atol=1e-30)
    np.testing.assert_allclose(jaxbp.silu(jnp.asarray(z)), z * s, rtol=1e-15)
