"""softmax_cross_entropy against torch.nn.functional.cross_entropy(reduction='none').

An independent implementation, on the options both define: ``weight`` (class_weights),
``label_smoothing``, ``ignore_index`` and probability targets. Skipped without torch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp

torch = pytest.importorskip("torch")
F = torch.nn.functional

N, C = 6, 5


def _inputs(seed, probs, scale=2.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(N, C)) * scale
    y = rng.dirichlet(np.ones(C), size=N) if probs else rng.integers(0, C, N)
    return z, y, rng.uniform(0.2, 2.0, C), rng.normal(size=N)


def _torch(z, y, g, *, weight=None, label_smoothing=0.0, ignore_index=-100):
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    floating = np.issubdtype(y.dtype, np.floating)
    yt = torch.tensor(y, dtype=torch.float64 if floating else torch.int64)
    if floating:
        yt.requires_grad_(True)
    wt = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    loss = F.cross_entropy(
        zt, yt, weight=wt, reduction="none", label_smoothing=label_smoothing,
        ignore_index=ignore_index,
    )  # fmt: skip
    loss.backward(torch.tensor(g, dtype=torch.float64))
    dy = yt.grad.numpy() if floating else None
    return loss.detach().numpy(), zt.grad.numpy(), dy


def _jaxbp(z, y, g, **kw):
    z, y, g = jnp.asarray(z), jnp.asarray(y), jnp.asarray(g)
    floating = jnp.issubdtype(y.dtype, jnp.floating)
    loss = jaxbp.softmax_cross_entropy(z, y, **kw)
    argnums = (0, 1) if floating else 0
    grads = jax.grad(lambda z, y: jnp.sum(jaxbp.softmax_cross_entropy(z, y, **kw) * g), argnums)(
        z, y
    )
    dz, dy = grads if floating else (grads, None)
    return np.asarray(loss), np.asarray(dz), None if dy is None else np.asarray(dy)


def _compare(z, y, g, weight=None, label_smoothing=0.0, ignore_index=None):
    kw = {"label_smoothing": label_smoothing}
    tkw = dict(kw)
    if weight is not None:
        kw["class_weights"] = jnp.asarray(weight)
        tkw["weight"] = weight
    if ignore_index is not None:
        kw["ignore_index"] = ignore_index
        tkw["ignore_index"] = ignore_index
    ours = _jaxbp(z, y, g, **kw)
    theirs = _torch(z, y, g, **tkw)
    for name, a, b in zip(("loss", "dlogits", "dlabels"), ours, theirs, strict=True):
        if b is not None:
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)


OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.15},
    "ignore_index": {"ignore_index": -100},
    "weight-smoothing-ignore": {"weight": True, "label_smoothing": 0.3, "ignore_index": 2},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_ids_match_torch_cross_entropy(options):
    z, y, w, g = _inputs(0, probs=False)
    ignore = options.get("ignore_index")
    if ignore is not None:
        y[::2] = ignore
    _compare(
        z, y, g, weight=w if options.get("weight") else None,
        label_smoothing=options.get("label_smoothing", 0.0), ignore_index=ignore,
    )  # fmt: skip


@pytest.mark.parametrize(
    "options", [o for k, o in OPTIONS.items() if "ignore" not in k], ids=lambda o: str(o)
)
def test_probability_targets_match_torch_cross_entropy_with_label_gradient(options):
    z, y, w, g = _inputs(1, probs=True)
    _compare(
        z, y, g, weight=w if options.get("weight") else None,
        label_smoothing=options.get("label_smoothing", 0.0),
    )  # fmt: skip


def test_probability_targets_not_summing_to_one_match_torch():
    z, y, w, g = _inputs(2, probs=True)
    _compare(z, y * 1.7, g, weight=w, label_smoothing=0.1)


@given(
    seed=st.integers(0, 2**32 - 1),
    probs=st.booleans(),
    weight=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    ignore=st.sampled_from([None, -100, 0]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
)
@settings(max_examples=8)
def test_property_random_option_combinations_match_torch(
    seed, probs, weight, label_smoothing, ignore, scale
):
    z, y, w, g = _inputs(seed, probs, scale)
    if probs:
        ignore = None  # torch defines ignore_index only for class ids
    elif ignore is not None:
        y[np.random.default_rng(seed).uniform(size=N) < 0.3] = ignore
    _compare(z, y, g, w if weight else None, label_smoothing, ignore)
