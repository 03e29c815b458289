"""GPT: the explicit reverse loop against jax.grad of the plain twin, finite differences,
options, masks, precision, what the trace contains, generation, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp.gpt import _join_qkv, _split_qkv
from tests import helpers
from tests.helpers import assert_close
from tests.test_nn import _primitives

VG = functools.cache(jaxbp.value_and_grad)
REF = functools.cache(jaxbp.reference.value_and_grad)
V = 11  # a small vocabulary keeps compiles cheap


def _problem(*, n=3, t=5, dtype=jnp.float64, seed=0, **model_kw):
    kw = dict(vocab=V, d=8, heads=2, layers=2, context=6) | model_kw
    model = jaxbp.GPT(**kw)
    kp, ki, kt = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = model.init(kp, dtype)
    # Perturb the zero biases and unit gains so that every parameter's gradient path is
    # exercised away from its initial symmetric point.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    leaves = [a + (0.1 * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype)
              for a, k in zip(leaves, keys, strict=True)]  # fmt: skip
    params = jax.tree.unflatten(tree, leaves)
    ids = jax.random.randint(ki, (n, t), 0, V, jnp.int32)
    targets = jax.random.randint(kt, (n, t), 0, V, jnp.int32)
    return model, params, ids, targets


# ----------------------------------------------------------------------- manual == autodiff


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"tied": True},
        {"attention": "recompute"},
        {"head_strategy": "recompute"},
        {"tied": True, "attention": "recompute", "head_strategy": "recompute", "heads": 4},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_manual_gradient_matches_jax_grad_of_the_plain_twin_in_float64(options):
    model, params, ids, targets = _problem(**options)
    loss, grads = VG(model)(params, ids, targets)
    ref_loss, ref_grads = REF(model)(params, ids, targets)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert_close((loss, grads), (ref_loss, ref_grads), jnp.float64)


def test_manual_gradient_matches_in_float32():
    model, params, ids, targets = _problem(dtype=jnp.float32, n=4, t=6)
    loss, grads = VG(model)(params, ids, targets)
    ref_loss, ref_grads = REF(model)(params, ids, targets)
    assert loss.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert_close((loss, grads), (ref_loss, ref_grads), jnp.float32)


def test_bfloat16_parameters_give_bfloat16_gradients_close_to_the_float32_twin():
    model, params32, ids, targets = _problem(dtype=jnp.float32)
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params32)
    loss, grads = VG(model)(params16, ids, targets)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    # The oracle: the float32 twin at the same (bfloat16-rounded) parameters.
    rounded = jax.tree.map(lambda a: a.astype(jnp.float32), params16)
    ref_loss, ref_grads = REF(model)(rounded, ids, targets)
    assert abs(float(loss) - float(ref_loss)) <= 2e-2 * abs(float(ref_loss))
    # bfloat16 keeps 8 bits: per leaf within 5% of the leaf's max-abs.
    assert_close(grads, ref_grads, tol=5e-2, name="bfloat16 grads")


def test_manual_gradient_matches_finite_differences_along_random_directions():
    model, params, ids, targets = _problem(n=2, t=4)
    _, grads = VG(model)(params, ids, targets)
    loss = jax.jit(lambda p: model.mean_loss(p, ids, targets))
    rng = np.random.default_rng(3)
    leaves, tree = jax.tree.flatten(params)
    h = 1e-6
    for _ in range(3):
        d = jax.tree.unflatten(tree, [jnp.asarray(rng.normal(size=a.shape)) for a in leaves])
        plus = jax.tree.map(lambda a, b: a + h * b, params, d)
        minus = jax.tree.map(lambda a, b: a - h * b, params, d)
        fd = (float(loss(plus)) - float(loss(minus))) / (2 * h)
        pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(d), strict=True)
        gd = sum(float(jnp.vdot(g, b)) for g, b in pairs)
        gnorm = np.sqrt(sum(float(jnp.vdot(g, g)) for g in jax.tree.leaves(grads)))
        dnorm = np.sqrt(sum(float(jnp.vdot(b, b)) for b in jax.tree.leaves(d)))
        assert abs(fd - gd) <= 1e-6 * gnorm * dnorm, (fd, gd)


def test_masked_positions_are_left_out_of_the_mean():
    model, params, ids, targets = _problem()
    where = jnp.asarray(np.random.default_rng(1).random(ids.shape) < 0.6)
    loss, grads = VG(model)(params, ids, targets, where=where)
    ref = REF(model)(params, ids, targets, where=where)
    assert_close((loss, grads), ref, jnp.float64)
    # Changing a masked target changes nothing.
    j = tuple(np.argwhere(~np.asarray(where))[0])
    other = targets.at[j].set((targets[j] + 1) % V)
    assert_close(VG(model)(params, ids, other, where=where), (loss, grads), jnp.float64)


def test_every_position_masked_gives_zero_loss_and_zero_gradients():
    model, params, ids, targets = _problem()
    loss, grads = VG(model)(params, ids, targets, where=jnp.zeros(ids.shape, bool))
    assert float(loss) == 0.0
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


def test_shorter_sequences_than_the_context_use_the_first_positions_only():
    model, params, ids, targets = _problem(t=3)
    _, grads = VG(model)(params, ids, targets)
    assert float(jnp.max(jnp.abs(grads["pos"][3:]))) == 0.0
    assert float(jnp.max(jnp.abs(grads["pos"][:3]))) > 0.0


def test_tied_head_gradient_is_the_sum_of_both_uses_of_the_token_table():
    model, params, ids, targets = _problem(tied=True)
    assert "head" not in params
    _, grads = VG(model)(params, ids, targets)
    _, ref = REF(model)(params, ids, targets)
    assert_close(grads["tok"], ref["tok"], jnp.float64)


def test_qkv_columns_are_stored_per_head_as_megatron_stores_them():
    """``attn.qkv.w = [q₀ k₀ v₀ | q₁ k₁ v₁ | …]``: the block built from separate ``W_q, W_k,
    W_v (d, d)`` interleaved head by head equals multi-head attention written with them
    (tests/helpers.py), and a contiguous third of the columns is a third of the heads."""
    d, h = 12, 3
    e = d // h
    model = jaxbp.GPT(vocab=V, d=d, heads=h, layers=1, context=5)
    params = model.init(jax.random.PRNGKey(0), jnp.float64)
    rng = np.random.default_rng(0)
    sep = {c: (rng.normal(size=(d, d)), rng.normal(size=d)) for c in "qkvo"}
    w = np.stack([sep[c][0].reshape(d, h, e) for c in "qkv"], axis=2)  # (d, h, 3, e)
    b = np.stack([sep[c][1].reshape(h, e) for c in "qkv"], axis=1)  # (h, 3, e)
    blk = params["blocks"][0]
    blk["attn"]["qkv"] = {"w": jnp.asarray(w.reshape(d, 3 * d)), "b": jnp.asarray(b.reshape(-1))}
    blk["attn"]["proj"] = {"w": jnp.asarray(sep["o"][0]), "b": jnp.asarray(sep["o"][1])}
    blk["mlp"]["out"]["w"] = jnp.zeros_like(blk["mlp"]["out"]["w"])  # the MLP branch adds 0
    ids = jnp.asarray(rng.integers(0, V, (2, 5)), jnp.int32)
    x0 = params["tok"][ids] + params["pos"][:5]
    a = helpers.layer_norm(x0, blk["ln1"]["gamma"], blk["ln1"]["beta"], model.eps)
    x = x0 + helpers.attention(a, sep, h, causal=True)
    want = helpers.layer_norm(x, params["ln_f"]["gamma"], params["ln_f"]["beta"], model.eps)
    assert_close(model.hidden(params, ids), want, jnp.float64)
    q, k, v = _split_qkv(jnp.arange(3.0 * d)[None, None], h)  # column indices
    for head in range(h):
        for j, part in enumerate((q, k, v)):
            first = 3 * e * head + j * e  # head, then q/k/v, then e
            assert part[0, head, 0].tolist() == list(range(first, first + e))
    assert _join_qkv(q, k, v)[0, 0].tolist() == list(range(3 * d))


def test_mean_loss_through_the_ops_equals_the_twin_and_its_jax_grad_runs_the_rules():
    model, params, ids, targets = _problem()
    ref_loss, ref_grads = REF(model)(params, ids, targets)
    loss, grads = jax.value_and_grad(model.mean_loss)(params, ids, targets)
    assert_close((loss, grads), (ref_loss, ref_grads), jnp.float64)
    logits = model.apply(params, ids)
    assert logits.shape == (*ids.shape, V)
    per_tok = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    assert_close(jnp.mean(per_tok), ref_loss, jnp.float64)


def test_works_under_an_outer_jit():
    model, params, ids, targets = _problem()
    vg = VG(model)
    out = jax.jit(lambda p, i, t: vg(p, i, t))(params, ids, targets)
    assert_close(out, vg(params, ids, targets), jnp.float64)


def test_out_of_range_target_under_jit_gives_nan_not_a_wrong_number():
    model, params, ids, targets = _problem()
    vg = VG(model)
    loss, _ = jax.jit(lambda t: vg(params, ids, t))(targets.at[0, 1].set(V))
    assert np.isnan(float(loss))


# --------------------------------------------------------------- what the trace contains


def test_no_autodiff_runs_inside_value_and_grad(monkeypatch):
    # A model of this test alone (eps): its step is traced here, under the patch.
    model, params, ids, targets = _problem(layers=1, eps=1.25e-5)

    def forbidden(*args, **kwargs):
        raise AssertionError("autodiff called while tracing the manual gradient")

    for name in ("grad", "vjp", "value_and_grad", "linearize", "jvp"):
        monkeypatch.setattr(jax, name, forbidden)
    loss, _ = jaxbp.value_and_grad(model)(params, ids, targets)
    assert np.isfinite(float(loss))
    with pytest.raises(AssertionError, match="autodiff"):
        jaxbp.reference.value_and_grad(model)(params, ids, targets)


def test_manual_jaxpr_has_no_custom_vjp_call_and_no_full_logits_store():
    model, params, ids, targets = _problem(layers=1)
    jaxpr = jax.make_jaxpr(jaxbp.value_and_grad(model).jitted)(params, ids, targets, None)
    prims = _primitives(jaxpr)
    assert "dot_general" in prims
    assert not [p for p in prims if "custom_vjp" in p or "custom_lin" in p]
    ops_prims = _primitives(jax.make_jaxpr(model.mean_loss)(params, ids, targets))
    assert any("custom_vjp" in p for p in ops_prims)


# ------------------------------------------------------------------------ training, sampling


def test_a_few_adam_steps_lower_the_loss_on_a_repeated_batch():
    model, params, ids, targets = _problem(dtype=jnp.float32, seed=2)
    opt = optax.adam(1e-2)
    state = opt.init(params)
    vg = VG(model)
    losses = []
    for _ in range(15):
        loss, grads = vg(params, ids, targets)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


def test_generate_returns_prompt_then_samples_in_range_and_is_seeded():
    model, params, _, _ = _problem(dtype=jnp.float32)
    key = jax.random.PRNGKey(5)
    out = model.generate(params, key, [1, 2], 9)  # longer than the context: the window slides
    assert out.shape == (11,) and out[:2].tolist() == [1, 2]
    assert out.min() >= 0 and out.max() < V
    assert np.array_equal(out, model.generate(params, key, [1, 2], 9))
    # A near-zero temperature is greedy: the argmax of the logits at the last position.
    greedy = model.generate(params, key, [3], 1, temperature=1e-6)
    logits = model.apply(params, jnp.asarray([[3]]))
    assert greedy[1] == int(jnp.argmax(logits[0, 0]))


# ------------------------------------------------------------------------------ errors

# (prompt, steps, temperature, error, what the message must name): each refused before any
# sampling; on the old code out-of-range ids sampled silently and float prompts were cast.
BAD_GENERATE = [
    ([1, 2, V + 3], 2, 1.0, ValueError, f"prompt: expected class ids in [0, {V}), got {V + 3}"),
    ([1, -1], 2, 1.0, ValueError, "prompt: expected class ids in [0, 11), got -1 at index (1,)"),
    ([1.0, 2.0], 2, 1.0, TypeError, "prompt: expected an integer dtype, got float"),
    (np.array([0.5]), 2, 1.0, TypeError, "prompt: expected an integer dtype"),
    ([[1, 2]], 2, 1.0, ValueError, "prompt: expected ids of shape (t,), got shape (1, 2)"),
    ([], 2, 1.0, ValueError, "prompt: expected at least one id"),
    ([1], -1, 1.0, ValueError, "steps: expected an integer ≥ 0, got -1"),
    ([1], 2.5, 1.0, TypeError, "steps: expected an integer ≥ 0, got 2.5"),
    ([1], 2, 0.0, ValueError, "temperature: expected a positive number, got 0.0"),
    ([1], 2, -1.0, ValueError, "temperature: expected a positive number"),
    ([1], 2, float("nan"), ValueError, "temperature: expected a positive number"),
    ([1], 2, "hot", TypeError, "temperature: must be a Python number"),
]  # fmt: skip


@pytest.mark.parametrize(("prompt", "steps", "temperature", "error", "message"), BAD_GENERATE)
def test_generate_refuses_bad_prompts_steps_and_temperatures(
    prompt, steps, temperature, error, message, monkeypatch
):
    model, params, _, _ = _problem(dtype=jnp.float32)

    def no_sampling(*args):
        raise AssertionError("sampling started before the arguments were checked")

    monkeypatch.setattr(jaxbp.gpt, "_sampler", no_sampling)
    with pytest.raises(error) as e:
        model.generate(params, jax.random.PRNGKey(0), prompt, steps, temperature=temperature)
    assert message in str(e.value), str(e.value)


def test_generate_takes_ids_of_any_integer_dtype_and_zero_steps():
    model, params, _, _ = _problem(dtype=jnp.float32)
    key = jax.random.PRNGKey(0)
    assert model.generate(params, key, np.array([3, 0], np.uint8), 0).tolist() == [3, 0]
    assert model.generate(params, key, 4, 0).tolist() == [4]  # a scalar is one id
    ids = [model.generate(params, key, np.array([V - 1], dt), 2) for dt in (np.int8, np.int64)]
    assert ids[0].tolist() == ids[1].tolist() and ids[0][0] == V - 1


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="heads"):
        jaxbp.GPT(vocab=5, d=6, heads=4, layers=1, context=4)
    with pytest.raises(ValueError, match="layers"):
        jaxbp.GPT(vocab=5, d=8, heads=2, layers=0, context=4)
    with pytest.raises(ValueError, match="attention"):
        jaxbp.GPT(vocab=5, d=8, heads=2, layers=1, context=4, attention="flash")
    with pytest.raises(ValueError, match="eps"):
        jaxbp.GPT(vocab=5, d=8, heads=2, layers=1, context=4, eps=0.0)


def test_bad_inputs_are_clear_errors():
    model, params, ids, targets = _problem()
    vg = VG(model)
    with pytest.raises(ValueError, match=r"ids: expected shape \(n, t\)"):
        vg(params, jnp.zeros((3, 7), jnp.int32), jnp.zeros((3, 7), jnp.int32))  # t > context
    with pytest.raises(TypeError, match="ids: expected an integer dtype"):
        vg(params, ids.astype(jnp.float32), targets)
    with pytest.raises(ValueError, match="targets: expected the shape of ids"):
        vg(params, ids, targets[:, :-1])
    with pytest.raises(ValueError, match="targets"):
        vg(params, ids, targets.at[0, 0].set(V))
    with pytest.raises(ValueError, match="ids"):
        vg(params, ids.at[0, 0].set(-1), targets)
    with pytest.raises(ValueError, match="where"):
        vg(params, ids, targets, where=jnp.ones(ids.shape, jnp.int32))
    bad = {**params, "pos": params["pos"][:-1]}
    with pytest.raises(ValueError, match=r"params\['pos'\]: expected shape"):
        vg(bad, ids, targets)
    with pytest.raises(ValueError, match="params: expected the structure"):
        vg({k: v for k, v in params.items() if k != "head"}, ids, targets)


def test_value_and_grad_of_something_else_is_a_type_error():
    with pytest.raises(TypeError, match="model"):
        jaxbp.value_and_grad(object())
    with pytest.raises(TypeError, match="model"):
        jaxbp.reference.value_and_grad(object())


# ------------------------------------------------------------------------------- dropout


def _dropout_problem(rate=0.3, **kw):
    model, params, ids, targets = _problem(dropout=rate, **kw)
    return model, params, ids, targets, jax.random.key(7)


@pytest.mark.parametrize("options", [{}, {"tied": True, "attention": "recompute"}],
                         ids=["default", "tied-recompute"])  # fmt: skip
def test_dropout_gradient_matches_jax_grad_of_the_twin_with_the_same_masks(options):
    model, params, ids, targets, key = _dropout_problem(**options)
    where = jnp.arange(ids.shape[1]) < 4
    where = jnp.broadcast_to(where, ids.shape)
    loss, grads = VG(model)(params, ids, targets, where=where, dropout_key=key)
    # The oracle draws its masks with jax.random.bernoulli on fold_in(key, site) alone.
    ref_loss, ref_grads = REF(model)(params, ids, targets, where=where, dropout_key=key)
    assert_close((loss, grads), (ref_loss, ref_grads), jnp.float64)
    # ... and finite differences of the twin at those masks.
    report = jaxbp.compare(model, params, ids, targets, where=where, dropout_key=key)
    assert report.passed, report


def test_dropout_masks_change_with_the_key_and_vanish_at_evaluation():
    model, params, ids, targets, key = _dropout_problem()
    plain = jaxbp.GPT(**{**model.__dict__, "dropout": 0.0})
    l1, _ = VG(model)(params, ids, targets, dropout_key=key)
    l2, _ = VG(model)(params, ids, targets, dropout_key=jax.random.key(8))
    l0, _ = VG(plain)(params, ids, targets)
    assert len({float(l0), float(l1), float(l2)}) == 3
    # apply / mean_loss evaluate: no mask, the dropout-free model's numbers.
    np.testing.assert_array_equal(model.apply(params, ids), plain.apply(params, ids))
    assert float(model.mean_loss(params, ids, targets)) == float(
        plain.mean_loss(params, ids, targets)
    )


def test_dropout_keeps_expected_fraction_and_inverted_scale():
    # One site's mask, read from the tape: about 1 − rate kept, kept entries scaled 1/(1−rate).
    model, params, ids, targets, key = _dropout_problem(rate=0.25, n=8, t=6)
    t = jaxbp._tape.Tape("rules")
    _, _, state = model.forward(t, params, ids, targets, None, key)
    saved = state[-1]
    assert len(saved) == 1 + 2 * model.layers
    x = jnp.ones((8, 6, model.d), jnp.float64)
    kept = jaxbp.dropout(x, jax.random.fold_in(key, 0), rate=0.25)
    frac = float(jnp.mean(kept != 0))
    assert 0.65 < frac < 0.85
    np.testing.assert_allclose(np.unique(np.asarray(kept)), [0.0, 1 / 0.75])


def test_dropout_per_example_gradients_match_jacrev_of_the_twin():
    model, params, ids, targets, key = _dropout_problem(layers=1)
    grads = jaxbp.per_example_grads(model)(params, ids, targets, dropout_key=key)
    ref = jaxbp.reference.per_example_grads(model)(params, ids, targets, dropout_key=key)
    assert_close(grads, ref, jnp.float64)
    norms = jaxbp.per_example_grad_norms(model)(params, ids, targets, dropout_key=key)
    flat = jnp.concatenate([g.reshape(ids.shape[0], -1) for g in jax.tree.leaves(ref)], 1)
    assert_close(norms, jnp.linalg.norm(flat, axis=1), jnp.float64)


def test_dropout_planted_wrong_site_in_the_backward_is_caught(monkeypatch):
    from jaxbp import gpt as gpt_module

    model, params, ids, targets, key = _dropout_problem(layers=1)
    real = gpt_module._dropout_bwd

    # the attention branch's gradient through the MLP branch's mask
    def wrong(m, t, saved, g, site):
        return real(m, t, saved, g, 2 if site == 1 else site)

    monkeypatch.setattr(gpt_module, "_dropout_bwd", wrong)
    _, grads = jaxbp.value_and_grad(model)(params, ids, targets, dropout_key=key)
    _, ref = REF(model)(params, ids, targets, dropout_key=key)
    with pytest.raises(AssertionError):
        assert_close(grads, ref, jnp.float64)


def test_dropout_without_a_key_and_bad_rates_are_clear_errors():
    model, params, ids, targets, _ = _dropout_problem()
    with pytest.raises(ValueError, match="dropout_key"):
        VG(model)(params, ids, targets)
    for rate in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="dropout"):
            jaxbp.GPT(vocab=V, d=8, heads=2, layers=1, context=6, dropout=rate)
