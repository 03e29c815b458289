"""The same ops as :mod:`jaxbp`, written in plain ``jax.numpy`` and differentiated by JAX.

Same names, same signatures, same shapes, same validation: a test or a benchmark swaps
``jaxbp.op`` for ``jaxbp.reference.op``. Nothing here has a custom rule; ``jax.grad`` of these
functions runs JAX's own transposes. They are also what forward mode (``jax.jvp``,
``jax.jacfwd``) should use, since a ``custom_vjp`` does not support it.

This package is an oracle: it may share input *validation* with the hand-written rules, but
no code that computes a value.
"""

from ._ops import *  # noqa: F403
from ._ops import __all__ as _ops_all

__all__ = [*_ops_all]
