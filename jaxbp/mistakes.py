"""The classic mistakes of a hand-written backward pass, the gradient each gives, and which
one a wrong gradient matches (used by :func:`jaxbp.handcheck.compare`).

Index letters::

    n  batch      i  input features      o  output features      c  classes

A leaf ``u`` that is wrong against the true gradient ``∇`` is held against the gradients the
mistakes give, alone or two or more together, and the fewest that match are named:

* ``transposed``        ``∇ᵀ``: shape ``(o, i)`` where the parameter has ``(i, o)`` (``δᵀ·x``
  written for ``xᵀ·δ``), or the transposed values of a square leaf;
* ``wrong_sign``        ``−∇`` (``y − p`` written for ``p − y``);
* ``sum_for_mean``      ``n·∇``: summed over the batch where the loss is a mean;
* ``mean_for_sum``      ``∇/n``: divided by ``n`` where the loss is a sum (or twice);
* ``softmax_diagonal``  behind a softmax, the elementwise ``s(1 − s) ⊙ g`` used where the
  Jacobian-vector product ``s ⊙ (g − ⟨s, g⟩)`` belongs: the diagonal of the ``(c, c)``
  Jacobian ``diag(s) − s sᵀ`` instead of the whole of it.

The gradient of ``softmax_diagonal`` is ``jax.grad`` of the loss run while
:func:`diagonal_softmax` gives every softmax the derivative of that mistake: the calls
``jax.nn.softmax``, ``jaxbp.softmax`` and ``jaxbp.reference.softmax`` (tangent
``s(1 − s)·ż``) and their ``log_softmax`` (tangent ``(1 − s)·ż``: the same mistake reached
through ``log s``, as ``optax.softmax_cross_entropy`` computes it). Only those calls can be
seen: a softmax written inline (``jnp.exp(z) / jnp.exp(z).sum(...)``), or bound by ``from
jax.nn import softmax`` before the check, is invisible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import reference
from ._measure import errors

__all__ = ["MISTAKES", "NO_MATCH", "Diagnosis", "diagnose", "diagonal_softmax"]

# Every mistake the diagnosis knows, in the order a diagnosis names them ({n}: the batch size).
MISTAKES = {
    "softmax_diagonal": "softmax's derivative taken elementwise, s(1 − s) ⊙ g, where the "
    "Jacobian product s ⊙ (g − ⟨s, g⟩) belongs",
    "transposed": "transposed: the true gradient's transpose",
    "wrong_sign": "wrong sign: −1 × the true gradient",
    "sum_for_mean": "× n = {n}: a sum over the batch where the loss is a mean",
    "mean_for_sum": "× 1/n = 1/{n}: divided by n where the loss is a sum",
}
NO_MATCH = "no known mistake matches"


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What one wrong leaf matches.

    ``mistakes`` holds keys of :data:`MISTAKES` (empty when none matches), ``max_rel_error``
    the leaf's error against the gradient those mistakes give (NaN when none matches),
    ``text`` the sentence the table prints.
    """

    leaf: str
    mistakes: tuple[str, ...]
    max_rel_error: float
    text: str


def _softmax_tangent(s, dz):
    return s * (1 - s) * dz  # diag(J)·ż; masked entries have s = 0


def _log_softmax_tangent(ls, dz):
    # (1 − s)·ż: the diagonal of I − 1 sᵀ; masked entries (ℓ = −inf) get 0
    return jnp.where(jnp.isfinite(ls), (1 - jnp.exp(ls)) * dz, jnp.zeros_like(dz))


_TANGENTS = {"softmax": _softmax_tangent, "log_softmax": _log_softmax_tangent}
_state = threading.local()  # .seen: a list while this thread runs a check; .inside
_lock = threading.Lock()
_installed: list = []  # (module, name, original) while any thread runs a check
_users = 0


def _diagonal(original: Callable, name: str) -> Callable:
    """``original`` as it is, except in a thread inside :func:`diagonal_softmax`: there its
    value is the same and its derivative the diagonal one."""
    tangent = _TANGENTS[name]

    @functools.wraps(original)
    def patched(*args, **kwargs):
        seen = getattr(_state, "seen", None)
        if seen is None or not args or getattr(_state, "inside", False):
            return original(*args, **kwargs)
        seen.append(name)

        def value(z):
            _state.inside = True  # a softmax inside this one (a twin's jax.nn call) is plain
            try:
                return original(z, *args[1:], **kwargs)
            finally:
                _state.inside = False

        def jvp(primals, tangents):
            out = value(primals[0])
            return out, tangent(out, tangents[0])

        f = jax.custom_jvp(value)
        f.defjvp(jvp)
        return f(args[0])

    return patched


def _sites():
    package = sys.modules[__package__]
    return [(m, n) for m in (jax.nn, package, reference) for n in _TANGENTS]


@contextlib.contextmanager
def diagonal_softmax():
    """While the body runs, in this thread only, ``jax.nn.softmax``, ``jaxbp.softmax``,
    ``jaxbp.reference.softmax`` and the three ``log_softmax`` keep their values and take the
    derivative of the classic mistake: ``s(1 − s)·ż`` (softmax), ``(1 − s)·ż`` (log-softmax).

    Yields a list that gets the name of every such call the body makes. The functions are
    replaced by wrappers while any thread is inside (other threads get the originals through
    them) and restored when the last one leaves, whatever happens in the body.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxbp.mistakes import diagonal_softmax
      >>> z = jnp.array([1.0, 2.0, 3.0])
      >>> f = lambda z: jax.nn.softmax(z)[0]
      >>> with diagonal_softmax() as seen:
      ...     diag = jax.grad(f)(z)
      >>> s = jax.nn.softmax(z)
      >>> bool(jnp.allclose(diag, jnp.array([s[0] * (1 - s[0]), 0.0, 0.0]))), seen
      (True, ['softmax'])
    """
    global _users
    with _lock:
        if _users == 0:
            for module, name in _sites():
                original = getattr(module, name)
                _installed.append((module, name, original))
                setattr(module, name, _diagonal(original, name))
        _users += 1
    before, seen = getattr(_state, "seen", None), []
    _state.seen = seen
    try:
        yield seen
    finally:
        _state.seen = before
        with _lock:
            _users -= 1
            if _users == 0:
                for module, name, original in reversed(_installed):
                    setattr(module, name, original)
                _installed.clear()


# ------------------------------------------------------------------ the diagnosis


def diagnose(leaf: str, u, grad, diagonal=None, n: int = 0, tol: float = 1e-12) -> Diagnosis:
    """The fewest mistakes whose gradient matches ``u``, relative to its max-abs, within ``tol``.

    Args:
      leaf: the leaf's name, kept in the result (``"[0]['w']"``).
      u: the hand-written gradient of the leaf, in the parameter's shape ``(i, o)`` or its
        reverse ``(o, i)``.
      grad: the true gradient of the leaf ``(i, o)``.
      diagonal: the gradient ``softmax_diagonal`` gives for the leaf ``(i, o)`` (``jax.grad``
        of the loss under :func:`diagonal_softmax`), or ``None`` when no softmax was seen.
      n: the batch size; ``sum_for_mean`` and ``mean_for_sum`` are tried when ``n > 1``.
      tol: the tolerance of a match.

    Example::

      >>> import numpy as np
      >>> g = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
      >>> diagnose("w", -8 * g.T, g, n=8).mistakes
      ('transposed', 'wrong_sign', 'sum_for_mean')
    """
    u = np.asarray(u, np.float64)
    if not np.all(np.isfinite(u)):
        return Diagnosis(leaf, (), math.nan, f"{NO_MATCH} (the leaf is not finite)")
    shape = np.shape(grad)
    reshaped = "" if u.shape == shape else f" (shape {u.shape} where params has {shape})"
    bases = [((), grad)] + ([(("softmax_diagonal",), diagonal)] if diagonal is not None else [])
    scales = [((), 1.0)] + ([(("sum_for_mean",), n), (("mean_for_sum",), 1 / n)] if n > 1 else [])
    best = None  # (mistakes, error)
    for base_m, base in bases:
        base = np.asarray(base, np.float64)
        for t_m, c in (((), base), (("transposed",), base.T)):
            if c.shape != u.shape or (t_m and base.ndim < 2):
                continue
            for sign_m, sign in (((), 1.0), (("wrong_sign",), -1.0)):
                for scale_m, scale in scales:
                    mistakes = (*base_m, *t_m, *sign_m, *scale_m)
                    rel = errors(u, sign * scale * c)[1]
                    if mistakes and rel <= tol and (best is None or len(mistakes) < len(best[0])):
                        best = (mistakes, rel)
    if best is None:
        return Diagnosis(leaf, (), math.nan, NO_MATCH + reshaped)
    mistakes, rel = best
    text = "; and ".join(
        MISTAKES[m].format(n=n) + (reshaped if m == "transposed" else "") for m in mistakes
    )
    return Diagnosis(leaf, mistakes, rel, text)
