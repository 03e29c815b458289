"""Beyond one device: data-, tensor- and vocabulary-parallel hand-written backward passes on
JAX meshes.

Everything runs on JAX's own distributed engine: a :class:`jax.sharding.Mesh` (as
``jax.make_mesh`` makes it: Explicit or Auto axes), ``shard_map`` and the collectives
``psum``/``pmax`` inside it; across hosts, ``jax.distributed.initialize`` makes one global
mesh of every process's devices and the same code runs unchanged.

This is the public face; the code lives in private modules:

* ``_mesh``   :func:`shard_map` across JAX versions, :func:`make_mesh`, :func:`shard`, and
  the layouts on Explicit axes;
* ``_vocab``  :func:`vocab_parallel_softmax_cross_entropy` (the rules of
  :mod:`jaxbp.losses` with the row reductions over the mesh axis) and
  :func:`vocab_parallel_linear_softmax_cross_entropy` (the chunked kernel of
  :mod:`jaxbp._xent`, likewise);
* ``_model``  any model of :mod:`jaxbp.model`'s interface on a mesh: data parallelism
  (:func:`value_and_grad` of a model of yours) and DP-SGD (:func:`clipped_grad`, every
  model), the model's own loops on each device's rows;
* ``_data``   :func:`value_and_grad`: the explicit loop of :mod:`jaxbp.nn` on each data
  shard, optionally with the last layer split over a second axis; for a
  :class:`jaxbp.GPT`, the loop of
* ``_gpt``    the GPT's explicit loop per device, with data, tensor (Megatron-LM) and
  vocabulary parallelism and every collective written beside its matrix product, on
* ``_layout`` :func:`gpt_param_specs`: where each parameter lives (a column split of the
  per-head qkv projection is a split by heads).

See ``docs/parallel.md``.
"""

from ._data import value_and_grad as value_and_grad
from ._layout import param_specs as gpt_param_specs
from ._mesh import P as P
from ._mesh import make_mesh as make_mesh
from ._mesh import shard as shard
from ._mesh import shard_map as shard_map
from ._model import clipped_grad as clipped_grad
from ._vocab import (
    vocab_parallel_linear_softmax_cross_entropy as vocab_parallel_linear_softmax_cross_entropy,
)
from ._vocab import (  # noqa: E501
    vocab_parallel_linear_softmax_cross_entropy_bwd as vocab_parallel_linear_softmax_cross_entropy_bwd,  # noqa: E501
)
from ._vocab import (
    vocab_parallel_linear_softmax_cross_entropy_fwd as vocab_parallel_linear_softmax_cross_entropy_fwd,  # noqa: E501
)
from ._vocab import vocab_parallel_softmax_cross_entropy as vocab_parallel_softmax_cross_entropy
from ._vocab import (
    vocab_parallel_softmax_cross_entropy_bwd as vocab_parallel_softmax_cross_entropy_bwd,
)
from ._vocab import (
    vocab_parallel_softmax_cross_entropy_fwd as vocab_parallel_softmax_cross_entropy_fwd,
)

__all__ = [
    "shard_map",
    "make_mesh",
    "shard",
    "value_and_grad",
    "clipped_grad",
    "gpt_param_specs",
    "vocab_parallel_softmax_cross_entropy",
    "vocab_parallel_softmax_cross_entropy_fwd",
    "vocab_parallel_softmax_cross_entropy_bwd",
    "vocab_parallel_linear_softmax_cross_entropy",
    "vocab_parallel_linear_softmax_cross_entropy_fwd",
    "vocab_parallel_linear_softmax_cross_entropy_bwd",
]
