"""``jaxbp.checked`` composed with ``jax.jit`` (and ``grad``) in every order, warm or cold.

The label-range check of every op that takes integer ids is a ``checkify.debug_check``
traced into the program under ``checked`` only: a plain trace has no check (the bad rows
are NaN) and no effect, so ``jax.jit`` keeps its C++ fast dispatch. Checked mode is part of
jit's trace key, so jit's cache can never hand the checked caller an unchecked program or
the plain caller a checked one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp import parallel

Z = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))
GOOD = jnp.asarray([0, 1, 2, 2])
BAD = jnp.asarray([0, 1, 5, 2])  # 5 is outside [0, 3), at index 2
X = jnp.asarray(np.random.default_rng(1).normal(size=(4, 2)))
W = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3)))
MODEL = jaxbp.MLP((2, 3))
PARAMS = [{"w": W, "b": jnp.zeros((3,))}]
MESH = parallel.make_mesh((1,), ("model",), devices=jax.devices()[:1])


def _ce(z, y):
    return jnp.mean(jaxbp.softmax_cross_entropy(z, y))


def _ref_ce(z, y):
    return jnp.mean(jaxbp.reference.softmax_cross_entropy(z, y))


def _fused(z, y):  # z stands in for x (n, d) here: the loss of x·W
    return jnp.mean(jaxbp.linear_softmax_cross_entropy(z[:, :2], W, y))


def _mlp(z, y):
    return jaxbp.value_and_grad(MODEL)(PARAMS, z[:, :2], y)[0]


def _per_example(z, y):
    return jnp.sum(jaxbp.per_example_grad_norms(MODEL)(PARAMS, z[:, :2], y))


def _vocab_parallel(z, y):
    return jnp.mean(parallel.vocab_parallel_softmax_cross_entropy(z, y, MESH))


def _vocab_parallel_fused(z, y):
    return jnp.mean(parallel.vocab_parallel_linear_softmax_cross_entropy(z[:, :2], W, y, MESH))


# Every function of jaxbp that takes integer class ids (a scalar of z for each).
ID_OPS = {
    "softmax_cross_entropy": _ce,
    "reference.softmax_cross_entropy": _ref_ce,
    "linear_softmax_cross_entropy": _fused,
    "value_and_grad(MLP)": _mlp,
    "per_example_grad_norms(MLP)": _per_example,
    "vocab_parallel_softmax_cross_entropy": _vocab_parallel,
    "vocab_parallel_linear_softmax_cross_entropy": _vocab_parallel_fused,
}


def _needs_the_switch():
    # A JAX without the trace-context switch (a private API) gets the checks always: correct,
    # only slower to dispatch; the "no effect" promise is then not made.
    from jaxbp import _checks

    if _checks._CHECKED_MODE is None:
        pytest.skip("this JAX has no trace-context switch: the checks are always traced")


def _assert_reports_bad_label(err):
    message = err.get()
    assert message is not None, "checked mode reported nothing for an out-of-range label"
    assert "labels" in message and "got 5" in message and "[0, 3)" in message, message
    with pytest.raises(Exception, match="labels"):
        err.throw()


# ------------------------------------------------------------ every order, on the plain loss


def test_jit_of_checked_reports_out_of_range_label_and_passes_good_ones():
    f = jax.jit(jaxbp.checked(_ce))
    err, loss = f(Z, BAD)
    _assert_reports_bad_label(err)
    assert bool(jnp.isnan(loss))
    err, loss = f(Z, GOOD)
    assert err.get() is None and bool(jnp.isfinite(loss))


def test_checked_of_jit_reports_out_of_range_label_on_a_cold_cache():
    g = jax.jit(lambda z, y: _ce(z, y))
    err, loss = jaxbp.checked(g)(Z, BAD)
    _assert_reports_bad_label(err)
    assert bool(jnp.isnan(loss))


def test_checked_of_jit_reports_out_of_range_label_after_the_jitted_function_ran():
    g = jax.jit(lambda z, y: _ce(z, y))
    assert bool(jnp.isfinite(g(Z, GOOD)))  # warm: g's program for these shapes is cached
    err, loss = jaxbp.checked(g)(Z, BAD)
    _assert_reports_bad_label(err)
    err, _ = jaxbp.checked(g)(Z, GOOD)
    assert err.get() is None


def test_plain_jit_after_checked_ran_gives_values_and_nan_rows_without_error():
    g = jax.jit(lambda z, y: jaxbp.softmax_cross_entropy(z, y))
    err, _ = jaxbp.checked(g)(Z, BAD)
    _assert_reports_bad_label(err)
    good = g(Z, GOOD)  # must neither raise nor reuse anything of the checked trace
    np.testing.assert_allclose(good, jaxbp.softmax_cross_entropy(Z, GOOD), rtol=1e-12)
    bad = g(Z, BAD)
    assert bool(jnp.isnan(bad[2])) and bool(jnp.all(jnp.isfinite(bad[jnp.asarray([0, 1, 3])])))


def test_jit_of_checked_of_grad_reports_out_of_range_label():
    err, dz = jax.jit(jaxbp.checked(jax.grad(_ce)))(Z, BAD)
    _assert_reports_bad_label(err)
    assert bool(jnp.all(jnp.isnan(dz[2])))
    err, dz = jax.jit(jaxbp.checked(jax.grad(_ce)))(Z, GOOD)
    assert err.get() is None
    np.testing.assert_allclose(dz, jax.grad(_ref_ce)(Z, GOOD), rtol=1e-12)


def test_checked_of_jit_of_grad_reports_out_of_range_label_after_the_plain_call_ran():
    g = jax.jit(jax.grad(_ce))
    g(Z, GOOD)
    err, _ = jaxbp.checked(g)(Z, BAD)
    _assert_reports_bad_label(err)


def test_checked_eager_call_with_concrete_bad_ids_raises_value_error_at_once():
    # Without jit, checkify runs the function op by op: the ids are concrete, so the op
    # raises its ValueError (naming the value and index) before any err is returned.
    with pytest.raises(ValueError, match=r"labels: .*got 5 at index \(2,\)"):
        jaxbp.checked(jax.grad(_ce))(Z, BAD)
    err, _ = jaxbp.checked(jax.grad(_ce))(Z, GOOD)
    assert err.get() is None


def test_checked_under_vmap_reports_the_bad_example():
    err, _ = jaxbp.checked(jax.vmap(_ce))(jnp.stack([Z, Z]), jnp.stack([GOOD, BAD]))
    _assert_reports_bad_label(err)


def test_checked_keeps_the_wrapped_functions_name():
    assert jaxbp.checked(_ce).__name__ == "_ce"


# ------------------------------------------------------------ every op that takes class ids


@pytest.mark.parametrize("name", sorted(ID_OPS))
def test_every_op_with_class_ids_traces_no_check_and_no_effect_in_a_plain_call(name):
    # An effect (a debug_check's) sends every call of the jitted program through Python's
    # dispatch; the plain program must have none, and its value is the same as before.
    _needs_the_switch()
    f = ID_OPS[name]
    assert jax.make_jaxpr(f)(Z, GOOD).effects == set()
    assert jax.make_jaxpr(jax.grad(f))(Z, GOOD).effects == set()
    assert "check[debug" not in str(jax.make_jaxpr(f)(Z, GOOD))
    err, _ = jax.jit(jaxbp.checked(f))(Z, BAD)  # and the checked trace still has the check
    _assert_reports_bad_label(err)


@pytest.mark.parametrize("name", sorted(ID_OPS))
def test_every_op_with_class_ids_is_checked_through_jit_warm(name):
    g = jax.jit(ID_OPS[name])
    assert bool(jnp.isfinite(g(Z, GOOD)))  # plain, warm
    err, _ = jaxbp.checked(g)(Z, BAD)
    _assert_reports_bad_label(err)
    assert bool(jnp.isnan(g(Z, BAD)))  # plain again: NaN, no error


@pytest.mark.parametrize("name", sorted(ID_OPS))
def test_every_op_with_class_ids_is_checked_inside_jit_under_grad(name):
    f = jax.jit(jaxbp.checked(jax.grad(ID_OPS[name])))
    err, _ = f(Z, BAD)
    _assert_reports_bad_label(err)
    err, dz = f(Z, GOOD)
    assert err.get() is None and bool(jnp.all(jnp.isfinite(dz)))


@pytest.mark.parametrize("name", sorted(ID_OPS))
def test_every_op_with_class_ids_raises_eagerly_on_concrete_ids(name):
    with pytest.raises(ValueError, match=r"labels: expected class ids in \[0, 3\), got 5"):
        ID_OPS[name](Z, BAD)


def test_masked_rows_and_ignore_index_pass_the_check():
    f = functools.partial(jaxbp.softmax_cross_entropy, ignore_index=-100)
    mask = jnp.asarray([True, True, False, True])
    err, _ = jaxbp.checked(jax.jit(f))(Z, jnp.asarray([0, -100, 9, 2]), where=mask)
    assert err.get() is None
    err, _ = jaxbp.checked(jax.jit(f))(Z, jnp.asarray([0, -100, 9, 2]))
    assert err.get() is not None and "got 9" in err.get()


# ------------------------------------------------- tracers found by type, not by a host copy


class _NoHostCopy:
    """Stands in for numpy inside jaxbp._checks: any np.asarray there fails the test."""

    def __getattr__(self, name):
        if name == "asarray":
            raise AssertionError("a device-to-host copy to tell a tracer from an array")
        return getattr(np, name)


def test_is_concrete_tells_tracers_by_type_with_no_host_copy(monkeypatch):
    from jaxbp import _checks

    monkeypatch.setattr(_checks, "np", _NoHostCopy())
    assert _checks.is_concrete(Z) and _checks.is_concrete(0.5) and _checks.is_concrete(None)
    assert _checks.is_concrete({"a": Z, "b": [GOOD]})
    seen = []
    jax.jit(lambda z: seen.append(_checks.is_concrete(z)) or z)(Z)
    jax.vmap(lambda z: seen.append(_checks.is_concrete([z])) or z)(Z)
    jax.grad(lambda z: seen.append(_checks.is_concrete(z)) or jnp.sum(z))(Z)
    assert seen == [False, False, False]
    # An eager op with float labels reads no value back: shapes and options only.
    probs = jax.nn.softmax(Z)
    assert jaxbp.softmax_cross_entropy(Z, probs, label_smoothing=0.1).shape == (4,)
    assert jaxbp.softmax(Z, axis=0).shape == Z.shape


def test_concrete_integer_labels_are_still_read_once_and_checked():
    with pytest.raises(ValueError, match="labels: expected class ids in \\[0, 3\\), got 5"):
        jaxbp.softmax_cross_entropy(Z, BAD)


def test_ids_of_the_embedding_and_the_gpt_trace_no_check_in_a_plain_call():
    # The other ops that take integer ids (token ids, targets): no effect in a plain trace,
    # the bad id reported under checked.
    _needs_the_switch()
    gpt = jaxbp.GPT(vocab=5, d=8, heads=2, layers=1, context=4)
    params = gpt.init(jax.random.key(0))
    ids, bad = jnp.asarray([[0, 1, 2, 4]]), jnp.asarray([[0, 1, 7, 4]])

    def step(params, ids):
        return jaxbp.value_and_grad(gpt)(params, ids, ids)[0]

    def emb(table, ids):
        return jnp.sum(jaxbp.embedding(ids, table))

    table = jnp.ones((5, 3))
    for f, args in ((step, (params, ids)), (emb, (table, ids))):
        assert jax.make_jaxpr(f)(*args).effects == set()
        err, _ = jax.jit(jaxbp.checked(f))(args[0], bad)
        message = err.get()
        assert message is not None and "got 7" in message, message
