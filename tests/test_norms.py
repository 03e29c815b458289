"""layer_norm / rms_norm: the compact backward vs the reference, equinox, finite differences,
the closed-form Jacobian, residuals, and the edge cases (constant rows, eps, scales)."""

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
from tests.settings import DTYPES, NORM_CASES, Case

LN, RMS = jaxbp.layer_norm, jaxbp.rms_norm
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(4, 6)) * 2.0 + RNG.normal(size=(4, 1)))
GAMMA = jnp.asarray(RNG.uniform(0.5, 1.5, size=6))
BETA = jnp.asarray(RNG.normal(size=6))
G = jnp.asarray(RNG.normal(size=(4, 6)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_manual_gradient_matches_reference(case, dtype):
    check_manual_vs_reference(case, dtype)


@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_gradient_matches_central_finite_differences(case):
    check_finite_differences(case)


@given(
    name=st.sampled_from(["layer_norm", "rms_norm"]),
    batch=sts.batch_shapes(0, 2),
    d=st.integers(2, 7),  # d = 1 is degenerate (x̂ = ±1 or 0): tested by hand below
    scale=sts.scales,
    eps=st.sampled_from([1e-6, 1e-5, 0.1]),
    dtype=sts.float_dtypes,
    seed=sts.seeds,
)
@settings(max_examples=10)
def test_property_any_shape_scale_and_eps_matches_reference(name, batch, d, scale, eps, dtype,
                                                            seed):  # fmt: skip
    def make(rng):
        arrays = {"x": sts.away_from_zero(rng, (*batch, d), scale), "gamma": rng.normal(size=d)}
        if name == "layer_norm":
            arrays["beta"] = rng.normal(size=d)
        return arrays

    diff = ("x", "gamma", "beta") if name == "layer_norm" else ("x", "gamma")
    check_manual_vs_reference(Case("h", name, make, {"eps": eps}, diff, seed), dtype)


# ---------------------------------------------------------------- independent oracles


def _numpy_layer_norm_vjp(x, gamma, g, eps):
    """The Jacobian route in float64 numpy: ∂y_i/∂x_j = γ_i·(δ_ij − 1/d − x̂_i x̂_j/d)/σ."""
    x, gamma, g = (np.asarray(a, np.float64) for a in (x, gamma, g))
    d = x.shape[-1]
    sigma = np.sqrt(x.var(-1, keepdims=True) + eps)
    xhat = (x - x.mean(-1, keepdims=True)) / sigma
    jac = (np.eye(d) - 1.0 / d - xhat[:, :, None] * xhat[:, None, :] / d) / sigma[:, :, None]
    jac = gamma[None, :, None] * jac  # (n, d_out, d_in)
    return np.einsum("ni,nij->nj", g, jac), (g * xhat).sum(0), g.sum(0), jac


def test_layer_norm_gradient_equals_the_jacobian_route_in_numpy():
    dx, dgamma, dbeta, jac = _numpy_layer_norm_vjp(X, GAMMA, G, 1e-5)
    _, res = jaxbp.layer_norm_fwd(X, GAMMA, BETA)
    got = jaxbp.layer_norm_bwd(res, G)
    assert_close(got, (dx, dgamma, dbeta), jnp.float64)
    # jaxbp.jacobian builds the same (n, d, d) matrices from the backward rule.
    assert_close(jaxbp.jacobian(LN, X, GAMMA, BETA), jac, jnp.float64)


def test_rms_norm_jacobian_is_the_closed_form():
    """∂y_i/∂x_j = γ_i·(δ_ij − x̂_i x̂_j/d)/r, from jaxbp.jacobian (the backward rule)."""
    x, gamma = np.asarray(X), np.asarray(GAMMA)
    d = x.shape[-1]
    r = np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    xhat = x / r
    jac = gamma[None, :, None] * (np.eye(d) - xhat[:, :, None] * xhat[:, None, :] / d)
    assert_close(jaxbp.jacobian(RMS, X, GAMMA), jac / r[:, :, None], jnp.float64)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norms_match_equinox_nn(kind):
    """A peer implementation: equinox.nn.LayerNorm / RMSNorm, vmapped over rows."""
    eqx = pytest.importorskip("equinox")
    if kind == "layer":
        peer = eqx.nn.LayerNorm(6, eps=1e-5, dtype=jnp.float64)
        peer = eqx.tree_at(lambda m: (m.weight, m.bias), peer, (GAMMA, BETA))
        ours = functools.partial(LN, eps=1e-5)
        params = (GAMMA, BETA)
    else:
        if not hasattr(eqx.nn, "RMSNorm"):
            pytest.skip("equinox.nn.RMSNorm absent")
        peer = eqx.nn.RMSNorm(6, eps=1e-6, dtype=jnp.float64)
        peer = eqx.tree_at(lambda m: m.weight, peer, GAMMA)
        ours = functools.partial(RMS, eps=1e-6)
        params = (GAMMA,)

    def theirs(x, *p):
        m = eqx.tree_at(lambda m: (m.weight, m.bias) if kind == "layer" else m.weight, peer,
                        p if kind == "layer" else p[0])  # fmt: skip
        return jax.vmap(m)(x)

    got_y, got_vjp = jax.vjp(ours, X, *params)
    want_y, want_vjp = jax.vjp(theirs, X, *params)
    assert_close(got_y, want_y, jnp.float64)
    assert_close(got_vjp(G), want_vjp(G), jnp.float64)


# --------------------------------------------------------------------------- residuals


def test_layer_norm_saves_x_row_statistics_and_gamma_not_xhat():
    x = X.astype(jnp.bfloat16)
    _, (xs, mu, rstd, gamma) = jaxbp.layer_norm_fwd(x, GAMMA.astype(x.dtype), BETA.astype(x.dtype))
    assert xs is not None and xs.shape == (4, 6) and xs.dtype == jnp.bfloat16
    assert mu.shape == rstd.shape == (4,) and mu.dtype == rstd.dtype == jnp.float32
    np.testing.assert_allclose(mu, np.asarray(x, np.float32).mean(-1), rtol=1e-6)
    assert gamma.shape == (6,)


def test_rms_norm_saves_x_inverse_rms_and_gamma():
    _, res = jaxbp.rms_norm_fwd(X, GAMMA)
    assert len(res) == 3 and res[1].shape == (4,)
    np.testing.assert_allclose(res[1], 1 / np.sqrt((np.asarray(X) ** 2).mean(-1) + 1e-6), 1e-14)


# ------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("fn", [LN, jaxbp.reference.layer_norm], ids=["jaxbp", "reference"])
def test_layer_norm_constant_row_has_finite_output_and_gradient(fn):
    x = X.at[1].set(3.0)
    y, vjp = jax.vjp(lambda x, g, b: fn(x, g, b), x, GAMMA, BETA)
    dx, dgamma, dbeta = vjp(G)
    np.testing.assert_allclose(y[1], BETA, rtol=1e-15)  # x̂ = 0: the output is β
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in (y, dx, dgamma, dbeta))
    # By hand: x̂ = 0 and σ = √ε, so dx = (ĝ − mean ĝ)/√ε on that row.
    gh = np.asarray(G[1] * GAMMA)
    np.testing.assert_allclose(dx[1], (gh - gh.mean()) / np.sqrt(1e-5), rtol=1e-10)


def test_layer_norm_constant_row_with_eps_zero_is_nan_like_the_reference():
    x = X.at[1].set(3.0)
    for fn in (LN, jaxbp.reference.layer_norm):
        y = fn(x, GAMMA, BETA, eps=0.0)
        assert bool(jnp.all(jnp.isnan(y[1]))) and bool(
            jnp.all(jnp.isfinite(y[jnp.asarray([0, 2, 3])]))
        )


def test_rms_norm_zero_row_has_finite_gradient():
    x = X.at[2].set(0.0)
    y, vjp = jax.vjp(RMS, x, GAMMA)
    dx, _ = vjp(G)
    np.testing.assert_array_equal(y[2], 0.0)
    np.testing.assert_allclose(dx[2], G[2] * GAMMA / np.sqrt(1e-6), rtol=1e-12)


def test_eps_shrinks_the_output_as_the_formula_says():
    x = np.asarray(X) * 0.01  # variance ~4e-4, comparable with eps
    for eps in (0.0, 1e-4, 1e-2):
        want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
        got = LN(jnp.asarray(x), jnp.ones(6), jnp.zeros(6), eps=eps)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("scale", [1e-6, 1e6, 1e15])
def test_layer_norm_is_scale_invariant_at_huge_and_small_scales_float32(scale):
    """LN(s·x) = LN(x) when ε is negligible; float32 at s = 1e15 (x² ~ 1e30, no overflow)."""
    x = X.astype(jnp.float32)
    eps = 1e-30 if scale < 1 else 1e-5
    y = LN(x * jnp.float32(scale), GAMMA.astype(jnp.float32), BETA.astype(jnp.float32), eps=eps)
    want = LN(x, GAMMA.astype(jnp.float32), BETA.astype(jnp.float32), eps=1e-30)
    assert_close(y, want, jnp.float32)

    def dx(x, eps):
        ones, zeros = jnp.ones(6, jnp.float32), jnp.zeros(6, jnp.float32)
        return jax.grad(lambda x: jnp.sum(LN(x, ones, zeros, eps=eps) * G.astype(x.dtype)))(x)

    g = dx(x * jnp.float32(scale), eps)
    assert bool(jnp.all(jnp.isfinite(g)))
    # dx scales as 1/s: s·dx(s·x) = dx(x)
    g1 = dx(x, 1e-30)
    assert_close(g * jnp.float32(scale), g1, jnp.float32, tol=1e-4)


def test_float16_rows_near_its_max_normalise_with_float32_statistics():
    """x ≈ 6e4 in float16: x² overflows float16 but not float32, where the statistics run."""
    x = (jnp.asarray(RNG.uniform(-1, 1, size=(3, 8))) * 6e4).astype(jnp.float16)
    for fn in (LN, RMS):
        args = (x, jnp.ones(8, jnp.float16)) + ((jnp.zeros(8, jnp.float16),) if fn is LN else ())
        y = fn(*args)
        assert y.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(y)))
        want = fn(*(a.astype(jnp.float32) for a in args))
        assert_close(y, want, jnp.float16)

        def scalar(x, fn=fn, args=args):
            return jnp.sum(
                fn(x, *args[1:]).astype(jnp.float32) * jnp.arange(8.0, dtype=jnp.float32)
            )

        dx = jax.grad(scalar)(x)
        assert dx.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(dx)))


def test_half_precision_gradients_come_back_in_the_input_dtype():
    x, gm, bt = (a.astype(jnp.bfloat16) for a in (X, GAMMA, BETA))
    grads = jax.grad(lambda *a: jnp.sum(LN(*a).astype(jnp.float32)), argnums=(0, 1, 2))(x, gm, bt)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    grads = jax.grad(lambda *a: jnp.sum(RMS(*a).astype(jnp.float32)), argnums=(0, 1))(x, gm)
    assert all(g.dtype == jnp.bfloat16 for g in grads)


def test_nan_in_one_row_stays_in_that_row():
    x = X.at[1, 3].set(jnp.nan)
    for fn, args in ((LN, (GAMMA, BETA)), (RMS, (GAMMA,))):
        y, vjp = jax.vjp(lambda x, fn=fn, args=args: fn(x, *args), x)
        (dx,) = vjp(G)
        assert bool(jnp.all(jnp.isnan(y[1]))) and bool(jnp.all(jnp.isnan(dx[1])))
        rest = jnp.asarray([0, 2, 3])
        assert bool(jnp.all(jnp.isfinite(y[rest]))) and bool(jnp.all(jnp.isfinite(dx[rest])))


def test_single_feature_layer_norm_outputs_beta_with_zero_input_gradient():
    x = jnp.asarray([[2.0], [-7.0]])
    y, vjp = jax.vjp(LN, x, jnp.asarray([3.0]), jnp.asarray([0.5]))
    np.testing.assert_array_equal(y, 0.5)
    dx, dgamma, dbeta = vjp(jnp.asarray([[1.0], [2.0]]))
    np.testing.assert_array_equal(dx, 0.0)
    np.testing.assert_array_equal(dgamma, 0.0)
    np.testing.assert_array_equal(dbeta, 3.0)


def test_single_feature_rms_norm_gradient_is_eps_over_r_cubed():
    """d = 1: y = γx/√(x² + ε), dx = γ·g·ε/(x² + ε)^{3/2}. The compact formula computes it as
    (ĝ − x̂²ĝ)/r, a difference of nearly equal terms, so it keeps ~1e-9 relative here (a
    degenerate width: x̂ = ±1)."""
    x, gamma, eps = jnp.asarray([[0.3], [-2.0]]), jnp.asarray([1.5]), 1e-6
    _, vjp = jax.vjp(functools.partial(RMS, eps=eps), x, gamma)
    dx, _ = vjp(jnp.asarray([[1.0], [2.0]]))
    want = 1.5 * np.asarray([[1.0], [2.0]]) * eps / (np.asarray(x) ** 2 + eps) ** 1.5
    np.testing.assert_allclose(dx, want, rtol=1e-8)


def test_empty_batch_gives_empty_output_and_zero_parameter_gradients():
    x = jnp.zeros((0, 6))
    y, vjp = jax.vjp(LN, x, GAMMA, BETA)
    assert y.shape == (0, 6)
    dx, dgamma, dbeta = vjp(jnp.zeros((0, 6)))
    assert dx.shape == (0, 6)
    np.testing.assert_array_equal(dgamma, 0.0)
    np.testing.assert_array_equal(dbeta, 0.0)


def test_jit_vmap_and_grad_compose():
    def loss(x, gamma, beta):
        h = LN(x, gamma, beta)
        return jnp.sum(RMS(h * 2.0, gamma) * G)

    want = jax.grad(
        lambda *a: jnp.sum(jaxbp.reference.rms_norm(jaxbp.reference.layer_norm(*a) * 2.0, a[1])
                           * G), argnums=(0, 1, 2),
    )(X, GAMMA, BETA)  # fmt: skip
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(X, GAMMA, BETA)
    assert_close(got, want, jnp.float64)
    rows = jax.vmap(lambda x: LN(x, GAMMA, BETA))(X)  # one row at a time, x (d,)
    assert_close(rows, LN(X, GAMMA, BETA), jnp.float64)


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: LN(X, GAMMA[:5], BETA), ValueError, r"gamma: expected shape \(d,\) = \(6,\)"),
        (lambda: LN(X, GAMMA, BETA[None]), ValueError, "beta"),
        (lambda: LN(X, GAMMA.astype(jnp.float32), BETA), TypeError, "gamma: expected the dtype"),
        (lambda: LN(jnp.ones((2, 3), jnp.int32), GAMMA[:3], BETA[:3]), TypeError, "x"),
        (lambda: LN(jnp.ones((2, 0)), GAMMA[:0], BETA[:0]), ValueError, "x: expected a non-empty"),
        (lambda: LN(jnp.float64(1.0), GAMMA, BETA), ValueError, "x"),
        (lambda: LN(X, GAMMA, BETA, eps=-1e-5), ValueError, "eps"),
        (lambda: LN(X, GAMMA, BETA, eps=float("nan")), ValueError, "eps"),
        (lambda: RMS(X, GAMMA[:4]), ValueError, "gamma"),
        (lambda: RMS(X, GAMMA, eps="small"), TypeError, "eps"),
        (lambda: jaxbp.layer_norm_fwd(X, GAMMA[:2], BETA), ValueError, "gamma"),
        (lambda: jaxbp.rms_norm_fwd(X.astype(jnp.float32), GAMMA), TypeError, "gamma"),
    ],
    ids=["gamma-shape", "beta-shape", "gamma-dtype", "int-x", "empty-d", "scalar-x", "eps-neg",
         "eps-nan", "rms-gamma-shape", "rms-eps-str", "fwd-validates", "rms-fwd-validates"],
)  # fmt: skip
def test_bad_inputs_raise_clear_errors_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_traced_eps_equals_the_constant_and_a_string_eps_raises_naming_eps():
    got = jax.jit(lambda e: LN(X, GAMMA, BETA, eps=e))(0.5)
    np.testing.assert_allclose(got, LN(X, GAMMA, BETA, eps=0.5), rtol=1e-12)
    with pytest.raises(TypeError, match="eps: must be a Python number"):
        LN(X, GAMMA, BETA, eps="1e-5")
