"""One parametrised settings list per op, with readable ids (as BackPACK's test settings).

A :class:`Case` is an op name (the same under ``jaxbp`` and ``jaxbp.reference``), a recipe
for its named array arguments, its static options and the names of the arguments to
differentiate. Inputs keep away from 0 (``|z| ≥ 0.1``) so that no finite-difference step
crosses the kink of ``relu``/``leaky_relu``. Tests and benchmarks reuse these lists::

    @pytest.mark.parametrize("case", ACTIVATION_CASES, ids=str)
    def test_something(case):
        arrays = case.arrays(jnp.float32)
        out = case.op(**arrays, **case.options)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxbp

N, I, O, C = 4, 3, 5, 6  # batch, in, out, classes: small, so that compiles stay cheap
D, V = 5, 7  # model dimension, vocabulary (embedding rows)
H, T, E = 2, 4, 3  # heads, sequence length, head dimension


def away_from_zero(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    """Values with ``0.1·scale ≤ |x| ≤ 2·scale`` and random signs (no relu kink nearby)."""
    mag = rng.uniform(0.1, 2.0, size=shape) * scale
    return mag * rng.choice([-1.0, 1.0], size=shape)


def probabilities(rng: np.random.Generator, shape, total: float = 1.0) -> np.ndarray:
    """Rows of non-negative values summing to ``total`` along the last axis."""
    p = rng.uniform(0.05, 1.0, size=shape)
    return total * p / p.sum(-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Case:
    """One op with one set of options.

    ``make(rng) -> {name: np.ndarray}`` builds the arguments (floating arrays are cast to the
    requested dtype by :meth:`arrays`; integer labels and bool masks keep theirs). ``diff``
    names the floating arguments whose gradients are compared.
    """

    id: str
    name: str
    make: Callable[[np.random.Generator], dict]
    options: dict = dataclasses.field(default_factory=dict)
    diff: tuple[str, ...] = ()
    seed: int = 0

    def __str__(self) -> str:
        return self.id

    @property
    def op(self) -> Callable:
        return getattr(jaxbp, self.name)

    @property
    def ref(self) -> Callable:
        return self.op.reference

    @property
    def fwd(self) -> Callable:
        return self.op.fwd

    @property
    def bwd(self) -> Callable:
        return self.op.bwd

    def arrays(self, dtype=jnp.float64) -> dict:
        raw = self.make(np.random.default_rng(self.seed))
        return {
            k: jnp.asarray(v, dtype) if np.issubdtype(np.asarray(v).dtype, np.floating)
            else jnp.asarray(v)
            for k, v in raw.items()
        }  # fmt: skip

    def fwd_index(self, name: str) -> int:
        """Position of argument ``name`` among ``op_fwd``'s positional parameters, which is
        also the position of its cotangent in ``op_bwd``'s result."""
        params = [
            p.name
            for p in inspect.signature(self.fwd).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        return params.index(name)


def cotangent(out: jax.Array, seed: int = 1) -> jax.Array:
    """A random upstream gradient of ``out``'s shape and dtype."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=out.shape), out.dtype)


def grad_of(fn: Callable, case: Case, arrays: dict, cot: jax.Array, *, jit: bool = False) -> dict:
    """``jax.grad`` of ``Σ cot ⊙ fn(**arrays)`` with respect to ``case.diff``.

    Under ``jit`` by default: one compile per shape instead of one per primitive, which is
    what keeps the property tests fast. The value checks that need concrete labels are
    exercised eagerly by tests/test_edge_cases.py.
    """

    def grad(arrays, cot):
        def scalar(d):
            out = fn(**{**arrays, **d}, **case.options)
            return jnp.sum(out * cot)

        return jax.grad(scalar)({k: arrays[k] for k in case.diff})

    return (jax.jit(grad) if jit else grad)(arrays, cot)


def bwd_direct(case: Case, arrays: dict, cot: jax.Array) -> dict:
    """``op_bwd`` called on ``op_fwd``'s residuals, the cotangents of ``case.diff``."""
    out, res = case.fwd(**arrays, **case.options)
    cts = case.bwd(res, cot, **case.options)
    return {k: cts[case.fwd_index(k)] for k in case.diff}


# ------------------------------------------------------------------------------- cases


def _dense(bias: bool, batch=(N,)):
    def make(rng):
        d = {"x": away_from_zero(rng, (*batch, I)), "w": away_from_zero(rng, (I, O))}
        if bias:
            d["b"] = away_from_zero(rng, (O,))
        return d

    return make


DENSE_CASES = [
    Case("dense-bias", "dense", _dense(True), diff=("x", "w", "b")),
    Case("dense-nobias", "dense", _dense(False), diff=("x", "w")),
    Case("dense-3d-batch", "dense", _dense(True, (2, 3)), diff=("x", "w", "b")),
    Case("dense-1d-x", "dense", _dense(True, ()), diff=("x", "w", "b")),
]


def _z(shape=(N, C), scale=1.0):
    return lambda rng: {"z": away_from_zero(rng, shape, scale)}


ACTIVATION_CASES = [
    Case("relu", "relu", _z(), diff=("z",)),
    Case("leaky_relu-default", "leaky_relu", _z(), diff=("z",)),
    Case("leaky_relu-slope0.2", "leaky_relu", _z(), {"negative_slope": 0.2}, diff=("z",)),
    Case("sigmoid", "sigmoid", _z(scale=3.0), diff=("z",)),
    Case("tanh", "tanh", _z(), diff=("z",)),
    Case("gelu-tanh", "gelu", _z(scale=2.0), {"approximate": True}, diff=("z",)),
    Case("gelu-erf", "gelu", _z(scale=2.0), {"approximate": False}, diff=("z",)),
    Case("softplus", "softplus", _z(scale=3.0), diff=("z",)),
    Case("silu", "silu", _z(scale=3.0), diff=("z",)),
    Case("relu-3d", "relu", _z((2, 3, 4)), diff=("z",)),
]


def _z_where(mask_shape, scale=2.0):
    """Logits ``(N, C)`` and a mask: entry (2, 0) kept (tests/test_edge_cases.py puts a NaN
    there), and with a per-row mask ``(N, 1)`` row 1 masked whole."""

    def make(rng):
        where = rng.uniform(size=mask_shape) < 0.6
        where[2, 0] = True
        if mask_shape[-1] == 1:
            where[:, 0] = True
            where[1, 0] = False  # a fully masked row
        return {"z": away_from_zero(rng, (N, C), scale), "where": where}

    return make


SOFTMAX_CASES = [
    Case("softmax", "softmax", _z(scale=2.0), diff=("z",)),
    Case("softmax-axis0", "softmax", _z(scale=2.0), {"axis": 0}, diff=("z",)),
    Case("softmax-3d", "softmax", _z((2, 3, C), 2.0), diff=("z",)),
    Case("softmax-large-logits", "softmax", _z(scale=50.0), diff=("z",)),
    Case("log_softmax", "log_softmax", _z(scale=2.0), diff=("z",)),
    Case("log_softmax-axis0", "log_softmax", _z(scale=2.0), {"axis": 0}, diff=("z",)),
    Case("softmax-where", "softmax", _z_where((N, C)), diff=("z",)),
    Case("softmax-where-rows", "softmax", _z_where((N, 1)), diff=("z",)),
    Case("log_softmax-where", "log_softmax", _z_where((N, C)), diff=("z",)),
    Case("log_softmax-where-rows", "log_softmax", _z_where((N, 1)), diff=("z",)),
]


def _mse(rng):
    return {"pred": away_from_zero(rng, (N, C)), "target": away_from_zero(rng, (N, C))}


def _bce(int_labels: bool):
    def make(rng):
        d = {"logits": away_from_zero(rng, (N, C), 3.0)}
        if int_labels:
            d["labels"] = rng.integers(0, 2, size=(N, C)).astype(np.int32)
        else:
            d["labels"] = rng.uniform(0, 1, size=(N, C))
        return d

    return make


LOSS_CASES = [
    Case("mse", "mse", _mse, diff=("pred", "target")),
    Case("bce-prob-labels", "sigmoid_binary_cross_entropy", _bce(False), diff=("logits", "labels")),
    Case("bce-int-labels", "sigmoid_binary_cross_entropy", _bce(True), diff=("logits",)),
]


def _ce(
    *, probs=False, total=1.0, where=False, weights=False, ignore=None, batch=(N,), scale=2.0
):  # fmt: skip
    def make(rng):
        d = {"logits": away_from_zero(rng, (*batch, C), scale)}
        if probs:
            d["labels"] = probabilities(rng, (*batch, C), total)
        else:
            ids = rng.integers(0, C, size=batch).astype(np.int32)
            if ignore is not None:
                ids.reshape(-1)[::3] = ignore  # every third row ignored
            d["labels"] = ids
        if where:
            m = np.ones(batch, bool)
            m.reshape(-1)[1::2] = False
            d["where"] = m
        if weights:
            d["class_weights"] = rng.uniform(0.2, 2.0, size=(C,))
        return d

    return make


_L = ("logits",)
_LY = ("logits", "labels")
_LW = ("logits", "class_weights")
_LYW = ("logits", "labels", "class_weights")

CE_CASES = [
    Case("ce-ids", "softmax_cross_entropy", _ce(), diff=_L),
    Case("ce-probs", "softmax_cross_entropy", _ce(probs=True), diff=_LY),
    Case("ce-probs-sum2", "softmax_cross_entropy", _ce(probs=True, total=2.0), diff=_LY),
    Case("ce-ids-where", "softmax_cross_entropy", _ce(where=True), diff=_L),
    Case("ce-ids-weights", "softmax_cross_entropy", _ce(weights=True), diff=_LW),
    Case("ce-ids-smooth0.1", "softmax_cross_entropy", _ce(), {"label_smoothing": 0.1}, diff=_L),
    Case("ce-ids-ignore-100", "softmax_cross_entropy", _ce(ignore=-100), {"ignore_index": -100},
         diff=_L),
    Case("ce-ids-zloss", "softmax_cross_entropy", _ce(), {"z_loss": 1e-2}, diff=_L),
    Case("ce-ids-3d-batch", "softmax_cross_entropy", _ce(batch=(2, 3)), diff=_L),
    Case("ce-ids-all-options", "softmax_cross_entropy", _ce(where=True, weights=True, ignore=-1),
         {"label_smoothing": 0.2, "ignore_index": -1, "z_loss": 1e-3}, diff=_LW),
    Case("ce-probs-all-options", "softmax_cross_entropy",
         _ce(probs=True, total=0.7, where=True, weights=True),
         {"label_smoothing": 0.2, "z_loss": 1e-3}, diff=_LYW),
]  # fmt: skip


# ------------------------------------------------------------------ transformer ops


def _ids(batch=(N,)):
    """Ids with a repeat (their rows accumulate in the backward) and id 2 looked up
    (tests/test_edge_cases.py puts a NaN in table row 2)."""

    def make(rng):
        ids = rng.integers(0, V, size=batch).astype(np.int32)
        ids.reshape(-1)[:3] = (3, 3, 2)
        return {"ids": ids, "table": away_from_zero(rng, (V, D))}

    return make


def _positions(batch=(N,), t=3, context=4):
    def make(rng):
        return {
            "x": away_from_zero(rng, (*batch, t, D)),
            "table": away_from_zero(rng, (context, D)),
        }

    return make


EMBEDDING_CASES = [
    Case("embedding", "embedding", _ids(), diff=("table",)),
    Case("embedding-2d-ids", "embedding", _ids((2, 3)), diff=("table",)),
    Case("position_embedding", "position_embedding", _positions(), diff=("x", "table")),
    Case(
        "position_embedding-full-context",
        "position_embedding",
        _positions((2, 3), t=4),
        diff=("x", "table"),
    ),
]


def _norm(beta: bool, batch=(N,), scale=1.0):
    def make(rng):
        d = {"x": away_from_zero(rng, (*batch, D), scale) + rng.normal(size=(*batch, 1))}
        d["gamma"] = away_from_zero(rng, (D,))
        if beta:
            d["beta"] = away_from_zero(rng, (D,))
        return d

    return make


_XGB = ("x", "gamma", "beta")
NORM_CASES = [
    Case("layer_norm", "layer_norm", _norm(True), diff=_XGB),
    Case("layer_norm-3d-batch", "layer_norm", _norm(True, (2, 3)), diff=_XGB),
    Case("layer_norm-eps0.1-small", "layer_norm", _norm(True, scale=0.1), {"eps": 0.1},
         diff=_XGB),
    Case("rms_norm", "rms_norm", _norm(False), diff=("x", "gamma")),
    Case("rms_norm-3d-batch", "rms_norm", _norm(False, (2, 3)), diff=("x", "gamma")),
    Case("rms_norm-eps0.1-small", "rms_norm", _norm(False, scale=0.1), {"eps": 0.1},
         diff=("x", "gamma")),
]  # fmt: skip


def _qkv(t=T, s=T, where=False, batch=(2,)):
    """``q (n, h, t, e)``, ``k, v (n, h, s, e)``; the mask (``(n, 1, t, s)``) keeps query row 2
    of the first example (tests/test_edge_cases.py puts a NaN there) and masks every key of
    row 1 of the last example (a fully masked row)."""

    def make(rng):
        d = {
            "q": rng.normal(size=(*batch, H, t, E)),
            "k": rng.normal(size=(*batch, H, s, E)),
            "v": rng.normal(size=(*batch, H, s, E)),
        }
        if where:
            m = rng.uniform(size=(*batch, 1, t, s)) < 0.6
            m[..., :, 0] = True
            m.reshape(-1, 1, t, s)[-1, 0, 1] = False
            d["where"] = m
        return d

    return make


_QKV = ("q", "k", "v")
ATTENTION_CASES = [
    Case("attention-causal", "attention", _qkv(), diff=_QKV),
    Case("attention-causal-recompute", "attention", _qkv(), {"strategy": "recompute"},
         diff=_QKV),
    Case("attention-full", "attention", _qkv(), {"causal": False}, diff=_QKV),
    Case("attention-where", "attention", _qkv(where=True), {"causal": False}, diff=_QKV),
    Case("attention-where-causal-recompute", "attention", _qkv(where=True),
         {"strategy": "recompute"}, diff=_QKV),
    Case("attention-cross-t4-s6", "attention", _qkv(s=6), {"causal": False}, diff=_QKV),
    Case("attention-cross-recompute", "attention", _qkv(s=6, where=True),
         {"causal": False, "strategy": "recompute"}, diff=_QKV),
    Case("attention-3d-batch", "attention", _qkv(batch=(2, 2)), diff=_QKV),
]  # fmt: skip


def _drop(batch=(N,), seed=7):
    """``x`` and one raw PRNG key (uint32 ``(2,)``: an integer argument, no cotangent)."""

    def make(rng):
        return {"x": away_from_zero(rng, (*batch, D)), "key": np.asarray(jax.random.PRNGKey(seed))}

    return make


_X = ("x",)
DROPOUT_CASES = [
    Case("dropout-0.25", "dropout", _drop(), {"rate": 0.25}, diff=_X),
    Case("dropout-0.5-shared-rows", "dropout", _drop(), {"rate": 0.5, "broadcast_dims": (0,)},
         diff=_X),
    Case("dropout-0.9-3d-batch", "dropout", _drop((2, 3)), {"rate": 0.9}, diff=_X),
    Case("dropout-rate-0", "dropout", _drop(), {"rate": 0.0}, diff=_X),
    Case("dropout-rate-1", "dropout", _drop(), {"rate": 1.0}, diff=_X),
]  # fmt: skip

TRANSFORMER_CASES = EMBEDDING_CASES + NORM_CASES + ATTENTION_CASES + DROPOUT_CASES

ALL_CASES = (
    DENSE_CASES + ACTIVATION_CASES + SOFTMAX_CASES + LOSS_CASES + CE_CASES + TRANSFORMER_CASES
)

# Dtypes of the manual-vs-reference comparison, with docs/edge_cases.md tolerances (helpers.TOL).
DTYPES = [jnp.float64, jnp.float32, jnp.bfloat16]


# ------------------------------------------------- every public op, square shapes (contract)

S = 3  # n = i = o = c = d = v: square on purpose, so no shape tells a weight from an input


@dataclasses.dataclass(frozen=True)
class Example:
    """Positional arguments for a public op, all ``S``-sized: ``make(rng) -> tuple``.

    ``per_example`` names the positional arguments that hold one row per example (written
    here, independently of the op's own declaration); the others are shared parameters.
    """

    id: str
    make: Callable[[np.random.Generator], tuple]
    per_example: tuple[str, ...]
    options: dict = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return self.id

    def args(self, seed: int = 0) -> tuple:
        out = []
        for a in self.make(np.random.default_rng(seed)):
            out.append(None if a is None else jnp.asarray(a))
        return tuple(out)


def _sq(*shapes):
    return lambda rng: tuple(away_from_zero(rng, s) for s in shapes)


def _sq_ids(rng):
    return rng.integers(0, S, size=(S,)).astype(np.int32)


_Z = ((S, S),)
OP_EXAMPLES: dict[str, list[Example]] = {
    "dense": [
        Example("dense", _sq((S, S), (S, S), (S,)), ("x",)),
        Example("dense-nobias", _sq((S, S), (S, S)), ("x",)),
    ],
    **{
        name: [Example(name, _sq(*_Z), ("z",))]
        for name in ("relu", "sigmoid", "tanh", "softplus", "silu", "swish", "softmax",
                     "log_softmax")
    },
    "leaky_relu": [Example("leaky_relu", _sq(*_Z), ("z",), {"negative_slope": 0.2})],
    "gelu": [
        Example("gelu-tanh", _sq(*_Z), ("z",), {"approximate": True}),
        Example("gelu-erf", _sq(*_Z), ("z",), {"approximate": False}),
    ],
    "mse": [Example("mse", _sq((S, S), (S, S)), ("pred", "target"))],
    "sigmoid_binary_cross_entropy": [
        Example(
            "bce-probs",
            lambda rng: (away_from_zero(rng, (S, S)), rng.uniform(0, 1, (S, S))),
            ("logits", "labels"),
        )
    ],
    "softmax_cross_entropy": [
        Example(
            "ce-probs",
            lambda rng: (away_from_zero(rng, (S, S)), probabilities(rng, (S, S))),
            ("logits", "labels"),
            {"label_smoothing": 0.1},
        ),
        Example("ce-ids", lambda rng: (away_from_zero(rng, (S, S)), _sq_ids(rng)),
                ("logits", "labels")),
    ],
    "linear_softmax_cross_entropy": [
        Example(
            "fused",
            lambda rng: (*_sq((S, S), (S, S))(rng), _sq_ids(rng), away_from_zero(rng, (S,))),
            ("x", "labels"),
        ),
        Example("fused-nobias", lambda rng: (*_sq((S, S), (S, S))(rng), _sq_ids(rng)),
                ("x", "labels"), {"z_loss": 1e-2}),
    ],
    "embedding": [
        Example("embedding", lambda rng: (_sq_ids(rng), away_from_zero(rng, (S, S))), ("ids",)),
    ],
    "position_embedding": [
        Example("position_embedding", _sq((S, S, S), (S, S)), ("x",)),
    ],
    "layer_norm": [Example("layer_norm", _sq((S, S), (S,), (S,)), ("x",), {"eps": 1e-3})],
    "rms_norm": [Example("rms_norm", _sq((S, S), (S,)), ("x",))],
    "dropout": [
        Example("dropout", lambda rng: (away_from_zero(rng, (S, S)), np.asarray(
            jax.random.PRNGKey(int(rng.integers(1 << 16))))), ("x",), {"rate": 0.25}),
    ],
    "attention": [
        Example("attention-causal", _sq(*[(S, S, S, S)] * 3), ("q", "k", "v")),
        Example("attention-recompute", _sq(*[(S, S, S, S)] * 3), ("q", "k", "v"),
                {"causal": False, "strategy": "recompute"}),
    ],
}  # fmt: skip


def public_ops_with_rules() -> list[str]:
    """Every name in ``jaxbp.__all__`` that carries ``.fwd``/``.bwd`` rules (an op); an op
    whose rules are not also exported as ``{name}_fwd``/``{name}_bwd`` fails the contract
    test, so none is left out here."""
    return sorted(
        n
        for n in jaxbp.__all__
        if not n.endswith(("_fwd", "_bwd"))
        and callable(getattr(getattr(jaxbp, n), "fwd", None))
        and callable(getattr(getattr(jaxbp, n), "bwd", None))
        and not isinstance(getattr(jaxbp, n), type)
    )


def op_examples(name: str) -> list[Example]:
    """The examples of op ``name``; a public op without any is an error, never a skip."""
    if name not in OP_EXAMPLES:
        raise LookupError(
            f"jaxbp.{name} has _fwd/_bwd rules but no entry in tests/settings.py OP_EXAMPLES: "
            "add its square-shaped example arguments there"
        )
    return OP_EXAMPLES[name]
