"""Non-finite training steps: not applied (the optimizer state untouched), counted, reported
in the progress line and the JSON; K in a row stop the run naming the step and the first
non-finite leaf, the last good checkpoint left in place. Injected NaN data and a learning
rate that diverges, for the MLP and the GPT."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp import train, train_gpt
from jaxbp._nonfinite import guarded_update, leaf_paths, nonfinite_outcome
from jaxbp.cli import main


def _tree():
    params = {"b": jnp.array([0.5, -1.0], jnp.float32), "w": jnp.ones((2, 3), jnp.float32)}
    grads = {"b": jnp.array([0.1, 0.2], jnp.float32), "w": jnp.full((2, 3), 0.3, jnp.float32)}
    return params, grads


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_finite_step_is_optax_own_update():
    opt = optax.adam(1e-2)
    params, grads = _tree()
    state = opt.init(params)
    new, new_state, run, (ok, grads_ok, params_ok) = guarded_update(
        opt, params, state, jnp.int32(2), jnp.float32(1.0), grads, 3
    )
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32
        updates, want_state = opt.update(grads, state, params)
    _same(new, optax.apply_updates(params, updates))
    _same(new_state, want_state)
    assert bool(ok) and int(run) == 0  # a finite step ends a run of skipped ones
    assert grads_ok.tolist() == params_ok.tolist() == [True, True]


@pytest.mark.parametrize(
    ("loss", "bad_leaf", "limit_reached", "grads_ok"),
    [
        (np.nan, "w", False, [True, False]),
        (1.0, "b", False, [False, True]),
        (np.inf, None, False, [True, True]),  # the loss alone
        (1.0, None, True, [True, True]),  # finite, but K in a row were already skipped
    ],
)
def test_a_nonfinite_step_leaves_parameters_and_optimizer_state_untouched(
    loss, bad_leaf, limit_reached, grads_ok
):
    opt = optax.adam(1e-2)
    params, grads = _tree()
    if bad_leaf is not None:
        grads[bad_leaf] = grads[bad_leaf].at[0].set(jnp.nan)
    state = opt.init(params)
    run = jnp.int32(3 if limit_reached else 1)
    new, new_state, new_run, (ok, g_ok, _) = guarded_update(
        opt, params, state, run, jnp.float32(loss), grads, 3
    )
    _same(new, params)
    _same(new_state, state)  # Adam's count and moments did not move
    assert not bool(ok) and int(new_run) == int(run) + 1
    assert g_ok.tolist() == grads_ok


def test_nonfinite_outcome_names_the_step_that_made_k_in_a_row_and_its_first_leaf():
    ok = np.array([True, False, False, False, True])
    runs = np.array([0, 1, 2, 3, 4])
    grads_ok = np.ones((5, 3), bool)
    grads_ok[3, 1:] = False
    flags = (ok, grads_ok, np.ones((5, 3), bool))
    losses = np.array([1.0, np.nan, np.nan, np.nan, np.nan])
    paths = ["['a']", "['b']", "['c']"]
    skipped, stop = nonfinite_outcome(10, flags, runs, 3, paths, losses)
    assert skipped == [12, 13, 14]  # 1-based, after the 10 steps before this scan
    step, leaf, message = stop
    assert (step, leaf) == (14, "['b']")
    assert "step 14: 3 non-finite steps in a row (steps 12-14" in message
    assert "the gradient of params['b']" in message
    assert nonfinite_outcome(0, flags, np.array([0, 1, 2, 0, 0]), 3, paths, losses)[1] is None


def _digits_with_nan(rows):
    clean = jaxbp.load_digits()
    x = clean.x_train.copy()
    x[rows] = np.nan
    return lambda *a, **k: dataclasses.replace(clean, x_train=x)


MLP_ARGS = ["--sizes", "64,16,10", "--batch-size", "256", "--lr", "0.01"]


def test_a_nan_example_skips_its_steps_and_the_run_reports_them(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train, "load_digits", _digits_with_nan([5]))
    out = tmp_path / "r.json"
    assert main(["train", *MLP_ARGS, "--epochs", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    losses = data["step_losses"]
    steps = 1438 // 256
    nan_steps = [k + 1 for k, v in enumerate(losses) if v is None]  # JSON: null
    assert data["skipped_steps"] == nan_steps and data["nonfinite_steps"] == len(nan_steps)
    assert 1 <= len(nan_steps) <= 4  # the example is in at most one batch an epoch
    assert len({(k - 1) // steps for k in nan_steps}) == len(nan_steps)
    assert all(np.isfinite(v) for v in losses if v is not None)
    assert f"skipped {len(nan_steps)} non-finite steps" in text
    assert f"{len(nan_steps)} non-finite steps skipped (steps {nan_steps[0]}" in text
    assert data["accuracy"] > 0.5  # the other steps trained


def _first_nonfinite_leaf(model, params, x, y):
    """The oracle: the first non-finite leaf, in JAX's own flattening order, of the
    hand-written gradient computed outside the training loop. (Not ``jax.grad`` of the plain
    twin: ``jax.nn.relu``'s derivative at NaN is 0, so its ``[0]['b']`` comes out finite,
    where jaxbp propagates the NaN, docs/edge_cases.md.)"""
    _, grads = jaxbp.value_and_grad(model)(params, x, y)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        if not np.isfinite(np.asarray(g)).all():
            return jax.tree_util.keystr(path)
    raise AssertionError("every gradient is finite")


@pytest.mark.parametrize("limit", [3, 1])
def test_nan_data_stops_after_k_in_a_row_leaving_the_last_good_checkpoint(
    limit, monkeypatch, tmp_path, capsys
):
    pytest.importorskip("orbax.checkpoint")
    ck = tmp_path / "ck"
    good = train.train((64, 16, 10), epochs=2, batch_size=256, lr=1e-2, checkpoint_dir=str(ck))
    monkeypatch.setattr(train, "load_digits", _digits_with_nan(slice(None)))
    out = tmp_path / "r.json"
    argv = ["train", *MLP_ARGS, "--epochs", "4", "--checkpoint-dir", str(ck), "--resume",
            "--json", str(out), "--max-nonfinite", str(limit)]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    steps = 1438 // 256
    stop = 2 * steps + limit  # the first epoch after the checkpoint, its limit-th step
    model = jaxbp.MLP((64, 16, 10))
    x = jnp.full((4, 64), jnp.nan, jnp.float32)
    leaf = _first_nonfinite_leaf(model, good.params, x, jnp.zeros(4, jnp.int32))
    assert f"error: step {stop}: {limit} non-finite steps in a row" in err
    assert f"the first non-finite leaf is the gradient of params{leaf}" in err
    assert f"the last checkpoint, epoch 2, is in {ck}" in err and "Traceback" not in err
    data = json.loads(out.read_text())
    assert data["step"] == stop and data["leaf"] == leaf and "error" in data
    assert data["skipped_steps"] == list(range(2 * steps + 1, stop + 1))
    # The last good checkpoint is in place and holds the good run's parameters.
    assert sorted(p.name for p in ck.iterdir()) == ["1", "2"]
    _, state, meta = jaxbp.checkpoint.restore(
        str(ck), {"params": good.params, "opt_state": train._optimizer("adam", 1e-2).init(
            good.params), "key": jax.random.PRNGKey(0)}
    )  # fmt: skip
    assert meta["done"] == 2
    _same(state["params"], good.params)


def test_a_diverging_learning_rate_stops_the_mlp_with_a_clear_error():
    with pytest.raises(train.NonFiniteError, match=r"3 non-finite steps in a row") as e:
        train.train((64, 16, 10), epochs=2, batch_size=256, lr=1e30, optimizer="sgd")
    params = jaxbp.MLP((64, 16, 10)).init(jax.random.PRNGKey(0), jnp.float32)
    assert e.value.leaf in leaf_paths(params) and f"step {e.value.step}:" in str(e.value)
    assert e.value.step >= 3


def test_a_diverging_learning_rate_stops_the_gpt_with_a_clear_error(capsys, tmp_path):
    tiny = ["--d", "16", "--heads", "2", "--layers", "1", "--context", "8", "--batch-size", "4",
            "--eval-batches", "1", "--steps", "40", "--log-every", "10", "--sample-chars", "0",
            "--warmup", "0"]  # fmt: skip
    out = tmp_path / "r.json"
    assert main(["train", "--model", "gpt", *tiny, "--lr", "1e4", "--json", str(out)]) == 1
    err = capsys.readouterr().err
    data = json.loads(out.read_text())
    model = train_gpt.check_config({**train_gpt.GPT_DEFAULTS, "d": 16, "heads": 2,
                                    "layers": 1, "context": 8})  # fmt: skip
    assert data["leaf"] in leaf_paths(model.init(jax.random.PRNGKey(0)))
    assert f"error: step {data['step']}: 3 non-finite steps in a row" in err
    assert data["skipped_steps"][-3:] == [data["step"] - 2, data["step"] - 1, data["step"]]
    assert len(data["step_losses"]) == data["step"]
    assert all(v is None for v in data["step_losses"][-3:])
