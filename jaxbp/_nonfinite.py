"""Non-finite training steps: not applied, counted, and a clear stop after K in a row.

Index letters::

    s  steps of one scan      L  parameter leaves

:func:`guarded_update` is the optimizer step of :mod:`jaxbp.train` and
:mod:`jaxbp.train_gpt` inside their jitted scans: a step whose loss, gradient or updated
parameters are not finite leaves the parameters and the optimizer state as they were and
adds one to a count of such steps in a row. :func:`nonfinite_outcome` reads the scan's flags
on the host: the steps skipped, and the step that made ``K`` in a row with its first
non-finite leaf, by its path in the parameters (``[0]['b']``, ``['blocks'][0]['attn']…``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "NonFiniteError",
    "finite_or_none",
    "guarded_update",
    "leaf_paths",
    "nonfinite_outcome",
]


class NonFiniteError(RuntimeError):
    """``max_nonfinite`` steps in a row whose loss, gradient or update was not finite.

    ``step`` is the (1-based) step that made it ``max_nonfinite`` in a row, ``leaf`` the
    first non-finite leaf of that step (its path in the parameters), ``result`` what the
    run had done by then (the ``to_dict`` of its result, without the stopped steps).
    """

    def __init__(self, message: str, step: int, leaf: str, result: dict | None = None):
        super().__init__(message)
        self.step, self.leaf, self.result = step, leaf, result


def guarded_update(opt, params, opt_state, bad_run, loss, grads, max_nonfinite: int):
    """One optimizer step, applied only when it is finite.

    The step is applied when the loss, every gradient leaf and every updated parameter are
    finite and fewer than ``max_nonfinite`` steps in a row have been skipped; otherwise
    ``params`` and ``opt_state`` come back unchanged (the optimizer's step count included)
    and ``bad_run`` (the skipped steps in a row, a scalar int32) grows by one.

    Returns ``(params, opt_state, bad_run, (applied (), grads_finite (L,),
    params_finite (L,)))`` with one flag per parameter leaf in ``jax.tree.leaves`` order.
    """
    # optax mixes Python floats with int32 step counts: let it promote as it expects even
    # when the caller runs with jax_numpy_dtype_promotion="strict".
    with jax.numpy_dtype_promotion("standard"):
        updates, new_state = opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
    grads_ok = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    params_ok = jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)])
    ok = jnp.isfinite(loss) & jnp.all(grads_ok) & jnp.all(params_ok) & (bad_run < max_nonfinite)
    params = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_params, params)
    opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, opt_state)
    bad_run = jnp.where(ok, jnp.zeros_like(bad_run), bad_run + 1)
    return params, opt_state, bad_run, (ok, grads_ok, params_ok)


def nonfinite_outcome(first: int, flags, runs, limit: int, paths, losses):
    """Read a scan's :func:`guarded_update` flags on the host: ``(skipped, stop)``.

    ``skipped`` are the 1-based numbers of the steps not applied (``first`` steps came
    before this scan), up to the stop; ``stop`` is ``None`` or ``(step, leaf, message)``
    for the step that made ``limit`` in a row.
    """
    ok, grads_ok, params_ok = (np.asarray(f) for f in flags)
    runs = np.asarray(runs)
    hit = np.flatnonzero(runs >= limit)
    end = int(hit[0]) + 1 if hit.size else ok.shape[0]
    skipped = [first + j + 1 for j in range(end) if not ok[j]]
    if not hit.size:
        return skipped, None
    j = int(hit[0])
    if not grads_ok[j].all():
        leaf = paths[int(np.argmin(grads_ok[j]))]
        what = f"the gradient of params{leaf}"
    elif not params_ok[j].all():
        leaf = paths[int(np.argmin(params_ok[j]))]
        what = f"params{leaf} after the update"
    else:
        leaf, what = "", "the loss (the gradients were finite)"
    message = (
        f"step {first + j + 1}: {limit} non-finite steps in a row (steps "
        f"{first + j + 2 - limit}-{first + j + 1}, loss {float(losses[j])}); the first "
        f"non-finite leaf is {what}; none of them was applied and training stopped"
    )
    return skipped, (first + j + 1, leaf, message)


def leaf_paths(tree) -> list[str]:
    """``jax.tree_util.keystr`` of every leaf of ``tree``, in ``jax.tree.leaves`` order."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def finite_or_none(values) -> list:
    """A list for JSON: non-finite losses (skipped steps) become ``None``."""
    return [float(v) if np.isfinite(v) else None for v in values]
