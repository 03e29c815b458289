"""Forward mode through the hand-written rules: every op's ``op.jvp``, and its twin under
:mod:`jaxbp.forward_mode` (``jax.jvp``, ``jacfwd``, ``linearize``, ``hessian`` run ``op.jvp``).

Oracles: ``jax.jvp`` of the op's plain twin ``jaxbp.reference.op`` (autodiff of plain
``jax.numpy``, none of the rules' helpers) in float64 to 1e-12, and central finite
differences of the op itself; for the Jacobians, ``diag(p) − ppᵀ`` written out here from
``jax.nn.softmax``. Each case runs as one jitted program (the rule, the twin, the reference
and the differences together): one compile per case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
import jaxbp.forward_mode as fm
from jaxbp._op import positional_names
from tests.helpers import assert_close
from tests.settings import ALL_CASES, Case, away_from_zero
from tests.test_fused import _count_big_intermediates


def _fused(*, bias=True, weights=False, where=False, ignore=None, n=5, d=3, v=9):
    def make(rng):
        ids = rng.integers(0, v, size=(n,)).astype(np.int32)
        if ignore is not None:
            ids[::3] = ignore
        out = {"x": rng.normal(size=(n, d)), "w": rng.normal(size=(d, v)), "labels": ids}
        if bias:
            out["b"] = rng.normal(size=(v,))
        if where:
            out["where"] = np.arange(n) % 2 == 0
        if weights:
            out["class_weights"] = rng.uniform(0.2, 2.0, size=(v,))
        return out

    return make


_F = "linear_softmax_cross_entropy"
FUSED_CASES = [
    Case("fused-recompute-chunk4", _F, _fused(), {"chunk_size": 4}),
    Case("fused-forward", _F, _fused(), {"strategy": "forward", "chunk_size": 2}),
    Case("fused-nobias-softcap", _F, _fused(bias=False), {"softcap": 2.5, "chunk_size": 4}),
    Case("fused-all-options-recompute", _F, _fused(weights=True, where=True, ignore=-1),
         {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 3.0, "ignore_index": -1,
          "chunk_size": 4}),
    Case("fused-all-options-forward", _F, _fused(weights=True, where=True, ignore=-1),
         {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 3.0, "ignore_index": -1,
          "strategy": "forward"}),
]  # fmt: skip
CASES = ALL_CASES + FUSED_CASES


def _floating(arrays):
    return {k: v for k, v in arrays.items() if jnp.issubdtype(v.dtype, jnp.floating)}


def _tangents(arrays, seed=5):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=v.shape), v.dtype) for k, v in _floating(arrays).items()}


def _call(fn, case, arrays, d):
    return fn(**{**arrays, **d}, **case.options)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_jvp_rule_and_twin_match_jax_jvp_of_the_reference_and_finite_differences(case):
    arrays = case.arrays(jnp.float64)
    tangents = _tangents(arrays)
    names = positional_names(case.fwd)
    twin = getattr(fm, case.name)

    @jax.jit
    def routes(arrays, tangents):
        d = _floating(arrays)
        _, res = case.fwd(**arrays, **case.options)
        direct = case.op.jvp(res, tuple(tangents.get(n) for n in names), **case.options)
        out_ref, expected = jax.jvp(lambda d: _call(case.ref, case, arrays, d), (d,), (tangents,))
        out_twin, via_twin = jax.jvp(lambda d: _call(twin, case, arrays, d), (d,), (tangents,))
        h = 1e-6
        plus = {k: d[k] + h * tangents[k] for k in d}
        minus = {k: d[k] - h * tangents[k] for k in d}
        fd = (_call(case.op, case, arrays, plus) - _call(case.op, case, arrays, minus)) / (2 * h)
        return direct, expected, via_twin, out_twin, out_ref, fd

    direct, expected, via_twin, out_twin, out_ref, fd = routes(arrays, tangents)
    assert direct.dtype == expected.dtype == via_twin.dtype, (direct.dtype, expected.dtype)
    assert_close(out_twin, out_ref, name="the twin's value")
    assert_close(direct, expected, name="op.jvp on op.fwd's residuals")
    assert_close(via_twin, expected, name="jax.jvp of the forward-mode twin")
    finite = np.isfinite(np.asarray(out_ref))  # log_softmax's masked entries are −inf
    assert_close(np.where(finite, direct, 0.0), np.where(finite, fd, 0.0), tol=1e-6,
                 name="op.jvp against central finite differences")  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=str)
def test_jvp_along_one_argument_leaves_the_others_out_and_matches_the_reference(case):
    """A tangent along one argument only: the others are constants (symbolic zeros), which
    a built-in rule gets as ``None`` and leaves out; the result is still the reference's."""
    arrays = case.arrays(jnp.float64)
    tangents = _tangents(arrays)
    twin = getattr(fm, case.name)
    for name, tangent in tangents.items():

        def along(a, twin=twin, name=name):
            return _call(twin, case, arrays, {name: a})

        def along_ref(a, name=name):
            return _call(case.ref, case, arrays, {name: a})

        _, got = jax.jit(lambda a, t, f=along: jax.jvp(f, (a,), (t,)))(arrays[name], tangent)
        _, want = jax.jvp(along_ref, (arrays[name],), (tangent,))
        assert_close(got, want, name=f"the tangent along {name} alone")


def test_built_in_rules_get_none_for_constants_so_no_product_with_zeros_is_compiled():
    """``jax.jvp`` of a dense layer along ``w`` only: the compiled program has one matrix
    product (``x·ẇ``), not a second with an array of zeros for ``ẋ``."""
    x, w = jnp.ones((8, 4)), jnp.ones((4, 3))
    f = jax.jit(lambda w, dw: jax.jvp(lambda w: fm.dense(x, w), (w,), (dw,))[1])
    hlo = f.lower(w, w).compile().as_text()
    assert hlo.count(" dot(") == 1, hlo


# One case per op (the first of each name), for the compositions.
BY_OP = list({c.name: c for c in reversed(CASES)}.values())[::-1]


@pytest.mark.parametrize("case", BY_OP, ids=str)
def test_twin_composes_with_vmap_of_jvp_vmap_of_grad_and_jit(case):
    """``vmap`` over three tangents of ``jax.jvp`` of the twin, and ``vmap`` over three
    cotangents of ``jax.grad`` through the twin (JAX's transpose of ``op.jvp``) and through
    the public op (``op.bwd``), all under ``jit``, against the reference's."""
    arrays = case.arrays(jnp.float64)
    d = _floating(arrays)
    rng = np.random.default_rng(9)
    ts = {k: jnp.asarray(rng.normal(size=(3, *v.shape))) for k, v in d.items()}
    shape = jax.eval_shape(lambda: _call(case.ref, case, arrays, {})).shape
    gs = jnp.asarray(rng.normal(size=(3, *shape)))

    @jax.jit
    def run(d, ts, gs):
        def jvp(fn, t):
            return jax.jvp(lambda d: _call(fn, case, arrays, d), (d,), (t,))[1]

        def grad(fn, g):
            return jax.grad(lambda d: jnp.sum(g * _call(fn, case, arrays, d)))(d)

        twin, ref = getattr(fm, case.name), case.ref
        return (
            jax.vmap(lambda t: jvp(twin, t))(ts), jax.vmap(lambda t: jvp(ref, t))(ts),
            jax.vmap(lambda g: grad(twin, g))(gs), jax.vmap(lambda g: grad(case.op, g))(gs),
            jax.vmap(lambda g: grad(ref, g))(gs),
        )  # fmt: skip

    jvp_twin, jvp_ref, grad_twin, grad_op, grad_ref = run(d, ts, gs)
    assert_close(jvp_twin, jvp_ref, name="vmap of jax.jvp of the twin")
    assert_close(grad_twin, grad_ref, name="vmap of jax.grad of the twin")
    assert_close(grad_op, grad_ref, name="vmap of jax.grad of the op")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", BY_OP, ids=str)
def test_twin_jvp_in_low_precision_keeps_the_output_dtype_and_the_tolerance(case, dtype):
    """The tangent has the output's dtype (float32 for a half-precision loss) and agrees with
    ``jax.jvp`` of the reference computed in float64 from the same inputs."""
    arrays = case.arrays(dtype)
    tangents = _tangents(arrays)
    twin = getattr(fm, case.name)
    wide = {k: v.astype(jnp.float64) for k, v in arrays.items() if k in tangents}
    t64 = {k: v.astype(jnp.float64) for k, v in tangents.items()}

    @jax.jit
    def run(arrays, tangents, wide, t64):
        out, got = jax.jvp(lambda d: _call(twin, case, arrays, d), (_floating(arrays),),
                           (tangents,))  # fmt: skip
        want = jax.jvp(lambda d: _call(case.ref, case, arrays, d), (wide,), (t64,))[1]
        return out, got, want

    out, got, want = run(arrays, tangents, wide, t64)
    assert got.dtype == out.dtype, (got.dtype, out.dtype)
    assert_close(got, want, dtype)


# ------------------------------------------------------- jacfwd, linearize, hessian


def _softmax_jacobian_oracle(z):
    p = jax.nn.softmax(z)
    return jnp.diag(p) - jnp.outer(p, p)  # diag(p) − ppᵀ  (c, c)


def test_jacfwd_of_softmax_twin_is_diag_p_minus_ppT():
    z = jnp.asarray(away_from_zero(np.random.default_rng(0), (5,)))
    J = jax.jacfwd(fm.softmax)(z)  # (c, c), column by column through softmax_jvp
    assert_close(J, _softmax_jacobian_oracle(z), name="jacfwd(softmax)")
    assert_close(jax.jacfwd(fm.softmax)(z[None])[0, :, 0], J, name="batched")


def test_hessian_of_softmax_cross_entropy_twin_wrt_logits_is_the_softmax_jacobian():
    """The seeds' question from the other side: ∂²CE/∂z² = diag(p) − ppᵀ (labels sum to 1)."""
    rng = np.random.default_rng(1)
    z = jnp.asarray(away_from_zero(rng, (6,)))
    for labels in (jnp.asarray(2), jnp.asarray(rng.dirichlet(np.ones(6)))):
        H = jax.hessian(lambda z, y=labels: fm.softmax_cross_entropy(z[None], y[None])[0])(z)
        assert_close(H, _softmax_jacobian_oracle(z), name="hessian of CE")


def test_linearize_of_layer_norm_twin_matches_jvp_of_the_reference():
    rng = np.random.default_rng(2)
    x, g, b = (jnp.asarray(rng.normal(size=s)) for s in ((4, 5), (5,), (5,)))
    t = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in (x, g, b))
    y, f_jvp = jax.linearize(fm.layer_norm, x, g, b)
    _, expected = jax.jvp(jaxbp.reference.layer_norm, (x, g, b), t)
    assert_close(y, jaxbp.layer_norm(x, g, b), name="value")
    assert_close(f_jvp(*t), expected, name="linearize")


def test_hessian_of_a_small_network_built_from_twins_matches_the_reference():
    rng = np.random.default_rng(3)
    x, ids = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray([0, 2, 1, 2])
    params = [jnp.asarray(rng.normal(size=s)) for s in ((3, 4), (4,), (4, 3), (3,))]
    flat = jnp.concatenate([p.ravel() for p in params])

    def loss(ops, flat):
        offsets = np.cumsum([0] + [p.size for p in params[:-1]])
        w1, b1, w2, b2 = (flat[o : o + p.size].reshape(p.shape)
                          for p, o in zip(params, offsets, strict=True))  # fmt: skip
        h = ops.layer_norm(ops.tanh(ops.dense(x, w1, b1)), jnp.ones(4), jnp.zeros(4))
        return jnp.mean(ops.softmax_cross_entropy(ops.dense(h, w2, b2), ids, z_loss=1e-2))

    H = jax.jit(jax.hessian(lambda f: loss(fm, f)))(flat)
    expected = jax.jit(jax.hessian(lambda f: loss(jaxbp.reference, f)))(flat)
    assert_close(H, expected, tol=1e-10, name="hessian")
    assert_close(H, H.T, tol=1e-10, name="symmetry")


@pytest.mark.parametrize("case", BY_OP, ids=str)
def test_jvp_of_every_twin_runs_its_named_jvp_rule_and_grad_of_the_op_its_bwd(case):
    arrays = case.arrays(jnp.float64)
    d = _floating(arrays)
    twin = getattr(fm, case.name)
    forward = str(jax.make_jaxpr(
        lambda d: jax.jvp(lambda d: _call(twin, case, arrays, d), (d,), (d,)))(d))  # fmt: skip
    reverse = str(jax.make_jaxpr(
        jax.grad(lambda d: jnp.sum(_call(case.op, case, arrays, d))))(d))  # fmt: skip
    assert f"name={case.name}_jvp" in forward and f"name={case.name}_bwd" not in forward
    assert f"name={case.name}_bwd" in reverse and f"name={case.name}_jvp" not in reverse


# ---------------------------------------------------------------- planted bugs


def _doubled(rule):
    def bugged(res, t, **options):
        out = rule(res, t, **options)
        return jax.tree.map(lambda a: 2 * a, out)

    return bugged


def _jvp_and_grad(z, t, g):
    _, via_jvp = jax.jvp(fm.softmax, (z,), (t,))
    via_grad = jax.grad(lambda z: jnp.sum(g * jaxbp.softmax(z)))(z)
    _, ref_jvp = jax.jvp(jaxbp.reference.softmax, (z,), (t,))
    ref_grad = jax.grad(lambda z: jnp.sum(g * jaxbp.reference.softmax(z)))(z)
    return via_jvp, via_grad, ref_jvp, ref_grad


def _bad(a, e):
    return float(jnp.max(jnp.abs(a - e))) > 1e-3


def test_planted_bug_in_jvp_is_seen_by_jax_jvp_of_the_twin_and_not_by_jax_grad(monkeypatch):
    rng = np.random.default_rng(4)
    z, t, g = (jnp.asarray(rng.normal(size=(3, 4))) for _ in range(3))
    monkeypatch.setattr(jaxbp.softmax, "jvp", _doubled(jaxbp.softmax_jvp))
    via_jvp, via_grad, ref_jvp, ref_grad = _jvp_and_grad(z, t, g)
    assert _bad(via_jvp, ref_jvp)
    assert_close(via_grad, ref_grad, name="jax.grad runs softmax_bwd, untouched")
    assert not jaxbp.check(jaxbp.softmax, z).passed  # the check sees it too


def test_planted_bug_in_bwd_is_seen_by_jax_grad_and_not_by_jax_jvp_of_the_twin(monkeypatch):
    rng = np.random.default_rng(5)
    z, t, g = (jnp.asarray(rng.normal(size=(3, 4))) for _ in range(3))
    monkeypatch.setattr(jaxbp.softmax, "bwd", _doubled(jaxbp.softmax_bwd))
    via_jvp, via_grad, ref_jvp, ref_grad = _jvp_and_grad(z, t, g)
    assert _bad(via_grad, ref_grad)
    assert_close(via_jvp, ref_jvp, name="jax.jvp runs softmax_jvp, untouched")


def test_jaxprs_name_the_rule_each_transform_runs():
    z = jnp.ones((2, 3))
    forward = str(jax.make_jaxpr(lambda z: jax.jvp(fm.softmax, (z,), (z,)))(z))
    reverse = str(jax.make_jaxpr(jax.grad(lambda z: jaxbp.softmax(z).sum()))(z))
    assert "name=softmax_jvp" in forward and "name=softmax_bwd" not in forward
    assert "name=softmax_bwd" in reverse and "name=softmax_jvp" not in reverse


# ------------------------------------------------------------- property test


@settings(max_examples=10)
@given(
    n=st.integers(1, 4), c=st.integers(1, 6), probs=st.booleans(), smooth=st.booleans(),
    weights=st.booleans(), masked=st.booleans(), zl=st.sampled_from([0.0, 1e-2]),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_property_ce_jvp_matches_the_reference_over_shapes_and_options(
    n, c, probs, smooth, weights, masked, zl, seed
):  # fmt: skip
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(n, c)) * 3)
    labels = (jnp.asarray(rng.dirichlet(np.ones(c), n)) if probs
              else jnp.asarray(rng.integers(0, c, n), jnp.int32))  # fmt: skip
    kw = {"label_smoothing": 0.1 if smooth else 0.0, "z_loss": zl}
    if weights:
        kw["class_weights"] = jnp.asarray(rng.uniform(0.2, 2.0, c))
    if masked:
        kw["where"] = jnp.asarray(rng.uniform(size=n) < 0.5)
    d = {"logits": logits, **({"labels": labels} if probs else {})}
    if weights:
        d["class_weights"] = kw.pop("class_weights")
    t = {k: jnp.asarray(rng.normal(size=v.shape)) for k, v in d.items()}
    fixed = {} if probs else {"labels": labels}

    def run(fn):
        return jax.jvp(lambda d: fn(**d, **fixed, **kw), (d,), (t,))[1]

    both = jax.jit(lambda: (run(fm.softmax_cross_entropy),
                            run(jaxbp.reference.softmax_cross_entropy)))  # fmt: skip
    assert_close(*both())


@settings(max_examples=6)
@given(
    n=st.integers(1, 5), d=st.integers(1, 4), v=st.integers(1, 9), chunk=st.integers(1, 9),
    forward=st.booleans(), cap=st.sampled_from([None, 2.0]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_property_fused_jvp_matches_the_reference_over_shapes_chunks_and_strategies(
    n, d, v, chunk, forward, cap, seed
):  # fmt: skip
    rng = np.random.default_rng(seed)
    x, w, b = (jnp.asarray(rng.normal(size=s)) for s in ((n, d), (d, v), (v,)))
    lab = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    t = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in (x, w, b))
    kw = {"softcap": cap, "label_smoothing": 0.1, "z_loss": 1e-3}
    strategy = {"strategy": "forward"} if forward else {"chunk_size": chunk}

    def run(fn, **more):
        return jax.jvp(lambda x, w, b: fn(x, w, lab, b, **kw, **more), (x, w, b), t)[1]

    both = jax.jit(lambda: (run(fm.linear_softmax_cross_entropy, **strategy),
                            run(jaxbp.reference.linear_softmax_cross_entropy)))  # fmt: skip
    assert_close(*both())


@settings(max_examples=6)
@given(
    t=st.integers(1, 5), s=st.integers(1, 5), e=st.integers(1, 3), causal=st.booleans(),
    recompute=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_property_attention_jvp_matches_the_reference_over_shapes(t, s, e, causal, recompute,
                                                                   seed):  # fmt: skip
    s = t if causal else s
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 1, m, e))) for m in (t, s, s))
    tq = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in (q, k, v))
    kw = {"causal": causal}

    def run(fn, **more):
        return jax.jvp(lambda q, k, v: fn(q, k, v, **kw, **more), (q, k, v), tq)[1]

    strategy = "recompute" if recompute else "store"
    both = jax.jit(lambda: (run(fm.attention, strategy=strategy), run(jaxbp.reference.attention)))
    assert_close(*both())


# ------------------------------------------------------------ integer arguments


def test_integer_arguments_take_float0_tangents_as_jax_jvp_gives_them():
    z, ids = jnp.ones((3, 4)), jnp.asarray([0, 3, 1])
    zero = np.zeros(ids.shape, jax.dtypes.float0)
    loss, dloss = jax.jvp(fm.softmax_cross_entropy, (z, ids), (jnp.ones((3, 4)), zero))
    assert_close(dloss, jnp.zeros(3), name="a uniform shift of the logits changes nothing")
    table = jnp.arange(10.0).reshape(5, 2)
    _, drows = jax.jvp(fm.embedding, (ids, table), (zero, jnp.ones((5, 2))))
    assert_close(drows, jnp.ones((3, 2)), name="embedding's tangent rows")


def test_a_tangent_through_a_traced_option_gives_nan_never_a_silent_zero():
    z, ids = jnp.ones((2, 3)), jnp.asarray([0, 1])
    _, t = jax.jvp(lambda e: fm.softmax_cross_entropy(z, ids, label_smoothing=e),
                   (jnp.asarray(0.1),), (jnp.asarray(1.0),))  # fmt: skip
    assert np.all(np.isnan(np.asarray(t)))


def test_fused_twin_under_jvp_never_materialises_n_by_v():
    n, d, v = 64, 8, 1000
    rng = np.random.default_rng(6)
    x, w = jnp.asarray(rng.normal(size=(n, d))), jnp.asarray(rng.normal(size=(d, v)))
    lab = jnp.asarray(rng.integers(0, v, n), jnp.int32)

    def jvp(op, **kw):
        return lambda x, w: jax.jvp(lambda x, w: op(x, w, lab, **kw), (x, w), (x, w))[1]

    assert _count_big_intermediates(jvp(fm.linear_softmax_cross_entropy, chunk_size=128),
                                    (x, w), n * v) == 0  # fmt: skip
    assert _count_big_intermediates(jvp(jaxbp.reference.linear_softmax_cross_entropy),
                                    (x, w), n * v) > 0  # the count can fail  # fmt: skip


# ------------------------------------------------- user ops and the contract


def _sq_relu(jvp=None, **kw):
    """A user's ``y = max(x·w, 0)²`` (docs/custom_ops.md), with the forward-mode rule
    ``ẏ = 2r ⊙ (ẋ·w + x·ẇ)``."""

    def fwd(x, w):
        r = jnp.maximum(x @ w, 0.0)
        return r * r, (x, w, r)

    def bwd(res, g):
        x, w, r = res
        dz = 2.0 * g * r
        return dz @ w.T, x.T @ dz

    def good_jvp(res, tangents):
        x, w, r = res
        dx, dw = tangents
        return 2.0 * r * (dx @ w + x @ dw)

    def ref(x, w):
        return jnp.maximum(x @ w, 0.0) ** 2

    return jaxbp.Op(fwd, bwd, ref, name="sqrelu", jvp=good_jvp if jvp is None else jvp, **kw)


def _xw(seed=7):
    rng = np.random.default_rng(seed)
    return jnp.asarray(away_from_zero(rng, (3, 2))), jnp.asarray(away_from_zero(rng, (2, 4)))


def test_user_op_with_a_jvp_rule_runs_under_jvp_jacfwd_and_passes_check():
    op = _sq_relu()
    twin = fm.of(op)
    x, w = _xw()
    _, t = jax.jvp(twin, (x, w), (x, w))
    _, expected = jax.jvp(op.reference, (x, w), (x, w))
    assert_close(t, expected, name="jax.jvp")
    assert_close(jax.jacfwd(twin, argnums=1)(x, w), jax.jacfwd(op.reference, argnums=1)(x, w))
    report = jaxbp.check(op, x, w)
    assert report.passed, report.table()
    assert {"custom_jvp", "jvp", "jvp fd"} <= {r.check for r in report.rows}
    assert_close(jaxbp.jacobian(op, x, w, mode="fwd"), jaxbp.jacobian(op, x, w))


def test_op_without_a_jvp_rule_is_an_error_naming_the_op():
    def fwd(x):
        return x * x, (x,)

    op = jaxbp.Op(fwd, lambda res, g: (2 * res[0] * g,), lambda x: x * x, name="square")
    assert op.jvp is None
    with pytest.raises(TypeError, match="square: has no forward-mode rule"):
        jax.jvp(fm.of(op), (jnp.ones(2),), (jnp.ones(2),))
    with pytest.raises(TypeError, match="square: has no forward-mode rule"):
        jaxbp.jacobian(op, jnp.ones((2, 3)), mode="fwd")
    assert {r.check for r in jaxbp.check(op, jnp.ones((2, 3))).rows}.isdisjoint({"jvp"})
    with pytest.raises(TypeError, match="op: expected a jaxbp op"):
        fm.of(lambda x: x)


def test_bad_jvp_signature_is_refused_at_construction():
    with pytest.raises(TypeError, match=r"sqrelu: the jvp rule must take \(res, tangents\)"):
        _sq_relu(jvp=lambda res: res)
    with pytest.raises(TypeError, match="jvp: expected a callable rule or None"):
        _sq_relu(jvp=3)


@pytest.mark.parametrize(
    "rule, error, message",
    [
        (lambda res, t: res[2][0], ValueError, r"output's shape \(3, 4\), got \(4,\)"),
        (lambda res, t: res[2].astype(jnp.float32), TypeError,
         "output's dtype float64, got float32"),
        (lambda res, t: (res[2],), TypeError, "must return the output's tangent"),
    ],
    ids=["shape", "dtype", "tuple"],
)  # fmt: skip
def test_wrong_tangent_is_an_error_naming_the_op_rule_expected_and_got(rule, error, message):
    x, w = _xw()
    with pytest.raises(error, match=f"sqrelu: the jvp rule.*{message}"):
        jax.jvp(fm.of(_sq_relu(jvp=rule)), (x, w), (x, w))


def test_wrong_number_of_tangents_for_a_user_op_jvp_is_an_error():
    op = _sq_relu()
    x, w = _xw()
    _, res = op.fwd(x, w)
    with pytest.raises(ValueError, match=r"sqrelu: the jvp rule takes a tuple of 2 tangent"):
        op.jvp(res, (x,))


def test_jacobian_mode_fwd_equals_rev_and_refuses_an_unknown_mode():
    rng = np.random.default_rng(8)
    z = jnp.asarray(rng.normal(size=(3, 5)))
    assert_close(jaxbp.jacobian(jaxbp.softmax, z, mode="fwd"), jaxbp.jacobian(jaxbp.softmax, z))
    x, w, b = (jnp.asarray(rng.normal(size=s)) for s in ((2, 3), (3, 4), (4,)))
    for argnum in range(3):
        assert_close(jaxbp.jacobian(jaxbp.dense, x, w, b, argnum=argnum, mode="fwd"),
                     jaxbp.jacobian(jaxbp.dense, x, w, b, argnum=argnum))  # fmt: skip
    with pytest.raises(ValueError, match="mode: expected 'rev' or 'fwd', got 'both'"):
        jaxbp.jacobian(jaxbp.softmax, z, mode="both")


def test_every_public_op_has_a_jvp_rule_and_a_twin_of_the_same_name():
    from tests.settings import public_ops_with_rules

    for name in public_ops_with_rules():
        op = getattr(jaxbp, name)
        assert callable(op.jvp), name
        assert op.jvp is getattr(jaxbp, name + "_jvp"), name
        assert getattr(fm, name).op is op, name
