"""Multi-layer perceptrons whose gradient is an explicit reverse loop over the ``_bwd`` rules.

Index letters::

    n  batch            i  input features of a layer      o  output features of a layer
    c  classes (the last layer's o)

A network ``x → dense → act → … → dense → loss``. Forward keeps each rule's residuals;
backward walks the layers in reverse, feeding each ``_bwd`` the gradient from the one above::

    g      = valid / n_valid                        (n,)     ∂(mean loss)/∂(per-example loss)
    δ_L    = loss_bwd(res, g)                       (n,c)    e.g. g·(p − y) for softmax CE
    dW_l   = a_{l−1}ᵀ δ_l   "ni,no->io";  db_l = Σₙ δ_l   "no->o"
    δ_{l−1}= act_bwd(δ_l · W_lᵀ)                    (n,i)    the first layer skips it

The loops call every rule through a :class:`jaxbp.Tape` (``t.fwd``, ``t.bwd``), which sends
``dW_l, db_l`` to ``params[l]``: :class:`MLP` implements :mod:`jaxbp.model`'s interface
(``forward``, ``backward``), so every transform runs on it. No ``jax.grad``, ``jax.vjp`` or
``custom_vjp`` dispatch runs inside :func:`jaxbp.value_and_grad`: the loop *is*
backpropagation. :func:`jaxbp.reference.value_and_grad` computes the same through
``jax.value_and_grad`` of a plain-jnp network of its own, for comparison.

The mean is over valid rows (``where`` / ``ignore_index``); if every row is masked the loss
and every gradient are 0 (PyTorch returns NaN there; we prefer a step that does nothing).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from ._checks import check_label_range
from ._op import rules
from ._tape import Tape
from .activations import ACTIVATIONS
from .dense import dense
from .losses import (
    _validate_ce,
    mse,
    sigmoid_binary_cross_entropy,
    softmax_cross_entropy,
    valid_rows,
    validate_ce_options,
)
from .model import mean_and_seed

__all__ = [
    "MLP", "LOSSES", "LOSS_OPS", "LoopOps", "Params", "backward", "forward", "forward_backward",
    "loop_ops",
]  # fmt: skip

Params = list[dict[str, jax.Array]]

# The loss ops by the names MLP(loss=...) takes.
LOSS_OPS: dict[str, Callable] = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "sigmoid_binary_cross_entropy": sigmoid_binary_cross_entropy,
    "mse": mse,
}
LOSSES = tuple(LOSS_OPS)

# What MLP.apply(ops=None) uses: jaxbp's own ops (ops=jaxbp.reference swaps in the twins).
_OPS = types.SimpleNamespace(dense=dense, **ACTIVATIONS, **LOSS_OPS)


CE_OPTIONS = ("label_smoothing", "z_loss", "ignore_index")


def _keyword_options(fn) -> tuple[str, ...]:
    """The keyword-only options of an activation (``negative_slope``, ``approximate``)."""
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _frozen(options: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((options or {}).items()))


@dataclasses.dataclass(frozen=True)
class MLP:
    """A multi-layer perceptron ``sizes[0] → … → sizes[-1]`` with one loss on top.

    Args:
      sizes: layer widths, input first: ``(i, h₁, …, c)``; at least two.
      activation: one of ``jaxbp.ACTIVATIONS`` (``relu``, ``leaky_relu``, ``sigmoid``,
        ``tanh``, ``gelu``, ``softplus``), applied after every layer but the last.
      loss: ``softmax_cross_entropy`` (integer labels ``(n,)`` or probabilities ``(n,c)``),
        ``sigmoid_binary_cross_entropy`` (labels ``(n,c)`` in [0,1], mean over ``c``) or
        ``mse`` (targets ``(n,c)``).
      activation_options: e.g. ``{"negative_slope": 0.1}`` or ``{"approximate": False}``.
      loss_options: static loss options, e.g. ``{"label_smoothing": 0.1, "z_loss": 1e-4,
        "ignore_index": -100}`` for softmax cross-entropy.

    The model is hashable and holds no arrays: parameters are a separate pytree, a list of
    ``{"w": (i, o), "b": (o,)}`` per layer, so optax takes the gradients as they are.
    """

    sizes: tuple[int, ...]
    activation: str = "relu"
    loss: str = "softmax_cross_entropy"
    activation_options: tuple[tuple[str, Any], ...] | Mapping[str, Any] = ()
    loss_options: tuple[tuple[str, Any], ...] | Mapping[str, Any] = ()
    # x, labels, where: per example; class_weights (c,): the same for every example
    batch_axes: ClassVar[tuple] = (0, 0, 0, None)

    def __post_init__(self):
        sizes = tuple(int(s) for s in self.sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes: expected at least two positive widths, got {self.sizes!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {list(LOSSES)}, got {self.loss!r}")
        object.__setattr__(self, "sizes", sizes)
        for name in ("activation_options", "loss_options"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, _frozen(value))
        if self.loss != "softmax_cross_entropy" and self.loss_options:
            raise ValueError(f"loss_options: {self.loss} takes no options, got {self.loss_options}")
        self._check_options()

    def _check_options(self):
        """Unknown option names and bad option values fail here, when the model is built."""
        act_keys = _keyword_options(ACTIVATIONS[self.activation])
        for name, given, valid in (
            ("activation_options", self.activation_options, act_keys),
            ("loss_options", self.loss_options, CE_OPTIONS),
        ):
            unknown = sorted(k for k, _ in given if k not in valid)
            if unknown:
                what = self.activation if name == "activation_options" else self.loss
                raise ValueError(
                    f"{name}: unknown option {', '.join(map(repr, unknown))} for {what}; "
                    f"expected some of {sorted(valid) or 'none'}"
                )
        if self.loss == "softmax_cross_entropy":
            opts = dict(self.loss_options)
            validate_ce_options(
                (), self.sizes[-1], None, None, opts.get("label_smoothing", 0.0),
                opts.get("ignore_index"), opts.get("z_loss", 0.0),
            )  # fmt: skip

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    def init(self, key: jax.Array, dtype: Any = jnp.float32) -> Params:
        """Parameters: ``w (i, o)`` drawn ``N(0, gain/i)`` (He for relu-like), ``b (o,)`` zeros."""
        gain = 2.0 if self.activation in ("relu", "leaky_relu", "gelu") else 1.0
        keys = jax.random.split(key, self.num_layers)
        return [
            {
                "w": (jax.random.normal(k, (i, o), jnp.float32) * math.sqrt(gain / i)).astype(
                    dtype
                ),
                "b": jnp.zeros((o,), dtype),
            }
            for k, i, o in zip(keys, self.sizes[:-1], self.sizes[1:], strict=True)
        ]

    # -- forward ---------------------------------------------------------------------------

    def apply(self, params: Params, x: jax.Array, *, ops: Any = None) -> jax.Array:
        """Outputs ``(n, c)`` (logits for the cross-entropies) for inputs ``x (n, i)``.

        ``ops`` is the module whose ops are used: ``jaxbp`` (default, custom rules) or
        ``jaxbp.reference`` (plain jnp): they share names and signatures.
        """
        ops = _ops(ops)
        self._check_params(params)
        act = getattr(ops, self.activation)
        h = x
        for layer, p in enumerate(params):
            h = ops.dense(h, p["w"], p["b"])
            if layer < self.num_layers - 1:
                h = act(h, **dict(self.activation_options))
        return h

    def per_example_loss(self, params, x, labels, *, class_weights=None, ops=None):
        """Per-example losses ``(n,)`` (masked rows are handled by :meth:`mean_loss`)."""
        ops = _ops(ops)
        out = self.apply(params, x, ops=ops)
        if self.loss == "softmax_cross_entropy":
            return ops.softmax_cross_entropy(
                out, labels, class_weights=class_weights, **dict(self.loss_options)
            )
        if self.loss == "mse":
            return ops.mse(out, labels)
        return jnp.mean(ops.sigmoid_binary_cross_entropy(out, labels), axis=-1)

    def mean_loss(self, params, x, labels, *, where=None, class_weights=None, ops=None):
        """Mean loss over valid rows: a scalar, differentiable with ``jax.grad``."""
        per_ex = self.per_example_loss(params, x, labels, class_weights=class_weights, ops=ops)
        valid = self.valid(labels, where, n=per_ex.shape[0])
        total = jnp.sum(jnp.where(valid, per_ex, 0.0))
        return total / jnp.maximum(jnp.sum(valid), 1).astype(total.dtype)

    def valid(self, labels, where=None, *, n=None) -> jax.Array:
        """Bool ``(n,)``: rows that count (``where`` and, for integer labels, not ignored)."""
        n = labels.shape[0] if n is None else n
        if self.loss == "softmax_cross_entropy":
            ignore = dict(self.loss_options).get("ignore_index")
            return valid_rows(labels, where, ignore_index=ignore, batch_shape=(n,))
        return jnp.ones((n,), bool) if where is None else jnp.asarray(where, bool)

    # -- the explicit loops (jaxbp.model's interface) ------------------------------------

    def forward(self, t, params, x, labels, where=None, class_weights=None):
        """:func:`jaxbp.nn.forward`: ``(per-example losses (n,), valid (n,), state)``."""
        return forward(self, t, params, x, labels, where, class_weights)

    def backward(self, t, state, seed) -> None:
        """:func:`jaxbp.nn.backward`: the reverse loop from ``seed (n,)``."""
        backward(self, t, state, seed)

    # -- checks ----------------------------------------------------------------------------

    def _check_params(self, params):
        if not isinstance(params, list | tuple) or len(params) != self.num_layers:
            got = len(params) if isinstance(params, list | tuple) else type(params).__name__
            raise ValueError(f"params: expected a list of {self.num_layers} layers, got {got}")
        for layer, (p, i, o) in enumerate(
            zip(params, self.sizes[:-1], self.sizes[1:], strict=True)
        ):
            w, b = np.shape(p["w"]), np.shape(p["b"])
            if w != (i, o) or b != (o,):
                raise ValueError(
                    f"params[{layer}]: expected w {(i, o)} and b {(o,)}, got w {w} and b {b}"
                )

    def check_inputs(self, params, x, labels, where=None, class_weights=None):
        """Validate shapes and dtypes (clear errors at trace time; label values when concrete).

        Returns ``(params, x, labels, where, class_weights)`` as arrays: Python lists and
        NumPy arrays are accepted wherever an array is. ``x`` and every parameter must share
        one floating dtype (``TypeError`` naming the first parameter that differs: nothing
        is promoted); float labels and class weights are data, cast to ``x``'s dtype as the
        loss ops cast their targets.
        """
        self._check_params(params)
        params = type(params)(
            {**p, "w": _checks.floating(f"params[{layer}]['w']", p["w"]),
             "b": _checks.floating(f"params[{layer}]['b']", p["b"])}
            for layer, p in enumerate(params)
        )  # fmt: skip
        x = _checks.floating("x", x)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"x: expected shape (n, {self.sizes[0]}), got {x.shape}")
        _check_one_dtype(params, x.dtype)
        n, c = x.shape[0], self.sizes[-1]
        labels = _checks.as_array(labels)
        if self.loss == "softmax_cross_entropy":
            opts = dict(self.loss_options)
            fake = jax.ShapeDtypeStruct((n, c), x.dtype)
            _validate_ce(
                fake, labels, where, class_weights, opts.get("label_smoothing", 0.0),
                opts.get("ignore_index"), opts.get("z_loss", 0.0),
            )  # fmt: skip
            check_label_range(labels, c, opts.get("ignore_index"), where=where)
            if jnp.issubdtype(labels.dtype, jnp.floating):
                labels = labels.astype(x.dtype)  # probabilities: data, in the network's dtype
        else:
            labels = _checks.floating("labels", labels)
            if labels.shape != (n, c):
                raise ValueError(f"labels: expected shape (n, c) = {(n, c)}, got {labels.shape}")
            labels = labels.astype(x.dtype)  # targets: data, in the network's dtype
            if where is not None and np.shape(where) != (n,):
                raise ValueError(f"where: expected shape (n,) = ({n},), got {np.shape(where)}")
            if class_weights is not None:
                raise ValueError(f"class_weights: only for softmax_cross_entropy, not {self.loss}")
        if where is not None:
            where = _checks.as_array(where)
        if class_weights is not None:
            class_weights = _checks.floating("class_weights", class_weights).astype(x.dtype)
        return params, x, labels, where, class_weights


def _check_one_dtype(params, dtype) -> None:
    """Parameters in ``x``'s dtype, or a ``TypeError``: jnp would promote float32 parameters
    and a float64 ``x`` to a float64 network (twice the memory, a fraction of the speed on a
    GPU) only for autodiff to cast the gradients back to float32 (docs/edge_cases.md)."""
    for layer, p in enumerate(params):
        for name in ("w", "b"):
            if p[name].dtype != dtype:
                raise TypeError(
                    f"params[{layer}][{name!r}]: expected the dtype of x ({dtype}), got "
                    f"{p[name].dtype}; nothing is promoted: cast x (x.astype(jnp."
                    f"{p[name].dtype})) or the parameters (jax.tree.map(lambda a: "
                    f"a.astype(jnp.{dtype}), params))"
                )


def _ops(ops):
    return _OPS if ops is None else ops


@dataclasses.dataclass(frozen=True)
class LoopOps:
    """The ops the explicit loop runs, each carrying its ``.fwd``/``.bwd`` rules.

    ``head`` is the last layer's dense op (``dense`` unless a transform needs its own: the
    vocab-parallel last layer of :mod:`jaxbp.parallel` sums its input gradient over the class
    shards). The loop reads the rules from these objects when it is traced.
    """

    dense: Any
    activation: Any
    loss: Any
    head: Any = None

    def rules(self) -> tuple:
        """The rules the ops hold now: part of every compiled loop's cache key."""
        return rules(self.dense, self.activation, self.loss, self.head or self.dense)


def _layer_op(ops: LoopOps, layer: int, num_layers: int):
    """The dense op of ``layer``: ``ops.head`` for the last one when given."""
    return ops.head if layer == num_layers - 1 and ops.head is not None else ops.dense


def loop_ops(model: MLP) -> LoopOps:
    """The ops of ``model``'s explicit loop: :func:`jaxbp.dense`, its activation, its loss."""
    return LoopOps(dense, ACTIVATIONS[model.activation], LOSS_OPS[model.loss])


def forward(
    model: MLP, t: Tape, params, x, labels, where, class_weights, *, ops: LoopOps | None = None
):  # fmt: skip
    """Forward through the ops' ``fwd`` rules: per-example losses ``(n,)``, valid rows and the
    residuals, in the order :func:`backward` consumes them."""
    ops = loop_ops(model) if ops is None else ops
    act_opts = dict(model.activation_options)
    L = model.num_layers
    dense_res, act_res, h = [], [], x
    for layer, p in enumerate(params):
        h, r = t.fwd(_layer_op(ops, layer, L), h, p["w"], p["b"])  # "ni,io->no"
        dense_res.append(r)
        if layer < L - 1:
            h, r = t.fwd(ops.activation, h, **act_opts)
            act_res.append(r)
    opts = dict(model.loss_options)
    if model.loss == "softmax_cross_entropy":
        per_ex, loss_res = t.fwd(ops.loss, h, labels, where, class_weights, **opts)
    elif model.loss == "mse":
        per_ex, loss_res = t.fwd(ops.loss, h, labels.astype(h.dtype))
    else:
        elem, loss_res = t.fwd(ops.loss, h, labels.astype(h.dtype))  # (n, c)
        per_ex = jnp.mean(elem, axis=-1)
    valid = model.valid(labels, where, n=x.shape[0])
    return per_ex, valid, (h.shape, loss_res, dense_res, act_res)


def backward(model: MLP, t: Tape, state, seed, *, ops: LoopOps | None = None) -> None:
    """Reverse loop from the per-row seed ``s (n,) = ∂L/∂ℓ_k``; each layer's ``dw, db`` go
    to ``params[l]["w"], ["b"]`` through the tape.

    ``δ_l = s_k·∂ℓ_k/∂z_l (n, o)`` flows down: ``dense.bwd`` gives ``δ·wᵀ`` (layer 0's is
    computed and dropped: under ``jit`` XLA removes it), the activation's ``bwd`` turns it
    into the ``δ`` of the layer below.
    """
    ops = loop_ops(model) if ops is None else ops
    shape, loss_res, dense_res, act_res = state
    opts, act_opts = dict(model.loss_options), dict(model.activation_options)
    if model.loss == "sigmoid_binary_cross_entropy":  # the mean over c: s/c on every entry
        delta, _ = t.bwd(ops.loss, loss_res, jnp.broadcast_to((seed / shape[-1])[:, None], shape))
    else:
        delta, _ = t.bwd(ops.loss, loss_res, seed, **opts)  # (n, c), e.g. s·(p − y)
    for layer in reversed(range(model.num_layers)):
        # dx "no,io->ni", dw "ni,no->io" and db "no->o" to params[layer]
        (dx,) = t.bwd(_layer_op(ops, layer, model.num_layers), dense_res[layer], delta,
                      params=(layer,))  # fmt: skip
        if layer > 0:
            (delta,) = t.bwd(ops.activation, act_res[layer - 1], dx, **act_opts)


def forward_backward(
    model: MLP, params, x, labels, where=None, class_weights=None, *, ops: LoopOps | None = None
):  # fmt: skip
    """The explicit loop, unjitted: ``(mean loss, grads, per_example_loss)``.

    The seed is ``g = valid / n_valid (n,)``, the derivative of the mean over valid rows;
    ``grads`` has the structure of ``params``. ``ops`` (default :func:`loop_ops`) are the ops
    whose rules run (:mod:`jaxbp.parallel` swaps the last layer's).
    """
    t = Tape()
    per_ex, valid, state = forward(model, t, params, x, labels, where, class_weights, ops=ops)
    loss, seed = mean_and_seed(per_ex, valid)
    backward(model, t, state, seed, ops=ops)
    return loss, t.gradients(params), per_ex
