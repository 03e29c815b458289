"""jaxbp.linear_softmax_cross_entropy: the fused last layer + loss, both backward strategies.

Checked against two independent routes: the unfused composition of jaxbp ops
``softmax_cross_entropy(dense(x, w, b), labels)`` and ``jax.grad`` of the plain-jnp
``jaxbp.reference.linear_softmax_cross_entropy`` (full ``(n, v)`` logits).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp import fused
from tests.helpers import assert_close

STRATEGIES = ("recompute", "forward")


def _problem(n=6, d=4, v=11, *, seed=0, dtype=jnp.float64, bias=True, ignore=None,
             where=False, weights=False, batch=None):  # fmt: skip
    rng = np.random.default_rng(seed)
    shape = (n,) if batch is None else batch
    x = jnp.asarray(rng.normal(size=(*shape, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)), dtype)
    b = jnp.asarray(rng.normal(size=(v,)), dtype) if bias else None
    labels = rng.integers(0, v, size=shape).astype(np.int32)
    if ignore is not None:
        labels.reshape(-1)[::3] = ignore
    arrays = {"x": x, "w": w, "b": b, "labels": jnp.asarray(labels)}
    opts = {}
    if ignore is not None:
        opts["ignore_index"] = ignore
    if where:
        m = np.ones(shape, bool)
        m.reshape(-1)[1::2] = False
        opts["where"] = jnp.asarray(m)
    if weights:
        arrays["class_weights"] = jnp.asarray(rng.uniform(0.2, 2.0, size=(v,)), dtype)
    return arrays, opts


def _loss_fn(op, arrays, opts, **static):
    """``f(x, w, b, class_weights) -> loss`` for the differentiable arrays of a problem."""
    labels = arrays["labels"]

    def f(x, w, b, cw):
        kw = dict(opts, **static)
        if cw is not None:
            kw["class_weights"] = cw
        return op(x, w, labels, b, **kw)

    return f


def _diff_args(arrays):
    return (arrays["x"], arrays["w"], arrays["b"], arrays.get("class_weights"))


def _value_and_grads(f, args, gs):
    """``f(*args)`` and, for each upstream ``g`` in ``gs``, the cotangents of the non-None
    arguments, from one jitted ``jax.vjp`` (one compile per ``f``: the tests stay fast)."""

    @jax.jit
    def run(args, g):
        loss, vjp = jax.vjp(f, *args)
        return loss, tuple(c for c in vjp(g.astype(loss.dtype)) if c is not None)

    out = [run(args, g) for g in gs]
    return out[0][0], [grads for _, grads in out]


def _grads(f, args, g):
    return _value_and_grads(f, args, [g])[1][0]


def _unfused(x, w, labels, b=None, *, softcap=None, **kw):
    """The composition of unfused jaxbp ops, each with its own hand-written backward."""
    z = jaxbp.dense(x, w, b)
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return jaxbp.softmax_cross_entropy(z, labels, **kw)


def _upstreams(shape, seed=3):
    rng = np.random.default_rng(seed)
    return {
        "random": jnp.asarray(rng.normal(size=shape), jnp.float64),
        "uniform": jnp.full(shape, 0.25, jnp.float64),  # a mean: the "forward" fast path
    }


OPTION_SETS = {
    "plain": ({}, {}),
    "smoothing": ({}, {"label_smoothing": 0.1}),
    "zloss": ({}, {"z_loss": 1e-2}),
    "softcap": ({}, {"softcap": 2.5}),
    "weights": ({"weights": True}, {}),
    "where": ({"where": True}, {}),
    "ignore": ({"ignore": -100}, {}),
    "nobias": ({"bias": False}, {}),
    "all": (
        {"weights": True, "where": True, "ignore": -1},
        {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 3.0},
    ),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_fused_matches_unfused_composition_and_reference_grad(name, strategy):
    make, static = OPTION_SETS[name]
    arrays, opts = _problem(7, 4, 11, **make)
    args = _diff_args(arrays)
    chunk = 4 if strategy == "recompute" else 3
    fused_f = _loss_fn(jaxbp.linear_softmax_cross_entropy, arrays, opts, **static,
                       chunk_size=chunk, strategy=strategy)  # fmt: skip
    unfused_f = _loss_fn(_unfused, arrays, opts, **static)
    ref_f = _loss_fn(jaxbp.reference.linear_softmax_cross_entropy, arrays, opts, **static)

    gs = list(_upstreams((7,)).values())  # random, then uniform (a mean)
    loss, got = _value_and_grads(fused_f, args, gs)
    assert loss.shape == (7,) and loss.dtype == jnp.float64
    for name, other in (("unfused", unfused_f), ("reference", ref_f)):
        want_loss, want = _value_and_grads(other, args, gs)
        assert_close(loss, want_loss, jnp.float64, name=f"loss vs {name}")
        for kind, a, e in zip(("random g", "uniform g"), got, want, strict=True):
            assert_close(a, e, jnp.float64, name=f"{kind} vs {name}")


@settings(max_examples=8)
@given(
    n=st.integers(1, 9),
    d=st.integers(1, 5),
    v=st.integers(1, 19),
    chunk=st.integers(1, 24),
    eps=st.sampled_from([0.0, 0.3]),
    zl=st.sampled_from([0.0, 0.05]),
    cap=st.sampled_from([None, 1.5]),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**16),
)
def test_fused_property_random_shapes_and_options(n, d, v, chunk, eps, zl, cap, flags, seed):
    bias, where, weights, ignore = flags
    arrays, opts = _problem(n, d, v, seed=seed, bias=bias, where=where, weights=weights,
                            ignore=-7 if ignore else None)  # fmt: skip
    static = {"label_smoothing": eps, "z_loss": zl, "softcap": cap}
    args = _diff_args(arrays)
    ref_f = _loss_fn(jaxbp.reference.linear_softmax_cross_entropy, arrays, opts, **static)
    g = _upstreams((n,), seed)["random"]
    want_loss, (want,) = _value_and_grads(ref_f, args, [g])
    for strategy in STRATEGIES:
        f = _loss_fn(jaxbp.linear_softmax_cross_entropy, arrays, opts, **static,
                     chunk_size=chunk, strategy=strategy)  # fmt: skip
        loss, (got,) = _value_and_grads(f, args, [g])
        assert_close(loss, want_loss, jnp.float64, name=f"{strategy} loss")
        assert_close(got, want, jnp.float64, name=f"{strategy} grads")


@pytest.mark.parametrize(
    "n,v,chunk",
    [(1, 10, 4), (5, 3, 8), (5, 1, 4), (4, 9, 9), (4, 9, 1), (3, 17, 5), (4, 16, 4)],
    ids=lambda p: str(p),
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_odd_sizes_remainder_chunks(n, v, chunk, strategy):
    arrays, opts = _problem(n, 3, v, seed=n + v)
    args = _diff_args(arrays)
    f = _loss_fn(jaxbp.linear_softmax_cross_entropy, arrays, opts, chunk_size=chunk,
                 strategy=strategy)  # fmt: skip
    ref_f = _loss_fn(jaxbp.reference.linear_softmax_cross_entropy, arrays, opts)
    g = _upstreams((n,))["random"]
    want_loss, (want,) = _value_and_grads(ref_f, args, [g])
    loss, (got,) = _value_and_grads(f, args, [g])
    assert_close(jax.jit(f)(*args), want_loss, jnp.float64, name="primal loss")
    assert_close(loss, want_loss, jnp.float64, name="loss")
    assert_close(got, want, jnp.float64, name="grads")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_masked_and_ignored_rows_have_zero_loss_and_exactly_zero_gradient(strategy):
    arrays, opts = _problem(6, 4, 9, dtype=jnp.float32, where=True, ignore=-100)
    valid = np.asarray(opts["where"]) & (np.asarray(arrays["labels"]) != -100)
    x = np.asarray(arrays["x"]).copy()
    x[~valid] = 1e4  # huge masked inputs: still exactly 0 gradient, no NaN
    args = (jnp.asarray(x), arrays["w"], arrays["b"], None)
    f = _loss_fn(jaxbp.linear_softmax_cross_entropy, arrays, opts, strategy=strategy,
                 chunk_size=4)  # fmt: skip
    loss, grads = _value_and_grads(f, args, list(_upstreams((6,)).values()))
    assert np.all(np.asarray(loss)[~valid] == 0.0)
    assert np.all(np.asarray(jax.jit(f)(*args))[~valid] == 0.0)
    for dx, dw, db in grads:
        assert np.all(np.asarray(dx)[~valid] == 0.0)
        assert np.all(np.isfinite(np.asarray(dw))) and np.all(np.isfinite(np.asarray(db)))
    # every row masked: loss 0, all gradients 0
    none = {**opts, "where": jnp.zeros((6,), bool)}
    f0 = _loss_fn(jaxbp.linear_softmax_cross_entropy, arrays, none, strategy=strategy)
    assert np.all(np.asarray(f0(*args)) == 0.0)
    for grad in _grads(f0, args, _upstreams((6,))["uniform"]):
        assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_bfloat16_inputs_accumulate_in_float32(strategy):
    arrays, opts = _problem(8, 16, 37, dtype=jnp.bfloat16, weights=True)
    args = _diff_args(arrays)
    static = {"label_smoothing": 0.1, "z_loss": 1e-3}
    f = _loss_fn(jaxbp.linear_softmax_cross_entropy, arrays, opts, **static, chunk_size=8,
                 strategy=strategy)  # fmt: skip
    ref_f = _loss_fn(jaxbp.reference.linear_softmax_cross_entropy, arrays, opts, **static)
    g = _upstreams((8,))["random"]
    loss, (got,) = _value_and_grads(f, args, [g])
    assert loss.dtype == jnp.float32
    assert [a.dtype for a in got] == [jnp.bfloat16] * 4
    # the reference in float32 on the same (bfloat16-rounded) inputs
    args32 = tuple(a.astype(jnp.float32) for a in args)
    want_loss, (want,) = _value_and_grads(ref_f, args32, [g])
    assert_close(loss, want_loss, jnp.bfloat16)
    assert_close(got, want, jnp.bfloat16)


def test_fused_forward_strategy_falls_back_for_non_uniform_upstream():
    """With a per-row ``g`` the precomputed ``dw`` would be wrong; the backward notices."""
    arrays, opts = _problem(6, 3, 10, where=True)
    args = _diff_args(arrays)
    f = _loss_fn(jaxbp.linear_softmax_cross_entropy, arrays, opts, strategy="forward")
    ref_f = _loss_fn(jaxbp.reference.linear_softmax_cross_entropy, arrays, opts)
    valid = np.asarray(opts["where"])
    g = np.full((6,), 0.5)
    g[~valid] = 7.0  # differs only on masked rows: still uniform where it matters
    gs = [jnp.asarray(g), jnp.asarray(g).at[0].set(-1.0)]
    _, got = _value_and_grads(f, args, gs)
    _, want = _value_and_grads(ref_f, args, gs)
    assert_close(got, want, jnp.float64)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_out_of_range_ids_raise_when_concrete_and_give_nan_rows_under_jit(strategy):
    arrays, _ = _problem(4, 3, 5)
    bad = arrays["labels"].at[1].set(5)
    with pytest.raises(ValueError, match="labels"):
        jaxbp.linear_softmax_cross_entropy(arrays["x"], arrays["w"], bad, strategy=strategy)

    def f(x, w, labels):
        return jaxbp.linear_softmax_cross_entropy(x, w, labels, strategy=strategy)

    loss = jax.jit(f)(arrays["x"], arrays["w"], bad)
    assert np.isnan(loss[1]) and np.all(np.isfinite(np.delete(np.asarray(loss), 1)))
    dx = jax.jit(jax.grad(lambda x, w, lab: f(x, w, lab).sum()))(arrays["x"], arrays["w"], bad)
    assert np.all(np.isnan(dx[1])) and np.all(np.isfinite(np.delete(np.asarray(dx), 1, 0)))


def test_fused_bad_inputs_raise_clear_errors():
    x, w = jnp.ones((3, 4)), jnp.ones((4, 5))
    lab = jnp.zeros((3,), jnp.int32)
    op = jaxbp.linear_softmax_cross_entropy
    with pytest.raises(ValueError, match="x: expected last axis d = 4"):
        op(jnp.ones((3, 2)), w, lab)
    with pytest.raises(ValueError, match=r"w: expected shape \(d, v\)"):
        op(x, jnp.ones((4,)), lab)
    with pytest.raises(TypeError, match="w: expected the dtype of x"):
        op(x, w.astype(jnp.bfloat16), lab)
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        op(jnp.ones((3, 4), jnp.int32), w, lab)
    with pytest.raises(TypeError, match="labels: expected integer class ids"):
        op(x, w, jnp.zeros((3,)))
    with pytest.raises(ValueError, match="labels: expected the batch shape"):
        op(x, w, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match=r"b: expected shape \(v,\)"):
        op(x, w, lab, jnp.ones((4,)))
    with pytest.raises(ValueError, match="class_weights"):
        op(x, w, lab, class_weights=jnp.ones((4,)))
    with pytest.raises(TypeError, match="where: expected a bool mask"):
        op(x, w, lab, where=jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="strategy"):
        op(x, w, lab, strategy="magic")
    with pytest.raises(ValueError, match="chunk_size"):
        op(x, w, lab, chunk_size=0)
    with pytest.raises(ValueError, match="softcap"):
        op(x, w, lab, softcap=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        op(x, w, lab, label_smoothing=1.5)
    with pytest.raises(TypeError, match="accum_dtype"):
        op(x, w, lab, accum_dtype=jnp.bfloat16)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_composes_with_jit_vmap_and_grad(strategy):
    arrays, _ = _problem(5, 3, 9)
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.normal(size=(2, 5, 3)))
    labs = jnp.asarray(rng.integers(0, 9, size=(2, 5)).astype(np.int32))
    w, b = arrays["w"], arrays["b"]

    def mean_loss(op, x, w, b, labels):
        return jnp.mean(op(x, w, labels, b, chunk_size=4, strategy=strategy))

    def mean_ref(x, w, b, labels):
        return jnp.mean(jaxbp.reference.linear_softmax_cross_entropy(x, w, labels, b))

    per_seq = jax.grad(lambda *a: mean_loss(jaxbp.linear_softmax_cross_entropy, *a),
                       argnums=(0, 1, 2))  # fmt: skip
    got = jax.jit(jax.vmap(per_seq, in_axes=(0, None, None, 0)))(xs, w, b, labs)
    want = jax.vmap(jax.grad(mean_ref, argnums=(0, 1, 2)), in_axes=(0, None, None, 0))(
        xs, w, b, labs
    )
    assert_close(got, want, jnp.float64)
    # leading batch axes (2, 5, d) are flattened and restored
    loss = jaxbp.linear_softmax_cross_entropy(xs, w, labs, b, strategy=strategy)
    assert loss.shape == (2, 5)
    assert_close(loss, jaxbp.reference.linear_softmax_cross_entropy(xs, w, labs, b), jnp.float64)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_fwd_bwd_rules_match_grad_and_save_no_logits(strategy):
    arrays, _ = _problem(6, 3, 40)
    x, w, b, lab = arrays["x"], arrays["w"], arrays["b"], arrays["labels"]
    g = _upstreams((6,))["random"]
    loss, res = fused.linear_softmax_cross_entropy_fwd(x, w, lab, b, strategy=strategy,
                                                        chunk_size=4)  # fmt: skip
    dx, dw, dlab, db, dwhere, dcw = fused.linear_softmax_cross_entropy_bwd(
        res, g, strategy=strategy, chunk_size=4
    )
    assert dlab is None and dwhere is None and dcw is None
    want = _grads(lambda x, w, b, _: jaxbp.reference.linear_softmax_cross_entropy(x, w, lab, b),
                  (x, w, b, None), g)  # fmt: skip
    assert_close((dx, dw, db), want, jnp.float64)
    # residuals: the inputs, lse (n,), and for "forward" gradients of the inputs' sizes
    sizes = [a.size for a in jax.tree.leaves(res)]
    assert max(sizes) <= w.size and 6 * 40 not in sizes


def _count_big_intermediates(fn, args, limit):
    """Number of values in ``fn``'s jaxpr (sub-jaxprs included) with ≥ ``limit`` elements."""
    count = 0

    def walk(jaxpr):
        nonlocal count
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                if hasattr(var.aval, "shape") and np.prod(var.aval.shape) >= limit:
                    count += 1
            for p in eqn.params.values():
                for sub in p if isinstance(p, tuple | list) else (p,):
                    if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):  # a ClosedJaxpr
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):  # a Jaxpr
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return count


def test_fused_recompute_never_materialises_n_by_v():
    n, d, v = 64, 8, 1000  # d·v < n·v: the (d, v) gradient is allowed, (n, v) is not
    arrays, _ = _problem(n, d, v)
    x, w, b, lab = arrays["x"], arrays["w"], arrays["b"], arrays["labels"]

    def grads(op, **kw):
        return jax.grad(lambda x, w, b: op(x, w, lab, b, **kw).mean(), argnums=(0, 1, 2))

    fused_grads = grads(jaxbp.linear_softmax_cross_entropy, chunk_size=128)
    ref_grads = grads(jaxbp.reference.linear_softmax_cross_entropy)
    assert _count_big_intermediates(fused_grads, (x, w, b), n * v) == 0
    assert _count_big_intermediates(ref_grads, (x, w, b), n * v) > 0  # the check can fail


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_fused_backward_temp_memory_does_not_grow_with_v():
    n, d = 256, 32
    sizes = {}
    for v in (2048, 8192):
        args = (
            jax.ShapeDtypeStruct((n, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32),
        )

        def grad_of(op, **kw):
            return jax.grad(lambda x, w, lab: op(x, w, lab, **kw).mean(), argnums=(0, 1))

        fused_t = _temp_bytes(grad_of(jaxbp.linear_softmax_cross_entropy, chunk_size=256), *args)
        ref_t = _temp_bytes(grad_of(jaxbp.reference.linear_softmax_cross_entropy), *args)
        sizes[v] = (fused_t, ref_t)
    (f_small, r_small), (f_big, r_big) = sizes[2048], sizes[8192]
    assert r_big >= 3 * r_small  # the full-logits baseline grows with v ...
    assert f_big <= 1.1 * f_small + 4096  # ... the fused backward does not
    assert f_big <= 0.1 * r_big


def test_fused_trains_with_optax_and_equals_reference_step():
    optax = pytest.importorskip("optax")
    arrays, _ = _problem(8, 4, 13, dtype=jnp.float32)
    params = {"w": arrays["w"], "b": arrays["b"]}
    opt = optax.sgd(0.1)

    def step(loss_op, params, state):
        def loss(p):
            return jnp.mean(loss_op(arrays["x"], p["w"], arrays["labels"], p["b"]))

        val, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, val

    p1, s1 = params, opt.init(params)
    p2, s2 = params, opt.init(params)
    losses = []
    for _ in range(3):
        p1, s1, l1 = step(jaxbp.linear_softmax_cross_entropy, p1, s1)
        p2, s2, l2 = step(jaxbp.reference.linear_softmax_cross_entropy, p2, s2)
        assert_close(l1, l2, jnp.float32)
        losses.append(float(l1))
    assert_close(p1, p2, jnp.float32)
    assert losses[-1] < losses[0]


def test_fused_is_exported_with_its_rules():
    assert jaxbp.linear_softmax_cross_entropy is fused.linear_softmax_cross_entropy
    assert jaxbp.linear_softmax_cross_entropy_fwd is fused.linear_softmax_cross_entropy_fwd
    assert jaxbp.linear_softmax_cross_entropy_bwd is fused.linear_softmax_cross_entropy_bwd
    assert "linear_softmax_cross_entropy" in jaxbp.reference.__all__


# ----------------------------------------- which backward "forward" runs, made observable


def _planted(mark=np.nan):
    """The "forward" strategy's residuals with its saved ``dw1``, ``db1``, ``dcw1`` replaced by
    ``mark`` (``dx1`` kept): the fast path scales them, the fallback never reads them. Also the
    "recompute" residuals, the valid rows, the backward and ``dx1``."""
    arrays, opts = _problem(6, 3, 10, where=True, ignore=-1, weights=True)
    labels, mask = arrays["labels"], opts["where"]
    args = (arrays["x"], arrays["w"], labels, arrays["b"], mask, arrays["class_weights"])
    _, res = fused.linear_softmax_cross_entropy_fwd(*args, ignore_index=-1, strategy="forward")
    dx1, dw1, db1, dcw1 = res[-1]
    planted = (*res[:-1], (dx1, *(jnp.full_like(a, mark) for a in (dw1, db1, dcw1))))
    _, rec = fused.linear_softmax_cross_entropy_fwd(*args, ignore_index=-1, strategy="recompute")
    valid = np.asarray(jaxbp.losses.valid_rows(labels, mask, ignore_index=-1))

    def bwd(res, g, strategy):
        return fused.linear_softmax_cross_entropy_bwd(res, g, ignore_index=-1, strategy=strategy)

    return planted, rec, valid, bwd, dx1


def _branch(planted, rec, bwd, g):
    """Which backward ran for upstream ``g``, with NaN planted: "fast" (the planted gradients,
    scaled: NaN) or "fallback" (the recompute backward's, finite)."""
    dx, dw, _, db, _, dcw = bwd(planted, g, "forward")
    if all(np.all(np.isnan(a)) for a in (dw, db, dcw)):
        return "fast"
    want = bwd(rec, g, "recompute")
    assert_close((dx, dw, db, dcw), (want[0], want[1], want[3], want[5]), jnp.float64)
    return "fallback"


def test_fused_forward_strategy_takes_its_fast_path_exactly_when_g_is_uniform_on_valid_rows():
    planted, rec, valid, bwd, dx1 = _planted()
    assert 0 < valid.sum() < valid.size and not valid[1]  # masked and ignored rows
    first, last = np.flatnonzero(valid)[[0, -1]]
    assert first > 0  # g₀ must come from the first *valid* row
    cases = {"a mean (uniform)": (np.full(6, 0.25), "fast"), "zero": (np.zeros(6), "fast")}
    g = np.full(6, 0.5)
    g[~valid] = 7.0  # other values on rows that do not count
    cases["uniform on valid rows only"] = (g, "fast")
    g = np.full(6, 0.5)
    g[first] = -1.0
    cases["first valid row differs"] = (g, "fallback")
    g = np.full(6, 0.5)
    g[last] = 0.5 + 1e-12
    cases["last valid row differs by 1e-12"] = (g, "fallback")
    g = np.zeros(6)
    g[first] = -0.0  # +0 and -0 compare equal: uniform
    cases["signed zeros"] = (g, "fast")
    g = np.full(6, 0.5)
    g[last] = np.nan
    cases["NaN on a valid row"] = (g, "fallback")
    for name, (g, branch) in cases.items():
        g = jnp.asarray(g)
        if branch == "fallback" and np.isnan(g).any():
            dw = bwd(planted, g, "forward")[1]
            assert np.all(np.isfinite(dw) | np.isnan(bwd(rec, g, "recompute")[1])), name
            continue
        assert _branch(planted, rec, bwd, g) == branch, name
    # The fast path's values: dx row by row from the saved dx1, the rest g₀ times the saved.
    planted, rec, valid, bwd, dx1 = _planted(mark=3.0)
    g = np.full(6, 0.25)
    g[~valid] = 7.0
    dx, dw, _, db, _, dcw = bwd(planted, jnp.asarray(g), "forward")
    np.testing.assert_array_equal(dx, np.where(valid[:, None], g[:, None] * np.asarray(dx1), 0.0))
    for a in (dw, db, dcw):
        np.testing.assert_array_equal(a, np.full(a.shape, 0.25 * 3.0))


def test_fused_forward_strategy_with_every_row_masked_takes_the_fast_path_and_gives_zeros():
    planted, rec, valid, bwd, _ = _planted()
    every = tuple(jnp.zeros(6, bool) if k == 4 else r for k, r in enumerate(planted))
    assert _branch(every, rec, bwd, jnp.full(6, 0.25)) == "fast"
    x, w, b, labels, where, cw = every[:6]  # the residuals keep the inputs, in this order
    _, res = fused.linear_softmax_cross_entropy_fwd(
        x, w, labels, b, where, cw, ignore_index=-1, strategy="forward"
    )  # unplanted: the saved gradients of an all-masked batch are 0
    for a in jax.tree.leaves(bwd(res, jnp.full(6, 0.25), "forward")):
        assert np.all(np.asarray(a) == 0.0)


def test_fused_forward_strategy_choice_is_a_cond_in_the_backward_and_per_example_under_vmap():
    planted, rec, valid, bwd, _ = _planted()
    assert "cond[" in str(jax.make_jaxpr(lambda r, g: bwd(r, g, "forward"))(planted, jnp.ones(6)))
    # Under vmap over upstreams the predicate is batched: each one gets its own branch.
    uniform = jnp.full(6, 0.25)
    ragged = uniform.at[int(np.argmax(valid))].set(2.0)
    batched = jax.vmap(lambda g: bwd(planted, g, "forward"))(jnp.stack([uniform, ragged]))
    for k, (g, branch) in enumerate(((uniform, "fast"), (ragged, "fallback"))):
        assert _branch(planted, rec, bwd, g) == branch
        one = bwd(planted, g, "forward")
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(one), strict=True):
            np.testing.assert_array_equal(a[k], b)
