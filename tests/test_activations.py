"""Elementwise activations: manual backward vs reference, finite differences, residuals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from tests import strategies as sts
from tests.checks import check_finite_differences, check_manual_vs_reference
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
        # Far left, gelu is ~z·e^{-z²/2} computed as z·(1 + tanh(·)) by both codes: the
        # cancellation, not the rule, sets the error, so keep |z| ≤ 3 for the 1e-12 bound.
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
    out, res = getattr(jaxbp, name + "_fwd")(z)
    assert len(res) == 1
    assert res[0].shape == out.shape and res[0].dtype == out.dtype
    np.testing.assert_array_equal(res[0], out)


@pytest.mark.parametrize("name", ["leaky_relu", "gelu"])
def test_input_saving_activations_keep_only_their_input(name):
    z = jnp.linspace(-3.0, 3.0, 12, dtype=jnp.float32).reshape(3, 4)
    _, res = getattr(jaxbp, name + "_fwd")(z)
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
    assert set(jaxbp.ACTIVATIONS) == set(_OPTIONS)
    for name, fn in jaxbp.ACTIVATIONS.items():
        assert fn is getattr(jaxbp, name)


def test_activation_grad_has_input_dtype_for_bfloat16():
    z = jnp.asarray([-1.0, 0.5, 2.0], jnp.bfloat16)
    for name in _OPTIONS:
        f = getattr(jaxbp, name)
        g = jax.grad(lambda z, f=f: jnp.sum(f(z).astype(jnp.float32)))(z)
        assert g.dtype == jnp.bfloat16, name
