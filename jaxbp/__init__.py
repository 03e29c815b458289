"""jaxbp: hand-written, jitted backward passes for neural-network layers in JAX.

Every op is a ``jax.custom_vjp`` triple ``op``, ``op_fwd``, ``op_bwd``, with the same op in
plain ``jax.numpy`` under :mod:`jaxbp.reference`, and a forward-mode rule ``op_jvp`` that its
twin under :mod:`jaxbp.forward_mode` runs under ``jax.jvp``. See ``docs/backprop.md`` for the math.
"""

from . import curvature as curvature
from . import forward_mode as forward_mode
from . import model as model
from . import parallel as parallel
from . import per_example as per_example
from . import plots as plots
from . import reference as reference
from ._checks import checked as checked
from ._op import bind_references as _bind_references
from ._tape import Tape as Tape
from ._tape import transposed as transposed
from ._userop import Op as Op
from .activations import ACTIVATIONS as ACTIVATIONS
from .activations import gelu as gelu
from .activations import gelu_bwd as gelu_bwd
from .activations import gelu_fwd as gelu_fwd
from .activations import gelu_jvp as gelu_jvp
from .activations import leaky_relu as leaky_relu
from .activations import leaky_relu_bwd as leaky_relu_bwd
from .activations import leaky_relu_fwd as leaky_relu_fwd
from .activations import leaky_relu_jvp as leaky_relu_jvp
from .activations import relu as relu
from .activations import relu_bwd as relu_bwd
from .activations import relu_fwd as relu_fwd
from .activations import relu_jvp as relu_jvp
from .activations import sigmoid as sigmoid
from .activations import sigmoid_bwd as sigmoid_bwd
from .activations import sigmoid_fwd as sigmoid_fwd
from .activations import sigmoid_jvp as sigmoid_jvp
from .activations import silu as silu
from .activations import silu_bwd as silu_bwd
from .activations import silu_fwd as silu_fwd
from .activations import silu_jvp as silu_jvp
from .activations import softplus as softplus
from .activations import softplus_bwd as softplus_bwd
from .activations import softplus_fwd as softplus_fwd
from .activations import softplus_jvp as softplus_jvp
from .activations import swish as swish
from .activations import swish_bwd as swish_bwd
from .activations import swish_fwd as swish_fwd
from .activations import swish_jvp as swish_jvp
from .activations import tanh as tanh
from .activations import tanh_bwd as tanh_bwd
from .activations import tanh_fwd as tanh_fwd
from .activations import tanh_jvp as tanh_jvp
from .attention import attention as attention
from .attention import attention_bwd as attention_bwd
from .attention import attention_fwd as attention_fwd
from .attention import attention_jvp as attention_jvp
from .curvature import ggn_vector_product as ggn_vector_product
from .curvature import hessian_vector_product as hessian_vector_product
from .custom import CheckReport as CheckReport
from .custom import check as check
from .datasets import load_digits as load_digits
from .datasets import load_shakespeare as load_shakespeare
from .dense import dense as dense
from .dense import dense_bwd as dense_bwd
from .dense import dense_fwd as dense_fwd
from .dense import dense_jvp as dense_jvp
from .dropout import dropout as dropout
from .dropout import dropout_bwd as dropout_bwd
from .dropout import dropout_fwd as dropout_fwd
from .dropout import dropout_jvp as dropout_jvp
from .embedding import embedding as embedding
from .embedding import embedding_bwd as embedding_bwd
from .embedding import embedding_fwd as embedding_fwd
from .embedding import embedding_jvp as embedding_jvp
from .embedding import position_embedding as position_embedding
from .embedding import position_embedding_bwd as position_embedding_bwd
from .embedding import position_embedding_fwd as position_embedding_fwd
from .embedding import position_embedding_jvp as position_embedding_jvp
from .explain import explain as explain
from .fused import linear_softmax_cross_entropy as linear_softmax_cross_entropy
from .fused import linear_softmax_cross_entropy_bwd as linear_softmax_cross_entropy_bwd
from .fused import linear_softmax_cross_entropy_fwd as linear_softmax_cross_entropy_fwd
from .fused import linear_softmax_cross_entropy_jvp as linear_softmax_cross_entropy_jvp
from .gpt import GPT as GPT
from .gradcheck import compare as compare
from .jacobian import jacobian as jacobian
from .kfac import diag_ggn as diag_ggn
from .kfac import kfac_factors as kfac_factors
from .losses import mse as mse
from .losses import mse_bwd as mse_bwd
from .losses import mse_fwd as mse_fwd
from .losses import mse_jvp as mse_jvp
from .losses import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from .losses import sigmoid_binary_cross_entropy_bwd as sigmoid_binary_cross_entropy_bwd
from .losses import sigmoid_binary_cross_entropy_fwd as sigmoid_binary_cross_entropy_fwd
from .losses import sigmoid_binary_cross_entropy_jvp as sigmoid_binary_cross_entropy_jvp
from .losses import softmax_cross_entropy as softmax_cross_entropy
from .losses import softmax_cross_entropy_bwd as softmax_cross_entropy_bwd
from .losses import softmax_cross_entropy_fwd as softmax_cross_entropy_fwd
from .losses import softmax_cross_entropy_jvp as softmax_cross_entropy_jvp
from .model import value_and_grad as value_and_grad
from .nn import MLP as MLP
from .norms import layer_norm as layer_norm
from .norms import layer_norm_bwd as layer_norm_bwd
from .norms import layer_norm_fwd as layer_norm_fwd
from .norms import layer_norm_jvp as layer_norm_jvp
from .norms import rms_norm as rms_norm
from .norms import rms_norm_bwd as rms_norm_bwd
from .norms import rms_norm_fwd as rms_norm_fwd
from .norms import rms_norm_jvp as rms_norm_jvp
from .per_example import clipped_grad as clipped_grad
from .per_example import per_example_grad_norms as per_example_grad_norms
from .per_example import per_example_grads as per_example_grads
from .softmax import log_softmax as log_softmax
from .softmax import log_softmax_bwd as log_softmax_bwd
from .softmax import log_softmax_fwd as log_softmax_fwd
from .softmax import log_softmax_jvp as log_softmax_jvp
from .softmax import softmax as softmax
from .softmax import softmax_bwd as softmax_bwd
from .softmax import softmax_fwd as softmax_fwd
from .softmax import softmax_jacobian as softmax_jacobian
from .softmax import softmax_jvp as softmax_jvp

__version__ = "0.1.0"

# Every op carries its plain twin as op.reference (jaxbp/_op.py): bound here, once, because
# the reference package imports after the rules.
_bind_references(
    [
        (dense, reference.dense),
        (relu, reference.relu),
        (leaky_relu, reference.leaky_relu),
        (sigmoid, reference.sigmoid),
        (tanh, reference.tanh),
        (gelu, reference.gelu),
        (softplus, reference.softplus),
        (silu, reference.silu),  # swish is silu, and reference.swish is reference.silu
        (softmax, reference.softmax),
        (log_softmax, reference.log_softmax),
        (mse, reference.mse),
        (sigmoid_binary_cross_entropy, reference.sigmoid_binary_cross_entropy),
        (softmax_cross_entropy, reference.softmax_cross_entropy),
        (linear_softmax_cross_entropy, reference.linear_softmax_cross_entropy),
        (embedding, reference.embedding),
        (position_embedding, reference.position_embedding),
        (layer_norm, reference.layer_norm),
        (rms_norm, reference.rms_norm),
        (attention, reference.attention),
        (dropout, reference.dropout),
    ]
)

__all__ = [
    "reference", "parallel", "plots", "forward_mode", "checked", "jacobian", "ACTIVATIONS", "MLP",
    "value_and_grad",
    "per_example", "per_example_grads", "per_example_grad_norms", "clipped_grad",
    "curvature", "ggn_vector_product", "hessian_vector_product", "diag_ggn", "kfac_factors",
    "dense", "dense_fwd", "dense_bwd", "dense_jvp",
    "relu", "relu_fwd", "relu_bwd", "relu_jvp",
    "leaky_relu", "leaky_relu_fwd", "leaky_relu_bwd", "leaky_relu_jvp",
    "sigmoid", "sigmoid_fwd", "sigmoid_bwd", "sigmoid_jvp",
    "tanh", "tanh_fwd", "tanh_bwd", "tanh_jvp",
    "gelu", "gelu_fwd", "gelu_bwd", "gelu_jvp",
    "softplus", "softplus_fwd", "softplus_bwd", "softplus_jvp",
    "silu", "silu_fwd", "silu_bwd", "silu_jvp",
    "swish", "swish_fwd", "swish_bwd", "swish_jvp",
    "softmax", "softmax_fwd", "softmax_bwd", "softmax_jvp",
    "log_softmax", "log_softmax_fwd", "log_softmax_bwd", "log_softmax_jvp",
    "softmax_jacobian",
    "mse", "mse_fwd", "mse_bwd", "mse_jvp",
    "sigmoid_binary_cross_entropy",
    "sigmoid_binary_cross_entropy_fwd",
    "sigmoid_binary_cross_entropy_bwd", "sigmoid_binary_cross_entropy_jvp",
    "softmax_cross_entropy", "softmax_cross_entropy_fwd", "softmax_cross_entropy_bwd",
    "softmax_cross_entropy_jvp",
    "linear_softmax_cross_entropy", "linear_softmax_cross_entropy_fwd",
    "linear_softmax_cross_entropy_bwd", "linear_softmax_cross_entropy_jvp",
    "embedding", "embedding_fwd", "embedding_bwd", "embedding_jvp",
    "position_embedding", "position_embedding_fwd", "position_embedding_bwd",
    "position_embedding_jvp",
    "layer_norm", "layer_norm_fwd", "layer_norm_bwd", "layer_norm_jvp",
    "rms_norm", "rms_norm_fwd", "rms_norm_bwd", "rms_norm_jvp",
    "attention", "attention_fwd", "attention_bwd", "attention_jvp",
    "dropout", "dropout_fwd", "dropout_bwd", "dropout_jvp",
    "GPT", "compare", "explain", "load_digits", "load_shakespeare",
    "Op", "check", "CheckReport", "model", "Tape", "transposed",
]  # fmt: skip
