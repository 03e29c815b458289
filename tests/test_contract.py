"""The one contract: every op is a jitted custom_vjp triple with a same-signature reference.

Checks that ``jax.grad`` of the public op runs the hand-written rule, that the ops compose
under ``jit``, ``vmap`` and ``grad``, and that repeated calls with the same shapes trace once.
"""

import inspect
import io
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp._op import custom_vjp_op
from jaxbp.jacobian import rules_of
from tests.helpers import assert_close
from tests.settings import ALL_CASES, cotangent, grad_of

OPS = sorted({c.name for c in ALL_CASES})
# One case per op: the first one in the settings lists.
FIRST = {name: next(c for c in ALL_CASES if c.name == name) for name in OPS}


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_jitted_fwd_and_bwd_and_a_reference_with_the_same_signature(name):
    op = getattr(jaxbp, name)
    fwd, bwd = rules_of(op)
    assert fwd is getattr(jaxbp, name + "_fwd") and bwd is getattr(jaxbp, name + "_bwd")

    def params(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    assert params(op) == params(getattr(jaxbp.reference, name))
    assert op.__doc__ and getattr(jaxbp.reference, name).__doc__


@pytest.mark.parametrize("name", OPS)
def test_grad_of_public_op_runs_the_hand_written_bwd(name):
    case = FIRST[name]
    arrays = case.arrays(jnp.float64)
    out = case.op(**arrays, **case.options)

    def scalar(d):
        return jnp.sum(case.op(**{**arrays, **d}, **case.options))

    jaxpr = str(jax.make_jaxpr(jax.grad(scalar))({k: arrays[k] for k in case.diff}))
    assert f"name={name}_bwd" in jaxpr, jaxpr
    assert out.shape  # the op returned an array


def test_a_deliberately_wrong_bwd_changes_the_gradient():
    """custom_vjp_op wires the given bwd into jax.grad: a doubled rule doubles the gradient."""

    def doubled_bwd(res, g, **options):
        return tuple(2 * d for d in jaxbp.softmax_bwd(res, g, **options))

    op = custom_vjp_op(jaxbp.softmax_fwd, doubled_bwd)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)))
    w = jnp.arange(4.0, dtype=jnp.float64)
    right = jax.grad(lambda z: jnp.sum(jaxbp.softmax(z) * w))(z)
    wrong = jax.grad(lambda z: jnp.sum(op((("axis", -1),), z) * w))(z)
    assert_close(wrong, 2 * right, jnp.float64)
    assert not np.allclose(wrong, right)


@pytest.mark.parametrize("name", OPS)
def test_op_under_jit_equals_eager(name):
    case = FIRST[name]
    arrays = case.arrays(jnp.float64)
    eager = case.op(**arrays, **case.options)
    jitted = jax.jit(lambda a: case.op(**a, **case.options))(arrays)
    assert_close(jitted, eager, jnp.float64)


@pytest.mark.parametrize("name", OPS)
def test_op_and_its_gradient_under_vmap_equal_the_batched_call(name):
    case = FIRST[name]
    a1 = case.arrays(jnp.float64)
    a2 = {k: v * 0.5 if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in a1.items()}
    stacked = {k: jnp.stack([a1[k], a2[k]]) for k in a1}
    outs = jax.vmap(lambda a: case.op(**a, **case.options))(stacked)
    assert_close(outs[1], case.op(**a2, **case.options), jnp.float64)
    cot = cotangent(outs[0])  # not ones: Σ softmax is constant, its gradient 0
    grads = jax.vmap(lambda a: grad_of(case.op, case, a, cot))(stacked)
    expected = grad_of(case.ref, case, a2, cot)
    assert_close(jax.tree.map(lambda g: g[1], grads), expected, jnp.float64)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
def test_grad_of_a_composition_matches_reference(dtype):
    """grad of Σ softmax_cross_entropy(dense(relu(dense(x)))) under jit, vs the reference."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 5)), dtype)
    params = {
        "w1": jnp.asarray(rng.normal(size=(5, 7)) * 0.5, dtype),
        "b1": jnp.asarray(rng.normal(size=(7,)) * 0.1, dtype),
        "w2": jnp.asarray(rng.normal(size=(7, 3)) * 0.5, dtype),
    }
    y = jnp.asarray(rng.integers(0, 3, 8))

    def loss(ops, p, x, y):
        h = ops.relu(ops.dense(x, p["w1"], p["b1"]))
        return jnp.sum(ops.softmax_cross_entropy(ops.dense(h, p["w2"]), y, label_smoothing=0.1))

    mod = jaxbp
    got = jax.jit(jax.grad(lambda p, x: loss(mod, p, x, y), argnums=(0, 1)))(params, x)
    expected = jax.grad(lambda p, x: loss(jaxbp.reference, p, x, y), argnums=(0, 1))(params, x)
    assert_close(got, expected, dtype)
    # Per-example gradients: vmap over examples of grad of the composition.
    per_ex = jax.vmap(jax.grad(lambda p, x, y: loss(mod, p, x[None], y[None])), (None, 0, 0))(
        params, x, y
    )
    assert_close(jax.tree.map(lambda g: g.sum(0), per_ex), expected[0], dtype)


def _compiles(fn, names):
    """Run ``fn`` and count the XLA compilations of each jitted function in ``names``."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            fn()
    finally:
        logger.removeHandler(handler)
    text = buf.getvalue()
    return {n: text.count(f"Compiling jit({n})") for n in names}


@pytest.mark.parametrize("name", OPS)
def test_fwd_and_bwd_called_repeatedly_with_same_shapes_compile_at_most_once(name):
    case = FIRST[name]
    base = case.arrays(jnp.float64)
    fwd, bwd = case.fwd, case.bwd

    def run():
        for k in range(3):
            arrays = {
                n: v * (k + 1.0) if jnp.issubdtype(v.dtype, jnp.floating) else v
                for n, v in base.items()
            }
            out, res = fwd(**arrays, **case.options)
            bwd(res, out, **case.options)

    counts = _compiles(run, [name + "_fwd", name + "_bwd"])
    assert all(c <= 1 for c in counts.values()), counts


def test_jitted_training_step_traces_once_for_same_shapes():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(w, x, y):
        def loss(w):
            return jnp.mean(jaxbp.softmax_cross_entropy(jaxbp.dense(x, w), y, z_loss=1e-4))

        return jax.value_and_grad(loss)(w)

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(4, 3)))
    for _ in range(3):
        x = jnp.asarray(rng.normal(size=(6, 4)))
        y = jnp.asarray(rng.integers(0, 3, 6))
        _, g = step(w, x, y)
        w = w - 0.1 * g
    chex.clear_trace_counter()


def test_forward_mode_is_not_supported_and_reference_is_the_way():
    z = jnp.ones((2, 3))
    with pytest.raises(TypeError):
        jax.jvp(jaxbp.softmax, (z,), (z,))
    _, tangent = jax.jvp(jaxbp.reference.softmax, (z,), (z,))
    assert tangent.shape == (2, 3)
