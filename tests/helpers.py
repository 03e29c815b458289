"""The tests' shared helpers and oracles, in one place.

* tolerances of docs/edge_cases.md and :func:`assert_close` (per leaf, relative to max-abs);
* the gradient checks every op's test file runs on its settings list (tests/settings.py):
  :func:`check_manual_vs_reference` (the public op under ``jax.grad`` *and* ``op.bwd``
  called directly on ``op.fwd``'s residuals, against ``jax.grad`` of ``op.reference``, at
  the dtype's tolerance; all of it one compiled program per case and dtype) and
  :func:`check_finite_differences` (float64 central differences along random directions,
  step ``1e-6`` scaled to the input, error ``≤ 1e-6`` relative to ``‖grad‖·‖v‖``);
* plain-jnp oracles of the Flax NNX / Equinox wrappers (tests/test_nnx.py, test_eqx.py),
  written here with ``jax.numpy`` alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxbp
from tests.settings import bwd_direct, cotangent, grad_of

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


# ------------------------------------------------------------------ the gradient checks


def check_manual_vs_reference(case, dtype, arrays: dict | None = None) -> None:
    """Forward, ``jax.grad`` through the op and ``op.bwd`` on ``op.fwd``'s residuals, all
    against ``jax.grad`` of the reference, from one jitted program (the reference's
    gradient too: one compile per case and dtype, not one per primitive)."""
    arrays = case.arrays(dtype) if arrays is None else arrays
    shape = jax.eval_shape(lambda a: case.op(**a, **case.options), arrays)
    cot = cotangent(shape)

    @jax.jit
    def routes(arrays, cot):
        out = case.op(**arrays, **case.options)
        out_ref = case.ref(**arrays, **case.options)
        expected = grad_of(case.ref, case, arrays, cot)
        manual = grad_of(case.op, case, arrays, cot)
        direct = bwd_direct(case, arrays, cot)
        return out, out_ref, expected, manual, direct

    out, out_ref, expected, manual, direct = routes(arrays, cot)
    assert out.dtype == out_ref.dtype, f"forward dtype {out.dtype} vs reference {out_ref.dtype}"
    assert_close(out, out_ref, dtype, name="forward")
    assert_close(manual, expected, dtype, name="jax.grad of the op")
    assert_close(direct, expected, dtype, name="op_bwd on op_fwd's residuals")
    for k in case.diff:
        assert manual[k].dtype == arrays[k].dtype, f"d{k}: {manual[k].dtype}"
        assert direct[k].dtype == arrays[k].dtype, f"d{k} (bwd): {direct[k].dtype}"


def check_finite_differences(case, arrays: dict | None = None, *, directions: int = 3,
                             rtol: float = 1e-6) -> None:  # fmt: skip
    """``⟨∇L, v⟩`` against ``(L(a + h·v) − L(a − h·v))/2h`` in float64, ``L = Σ cot ⊙ op``
    over the finite entries, for ``directions`` random ``v``: one jitted program."""
    arrays = case.arrays(jnp.float64) if arrays is None else arrays
    out = case.op(**arrays, **case.options)
    # Entries that are not finite at the base point (log_softmax's −inf where masked) stay so
    # under a small step; leave them out of the scalar: L = Σ cot ⊙ out over finite entries.
    finite = jnp.isfinite(out)
    cot = jnp.where(finite, cotangent(out), 0.0)
    d0 = {k: arrays[k] for k in case.diff}
    scale = max(1.0, *(float(jnp.max(jnp.abs(v), initial=0.0)) for v in d0.values()))
    eps = 1e-6 * scale
    rng = np.random.default_rng(7)
    vs = [{k: jnp.asarray(rng.normal(size=x.shape), jnp.float64) for k, x in d0.items()}
          for _ in range(directions)]  # fmt: skip
    vs = jax.tree.map(lambda *a: jnp.stack(a), *vs)

    def scalar(d):
        out = case.op(**{**arrays, **d}, **case.options)
        return jnp.sum(jnp.where(finite, out, 0.0) * cot)

    @jax.jit
    def run(d0, vs):
        def fd(v):
            plus = scalar({k: d0[k] + eps * v[k] for k in d0})
            minus = scalar({k: d0[k] - eps * v[k] for k in d0})
            return (plus - minus) / (2 * eps)

        return jax.grad(scalar)(d0), jax.vmap(fd)(vs)

    g, fds = run(d0, vs)
    gnorm = np.sqrt(sum(float(jnp.vdot(g[k], g[k])) for k in d0))
    for j in range(directions):
        v = {k: vs[k][j] for k in d0}
        gv = sum(float(jnp.vdot(g[k], v[k])) for k in d0)
        vnorm = np.sqrt(sum(float(jnp.vdot(v[k], v[k])) for k in d0))
        assert abs(float(fds[j]) - gv) <= rtol * max(gnorm * vnorm, 1e-30), (
            f"{case.id}: finite difference {float(fds[j])!r} vs <grad, v> {gv!r}"
        )


# ------------------------------------------------------ oracles of the module wrappers


HAS_TRANSFORMER_OPS = all(
    hasattr(jaxbp, n) for n in ("layer_norm", "rms_norm", "embedding", "attention")
)


def dense(x, w, b):
    return x @ w + b


def layer_norm(x, gamma, beta, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * gamma + beta


def rms_norm(x, gamma, eps):
    return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + eps) * gamma


def embedding(ids, table):
    return table[ids]


def attention(x, p, heads, causal, mask=None, kv=None):
    """``p``: ``{"q": (w, b), "k": ..., "v": ..., "o": ...}`` with ``w (i, o)`` (a bias may be
    ``None``); x ``(n, t, d)``, keys and values from ``kv (n, s, d_kv)`` (default ``x``);
    ``mask`` (``True`` attends) broadcast to ``(n, h, t, s)``. A row with nothing to attend
    to is 0 (``jax.nn.softmax``'s ``where=``)."""
    kv = x if kv is None else kv
    n, t, _ = x.shape
    s_len = kv.shape[1]

    def proj(a, c):
        w, b = p[c]
        return a @ w if b is None else a @ w + b

    def split(y):
        return y.reshape(n, y.shape[1], heads, -1).transpose(0, 2, 1, 3)

    q, k, v = split(proj(x, "q")), split(proj(kv, "k")), split(proj(kv, "v"))
    e = q.shape[-1]
    s = jnp.einsum("nhte,nhse->nhts", q, k) / jnp.sqrt(jnp.asarray(e, x.dtype))
    keep = jnp.ones(s.shape, bool)
    if causal:
        keep = keep & jnp.tril(jnp.ones((t, s_len), bool))
    if mask is not None:
        keep = keep & jnp.broadcast_to(jnp.asarray(mask, bool), s.shape)
    o = jnp.einsum("nhts,nhse->nhte", jax.nn.softmax(s, axis=-1, where=keep), v)
    o = o.transpose(0, 2, 1, 3).reshape(n, t, heads * v.shape[-1])
    return proj(o, "o")


def loss_weights(shape, dtype=jnp.float64):
    """A fixed, non-uniform cotangent so every output element matters differently."""
    return jnp.sin(jnp.arange(jnp.prod(jnp.array(shape)), dtype=dtype)).reshape(shape) + 0.5
