"""jaxbp.mistakes: the gradient each classic mistake gives, the diagnosis of a wrong leaf, and
the diagonal softmax derivative, in one thread and for a while. Through a whole hand-written
backprop: tests/test_handcheck.py."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp import mistakes

G = np.array([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])  # a true gradient (i, o) = (2, 3)


@pytest.mark.parametrize(
    ("hand", "expected"),
    [
        (G.T, ("transposed",)),
        (-G, ("wrong_sign",)),
        (4 * G, ("sum_for_mean",)),
        (G / 4, ("mean_for_sum",)),
        (-4 * G.T, ("transposed", "wrong_sign", "sum_for_mean")),
        (G + 1e-3, ()),
        (np.zeros_like(G), ()),
    ],
    ids=["transposed", "sign", "sum", "mean", "three", "none", "zero"],
)
def test_diagnose_names_the_fewest_mistakes_that_match(hand, expected):
    d = mistakes.diagnose("w", hand, G, n=4, tol=1e-12)
    assert d.leaf == "w" and d.mistakes == expected
    assert (d.text == mistakes.NO_MATCH) == (not expected)
    assert (d.max_rel_error <= 1e-12) if expected else np.isnan(d.max_rel_error)


def test_diagnose_tries_the_softmax_diagonal_gradient_only_when_given():
    diagonal = np.array([[0.5, 0.1, 0.0], [0.2, -0.3, 0.7]])
    assert mistakes.diagnose("w", -diagonal, G, None, 4).mistakes == ()
    d = mistakes.diagnose("w", -diagonal, G, diagonal, 4)
    assert d.mistakes == ("softmax_diagonal", "wrong_sign")
    assert "s(1 − s) ⊙ g" in d.text and "wrong sign" in d.text


def test_diagnose_with_a_batch_of_one_tries_no_scaling():
    assert mistakes.diagnose("w", 3 * G, G, n=1).mistakes == ()
    assert mistakes.diagnose("w", G / 3, G, n=3).mistakes == ("mean_for_sum",)


def test_diagnose_says_so_for_a_vector_whose_transpose_is_itself_and_for_nan():
    b = np.array([1.0, 2.0])
    assert mistakes.diagnose("b", -b, b).mistakes == ("wrong_sign",)  # never "transposed"
    d = mistakes.diagnose("b", np.array([np.nan, 1.0]), b)
    assert d.mistakes == () and "not finite" in d.text


def test_diagonal_softmax_is_this_threads_only_and_restored_after_an_error():
    originals = [getattr(m, n) for m, n in mistakes._sites()]
    z = jnp.array([0.5, -1.0, 2.0], jnp.float64)
    f = lambda z: jnp.sum(jnp.array([1.0, -2.0, 3.0]) * jax.nn.softmax(z))  # noqa: E731
    s = jax.nn.softmax(z)
    g = jnp.array([1.0, -2.0, 3.0])
    true = s * (g - jnp.dot(s, g))  # oracle: s ⊙ (g − ⟨s, g⟩)
    other, inside, started = {}, threading.Event(), threading.Event()

    def elsewhere():
        inside.wait(30)
        other["grad"] = jax.grad(f)(z)
        started.set()

    t = threading.Thread(target=elsewhere)
    t.start()
    with pytest.raises(RuntimeError, match="boom"), mistakes.diagonal_softmax() as seen:
        diag = jax.grad(f)(z)
        inside.set()
        started.wait(30)
        raise RuntimeError("boom")
    t.join(30)
    assert jnp.allclose(diag, s * (1 - s) * g, atol=1e-15) and seen == ["softmax"]
    assert jnp.allclose(other["grad"], true, atol=1e-15)  # the other thread: true derivative
    assert [getattr(m, n) for m, n in mistakes._sites()] == originals
    assert jnp.allclose(jax.grad(f)(z), true, atol=1e-15)


def test_log_softmax_diagonal_gives_zero_on_masked_entries():
    z = jnp.array([0.5, -1.0, 2.0], jnp.float64)
    where = jnp.array([True, False, True])
    f = lambda z: jnp.sum(jnp.where(where, jax.nn.log_softmax(z, where=where), 0.0))  # noqa: E731
    with mistakes.diagonal_softmax():
        diag = jax.grad(f)(z)
    s = jax.nn.softmax(z, where=where)
    assert jnp.allclose(diag, jnp.where(where, 1 - s, 0.0), atol=1e-15)
