"""One meaning of a compiled step: ``f.jitted``.

Every transform of a model returns a function ``f`` that checks its inputs (clear errors
before anything is traced; label values when they are concrete) and then runs one compiled
step: :func:`jaxbp.value_and_grad` (of an :class:`~jaxbp.MLP` and of a :class:`~jaxbp.GPT`),
:func:`jaxbp.per_example_grads`, :func:`jaxbp.per_example_grad_norms`,
:func:`jaxbp.clipped_grad`, their twins under :mod:`jaxbp.reference`,
:func:`jaxbp.parallel.value_and_grad` and :func:`jaxbp.parallel.clipped_grad`. ``f.jitted``
is that step, and it means the same for all of them:

* a ``jax.jit`` function (``.lower``, ``.trace``, ``.eval_shape`` work) of the core without
  the input checks;
* called with every argument ``f`` documents, positionally, in ``f``'s order, ``None`` for
  an absent one (``where``, ``class_weights``, ``key``); it returns what ``f`` returns;
* built once per configuration of the transform (the hashable model, the transform's own
  options, and, for the explicit loops, the rules the model's ops hold when the transform is
  built, :func:`jaxbp._op.rules`) and cached: building the same transform again compiles
  nothing, and an op whose rule was swapped gets a step traced with the new rule;
* traceable: it can be called inside ``jax.jit``, ``jax.vmap`` and ``lax.scan``.

``f(*args)`` is ``f.jitted(*args)`` after the checks. Options of the transform are part of
its configuration (``clipped_grad``'s ``l2_clip``: a new value builds a new step).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable

import jax

from . import _sharding

__all__ = ["compiled", "compiled_on_mesh", "entry"]


@functools.lru_cache(maxsize=256)
def compiled(core: Callable, *config: Hashable) -> Callable:
    """``jax.jit(functools.partial(core, *config))``, one per ``(core, *config)``.

    ``config`` holds everything static (the model, the transform's options, the rules'
    identities); ``core(*config, *args)`` is traced once per input shape, as any jit. With
    inputs on Explicit mesh axes (``jax.make_mesh``'s default) the core runs under
    ``auto_axes``, its results typed like the arguments they are shaped like (the gradients
    like the parameters, per-example results like the batch): :mod:`jaxbp._sharding`.
    """
    step = functools.partial(core, *config)
    return jax.jit(functools.wraps(step.func)(lambda *args: _sharding.run(step, args)))


@functools.lru_cache(maxsize=64)
def compiled_on_mesh(core: Callable, *config: Hashable) -> Callable:
    """:func:`compiled` for a core that places its own ``shard_map`` on a mesh it is given
    (:func:`jaxbp.parallel.value_and_grad`): plain ``jax.jit``, no ``auto_axes``."""
    return jax.jit(functools.partial(core, *config))


def entry(step: Callable, check: Callable, name: str, doc: str | None = None) -> Callable:
    """``f(*args, **kwargs) = step(*check(*args, **kwargs))`` with ``f.jitted = step``.

    ``check`` validates and returns the arguments of ``step`` in its positional order."""

    def fn(*args, **kwargs):
        return step(*check(*args, **kwargs))

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    fn.__signature__ = inspect.signature(check)  # type: ignore[attr-defined]
    fn.jitted = step  # type: ignore[attr-defined]
    return fn
