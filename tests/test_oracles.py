"""Oracles that are not jaxbp's own code: optax's losses, ``jax.nn``, and numbers by hand.

Both implementations are checked — the hand-written rules (``jaxbp.op``) and the plain-jnp
reference (``jaxbp.reference.op``) — so a shared mistake in both cannot pass. Values and
gradients, in float64, for every option optax (or ``jax.nn``) also defines:

* integer labels: ``optax.softmax_cross_entropy_with_integer_labels``;
* probability labels: ``optax.softmax_cross_entropy`` (gradients w.r.t. logits and labels);
* label smoothing: ``optax.smooth_labels`` then ``optax.softmax_cross_entropy``;
* class weights: ``optax.softmax_cross_entropy`` of the weighted labels ``w ⊙ y'``;
* z-loss: optax's loss plus ``λ·jax.nn.logsumexp(z)²``;
* ``where`` / ``ignore_index`` (row masks; optax's own ``where=`` masks classes, another
  meaning): optax's loss zeroed on masked rows;
* ``optax.sigmoid_binary_cross_entropy``, ``optax.squared_error`` (mean over the last axis),
  ``jax.nn.softmax``/``log_softmax`` and the ``jax.nn`` activations.

The hand-computed cases use ``z = [1, 2, 3]``, whose log-sum-exp is

    lse = log(e¹ + e² + e³) = 3 + log(1 + e⁻¹ + e⁻²) = 3 + log(1.5032147244080551)
        = 3.40760596444438
    p   = exp(z − lse) = [0.09003057317038048, 0.2447284710547977, 0.665240955774822]
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp
from tests.helpers import assert_close

IMPLS = (jaxbp, jaxbp.reference)
IDS = ("rules", "reference")

LSE = 3.40760596444438  # log(e + e² + e³), see the module docstring
P = np.array([0.09003057317038048, 0.2447284710547977, 0.665240955774822])
Z = jnp.array([[1.0, 2.0, 3.0]], jnp.float64)


def _close(actual, expected, tol=1e-12, name="value"):
    if isinstance(expected, list):  # a hand-written number list: one array
        expected = np.asarray(expected, np.float64)
    assert_close(actual, expected, tol=tol, name=name)


def _ce_value_and_grad(impl, z, labels, **options):
    """``(loss (n,), ∂Σ g·loss/∂z)`` for the cotangent ``g = 1, 2, 3, …``."""
    g = jnp.arange(1.0, z.shape[0] + 1.0, dtype=z.dtype)

    def f(z):
        return impl.softmax_cross_entropy(z, labels, **options)

    loss, vjp = jax.vjp(f, z)
    return loss, vjp(g)[0]


def _optax_value_and_grad(fn, z):
    g = jnp.arange(1.0, z.shape[0] + 1.0, dtype=z.dtype)
    loss, vjp = jax.vjp(fn, z)
    return loss, vjp(g)[0]


# ------------------------------------------------------------------- numbers by hand


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_ce_by_hand_integer_label(impl):
    # label 2: loss = lse − z₂ = 3.40760596444438 − 3; gradient p − onehot(2)
    loss, grad = _ce_value_and_grad(impl, Z, jnp.array([2]))
    _close(loss, [0.40760596444437994])
    _close(grad, [P - [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_ce_by_hand_label_smoothing_spreads_eps_over_c(impl):
    # ε = 0.3, c = 3, label 0: y' = (1 − ε)·onehot + ε/c = [0.7 + 0.1, 0.1, 0.1]
    # loss = Σ y'(lse − z) = lse − (0.8·1 + 0.1·2 + 0.1·3) = lse − 1.3
    # gradient = p·Σy' − y' = p − [0.8, 0.1, 0.1]
    loss, grad = _ce_value_and_grad(impl, Z, jnp.array([0]), label_smoothing=0.3)
    _close(loss, [LSE - 1.3])
    _close(grad, [P - [0.8, 0.1, 0.1]])


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_ce_by_hand_label_smoothing_of_probability_labels(impl):
    # y = [0.2, 0.3, 0.5], ε = 0.6: y' = 0.4·y + 0.2 = [0.28, 0.32, 0.4]
    # loss = lse − (0.28 + 0.64 + 1.2) = lse − 2.12
    y = jnp.array([[0.2, 0.3, 0.5]], jnp.float64)
    loss, grad = _ce_value_and_grad(impl, Z, y, label_smoothing=0.6)
    _close(loss, [LSE - 2.12])
    _close(grad, [P - [0.28, 0.32, 0.4]])


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_ce_by_hand_class_weights(impl):
    # w = [2, 0.5, 1]; label 0: u = w ⊙ onehot = [2, 0, 0]: loss = 2·(lse − 1)
    # gradient = p·Σu − u = 2p − [2, 0, 0]
    w = jnp.array([2.0, 0.5, 1.0], jnp.float64)
    loss, grad = _ce_value_and_grad(impl, Z, jnp.array([0]), class_weights=w)
    _close(loss, [2.0 * (LSE - 1.0)])
    _close(grad, [2.0 * P - [2.0, 0.0, 0.0]])
    # with ε = 0.3 as well: u = w ⊙ [0.8, 0.1, 0.1] = [1.6, 0.05, 0.1], Σu = 1.75
    # loss = 1.75·lse − (1.6 + 0.1 + 0.3) = 1.75·lse − 2
    loss, grad = _ce_value_and_grad(impl, Z, jnp.array([0]), class_weights=w, label_smoothing=0.3)
    _close(loss, [1.75 * LSE - 2.0])
    _close(grad, [1.75 * P - [1.6, 0.05, 0.1]])


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_ce_by_hand_z_loss(impl):
    # λ = 0.01, label 2: loss = (lse − 3) + λ·lse² = 0.40760596444438 + 0.01·11.611778408916914
    # gradient = p·(1 + 2λ·lse) − onehot(2)
    loss, grad = _ce_value_and_grad(impl, Z, jnp.array([2]), z_loss=0.01)
    _close(loss, [0.5237237485335497])
    _close(grad, [P * (1.0 + 0.02 * LSE) - [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_ce_by_hand_ignore_index_and_where_rows_are_zero(impl):
    # Row 0: label 2 (loss lse − 3, cotangent 1); row 1 ignored / masked: loss 0, gradient 0
    # even with an infinite logit there.
    z = jnp.array([[1.0, 2.0, 3.0], [jnp.inf, 0.0, 0.0]], jnp.float64)
    loss, grad = _ce_value_and_grad(impl, z, jnp.array([2, -100]), ignore_index=-100)
    _close(loss, [0.40760596444437994, 0.0])
    _close(grad, [P - [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    where = jnp.array([True, False])
    loss, grad = _ce_value_and_grad(impl, z, jnp.array([2, 1]), where=where)
    _close(loss, [0.40760596444437994, 0.0])
    _close(grad, [P - [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_ce_by_hand_probability_labels(impl):
    # y = [0.2, 0.3, 0.5]: loss = lse − (0.2 + 0.6 + 1.5) = lse − 2.3; gradient p − y
    y = jnp.array([[0.2, 0.3, 0.5]], jnp.float64)
    loss, grad = _ce_value_and_grad(impl, Z, y)
    _close(loss, [LSE - 2.3])
    _close(grad, [P - [0.2, 0.3, 0.5]])


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_fused_ce_by_hand(impl):
    # x = [1, 0], w = [[1, 2, 3], [0, 0, 0]]: logits z = [1, 2, 3] again.
    # ε = 0.3, label 0: lse − 1.3 (as above); ∂/∂x = (p − y')·wᵀ = [(p − y')·[1, 2, 3], 0]
    x = jnp.array([[1.0, 0.0]], jnp.float64)
    w = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], jnp.float64)

    def f(x):
        return impl.linear_softmax_cross_entropy(x, w, jnp.array([0]), label_smoothing=0.3)

    loss, vjp = jax.vjp(f, x)
    _close(loss, [LSE - 1.3])
    dz = P - [0.8, 0.1, 0.1]
    _close(vjp(jnp.ones(1, jnp.float64))[0], [[dz @ [1.0, 2.0, 3.0], 0.0]])


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_sigmoid_bce_by_hand(impl):
    # loss = softplus(z) − y·z; softplus(0) = log 2, softplus(2) = log(1 + e²) = 2.12692801…,
    # softplus(−1) = log(1 + e⁻¹) = 0.31326168…; gradient σ(z) − y, σ(2) = 0.88079707…
    z = jnp.array([0.0, 2.0, -1.0], jnp.float64)
    y = jnp.array([1.0, 0.0, 0.25], jnp.float64)
    loss, vjp = jax.vjp(lambda z: impl.sigmoid_binary_cross_entropy(z, y), z)
    _close(loss, [0.6931471805599453, 2.1269280110429727, 0.31326168751822286 + 0.25])
    _close(
        vjp(jnp.ones(3, jnp.float64))[0],
        [0.5 - 1.0, 0.8807970779778823, 0.2689414213699951 - 0.25],
    )


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_mse_by_hand(impl):
    # pred [1, 2, 3], target [0, 2, 5]: mean([1, 0, 4]) = 5/3; gradient 2(pred − t)/c
    pred = jnp.array([[1.0, 2.0, 3.0]], jnp.float64)
    target = jnp.array([[0.0, 2.0, 5.0]], jnp.float64)
    loss, vjp = jax.vjp(lambda p: impl.mse(p, target), pred)
    _close(loss, [5.0 / 3.0])
    _close(vjp(jnp.ones(1, jnp.float64))[0], [[2.0 / 3.0, 0.0, -4.0 / 3.0]])


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_softmax_and_log_softmax_by_hand(impl):
    _close(impl.softmax(Z), [P])
    _close(impl.log_softmax(Z), [[1.0 - LSE, 2.0 - LSE, 3.0 - LSE]])


# ------------------------------------------------------------------------------ optax

N, C = 5, 4
_k1, _k2, _k3 = jax.random.split(jax.random.PRNGKey(42), 3)
LOGITS = 3.0 * jax.random.normal(_k1, (N, C), jnp.float64)
IDS_ = jnp.array([0, 3, 1, 2, 3])
PROBS = jax.nn.softmax(jax.random.normal(_k2, (N, C), jnp.float64))
WEIGHTS = jnp.array([0.5, 2.0, 1.0, 1.5], jnp.float64)
ROWS = jnp.array([True, False, True, True, False])


def _optax_ce(z, y, *, eps=0.0, weights=None, z_loss=0.0, rows=None):
    """Softmax CE built from optax: smooth_labels, weighted labels, z-loss, row mask."""
    y = jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype) if y.ndim == 1 else y
    if eps:
        y = optax.smooth_labels(y, eps)
    if weights is not None:
        y = y * weights
    loss = optax.softmax_cross_entropy(z, y)
    if z_loss:
        loss = loss + z_loss * jax.nn.logsumexp(z, axis=-1) ** 2
    return loss if rows is None else jnp.where(rows, loss, 0.0)


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_ce_integer_labels_match_optax(impl):
    def ref(z):
        return optax.softmax_cross_entropy_with_integer_labels(z, IDS_)

    _close(_ce_value_and_grad(impl, LOGITS, IDS_), _optax_value_and_grad(ref, LOGITS))


OPTIONS = [
    ({"label_smoothing": 0.1}, {"eps": 0.1}),
    ({"label_smoothing": 1.0}, {"eps": 1.0}),
    ({"class_weights": WEIGHTS}, {"weights": WEIGHTS}),
    ({"z_loss": 1e-2}, {"z_loss": 1e-2}),
    ({"where": ROWS}, {"rows": ROWS}),
    (
        {"label_smoothing": 0.2, "class_weights": WEIGHTS, "z_loss": 1e-3, "where": ROWS},
        {"eps": 0.2, "weights": WEIGHTS, "z_loss": 1e-3, "rows": ROWS},
    ),
]
OPTION_IDS = ["smoothing", "smoothing_1", "class_weights", "z_loss", "where", "all"]


@pytest.mark.parametrize("labels", ["ids", "probs"])
@pytest.mark.parametrize(("ours", "theirs"), OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_ce_options_match_optax(impl, ours, theirs, labels):
    y = IDS_ if labels == "ids" else PROBS
    got = _ce_value_and_grad(impl, LOGITS, y, **ours)
    want = _optax_value_and_grad(lambda z: _optax_ce(z, y, **theirs), LOGITS)
    _close(got, want)


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_ce_ignore_index_matches_optax_on_kept_rows(impl):
    labels = jnp.array([0, -100, 1, 2, -100])
    got = _ce_value_and_grad(impl, LOGITS, labels, ignore_index=-100, label_smoothing=0.1)
    keep = labels != -100
    want = _optax_value_and_grad(
        lambda z: _optax_ce(z, jnp.where(keep, labels, 0), eps=0.1, rows=keep), LOGITS
    )
    _close(got, want)


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_ce_label_and_class_weight_gradients_match_optax(impl):
    # Probability labels and class weights are differentiable: compare those gradients too.
    def ours(y, w):
        return jnp.sum(impl.softmax_cross_entropy(LOGITS, y, class_weights=w, label_smoothing=0.1))

    def theirs(y, w):
        return jnp.sum(_optax_ce(LOGITS, y, eps=0.1, weights=w))

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    _close(grad(ours)(PROBS, WEIGHTS), grad(theirs)(PROBS, WEIGHTS))


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_fused_ce_matches_optax_on_full_logits(impl):
    x = jax.random.normal(_k3, (N, 3), jnp.float64)
    w = jax.random.normal(_k1, (3, C), jnp.float64)

    def ours(x, w):
        loss = impl.linear_softmax_cross_entropy(
            x, w, IDS_, label_smoothing=0.1, class_weights=WEIGHTS, z_loss=1e-2, where=ROWS
        )
        return jnp.sum(loss)

    def theirs(x, w):
        z = x @ w
        return jnp.sum(_optax_ce(z, IDS_, eps=0.1, weights=WEIGHTS, z_loss=1e-2, rows=ROWS))

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    _close(grad(ours)(x, w), grad(theirs)(x, w))


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_sigmoid_bce_matches_optax(impl):
    y = jax.random.uniform(_k2, (N, C), jnp.float64)
    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    got = grad(lambda z, y: jnp.sum(impl.sigmoid_binary_cross_entropy(z, y) * WEIGHTS))
    want = grad(lambda z, y: jnp.sum(optax.sigmoid_binary_cross_entropy(z, y) * WEIGHTS))
    _close(got(LOGITS, y), want(LOGITS, y))


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_mse_matches_optax_squared_error(impl):
    t = PROBS
    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    got = grad(lambda p, t: jnp.sum(impl.mse(p, t) * jnp.arange(1.0, N + 1.0)))
    want = grad(
        lambda p, t: jnp.sum(jnp.mean(optax.squared_error(p, t), -1) * jnp.arange(1.0, N + 1.0))
    )
    _close(got(LOGITS, t), want(LOGITS, t))
    # optax.l2_loss is half the squared error
    _close(impl.mse(LOGITS, t), 2.0 * jnp.mean(optax.l2_loss(LOGITS, t), -1))


# ----------------------------------------------------------------------------- jax.nn

ACTIVATIONS = [
    ("relu", {}, jax.nn.relu),
    (
        "leaky_relu",
        {"negative_slope": 0.1},
        functools.partial(jax.nn.leaky_relu, negative_slope=0.1),
    ),
    ("sigmoid", {}, jax.nn.sigmoid),
    ("tanh", {}, jnp.tanh),
    ("gelu", {"approximate": True}, functools.partial(jax.nn.gelu, approximate=True)),
    ("gelu", {"approximate": False}, functools.partial(jax.nn.gelu, approximate=False)),
    ("softplus", {}, jax.nn.softplus),
    ("silu", {}, jax.nn.silu),
    ("swish", {}, jax.nn.swish),
    ("softmax", {}, jax.nn.softmax),
    ("log_softmax", {}, jax.nn.log_softmax),
]
# Away from the kinks of relu/leaky_relu, where the one-sided derivatives may differ.
ZS = jnp.array([[-4.0, -1.3, -0.2, 0.3, 1.1, 2.5, 6.0]], jnp.float64)


@pytest.mark.parametrize(
    ("name", "options", "theirs"), ACTIVATIONS, ids=[f"{a[0]}{a[1]}" for a in ACTIVATIONS]
)
@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_activations_and_softmax_match_jax_nn(impl, name, options, theirs):
    ours = functools.partial(getattr(impl, name), **options)
    g = jnp.arange(1.0, ZS.shape[-1] + 1.0)[None]
    got_value, got_vjp = jax.vjp(ours, ZS)
    want_value, want_vjp = jax.vjp(theirs, ZS)
    _close((got_value, got_vjp(g)), (want_value, want_vjp(g)), tol=1e-12)


# ------------------------------------------------------------------- a network via optax

MODEL = jaxbp.MLP((3, 4, C), "tanh", loss_options={"label_smoothing": 0.1, "z_loss": 1e-2})


def _optax_mlp_loss(params, x, labels, where, class_weights):
    h = x
    for layer, p in enumerate(params):
        h = h @ p["w"] + p["b"]
        if layer < len(params) - 1:
            h = jnp.tanh(h)
    loss = _optax_ce(h, labels, eps=0.1, weights=class_weights, z_loss=1e-2, rows=where)
    return jnp.sum(loss) / jnp.sum(where).astype(loss.dtype)


@pytest.mark.parametrize("vg", [jaxbp.value_and_grad, jaxbp.reference.value_and_grad], ids=IDS)
def test_network_value_and_grad_matches_an_optax_network(vg):
    params = MODEL.init(jax.random.PRNGKey(1), jnp.float64)
    x = jax.random.normal(_k3, (N, 3), jnp.float64)
    got = vg(MODEL)(params, x, IDS_, where=ROWS, class_weights=WEIGHTS)
    want = jax.value_and_grad(_optax_mlp_loss)(params, x, IDS_, ROWS, WEIGHTS)
    _close(got, want)
