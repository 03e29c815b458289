"""jaxbp train: the bundled digits, a jitted scan per epoch, accuracy, the --check curves."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp import datasets, train
from tests.helpers import assert_close


def test_digits_are_bundled_scaled_and_split_reproducibly():
    split = jaxbp.load_digits()
    assert split.x_train.shape == (1438, 64) and split.x_test.shape == (359, 64)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int32
    assert split.x_train.min() == 0.0 and split.x_train.max() == 1.0
    assert set(np.unique(split.y_test)) == set(range(10)) and split.num_classes == 10
    again = datasets.load_digits()
    np.testing.assert_array_equal(split.x_test, again.x_test)
    other = datasets.load_digits(seed=1)
    assert not np.array_equal(split.y_test, other.y_test)
    # The split is a partition of the 1797 digits (class counts of the UCI/scikit-learn set).
    labels = np.concatenate([split.y_train, split.y_test])
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.load_digits(test_fraction=1.0)


def test_short_run_lowers_the_loss_and_reports_per_epoch():
    r = train.train((64, 16, 10), epochs=3, batch_size=128, lr=1e-2)
    assert len(r.losses) == 3 and len(r.test_accuracy) == 3
    assert len(r.step_losses) == 3 * (1438 // 128)
    assert r.losses[-1] < r.losses[0] < 2.5
    assert 0.5 < r.accuracy <= 1.0
    assert r.config["sizes"] == (64, 16, 10)
    d = r.to_dict()
    assert d["accuracy"] == r.accuracy and "params" not in d


def test_held_out_loss_per_epoch_is_optax_cross_entropy_of_the_trained_model():
    r = train.train((64, 16, 10), epochs=2, batch_size=128, lr=1e-2, check=True)
    assert len(r.test_losses) == 2 and len(r.check["reference_test_losses"]) == 2
    split = datasets.load_digits()
    logits = jaxbp.MLP((64, 16, 10)).apply(r.params, jnp.asarray(split.x_test, jnp.float32))
    expected = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.asarray(split.y_test, jnp.int32)
    ).mean()
    assert r.test_losses[-1] == pytest.approx(float(expected), rel=1e-5)
    assert r.to_dict()["test_losses"] == list(r.test_losses)


def test_check_trains_with_jax_grad_and_the_curves_agree():
    r = train.train((64, 16, 10), epochs=2, batch_size=128, lr=1e-2, check=True)
    c = r.check
    assert c["passed"] and c["max_rel_difference"] <= train.CHECK_TOLERANCE
    assert len(c["reference_step_losses"]) == len(r.step_losses)


def test_grad_fn_hook_gives_manual_or_reference_gradients():
    model = jaxbp.MLP((64, 8, 10))
    params = model.init(jax.random.PRNGKey(0), jnp.float32)
    split = jaxbp.load_digits()
    x, y = jnp.asarray(split.x_train[:32]), jnp.asarray(split.y_train[:32])
    key = jax.random.PRNGKey(1)
    manual = train._grad_fn(model, types.SimpleNamespace())(params, x, y, key)
    ref = train._grad_fn(model, types.SimpleNamespace(reference=True))(params, x, y, key)
    assert_close(manual, ref, jnp.float32)


def test_an_epoch_is_one_jitted_scan_over_minibatches():
    model = jaxbp.MLP((64, 8, 10))
    opt = train._optimizer("adam", 1e-3)
    epoch = train._epoch_fn(model, opt, train._grad_fn(model, types.SimpleNamespace()), steps=4)
    params = model.init(jax.random.PRNGKey(0), jnp.float32)
    x, y = jnp.zeros((40, 64), jnp.float32), jnp.zeros((40,), jnp.int32)
    args = (params, opt.init(params), 0, x, y, jax.random.PRNGKey(0))
    jaxpr = jax.make_jaxpr(epoch)(*args)
    inner = jaxpr.jaxpr.eqns[0].params["jaxpr"].jaxpr  # the jit
    assert "scan" in [e.primitive.name for e in inner.eqns]
    _, _, losses, runs, (applied, grads_ok, params_ok) = epoch(*args)
    assert losses.shape == runs.shape == applied.shape == (4,)
    assert grads_ok.shape == params_ok.shape == (4, 4)  # a flag per leaf: 2 layers, w and b


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="sizes"):
        train.train((32, 10), epochs=1)
    with pytest.raises(ValueError, match="optimizer"):
        train.train((64, 10), epochs=1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="batch_size"):
        train.train((64, 10), epochs=1, batch_size=5000)


def test_defaults_reach_97_percent_held_out_accuracy():
    r = train.train()
    assert r.config["sizes"] == (64, 128, 10) and len(r.losses) == 30
    assert r.accuracy >= 0.97
