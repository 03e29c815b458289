"""Every row of docs/edge_cases.md: one test (or a parametrised family) named after the
behaviour."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp.losses import valid_rows
from tests.helpers import assert_close
from tests.settings import ALL_CASES, Case, grad_of

CE = jaxbp.softmax_cross_entropy
REF_CE = jaxbp.reference.softmax_cross_entropy
Z = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))


def ce_grad(fn, z, y, **kw):
    return jax.grad(lambda z: jnp.sum(fn(z, y, **kw)))(z)


# ----------------------------------------------------------- out-of-range integer labels


@pytest.mark.parametrize("fn", [CE, REF_CE], ids=["jaxbp", "reference"])
@pytest.mark.parametrize("bad", [3, 7, -1, -100], ids=lambda b: f"label{b}")
def test_ce_integer_label_out_of_range_raises_when_concrete(fn, bad):
    y = jnp.asarray([0, 1, bad, 2])
    with pytest.raises(ValueError, match=rf"labels: .*\[0, 3\).*got {bad} at index \(2,\)"):
        fn(Z, y)


def test_ce_negative_label_equal_to_ignore_index_is_not_an_error():
    y = jnp.asarray([0, -100, 2, 1])
    loss = CE(Z, y, ignore_index=-100)
    assert loss[1] == 0.0 and bool(jnp.all(jnp.isfinite(loss)))
    with pytest.raises(ValueError, match="labels"):
        CE(Z, jnp.asarray([0, -1, 2, 1]), ignore_index=-100)


def test_ce_out_of_range_label_in_masked_row_is_not_an_error():
    loss = CE(Z, jnp.asarray([0, 9, 2, 1]), where=jnp.asarray([True, False, True, True]))
    assert loss[1] == 0.0 and bool(jnp.all(jnp.isfinite(loss)))


@pytest.mark.parametrize("fn", [CE, REF_CE], ids=["jaxbp", "reference"])
@pytest.mark.parametrize("bad", [3, -1], ids=lambda b: f"label{b}")
def test_ce_out_of_range_label_is_nan_row_under_jit(fn, bad):
    y = jnp.asarray([0, 1, bad, 2])
    good = jnp.asarray([True, True, False, True])
    loss = jax.jit(fn)(Z, y)
    dz = jax.jit(lambda z, y: ce_grad(fn, z, y))(Z, y)
    assert bool(jnp.isnan(loss[2])) and bool(jnp.all(jnp.isnan(dz[2])))
    # The other rows are untouched: their values equal those of a clean batch.
    clean = jnp.asarray([0, 1, 0, 2])
    np.testing.assert_allclose(loss[good], CE(Z, clean)[good], rtol=1e-12)
    np.testing.assert_allclose(dz[good], ce_grad(CE, Z, clean)[good], rtol=1e-12)


def test_checked_mode_reports_out_of_range_label():
    def mean_loss(z, y):
        return jnp.mean(CE(z, y))

    err, loss = jax.jit(jaxbp.checked(mean_loss))(Z, jnp.asarray([0, 1, 5, 2]))
    assert bool(jnp.isnan(loss))
    message = err.get()
    assert message is not None and "labels" in message and "5" in message
    with pytest.raises(Exception, match="labels"):
        err.throw()
    err, loss = jax.jit(jaxbp.checked(mean_loss))(Z, jnp.asarray([0, 1, 2, 2]))
    assert err.get() is None and bool(jnp.isfinite(loss))


def test_checked_mode_ignores_ignore_index_and_masked_rows():
    def f(z, y, m):
        return CE(z, y, where=m, ignore_index=-100)

    err, _ = jaxbp.checked(f)(Z, jnp.asarray([0, -100, 9, 2]), jnp.asarray([1, 1, 0, 1], bool))
    assert err.get() is None


# ---------------------------------------------------------------------- wrong dtypes


def test_ce_float_labels_where_ids_meant_raise_type_error():
    with pytest.raises(TypeError, match="labels"):
        CE(Z, jnp.asarray([0.0, 1.0, 2.0, 0.0]))


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("softmax_cross_entropy", (jnp.ones((2, 3), jnp.int32), jnp.asarray([0, 1]))),
        ("sigmoid_binary_cross_entropy", (jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3)))),
        ("softmax", (jnp.ones((2, 3), jnp.int32),)),
        ("relu", (jnp.ones((2, 3), jnp.int32),)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_integer_logits_raise_type_error(name, args):
    with pytest.raises(TypeError, match="logits|z"):
        getattr(jaxbp, name)(*args)


def test_mse_integer_pred_raises_type_error_naming_pred():
    with pytest.raises(TypeError, match="pred"):
        jaxbp.mse(jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3)))


# ---------------------------------------------------------------------- wrong shapes


@pytest.mark.parametrize("fn", [jaxbp.mse, jaxbp.reference.mse], ids=["jaxbp", "reference"])
def test_mse_rejects_n_vs_n1_broadcast(fn):
    with pytest.raises(ValueError, match="target.*no broadcasting"):
        fn(jnp.ones((4,)), jnp.ones((4, 1)))
    with pytest.raises(ValueError, match="target"):
        fn(jnp.ones((4, 1)), jnp.ones((4,)))


def test_ce_probability_labels_with_wrong_class_count_raise_value_error():
    with pytest.raises(ValueError, match="labels.*\\(4, 3\\).*\\(4, 2\\)"):
        CE(Z, jnp.full((4, 2), 0.5))


# --------------------------------------------------------------- precision and infinities


def test_fp16_logits_1e4_give_finite_loss_and_gradient():
    z = jnp.asarray([[1e4, 0.0, -1e4], [-1e4, -1e4, 1e4], [1e4, 1e4, 1e4]], jnp.float16)
    y = jnp.asarray([1, 2, 0])
    loss = CE(z, y)
    dz = jax.grad(lambda z: jnp.sum(CE(z, y)))(z)
    assert bool(jnp.all(jnp.isfinite(loss))) and bool(jnp.all(jnp.isfinite(dz)))
    np.testing.assert_allclose(loss, [1e4, 0.0, np.log(3)], rtol=1e-3)
    np.testing.assert_allclose(dz[0].astype(jnp.float32), [1.0, -1.0, 0.0], atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_low_precision_loss_is_float32_and_gradient_keeps_input_dtype(dtype):
    z = Z.astype(dtype)
    cases = [
        (CE, (z, jnp.asarray([0, 1, 2, 0]))),
        (CE, (z, jnp.full((4, 3), 1 / 3, dtype))),
        (jaxbp.mse, (z, jnp.zeros((4, 3), dtype))),
        (jaxbp.sigmoid_binary_cross_entropy, (z, jnp.ones((4, 3), dtype))),
    ]
    for op, args in cases:
        for f in (op, getattr(jaxbp.reference, op.__name__)):
            loss = f(*args)
            assert loss.dtype == jnp.float32, f
            g = jax.grad(lambda z, f=f, args=args: jnp.sum(f(z, *args[1:])))(z)
            assert g.dtype == dtype, f


@pytest.mark.parametrize("fn", [CE, REF_CE], ids=["jaxbp", "reference"])
def test_neg_inf_logit_with_zero_label_prob_is_finite_with_zero_gradient(fn):
    z = jnp.asarray([[1.0, -jnp.inf, 0.5], [0.2, 0.3, -jnp.inf]])
    for y in (jnp.asarray([0, 1]), jnp.asarray([[0.7, 0.0, 0.3], [0.5, 0.5, 0.0]])):
        loss = fn(z, y)
        dz = ce_grad(fn, z, y)
        assert bool(jnp.all(jnp.isfinite(loss))) and bool(jnp.all(jnp.isfinite(dz)))
        assert dz[0, 1] == 0.0 and dz[1, 2] == 0.0
    # A −inf logit on the labelled class is an infinite loss, not a NaN.
    assert fn(z, jnp.asarray([1, 0]))[0] == jnp.inf


@pytest.mark.parametrize("fn", [CE, REF_CE], ids=["jaxbp", "reference"])
def test_all_neg_inf_row_or_pos_inf_gives_nan_row(fn):
    z = jnp.asarray([[1.0, 2.0, 0.5], [-jnp.inf] * 3, [0.0, jnp.inf, 1.0], [0.1, 0.2, 0.3]])
    y = jnp.asarray([0, 1, 1, 2])
    loss = fn(z, y)
    dz = ce_grad(fn, z, y)
    np.testing.assert_array_equal(np.isnan(loss), [False, True, True, False])
    assert bool(jnp.all(jnp.isnan(dz[1:3]))) and bool(jnp.all(jnp.isfinite(dz[::3])))
    s = jaxbp.softmax(z)
    assert bool(jnp.all(jnp.isnan(s[1:3]))) and bool(jnp.all(jnp.isfinite(s[::3])))


# -------------------------------------------------------------------------- masking


@pytest.mark.parametrize("fn", [CE, REF_CE], ids=["jaxbp", "reference"])
@pytest.mark.parametrize("huge", [1e30, jnp.inf, -jnp.inf, jnp.nan], ids=str)
def test_ce_masked_rows_have_zero_gradient_even_with_huge_logits(fn, huge):
    z = Z.at[1].set(jnp.asarray([huge, -huge, 0.0])).at[3, 0].set(huge)
    y = jnp.asarray([0, -100, 2, 1])
    where = jnp.asarray([True, True, True, False])
    cw = jnp.asarray([1.0, 2.0, 0.5])

    def f(z, cw):
        return jnp.sum(fn(z, y, where=where, ignore_index=-100, class_weights=cw))

    loss = fn(z, y, where=where, ignore_index=-100, class_weights=cw)
    dz, dcw = jax.grad(f, argnums=(0, 1))(z, cw)
    assert loss[1] == 0.0 and loss[3] == 0.0
    np.testing.assert_array_equal(dz[1], 0.0)
    np.testing.assert_array_equal(dz[3], 0.0)
    assert bool(jnp.all(jnp.isfinite(dz))) and bool(jnp.all(jnp.isfinite(dcw)))
    # Probability labels: masked rows get a zero label gradient too.
    p = jnp.full((4, 3), 1 / 3)
    dz, dp = jax.grad(lambda z, p: jnp.sum(fn(z, p, where=where)), argnums=(0, 1))(
        z.at[1].set(1.0), p
    )
    np.testing.assert_array_equal(dz[3], 0.0)
    np.testing.assert_array_equal(dp[3], 0.0)


@pytest.mark.parametrize("fn", [CE, REF_CE], ids=["jaxbp", "reference"])
def test_ce_every_row_masked_gives_zero_loss_and_gradient(fn):
    """Chosen behaviour: a mean over valid rows divides by max(count, 1), so it is 0, not NaN
    (PyTorch returns NaN here, pytorch#70348)."""
    y = jnp.full((4,), -100)

    def mean_loss(z):
        loss = fn(z, y, ignore_index=-100)
        count = valid_rows(y, ignore_index=-100).sum().astype(loss.dtype)
        return jnp.sum(loss) / jnp.maximum(count, 1.0)

    assert mean_loss(Z) == 0.0
    np.testing.assert_array_equal(jax.grad(mean_loss)(Z), 0.0)
    nowhere = jnp.zeros(4, bool)
    np.testing.assert_array_equal(fn(Z, jnp.asarray([0, 1, 2, 0]), where=nowhere), 0.0)


# ------------------------------------------------------------------ label semantics


def test_probability_labels_not_summing_to_one_give_p_sum_y_minus_y():
    rng = np.random.default_rng(3)
    y = rng.uniform(0.0, 1.0, size=(4, 3))  # rows sum to anything
    p = np.asarray(jax.nn.softmax(Z))
    expected = p * y.sum(-1, keepdims=True) - y
    for fn in (CE, REF_CE):
        dz = ce_grad(fn, Z, jnp.asarray(y))
        np.testing.assert_allclose(dz, expected, rtol=1e-12, atol=1e-15)
        assert not np.allclose(dz, p - y)


def test_label_smoothing_same_for_ids_and_one_hot_and_only_on_valid_rows():
    eps, c = 0.2, 3
    y = jnp.asarray([0, 2, -100, 1])
    onehot = jax.nn.one_hot(jnp.asarray([0, 2, 0, 1]), c, dtype=jnp.float64)
    where = jnp.asarray([True, True, False, True])
    ids = CE(Z, y, label_smoothing=eps, ignore_index=-100)
    probs = CE(Z, onehot, label_smoothing=eps, where=where)
    np.testing.assert_allclose(ids, probs, rtol=1e-12)
    d_ids = ce_grad(CE, Z, y, label_smoothing=eps, ignore_index=-100)
    d_probs = ce_grad(CE, Z, onehot, label_smoothing=eps, where=where)
    np.testing.assert_allclose(d_ids, d_probs, rtol=1e-12)
    assert ids[2] == 0.0
    np.testing.assert_array_equal(d_ids[2], 0.0)
    # Valid rows: smoothed target (1 − ε)·onehot + ε/c, by hand.
    logp = np.asarray(jax.nn.log_softmax(Z))
    target = (1 - eps) * np.asarray(onehot) + eps / c
    np.testing.assert_allclose(ids[where], -(target * logp).sum(-1)[where], rtol=1e-12)


def test_class_weights_smoothing_ignore_index_together():
    eps, c = 0.1, 3
    w = np.asarray([0.5, 2.0, 1.5])
    y = np.asarray([2, -1, 0, 1])
    kw = {"class_weights": jnp.asarray(w), "label_smoothing": eps, "ignore_index": -1}
    loss = CE(Z, jnp.asarray(y), **kw)
    dz = ce_grad(CE, Z, jnp.asarray(y), **kw)
    # By hand, as PyTorch defines it: (1−ε)·w_y·nll_y + ε/c·Σ_k w_k·nll_k on kept rows.
    logp = np.asarray(jax.nn.log_softmax(Z))
    p = np.exp(logp)
    keep = y != -1
    onehot = np.eye(c)[np.where(keep, y, 0)]
    u = w * ((1 - eps) * onehot + eps / c)
    np.testing.assert_allclose(loss, np.where(keep, -(u * logp).sum(-1), 0.0), rtol=1e-12)
    expected_dz = np.where(keep[:, None], p * u.sum(-1, keepdims=True) - u, 0.0)
    np.testing.assert_allclose(dz, expected_dz, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dz, ce_grad(REF_CE, Z, jnp.asarray(y), **kw), rtol=1e-12)


# ------------------------------------------------------------------------ activations


def test_relu_derivative_at_zero_is_zero():
    z = jnp.asarray([-1.0, 0.0, 1.0])
    for fn in (jaxbp.relu, jaxbp.reference.relu):
        np.testing.assert_array_equal(jax.grad(lambda z, f=fn: jnp.sum(f(z)))(z), [0.0, 0.0, 1.0])


def test_leaky_relu_derivative_at_zero_is_negative_slope():
    z = jnp.asarray([-1.0, 0.0, 1.0])
    for fn in (jaxbp.leaky_relu, jaxbp.reference.leaky_relu):
        g = jax.grad(lambda z, f=fn: jnp.sum(f(z, negative_slope=0.25)))(z)
        np.testing.assert_array_equal(g, [0.25, 0.25, 1.0])


# ------------------------------------------------------------------------------ NaN


def _with_nan(case: Case):
    arrays = case.arrays(jnp.float64)
    name = case.diff[0]
    a = np.array(arrays[name])
    idx = (2,) if a.ndim == 1 else np.unravel_index(2 * a.shape[-1], a.shape)
    a[idx] = np.nan  # row 2: valid in every masked setting of tests/settings.py
    return {**arrays, name: jnp.asarray(a)}, name, idx


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_nan_input_propagates_to_gradient(case):
    arrays, name, idx = _with_nan(case)
    out = case.op(**arrays, **case.options)
    cot = jnp.ones_like(out)
    grads = grad_of(case.op, case, arrays, cot)
    assert bool(jnp.any(jnp.isnan(out))), "NaN input, finite output"
    if case.name == "dense":  # dx = g·wᵀ does not read x; x's NaN reaches dw = xᵀ·g
        assert bool(jnp.any(jnp.isnan(grads["w"])))
    elif case.name == "dropout":
        # dx = where(keep, g/q, 0·g) never reads x (dropout is linear in x): a NaN in x
        # reaches the output, dropped or kept (0·NaN is NaN); a NaN cotangent reaches dx
        # (tests/test_dropout.py).
        assert bool(jnp.isnan(out[idx])) and bool(jnp.all(jnp.isfinite(grads[name])))
    elif case.name == "embedding":
        # dtable = onehot(ids)ᵀ·g never reads the table: a NaN in the table reaches the
        # output rows that look it up (above), and a NaN cotangent reaches dtable
        # (tests/test_embedding.py).
        assert bool(jnp.all(jnp.isfinite(grads["table"])))
    elif case.name == "position_embedding":
        # x + table[:t] is linear: its backward (dx = g, dtable = Σₙ g) reads neither input,
        # so a NaN in x stays in the output (above) and the gradients stay those of g.
        ref = grad_of(getattr(jaxbp.reference, case.name), case, arrays, cot)
        assert bool(jnp.all(jnp.isfinite(grads[name]))) and bool(jnp.all(jnp.isfinite(ref[name])))
    else:
        assert bool(jnp.isnan(grads[name][idx])), f"d{name}{idx} = {grads[name][idx]}"


# ------------------------------------------------------------------- empty and c = 1


# Cases with a leading batch axis (1-d x has none; for axis=0 the leading axis is the class).
BATCHED_CASES = [c for c in ALL_CASES if c.id not in ("dense-1d-x", "softmax-axis0",
                                                      "log_softmax-axis0")]  # fmt: skip


@pytest.mark.parametrize("case", BATCHED_CASES, ids=str)
def test_empty_batch_gives_empty_result_and_gradient(case):
    arrays = case.arrays(jnp.float64)
    shared = ("w", "b", "class_weights", "table", "gamma", "beta", "key")
    lead = {k: v for k, v in arrays.items() if k not in shared}
    axis0 = {k: v[:0] if v.ndim else v for k, v in lead.items()}
    arrays = {**arrays, **axis0}
    out = case.op(**arrays, **case.options)
    assert out.shape[0] == 0
    grads = grad_of(case.op, case, arrays, jnp.ones_like(out))
    for k, g in grads.items():
        assert g.shape == arrays[k].shape
        assert bool(jnp.all(g == 0))


def test_empty_batch_and_single_class():
    z0 = jnp.zeros((0, 3))
    assert CE(z0, jnp.zeros((0,), jnp.int32)).shape == (0,)
    assert ce_grad(CE, z0, jnp.zeros((0,), jnp.int32)).shape == (0, 3)
    z1 = jnp.asarray([[3.0], [-50.0], [1e4]])
    for y in (jnp.zeros(3, jnp.int32), jnp.ones((3, 1))):
        for fn in (CE, REF_CE):
            np.testing.assert_array_equal(fn(z1, y), 0.0)
            np.testing.assert_array_equal(ce_grad(fn, z1, y), 0.0)
    np.testing.assert_array_equal(jaxbp.softmax(z1), 1.0)
    np.testing.assert_array_equal(jax.grad(lambda z: jnp.sum(jaxbp.softmax(z) * 3.0))(z1), 0.0)
    with pytest.raises(ValueError, match="logits"):
        CE(jnp.zeros((2, 0)), jnp.zeros(2, jnp.int32))


# ---------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_float64_kept_when_x64_enabled(case):
    arrays = case.arrays(jnp.float64)
    out = case.op(**arrays, **case.options)
    assert out.dtype == jnp.float64
    grads = grad_of(case.op, case, arrays, jnp.ones_like(out))
    assert all(g.dtype == jnp.float64 for g in grads.values())


def test_float32_stays_float32_without_x64():
    """Without x64 the library keeps what it is given: float32 in, float32 out and gradients."""
    code = textwrap.dedent(
        """
        import os
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax, jax.numpy as jnp, jaxbp
        assert not jax.config.jax_enable_x64
        z = jnp.ones((3, 4), jnp.float32) * jnp.arange(4, dtype=jnp.float32)
        y = jnp.asarray([0, 1, 3])
        w = jnp.ones((4, 2), jnp.float32)
        fns = [
            lambda z: jaxbp.softmax_cross_entropy(z, y),
            lambda z: jaxbp.softmax_cross_entropy(z, jax.nn.softmax(z), label_smoothing=0.1),
            lambda z: jaxbp.mse(z, z * 2),
            lambda z: jaxbp.sigmoid_binary_cross_entropy(z, jnp.ones_like(z)),
            lambda z: jaxbp.softmax(z), lambda z: jaxbp.log_softmax(z),
            lambda z: jaxbp.dense(z, w), lambda z: jaxbp.gelu(z), lambda z: jaxbp.relu(z),
        ]
        for f in fns:
            out = f(z)
            g = jax.grad(lambda z: jnp.sum(f(z)))(z)
            assert out.dtype == jnp.float32 and g.dtype == jnp.float32, (out.dtype, g.dtype)
        print("ok")
        """
    )
    env = {"JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ----------------------------------- options: static where they change shapes or control flow

_X3, _W3, _Y3 = jnp.ones((3, 4)), jnp.ones((4, 5)), jnp.asarray([0, 1, 2])
_Y4 = jnp.asarray([0, 1, 2, 0])

# (option, a call taking the option's value): each of these is static, fixed at trace time.
_STATIC_OPTIONS = {
    "approximate": lambda s: jaxbp.gelu(Z, approximate=s),
    "axis": lambda s: jaxbp.softmax(Z, axis=s),
    "axis-log_softmax": lambda s: jaxbp.log_softmax(Z, axis=s),
    "ignore_index": lambda s: CE(Z, _Y4, ignore_index=s),
    "softcap": lambda s: jaxbp.linear_softmax_cross_entropy(_X3, _W3, _Y3, softcap=s),
    "chunk_size": lambda s: jaxbp.linear_softmax_cross_entropy(_X3, _W3, _Y3, chunk_size=s),
}
_GOOD = {"approximate": True, "axis": 0, "ignore_index": 1, "chunk_size": 2}

# Options that only scale values: traced is fine, and each value compiles nothing new.
_TRACED_OPTIONS = {
    "negative_slope": lambda s: jaxbp.leaky_relu(Z, negative_slope=s),
    "label_smoothing": lambda s: CE(Z, _Y4, label_smoothing=s),
    "z_loss": lambda s: CE(Z, _Y4, z_loss=s),
    "label_smoothing-fused": lambda s: jaxbp.linear_softmax_cross_entropy(
        _X3, _W3, _Y3, label_smoothing=s
    ),
    "z_loss-fused": lambda s: jaxbp.linear_softmax_cross_entropy(_X3, _W3, _Y3, z_loss=s),
    "eps": lambda s: jaxbp.layer_norm(Z, jnp.ones(3), jnp.zeros(3), eps=s),
    "eps-rms_norm": lambda s: jaxbp.rms_norm(Z, jnp.ones(3), eps=s),
}


@pytest.mark.parametrize("key", sorted(_STATIC_OPTIONS))
def test_static_option_given_a_traced_value_raises_type_error_naming_it(key):
    option = key.split("-")[0]
    call = _STATIC_OPTIONS[key]
    value = _GOOD.get(option, 0.1)
    call(value)  # a Python constant is fine
    with pytest.raises(TypeError, match=rf"{option}: must be a Python (number|int|bool)"):
        jax.jit(call)(value)


@pytest.mark.parametrize("key", sorted(_TRACED_OPTIONS))
def test_float_option_may_be_traced_and_a_gradient_through_it_is_nan(key):
    """A traced value gives what the Python constant gives; the rules do not differentiate
    the option, so a gradient taken through it is NaN, never a silent 0."""
    call = _TRACED_OPTIONS[key]
    traced = jax.jit(call)
    for value in (0.1, 0.25):  # every output element (a norm's outputs sum to about 0)
        assert_close(traced(value), call(value), jnp.float64)
    assert np.isnan(float(jax.grad(lambda s: jnp.sum(call(s)))(0.1)))


def test_a_traced_label_smoothing_compiles_the_rule_once_for_every_value():
    fwd = jaxbp.softmax_cross_entropy.fwd.__wrapped__  # the jit (concrete options checked first)
    z = jnp.asarray(np.random.default_rng(3).normal(size=(5, 7)))
    y = jnp.asarray([0, 1, 2, 3, 4])
    before = fwd._cache_size()
    for eps in (0.0, 0.05, 0.1, 0.2, 0.3):
        fwd(z, y, label_smoothing=eps)
    assert fwd._cache_size() - before <= 1  # one new entry for the shape, none per value


def test_a_traced_option_out_of_range_is_reported_under_checked():
    err, _ = jax.jit(jaxbp.checked(lambda s: CE(Z, _Y4, label_smoothing=s)))(1.5)
    with pytest.raises(Exception, match="label_smoothing: expected a float in \\[0, 1\\]"):
        err.throw()
    err, _ = jax.jit(jaxbp.checked(lambda s: CE(Z, _Y4, label_smoothing=s)))(0.5)
    err.throw()  # in range: nothing to report


def test_leaky_relu_bad_options_say_what_they_must_be():
    with pytest.raises(TypeError, match="negative_slope"):
        jaxbp.leaky_relu(Z, negative_slope="0.1")
    with pytest.raises(TypeError, match="approximate"):
        jaxbp.gelu(Z, approximate="yes")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0, -np.inf], ids=str)
@pytest.mark.parametrize("op", ["ce", "fused"])
def test_z_loss_nan_inf_or_negative_raises_value_error(op, bad):
    with pytest.raises(ValueError, match="z_loss"):
        if op == "ce":
            CE(Z, jnp.asarray([0, 1, 2, 0]), z_loss=bad)
        else:
            jaxbp.linear_softmax_cross_entropy(_X3, _W3, _Y3, z_loss=bad)


@pytest.mark.parametrize("bad", [np.nan, -0.5, 1.5], ids=str)
def test_label_smoothing_nan_or_outside_0_1_raises_value_error(bad):
    with pytest.raises(ValueError, match="label_smoothing"):
        CE(Z, jnp.asarray([0, 1, 2, 0]), label_smoothing=bad)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0, -1.0], ids=str)
def test_softcap_nan_inf_or_not_positive_raises_value_error(bad):
    with pytest.raises(ValueError, match="softcap"):
        jaxbp.linear_softmax_cross_entropy(_X3, _W3, _Y3, softcap=bad)


# (fwd, bad positional arguments, options, error type, argument named in the message)
_FWD_BAD = [
    ("softmax_fwd", (jnp.arange(3),), {}, TypeError, "z"),
    ("softmax_fwd", (Z,), {"axis": 2}, ValueError, "axis"),
    ("log_softmax_fwd", (jnp.ones(()),), {}, ValueError, "z"),
    ("relu_fwd", (jnp.arange(3),), {}, TypeError, "z"),
    ("leaky_relu_fwd", (Z,), {"negative_slope": "x"}, TypeError, "negative_slope"),
    ("dense_fwd", (jnp.ones((2, 3)), jnp.ones((4, 5))), {}, ValueError, "x"),
    ("mse_fwd", (jnp.ones((2, 3)), jnp.ones((2, 1))), {}, ValueError, "target"),
    ("sigmoid_binary_cross_entropy_fwd", (Z, jnp.ones((4, 2))), {}, ValueError, "labels"),
    ("softmax_cross_entropy_fwd", (Z, jnp.asarray([0, 1])), {}, ValueError, "labels"),
    ("softmax_cross_entropy_fwd", (Z, jnp.asarray([0, 1, 2, 0])), {"z_loss": -1.0}, ValueError,
     "z_loss"),
    ("linear_softmax_cross_entropy_fwd", (_X3, _W3, _Y3[:2]), {}, ValueError, "labels"),
    ("linear_softmax_cross_entropy_fwd", (_X3, _W3, _Y3), {"softcap": -1.0}, ValueError,
     "softcap"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fwd", "args", "options", "error", "name"), _FWD_BAD, ids=[f"{c[0]}-{c[4]}" for c in _FWD_BAD]
)
def test_fwd_rules_validate_their_inputs_like_the_ops(fwd, args, options, error, name):
    with pytest.raises(error, match=name):
        getattr(jaxbp, fwd)(*args, **options)


# ------------------------------------------------- mixed dtypes: nothing is promoted (x64)

MIX_PATHS = {"manual": jaxbp.value_and_grad, "reference": jaxbp.reference.value_and_grad}


def _mlp_problem(loss="softmax_cross_entropy", dtype=jnp.float32):
    model = jaxbp.MLP((4, 5, 3), loss=loss)
    params = model.init(jax.random.PRNGKey(0), dtype)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4))  # NumPy's default: float64, as a user's data often is
    if loss == "softmax_cross_entropy":
        labels = np.array([0, 1, 2, 0, 1, 2])
    elif loss == "mse":
        labels = rng.normal(size=(6, 3))
    else:
        labels = rng.uniform(size=(6, 3))
    return model, params, x, labels


@pytest.mark.parametrize("promotion", ["standard", "strict"])
@pytest.mark.parametrize("path", list(MIX_PATHS))
def test_float64_inputs_with_float32_parameters_raise_naming_the_parameter_on_both_paths(
    path, promotion
):
    model, params, x, labels = _mlp_problem()
    step = MIX_PATHS[path](model)
    with jax.numpy_dtype_promotion(promotion):
        # float64 x, float32 parameters: jnp would promote to a float64 network.
        message = r"params\[0\]\['w'\]: expected the dtype of x \(float64\), got float32"
        with pytest.raises(TypeError, match=message):
            step(params, x, labels)
        with pytest.raises(TypeError, match=message):
            jax.jit(step)(params, x, labels)
        # float32 x, float64 parameters.
        wide = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        with pytest.raises(TypeError, match=r"expected the dtype of x \(float32\), got float64"):
            step(wide, x.astype(np.float32), labels)
        # one parameter of another dtype among float32 ones.
        mixed = [dict(p) for p in params]
        mixed[1]["b"] = mixed[1]["b"].astype(jnp.float64)
        with pytest.raises(TypeError, match=r"params\[1\]\['b'\]: expected the dtype of x"):
            step(mixed, x.astype(np.float32), labels)
        # one dtype throughout: runs, in that dtype.
        loss, grads = step(params, x.astype(np.float32), labels)
        assert loss.dtype == jnp.float32 and grads[0]["w"].dtype == jnp.float32


@pytest.mark.parametrize("promotion", ["standard", "strict"])
@pytest.mark.parametrize("loss", ["mse", "sigmoid_binary_cross_entropy", "softmax_cross_entropy"])
def test_float64_labels_and_class_weights_follow_the_networks_dtype_on_both_paths(loss, promotion):
    model, params, x, labels = _mlp_problem(loss)
    x = x.astype(np.float32)
    kw64, kw32 = {}, {}
    if loss == "softmax_cross_entropy":  # probabilities, and class weights
        labels = np.eye(3)[labels] * 0.9 + 0.1 / 3
        kw64 = {"class_weights": np.array([1.0, 2.0, 0.5])}
        kw32 = {"class_weights": kw64["class_weights"].astype(np.float32)}
    with jax.numpy_dtype_promotion(promotion):
        got = {p: f(model)(params, x, labels, **kw64) for p, f in MIX_PATHS.items()}
        # The oracle: the same data given in float32 by the caller.
        want = jaxbp.reference.value_and_grad(model)(params, x, labels.astype(np.float32), **kw32)
    for p, (value, grads) in got.items():
        assert value.dtype == jnp.float32, p
        assert_close((value, grads), want, jnp.float32)
    if loss == "mse":  # the op and its twin alike: the target in the prediction's dtype
        pred = jnp.asarray(x[:, :3])
        for fn in (jaxbp.mse, jaxbp.reference.mse):
            assert fn(pred, labels).dtype == jnp.float32
