"""Curvature transforms of any model (jaxbp/curvature.py): Hessian- and GGN-vector products.

Oracles, independent of the rules: the GGN product is ``Jᵀ·(∇²_z L)·(J·v)`` with ``J`` the
Jacobian of the plain twin's logits (``jax.jvp`` / ``jax.vjp`` of ``jaxbp.reference``'s
forward, or the GPT's twin) and ``∇²_z L`` the Hessian of the twin's mean loss in the logits
(``jax.jvp`` of ``jax.grad`` of the plain loss); the Hessian product is ``jax.jvp`` of
``jax.grad`` of the twin's mean loss. float64, ≤ 1e-12 relative to the oracle's max-abs per
leaf.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp.reference import _gpt as gpt_twin
from jaxbp.reference import _nn as mlp_twin
from tests.helpers import assert_close
from tests.test_model import MODEL as RESIDUAL
from tests.test_model import Scaled, _scale_op, twin_losses
from tests.test_model import _problem as residual_problem

F64 = jnp.float64


def _direction(params, seed=3):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=True)]
    )


def _ggn_oracle(logits_of, loss_of_logits, params, v):
    """``Jᵀ·(∇²_z L)·(J·v)``: J from the twin's logits, ∇²_z L from the plain loss."""
    z, jv = jax.jvp(logits_of, (params,), (v,))
    hjv = jax.jvp(jax.grad(loss_of_logits), (z,), (jv,))[1]
    return jax.vjp(logits_of, params)[1](hjv)[0]


def _hvp_oracle(loss_of_params, params, v):
    return jax.jvp(jax.grad(loss_of_params), (params,), (v,))[1]


# --------------------------------------------------------------------------------- the MLP

MLP_CASES = {
    "ce": (dict(activation="gelu"), {}),
    "ce-options": (dict(activation="tanh", loss_options={"label_smoothing": 0.1, "z_loss": 1e-2,
                                                         "ignore_index": 1}), {"cw": True}),
    "ce-probs": (dict(activation="softplus"), {"probs": True}),
    "mse": (dict(activation="sigmoid", loss="mse"), {"float_labels": True}),
    "bce": (dict(activation="silu", loss="sigmoid_binary_cross_entropy"), {"probs": True}),
}  # fmt: skip


def _mlp(name, n=6):
    kw, extra = MLP_CASES[name]
    model = jaxbp.MLP((5, 7, 3), **kw)
    params = model.init(jax.random.PRNGKey(0), F64)
    params = jax.tree.map(lambda a: a + 0.1, params)  # off the symmetric initial point
    x = jax.random.normal(jax.random.PRNGKey(1), (n, 5), F64)
    if extra.get("probs") or extra.get("float_labels"):
        y = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (n, 3), F64))
    else:
        y = jnp.arange(n) % 3
    where = jnp.arange(n) < n - 1  # the last row counts for nothing
    cw = jnp.array([0.5, 1.0, 2.0], F64) if extra.get("cw") else None
    return model, params, x, y, where, cw


def _mlp_loss_of_logits(model, y, where, cw):
    opts = dict(model.loss_options)

    def per_unit(z):
        if model.loss == "softmax_cross_entropy":
            return jaxbp.reference.softmax_cross_entropy(z, y, class_weights=cw, **opts)
        if model.loss == "mse":
            return jnp.mean((z - y) ** 2, axis=-1)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(z, y), axis=-1)

    keep = mlp_twin.valid(model, y, where, y.shape[0])

    def loss(z):
        return jnp.sum(jnp.where(keep, per_unit(z), 0.0)) / jnp.maximum(jnp.sum(keep), 1).astype(
            F64
        )

    return loss


@pytest.mark.parametrize("name", list(MLP_CASES))
def test_mlp_ggn_and_hessian_products_equal_the_twins(name):
    model, params, x, y, where, cw = _mlp(name)
    v = _direction(params)
    gv = jaxbp.ggn_vector_product(model)(params, x, y, v, where=where, class_weights=cw)
    want = _ggn_oracle(lambda p: mlp_twin.forward(model, p, x),
                       _mlp_loss_of_logits(model, y, where, cw), params, v)  # fmt: skip
    assert_close(gv, want, F64, name="G·v")
    hv = jaxbp.hessian_vector_product(model)(params, x, y, v, where=where, class_weights=cw)
    want = _hvp_oracle(lambda p: mlp_twin.mean_loss(model, p, x, y, where, cw), params, v)
    assert_close(hv, want, F64, name="H·v")


@settings(max_examples=5)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    n=st.integers(1, 5),
    activation=st.sampled_from(["relu", "tanh", "gelu", "leaky_relu"]),
    seed=st.integers(0, 2**16),
)
def test_property_the_mlp_ggn_product_equals_the_twins_over_shapes(sizes, n, activation, seed):
    model = jaxbp.MLP(tuple(sizes), activation=activation)
    params = model.init(jax.random.PRNGKey(seed), F64)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (n, sizes[0]), F64)
    y = jax.random.randint(jax.random.PRNGKey(seed + 2), (n,), 0, sizes[-1])
    v = _direction(params, seed + 3)
    gv = jaxbp.ggn_vector_product(model)(params, x, y, v)
    want = _ggn_oracle(lambda p: mlp_twin.forward(model, p, x),
                       _mlp_loss_of_logits(model, y, None, None), params, v)  # fmt: skip
    assert_close(gv, want, F64, name="G·v")


def test_the_ggn_is_symmetric_and_positive_semidefinite_and_the_hessian_symmetric():
    model, params, x, y, where, _ = _mlp("ce")
    u, v = _direction(params, 4), _direction(params, 5)

    def dot(a, b):
        return sum(jnp.vdot(p, q) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                  strict=True))  # fmt: skip

    ggn, hvp = jaxbp.ggn_vector_product(model), jaxbp.hessian_vector_product(model)
    for f in (ggn, hvp):
        fu, fv = f(params, x, y, u, where=where), f(params, x, y, v, where=where)
        np.testing.assert_allclose(float(dot(u, fv)), float(dot(v, fu)), rtol=1e-12)
    for seed in range(5):
        w = _direction(params, 10 + seed)
        assert float(dot(w, ggn(params, x, y, w, where=where))) >= 0.0


def test_products_compose_with_vmap_over_directions_and_an_outer_jit():
    model, params, x, y, where, _ = _mlp("ce")
    vs = jax.tree.map(lambda *a: jnp.stack(a), *[_direction(params, s) for s in range(3)])
    for f in (jaxbp.ggn_vector_product(model), jaxbp.hessian_vector_product(model)):
        batched = jax.jit(jax.vmap(f.jitted, in_axes=(None, 0, None, None, None, None)))
        out = batched(params, vs, x, y, where, None)
        for s in range(3):
            one = f(params, x, y, jax.tree.map(lambda a, s=s: a[s], vs), where=where)
            assert_close(jax.tree.map(lambda a, s=s: a[s], out), one, F64)


# --------------------------------------------------------------------------------- the GPT

GPT_CASES = [{}, {"tied": True, "attention": "recompute", "head_strategy": "recompute"}]


@pytest.mark.parametrize("options", GPT_CASES, ids=["default", "tied-recompute"])
def test_gpt_ggn_and_hessian_products_equal_the_twins(options):
    model = jaxbp.GPT(vocab=11, d=8, heads=2, layers=1, context=6, **options)
    params = model.init(jax.random.PRNGKey(0), F64)
    ids = jax.random.randint(jax.random.PRNGKey(1), (3, 6), 0, 11)
    targets = jax.random.randint(jax.random.PRNGKey(2), (3, 6), 0, 11)
    where = jnp.arange(6)[None, :] < jnp.array([[6], [3], [1]])  # uneven valid counts
    v = _direction(params)
    gv = jaxbp.ggn_vector_product(model)(params, ids, targets, v, where=where)

    def loss_of_logits(z):
        per = optax.softmax_cross_entropy_with_integer_labels(z, targets)
        return jnp.sum(jnp.where(where, per, 0.0)) / jnp.sum(where).astype(F64)

    want = _ggn_oracle(lambda p: gpt_twin.gpt_logits(model, p, ids), loss_of_logits, params, v)
    assert_close(gv, want, F64, name="G·v")
    hv = jaxbp.hessian_vector_product(model)(params, ids, targets, v, where=where)
    want = _hvp_oracle(lambda p: gpt_twin.gpt_mean_loss(model, p, ids, targets, where), params,
                       v)  # fmt: skip
    assert_close(hv, want, F64, name="H·v")


# ------------------------------------------------------------------------- a user's model


def _residual_logits(p, x):
    """tests/test_model.py's plain twin of docs/models.md's ResidualMLP, up to its logits."""

    def rms(h, g):
        return h / jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6) * g

    h = x @ p["in"]["w"] + p["in"]["b"]
    for blk in p["blocks"]:
        u = rms(h, blk["norm"]["gamma"]) @ blk["up"]["w"] + blk["up"]["b"]
        h = h + jax.nn.relu(u) @ blk["down"]["w"] + blk["down"]["b"]
    return h @ p["out"]["w"] + p["out"]["b"]


def test_a_users_model_gets_both_products():
    params, x, y = residual_problem()
    # the twin up to the logits is the twin whose losses test_model.py checks
    assert_close(optax.softmax_cross_entropy_with_integer_labels(_residual_logits(params, x), y),
                 twin_losses(params, x, y), F64)  # fmt: skip
    v = _direction(params)
    gv = jaxbp.ggn_vector_product(RESIDUAL)(params, x, y, v)

    def loss_of_logits(z):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))

    want = _ggn_oracle(lambda p: _residual_logits(p, x), loss_of_logits, params, v)
    assert_close(gv, want, F64, name="G·v")
    hv = jaxbp.hessian_vector_product(RESIDUAL)(params, x, y, v)
    want = _hvp_oracle(lambda p: jnp.mean(twin_losses(p, x, y)), params, v)
    assert_close(hv, want, F64, name="H·v")


# --------------------------------------------------------------------- planted bugs, errors


def test_a_bug_in_a_jvp_rule_is_seen_by_the_ggn_product_and_not_by_the_hessian_product(
    monkeypatch,
):
    model, params, x, y, where, _ = _mlp("ce")
    v = _direction(params)
    good_g = jaxbp.ggn_vector_product(model)(params, x, y, v, where=where)
    good_h = jaxbp.hessian_vector_product(model)(params, x, y, v, where=where)
    right = jaxbp.gelu.jvp

    def wrong(res, tangents, **options):
        return 1.5 * right(res, tangents, **options)

    monkeypatch.setattr(jaxbp.gelu, "jvp", wrong)
    bad_g = jaxbp.ggn_vector_product(model)(params, x, y, v, where=where)
    bad_h = jaxbp.hessian_vector_product(model)(params, x, y, v, where=where)
    with pytest.raises(AssertionError):
        assert_close(bad_g, good_g, F64)
    assert_close(bad_h, good_h, F64)  # the HVP differentiates the bwd rules, not op.jvp


def test_a_bug_in_a_bwd_rule_is_seen_by_both_products(monkeypatch):
    model, params, x, y, where, _ = _mlp("ce")
    v = _direction(params)
    products = (jaxbp.ggn_vector_product(model), jaxbp.hessian_vector_product(model))
    good = [f(params, x, y, v, where=where) for f in products]
    right = jaxbp.gelu.bwd

    def wrong(res, g, **options):
        return tuple(0.5 * c for c in right(res, g, **options))

    monkeypatch.setattr(jaxbp.gelu, "bwd", wrong)
    for f, want in zip((jaxbp.ggn_vector_product(model), jaxbp.hessian_vector_product(model)),
                       good, strict=True):  # fmt: skip
        with pytest.raises(AssertionError):
            assert_close(f(params, x, y, v, where=where), want, F64)


def test_a_direction_of_another_structure_shape_or_dtype_is_an_error_naming_the_leaf():
    model, params, x, y, _, _ = _mlp("ce")
    v = _direction(params)
    for f in (jaxbp.ggn_vector_product(model), jaxbp.hessian_vector_product(model)):
        bad = [dict(v[0]), {"w": v[1]["w"][:, :2], "b": v[1]["b"]}]
        with pytest.raises(ValueError, match=r"v\[1\]\['w'\]: expected the shape .*\(7, 3\)"):
            f(params, x, y, bad)
        bad = [dict(v[0]), {"w": v[1]["w"].astype(jnp.float32), "b": v[1]["b"]}]
        with pytest.raises(TypeError, match=r"v\[1\]\['w'\]: expected the dtype .*float64"):
            f(params, x, y, bad)
        with pytest.raises(TypeError, match="v: expected a pytree of the structure of params"):
            f(params, x, y, v[:1])
        with pytest.raises(TypeError, match="v: expected the direction"):
            f(params)


def test_an_op_without_a_jvp_rule_is_named_and_the_hessian_product_still_runs():
    model = Scaled(_scale_op(True))  # a user op with no jvp rule (tests/test_model.py)
    rng = np.random.default_rng(0)
    params = {"s": jnp.asarray(rng.normal(size=4)), "w": jnp.asarray(rng.normal(size=(4, 3)))}
    x, y = jnp.asarray(rng.normal(size=(5, 4))), jnp.arange(5) % 3
    v = _direction(params)
    with pytest.raises(TypeError, match="scale: has no forward-mode rule"):
        jaxbp.ggn_vector_product(model)(params, x, y, v)

    def twin(p):
        z = (x * p["s"]) @ p["w"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))

    hv = jaxbp.hessian_vector_product(model)(params, x, y, v)
    assert_close(hv, _hvp_oracle(twin, params, v), F64)


def test_a_model_whose_loss_has_no_curvature_rules_is_refused_by_name():
    def fwd(z):
        return jnp.sum(z * z, axis=-1), (z,)

    def bwd(res, g):
        return (2.0 * g[:, None] * res[0],)

    def jvp(res, tangents):
        return jnp.sum(2.0 * res[0] * tangents[0], axis=-1)

    square = jaxbp.Op(fwd, bwd, lambda z: jnp.sum(z * z, axis=-1), name="square", jvp=jvp)

    @dataclasses.dataclass(frozen=True)
    class Squares:
        def forward(self, t, params, x):
            z, r1 = t.fwd(jaxbp.dense, x, params["w"])
            loss, r2 = t.fwd(square, z)
            return loss, jnp.ones(loss.shape, bool), (r1, r2)

        def backward(self, t, state, seed):
            (dz,) = t.bwd(square, state[1], seed)
            t.bwd(jaxbp.dense, state[0], dz, params={"w": ("w",)})

    params = {"w": jnp.ones((3, 2), F64)}
    with pytest.raises(TypeError, match="found no loss op with curvature rules"):
        jaxbp.ggn_vector_product(Squares())(params, jnp.ones((4, 3), F64), params)
