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
from jaxbp._op import OP_ATTRIBUTES, custom_vjp_op, positional_names
from jaxbp.jacobian import rules_of
from tests.helpers import assert_close
from tests.settings import (
    ALL_CASES,
    OP_EXAMPLES,
    cotangent,
    grad_of,
    op_examples,
    public_ops_with_rules,
)

OPS = sorted({c.name for c in ALL_CASES})
# One case per op: the first one in the settings lists.
FIRST = {name: next(c for c in ALL_CASES if c.name == name) for name in OPS}
# Every public op with rules beside it, found in jaxbp.__all__ (a new op is picked up here
# and must get its examples in tests/settings.py OP_EXAMPLES, or these tests fail).
PUBLIC = public_ops_with_rules()


@pytest.mark.parametrize("name", PUBLIC)
def test_every_op_has_jitted_fwd_and_bwd_and_a_reference_with_the_same_signature(name):
    op = getattr(jaxbp, name)
    fwd, bwd = rules_of(op)
    assert fwd is getattr(jaxbp, name + "_fwd") and bwd is getattr(jaxbp, name + "_bwd")
    assert op.fwd is fwd and op.bwd is bwd and op.reference is getattr(jaxbp.reference, name)
    assert all(hasattr(op, a) for a in OP_ATTRIBUTES), [
        a for a in OP_ATTRIBUTES if not hasattr(op, a)
    ]

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
        return tuple(None if d is None else 2 * d for d in jaxbp.softmax_bwd(res, g, **options))

    op = custom_vjp_op(jaxbp.softmax_fwd, doubled_bwd)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)))
    w = jnp.arange(4.0, dtype=jnp.float64)
    right = jax.grad(lambda z: jnp.sum(jaxbp.softmax(z) * w))(z)
    wrong = jax.grad(lambda z: jnp.sum(op((("axis", -1),), z, None) * w))(z)  # z, where
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


# ------------------------------------------- fwd/bwd take and give the op's arguments, in order


def test_every_public_op_has_examples_and_no_example_is_stale():
    missing = [n for n in PUBLIC if n not in OP_EXAMPLES]
    assert not missing, f"public ops without examples in tests/settings.py OP_EXAMPLES: {missing}"
    stale = sorted(set(OP_EXAMPLES) - set(PUBLIC))
    assert not stale, f"OP_EXAMPLES names no public op with rules: {stale}"
    assert {"dense", "softmax_cross_entropy", "linear_softmax_cross_entropy"} <= set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_fwd_takes_the_ops_positional_arguments_in_the_ops_order(name):
    op, (fwd, bwd) = getattr(jaxbp, name), rules_of(getattr(jaxbp, name))
    op_args, fwd_args = positional_names(op), positional_names(fwd)
    assert fwd_args[: len(op_args)] == op_args, (op_args, fwd_args)
    # Anything after them is an optional array option (where, class_weights).
    params = inspect.signature(fwd).parameters
    assert all(params[a].default is None for a in fwd_args[len(op_args) :]), fwd_args
    assert positional_names(bwd) == ("res", "g")


@pytest.mark.parametrize("name", PUBLIC)
def test_op_declares_which_positional_arguments_are_per_example(name):
    op = getattr(jaxbp, name)
    for example in op_examples(name):
        assert tuple(op.per_example_args) == example.per_example, example.id
    assert set(op.per_example_args) <= set(positional_names(op))


def _examples():
    for name in PUBLIC:
        if name not in OP_EXAMPLES:  # the test fails on it (op_examples raises), never a skip
            yield pytest.param(name, None, id=f"{name}-MISSING")
        for ex in OP_EXAMPLES.get(name, []):
            yield pytest.param(name, ex, id=ex.id)


@pytest.mark.parametrize(("name", "example"), list(_examples()))
def test_fwd_with_the_ops_positional_args_and_bwd_give_one_cotangent_per_argument(name, example):
    if example is None:
        op_examples(name)  # raises LookupError naming the op and the table to extend
    op, ref = getattr(jaxbp, name), getattr(jaxbp.reference, name)
    fwd, bwd = rules_of(op)
    args, opts = example.args(), example.options
    out, res = fwd(*args, **opts)
    assert_close(out, op(*args, **opts), jnp.float64)
    g = cotangent(out)
    cts = bwd(res, g, **opts)
    assert len(cts) == len(positional_names(fwd)), (len(cts), positional_names(fwd))
    # The reference's cotangents, in the op's order: with square shapes (x and w both
    # (3, 3)) only the right order matches.
    floats = [k for k, a in enumerate(args) if a is not None and jnp.issubdtype(a.dtype, float)]

    def of_floats(*fl):
        full = list(args)
        for k, a in zip(floats, fl, strict=True):
            full[k] = a
        return ref(*full, **opts)

    _, vjp = jax.vjp(of_floats, *(args[k] for k in floats))
    expected = dict(zip(floats, vjp(g), strict=True))
    for k, ct in enumerate(cts):
        if k in expected:
            assert ct is not None and ct.shape == args[k].shape and ct.dtype == args[k].dtype
            assert_close(ct, expected[k], jnp.float64, name=f"cotangent {k}")
        else:  # integer labels, an absent bias, where, class_weights not given
            assert ct is None, (k, ct)


def test_jacobian_of_linear_softmax_cross_entropy_takes_the_ops_argument_order():
    """jaxbp.jacobian(op, x, w, y) once failed: the rules took (x, w, b, labels)."""
    rng = np.random.default_rng(0)
    x, w = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(3, 5)))
    y = jnp.asarray([0, 4, 2, 1])
    J = jaxbp.jacobian(jaxbp.linear_softmax_cross_entropy, x, w, y)
    assert J.shape == (4, 3)
    # ∂loss[n]/∂x[n] = w·(p[n] − onehot(y[n]))
    dz = jax.nn.softmax(x @ w) - jax.nn.one_hot(y, 5, dtype=x.dtype)
    assert_close(J, dz @ w.T, jnp.float64)
    Jw = jaxbp.jacobian(jaxbp.linear_softmax_cross_entropy, x, w, y, argnum=1)
    assert Jw.shape == (4, 3, 5)
    assert_close(Jw, jnp.einsum("nd,nv->ndv", x, dz), jnp.float64)
