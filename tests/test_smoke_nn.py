import jax
import jax.numpy as jnp

import jaxbp
from tests.helpers import assert_close


def test_mlp_manual_gradient_matches_reference_float64(key):
    model = jaxbp.MLP((6, 7, 4))
    params = model.init(key, jnp.float64)
    x = jax.random.normal(key, (9, 6), jnp.float64)
    labels = jnp.arange(9) % 4
    manual = jaxbp.value_and_grad(model)(params, x, labels)
    ref = jaxbp.reference.value_and_grad(model)(params, x, labels)
    assert_close(manual, ref, jnp.float64)
