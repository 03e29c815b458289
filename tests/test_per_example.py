"""Per-example gradients, norms without per-example gradients, DP-SGD clipping.

Every expected value comes from ``jax.vmap(jax.grad(ℓ_k))`` of the plain-jnp network
(``jaxbp.reference``) or from an identity written out in the test, never from the code
under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp import per_example as pe
from tests.helpers import assert_close

LOSSES = ("softmax_cross_entropy", "mse", "sigmoid_binary_cross_entropy")


def _problem(sizes, n, *, loss="softmax_cross_entropy", activation="tanh", seed=0,
             dtype=jnp.float64, loss_options=()):  # fmt: skip
    """A model, parameters, inputs and labels drawn by numpy (no compilation per shape)."""
    model = jaxbp.MLP(sizes, activation=activation, loss=loss, loss_options=loss_options)
    rng = np.random.default_rng(seed)
    params = [
        {"w": jnp.asarray(rng.normal(size=(i, o)) / np.sqrt(i), dtype),
         "b": jnp.asarray(0.1 * rng.normal(size=(o,)), dtype)}
        for i, o in zip(sizes[:-1], sizes[1:], strict=True)
    ]  # fmt: skip
    x = jnp.asarray(rng.normal(size=(n, sizes[0])), dtype)
    c = sizes[-1]
    if loss == "softmax_cross_entropy":
        labels = jnp.asarray(rng.integers(0, c, size=(n,)))
    else:
        labels = jnp.asarray(rng.uniform(size=(n, c)), dtype)
    return model, params, x, labels


def _tree_sq_norms(tree):
    return sum(
        np.sum(np.asarray(g, np.float64).reshape(g.shape[0], -1) ** 2, axis=-1)
        for g in jax.tree.leaves(tree)
    )


def _shapes_in(closed_jaxpr):
    """Every intermediate shape in a jaxpr, nested jaxprs (jit, custom rules) included."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.update(tuple(v.aval.shape) for v in eqn.outvars)
            for p in eqn.params.values():
                for sub in p if isinstance(p, tuple | list) else (p,):
                    if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


# ------------------------------------------------------------------ per-example grads


@pytest.mark.parametrize("loss", LOSSES)
def test_per_example_grads_equal_vmap_grad_of_each_examples_loss(loss):
    model, params, x, labels = _problem((5, 7, 6, 3), 8, loss=loss)
    where = jnp.array([True, True, False, True, True, True, False, True])
    got = jaxbp.per_example_grads(model)(params, x, labels, where=where)
    want = jaxbp.reference.per_example_grads(model)(params, x, labels, where=where)
    assert_close(got, want, jnp.float64)
    assert got[0]["w"].shape == (8, 5, 7) and got[2]["b"].shape == (8, 3)
    # Masked rows contribute exactly nothing.
    assert all(np.all(np.asarray(g)[~np.asarray(where)] == 0.0) for g in jax.tree.leaves(got))


def test_per_example_grads_are_unscaled_and_average_to_the_mean_gradient():
    model, params, x, labels = _problem((4, 6, 3), 7, activation="relu")
    where = jnp.array([True, False, True, True, True, False, True])
    per_ex = jaxbp.per_example_grads(model)(params, x, labels, where=where)
    _, mean = jaxbp.reference.value_and_grad(model)(params, x, labels, where=where)
    assert_close(jax.tree.map(lambda g: g.sum(0) / 5.0, per_ex), mean, jnp.float64)

    # One example alone: its gradient is the plain gradient of its own loss.
    k = 3
    _, alone = jaxbp.reference.value_and_grad(model)(params, x[k : k + 1], labels[k : k + 1])
    assert_close(jax.tree.map(lambda g: g[k], per_ex), alone, jnp.float64)


def test_per_example_grads_with_class_weights_smoothing_and_ignore_index():
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "ignore_index": -1}
    model, params, x, _ = _problem((4, 5, 3), 6, loss_options=opts)
    labels = jnp.array([0, 2, -1, 1, 1, 0])
    cw = jnp.array([1.0, 2.0, 0.5], jnp.float64)
    got = jaxbp.per_example_grads(model)(params, x, labels, class_weights=cw)
    want = jaxbp.reference.per_example_grads(model)(params, x, labels, class_weights=cw)
    assert_close(got, want, jnp.float64)
    assert float(jnp.max(jnp.abs(got[0]["w"][2]))) == 0.0  # the ignored row
    norms = jaxbp.per_example_grad_norms(model)(params, x, labels, class_weights=cw)
    np.testing.assert_allclose(norms, np.sqrt(_tree_sq_norms(want)), rtol=1e-12)


# A small pool of shapes, so that most examples reuse a compiled function: values, masks
# and clip bounds are traced; shapes, losses and activations are not.
ARCHS = st.sampled_from([(3, 1), (4, 6, 3), (2, 5, 1, 3)])
BATCHES = st.sampled_from([6])  # the mask makes 0 to 6 of them count


@settings(max_examples=6)
@given(
    sizes=ARCHS,
    n=BATCHES,
    mask_bits=st.integers(0, 63),
    loss=st.sampled_from(LOSSES),
    seed=st.integers(0, 2**16),
)
def test_per_example_grad_norms_equal_norms_of_materialised_vmap_grad(
    sizes, n, mask_bits, loss, seed
):
    model, params, x, labels = _problem(tuple(sizes), n, loss=loss, seed=seed)
    where = jnp.array([(mask_bits >> k) & 1 == 1 for k in range(n)])
    got = jaxbp.per_example_grad_norms(model)(params, x, labels, where=where)
    ref = jaxbp.reference.per_example_grads(model)(params, x, labels, where=where)
    want = np.sqrt(_tree_sq_norms(ref))
    assert got.shape == (n,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-300)
    assert np.all(np.asarray(got)[~np.asarray(where)] == 0.0)


def test_per_example_grad_norms_float32_within_tolerance():
    model, params, x, labels = _problem((10, 16, 16, 4), 32, dtype=jnp.float32, activation="gelu")
    got = jaxbp.per_example_grad_norms(model)(params, x, labels)
    want = jaxbp.reference.per_example_grad_norms(model)(params, x, labels)
    assert got.dtype == jnp.float32
    assert_close(got, want, jnp.float32)


def test_per_example_grad_norms_never_form_per_example_gradients():
    model, params, x, labels = _problem((5, 7, 6, 3), 4)
    shapes = _shapes_in(
        jax.make_jaxpr(jaxbp.per_example_grad_norms(model).jitted)(params, x, labels, None, None)
    )
    for i, o in zip(model.sizes[:-1], model.sizes[1:], strict=True):
        assert (4, i, o) not in shapes
    # ...whereas the per-example gradients do hold them (the check can see them).
    shapes = _shapes_in(
        jax.make_jaxpr(jaxbp.per_example_grads(model).jitted)(params, x, labels, None, None)
    )
    assert (4, 5, 7) in shapes


# ------------------------------------------------------------ layer level, sequences


def _seq_problem(n, t, i, h, c, seed):
    """A sequence model: dense (n,t,i)→(n,t,h), tanh, dense →(n,t,c), CE summed over t."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    params = [
        {"w": jax.random.normal(ks[0], (i, h), jnp.float64) / np.sqrt(i),
         "b": 0.1 * jax.random.normal(ks[1], (h,), jnp.float64)},
        {"w": jax.random.normal(ks[2], (h, c), jnp.float64) / np.sqrt(h),
         "b": 0.1 * jax.random.normal(ks[3], (c,), jnp.float64)},
    ]  # fmt: skip
    x = jax.random.normal(ks[4], (n, t, i), jnp.float64)
    labels = jax.random.randint(ks[5], (n, t), 0, c)

    def loss_one(p, xk, yk, eps=(0.0, 0.0)):  # xk (t, i), yk (t,): Σ_t CE
        z1 = xk @ p[0]["w"] + p[0]["b"] + eps[0]
        z2 = jnp.tanh(z1) @ p[1]["w"] + p[1]["b"] + eps[1]
        return jnp.sum(jaxbp.reference.softmax_cross_entropy(z2, yk))

    # Per-example references: vmap(grad) over the batch.
    ref = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, x, labels)
    # Layer inputs and δ = ∂ℓ_k/∂z (n, t, o): the gradient of Σ_k ℓ_k at a zero offset of z.
    z1 = x @ params[0]["w"] + params[0]["b"]
    acts = [x, jnp.tanh(z1)]
    zeros = (jnp.zeros((n, t, h), jnp.float64), jnp.zeros((n, t, c), jnp.float64))

    def total(eps):
        return jnp.sum(jax.vmap(loss_one, in_axes=(None, 0, 0, 0))(params, x, labels, eps))

    deltas = jax.grad(total)(zeros)
    return ref, acts, deltas


@pytest.mark.parametrize(
    "n, t, i, h, c",
    [
        (3, 2, 5, 4, 3),  # t² < i·o in both layers: ghost norms
        (2, 6, 2, 2, 3),  # t² > i·o: outer products
        (1, 1, 3, 1, 1),  # one example, one token, one hidden unit, one class
    ],
)
def test_sequence_ghost_and_outer_norms_equal_vmap_grad(n, t, i, h, c):
    ref, acts, deltas = jax.jit(_seq_problem, static_argnums=(0, 1, 2, 3, 4))(n, t, i, h, c, 3)
    methods = ("ghost", "outer", "auto")

    @jax.jit  # one compilation per layer shape
    def layer_results(a, d):
        sq = {m: pe.dense_grad_sq_norms(a, d, bias=False, method=m) for m in methods}
        sq_b = {m: pe.dense_grad_sq_norms(a, d, method=m) for m in methods}
        return sq, sq_b, pe.dense_per_example_grads(a, d)

    for layer in range(2):
        want_w = np.sum(np.asarray(ref[layer]["w"]).reshape(n, -1) ** 2, axis=-1)
        want_b = np.sum(np.asarray(ref[layer]["b"]) ** 2, axis=-1)
        sq, sq_b, per_ex = layer_results(acts[layer], deltas[layer])
        for method in methods:
            np.testing.assert_allclose(sq[method], want_w, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(sq_b[method], want_w + want_b, rtol=1e-10, atol=1e-14)
        assert_close(per_ex, ref[layer], jnp.float64)


def test_dense_grad_sq_norms_on_flat_inputs_is_goodfellows_identity():
    a = jnp.array([[1.0, 2.0], [0.0, 3.0]], jnp.float64)  # ‖a‖² = 5, 9
    d = jnp.array([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]], jnp.float64)  # ‖δ‖² = 3, 4
    np.testing.assert_array_equal(pe.dense_grad_sq_norms(a, d, bias=False), [15.0, 36.0])
    np.testing.assert_array_equal(pe.dense_grad_sq_norms(a, d), [18.0, 40.0])


def test_auto_method_keeps_the_smaller_intermediate():
    assert pe.ghost_norm_is_cheaper(4, 8, 8) and not pe.ghost_norm_is_cheaper(16, 4, 4)
    n = 3

    def shapes(t, i, o):
        a = jnp.ones((n, t, i), jnp.float32)
        d = jnp.ones((n, t, o), jnp.float32)
        return _shapes_in(jax.make_jaxpr(pe.dense_grad_sq_norms)(a, d))

    few_tokens = shapes(t=2, i=8, o=8)  # t² = 4 < 64: Gram matrices
    assert (n, 2, 2) in few_tokens and (n, 8, 8) not in few_tokens
    many_tokens = shapes(t=16, i=2, o=3)  # t² = 256 > 6: outer products
    assert (n, 2, 3) in many_tokens and (n, 16, 16) not in many_tokens


def test_layer_functions_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="delta: expected shape"):
        pe.dense_grad_sq_norms(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)))
    with pytest.raises(ValueError, match="a: expected shape"):
        pe.dense_grad_sq_norms(jnp.ones((4,)), jnp.ones((4,)))
    with pytest.raises(ValueError, match="method"):
        pe.dense_grad_sq_norms(jnp.ones((2, 3)), jnp.ones((2, 5)), method="fast")
    with pytest.raises(TypeError, match="delta: expected a floating dtype"):
        pe.dense_per_example_grads(jnp.ones((2, 3)), jnp.ones((2, 5), jnp.int32))


# ------------------------------------------------------------------------ DP-SGD


@settings(max_examples=8)
@given(
    sizes=ARCHS,
    n=BATCHES,
    mask_bits=st.integers(0, 63),
    log_clip=st.floats(-3.0, 2.0),
    method=st.sampled_from(pe.CLIP_METHODS),
    loss=st.sampled_from(LOSSES),
    seed=st.integers(0, 2**16),
)
def test_clipped_grad_equals_clipping_materialised_vmap_grad(
    sizes, n, mask_bits, log_clip, method, loss, seed
):
    model, params, x, labels = _problem(tuple(sizes), n, loss=loss, seed=seed)
    where = jnp.array([(mask_bits >> k) & 1 == 1 for k in range(n)])
    clip = 10.0**log_clip
    grads, norms = jaxbp.clipped_grad(model, l2_clip=clip, method=method)(
        params, x, labels, where=where
    )
    # Expected, written out: clip each materialised per-example gradient, sum, divide.
    ref = jaxbp.reference.per_example_grads(model)(params, x, labels, where=where)
    ref_norms = np.sqrt(_tree_sq_norms(ref))
    factor = np.minimum(1.0, clip / np.where(ref_norms > 0, ref_norms, 1.0))
    m = max(int(np.sum(np.asarray(where))), 1)
    want = jax.tree.map(lambda g: np.tensordot(factor, np.asarray(g), axes=(0, 0)) / m, ref)
    assert_close(grads, want, jnp.float64)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-10, atol=1e-300)
    # Each clipped contribution has norm ≤ C, so the clipped mean has norm ≤ C.
    total = np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree.leaves(grads)))
    assert total <= clip * (1 + 1e-9)


@pytest.mark.parametrize("method", ["bookkeeping", "two_pass"])
def test_clipped_grad_float32_and_noise_equal_the_reference(method):
    model, params, x, labels = _problem((6, 8, 8, 4), 16, dtype=jnp.float32, activation="relu")
    key = jax.random.PRNGKey(7)
    f = jaxbp.clipped_grad(model, l2_clip=0.3, noise_multiplier=1.1, method=method)
    g = jaxbp.reference.clipped_grad(model, l2_clip=0.3, noise_multiplier=1.1)
    got, got_norms = f(params, x, labels, key=key)
    want, want_norms = g(params, x, labels, key=key)
    assert_close(got, want, jnp.float32)
    assert_close(got_norms, want_norms, jnp.float32)
    assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, params)


def test_clipped_grad_with_a_huge_bound_is_the_plain_mean_gradient():
    model, params, x, labels = _problem((5, 6, 3), 9, dtype=jnp.float32)
    where = jnp.arange(9) < 7
    grads, _ = jaxbp.clipped_grad(model, l2_clip=1e30)(params, x, labels, where=where)
    _, mean = jaxbp.reference.value_and_grad(model)(params, x, labels, where=where)
    assert_close(grads, mean, jnp.float32)


def test_clipped_grad_zero_norm_examples_and_all_masked_batch_stay_finite():
    model, params, x, _ = _problem((4, 5, 3), 6, loss="mse")
    # A zero last layer outputs exactly 0 (whatever the rounding of the layers below), so
    # zero targets are a perfect fit: every per-example gradient is exactly 0...
    params[-1] = jax.tree.map(jnp.zeros_like, params[-1])
    targets = jnp.zeros((6, 3), jnp.float64).at[:2].add(1.0)  # ...but for the first two rows
    grads, norms = jaxbp.clipped_grad(model, l2_clip=0.1)(params, x, targets)
    assert np.all(np.asarray(norms)[2:] == 0.0) and np.all(np.asarray(norms)[:2] > 0.1)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    want, _ = jaxbp.reference.clipped_grad(model, l2_clip=0.1)(params, x, targets)
    assert_close(grads, want, jnp.float64)

    none = jnp.zeros((6,), bool)
    grads, norms = jaxbp.clipped_grad(model, l2_clip=0.1)(params, x, targets, where=none)
    assert np.all(np.asarray(norms) == 0.0)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


def test_padding_rows_contribute_nothing_even_with_garbage_inputs():
    model, params, x, labels = _problem((4, 5, 3), 6)
    pad_x = jnp.concatenate([x, 1e6 * jnp.ones((3, 4), jnp.float64)])
    pad_labels = jnp.concatenate([labels, jnp.array([0, 1, 2])])
    where = jnp.arange(9) < 6
    f = jaxbp.clipped_grad(model, l2_clip=0.5)
    padded, padded_norms = f(params, pad_x, pad_labels, where=where)
    plain, plain_norms = f(params, x, labels)
    assert_close(padded, plain, jnp.float64)
    assert_close(padded_norms[:6], plain_norms, jnp.float64)


def test_batch_size_fixes_the_divisor():
    model, params, x, labels = _problem((4, 5, 3), 6)
    where = jnp.arange(6) < 4
    by_valid, _ = jaxbp.clipped_grad(model, l2_clip=0.5)(params, x, labels, where=where)
    by_fixed, _ = jaxbp.clipped_grad(model, l2_clip=0.5, batch_size=8)(
        params, x, labels, where=where
    )
    assert_close(by_fixed, jax.tree.map(lambda g: g * 4.0 / 8.0, by_valid), jnp.float64)


def test_noise_has_mean_zero_and_std_sigma_times_clip():
    model, params, x, labels = _problem((6, 8, 3), 5)
    clip, sigma, n = 0.5, 2.0, 5
    clean, _ = jaxbp.clipped_grad(model, l2_clip=clip)(params, x, labels)
    noisy_fn = jaxbp.clipped_grad(model, l2_clip=clip, noise_multiplier=sigma)
    keys = jax.random.split(jax.random.PRNGKey(123), 60)
    draws = [noisy_fn(params, x, labels, key=k)[0] for k in keys]  # one compilation
    # The noise on the clipped sum, before dividing by n: 60 draws × 83 parameters.
    noise = np.concatenate(
        [((np.asarray(a) - np.asarray(c)) * n).ravel()
         for d in draws
         for a, c in zip(jax.tree.leaves(d), jax.tree.leaves(clean), strict=True)]
    )  # fmt: skip
    assert noise.size == 60 * (6 * 8 + 8 + 8 * 3 + 3)
    assert abs(noise.mean()) < 0.05 * sigma * clip
    assert abs(noise.std() / (sigma * clip) - 1.0) < 0.05
    # The same key gives the same noise; another key other noise.
    a, _ = noisy_fn(params, x, labels, key=keys[0])
    b, _ = noisy_fn(params, x, labels, key=keys[0])
    c, _ = noisy_fn(params, x, labels, key=keys[1])
    assert_close(a, b, jnp.float64, tol=0.0)
    assert float(jnp.max(jnp.abs(a[0]["w"] - c[0]["w"]))) > 0.0


def test_noise_without_a_key_is_a_clear_error():
    model, params, x, labels = _problem((4, 3), 2)
    with pytest.raises(ValueError, match="key: noise_multiplier=1.0 > 0 needs a PRNG key"):
        jaxbp.clipped_grad(model, l2_clip=1.0, noise_multiplier=1.0)(params, x, labels)
    # Without noise the key is optional and ignored.
    a, _ = jaxbp.clipped_grad(model, l2_clip=1.0)(params, x, labels)
    b, _ = jaxbp.clipped_grad(model, l2_clip=1.0)(params, x, labels, key=jax.random.PRNGKey(1))
    assert_close(a, b, jnp.float64, tol=0.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"l2_clip": 0.0}, ValueError, "l2_clip: expected a finite float > 0"),
        ({"l2_clip": float("inf")}, ValueError, "l2_clip"),
        ({"l2_clip": "big"}, TypeError, "l2_clip"),
        ({"l2_clip": 1.0, "noise_multiplier": -1.0}, ValueError, "noise_multiplier"),
        ({"l2_clip": 1.0, "batch_size": 0}, ValueError, "batch_size"),
        ({"l2_clip": 1.0, "method": "ghost"}, ValueError, "method"),
    ],
)
def test_clipped_grad_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        jaxbp.clipped_grad(jaxbp.MLP((3, 2)), **kwargs)


def test_transforms_reject_a_non_model_naming_the_interface_and_bad_inputs():
    for transform in (
        jaxbp.per_example_grad_norms,
        jaxbp.per_example_grads,
        lambda m: jaxbp.clipped_grad(m, l2_clip=1.0),
        jaxbp.value_and_grad,
    ):
        with pytest.raises(TypeError, match=r"forward\(t, params, \*batch\).*has no forward"):
            transform(lambda x: x)
    model, params, x, labels = _problem((4, 3), 2)
    with pytest.raises(ValueError, match="x: expected shape"):
        jaxbp.per_example_grads(model)(params, x[:, :3], labels)


# --------------------------------------------------------------- jit/vmap composition


def test_transforms_compose_with_jit_and_vmap_over_microbatches():
    model, params, x, labels = _problem((5, 6, 3), 8)
    norms_fn = jaxbp.per_example_grad_norms(model)
    clip_fn = jaxbp.clipped_grad(model, l2_clip=0.2)
    whole = norms_fn(params, x, labels)

    # jit around the public functions.
    jitted = jax.jit(lambda p, a, b: (norms_fn(p, a, b), clip_fn(p, a, b)[0]))(params, x, labels)
    assert_close(jitted[0], whole, jnp.float64)
    assert_close(jitted[1], clip_fn(params, x, labels)[0], jnp.float64)

    # vmap over 2 microbatches of 4: the same norms; clipped mean of means = mean over all.
    xs, ys = x.reshape(2, 4, 5), labels.reshape(2, 4)
    micro = jax.vmap(lambda a, b: norms_fn(params, a, b))(xs, ys)
    assert_close(micro.reshape(8), whole, jnp.float64)
    micro_grads, _ = jax.vmap(lambda a, b: clip_fn(params, a, b))(xs, ys)
    assert_close(
        jax.tree.map(lambda g: g.mean(0), micro_grads), clip_fn(params, x, labels)[0], jnp.float64
    )

    # vmap over per-example grads equals per-example grads (rows are independent).
    per = jax.vmap(lambda a, b: jaxbp.per_example_grads(model)(params, a, b))(xs, ys)
    assert_close(
        jax.tree.map(lambda g: g.reshape(8, *g.shape[2:]), per),
        jaxbp.per_example_grads(model)(params, x, labels),
        jnp.float64,
    )


def test_return_loss_gives_the_mean_loss_over_valid_rows_first():
    model, params, x, labels = _problem((4, 5, 3), 6)
    where = jnp.arange(6) < 5
    loss, grads, norms = jaxbp.clipped_grad(model, l2_clip=0.5, return_loss=True)(
        params, x, labels, where=where
    )
    want_loss, _ = jaxbp.reference.value_and_grad(model)(params, x, labels, where=where)
    assert_close(loss, want_loss, jnp.float64)
    ref_loss, ref_grads, ref_norms = jaxbp.reference.clipped_grad(
        model, l2_clip=0.5, return_loss=True
    )(params, x, labels, where=where)
    assert_close((loss, grads, norms), (ref_loss, ref_grads, ref_norms), jnp.float64)


def test_forward_backward_weighted_gives_the_gradient_of_the_seeded_sum():
    model, params, x, labels = _problem((4, 5, 3), 6, activation="softplus")
    where = jnp.arange(6) != 2
    seed = jnp.array([0.5, -1.0, 7.0, 2.0, 0.0, 3.0], jnp.float64)
    run = jax.jit(pe.forward_backward_weighted, static_argnums=0)
    per_ex, grads = run(model, params, x, labels, where, None, seed=seed)

    def seeded(p):  # Σ_k s_k·ℓ_k over the valid rows, differentiated by JAX
        losses = model.per_example_loss(p, x, labels, ops=jaxbp.reference)
        return jnp.sum(jnp.where(where, seed * losses, 0.0))

    assert_close(grads, jax.grad(seeded)(params), jnp.float64)
    ref_losses = model.per_example_loss(params, x, labels, ops=jaxbp.reference)
    assert_close(per_ex, jnp.where(where, ref_losses, 0.0), jnp.float64)  # masked: loss 0


def test_bfloat16_norms_are_float32_and_close_to_the_float32_reference():
    model, params, x, labels = _problem((8, 16, 4), 16, dtype=jnp.float32)
    to_bf16 = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
    got = jaxbp.per_example_grad_norms(model)(to_bf16(params), to_bf16(x), labels)
    assert got.dtype == jnp.float32
    # The reference on the same bfloat16-rounded values, in float32.
    up = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), to_bf16(t))
    want = jaxbp.reference.per_example_grad_norms(model)(up(params), up(x), labels)
    assert_close(got, want, jnp.bfloat16)


# ------------------------------------------------------------------ jaxbp train --dp-clip


def test_dp_training_on_the_digits_runs_and_prints_accuracy(capsys):
    from jaxbp import cli

    argv = ["train", "--sizes", "64,16,10", "--epochs", "2", "--batch-size", "128", "--lr",
            "0.01", "--dp-clip", "1.0", "--noise", "1.1"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("test accuracy ")[-1].split(",")[0])
    assert 0.2 < accuracy <= 1.0  # ten classes: chance is 0.1
    with pytest.raises(SystemExit) as e:  # no --dp-clip: a usage error, before any work
        cli.main(["train", "--epochs", "1", "--noise", "1.0"])
    assert e.value.code == 2
    assert "needs --dp-clip" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the GPT
#
# An example is one sequence; its loss is the mean over its valid tokens. The oracle:
# jax.vmap over sequences of jax.grad of the plain twin's mean loss on one sequence
# (jaxbp.reference.per_example_grads of a GPT), and clipping/noise applied to those.


def _gpt(n=3, t=5, seed=0, dtype=jnp.float64, **kw):
    model = jaxbp.GPT(**({"vocab": 13, "d": 8, "heads": 2, "layers": 2, "context": 6} | kw))
    params = model.init(jax.random.PRNGKey(seed), dtype)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    params = jax.tree.unflatten(tree, [
        a + (0.1 * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype)
        for a, k in zip(leaves, keys, strict=True)
    ])  # fmt: skip
    ki, kt = jax.random.split(jax.random.PRNGKey(seed + 2))
    ids = jax.random.randint(ki, (n, t), 0, model.vocab, jnp.int32)
    targets = jax.random.randint(kt, (n, t), 0, model.vocab, jnp.int32)
    return model, params, ids, targets


# Each option's values, paired so that every value meets a masked batch (the last sequence
# fully masked, the first half masked) and an unmasked one.
GPT_OPTIONS = [
    ({"tied": True, "attention": "store", "head_strategy": "forward"}, True),
    ({"tied": False, "attention": "recompute", "head_strategy": "recompute"}, True),
    ({"tied": True, "attention": "recompute", "head_strategy": "recompute"}, False),
    ({"tied": False, "attention": "store", "head_strategy": "forward", "heads": 4}, False),
]


def _gpt_where(n, t):
    where = np.ones((n, t), bool)
    where[0, : t // 2] = False
    where[-1] = False  # a sequence with nothing valid: gradient 0, norm 0, factor 1
    return jnp.asarray(where)


@pytest.mark.parametrize(("options", "masked"), GPT_OPTIONS,
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
                         if isinstance(o, dict) else ("where" if o else "all"))  # fmt: skip
def test_gpt_per_example_transforms_equal_vmap_grad_of_the_twin_per_sequence(options, masked):
    model, params, ids, targets = _gpt(**options)
    kw = {"where": _gpt_where(*ids.shape)} if masked else {}
    want = jaxbp.reference.per_example_grads(model)(params, ids, targets, **kw)
    assert_close(jaxbp.per_example_grads(model)(params, ids, targets, **kw), want, jnp.float64)
    norms = np.sqrt(_tree_sq_norms(want))
    got = jaxbp.per_example_grad_norms(model)(params, ids, targets, **kw)
    assert_close(got, norms, jnp.float64)
    if masked:
        assert float(got[-1]) == 0.0
    for method in ("bookkeeping", "two_pass"):
        grads, n = jaxbp.clipped_grad(model, l2_clip=0.7 * float(np.median(norms[norms > 0])),
                                      method=method)(params, ids, targets, **kw)  # fmt: skip
        ref = jaxbp.reference.clipped_grad(model, l2_clip=0.7 * float(np.median(norms[norms > 0])))(
            params, ids, targets, **kw
        )
        assert_close((grads, n), ref, jnp.float64)


def test_gpt_clipped_grad_with_noise_equals_the_reference_draws_in_float32():
    model, params, ids, targets = _gpt(dtype=jnp.float32, tied=True)
    key = jax.random.PRNGKey(3)
    got = jaxbp.clipped_grad(model, l2_clip=0.5, noise_multiplier=1.3)(
        params, ids, targets, key=key)  # fmt: skip
    want = jaxbp.reference.clipped_grad(model, l2_clip=0.5, noise_multiplier=1.3)(
        params, ids, targets, key=key)  # fmt: skip
    assert_close(got, want, jnp.float32)


def test_gpt_clipped_grad_with_a_huge_bound_is_the_mean_of_the_sequences_mean_gradients():
    model, params, ids, targets = _gpt()
    grads, _ = jaxbp.clipped_grad(model, l2_clip=1e30)(params, ids, targets)
    # no mask: every sequence has t valid tokens, so that is value_and_grad's token mean
    assert_close(grads, jaxbp.value_and_grad(model)(params, ids, targets)[1], jnp.float64)


@settings(max_examples=5, derandomize=True, deadline=None)
@given(n=st.integers(1, 3), t=st.integers(1, 4), heads=st.sampled_from([1, 2]),
       vocab=st.integers(3, 9), tied=st.booleans())  # fmt: skip
def test_gpt_per_example_norms_over_shapes(n, t, heads, vocab, tied):
    model, params, ids, targets = _gpt(n, t, vocab=vocab, heads=heads, d=4, layers=1,
                                       context=4, tied=tied)  # fmt: skip
    want = np.sqrt(_tree_sq_norms(jaxbp.reference.per_example_grads(model)(params, ids, targets)))
    assert_close(jaxbp.per_example_grad_norms(model)(params, ids, targets), want, jnp.float64)


def test_gpt_norms_never_form_an_n_t_v_array_nor_a_per_example_table():
    model = jaxbp.GPT(vocab=3000, d=8, heads=2, layers=1, context=4, tied=True,
                      head_strategy="recompute")  # v > the 1024-column chunk  # fmt: skip
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
    ids = jax.ShapeDtypeStruct((2, 4), jnp.int32)
    shapes = _shapes_in(jax.make_jaxpr(jaxbp.per_example_grad_norms(model).jitted)(
        params, ids, ids, None))  # fmt: skip
    big = [s for s in shapes if 3000 in s and len(s) >= 2 and s != (3000, 8) and s != (8, 3000)
           and 0 not in s]  # fmt: skip
    assert not big, big  # only the table itself (v, d), the head wᵀ (d, v), and the
    # embedding residual's empty (v, 0), which holds the table's shape and no bytes


@pytest.mark.parametrize("op_name", ["dense", "embedding", "position_embedding", "layer_norm",
                                     "linear_softmax_cross_entropy"])  # fmt: skip
def test_a_planted_bug_in_a_per_example_rule_is_caught_by_the_vmap_grad_oracle(
    monkeypatch, op_name
):
    op = getattr(jaxbp, op_name)
    right = op.example_grads

    def wrong(res, g, *, examples, **options):  # example k's rows paired with k+1's g
        rolled = jnp.roll(g.reshape(examples, -1), 1, axis=0).reshape(g.shape)
        return right(res, rolled, examples=examples, **options)

    model, params, ids, targets = _gpt(tied=True)
    # uneven valid counts: the head's g = 1/n_valid(k) differs between examples, so a
    # rolled g is another g (with every count equal it would be the same)
    where = _gpt_where(*ids.shape)
    want = jaxbp.reference.per_example_grad_norms(model)(params, ids, targets, where=where)
    monkeypatch.setattr(op, "example_grads", wrong)
    got = jaxbp.per_example_grad_norms(model)(params, ids, targets, where=where)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(got, want, jnp.float64)
