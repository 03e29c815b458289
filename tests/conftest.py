"""Test-wide settings: float64 available, strict dtype promotion, deterministic hypothesis.

x64 is on so that float64 comparisons (≤ 1e-12) and finite differences are possible; every
test names its dtypes explicitly. Strict dtype promotion (as equinox's tests do) turns any
silent float32/float64 mixing inside the library into an error.
"""

import os

# Tests must not see a GPU's TF32 matmuls or spread over many host devices by accident.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")

settings.register_profile(
    "jaxbp",
    derandomize=True,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("jaxbp")


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)
