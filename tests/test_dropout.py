"""dropout: the mask is jax.random.bernoulli's (Equinox's and Flax's from the same key), the
hand-written backward against the reference and finite differences, the key-only residual,
rate 0 and 1, NaN, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from tests import strategies as sts
from tests.helpers import assert_close, check_finite_differences, check_manual_vs_reference
from tests.settings import DROPOUT_CASES, DTYPES

DROP, REF = jaxbp.dropout, jaxbp.reference.dropout
X = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)))
KEY = jax.random.PRNGKey(3)


def _keep(key, rate, shape):
    """The oracle mask, written out: ``jax.random.bernoulli(key, 1 − rate, shape)``."""
    return np.asarray(jax.random.bernoulli(key, 1.0 - rate, shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=str)
def test_manual_gradient_matches_reference(case, dtype):
    check_manual_vs_reference(case, dtype)


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=str)
def test_gradient_matches_central_finite_differences(case):
    check_finite_differences(case)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_forward_and_backward_are_the_bernoulli_mask_scaled_by_one_over_keep(rate):
    keep = _keep(KEY, rate, X.shape)
    want = np.where(keep, np.asarray(X) / (1 - rate), 0.0)
    np.testing.assert_allclose(DROP(X, KEY, rate=rate), want, rtol=4e-16, atol=0)
    g = jnp.asarray(np.random.default_rng(1).normal(size=X.shape))
    dx = jax.grad(lambda x: jnp.sum(DROP(x, KEY, rate=rate) * g))(X)
    np.testing.assert_allclose(dx, np.where(keep, np.asarray(g) / (1 - rate), 0.0), rtol=1e-15)
    # The rules called directly, as an explicit loop calls them: the backward draws the
    # forward's mask again from the saved key.
    y, res = jaxbp.dropout_fwd(X, KEY, rate=rate)
    (dx_rule, dkey) = jaxbp.dropout_bwd(res, g, rate=rate)
    np.testing.assert_array_equal(y, DROP(X, KEY, rate=rate))
    np.testing.assert_array_equal(dx_rule, dx)
    assert dkey is None


def test_the_same_key_gives_equinoxs_and_flaxs_mask():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 16)), jnp.float32)

    def same(ours, theirs):  # the same entries dropped; kept ones within an ulp (they divide)
        np.testing.assert_array_equal(ours == 0, np.asarray(theirs) == 0)
        np.testing.assert_allclose(ours, theirs, rtol=2e-7, atol=0)

    eqx = pytest.importorskip("equinox")
    same(DROP(x, KEY, rate=0.3), eqx.nn.Dropout(0.3)(x, key=KEY))
    try:
        from flax import nnx
    except ImportError:
        return
    same(DROP(x, KEY, rate=0.3), nnx.Dropout(0.3)(x, rngs=KEY))
    shared = DROP(x, KEY, rate=0.3, broadcast_dims=(0,))
    same(shared, nnx.Dropout(0.3, broadcast_dims=(0,))(x, rngs=KEY))


def test_typed_and_raw_keys_give_the_same_mask_and_different_keys_different_masks():
    typed = jax.random.wrap_key_data(KEY)
    np.testing.assert_array_equal(DROP(X, typed, rate=0.5), DROP(X, KEY, rate=0.5))
    assert not np.array_equal(DROP(X, jax.random.PRNGKey(4), rate=0.5), DROP(X, KEY, rate=0.5))


def test_broadcast_dims_share_one_mask_along_those_axes():
    y = np.asarray(DROP(jnp.ones((5, 7, 3)), KEY, rate=0.5, broadcast_dims=(0, -1)))
    assert (y == y[:1, :, :1]).all()  # the same along axes 0 and 2
    assert len(np.unique(y[0, :, 0])) == 2  # but not along axis 1


@given(shape=sts.shapes(1, 3, 6), rate=st.floats(0.05, 0.95), seed=sts.seeds)
@settings(max_examples=15)
def test_property_any_shape_and_rate_match_the_reference_and_the_oracle(shape, rate, seed):
    x = jnp.asarray(np.random.default_rng(seed).normal(size=shape))
    key = jax.random.PRNGKey(seed)
    g = jnp.asarray(np.random.default_rng(seed + 1).normal(size=shape))
    f = jax.jit(lambda x: jax.value_and_grad(lambda x: jnp.sum(DROP(x, key, rate=rate) * g))(x))
    value, dx = f(x)
    keep = _keep(key, rate, shape)
    want = np.sum(np.where(keep, np.asarray(x) / (1 - rate), 0.0) * np.asarray(g))
    np.testing.assert_allclose(value, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, np.where(keep, np.asarray(g) / (1 - rate), 0.0), rtol=1e-15)
    # the twin: the same bits, eager or jitted
    np.testing.assert_array_equal(DROP(x, key, rate=rate), REF(x, key, rate=rate))
    np.testing.assert_array_equal(
        jax.jit(lambda x: REF(x, key, rate=rate))(x), REF(x, key, rate=rate)
    )


def test_inverted_scaling_keeps_the_mean():
    x = jnp.ones((512, 512))
    for rate in (0.1, 0.5, 0.8):
        y = DROP(x, KEY, rate=rate)
        kept = float(jnp.mean(y != 0))
        assert abs(kept - (1 - rate)) < 0.01, (rate, kept)
        assert abs(float(jnp.mean(y)) - 1.0) < 0.02 / (1 - rate), rate


def test_rate_0_is_the_identity_and_needs_no_key():
    assert DROP(X, None, rate=0.0) is X
    assert DROP(X, KEY, rate=0) is X
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(DROP(x, None, rate=0.0)))(X), 1.0)
    y, res = jaxbp.dropout_fwd(X, KEY, rate=0.0)
    np.testing.assert_array_equal(y, X)
    np.testing.assert_array_equal(jaxbp.dropout_bwd(res, X, rate=0.0)[0], X)


def test_dropout_rate_1_gives_zeros_and_a_zero_gradient():
    for fn in (DROP, REF):
        y = fn(X, KEY, rate=1.0)
        np.testing.assert_array_equal(y, 0.0)
        dx = jax.grad(lambda x, fn=fn: jnp.sum(fn(x, KEY, rate=1.0) * 3.0))(X)
        np.testing.assert_array_equal(dx, 0.0)
        assert not np.any(np.isnan(dx))
        np.testing.assert_array_equal(fn(X, None, rate=1.0), 0.0)  # nothing drawn: no key
    # eqx.nn.Dropout(p=1) divides by 0 in its backward: NaN gradients, which jaxbp avoids.
    eqx = pytest.importorskip("equinox")
    assert np.isnan(jax.grad(lambda x: jnp.sum(eqx.nn.Dropout(1.0)(x, key=KEY)))(X)).all()


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), float("inf")])
def test_dropout_rate_outside_0_1_raises_value_error(rate):
    for fn in (DROP, REF):
        with pytest.raises(ValueError, match=r"rate: expected a number in \[0, 1\]"):
            fn(X, KEY, rate=rate)


def test_nan_is_never_dropped_to_a_finite_value():
    x = X.at[:, 0].set(jnp.nan)
    keep = _keep(KEY, 0.5, X.shape)
    assert keep[:, 0].any() and not keep[:, 0].all()  # some NaN entries dropped, some kept
    for fn in (DROP, REF):
        assert np.isnan(fn(x, KEY, rate=0.5)[:, 0]).all()
        assert np.isnan(fn(x, KEY, rate=1.0)[:, 0]).all()
    g = jnp.ones_like(X).at[:, 1].set(jnp.nan)  # a NaN cotangent reaches dx, dropped or kept
    _, res = jaxbp.dropout_fwd(X, KEY, rate=0.5)
    assert np.isnan(jaxbp.dropout_bwd(res, g, rate=0.5)[0][:, 1]).all()


def test_the_only_residual_is_the_key():
    """The backward draws the mask again: between a forward and a backward run apart it
    holds 8 bytes, where autodiff of the reference holds the mask (a byte per entry)."""
    _, res = jaxbp.dropout_fwd(X, KEY, rate=0.5)
    assert len(res) == 1 and res[0] is not None and res[0].nbytes == 8

    def held(fn):
        _, vjp = jax.vjp(lambda x: fn(x, KEY, rate=0.5), X)
        return sum(a.nbytes for a in jax.tree.leaves(vjp) if hasattr(a, "nbytes"))

    assert held(DROP) <= 8
    assert held(REF) >= X.size  # the bool mask at least


def test_half_precision_keeps_its_dtype_and_matches_float32():
    x16 = X.astype(jnp.bfloat16)
    y = DROP(x16, KEY, rate=0.25)
    assert y.dtype == jnp.bfloat16
    dx = jax.grad(lambda x: jnp.sum(DROP(x, KEY, rate=0.25).astype(jnp.float32)))(x16)
    assert dx.dtype == jnp.bfloat16
    want = DROP(x16.astype(jnp.float32), KEY, rate=0.25)
    assert_close(y, want, jnp.bfloat16)


def test_per_example_keys_under_vmap_give_each_example_its_own_mask():
    keys = jax.random.split(KEY, X.shape[0])
    y = jax.vmap(lambda x, k: DROP(x, k, rate=0.5))(X, keys)
    for i in (0, 1, 17):
        np.testing.assert_array_equal(y[i], DROP(X[i], keys[i], rate=0.5))
    assert not np.array_equal(y[0] != 0, y[1] != 0)


BAD = [
    (dict(x=jnp.ones(3, jnp.int32)), TypeError, "x: expected a floating dtype"),
    (dict(key=None), TypeError, r"key: expected one PRNG key .* got None"),
    (dict(key=jnp.zeros(2)), TypeError, "key: expected one PRNG key"),
    (dict(key=jax.random.split(KEY, 3)), TypeError, r"got uint32 of shape \(3, 2\)"),
    (dict(broadcast_dims=(2,)), ValueError, r"broadcast_dims: expected axes of x \(ndim 2\)"),
    (dict(broadcast_dims=0), TypeError, "broadcast_dims: expected a tuple of ints"),
    (dict(rate="0.5"), TypeError, "rate: must be a Python number"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "error", "message"), BAD)
def test_bad_arguments_raise_clear_errors(change, error, message):
    kw = {"x": X, "key": KEY, "rate": 0.5, **change}
    x, key = kw.pop("x"), kw.pop("key")
    for fn in (DROP, REF):
        with pytest.raises(error, match=message):
            fn(x, key, **kw)


def test_a_traced_rate_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="rate: must be a Python number, got a traced value"):
        jax.jit(lambda r: DROP(X, KEY, rate=r))(0.5)
