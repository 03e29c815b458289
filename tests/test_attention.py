"""attention: the hand-written backward (store and recompute) vs the reference,
``jax.nn.dot_product_attention``, finite differences and hand-computed cases; masks, fully
masked rows, t = 1, memory of the recompute strategy, the Jacobian, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp.attention import RECOMPUTE_BLOCK
from tests import strategies as sts
from tests.helpers import assert_close, check_finite_differences, check_manual_vs_reference
from tests.settings import ATTENTION_CASES, DTYPES, Case

ATT, REF = jaxbp.attention, jaxbp.reference.attention
STRATEGIES = ("store", "recompute")
RNG = np.random.default_rng(0)


def qkvg(n=2, h=2, t=5, s=None, e=3, dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)
    s = t if s is None else s
    shapes = ((n, h, t, e), (n, h, s, e), (n, h, s, e), (n, h, t, e))
    return tuple(jnp.asarray(rng.normal(size=sh), dtype) for sh in shapes)


def vjp(fn, q, k, v, g, **kw):
    out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
    return out, pullback(g)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_manual_gradient_matches_reference(case, dtype):
    check_manual_vs_reference(case, dtype)


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_gradient_matches_central_finite_differences(case):
    check_finite_differences(case)


@given(
    batch=sts.batch_shapes(0, 2, 3),
    h=st.integers(1, 3),
    t=st.integers(1, 6),
    s=st.integers(1, 6),
    e=st.integers(1, 4),
    causal=st.booleans(),
    masked=st.booleans(),
    strategy=st.sampled_from(STRATEGIES),
    dtype=sts.float_dtypes,
    seed=sts.seeds,
)
@settings(max_examples=10)
def test_property_any_shape_mask_and_strategy_matches_reference(
    batch, h, t, s, e, causal, masked, strategy, dtype, seed
):
    s = t if causal else s

    def make(rng):
        d = {name: rng.normal(size=(*batch, h, n, e)) for name, n in (("q", t), ("k", s), ("v", s))}
        if masked:
            d["where"] = rng.uniform(size=(*batch, 1, t, s)) < 0.7
        return d

    case = Case("h", "attention", make, {"causal": causal, "strategy": strategy}, ("q", "k", "v"),
                seed)  # fmt: skip
    check_manual_vs_reference(case, dtype)


# ---------------------------------------------------------------- independent oracles

HAS_DPA = hasattr(jax.nn, "dot_product_attention")


def _dpa(q, k, v, *, causal, mask=None):
    """``jax.nn.dot_product_attention`` on our layout: it takes ``(n, t, h, e)``."""
    sw = lambda a: jnp.swapaxes(a, -2, -3)  # noqa: E731
    with jax.numpy_dtype_promotion("standard"):  # it mixes float32 into its logits
        out = jax.nn.dot_product_attention(sw(q), sw(k), sw(v), mask=mask, is_causal=causal)
    return sw(out)


@pytest.mark.skipif(not HAS_DPA, reason="jax.nn.dot_product_attention absent in this JAX")
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("masking", ["causal", "none", "where"])
def test_matches_jax_nn_dot_product_attention_in_float32(masking, strategy):
    q, k, v, g = qkvg(t=6, e=4, dtype=jnp.float32, seed=1)
    mask = None
    if masking == "where":  # every row keeps key 0: no fully masked row (jax.nn averages v)
        m = RNG.uniform(size=(2, 2, 6, 6)) < 0.5
        m[..., 0] = True
        mask = jnp.asarray(m)
    causal = masking == "causal"
    got = vjp(ATT, q, k, v, g, causal=causal, where=mask, strategy=strategy)
    want = vjp(functools.partial(_dpa, mask=mask), q, k, v, g, causal=causal)
    assert_close(got, want, jnp.float32)


def _numpy_attention_vjp(q, k, v, g, mask):
    """By hand, float64 numpy, through the explicit (s, s) Jacobian of every softmax row."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    e = q.shape[-1]
    S = q @ np.swapaxes(k, -1, -2) / np.sqrt(e)
    S = np.where(mask, S, -np.inf)
    P = np.exp(S - S.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    O = P @ v
    dP = g @ np.swapaxes(v, -1, -2)
    J = np.einsum("...ts,sr->...tsr", P, np.eye(P.shape[-1])) - P[..., :, None] * P[..., None, :]
    dS = np.einsum("...tsr,...ts->...tr", J, dP)  # Jᵀ·dP, row by row (J is symmetric)
    dq = dS @ k / np.sqrt(e)
    dk = np.swapaxes(dS, -1, -2) @ q / np.sqrt(e)
    dv = np.swapaxes(P, -1, -2) @ g
    return O, (dq, dk, dv)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_the_explicit_softmax_jacobian_route_in_numpy(strategy):
    q, k, v, g = qkvg(t=5)
    mask = np.tril(np.ones((5, 5), bool))
    got = vjp(ATT, q, k, v, g, strategy=strategy)
    assert_close(got, _numpy_attention_vjp(q, k, v, g, mask), jnp.float64)


@pytest.mark.parametrize("t", [RECOMPUTE_BLOCK + 2, 2 * RECOMPUTE_BLOCK, 2 * RECOMPUTE_BLOCK + 37])
@pytest.mark.parametrize("masking", ["causal", "where"])
def test_recompute_over_several_query_blocks_equals_store_and_reference(t, masking):
    q, k, v, g = qkvg(n=1, h=2, t=t, e=4)
    opts = {"causal": True} if masking == "causal" else {
        "causal": False, "where": jnp.asarray(RNG.uniform(size=(1, 1, t, t)) < 0.3)}  # fmt: skip
    ref = vjp(REF, q, k, v, g, **opts)
    for strategy in STRATEGIES:
        assert_close(vjp(ATT, q, k, v, g, strategy=strategy, **opts), ref, jnp.float64)


# ------------------------------------------------------------------------ masking edges


@pytest.mark.parametrize("fn", [ATT, REF], ids=["jaxbp", "reference"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fully_masked_rows_give_zero_output_and_zero_gradient(fn, strategy):
    q, k, v, g = qkvg(t=4)
    m = np.ones((2, 2, 4, 4), bool)
    m[0, 1, 2] = False  # example 0, head 1, query 2 sees no key
    m[1, :, :, 3] = False  # key 3 of example 1 is seen by nobody
    where = jnp.asarray(m)
    out, (dq, dk, dv) = vjp(fn, q, k, v, g, causal=False, where=where, strategy=strategy)
    np.testing.assert_array_equal(out[0, 1, 2], 0.0)
    np.testing.assert_array_equal(dq[0, 1, 2], 0.0)
    np.testing.assert_array_equal(dk[1, :, 3], 0.0)
    np.testing.assert_array_equal(dv[1, :, 3], 0.0)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in (out, dq, dk, dv))
    nowhere = jnp.zeros((4, 4), bool)  # every row masked
    out, grads = vjp(fn, q, k, v, g, causal=False, where=nowhere, strategy=strategy)
    np.testing.assert_array_equal(out, 0.0)
    for d in grads:
        np.testing.assert_array_equal(d, 0.0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_masking_is_inf_free_huge_masked_scores_do_not_leak(strategy):
    """A key with huge values is invisible to every query before it (causal): their outputs
    and gradients equal those of the same sequence without it, exactly 0 probability."""
    q, k, v, g = qkvg(n=1, h=1, t=5, dtype=jnp.float32)
    # Scores ~ +1e30 against key 4, for every query; only query 4 may see it.
    k_huge = k.at[..., 4, :].set(jnp.sign(q.sum(-2)) * 1e30)
    out, (dq, dk, dv) = vjp(ATT, q, k_huge, v, g, strategy=strategy)
    out4, (dq4, dk4, dv4) = vjp(ATT, q[..., :4, :], k[..., :4, :], v[..., :4, :], g[..., :4, :],
                                strategy=strategy)  # fmt: skip
    assert_close(out[..., :4, :], out4, jnp.float32)
    assert_close(dq[..., :4, :], dq4, jnp.float32)
    assert_close(dv[..., :4, :], dv4, jnp.float32)
    assert bool(jnp.all(jnp.isfinite(dk))) and bool(jnp.all(jnp.isfinite(dv)))
    # Query 4 sees it: P is one-hot on key 4 there (a saturated softmax, finite throughout).
    np.testing.assert_allclose(out[..., 4, :], v[..., 4, :], rtol=1e-6)
    assert bool(jnp.all(jnp.isfinite(dq)))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("causal", [True, False])
def test_single_position_attends_to_itself(strategy, causal):
    """t = s = 1: P = 1, so O = v, dv = g, and dq = dk = 0 (a softmax of one score is flat)."""
    q, k, v, g = qkvg(t=1)
    out, (dq, dk, dv) = vjp(ATT, q, k, v, g, causal=causal, strategy=strategy)
    np.testing.assert_allclose(out, v, rtol=1e-15)
    np.testing.assert_allclose(dv, g, rtol=1e-15)
    np.testing.assert_array_equal(dq, 0.0)
    np.testing.assert_array_equal(dk, 0.0)


def test_causal_first_query_sees_only_the_first_key():
    q, k, v, g = qkvg(t=4)
    out = ATT(q, k, v)
    np.testing.assert_allclose(out[..., 0, :], v[..., 0, :], rtol=1e-15)
    _, (dq, dk, dv) = vjp(ATT, q, k, v, g.at[..., 1:, :].set(0.0))  # only row 0 matters
    np.testing.assert_allclose(dv[..., 0, :], g[..., 0, :], rtol=1e-15)
    np.testing.assert_array_equal(dv[..., 1:, :], 0.0)
    np.testing.assert_array_equal(dq, 0.0)
    np.testing.assert_array_equal(dk, 0.0)


def test_where_broadcasts_like_jax_nn_and_a_2d_mask_equals_its_full_form():
    q, k, v, g = qkvg(t=4, s=6)
    m2 = jnp.asarray(RNG.uniform(size=(4, 6)) < 0.6).at[:, 0].set(True)
    full = jnp.broadcast_to(m2, (2, 2, 4, 6))
    for strategy in STRATEGIES:
        a = vjp(ATT, q, k, v, g, causal=False, where=m2, strategy=strategy)
        b = vjp(ATT, q, k, v, g, causal=False, where=full, strategy=strategy)
        assert_close(a, b, jnp.float64)


def test_nan_in_a_query_row_stays_in_that_row_and_reaches_the_keys_it_sees():
    q, k, v, g = qkvg(n=1, h=1, t=4)
    q = q.at[0, 0, 2, 1].set(jnp.nan)
    for strategy in STRATEGIES:
        out, (dq, dk, dv) = vjp(ATT, q, k, v, g, strategy=strategy)
        rows = np.isnan(np.asarray(out)).any(-1)[0, 0]
        np.testing.assert_array_equal(rows, [False, False, True, False], err_msg=strategy)
        np.testing.assert_array_equal(np.isnan(np.asarray(dq)).any(-1)[0, 0], rows)
        # causal: query 2 sees keys 0, 1, 2, so their dk and dv are NaN; dv = Pᵀ·g of key 3
        # is not (dk of key 3 is, through 0·NaN in dSᵀ·q, as in any matmul attention)
        assert bool(jnp.all(jnp.isnan(dk[0, 0, :3]).any(-1)))
        np.testing.assert_array_equal(np.isnan(np.asarray(dv)).any(-1)[0, 0],
                                      [True, True, True, False])  # fmt: skip


def test_nan_in_a_value_reaches_the_rows_that_see_it():
    q, k, v, g = qkvg(n=1, h=1, t=4)
    v = v.at[0, 0, 2, 1].set(jnp.nan)
    for strategy in STRATEGIES:
        out, (dq, _, dv) = vjp(ATT, q, k, v, g, strategy=strategy)
        assert bool(jnp.all(jnp.isnan(out[..., 2:, 1]))), strategy
        assert bool(jnp.all(jnp.isnan(dq[..., 2:, :])))  # dP = g·vᵀ is NaN in their rows
        assert bool(jnp.all(jnp.isfinite(dv)))  # dv = Pᵀ·g does not read v


# --------------------------------------------------------------------- residuals, memory


def test_store_saves_p_and_recompute_saves_only_the_log_sum_exp():
    q, k, v, _ = qkvg(t=5, s=7)
    _, res = jaxbp.attention_fwd(q, k, v, causal=False, strategy="store")
    assert len(res) == 4 and res[3].shape == (2, 2, 5, 7)  # P (n, h, t, s)
    np.testing.assert_allclose(res[3].sum(-1), 1.0, rtol=1e-14)
    _, res = jaxbp.attention_fwd(q, k, v, causal=False, strategy="recompute")
    q_, k_, v_, where, L = res
    assert where is None and L.shape == (2, 2, 5)  # L (n, h, t): no (t, s) array
    S = np.asarray(q) @ np.swapaxes(np.asarray(k), -1, -2) / np.sqrt(3)
    np.testing.assert_allclose(L, np.log(np.exp(S).sum(-1)), rtol=1e-14)
    qb = q.astype(jnp.bfloat16)
    _, res = jaxbp.attention_fwd(qb, qb, qb, strategy="recompute")
    assert res[4].dtype == jnp.float32


def _temp_bytes(fn, t):
    spec = jax.ShapeDtypeStruct((1, 2, t, 16), jnp.float32)

    def step(q, k, v, g):
        return jax.vjp(fn, q, k, v)[1](g)

    return jax.jit(step).lower(spec, spec, spec, spec).compile().memory_analysis()


def test_recompute_keeps_no_t_by_s_array_its_temporary_memory_is_linear_in_t():
    """Compiled temporary bytes of forward + backward at t and 2t (t ≥ 2 blocks): recompute
    grows ≤ 2.2× (linear), store ≥ 3× (it keeps P (t, s)), and at 2t recompute needs less
    than a third of store's."""
    t = 2 * RECOMPUTE_BLOCK
    sizes = {}
    for strategy in STRATEGIES:
        fn = functools.partial(ATT, strategy=strategy)
        ma = [_temp_bytes(fn, tt) for tt in (t, 2 * t)]
        if ma[0] is None:
            pytest.skip("no memory analysis on this backend")
        sizes[strategy] = [m.temp_size_in_bytes for m in ma]
    rec, store = sizes["recompute"], sizes["store"]
    assert rec[1] / rec[0] <= 2.2, sizes
    assert store[1] / store[0] >= 3.0, sizes
    assert rec[1] < store[1] / 3, sizes


# ------------------------------------------------------------------ Jacobian, composition


def test_jacobian_with_respect_to_q_is_block_diagonal_in_heads_and_queries():
    q, k, v, _ = qkvg(n=2, h=2, t=3, e=2)
    J = jaxbp.jacobian(ATT, q, k, v, argnum=0)  # (n, h, t, e, h', t', e')
    assert J.shape == (2, 2, 3, 2, 2, 3, 2)
    full = jax.vmap(jax.jacrev(lambda q, k, v: REF(q[None], k[None], v[None])[0]))(q, k, v)
    assert_close(J, full, jnp.float64)
    same = np.einsum("ab,cd->acbd", np.eye(2), np.eye(3)).astype(bool)  # h = h', t = t'
    off = np.where(same[None, :, :, None, :, :, None], 0.0, np.asarray(J))
    np.testing.assert_array_equal(off, 0.0)
    # Row t of the output against k, v: every key it can see, a full (s, e) block.
    Jk = jaxbp.jacobian(ATT, q, k, v, argnum=1)
    assert Jk.shape == (2, 2, 3, 2, 2, 3, 2)


def test_grad_under_jit_and_vmap_composes():
    q, k, v, g = qkvg(t=4)

    def loss(fn, q, k, v, strategy):
        o = fn(q, k, v, strategy=strategy)
        return jnp.sum(jnp.tanh(fn(o, k, v, causal=False, strategy=strategy)) * g)

    want = jax.grad(functools.partial(loss, REF), argnums=(0, 1, 2))(q, k, v, "store")
    for strategy in STRATEGIES:
        got = jax.jit(jax.grad(functools.partial(loss, ATT, strategy=strategy),
                               argnums=(0, 1, 2)))(q, k, v)  # fmt: skip
        assert_close(got, want, jnp.float64)
        per_example = jax.vmap(lambda q, k, v, s=strategy: ATT(q, k, v, strategy=s))(q, k, v)
        assert_close(per_example, ATT(q, k, v), jnp.float64)


def test_bfloat16_computes_in_float32_and_returns_input_dtype():
    q, k, v, g = qkvg(t=6, e=8, dtype=jnp.bfloat16)
    for strategy in STRATEGIES:
        out, grads = vjp(ATT, q, k, v, g, strategy=strategy)
        assert out.dtype == jnp.bfloat16 and all(d.dtype == jnp.bfloat16 for d in grads)
        want = vjp(ATT, *(a.astype(jnp.float32) for a in (q, k, v, g)), strategy=strategy)
        assert_close((out, grads), want, jnp.bfloat16)


# ------------------------------------------------------------------------------- errors

_Q, _K, _V, _ = qkvg(t=4, s=6)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ATT(_Q, _K, _V), ValueError, r"causal: needs as many queries as keys.*t = 4.*6"),
        (lambda: ATT(_Q, _K[:, :1], _V[:, :1], causal=False), ValueError, "k: expected shape"),
        (lambda: ATT(_Q, _K, _V[..., :5, :], causal=False), ValueError, "v: expected the shape"),
        (lambda: ATT(_Q, _K[..., :2], _V[..., :2], causal=False), ValueError, "k:"),
        (lambda: ATT(_Q[0, 0], _K[0, 0], _V[0, 0], causal=False), ValueError, "q: expected shape"),
        (lambda: ATT(_Q, _K.astype(jnp.float32), _V, causal=False), TypeError, "k: expected the"),
        (lambda: ATT(_Q.astype(jnp.int32), _K, _V, causal=False), TypeError, "q"),
        (lambda: ATT(_Q, _K, _V, causal=False, where=jnp.ones((4, 6))), TypeError, "where: expec"),
        (lambda: ATT(_Q, _K, _V, causal=False, where=jnp.ones((6, 4), bool)), ValueError,
         r"where: expected a shape broadcastable to the scores"),
        (lambda: ATT(_Q, _K, _V, causal=False, strategy="flash"), ValueError, "strategy"),
        (lambda: ATT(_Q, _K, _V, causal=0), TypeError, "causal: must be a Python bool"),
        (lambda: ATT(_Q[..., :0], _K[..., :0], _V[..., :0], causal=False), ValueError, "head dim"),
        (lambda: jaxbp.attention_fwd(_Q, _K, _V), ValueError, "causal"),
    ],
    ids=["causal-t-ne-s", "heads", "v-shape", "e-mismatch", "rank", "dtype", "int-q",
         "where-dtype", "where-shape", "strategy", "causal-int", "empty-e", "fwd-validates"],
)  # fmt: skip
def test_bad_inputs_raise_clear_errors_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_traced_causal_raises_type_error():
    with pytest.raises(TypeError, match="causal"):
        jax.jit(lambda c: ATT(_Q, _K, _V, causal=c))(False)
