"""Test-wide settings: float64 available, strict dtype promotion, deterministic hypothesis,
and compiles that are cheap and shared.

x64 is on so that float64 comparisons (≤ 1e-12) and finite differences are possible; every
test names its dtypes explicitly. Strict dtype promotion (as equinox's tests do) turns any
silent float32/float64 mixing inside the library into an error.

Compiles dominate the suite (small programs, thousands of them), so:

* a persistent compilation cache under ``.pytest_cache/jax-compilation-cache`` (every
  program, however quick to compile), shared by the xdist workers and by the subprocesses
  the tests start (the CLI, the multi-device worker), which inherit these variables; a
  second run compiles almost nothing. ``JAX_COMPILATION_CACHE_DIR`` set outside wins;
* ``XLA_FLAGS=--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false``:
  LLVM's optimisation of the CPU kernels, and the newer MLIR fusion emitters, are most of a
  tiny program's compile time; without them the same HLO compiles to kernels that compute
  the same numbers within the tolerances (no fast-math either way) with the same buffer
  assignment (the memory figures some tests assert). ``JAXBP_TEST_XLA_OPT=1`` leaves XLA's
  defaults, to check that claim: the suite passes either way.

At the end of a session the heap is collected once and frozen (:func:`pytest_sessionfinish`),
so that a worker of ``pytest -n`` is quick to finish after it reports its results: see there.
"""

import gc
import os
import pathlib
import subprocess
import sys

# Tests must not see a GPU's TF32 matmuls or spread over many host devices by accident.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation-cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Compile-time flags of XLA:CPU that leave every number and buffer as it is. Each is probed
# once (in a subprocess, by the first process that loads this file; the xdist workers and
# the tests' subprocesses inherit the result): a jaxlib that does not know a flag refuses to
# start, so an unknown one is left out.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _accepted(*flags: str) -> bool:
    env = {**os.environ, "XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""), *flags])}
    probe = "import jax.numpy as jnp; jnp.zeros(2).block_until_ready()"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          timeout=120).returncode == 0  # fmt: skip


if os.environ.get("JAXBP_TEST_XLA_OPT") != "1" and "JAXBP_TEST_XLA_FLAGS" not in os.environ:
    _given = os.environ.get("XLA_FLAGS", "")
    _new = [f for f in _FAST_COMPILE if f.split("=")[0] not in _given]
    if not _accepted(*_new):  # one probe when all are known, else one for each
        _new = [f for f in _new if _accepted(f)]
    os.environ["XLA_FLAGS"] = " ".join([_given, *_new]).strip()
    os.environ["JAXBP_TEST_XLA_FLAGS"] = " ".join(_new)  # probed: the workers skip it

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


def pytest_sessionfinish(session):
    """Collect the heap once, then freeze it, before an xdist worker reports its results.

    After a worker reports "finished", xdist's controller closes it and execnet gives it 5 s
    to return before it sends the worker a SIGINT. What the worker still does then is
    pytest's own unraisable-exception check, a full ``gc.collect()`` (two, with the
    thread-exception check), over a heap that holds every jaxpr and compiled program of the
    session: about 1 s each after two test files, more after a whole share of the suite
    on a loaded machine. When that passed 5 s, the SIGINT arrived during a collection and
    surfaced in the first Python code to run, hypothesis's ``gc.callbacks`` timer:
    ``PytestUnraisableExceptionWarning ... KeyboardInterrupt`` in a run that passed. This
    hook runs inside xdist's, before the report: the collection here finds what there is to
    find (pytest's check still sees any ``__del__`` that raises), and ``gc.freeze()`` moves
    the survivors out of the collector's reach, so the later collections have almost
    nothing to walk."""
    gc.collect()
    gc.freeze()
