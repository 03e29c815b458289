"""Hypothesis strategies shared by the tests (and usable by the benchmarks).

Arrays are drawn as a seed plus a shape and a scale, then filled by numpy: far cheaper
than element-by-element drawing, and every draw still shrinks to a small example. Values
keep away from 0 (see :func:`tests.settings.away_from_zero`) so no relu kink is near.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from tests.settings import away_from_zero, probabilities

seeds = st.integers(0, 2**32 - 1)
scales = st.sampled_from([0.1, 1.0, 10.0, 100.0])
float_dtypes = st.sampled_from([jnp.float64, jnp.float32, jnp.bfloat16])
exact_dtypes = st.sampled_from([jnp.float64, jnp.float32])
sizes = st.integers(1, 5)
classes = st.integers(1, 7)


def batch_shapes(min_rank: int = 1, max_rank: int = 2, max_side: int = 4):
    """Leading (batch) shapes such as ``(3,)`` or ``(2, 4)``."""
    return st.lists(st.integers(1, max_side), min_size=min_rank, max_size=max_rank).map(tuple)


def shapes(min_rank: int = 0, max_rank: int = 3, max_side: int = 4):
    """Any array shape, for elementwise ops."""
    return batch_shapes(min_rank, max_rank, max_side)


@st.composite
def arrays(draw, shape, scale=None):
    """A float64 numpy array of ``shape`` with ``|x|`` in ``[0.1, 2]·scale``."""
    scale = draw(scales) if scale is None else scale
    rng = np.random.default_rng(draw(seeds))
    return away_from_zero(rng, shape, scale)


@st.composite
def ce_inputs(draw, *, max_c: int = 7, labels=("ids", "probs")):
    """``(arrays, options)`` for ``softmax_cross_entropy``: every option combination.

    where × class_weights × label_smoothing × ignore_index × z_loss, with integer ids or
    probability labels (rows summing to 1, or not).
    """
    batch = draw(batch_shapes(1, 2, 5))
    # c ≥ 2: with one class the logits' gradient is exactly 0 and a relative comparison of
    # two rounding noises means nothing (c = 1 is tests/test_edge_cases.py's, exactly).
    c = draw(st.integers(2, max_c))
    kind = draw(st.sampled_from(labels))
    rng = np.random.default_rng(draw(seeds))
    d = {"logits": away_from_zero(rng, (*batch, c), draw(scales))}
    options = {
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        "z_loss": draw(st.sampled_from([0.0, 1e-3, 0.1])),
    }
    if kind == "ids":
        ids = rng.integers(0, c, size=batch).astype(np.int32)
        ignore = draw(st.sampled_from([None, -100, 0]))
        if ignore is not None:
            options["ignore_index"] = ignore
            ids[rng.uniform(size=batch) < 0.3] = ignore
        d["labels"] = ids
    else:
        d["labels"] = probabilities(rng, (*batch, c), draw(st.sampled_from([1.0, 0.5, 2.0])))
    if draw(st.booleans()):
        d["where"] = rng.uniform(size=batch) < 0.7
    if draw(st.booleans()):
        d["class_weights"] = rng.uniform(0.1, 3.0, size=(c,))
    return d, options
