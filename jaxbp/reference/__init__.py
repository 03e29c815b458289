"""The same ops as :mod:`jaxbp`, written in plain ``jax.numpy`` and differentiated by JAX.

Same names, same signatures, same shapes, same validation: a test or a benchmark swaps
``jaxbp.op`` for ``jaxbp.reference.op``. Nothing here has a custom rule; ``jax.grad`` of these
functions runs JAX's own transposes. They are also what forward mode (``jax.jvp``,
``jax.jacfwd``) should use, since a ``custom_vjp`` does not support it.

This package is an oracle: it may share input *validation* with the hand-written rules, but
no code that computes a value. ``_ops`` holds the ops, ``_nn`` the network
(:func:`value_and_grad`), ``_per_example`` the per-example transforms and DP-SGD,
``_transformer`` the transformer ops (embedding, norms, attention).
"""

from ._nn import *  # noqa: F403
from ._nn import __all__ as _nn_all
from ._ops import *  # noqa: F403
from ._ops import __all__ as _ops_all
from ._per_example import *  # noqa: F403
from ._per_example import __all__ as _per_example_all
from ._transformer import *  # noqa: F403
from ._transformer import __all__ as _transformer_all

__all__ = [*_ops_all, *_nn_all, *_per_example_all, *_transformer_all]
