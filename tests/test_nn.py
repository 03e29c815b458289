"""MLP: the explicit reverse loop against jax.grad, masking, jit, structure of the trace, errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp import nn
from tests.helpers import assert_close

ACTS = tuple(a for a in jaxbp.ACTIVATIONS if a != "swish")  # swish is silu, an alias
LOSSES = nn.LOSSES
DTYPES = (jnp.float32, jnp.float64)


# One jitted gradient function per model, shared by the tests (a fresh one recompiles).
VG = functools.cache(jaxbp.value_and_grad)
REF = functools.cache(jaxbp.reference.value_and_grad)


def _labels(loss, key, n, c, dtype):
    if loss == "softmax_cross_entropy":
        return jax.random.randint(key, (n,), 0, c, jnp.int32)
    if loss == "sigmoid_binary_cross_entropy":
        return jax.random.uniform(key, (n, c), dtype)  # soft targets in [0, 1]
    return jax.random.normal(key, (n, c), dtype)


def _problem(sizes=(5, 6, 3), n=7, *, activation="tanh", loss="softmax_cross_entropy",
             dtype=jnp.float64, seed=0, **model_kw):  # fmt: skip
    model = nn.MLP(sizes, activation, loss, **model_kw)
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = model.init(kp, dtype)
    x = jax.random.normal(kx, (n, sizes[0]), dtype)
    return model, params, x, _labels(loss, ky, n, sizes[-1], dtype)


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for sub in value if isinstance(value, list | tuple) else (value,):
            if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                yield sub


def _primitives(jaxpr) -> list[str]:
    """Every primitive name in a (closed) jaxpr, recursing into sub-jaxprs (pjit, cond, …)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for sub in _subjaxprs(eqn):
            names += _primitives(sub)
    return names


def _count(jaxpr, name: str) -> int:
    """How many ``name`` ops run: a ``cond`` runs one branch, so it counts its largest."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        counts = [_count(sub, name) for sub in _subjaxprs(eqn)]
        if counts:
            total += max(counts) if eqn.primitive.name == "cond" else sum(counts)
    return total


# ----------------------------------------------------------------------- manual == autodiff


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTS)
def test_manual_gradient_matches_reference_and_custom_vjp_grad(activation, loss):
    problems = [_problem(activation=activation, loss=loss, dtype=dt) for dt in DTYPES]
    model = problems[0][0]
    manual, ref = jaxbp.value_and_grad(model).jitted, jaxbp.reference.value_and_grad(model).jitted

    @jax.jit  # one compile for both dtypes and all three routes
    def routes(args):
        return [
            (manual(p, x, y, None, None), ref(p, x, y, None, None),
             jax.value_and_grad(model.mean_loss)(p, x, y))
            for p, x, y in args
        ]  # fmt: skip

    results = routes([prob[1:] for prob in problems])
    for dtype, (m, r, via_ops) in zip(DTYPES, results, strict=True):
        assert_close(m, r, dtype, name=f"{activation}/{loss}/{dtype.__name__}/manual")
        assert_close(via_ops, r, dtype, name=f"{activation}/{loss}/{dtype.__name__}/custom_vjp")
        assert m[0].dtype == dtype
        assert all(g.dtype == dtype for g in jax.tree.leaves(m[1]))


def test_value_and_grad_validates_then_matches_reference():
    # The public entry point (with its eager input checks), not only the jitted core.
    model, params, x, labels = _problem(activation="relu")
    assert_close(VG(model)(params, x, labels), REF(model)(params, x, labels), jnp.float64)


# ------------------------------------------------------------------------ loss options


@pytest.mark.parametrize(
    "options",
    [
        {"label_smoothing": 0.1},
        {"z_loss": 1e-2},
        {"ignore_index": -100},
        {"label_smoothing": 0.2, "z_loss": 1e-3, "ignore_index": -100},
    ],
    ids=lambda o: ",".join(o),
)
def test_loss_options_with_where_and_class_weights_match_reference(options):
    model, params, x, labels = _problem(loss_options=options)
    if "ignore_index" in options:
        labels = labels.at[jnp.array([1, 4])].set(-100)
    where = jnp.array([True, True, False, True, True, True, False])
    cw = jnp.array([0.5, 2.0, 1.0], jnp.float64)
    manual, ref = jaxbp.value_and_grad(model).jitted, jaxbp.reference.value_and_grad(model).jitted
    cases = [(None, None), (where, None), (None, cw), (where, cw)]

    @jax.jit
    def both(params, x, labels, cases):
        return [(manual(params, x, labels, w, c), ref(params, x, labels, w, c)) for w, c in cases]

    for (w, c), (m, r) in zip(cases, both(params, x, labels, cases), strict=True):
        assert_close(m, r, jnp.float64, name=f"{options} where={w is not None} cw={c is not None}")


def test_probability_labels_match_reference():
    model, params, x, _ = _problem()
    probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(5), (7, 3), jnp.float64))
    assert_close(
        VG(model)(params, x, probs),
        REF(model)(params, x, probs),
        jnp.float64,
    )


# ----------------------------------------------------------------------------- masking


@settings(max_examples=5)  # each new subset size compiles
@given(mask=st.lists(st.booleans(), min_size=6, max_size=6).filter(any))
def test_masked_rows_are_excluded_from_the_mean(mask):
    model, params, x, labels = _problem(n=6, activation="relu")
    where = jnp.array(mask)
    masked = VG(model)(params, x, labels, where=where)
    keep = np.flatnonzero(mask)
    subset = REF(model)(params, x[keep], labels[keep])
    assert_close(masked, subset, jnp.float64)


def test_uneven_shard_masks_give_the_global_mean_over_valid_rows():
    # Four "shards" of 4 rows with 4, 1, 0 and 2 valid rows: the loss is the mean over the
    # 7 valid rows of the whole batch, not a mean of shard means.
    model, params, x, labels = _problem(n=16, activation="leaky_relu")
    where = jnp.array([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1], bool)
    loss, grads = VG(model)(params, x, labels, where=where)
    keep = np.flatnonzero(np.asarray(where))
    per_ex = model.per_example_loss(params, x, labels, ops=jaxbp.reference)
    assert_close(loss, jnp.mean(per_ex[keep]), jnp.float64)
    # The same as summing each shard's masked sum and dividing by the global count,
    # not the mean of the shard means (which would overweight the 1-row shard).
    shard_sums = [
        jnp.sum(jnp.where(where[s : s + 4], per_ex[s : s + 4], 0.0)) for s in (0, 4, 8, 12)
    ]
    assert_close(loss, sum(shard_sums) / 7.0, jnp.float64)
    shard_means = [m / c for m, c in zip(shard_sums, (4, 1, 0, 2), strict=True) if c]
    assert abs(float(loss) - float(sum(shard_means) / len(shard_means))) > 1e-3
    ref = REF(model)(params, x[keep], labels[keep])
    assert_close((loss, grads), ref, jnp.float64)


@pytest.mark.parametrize("how", ["where", "ignore_index"])
def test_every_row_masked_gives_zero_loss_and_zero_gradients(how):
    opts = {"ignore_index": -1} if how == "ignore_index" else {}
    model, params, x, labels = _problem(loss_options=opts)
    x = x * 1e4  # huge logits on masked rows must not leak NaN
    if how == "where":
        loss, grads = VG(model)(params, x, labels, where=jnp.zeros(7, bool))
    else:
        loss, grads = VG(model)(params, x, jnp.full((7,), -1, jnp.int32))
    assert float(loss) == 0.0
    for g in jax.tree.leaves(grads):
        assert np.all(np.asarray(g) == 0.0)


def test_masked_rows_with_huge_inputs_get_exactly_zero_gradient_contribution():
    model, params, x, labels = _problem()
    where = jnp.array([True, False, True, True, True, True, True])
    x_big = x.at[1].set(1e30)
    a = VG(model)(params, x, labels, where=where)
    b = VG(model)(params, x_big, labels, where=where)
    assert_close(b, a, jnp.float64, tol=0.0)


# ------------------------------------------------------------------------- batch sizes


@pytest.mark.parametrize("n", [0, 1, 13])
def test_any_batch_size_and_a_deeper_network(n):
    model, params, x, labels = _problem((6, 8, 7, 4), n, activation="gelu")
    manual = VG(model)(params, x, labels)
    if n == 0:  # empty batch: nothing to average, a step that does nothing
        assert float(manual[0]) == 0.0
        assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(manual[1]))
        return
    assert_close(manual, REF(model)(params, x, labels), jnp.float64)


# ------------------------------------------------------------------------------- jit


def test_repeated_calls_trace_once(monkeypatch):
    # A model of this test alone (compiled steps are cached per model): its first trace
    # counts, with no cache to clear.
    model, params, x, labels = _problem((5, 4, 3), activation="softplus")
    counted = chex.assert_max_traces(nn.forward, n=1)
    monkeypatch.setattr(nn, "forward", counted)
    vg = jaxbp.value_and_grad(model)
    for seed in range(3):
        kx = jax.random.PRNGKey(seed)
        vg(params, jax.random.normal(kx, x.shape, x.dtype), labels)
    chex.clear_trace_counter()


def test_works_under_an_outer_jit_and_grad_structure_matches_params():
    model, params, x, labels = _problem()
    vg = VG(model)
    loss, grads = jax.jit(lambda p, x, y: vg(p, x, y))(params, x, labels)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert_close((loss, grads), vg(params, x, labels), jnp.float64)


def test_out_of_range_label_under_jit_gives_nan_not_a_wrong_number():
    model, params, x, labels = _problem()
    vg = VG(model)
    loss, _ = jax.jit(lambda y: vg(params, x, y))(labels.at[2].set(3))
    assert np.isnan(float(loss))


# --------------------------------------------------------------- what the trace contains


def test_no_autodiff_runs_inside_value_and_grad(monkeypatch):
    # A model of this test alone: its step is traced here, under the patch, from no cache.
    model, params, x, labels = _problem(loss_options={"label_smoothing": 0.0625})

    def forbidden(*args, **kwargs):
        raise AssertionError("autodiff called while tracing the manual gradient")

    for name in ("grad", "vjp", "value_and_grad", "linearize", "jvp"):
        monkeypatch.setattr(jax, name, forbidden)
    loss, grads = jaxbp.value_and_grad(model)(params, x, labels)  # fresh trace: must not raise
    assert np.isfinite(float(loss))
    # The patch does bite: the reference goes through jax.value_and_grad.
    with pytest.raises(AssertionError, match="autodiff"):
        jaxbp.reference.value_and_grad(model)(params, x, labels)


def test_manual_jaxpr_has_no_custom_vjp_call():
    model, params, x, labels = _problem()
    jaxpr = jax.make_jaxpr(jaxbp.value_and_grad(model).jitted)(params, x, labels, None, None)
    prims = _primitives(jaxpr)
    assert "dot_general" in prims  # the walk does see inside the nested jits
    # No custom_vjp dispatch and no linearize/transpose machinery (custom_lin) in the trace.
    assert not [p for p in prims if "custom_vjp" in p or "custom_lin" in p]
    # The ops path does go through custom_vjp: the check can see it.
    ops_prims = _primitives(jax.make_jaxpr(model.mean_loss)(params, x, labels))
    assert any("custom_vjp" in p for p in ops_prims)


@pytest.mark.parametrize("sizes", [(5, 6, 3), (5, 6, 7, 3), (4, 4, 4, 4, 4)])
def test_first_layer_input_gradient_is_skipped(sizes):
    # A naive loop has 3 dots per layer (forward, dW, dx); the first layer's dx is never
    # needed: the loop runs dense.bwd there too and XLA removes the unused δ·wᵀ, so the
    # compiled step holds 3 dots per layer but 2 for the first.
    model, params, x, labels = _problem(sizes)
    jaxpr = jax.make_jaxpr(jaxbp.value_and_grad(model).jitted)(params, x, labels, None, None)
    layers = len(sizes) - 1
    assert _count(jaxpr, "dot_general") == 3 * layers  # as traced: every rule whole
    step = jaxbp.value_and_grad(model).jitted
    hlo = step.lower(params, x, labels, None, None).compile().as_text()
    assert hlo.count(" dot(") == 3 * layers - 1, hlo


# ------------------------------------------------------- rules are read from the op objects


def _wrong_relu_bwd(res, g):
    """Pass the gradient through where the unit was off: a classic mistake."""
    (y,) = res
    return (g * jnp.ones_like(y),)


def test_a_swapped_rule_is_used_by_the_next_build_and_the_cache_stays_correct(monkeypatch):
    model, params, x, labels = _problem(activation="relu")
    right = jaxbp.value_and_grad(model)
    expected = REF(model)(params, x, labels)
    assert_close(right(params, x, labels), expected, jnp.float64)
    monkeypatch.setattr(jaxbp.relu, "bwd", _wrong_relu_bwd)  # no cache to clear
    wrong = jaxbp.value_and_grad(model)
    assert wrong.jitted is not right.jitted  # the rules are part of the step's cache key
    _, bad = wrong(params, x, labels)
    assert not np.allclose(bad[0]["w"], expected[1][0]["w"])
    assert_close(bad[1], expected[1][1], jnp.float64)  # the last layer sees no relu
    monkeypatch.undo()
    again = jaxbp.value_and_grad(model)
    assert again.jitted is right.jitted  # the right rules' compiled step, found again
    assert_close(again(params, x, labels), expected, jnp.float64)


def test_building_the_same_transform_twice_compiles_nothing():
    model, params, x, labels = _problem()
    assert jaxbp.value_and_grad(model).jitted is jaxbp.value_and_grad(model).jitted
    assert hasattr(jaxbp.value_and_grad(model).jitted, "lower")  # a jax.jit function


# ------------------------------------------------------------------------------ optax


def test_grads_feed_optax_adam_and_training_lowers_the_loss():
    model, params, x, labels = _problem(dtype=jnp.float32)
    opt = optax.adam(1e-2)
    vg = VG(model)

    @jax.jit
    def step(params, state):
        loss, grads = vg(params, x, labels)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes floats and int32 counts
            updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    new, state, loss0 = step(params, opt.init(params))
    assert jax.tree.structure(new) == jax.tree.structure(params)
    leaves = zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True)
    assert all(a.dtype == b.dtype and a.shape == b.shape for a, b in leaves)
    assert float(jnp.max(jnp.abs(new[0]["w"] - params[0]["w"]))) > 0
    for _ in range(20):
        new, state, loss = step(new, state)
    assert float(loss) < 0.5 * float(loss0)


# ------------------------------------------------------------------------------ errors


def test_wrong_input_width_is_a_clear_error():
    model, params, x, labels = _problem()
    with pytest.raises(ValueError, match=r"x: expected shape \(n, 5\), got \(7, 4\)"):
        VG(model)(params, x[:, :4], labels)


def test_out_of_range_labels_raise_when_concrete():
    model, params, x, labels = _problem()
    with pytest.raises(ValueError, match=r"labels: expected class ids in \[0, 3\)"):
        VG(model)(params, x, labels.at[0].set(3))
    with pytest.raises(ValueError, match="labels"):
        VG(model)(params, x, labels.at[0].set(-2))


def test_wrong_parameter_shapes_are_clear_errors():
    model, params, x, labels = _problem()
    swapped = [params[0], {"w": params[1]["w"].T, "b": params[1]["b"]}]
    with pytest.raises(ValueError, match=r"params\[1\]: expected w \(6, 3\)"):
        VG(model)(swapped, x, labels)
    with pytest.raises(ValueError, match="params: expected a list of 2 layers, got 1"):
        VG(model)(params[:1], x, labels)


def test_label_and_target_shape_errors():
    model, params, x, labels = _problem()
    with pytest.raises(TypeError, match="labels"):
        VG(model)(params, x, labels.astype(jnp.float64))
    mse, p2, x2, t2 = _problem(loss="mse")
    with pytest.raises(ValueError, match=r"labels: expected shape \(n, c\)"):
        VG(mse)(p2, x2, t2[:, :2])
    with pytest.raises(ValueError, match="where"):
        VG(model)(params, x, labels, where=jnp.ones(6, bool))


def test_bad_model_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="activation"):
        nn.MLP((3, 2), "mish")
    with pytest.raises(ValueError, match="loss"):
        nn.MLP((3, 2), "relu", "hinge")
    with pytest.raises(ValueError, match="sizes"):
        nn.MLP((3,))
    with pytest.raises(ValueError, match="loss_options"):
        nn.MLP((3, 2), "relu", "mse", loss_options={"label_smoothing": 0.1})


# -------------------------------------------------------------------- inputs and options


@pytest.mark.parametrize(
    "vg", [jaxbp.value_and_grad, jaxbp.reference.value_and_grad], ids=["rules", "reference"]
)
def test_value_and_grad_accepts_lists_and_numpy_arrays(vg):
    # As every op does: Python lists and NumPy arrays are arrays. The oracle is the same
    # model on jnp arrays (checked against the reference above).
    model, params, x, labels = _problem(activation="relu")
    want = REF(model)(params, x, labels)
    as_lists = [{"w": np.asarray(p["w"]).tolist(), "b": np.asarray(p["b"]).tolist()}
                for p in params]  # fmt: skip
    as_numpy = [{"w": np.asarray(p["w"]), "b": np.asarray(p["b"])} for p in params]
    got_lists = vg(model)(as_lists, np.asarray(x).tolist(), np.asarray(labels).tolist())
    got_numpy = vg(model)(as_numpy, np.asarray(x), np.asarray(labels))
    assert_close(got_lists, want, jnp.float64)
    assert_close(got_numpy, want, jnp.float64)
    where = [True, False, True, True, True, True, True]
    assert_close(
        vg(model)(as_numpy, np.asarray(x), np.asarray(labels), where=where,
                  class_weights=[1.0, 2.0, 0.5]),
        REF(model)(params, x, labels, where=jnp.array(where),
                   class_weights=jnp.array([1.0, 2.0, 0.5], jnp.float64)),
        jnp.float64,
    )  # fmt: skip


def test_per_example_transforms_accept_lists_and_numpy_arrays():
    model, params, x, labels = _problem(activation="relu")
    as_numpy = [{"w": np.asarray(p["w"]), "b": np.asarray(p["b"])} for p in params]
    want = jaxbp.reference.per_example_grad_norms(model)(params, x, labels)
    got = jaxbp.per_example_grad_norms(model)(as_numpy, np.asarray(x).tolist(), labels.tolist())
    assert_close(got, want, jnp.float64)
    clipped = jaxbp.clipped_grad(model, l2_clip=1e9)(as_numpy, np.asarray(x), np.asarray(labels))
    assert_close(clipped[0], REF(model)(params, x, labels)[1], jnp.float64)


def test_a_typo_in_loss_options_fails_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"loss_options: unknown option 'label_smothing'") as e:
        nn.MLP((4, 3), loss_options={"label_smothing": 0.1})
    for valid in ("ignore_index", "label_smoothing", "z_loss"):
        assert valid in str(e.value)
    with pytest.raises(ValueError, match="activation_options: unknown option 'slope'"):
        nn.MLP((4, 3), "leaky_relu", activation_options={"slope": 0.1})
    with pytest.raises(ValueError, match="label_smoothing"):
        nn.MLP((4, 3), loss_options={"label_smoothing": 1.5})
    nn.MLP((4, 3), "gelu", activation_options={"approximate": False},
           loss_options={"label_smoothing": 0.1, "z_loss": 1e-4, "ignore_index": -1})  # fmt: skip


@pytest.mark.parametrize(
    "activation, options",
    [("leaky_relu", {"negative_slope": 0.5}), ("gelu", {"approximate": False})],
)
def test_activation_options_reach_the_backward_rule(activation, options):
    """The reverse loop passes ``activation_options`` to the activation's bwd (its default
    slope 0.01 / tanh gelu would otherwise differentiate another network)."""
    model = nn.MLP((3, 4, 2), activation, loss="mse", activation_options=options)
    params = model.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (5, 2), jnp.float64)
    act = {"leaky_relu": jax.nn.leaky_relu, "gelu": jax.nn.gelu}[activation]

    def plain(p):  # jax.nn's own activation, the options spelled as jax.nn takes them
        h = act(x @ p[0]["w"] + p[0]["b"], *options.values())
        return jnp.mean(jnp.mean((h @ p[1]["w"] + p[1]["b"] - y) ** 2, axis=-1))

    _, grads = jaxbp.value_and_grad(model)(params, x, y)
    assert_close(grads, jax.grad(plain)(params), tol=1e-12)
