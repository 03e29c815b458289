"""A model of the user's own (the interface of jaxbp/model.py) gets every transform, and the
tape it calls the rules through gives clear errors.

The model is the one docs/models.md shows (its first block, run here), so the documented
example is the tested one. Its oracles: ``jax.grad`` of a plain-jnp twin written below from
``jax.numpy`` and optax alone (no jaxbp op, no tape), and ``vmap(grad)`` of the same twin
per example.
"""

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp.per_example import Full
from tests.helpers import assert_close

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs/models.md"
_NS: dict = {"__name__": "models_doc"}
with jax.numpy_dtype_promotion("standard"):
    exec(re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.S | re.M)[0], _NS)
ResidualMLP = _NS["ResidualMLP"]

F64 = jnp.float64
MODEL = ResidualMLP(i=5, d=4, f=6, c=3, blocks=2)


def _problem(n=6, seed=0, dtype=F64):
    params = MODEL.init(jax.random.PRNGKey(seed), dtype)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(7), a.shape,
                                                               a.dtype), params)  # fmt: skip
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (n, 5), dtype)
    y = jax.random.randint(jax.random.PRNGKey(seed + 2), (n,), 0, 3)
    return params, x, y


def twin_losses(params, x, y):
    """The same network in plain jnp: per-example losses ``(n,)``."""

    def rms(h, g):
        return h / jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6) * g

    h = x @ params["in"]["w"] + params["in"]["b"]
    for blk in params["blocks"]:
        u = rms(h, blk["norm"]["gamma"]) @ blk["up"]["w"] + blk["up"]["b"]
        h = h + jax.nn.relu(u) @ blk["down"]["w"] + blk["down"]["b"]
    logits = h @ params["out"]["w"] + params["out"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def test_value_and_grad_of_a_users_model_equals_jax_grad_of_an_independent_twin():
    params, x, y = _problem()
    loss, grads = jaxbp.value_and_grad(MODEL)(params, x, y)
    want_loss, want = jax.value_and_grad(lambda p: jnp.mean(twin_losses(p, x, y)))(params)
    assert_close((loss, grads), (want_loss, want), F64)
    # the generic reference (the model's forward loop on the ops' plain twins) agrees too
    assert_close(jaxbp.reference.value_and_grad(MODEL)(params, x, y), (want_loss, want), F64)


def test_per_example_transforms_of_a_users_model_equal_vmap_grad_of_the_twin():
    params, x, y = _problem()

    def one(p, xk, yk):
        return twin_losses(p, xk[None], yk[None])[0]

    want = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)
    assert_close(jaxbp.per_example_grads(MODEL)(params, x, y), want, F64)
    assert_close(jaxbp.reference.per_example_grads(MODEL)(params, x, y), want, F64)  # jacrev
    norms = np.sqrt(sum(np.sum(np.asarray(g).reshape(6, -1) ** 2, 1)
                        for g in jax.tree.leaves(want)))  # fmt: skip
    assert_close(jaxbp.per_example_grad_norms(MODEL)(params, x, y), norms, F64)
    for method in ("bookkeeping", "two_pass"):
        got = jaxbp.clipped_grad(MODEL, l2_clip=0.3, method=method)(params, x, y)
        factors = np.minimum(1.0, 0.3 / norms)
        clipped = jax.tree.map(lambda g, f=factors: np.tensordot(f, np.asarray(g), 1) / 6, want)
        assert_close(got, (clipped, norms), F64)


def test_compare_passes_on_a_users_model_and_fails_on_a_wrong_backward_loop():
    params, x, y = _problem()
    assert jaxbp.compare(MODEL, params, x, y, dtype=F64).passed

    @dataclasses.dataclass(frozen=True)
    class Swapped(ResidualMLP):
        def backward(self, t, state, seed):
            super().backward(t, state, -seed)  # a sign error at the seed

    report = jaxbp.compare(Swapped(**dataclasses.asdict(MODEL)), params, x, y, fd=False)
    assert not report.passed and len(report.failures) == len(jax.tree.leaves(params))


def _scale_op(with_rule: bool):
    def fwd(x, s):
        return x * s, (x, s)

    def bwd(res, g):
        x, s = res
        return g * s, jnp.sum((g * x).reshape(-1, x.shape[-1]), axis=0)

    def rule(res, g, *, examples):
        x, _ = res
        return {"s": Full(jnp.sum((g * x).reshape(examples, -1, x.shape[-1]), axis=1))}

    return jaxbp.Op(fwd, bwd, lambda x, s: x * s, name="scale",
                    example_grads=rule if with_rule else None)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Scaled:
    """``softmax_cross_entropy(dense(scale(x, s)))``: a user op with a parameter."""

    op: object

    def forward(self, t, params, x, y):
        h, r1 = t.fwd(self.op, x, params["s"])
        z, r2 = t.fwd(jaxbp.dense, h, params["w"])
        loss, r3 = t.fwd(jaxbp.softmax_cross_entropy, z, y)
        return loss, jnp.ones(loss.shape, bool), (r1, r2, r3)

    def backward(self, t, state, seed):
        r1, r2, r3 = state
        dz, _ = t.bwd(jaxbp.softmax_cross_entropy, r3, seed)
        (dh,) = t.bwd(jaxbp.dense, r2, dz, params={"w": ("w",)})
        t.bwd(self.op, r1, dh, params={"s": ("s",)})


def test_a_user_op_with_a_per_example_rule_runs_in_every_transform():
    model = Scaled(_scale_op(True))
    rng = np.random.default_rng(0)
    params = {"s": jnp.asarray(rng.uniform(0.5, 1.5, 4)), "w": jnp.asarray(rng.normal(size=(4, 3)))}
    x, y = jnp.asarray(rng.normal(size=(5, 4))), jnp.asarray([0, 1, 2, 1, 0])

    def one(p, xk, yk):
        return optax.softmax_cross_entropy_with_integer_labels((xk * p["s"]) @ p["w"], yk)

    want = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)
    assert_close(jaxbp.per_example_grads(model)(params, x, y), want, F64)
    assert jaxbp.compare(model, params, x, y).passed


def test_a_per_example_transform_names_the_op_that_has_no_per_example_rule():
    model = Scaled(_scale_op(False))
    params = {"s": jnp.ones(4), "w": jnp.ones((4, 3))}
    x, y = jnp.ones((5, 4)), jnp.zeros((5,), jnp.int32)
    jaxbp.value_and_grad(model)(params, x, y)  # the plain gradient needs no such rule
    for transform in (jaxbp.per_example_grad_norms, jaxbp.per_example_grads,
                      lambda m: jaxbp.clipped_grad(m, l2_clip=1.0)):  # fmt: skip
        with pytest.raises(TypeError, match="scale: has no per-example rule"):
            transform(model)(params, x, y)


# ----------------------------------------------------------------------------- the tape


@dataclasses.dataclass(frozen=True)
class OneLayer:
    """``mse(dense(x))`` whose backward sends ``dense``'s parameters where ``spec`` says (a
    dict given as its items, to stay hashable)."""

    spec: object = ("layer",)

    def __post_init__(self):
        if isinstance(self.spec, dict):
            object.__setattr__(self, "spec", ("dict", tuple(self.spec.items())))

    def forward(self, t, params, x, y):
        p = params["layer"]
        z, r1 = t.fwd(jaxbp.dense, x, p["w"], p["b"])
        loss, r2 = t.fwd(jaxbp.mse, z, y)
        return loss, jnp.ones(loss.shape, bool), (r1, r2)

    def backward(self, t, state, seed):
        r1, r2 = state
        dz, _ = t.bwd(jaxbp.mse, r2, seed)
        spec = dict(self.spec[1]) if self.spec[0] == "dict" else self.spec
        kw = {} if spec == "none" else {"params": spec}
        t.bwd(jaxbp.dense, r1, dz, **kw)


_P = {"layer": {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}}
_X, _Y = jnp.ones((4, 3)), jnp.zeros((4, 2))


@pytest.mark.parametrize(("spec", "error", "match"), [
    ("none", TypeError, r"dense: the cotangents of its parameters \('w', 'b'\) need a place"),
    ({"w": ("layer", "w")}, TypeError, r"dense: params gives no place for \['b'\]"),
    ({"w": ("layer", "w"), "b": ("layer", "b"), "x": ("x",)}, TypeError,
     r"dense: params names \['x'\], which are not parameters"),
    (("other",), ValueError,
     r"params\['other'\]\['w'\], params\['other'\]\['b'\], which is not a leaf"),
    ({"w": ("layer", "w"), "b": ("layer", "w")}, ValueError,
     r"params\['layer'\]\['w'\]: dense's b sends a gradient of shape \(2,\) where one of "
     r"shape \(3, 2\) went before"),
    ({"w": ("layer", "b"), "b": None}, ValueError,
     r"params\['layer'\]\['b'\]: the gradient sent there has shape \(3, 2\), expected \(2,\)"),
])  # fmt: skip
def test_the_tape_names_what_is_wrong_with_where_a_parameter_goes(spec, error, match):
    with pytest.raises(error, match=match):
        jaxbp.value_and_grad(OneLayer(spec))(_P, _X, _Y)


def test_a_frozen_weight_mapped_to_none_gets_no_gradient_and_the_rest_is_exact():
    _, grads = jaxbp.value_and_grad(OneLayer({"w": None, "b": ("layer", "b")}))(_P, _X, _Y)
    _, full = jaxbp.value_and_grad(OneLayer())(_P, _X, _Y)
    assert float(jnp.max(jnp.abs(grads["layer"]["w"]))) == 0.0
    assert_close(grads["layer"]["b"], full["layer"]["b"], F64)


def test_models_without_the_interface_or_unhashable_are_refused_by_name():
    with pytest.raises(TypeError, match=r"model: value_and_grad needs a model .* has no backward"):
        jaxbp.value_and_grad(type("Half", (), {"forward": lambda self, *a: None})())

    class Unhashable:
        __hash__ = None

        def forward(self, *a):
            pass

        def backward(self, *a):
            pass

    with pytest.raises(TypeError, match="model: expected a hashable model"):
        jaxbp.value_and_grad(Unhashable())


def test_the_tape_runs_backward_rules_only_in_rules_mode_and_knows_its_modes():
    with pytest.raises(ValueError, match="mode: expected one of"):
        jaxbp.Tape("twin")
    t = jaxbp.Tape("reference")
    out, res = t.fwd(jaxbp.dense, _X, _P["layer"]["w"])
    assert res is None and out.shape == (4, 2)
    with pytest.raises(RuntimeError, match="dense: t.bwd runs only on a Tape"):
        t.bwd(jaxbp.dense, res, out, params=("layer",))
