"""The GGN's diagonal and KFAC factors (jaxbp/kfac.py) against independent oracles.

The oracle GGN is built explicitly, in float64, from ``jax.jacrev`` of the plain twins'
logits (``jaxbp.reference._nn.forward``, ``jaxbp.reference._gpt.gpt_logits``) and
``jax.hessian`` of optax's loss per unit: ``G = Σ_u (valid_u/N)·J_uᵀ·H_u·J_u``; nothing of
the rules' own helpers. Checked: the exact diagonal equals ``diag(G)`` to 1e-12 (MLP with
each loss, GPT); KFAC's ``A ⊗ G`` equals the exact GGN block of a deep linear network with
MSE on one example, and its factors equal their definitions; the Monte-Carlo estimates
converge (error ~ 1/√S, and within 5 standard errors at a fixed S); masked units count for
nothing; bad input and ops without the needed rules give errors naming them; planted bugs
in the rules fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import jaxbp
from jaxbp.reference import _gpt, _nn

N, I, H, C = 5, 3, 4, 3  # examples, inputs, hidden, classes


def _perturbed(params, seed=1):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys, strict=True)]
    moved = [a + 0.3 * e for a, e in zip(leaves, noise, strict=True)]
    return jax.tree.unflatten(tree, moved)


def _explicit_ggn(logits_of, loss_of, params, valid):
    """``(G (P, P), unravel)``: ``Σ_u (valid_u/N)·J_uᵀ·H_u·J_u`` with ``J`` by ``jax.jacrev``
    of the twin's logits and ``H_u = jax.hessian`` of optax's loss of unit ``u``."""
    flat, unravel = ravel_pytree(params)
    z = logits_of(params)
    c = z.shape[-1]
    jac = jax.jacrev(lambda f: logits_of(unravel(f)))(flat).reshape(-1, c, flat.size)
    hess = jax.vmap(jax.hessian(loss_of))(z.reshape(-1, c), jnp.arange(jac.shape[0]))
    valid = valid.reshape(-1).astype(jnp.float64)
    w = valid / jnp.maximum(jnp.sum(valid), 1.0)
    return jnp.einsum("u,ucp,ucd,udq->pq", w, jac, hess, jac), unravel


def _close(got, want, tol):
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
    ):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=jax.tree_util.keystr(path))


def _mlp_case(loss):
    model = jaxbp.MLP((I, H, C), activation="tanh", loss=loss)
    params = _perturbed(model.init(jax.random.key(0), jnp.float64))
    x = jax.random.normal(jax.random.key(2), (N, I), jnp.float64)
    if loss == "softmax_cross_entropy":
        y = jnp.array([0, 1, 2, 1, 0])
        unit = lambda z, u: optax.softmax_cross_entropy_with_integer_labels(z, y[u])  # noqa: E731
    elif loss == "mse":
        y = jax.random.normal(jax.random.key(3), (N, C), jnp.float64)
        unit = lambda z, u: jnp.mean((z - y[u]) ** 2)  # noqa: E731
    else:
        y = jax.random.uniform(jax.random.key(3), (N, C), jnp.float64)
        unit = lambda z, u: jnp.mean(optax.sigmoid_binary_cross_entropy(z, y[u]))  # noqa: E731
    return model, params, x, y, unit


# ------------------------------------------------------------------ the exact diagonal


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse", "sigmoid_binary_cross_entropy"])
def test_exact_diagonal_equals_explicit_ggn_mlp(loss):
    model, params, x, y, unit = _mlp_case(loss)
    got = jaxbp.diag_ggn(model)(params, x, y)
    ggn, unravel = _explicit_ggn(
        lambda p: _nn.forward(model, p, x), unit, params, jnp.ones((N,), bool)
    )  # fmt: skip
    _close(got, unravel(jnp.diag(ggn)), 1e-12)


@settings(max_examples=4, derandomize=True, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    n=st.integers(1, 4),
    masked=st.integers(0, 3),
)
def test_exact_diagonal_any_shape(sizes, n, masked):
    """Any depth, widths and batch (some rows masked): the explicit GGN's diagonal."""
    model = jaxbp.MLP(tuple(sizes), activation="tanh", loss="softmax_cross_entropy")
    params = _perturbed(model.init(jax.random.key(0), jnp.float64))
    x = jax.random.normal(jax.random.key(2), (n, sizes[0]), jnp.float64)
    y = jnp.arange(n) % sizes[-1]
    where = jnp.arange(n) >= min(masked, n - 1)

    def unit(z, u):
        return optax.softmax_cross_entropy_with_integer_labels(z, y[u])

    got = jaxbp.diag_ggn(model)(params, x, y, where=where)
    ggn, unravel = _explicit_ggn(lambda p: _nn.forward(model, p, x), unit, params, where)
    _close(got, unravel(jnp.diag(ggn)), 1e-12)


def _gpt_case(tied=False):
    model = jaxbp.GPT(vocab=5, d=4, heads=2, layers=1, context=3, mlp_ratio=1, tied=tied)
    params = _perturbed(model.init(jax.random.key(0), jnp.float64), seed=7)
    ids = jnp.array([[0, 3, 4], [2, 1, 1]])
    targets = jnp.array([[3, 4, 1], [1, 0, 2]])
    return model, params, ids, targets


def test_exact_diagonal_equals_explicit_ggn_gpt():
    """Every (token, column) carried back: a token's logits depend on every earlier one.
    Tied: the head's per-example ``dwᵀ`` adds to the table's before the square."""
    model, params, ids, targets = _gpt_case(tied=True)
    where = jnp.array([[True, True, False], [True, True, True]])
    got = jaxbp.diag_ggn(model)(params, ids, targets, where=where)
    flat_t = targets.reshape(-1)
    ggn, unravel = _explicit_ggn(
        lambda p: _gpt.gpt_logits(model, p, ids),
        lambda z, u: optax.softmax_cross_entropy_with_integer_labels(z, flat_t[u]),
        params, where,
    )  # fmt: skip
    _close(got, unravel(jnp.diag(ggn)), 1e-12)


def test_columns_in_batches_give_the_same_diagonal_and_factors(monkeypatch):
    """With a budget of one column at a time the exact columns run in a ``lax.scan`` of
    batches (the last padded with zero columns): the same diagonal and factors, to 1e-12."""
    from jaxbp import kfac

    model, params, ids, targets = _gpt_case(tied=True)
    whole_diag = jaxbp.diag_ggn(model)(params, ids, targets)
    whole_kfac = jaxbp.kfac_factors(model)(params, ids, targets)
    jaxbp._step.compiled.cache_clear()
    monkeypatch.setattr(kfac, "COLUMN_BYTES", 1)  # one column per batch: 3·5 = 15 steps
    try:
        one_diag = jaxbp.diag_ggn(model)(params, ids, targets)
        one_kfac = jaxbp.kfac_factors(model)(params, ids, targets)
        jaxpr = str(jax.make_jaxpr(jaxbp.diag_ggn(model).jitted)(params, ids, targets, None, None))
    finally:
        jaxbp._step.compiled.cache_clear()
    assert "scan" in jaxpr and "length=15" in jaxpr
    _close(one_diag, whole_diag, 1e-12)
    _close(one_kfac, whole_kfac, 1e-12)


def test_masked_units_count_for_nothing():
    model, params, x, y, _ = _mlp_case("softmax_cross_entropy")
    where = jnp.array([True, False, True, True, False])
    f = jaxbp.diag_ggn(model)
    _close(f(params, x, y, where=where), f(params, x[where], y[where]), 1e-14)
    k = jaxbp.kfac_factors(model)
    _close(k(params, x, y, where=where), k(params, x[where], y[where]), 1e-14)


# ------------------------------------------------------------------------------ KFAC


def test_kfac_is_the_exact_block_of_a_deep_linear_network():
    """One example, MSE, linear layers (leaky_relu with slope 1): ``A ⊗ G`` is the GGN block
    of ``vec([w; b])`` exactly."""
    model = jaxbp.MLP((I, H, H, C), activation="leaky_relu", loss="mse",
                      activation_options={"negative_slope": 1.0})  # fmt: skip
    params = _perturbed(model.init(jax.random.key(0), jnp.float64))
    x = jax.random.normal(jax.random.key(2), (1, I), jnp.float64)
    y = jax.random.normal(jax.random.key(3), (1, C), jnp.float64)
    factors = jaxbp.kfac_factors(model)(params, x, y)
    assert sorted(factors) == ["[0]['w']", "[1]['w']", "[2]['w']"]
    for layer, p in enumerate(params):
        i, o = p["w"].shape

        def logits(theta, layer=layer, i=i):  # theta (i+1, o) = [w; b]
            ps = [dict(q) for q in params]
            ps[layer] = {"w": theta[:i], "b": theta[i]}
            return _nn.forward(model, ps, x)[0]

        theta = jnp.concatenate([p["w"], p["b"][None]], axis=0)
        jac = jax.jacrev(logits)(theta).reshape(C, (i + 1) * o)  # row-major vec
        block = jac.T @ ((2.0 / C) * jnp.eye(C)) @ jac  # MSE's Hessian, optax-free: (2/c)·I
        f = factors[f"[{layer}]['w']"]
        assert f["A"].shape == (i + 1, i + 1) and f["G"].shape == (o, o)
        np.testing.assert_allclose(jnp.kron(f["A"], f["G"]), block, rtol=0, atol=1e-12)


def test_kfac_factors_are_their_definitions_gpt():
    """``A`` the mean of ``[a, 1]·[a, 1]ᵀ`` over valid tokens; the head's ``G`` the sum over
    tokens of the loss Hessians at its logits (``Σ_u g·H_u``, by ``jax.hessian`` of optax)."""
    model, params, ids, targets = _gpt_case()
    where = jnp.array([[True, False, True], [True, True, True]])
    factors = jaxbp.kfac_factors(model)(params, ids, targets, where=where)
    assert {k: (f["A"].shape, f["G"].shape) for k, f in factors.items()} == {
        "['blocks'][0]['attn']['qkv']['w']": ((5, 5), (12, 12)),
        "['blocks'][0]['attn']['proj']['w']": ((5, 5), (4, 4)),
        "['blocks'][0]['mlp']['fc']['w']": ((5, 5), (4, 4)),
        "['blocks'][0]['mlp']['out']['w']": ((5, 5), (4, 4)),
        "['head']['w']": ((4, 4), (5, 5)),
    }
    # the head: its input is the final layer norm's output; the logits' Hessians by optax
    x = _gpt_final_hidden(model, params, ids).reshape(-1, model.d)
    z = x @ params["head"]["w"]
    valid = where.reshape(-1).astype(jnp.float64)
    hess = jax.vmap(jax.hessian(optax.softmax_cross_entropy_with_integer_labels))(
        z, targets.reshape(-1)
    )  # fmt: skip
    want_g = jnp.einsum("u,ucd->cd", valid / jnp.sum(valid), hess)
    want_a = jnp.einsum("u,ua,ub->ab", valid, x, x) / jnp.sum(valid)
    np.testing.assert_allclose(factors["['head']['w']"]["G"], want_g, rtol=0, atol=1e-12)
    np.testing.assert_allclose(factors["['head']['w']"]["A"], want_a, rtol=0, atol=1e-12)


def _gpt_final_hidden(model, params, ids):
    """The twin's input to the head: ``gpt_logits`` with the head ``w = I (d, d)``."""
    eye = jnp.eye(model.d, dtype=params["head"]["w"].dtype)
    return _gpt.gpt_logits(model, {**params, "head": {"w": eye}}, ids)


# ----------------------------------------------------------------------- Monte Carlo


def _rel(got, want):
    a, _ = ravel_pytree(got)
    b, _ = ravel_pytree(want)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_mc_diagonal_converges_as_one_over_root_samples():
    model, params, x, y, _ = _mlp_case("softmax_cross_entropy")
    exact = jaxbp.diag_ggn(model)(params, x, y)
    errs = []
    for s in (16, 1024):
        f = jaxbp.diag_ggn(model, "mc", samples=s)
        errs.append(np.mean([_rel(f(params, x, y, key=jax.random.key(k)), exact)
                             for k in range(4)]))  # fmt: skip
    # √(1024/16) = 8: the error shrinks by about that much (at least 4)
    assert errs[1] < errs[0] / 4, errs


def _clt_check(estimates, exact):
    """Each coordinate's mean of K independent estimates within 5 standard errors."""
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(estimates)
    want = ravel_pytree(exact)[0]
    mean, se = jnp.mean(flat, axis=0), jnp.std(flat, axis=0) / np.sqrt(flat.shape[0])
    return np.asarray(jnp.abs(mean - want) <= 5.0 * se + 1e-15)


def _mc_draws(fn, params, batch, k):
    keys = jax.random.split(jax.random.key(11), k)
    return jax.vmap(lambda key: fn.jitted(params, *batch, key))(keys)


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "sigmoid_binary_cross_entropy"])
def test_mc_diagonal_is_unbiased_within_clt_bounds(loss):
    model, params, x, y, _ = _mlp_case(loss)
    exact = jaxbp.diag_ggn(model)(params, x, y)
    draws = _mc_draws(jaxbp.diag_ggn(model, "mc", samples=4), params, (x, y, None, None), 300)
    assert _clt_check(draws, exact).all()


def test_mc_gpt_diagonal_and_kfac_are_unbiased():
    """A sequence's tokens sampled at once, squared per example: cross terms vanish in
    expectation; the head's G from the sampled logits columns."""
    model, params, ids, targets = _gpt_case()
    batch = (ids, targets, None)
    exact = jaxbp.diag_ggn(model)(params, *batch)
    draws = _mc_draws(jaxbp.diag_ggn(model, "mc", samples=8), params, batch, 64)
    assert _clt_check(draws, exact).mean() > 0.99  # 5σ: a rare coordinate may still miss
    exact_k = jaxbp.kfac_factors(model)(params, *batch)
    draws_k = _mc_draws(jaxbp.kfac_factors(model, "mc", samples=8), params, batch, 64)
    assert _clt_check(draws_k, exact_k).mean() > 0.99
    # and the A factors draw nothing
    for path, f in exact_k.items():
        np.testing.assert_allclose(draws_k[path]["A"][0], f["A"], rtol=0, atol=1e-14)


# ---------------------------------------------------------------- errors, planted bugs


def test_mc_without_key_names_key():
    model, params, x, y, _ = _mlp_case("mse")
    for make in (jaxbp.diag_ggn, jaxbp.kfac_factors):
        with pytest.raises(TypeError, match="key"):
            make(model, "mc")(params, x, y)
        with pytest.raises(TypeError, match="key"):
            make(model)(params, x, y, key=jax.random.key(0))
        with pytest.raises(ValueError, match="method"):
            make(model, "laplace")
        with pytest.raises(ValueError, match="samples"):
            make(model, "mc", samples=0)


def test_an_op_without_the_rules_is_named(monkeypatch):
    model, params, x, y, _ = _mlp_case("mse")
    monkeypatch.setattr(jaxbp.mse, "hessian_factor", None)
    with pytest.raises(TypeError, match="mse: has no hessian_factor"):
        jaxbp.diag_ggn(model)(params, x, y)
    monkeypatch.undo()
    monkeypatch.setattr(jaxbp.mse, "sample_bwd", None)
    with pytest.raises(TypeError, match="mse: has no sample_bwd"):
        jaxbp.kfac_factors(model, "mc")(params, x, y, key=jax.random.key(0))
    monkeypatch.undo()
    for rule in ("ggn_vp", "hessian_factor", "logits_bwd", "sample_bwd"):
        monkeypatch.setattr(jaxbp.mse, rule, None)
    with pytest.raises(TypeError, match="mse: has no curvature rules"):
        jaxbp.diag_ggn(model)(params, x, y)
    monkeypatch.undo()
    monkeypatch.setattr(jaxbp.dense, "example_grads", None)
    with pytest.raises(TypeError, match="dense: has no per-example rule"):
        jaxbp.diag_ggn(model)(params, x, y)


def test_planted_bugs_are_caught(monkeypatch):
    model, params, x, y, unit = _mlp_case("softmax_cross_entropy")
    ggn, unravel = _explicit_ggn(
        lambda p: _nn.forward(model, p, x), unit, params, jnp.ones((N,), bool)
    )  # fmt: skip
    want = ravel_pytree(unravel(jnp.diag(ggn)))[0]
    factor = jaxbp.softmax_cross_entropy.hessian_factor
    monkeypatch.setattr(jaxbp.softmax_cross_entropy, "hessian_factor",
                        lambda *a, **k: 1.01 * factor(*a, **k))  # fmt: skip
    got = ravel_pytree(jaxbp.diag_ggn(model)(params, x, y))[0]
    assert float(jnp.max(jnp.abs(got - want))) > 1e-6
    monkeypatch.undo()
    sample = jaxbp.softmax_cross_entropy.sample_bwd  # a biased draw: the CLT check sees it
    monkeypatch.setattr(
        jaxbp.softmax_cross_entropy,
        "sample_bwd",
        lambda *a, **k: (1.2 * sample(*a, **k)[0], *sample(*a, **k)[1:]),
    )
    draws = _mc_draws(jaxbp.diag_ggn(model, "mc", samples=4), params, (x, y, None, None), 300)
    assert not _clt_check(draws, unravel(jnp.diag(ggn))).all()
