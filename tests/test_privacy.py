"""DP-SGD training of the GPT and the MLP (jaxbp/privacy.py): Poisson sampling as the
accountant assumes it, the accountant against a closed form, the step against the vmap(grad)
reference, and ``jaxbp train [--model gpt] --dp-clip``.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

import jaxbp
from jaxbp import privacy
from jaxbp.train_gpt import GPT_DEFAULTS
from tests.helpers import assert_close

pytest.importorskip("dp_accounting")


def test_poisson_windows_include_each_window_at_the_rate_and_never_twice():
    data = np.arange(60, dtype=np.int32)  # 60 − 4 = 56 windows of 5 ids
    rng = np.random.default_rng(0)
    rate, context, steps = 0.2, 4, 400
    x, y, where, sizes = privacy.poisson_windows(data, rng, rate, context, steps)
    assert x.shape == y.shape == where.shape and x.shape[1] % 8 == 0
    assert x.shape[1] >= max(sizes) and x.shape[:1] == (steps,)
    counts = np.zeros(56)
    for k, m in enumerate(sizes):
        assert np.all(where[k, :m]) and not np.any(where[k, m:])  # the rows that count first
        starts = x[k, :m, 0]
        assert len(set(starts.tolist())) == m  # without replacement within a step
        np.testing.assert_array_equal(y[k, :m], x[k, :m] + 1)  # the next ids
        counts[starts] += 1
    # each window joined ~ Bin(400, 0.2) steps: mean 80, sd 8 (all 56 within 5 sd)
    assert np.all(np.abs(counts - rate * steps) < 5 * math.sqrt(steps * rate * (1 - rate)))
    assert abs(np.mean(sizes) - rate * 56) < 0.5  # E[m] = q·N = 11.2


def test_the_accountant_without_subsampling_matches_the_analytic_gaussian_mechanism():
    """q = 1: T Gaussian steps of noise σ are one Gaussian mechanism of noise σ/√T, whose
    exact (ε, δ) curve is Balle & Wang's (2018): δ = Φ(1/(2s) − εs) − e^ε Φ(−1/(2s) − εs)."""
    sigma, steps, delta = 3.0, 16, 1e-5
    eps = privacy.epsilon(1.0, sigma, steps, delta)
    s = sigma / math.sqrt(steps)
    exact = norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps) * norm.cdf(-1 / (2 * s) - eps * s)
    assert exact == pytest.approx(delta, rel=0.05)  # the PLD's discretisation: a few percent
    assert (
        privacy.epsilon(1.0, sigma, steps, delta * 10)
        < eps
        < privacy.epsilon(1.0, sigma, steps, delta / 10)
    )


def test_subsampling_and_more_noise_spend_less_and_no_noise_spends_everything():
    e = privacy.epsilon(0.01, 1.0, 1000, 1e-6)
    assert privacy.epsilon(0.001, 1.0, 1000, 1e-6) < e
    assert privacy.epsilon(0.01, 2.0, 1000, 1e-6) < e
    assert privacy.epsilon(0.01, 1.0, 2000, 1e-6) > e
    assert privacy.epsilon(0.01, 0.0, 10, 1e-6) == math.inf
    assert privacy.epsilon(0.01, 1.0, 0, 1e-6) == 0.0


def test_the_dp_step_is_the_clipped_noised_sum_over_the_expected_batch_size():
    model = jaxbp.GPT(vocab=65, d=8, heads=2, layers=1, context=6)
    params = model.init(jax.random.PRNGKey(0), jnp.float64)
    text = jaxbp.load_shakespeare()
    cfg = {**GPT_DEFAULTS, "context": 6, "batch_size": 4, "dp_clip": 0.5, "noise": 1.2}
    dp = privacy.dp_setting(model, cfg, text)
    x, y, where, sizes = privacy.poisson_windows(text.train, np.random.default_rng(1),
                                                 3e-6, 6, 1)  # fmt: skip
    x, y, where = jnp.asarray(x[0]), jnp.asarray(y[0]), jnp.asarray(where[0])
    key = jax.random.PRNGKey(7)
    loss, grads = dp["step"](params, x, y, where, key)
    ref = jaxbp.reference.clipped_grad(model, l2_clip=0.5, noise_multiplier=1.2, batch_size=4,
                                       return_loss=True)  # fmt: skip
    want_loss, want, _ = ref(params, x, y, key=key, where=where)
    assert_close((loss, grads), (want_loss, want), jnp.float64)
    assert dp["rate"] == pytest.approx(4 / (text.train.size - 6))
    assert dp["delta"] == 10.0 ** math.floor(math.log10(1 / (text.train.size - 6)))


def test_jaxbp_train_gpt_with_dp_reports_the_privacy_spent(tmp_path, capsys):
    from jaxbp import cli

    out = tmp_path / "run.json"
    argv = ["train", "--model", "gpt", "--d", "8", "--heads", "2", "--layers", "1",
            "--context", "8", "--steps", "4", "--log-every", "2", "--batch-size", "4",
            "--sample-chars", "0", "--dp-clip", "1.0", "--noise", "1.1", "--delta", "1e-5",
            "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "(ε, δ) = (" in text and "Poisson sampling" in text
    record = json.loads(out.read_text())["config"]["privacy"]
    windows = jaxbp.load_shakespeare().train.size - 8
    assert record["windows"] == windows and record["delta"] == 1e-5
    assert record["epsilon"] == pytest.approx(privacy.epsilon(4 / windows, 1.1, 4, 1e-5))


@pytest.mark.parametrize(("extra", "message"), [
    (["--noise", "1.0"], "needs --dp-clip"),
    (["--delta", "1e-6"], "--delta: only with --dp-clip"),
    (["--dp-clip", "1", "--delta", "2"], "delta: expected a number in"),
    (["--dp-clip", "1", "--mesh", "data=2"], "one device"),
])  # fmt: skip
def test_bad_dp_options_are_usage_errors_before_any_work(extra, message, capsys):
    from jaxbp import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", "gpt", "--steps", "1", *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ the digits MLP


def _mlp_args(**kw):
    from jaxbp.train import DEFAULTS, _Args

    cfg = {**DEFAULTS, "sizes": (64, 8, 10), "batch_size": 128, "dp_clip": 1.0, "noise": 1.1,
           "reference": False, **kw}  # fmt: skip
    return _Args(**cfg)


def test_mlp_dp_epoch_draws_poisson_batches_over_the_whole_training_set():
    # A stand-in gradient whose "loss" is what the step saw: the batch size Σ where, or
    # whether example 0 was in it. Each of the 1438 images joins a step with q = B/N.
    from jaxbp.train import _epoch_fn

    model = jaxbp.MLP((64, 8, 10))
    params = model.init(jax.random.PRNGKey(0))
    x, labels = jnp.zeros((1438, 64)), jnp.zeros((1438,), jnp.int32)
    rate, steps = 128 / 1438, 11
    opt = __import__("optax").sgd(0.0)

    def run(stat):
        def grad_fn(params, xb, lb, key, where):
            assert xb.shape == (1438, 64) and where.shape == (1438,)  # nothing dropped
            return stat(where).astype(jnp.float32), jax.tree.map(jnp.zeros_like, params)

        epoch = _epoch_fn(model, opt, grad_fn, steps, 3, rate)
        return np.concatenate([
            np.asarray(epoch(params, opt.init(params), 0, x, labels, jax.random.PRNGKey(e))[2])
            for e in range(40)
        ])  # fmt: skip

    sizes = run(jnp.sum)  # 440 steps: Bin(1438, q) each, mean 128, sd ≈ 10.8
    assert abs(sizes.mean() - 128) < 5 * math.sqrt(1438 * rate * (1 - rate) / sizes.size)
    assert abs(sizes.std() - math.sqrt(1438 * rate * (1 - rate))) < 2.5  # it varies
    first = run(lambda w: w[0])  # example 0 joins each step independently with q
    assert abs(first.mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / first.size)


def test_mlp_dp_step_is_the_clipped_noised_sum_over_the_expected_batch_size():
    from jaxbp.train import _grad_fn

    model = jaxbp.MLP((64, 8, 10))
    params = model.init(jax.random.PRNGKey(0), jnp.float64)
    split = jaxbp.load_digits()
    x, labels = jnp.asarray(split.x_train, jnp.float64), jnp.asarray(split.y_train)
    where = jax.random.bernoulli(jax.random.PRNGKey(3), 128 / 1438, (1438,))
    key = jax.random.PRNGKey(7)
    loss, grads = _grad_fn(model, _mlp_args())(params, x, labels, key, where)
    ref = jaxbp.reference.clipped_grad(model, l2_clip=1.0, noise_multiplier=1.1,
                                       batch_size=128, return_loss=True)  # fmt: skip
    want_loss, want, _ = ref(params, x[where], labels[where], key=key)  # only the batch
    assert_close((loss, grads), (want_loss, want), jnp.float64)


@pytest.mark.parametrize(("extra", "message"), [
    (["--delta", "1e-6"], "--delta: only with --dp-clip"),
    (["--dp-clip", "1", "--delta", "2"], "delta: expected a number in"),
    (["--noise", "1.0"], "needs --dp-clip"),
])  # fmt: skip
def test_bad_mlp_dp_options_are_usage_errors_before_any_work(extra, message, capsys):
    from jaxbp import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--epochs", "1", *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_mlp_dp_delta_sets_the_reported_delta(tmp_path):
    from jaxbp import cli

    out = tmp_path / "run.json"
    argv = ["train", "--sizes", "64,8,10", "--epochs", "1", "--batch-size", "256", "--dp-clip",
            "1.0", "--noise", "2.0", "--delta", "1e-6", "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads(out.read_text())["config"]["privacy"]
    assert record["delta"] == 1e-6
    steps = 1438 // 256
    assert record["epsilon"] == pytest.approx(privacy.epsilon(256 / 1438, 2.0, steps, 1e-6))
    # a smaller δ costs more ε for the same run
    assert record["epsilon"] > privacy.epsilon(256 / 1438, 2.0, steps, 1e-4)


def test_jaxbp_train_mlp_with_dp_reports_the_privacy_spent(tmp_path, capsys):
    from jaxbp import cli

    out = tmp_path / "run.json"
    argv = ["train", "--sizes", "64,8,10", "--epochs", "2", "--batch-size", "128",
            "--dp-clip", "1.0", "--noise", "1.1", "--check", "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0  # --check: the vmap(grad) reference on the same batches agrees
    text = capsys.readouterr().out
    assert "(ε, δ) = (" in text and "Poisson sampling q = 0.089 (1,438 examples)" in text
    record = json.loads(out.read_text())["config"]["privacy"]
    assert record["examples"] == 1438 and record["delta"] == 1e-4
    assert record["sampling_rate"] == 128 / 1438 and record["expected_batch"] == 128
    steps = 2 * (1438 // 128)  # 11 steps an epoch
    assert record["epsilon"] == pytest.approx(privacy.epsilon(128 / 1438, 1.1, steps, 1e-4))
