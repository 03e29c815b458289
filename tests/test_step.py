"""One meaning of ``f.jitted`` (jaxbp/_step.py), for every transform of a model.

``f.jitted`` is a ``jax.jit`` function of the unvalidated core, called with ``f``'s
documented arguments positionally (``None`` for an absent one), returning what ``f``
returns; it is cached per configuration, so building the transform again compiles nothing.
"""

import jax
import jax.numpy as jnp
import pytest

import jaxbp
from jaxbp import parallel
from tests.helpers import assert_close

MLP = jaxbp.MLP((3, 4, 2), "tanh")
PARAMS = MLP.init(jax.random.PRNGKey(0), jnp.float64)
X = jax.random.normal(jax.random.PRNGKey(1), (4, 3), jnp.float64)
Y = jnp.asarray([0, 1, 1, 0])
GPT = jaxbp.GPT(vocab=5, d=4, heads=2, layers=1, context=3)
GPT_PARAMS = GPT.init(jax.random.PRNGKey(2), jnp.float64)
IDS = jnp.asarray([[0, 1, 2], [3, 4, 0]])
MESH = parallel.make_mesh((1,), ("data",), devices=jax.devices()[:1])

# (id, build the transform, f's arguments, the same for f.jitted: every one, positionally)
TRANSFORMS = [
    ("value_and_grad", lambda: jaxbp.value_and_grad(MLP), (PARAMS, X, Y),
     (PARAMS, X, Y, None, None)),
    ("reference.value_and_grad", lambda: jaxbp.reference.value_and_grad(MLP), (PARAMS, X, Y),
     (PARAMS, X, Y, None, None)),
    ("value_and_grad-gpt", lambda: jaxbp.value_and_grad(GPT), (GPT_PARAMS, IDS, IDS),
     (GPT_PARAMS, IDS, IDS, None)),
    ("reference.value_and_grad-gpt", lambda: jaxbp.reference.value_and_grad(GPT),
     (GPT_PARAMS, IDS, IDS), (GPT_PARAMS, IDS, IDS, None)),
    ("per_example_grads", lambda: jaxbp.per_example_grads(MLP), (PARAMS, X, Y),
     (PARAMS, X, Y, None, None)),
    ("reference.per_example_grads", lambda: jaxbp.reference.per_example_grads(MLP),
     (PARAMS, X, Y), (PARAMS, X, Y, None, None)),
    ("per_example_grad_norms", lambda: jaxbp.per_example_grad_norms(MLP), (PARAMS, X, Y),
     (PARAMS, X, Y, None, None)),
    ("reference.per_example_grad_norms", lambda: jaxbp.reference.per_example_grad_norms(MLP),
     (PARAMS, X, Y), (PARAMS, X, Y, None, None)),
    ("clipped_grad", lambda: jaxbp.clipped_grad(MLP, l2_clip=0.5), (PARAMS, X, Y),
     (PARAMS, X, Y, None, None, None)),
    ("reference.clipped_grad", lambda: jaxbp.reference.clipped_grad(MLP, l2_clip=0.5),
     (PARAMS, X, Y), (PARAMS, X, Y, None, None, None)),
    ("parallel.value_and_grad", lambda: parallel.value_and_grad(MLP, MESH), (PARAMS, X, Y),
     (PARAMS, X, Y, None, None)),
]  # fmt: skip


@pytest.mark.parametrize(("build", "args", "positional"), [t[1:] for t in TRANSFORMS],
                         ids=[t[0] for t in TRANSFORMS])  # fmt: skip
def test_jitted_is_a_cached_jax_jit_of_the_core_with_the_documented_arguments(
    build, args, positional
):
    f = build()
    assert hasattr(f.jitted, "lower") and hasattr(f.jitted, "eval_shape")  # a jax.jit
    assert build().jitted is f.jitted  # built again: the same compiled step
    out = f(*args)
    assert_close(f.jitted(*positional), out, jnp.float64)
    # Traceable: inside another jit it gives the same.
    assert_close(jax.jit(f.jitted)(*positional), out, jnp.float64)


def test_a_new_configuration_is_a_new_step():
    assert (
        jaxbp.clipped_grad(MLP, l2_clip=0.5).jitted
        is not jaxbp.clipped_grad(MLP, l2_clip=0.25).jitted
    )
    assert (
        jaxbp.value_and_grad(MLP).jitted
        is not jaxbp.value_and_grad(jaxbp.MLP((3, 4, 2), "relu")).jitted
    )
