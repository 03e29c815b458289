"""Shared test helpers: tolerances of docs/edge_cases.md and a per-leaf comparison."""

import jax
import numpy as np

# Tolerances of docs/edge_cases.md: relative to the reference's max-abs, per leaf.
TOL = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}


def assert_close(actual, expected, dtype=None, *, tol=None, name="value"):
    """Every leaf of ``actual`` within ``tol`` of ``expected``, relative to its max-abs."""
    la, treedef_a = jax.tree.flatten(actual)
    le, treedef_e = jax.tree.flatten(expected)
    assert treedef_a == treedef_e, f"{name}: structures differ: {treedef_a} vs {treedef_e}"
    for k, (a, e) in enumerate(zip(la, le, strict=True)):
        a = np.asarray(a, np.float64)
        e = np.asarray(e, np.float64)
        assert a.shape == e.shape, f"{name}[{k}]: shape {a.shape} vs {e.shape}"
        t = (
            tol
            if tol is not None
            else TOL[str(np.dtype(dtype) if dtype is not None else "float64")]
        )
        # Equal infinities (log_softmax's −inf at masked entries) and NaN in both agree;
        # any other non-finite value disagrees. The rest is compared relative to max-abs.
        same = (a == e) | (np.isnan(a) & np.isnan(e))
        finite = np.isfinite(e) & np.isfinite(a)
        assert np.all(same | finite), f"{name}[{k}]: non-finite values differ"
        scale = max(np.max(np.abs(np.where(finite, e, 0.0)), initial=0.0), 1e-30)
        diff = np.where(finite, a, 0.0) - np.where(finite, e, 0.0)
        err = np.max(np.abs(diff), initial=0.0) / scale
        assert err <= t, f"{name}[{k}]: relative error {err:.3e} > {t:.1e}"
