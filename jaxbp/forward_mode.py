"""Forward mode through jaxbp's ops: ``jax.jvp``, ``jax.jacfwd``, ``jax.linearize`` and
``jax.hessian`` run the hand-written ``op.jvp`` rules.

Every public op of :mod:`jaxbp` is a ``jax.custom_vjp``, so that ``jax.grad`` runs its
hand-written ``op.bwd``; JAX has no forward mode through a ``custom_vjp``, and no public JAX
construct gives one function both (docs/forward_mode.md shows why, error by error). Here is
each op's *forward-mode twin*: the same name, signature, options and validation, through a
``jax.custom_jvp`` whose rule runs ``op.fwd`` and then ``op.jvp(res, tangents)``::

    import jaxbp.forward_mode as fm
    s, ds = jax.jvp(fm.softmax, (z,), (dz,))       # runs softmax_fwd, then softmax_jvp
    J = jax.jacfwd(fm.dense, argnums=1)(x, w, b)   # column by column through dense_jvp

Which to call:

=========================  =====================================  ==========================
                           ``jaxbp.op``                           ``jaxbp.forward_mode.op``
=========================  =====================================  ==========================
``jax.grad``, ``vjp``      runs ``op.bwd``                        JAX's transpose of ``op.jvp``
``jax.jvp``, ``jacfwd``,   ``TypeError`` (no forward mode         runs ``op.jvp``
``linearize``, ``hessian`` through a ``custom_vjp``)
=========================  =====================================  ==========================

Both run ``op.fwd`` for the value and compose with ``jit``, ``vmap`` and ``shard_map``. Under
``jax.hessian`` (forward over reverse) the twin's second order is JAX's derivative of the
hand-written ``op.fwd`` and ``op.jvp``. Integer and bool arguments (labels, ids, masks, the
dropout key) get ``float0`` tangents, as ``jax.jvp`` gives them. :func:`of` builds the twin
of any op, a :class:`jaxbp.Op` with a ``jvp`` rule included.
"""

from __future__ import annotations

from . import activations as _act
from . import losses as _losses
from . import norms as _norms
from ._op import forward_mode as of
from .attention import attention as _attention
from .dense import dense as _dense
from .dropout import dropout as _dropout
from .embedding import embedding as _embedding
from .embedding import position_embedding as _position_embedding
from .fused import linear_softmax_cross_entropy as _fused
from .softmax import log_softmax as _log_softmax
from .softmax import softmax as _softmax

__all__ = [
    "of", "dense", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softplus", "silu",
    "swish", "softmax", "log_softmax", "mse", "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy", "linear_softmax_cross_entropy", "embedding",
    "position_embedding", "layer_norm", "rms_norm", "attention", "dropout",
]  # fmt: skip

dense = of(_dense)
relu = of(_act.relu)
leaky_relu = of(_act.leaky_relu)
sigmoid = of(_act.sigmoid)
tanh = of(_act.tanh)
gelu = of(_act.gelu)
softplus = of(_act.softplus)
silu = of(_act.silu)
swish = silu  # an alias, as jaxbp.swish is jaxbp.silu
softmax = of(_softmax)
log_softmax = of(_log_softmax)
mse = of(_losses.mse)
sigmoid_binary_cross_entropy = of(_losses.sigmoid_binary_cross_entropy)
softmax_cross_entropy = of(_losses.softmax_cross_entropy)
linear_softmax_cross_entropy = of(_fused)
embedding = of(_embedding)
position_embedding = of(_position_embedding)
layer_norm = of(_norms.layer_norm)
rms_norm = of(_norms.rms_norm)
attention = of(_attention)
dropout = of(_dropout)
