"""Losses: mse, sigmoid BCE, softmax CE with every option, vs reference and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jaxbp
from tests import strategies as sts
from tests.helpers import check_finite_differences, check_manual_vs_reference
from tests.settings import CE_CASES, DTYPES, LOSS_CASES, Case

CASES = LOSS_CASES + CE_CASES


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_manual_gradient_matches_reference(case, dtype):
    check_manual_vs_reference(case, dtype)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradient_matches_central_finite_differences(case):
    check_finite_differences(case)


def _ce_case(d, options, seed=0):
    diff = ("logits",)
    if jnp.issubdtype(np.asarray(d["labels"]).dtype, jnp.floating):
        diff += ("labels",)
    if "class_weights" in d:
        diff += ("class_weights",)
    return Case("ce-h", "softmax_cross_entropy", lambda rng: d, options, diff, seed)


@given(inputs=sts.ce_inputs(), dtype=sts.exact_dtypes)
@settings(max_examples=8)  # each option combination compiles anew
def test_property_every_option_combination_matches_reference(inputs, dtype):
    """where × class_weights × label_smoothing × ignore_index × z_loss, ids and probabilities."""
    d, options = inputs
    check_manual_vs_reference(_ce_case(d, options), dtype)


@given(inputs=sts.ce_inputs(max_c=5))
@settings(max_examples=4)
def test_property_every_option_combination_matches_finite_differences(inputs):
    d, options = inputs
    d = {**d, "logits": np.clip(d["logits"], -30, 30)}  # keep f(x ± h) well conditioned
    case = _ce_case(d, options)
    check_finite_differences(case, directions=2)


def test_ce_gradient_is_p_minus_y_for_one_hot_labels():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 4))
    y = rng.integers(0, 4, size=5)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    dz = jax.grad(lambda z: jnp.sum(jaxbp.softmax_cross_entropy(z, jnp.asarray(y))))(jnp.asarray(z))
    np.testing.assert_allclose(dz, p - np.eye(4)[y], rtol=1e-12, atol=1e-15)
    loss = jaxbp.softmax_cross_entropy(jnp.asarray(z), jnp.asarray(y))
    np.testing.assert_allclose(loss, -np.log(p[np.arange(5), y]), rtol=1e-12)


def test_ce_residuals_hold_no_new_n_by_c_array():
    """softmax_cross_entropy_fwd saves the inputs and lse (n,): p is recomputed."""
    n, c = 6, 5
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(n, c)))
    for labels in (jnp.asarray(rng.integers(0, c, n)), jax.nn.softmax(z[::-1])):
        _, res = jaxbp.softmax_cross_entropy_fwd(z, labels)
        leaves = jax.tree.leaves(res)
        nc = [leaf for leaf in leaves if leaf.shape == (n, c)]
        inputs_nc = 1 + (labels.ndim == 2)
        assert len(nc) == inputs_nc, [leaf.shape for leaf in leaves]
        np.testing.assert_array_equal(nc[0], z)
        assert (
            sum(leaf.size for leaf in leaves)
            == n * c * inputs_nc + labels.size * (labels.ndim == 1) + n
        )  # logits, labels, lse (n,)


def test_mse_residual_is_the_difference_only():
    pred, target = jnp.ones((3, 4)), jnp.zeros((3, 4))
    _, res = jaxbp.mse_fwd(pred, target)
    assert len(res) == 1 and res[0].shape == (3, 4)


def test_mse_is_mean_over_last_axis():
    pred = jnp.asarray([[1.0, 2.0], [3.0, 5.0]])
    target = jnp.asarray([[0.0, 0.0], [3.0, 3.0]])
    np.testing.assert_allclose(jaxbp.mse(pred, target), [2.5, 2.0])


def test_bce_matches_closed_form_and_gradient_is_sigmoid_minus_y():
    zn, yn = np.asarray([-3.0, -0.5, 0.5, 40.0]), np.asarray([0.0, 1.0, 0.3, 1.0])
    z, y = jnp.asarray(zn), jnp.asarray(yn)
    s = 1 / (1 + np.exp(-zn))
    expected = -yn[:3] * np.log(s[:3]) - (1 - yn[:3]) * np.log(1 - s[:3])
    loss = jaxbp.sigmoid_binary_cross_entropy(z, y)
    np.testing.assert_allclose(loss[:3], expected, rtol=1e-12)
    np.testing.assert_allclose(loss[3], np.exp(-40.0), rtol=1e-6)  # no log(1 − 1) = −inf
    dz = jax.grad(lambda z: jnp.sum(jaxbp.sigmoid_binary_cross_entropy(z, y)))(z)
    np.testing.assert_allclose(dz, s - np.asarray(y), rtol=1e-12)


def test_bce_bool_labels_equal_integer_labels():
    z = jnp.asarray([[-1.0, 2.0]])
    lb = jnp.asarray([[True, False]])
    np.testing.assert_array_equal(
        jaxbp.sigmoid_binary_cross_entropy(z, lb),
        jaxbp.sigmoid_binary_cross_entropy(z, lb.astype(jnp.int32)),
    )


def test_ce_bad_options_raise_naming_the_option():
    z, y = jnp.zeros((2, 3)), jnp.asarray([0, 1])
    with pytest.raises(ValueError, match="label_smoothing"):
        jaxbp.softmax_cross_entropy(z, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        jaxbp.softmax_cross_entropy(z, y, z_loss=-1.0)
    with pytest.raises(TypeError, match="ignore_index"):
        jaxbp.softmax_cross_entropy(z, y, ignore_index=1.0)
    with pytest.raises(ValueError, match="class_weights"):
        jaxbp.softmax_cross_entropy(z, y, class_weights=jnp.ones(2))
    with pytest.raises(TypeError, match="where"):
        jaxbp.softmax_cross_entropy(z, y, where=jnp.ones(2))
    with pytest.raises(ValueError, match="where"):
        jaxbp.softmax_cross_entropy(z, y, where=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="ignore_index"):
        jaxbp.softmax_cross_entropy(z, jnp.full((2, 3), 1 / 3), ignore_index=-100)
    with pytest.raises(ValueError, match="labels"):
        jaxbp.softmax_cross_entropy(z, jnp.asarray([0, 1, 2]))
    with pytest.raises(TypeError, match="labels"):
        jaxbp.softmax_cross_entropy(z, jnp.asarray([True, False]))


def test_bce_label_shape_mismatch_raises_naming_labels():
    with pytest.raises(ValueError, match="labels"):
        jaxbp.sigmoid_binary_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 1)))
