"""The gradient checks every op's test file runs on its settings list (tests/settings.py).

* :func:`check_manual_vs_reference`: the public op under ``jax.grad`` *and* ``op_bwd`` called
  directly on ``op_fwd``'s residuals, against ``jax.grad`` of ``jaxbp.reference.op``, at the
  docs/edge_cases.md tolerance of the dtype;
* :func:`check_finite_differences`: float64 central differences along random directions,
  step ``1e-6`` scaled to the input, error ``≤ 1e-6`` relative to ``‖grad‖·‖v‖``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import assert_close
from tests.settings import Case, bwd_direct, cotangent, grad_of


def check_manual_vs_reference(case: Case, dtype, arrays: dict | None = None) -> None:
    arrays = case.arrays(dtype) if arrays is None else arrays
    out = case.op(**arrays, **case.options)
    out_ref = case.ref(**arrays, **case.options)
    assert out.dtype == out_ref.dtype, f"forward dtype {out.dtype} vs reference {out_ref.dtype}"
    assert_close(out, out_ref, dtype, name="forward")
    cot = cotangent(out)
    expected = grad_of(case.ref, case, arrays, cot)
    manual = grad_of(case.op, case, arrays, cot)
    direct = bwd_direct(case, arrays, cot)
    assert_close(manual, expected, dtype, name="jax.grad of the op")
    assert_close(direct, expected, dtype, name="op_bwd on op_fwd's residuals")
    for k in case.diff:
        assert manual[k].dtype == arrays[k].dtype, f"d{k}: {manual[k].dtype}"
        assert direct[k].dtype == arrays[k].dtype, f"d{k} (bwd): {direct[k].dtype}"


def check_finite_differences(
    case: Case, arrays: dict | None = None, *, directions: int = 3, rtol: float = 1e-6
) -> None:
    arrays = case.arrays(jnp.float64) if arrays is None else arrays
    out = case.op(**arrays, **case.options)
    # Entries that are not finite at the base point (log_softmax's −inf where masked) stay so
    # under a small step; leave them out of the scalar: L = Σ cot ⊙ out over finite entries.
    cot = jnp.where(jnp.isfinite(out), cotangent(out), 0.0)
    finite = jnp.isfinite(out)

    @jax.jit
    def scalar(d):
        out = case.op(**{**arrays, **d}, **case.options)
        return jnp.sum(jnp.where(finite, out, 0.0) * cot)

    d0 = {k: arrays[k] for k in case.diff}
    g = jax.grad(scalar)(d0)
    scale = max(1.0, *(float(jnp.max(jnp.abs(v), initial=0.0)) for v in d0.values()))
    eps = 1e-6 * scale
    rng = np.random.default_rng(7)
    for _ in range(directions):
        v = {k: jnp.asarray(rng.normal(size=x.shape), jnp.float64) for k, x in d0.items()}
        plus = scalar({k: d0[k] + eps * v[k] for k in d0})
        minus = scalar({k: d0[k] - eps * v[k] for k in d0})
        fd = float(plus - minus) / (2 * eps)
        gv = sum(float(jnp.vdot(g[k], v[k])) for k in d0)
        gnorm = np.sqrt(sum(float(jnp.vdot(g[k], g[k])) for k in d0))
        vnorm = np.sqrt(sum(float(jnp.vdot(v[k], v[k])) for k in d0))
        assert abs(fd - gv) <= rtol * max(gnorm * vnorm, 1e-30), (
            f"{case.id}: finite difference {fd!r} vs <grad, v> {gv!r}"
        )
