"""The losses' curvature rules (jaxbp/_losscurv.py, jaxbp/_fusedcurv.py) against oracles.

Every oracle is independent of the rules: ``H`` per unit is a diagonal block of
``jax.hessian`` of the *reference* loss (``jaxbp.reference.*``) summed with the seeds ``g``,
in float64; the fused head's ``H̃`` at ``z̃ = x·w + b`` is the Hessian of the reference fused
loss with ``x = z̃`` and ``w = I`` (the softcap's second derivative included by autodiff),
and its ``J`` is ``jax.jvp``/``jax.vjp`` of ``(x, w, b) ↦ x·w + b``. Checked: ``ggn_vp``
against ``H·v`` and ``S·Sᵀ`` against ``g·H`` to 1e-12, ``logits_bwd`` against ``jax.vjp``,
the Monte-Carlo column's mean of ``s·sᵀ`` within 5 standard errors of ``g·H`` and its mean
within 5 of 0, masked units exactly 0, NaN where no real factor exists; planted bugs fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp import reference as ref
from tests.helpers import assert_close

CE, BCE, MSE = jaxbp.softmax_cross_entropy, jaxbp.sigmoid_binary_cross_entropy, jaxbp.mse
FUSED = jaxbp.linear_softmax_cross_entropy
N, C = 4, 5  # units, classes
SAMPLES = 3000  # Monte-Carlo columns per check


def _blocks(total, z):
    """The per-unit diagonal blocks ``(n…, c, c)`` of ``jax.hessian(total)(z)``."""
    flat = z.reshape(-1, z.shape[-1])
    n, c = flat.shape

    @jax.jit  # one program, not one compile per primitive
    def blocks(flat):
        h = jax.hessian(lambda f: total(f.reshape(z.shape)))(flat)  # (n, c, n, c)
        return h[jnp.arange(n), :, jnp.arange(n), :].reshape(*z.shape, c)

    return blocks(flat)


def _mc(draw, keys):
    """Mean of ``s·sᵀ`` and of ``s`` over the keys, and 5 standard errors of each."""
    s = np.asarray(jax.vmap(draw)(keys), np.float64)  # (m, n…, c)
    outer = s[..., :, None] * s[..., None, :]
    m = len(keys)
    return (outer.mean(0), 5 * outer.std(0) / np.sqrt(m), s.mean(0), 5 * s.std(0) / np.sqrt(m))


def _check_mc(draw, gh, keys):
    mean_ss, tol_ss, mean_s, tol_s = _mc(draw, keys)
    gh = np.asarray(gh, np.float64)
    assert np.all(np.abs(mean_ss - gh) <= tol_ss + 1e-12), "E[s·sᵀ] ≠ g·H"
    assert np.all(np.abs(mean_s) <= tol_s + 1e-12), "E[s] ≠ 0"


def _close(actual, expected, name):
    """Within 1e-12 of ``expected``, relative to its max-abs or 1 (``H = 0`` for v = 1)."""
    for a, e in zip(actual, expected, strict=True):
        err = np.max(np.abs(np.asarray(a) - np.asarray(e)), initial=0.0)
        assert err <= 1e-12 * max(1.0, np.max(np.abs(np.asarray(e)), initial=0.0)), name


def _factor_product(s):
    return jnp.einsum("...ck,...dk->...cd", s, s)


# ----------------------------------------------------------------- softmax cross-entropy


def _ce_case(name, rng):
    z = jnp.asarray(rng.normal(size=(N, C)))  # every class drawn often by the MC check
    ids = jnp.asarray(rng.integers(0, C, size=N))
    probs = jnp.asarray(rng.dirichlet(np.ones(C), size=N))
    cw = jnp.asarray(rng.uniform(0.5, 2.0, size=C))
    where = jnp.array([True, False, True, True])
    cases = {
        "plain": (ids, {}, {}),
        "smoothing": (ids, {}, {"label_smoothing": 0.2}),
        "class_weights": (ids, {"class_weights": cw}, {}),
        "where": (ids, {"where": where}, {}),
        "ignore_index": (ids.at[2].set(-1), {}, {"ignore_index": -1}),
        "z_loss": (ids, {}, {"z_loss": 0.3}),
        "probabilities": (probs * 1.5, {"class_weights": cw}, {"label_smoothing": 0.1}),
        "all": (
            ids.at[0].set(-1),
            {"class_weights": cw, "where": where},
            {"label_smoothing": 0.1, "ignore_index": -1, "z_loss": 0.05},
        ),  # fmt: skip
    }
    labels, arrays, options = cases[name]
    return z, labels, arrays, options


CE_CASES = ["plain", "smoothing", "class_weights", "where", "ignore_index", "z_loss",
            "probabilities", "all"]  # fmt: skip


def _ce_oracle(z, labels, arrays, options, g):
    total = lambda f: jnp.sum(g * ref.softmax_cross_entropy(f, labels, **arrays, **options))  # noqa: E731
    return _blocks(total, z)


def check_ce(z, labels, arrays, options, *, mc=True):
    """Every rule of softmax cross-entropy against the reference's Hessian (float64)."""
    rng = np.random.default_rng(1)
    g = jnp.asarray(rng.uniform(0.2, 1.0, size=z.shape[:-1]))
    gh = _ce_oracle(z, labels, arrays, options, g)
    _, res = CE.fwd(z, labels, arrays.get("where"), arrays.get("class_weights"), **options)
    v = jnp.asarray(rng.normal(size=z.shape))
    hv = CE.ggn_vp(res, (v, None, None, None), g, **options)
    assert hv[1:] == (None, None, None)
    assert_close(hv[0], jnp.einsum("...cd,...d->...c", gh, v), name="ggn_vp")
    s = CE.hessian_factor(res, g, **options)
    k = z.shape[-1] + (1 if options.get("z_loss") else 0)
    assert s.shape == (*z.shape, k)
    assert_close(_factor_product(s), gh, name="S·Sᵀ")
    dz = jnp.asarray(rng.normal(size=z.shape))
    _, vjp = jax.vjp(lambda f: f, z)  # the plain losses' J: the identity
    assert_close(CE.logits_bwd(res, dz, **options)[0], vjp(dz)[0], name="logits_bwd")
    if mc:
        keys = jax.random.split(jax.random.key(0), SAMPLES)
        _check_mc(lambda key: CE.sample_bwd(res, g, key, **options)[0], gh, keys)
    return res, g


@pytest.mark.parametrize("name", CE_CASES)
def test_softmax_cross_entropy_rules(name):
    z, labels, arrays, options = _ce_case(name, np.random.default_rng(0))
    res, g = check_ce(z, labels, arrays, options)
    valid = np.ones(N, bool)
    if "where" in arrays:
        valid &= np.asarray(arrays["where"])
    if "ignore_index" in options:
        valid &= np.asarray(labels) != options["ignore_index"]
    masked = ~valid
    if masked.any():  # exactly 0, every rule
        outs = (
            CE.ggn_vp(res, (jnp.ones_like(z), None, None, None), g, **options)[0],
            CE.hessian_factor(res, g, **options),
            CE.sample_bwd(res, g, jax.random.key(3), **options)[0],
        )
        for out in outs:
            assert np.all(np.asarray(out)[masked] == 0.0)


def test_traced_options_and_the_zero_z_loss_column():
    """A traced z-loss keeps its factor column (exactly 0 for λ = 0); the rules run under
    jit with traced ``label_smoothing``/``z_loss`` as the op's backward does (the fused
    head's too, equal to the Python-number options)."""
    z, labels, _, _ = _ce_case("plain", np.random.default_rng(0))
    _, res = CE.fwd(z, labels)
    g = jnp.full((N,), 0.5)
    s = jax.jit(lambda lam: CE.hessian_factor(res, g, z_loss=lam))(0.0)
    assert s.shape == (N, C, C + 1) and np.all(np.asarray(s[..., -1]) == 0.0)
    assert_close(s[..., :C], CE.hessian_factor(res, g))
    x, w, b, ids = _fused_case(np.random.default_rng(0))
    opts = {"softcap": 3.0, "chunk_size": 3}
    _, res = FUSED.fwd(x, w, ids, b, **opts)
    tang = (x, None, None, None, None, None)
    g = jnp.full((5,), 0.5)

    def rules(eps, lam):
        kw = {**opts, "label_smoothing": eps, "z_loss": lam}
        return (FUSED.ggn_vp(res, tang, g, **kw)[0], FUSED.hessian_factor(res, g, **kw),
                FUSED.sample_bwd(res, g, jax.random.key(0), **kw)[0])  # fmt: skip

    assert_close(jax.jit(rules)(0.1, 0.2), rules(0.1, 0.2))


@settings(max_examples=5)
@given(
    n=st.integers(1, 3), c=st.integers(1, 6), seed=st.integers(0, 2**16),
    smoothing=st.sampled_from([0.0, 0.3]), z_loss=st.sampled_from([0.0, 0.1]),
)  # fmt: skip
def test_softmax_cross_entropy_shapes(n, c, seed, smoothing, z_loss):
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.normal(size=(n, 2, c)))
    labels = jnp.asarray(rng.integers(0, c, size=(n, 2)))
    options = {"label_smoothing": smoothing, "z_loss": z_loss}
    check_ce(z, labels, {}, options, mc=False)


def test_no_real_factor_is_nan():
    """α < 0 (a z-loss with logits far below 0) and g < 0 have no real factor: NaN on that
    unit, while ggn_vp stays the exact g·H; an out-of-range label (jit) NaN as bwd."""
    z = jnp.full((2, C), -10.0).at[1].set(jnp.linspace(0.0, 1.0, C))
    labels = jnp.array([1, 2])
    options = {"z_loss": 1.0}  # α = 1 + 2·lse < 0 on row 0
    g = jnp.array([1.0, 1.0])
    _, res = CE.fwd(z, labels, **options)
    s = np.asarray(CE.hessian_factor(res, g, **options))
    assert np.isnan(s[0]).any() and np.isfinite(s[1]).all()
    col = np.asarray(CE.sample_bwd(res, g, jax.random.key(0), **options)[0])
    assert np.isnan(col[0]).all() and np.isfinite(col[1]).all()
    gh = _ce_oracle(z, labels, {}, options, g)
    v = jnp.ones_like(z)
    hv = CE.ggn_vp(res, (v, None, None, None), g, **options)[0]
    assert_close(hv, jnp.einsum("ncd,nd->nc", gh, v))
    s = np.asarray(CE.hessian_factor(res, jnp.array([-1.0, 1.0])))
    assert np.isnan(s[0]).all() and np.isfinite(s[1]).all()
    _, res = CE.fwd(z, jnp.array([C, 0]))  # out of range: not checked by fwd
    assert np.isnan(np.asarray(CE.hessian_factor(res, g))[0]).all()


# ------------------------------------------------------------------------- BCE and MSE


def test_bce_rules():
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(size=(N, C)) * 2)
    y = jnp.asarray(rng.uniform(size=(N, C)))
    g = jnp.asarray(rng.uniform(0.2, 1.0, size=(N, C)))  # the op's output shape
    total = lambda f: jnp.sum(g * ref.sigmoid_binary_cross_entropy(f, y))  # noqa: E731
    h = jax.hessian(total)(z)  # (n,c,n,c): diagonal
    hd = jnp.einsum("ncnc->nc", h)
    assert_close(h, jnp.einsum("nc,nm,cd->ncmd", hd, jnp.eye(N), jnp.eye(C)))
    _, res = BCE.fwd(z, y)
    v = jnp.asarray(rng.normal(size=z.shape))
    assert_close(BCE.ggn_vp(res, (v, None), g)[0], hd * v, name="ggn_vp")
    s = BCE.hessian_factor(res, g)
    assert_close(_factor_product(s), jax.vmap(jnp.diag)(hd), name="S·Sᵀ")
    assert_close(BCE.logits_bwd(res, v)[0], v)
    keys = jax.random.split(jax.random.key(1), SAMPLES)
    _check_mc(lambda k: BCE.sample_bwd(res, g, k)[0], jax.vmap(jnp.diag)(hd), keys)
    # a seed per example (the mean over c): each element gets g/c
    gr = jnp.asarray(rng.uniform(0.2, 1.0, size=(N,)))
    assert_close(BCE.ggn_vp(res, (v, None), gr)[0], (gr[:, None] / C) * hd / g * v)


def test_mse_rules():
    rng = np.random.default_rng(3)
    pred = jnp.asarray(rng.normal(size=(2, N, C)))
    target = jnp.asarray(rng.normal(size=(2, N, C)))
    g = jnp.asarray(rng.uniform(0.2, 1.0, size=(2, N)))
    gh = _blocks(lambda f: jnp.sum(g * ref.mse(f, target)), pred)
    _, res = MSE.fwd(pred, target)
    v = jnp.asarray(rng.normal(size=pred.shape))
    out = MSE.ggn_vp(res, (v, None), g)
    assert out[1] is None
    assert_close(out[0], jnp.einsum("...cd,...d->...c", gh, v), name="ggn_vp")
    assert_close(_factor_product(MSE.hessian_factor(res, g)), gh, name="S·Sᵀ")
    assert_close(MSE.logits_bwd(res, v)[0], v)
    keys = jax.random.split(jax.random.key(2), SAMPLES)
    _check_mc(lambda k: MSE.sample_bwd(res, g, k)[0], gh, keys)


def test_half_precision_in_float32():
    """bfloat16 inputs: computed in float32, results in bfloat16, close to the float32
    rules on the same (rounded) inputs (softmax cross-entropy and the fused head)."""
    z, labels, _, _ = _ce_case("z_loss", np.random.default_rng(0))
    zb = z.astype(jnp.bfloat16)
    g = jnp.full((N,), 0.25, jnp.float32)
    outs = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        _, res = CE.fwd(zb.astype(dtype), labels, z_loss=0.3)
        v = jnp.ones_like(zb, dtype)
        outs[dtype] = (CE.ggn_vp(res, (v, None, None, None), g, z_loss=0.3)[0],
                       CE.hessian_factor(res, g, z_loss=0.3))  # fmt: skip
    assert all(o.dtype == jnp.bfloat16 for o in outs[jnp.bfloat16])
    assert_close(outs[jnp.bfloat16], outs[jnp.float32], jnp.bfloat16)
    *arrays, labels = _fused_case(np.random.default_rng(0))
    x, w, b = (a.astype(jnp.bfloat16) for a in arrays)
    opts = {"softcap": 3.0, "chunk_size": 3}
    g = jnp.full((5,), 0.2, jnp.float32)
    for dtype in (jnp.bfloat16, jnp.float32):
        _, res = FUSED.fwd(x.astype(dtype), w.astype(dtype), labels, b.astype(dtype), **opts)
        tang = (jnp.ones_like(x, dtype), None, None, None, None, None)
        outs[dtype] = (FUSED.ggn_vp(res, tang, g, **opts)[0],
                       FUSED.sample_bwd(res, g, jax.random.key(0), **opts)[1],
                       FUSED.logits_bwd(res, jnp.ones((5, 7), dtype), **opts)[3])  # fmt: skip
    assert all(o.dtype == jnp.bfloat16 for o in outs[jnp.bfloat16])
    assert_close(outs[jnp.bfloat16], outs[jnp.float32], jnp.bfloat16)


# ------------------------------------------------------------------------ the fused head


def _fused_case(rng, *, n=5, d=3, v=7):
    x = jnp.asarray(rng.normal(size=(n, d)) * 0.7)  # logits within about ±2: every class
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.7)  # is drawn often by the Monte-Carlo check
    b = jnp.asarray(rng.normal(size=v) * 0.5)
    labels = jnp.argmax(x @ w + b, axis=-1)  # mostly a definite H̃ under a softcap
    return x, w, b, labels.at[0].set((labels[0] + 1) % v)


FUSED_CASES = {
    "plain": {},
    "softcap": {"softcap": 3.0, "chunk_size": 3},
    "options": {"label_smoothing": 0.1, "z_loss": 0.2, "chunk_size": 4},
    "all": {
        "softcap": 3.0,
        "label_smoothing": 0.1,
        "z_loss": 0.1,
        "ignore_index": 1,
        "chunk_size": 3,
    },  # fmt: skip
    "forward": {"softcap": 3.0, "strategy": "forward", "chunk_size": 2, "z_loss": 0.1},
}


def _fused_oracle(zt, labels, arrays, options, g):
    """``g·H̃ (n, v, v)`` at ``z̃``: the reference fused loss with ``x = z̃``, ``w = I``."""
    eye = jnp.eye(zt.shape[-1])
    opts = {k: o for k, o in options.items() if k not in ("chunk_size", "strategy")}
    total = lambda f: jnp.sum(  # noqa: E731
        g * ref.linear_softmax_cross_entropy(f, eye, labels, **arrays, **opts)
    )
    return _blocks(total, zt)


def check_fused(x, w, b, labels, arrays, options, *, mc=True):
    rng = np.random.default_rng(4)
    n, v = labels.shape[0], w.shape[1]
    g = jnp.asarray(rng.uniform(0.2, 1.0, size=n))
    lin = lambda x, w, b: x @ w + b  # noqa: E731
    zt, vjp = jax.vjp(lin, x, w, b)
    gh = _fused_oracle(zt, labels, arrays, options, g)
    where, cw = arrays.get("where"), arrays.get("class_weights")
    _, res = FUSED.fwd(x, w, labels, b, where, cw, **options)
    tang = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in (x, w, b))
    zdot = jax.jvp(lin, (x, w, b), tang)[1]
    want = vjp(jnp.einsum("nvu,nu->nv", gh, zdot))
    got = FUSED.ggn_vp(res, (tang[0], tang[1], None, tang[2], None, None), g, **options)
    assert got[2] is None and got[4] is None and got[5] is None
    _close((got[0], got[1], got[3]), want, "ggn_vp")
    dz = jnp.asarray(rng.normal(size=zt.shape))
    got = FUSED.logits_bwd(res, dz, **options)
    assert_close((got[0], got[1], got[3]), vjp(dz), name="logits_bwd")
    s = np.asarray(FUSED.hessian_factor(res, g, **options))
    assert s.shape == (n, v, v + (1 if options.get("z_loss") else 0))
    lowest = np.linalg.eigvalsh(np.asarray(gh))[:, 0]
    definite = lowest >= -1e-12
    scale = max(np.max(np.abs(gh)), float(np.max(g)))  # H̃ = 0 for v = 1: g's scale
    assert np.all(np.isnan(s[lowest < -1e-9]).any(axis=(1, 2))), "no NaN on an indefinite H̃"
    assert not np.isnan(s[definite]).any()
    err = np.abs(np.asarray(_factor_product(s))[definite] - np.asarray(gh)[definite])
    assert np.max(err, initial=0.0) <= 1e-12 * scale, "S·Sᵀ ≠ g·H̃"
    if mc:  # the column at z̃: x = z̃, w = I makes Jᵀ·s's dx the column itself
        _, res_z = FUSED.fwd(zt, jnp.eye(v), labels, None, where, cw, **options)
        keys = jax.random.split(jax.random.key(5), SAMPLES)
        draw = lambda k: FUSED.sample_bwd(res_z, g, k, **options)[0][definite]  # noqa: E731
        _check_mc(draw, np.asarray(gh)[definite], keys)
    return definite


@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_rules(name):
    x, w, b, labels = _fused_case(np.random.default_rng(0))
    arrays = {}
    if name == "all":
        arrays = {"class_weights": jnp.linspace(0.5, 2.0, 7), "where": jnp.arange(5) != 3}
    definite = check_fused(x, w, b, labels, arrays, FUSED_CASES[name])
    assert definite.sum() >= 2  # the check saw factors, not only NaN rows
    if name == "softcap":
        assert not definite.all()  # ... and an indefinite H̃ too


@settings(max_examples=4)
@given(n=st.integers(1, 4), v=st.integers(1, 6), chunk=st.integers(1, 4),
       seed=st.integers(0, 2**16), softcap=st.sampled_from([None, 4.0]))  # fmt: skip
def test_fused_shapes(n, v, chunk, seed, softcap):
    x, w, b, labels = _fused_case(np.random.default_rng(seed), n=n, v=v)
    check_fused(x, w, b, labels, {}, {"chunk_size": chunk, "softcap": softcap}, mc=False)


def test_fused_masked_rows_are_zero():
    x, w, b, labels = _fused_case(np.random.default_rng(1))
    where = jnp.arange(5) != 2
    opts = {"softcap": 3.0, "chunk_size": 3}
    _, res = FUSED.fwd(x, w, labels, b, where, None, **opts)
    g = jnp.ones(5)
    s = np.asarray(FUSED.hessian_factor(res, g, **opts))
    assert np.all(s[2] == 0.0)
    # Jᵀ·s with x = z̃, w = I: dx is the column; a masked row gets exactly 0
    _, res_z = FUSED.fwd(x @ w + b, jnp.eye(7), labels, None, where, None, **opts)
    col = np.asarray(FUSED.sample_bwd(res_z, g, jax.random.key(0), **opts)[0])
    assert np.all(col[2] == 0.0)
    dx = FUSED.ggn_vp(res_z, (jnp.ones((5, 7)), None, None, None, None, None), g, **opts)[0]
    assert np.all(np.asarray(dx)[2] == 0.0)


# ------------------------------------------------------------------------ planted bugs


def test_planted_bugs_are_caught(monkeypatch):
    """A rule with a bug fails its check: the rank-one term dropped from ggn_vp, a
    transposed factor, labels drawn uniformly instead of from p, the softcap's second
    derivative dropped from the fused head's H̃."""
    z, labels, arrays, options = _ce_case("smoothing", np.random.default_rng(0))
    good = {name: getattr(CE, name) for name in ("ggn_vp", "hessian_factor", "sample_bwd")}

    def no_rank_one(res, tangents, g, **kw):
        p = jax.nn.softmax(res[0])
        return g[:, None] * p * tangents[0], None, None, None

    def transposed(res, g, **kw):
        return jnp.swapaxes(good["hessian_factor"](res, g, **kw), -1, -2)

    def uniform(res, g, key, **kw):
        p = jax.nn.softmax(res[0])
        y = jax.random.randint(key, g.shape, 0, p.shape[-1])
        return jnp.sqrt(g)[:, None] * (p - jax.nn.one_hot(y, p.shape[-1])), None, None, None

    for name, bug in (("ggn_vp", no_rank_one), ("hessian_factor", transposed),
                      ("sample_bwd", uniform)):  # fmt: skip
        with monkeypatch.context() as m:
            m.setattr(CE, name, bug)
            with pytest.raises(AssertionError):
                check_ce(z, labels, arrays, options, mc=name == "sample_bwd")
    check_ce(z, labels, arrays, options, mc=False)  # the good rules pass the same check

    x, w, b, labels = _fused_case(np.random.default_rng(0))
    opts = FUSED_CASES["softcap"]

    def no_softcap_term(res, tangents, g, **kw):  # the Gauss–Newton split after the softcap
        x, w, b, labels = res[:4]
        t = jnp.tanh((x @ w + b) / kw["softcap"])
        _, res_ce = CE.fwd(kw["softcap"] * t, labels)
        zdot = (tangents[0] @ w + x @ tangents[1] + tangents[3]) * (1 - t * t)
        dz = CE.ggn_vp(res_ce, (zdot, None, None, None), g)[0] * (1 - t * t)
        return FUSED.logits_bwd(res, dz, **kw)

    monkeypatch.setattr(FUSED, "ggn_vp", no_softcap_term)
    with pytest.raises(AssertionError):
        check_fused(x, w, b, labels, {}, opts, mc=False)


# --------------------------------------------------------------- binding and contract


def test_rules_bound_to_losses_only():
    names = ("ggn_vp", "hessian_factor", "logits_bwd", "sample_bwd")
    for op in (CE, BCE, MSE, FUSED):
        assert all(callable(getattr(op, name)) for name in names), op
    for op in (jaxbp.dense, jaxbp.softmax, jaxbp.layer_norm, jaxbp.relu):
        assert all(getattr(op, name) is None for name in names), op


def _user_loss():
    def fwd(z, *, scale=1.0):
        return scale * jnp.sum(z**2, -1), (z,)

    def bwd(res, g, *, scale=1.0):
        return (2 * scale * g[..., None] * res[0],)

    def reference(z, *, scale=1.0):
        return scale * jnp.sum(z**2, -1)

    def ggn_vp(res, tangents, g, *, scale=1.0):
        return (2 * scale * g[..., None] * tangents[0],)

    return fwd, bwd, reference, ggn_vp


def test_user_op_takes_curvature_rules():
    fwd, bwd, reference, ggn_vp = _user_loss()
    op = jaxbp.Op(fwd, bwd, reference, options={"scale": 1.0}, curvature={"ggn_vp": ggn_vp})
    assert op.hessian_factor is None and op.sample_bwd is None and op.logits_bwd is None
    z = jnp.arange(6.0).reshape(2, 3)
    _, res = op.fwd(z, scale=3.0)
    g = jnp.array([1.0, 0.5])
    gh = _blocks(lambda f: jnp.sum(g * reference(f, scale=3.0)), z)
    v = jnp.ones_like(z)
    assert_close(op.ggn_vp(res, (v,), g, scale=3.0)[0], jnp.einsum("ncd,nd->nc", gh, v))
    with pytest.raises(TypeError, match="unexpected option"):
        op.ggn_vp(res, (v,), g, sclae=3.0)


@pytest.mark.parametrize(
    "curvature, error, match",
    [
        ([("ggn_vp", abs)], TypeError, "curvature: expected a mapping"),
        ({"hessian": abs}, ValueError, r"curvature: unknown rule\(s\) \['hessian'\]"),
        ({"ggn_vp": 3}, TypeError, r"curvature\['ggn_vp'\]: expected a callable"),
    ],
)
def test_bad_curvature_mapping(curvature, error, match):
    fwd, bwd, reference, _ = _user_loss()
    with pytest.raises(error, match=match):
        jaxbp.Op(fwd, bwd, reference, options={"scale": 1.0}, curvature=curvature)
    with pytest.raises(error, match=match):
        jaxbp._op.declare(fwd=fwd, bwd=bwd, per_example=("z",), curvature=curvature)


def test_bad_tangents_and_seeds():
    z, labels, _, _ = _ce_case("plain", np.random.default_rng(0))
    _, res = CE.fwd(z, labels)
    g = jnp.ones(N)
    with pytest.raises(ValueError, match=r"tangents: .* expected one per argument"):
        CE.ggn_vp(res, (z,), g)
    with pytest.raises(TypeError, match=r"tangents\[1\] \(labels\): expected None"):
        CE.ggn_vp(res, (z, labels, None, None), g)
    with pytest.raises(ValueError, match=r"tangents\[0\] \(logits\): expected the shape"):
        CE.ggn_vp(res, (z[:2], None, None, None), g)
    with pytest.raises(ValueError, match="g: expected the batch shape"):
        CE.hessian_factor(res, jnp.ones(N + 1))
    with pytest.raises(ValueError, match="dz: expected the shape of logits"):
        CE.logits_bwd(res, z[:2])
    x, w, b, lab = _fused_case(np.random.default_rng(0))
    _, res = FUSED.fwd(x, w, lab)
    with pytest.raises(TypeError, match=r"tangents\[3\] \(b\): expected None"):
        FUSED.ggn_vp(res, (x, None, None, b, None, None), jnp.ones(5))
    with pytest.raises(ValueError, match="dz: expected the shape of the logits"):
        FUSED.logits_bwd(res, jnp.ones((5, 3)))
