"""embedding: the scatter-add backward vs the reference and a numpy ``np.add.at`` oracle;
repeated and out-of-range ids, half-precision accumulation, the Jacobian, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from tests import strategies as sts
from tests.helpers import assert_close, check_finite_differences, check_manual_vs_reference
from tests.settings import DTYPES, EMBEDDING_CASES, Case

EMB, REF = jaxbp.embedding, jaxbp.reference.embedding
RNG = np.random.default_rng(0)
TABLE = jnp.asarray(RNG.normal(size=(5, 3)))
IDS = jnp.asarray([[0, 2, 2], [4, 0, 2]])
G = jnp.asarray(RNG.normal(size=(2, 3, 3)))


def dtable(fn, ids, table, g):
    """``∂/∂table Σ g ⊙ fn(ids, table)``."""

    def scalar(t):
        out = fn(ids, t)
        return jnp.sum(out * jnp.asarray(g, out.dtype))

    return jax.grad(scalar)(table)


def add_at(ids, g, v):
    """The numpy oracle: ``np.add.at`` of the rows of ``g`` into a zero ``(v, d)`` table."""
    out = np.zeros((v, g.shape[-1]))
    np.add.at(out, np.asarray(ids).reshape(-1), np.asarray(g, np.float64).reshape(-1, g.shape[-1]))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", EMBEDDING_CASES, ids=str)
def test_manual_gradient_matches_reference(case, dtype):
    check_manual_vs_reference(case, dtype)


@pytest.mark.parametrize("case", EMBEDDING_CASES, ids=str)
def test_gradient_matches_central_finite_differences(case):
    check_finite_differences(case)


@given(
    batch=sts.batch_shapes(0, 3),
    v=st.integers(1, 9),
    d=st.integers(1, 5),
    dtype=sts.float_dtypes,
    seed=sts.seeds,
)
@settings(max_examples=10)
def test_property_any_id_shape_matches_reference_and_add_at(batch, v, d, dtype, seed):
    def make(rng):
        return {"ids": rng.integers(0, v, size=batch).astype(np.int32),
                "table": rng.normal(size=(v, d))}  # fmt: skip

    case = Case("h", "embedding", make, diff=("table",), seed=seed)
    check_manual_vs_reference(case, dtype)
    arrays = case.arrays(dtype)
    g = jnp.ones((*batch, d), jnp.float32)
    got = dtable(EMB, arrays["ids"], arrays["table"], g)
    assert_close(got, add_at(arrays["ids"], g, v), dtype)


def test_repeated_ids_accumulate_like_numpy_add_at():
    got = dtable(EMB, IDS, TABLE, G)
    np.testing.assert_allclose(got, add_at(IDS, G, 5), rtol=1e-15)
    # id 2 appears three times, 1 and 3 never
    np.testing.assert_allclose(got[2], G[0, 1] + G[0, 2] + G[1, 2], rtol=1e-15)
    np.testing.assert_array_equal(got[jnp.asarray([1, 3])], 0.0)
    np.testing.assert_array_equal(EMB(IDS, TABLE), np.asarray(TABLE)[np.asarray(IDS)])


def test_bfloat16_table_accumulates_many_repeats_in_float32():
    """1000 lookups of one row: a bfloat16 running sum of ones stalls at 256; float32 gives
    1000 (exactly representable in bfloat16)."""
    table = jnp.zeros((4, 2), jnp.bfloat16)
    ids = jnp.zeros((1000,), jnp.int32)
    got = jaxbp.embedding_bwd(jaxbp.embedding_fwd(ids, table)[1], jnp.ones((1000, 2), jnp.bfloat16))
    assert got[0] is None and got[1].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got[1][0], np.float32), 1000.0)
    np.testing.assert_array_equal(np.asarray(got[1][1:], np.float32), 0.0)


def test_saves_the_ids_and_no_table():
    _, (ids, shape) = jaxbp.embedding_fwd(IDS, TABLE)
    np.testing.assert_array_equal(ids, IDS)
    assert shape.shape == (5, 0) and shape.dtype == TABLE.dtype and shape.size == 0


def test_scalar_id_and_empty_batch():
    np.testing.assert_array_equal(EMB(jnp.asarray(3), TABLE), TABLE[3])
    g = dtable(EMB, jnp.asarray(3), TABLE, jnp.ones(3, jnp.float32))
    np.testing.assert_array_equal(g, np.eye(5)[3][:, None] * np.ones(3))
    empty = jnp.zeros((0, 2), jnp.int32)
    assert EMB(empty, TABLE).shape == (0, 2, 3)
    np.testing.assert_array_equal(dtable(EMB, empty, TABLE, jnp.ones((0, 2, 3))), 0.0)


def test_nan_cotangent_reaches_only_the_rows_looked_up():
    g = G.at[0, 1, 0].set(jnp.nan)  # a cotangent of a lookup of id 2
    got = dtable(EMB, IDS, TABLE, g)
    assert bool(jnp.all(jnp.isnan(got[2, 0])))
    assert bool(jnp.all(jnp.isfinite(got[jnp.asarray([0, 1, 3, 4])])))


def test_nan_in_the_table_reaches_the_output_rows_that_read_it():
    out = EMB(IDS, TABLE.at[4, 1].set(jnp.nan))
    np.testing.assert_array_equal(
        np.isnan(out).any(-1), [[False, False, False], [True, False, False]]
    )


def test_int8_ids_index_a_table_longer_than_their_range():
    table = jnp.asarray(RNG.normal(size=(300, 2)))
    ids = jnp.asarray([1, 127, 0], jnp.int8)
    np.testing.assert_array_equal(EMB(ids, table), np.asarray(table)[[1, 127, 0]])
    with pytest.raises(ValueError, match="ids"):
        EMB(jnp.asarray([1, -3], jnp.int8), table)


# ------------------------------------------------------------------- out-of-range ids


@pytest.mark.parametrize("fn", [EMB, REF], ids=["jaxbp", "reference"])
@pytest.mark.parametrize("bad", [5, 9, -1], ids=lambda b: f"id{b}")
def test_out_of_range_id_raises_when_concrete(fn, bad):
    with pytest.raises(ValueError, match=rf"ids: .*\[0, 5\).*got {bad} at index \(1, 0\)"):
        fn(IDS.at[1, 0].set(bad), TABLE)


@pytest.mark.parametrize("fn", [EMB, REF], ids=["jaxbp", "reference"])
@pytest.mark.parametrize("bad", [5, -1], ids=lambda b: f"id{b}")
def test_out_of_range_id_is_a_nan_row_under_jit_and_its_cotangent_is_dropped(fn, bad):
    ids = IDS.at[1, 0].set(bad)
    out = jax.jit(fn)(ids, TABLE)
    assert bool(jnp.all(jnp.isnan(out[1, 0])))
    clean = np.asarray(TABLE)[np.asarray(IDS)].reshape(6, 3)
    np.testing.assert_array_equal(np.delete(np.asarray(out).reshape(6, 3), 3, 0),
                                  np.delete(clean, 3, 0))  # fmt: skip
    # Its cotangent has no row to go to: never clamped into row 4, never wrapped into row 4.
    got = jax.jit(lambda i, t: dtable(fn, i, t, G))(ids, TABLE)
    np.testing.assert_allclose(got, add_at(np.delete(np.asarray(IDS).reshape(-1), 3),
                                           np.delete(np.asarray(G).reshape(6, 3), 3, 0), 5),
                               rtol=1e-15)  # fmt: skip


def test_checked_mode_reports_an_out_of_range_id():
    def f(ids, table):
        return jnp.sum(EMB(ids, table))

    err, _ = jax.jit(jaxbp.checked(f))(IDS.at[0, 2].set(7), TABLE)
    message = err.get()
    assert message is not None and "ids" in message and "7" in message
    err, _ = jax.jit(jaxbp.checked(f))(IDS, TABLE)
    assert err.get() is None


# ------------------------------------------------------------------ Jacobian and errors


def test_jacobian_with_respect_to_the_table_is_the_one_hot_lookup():
    J = jaxbp.jacobian(EMB, IDS, TABLE, argnum=1)  # (n..., d, v, d')
    assert J.shape == (2, 3, 3, 5, 3)
    onehot = np.eye(5)[np.asarray(IDS)]  # (n..., v)
    want = np.einsum("ntv,de->ntdve", onehot, np.eye(3))
    np.testing.assert_array_equal(J, want)
    with pytest.raises(TypeError, match="argnum"):
        jaxbp.jacobian(EMB, IDS, TABLE, argnum=0)  # integer ids have no Jacobian


def test_grad_under_jit_and_vmap_composes():
    def loss(table, ids):
        return jnp.sum(jnp.tanh(EMB(ids, table)) * G)

    want = jax.grad(lambda t, i: jnp.sum(jnp.tanh(REF(i, t)) * G))(TABLE, IDS)
    assert_close(jax.jit(jax.grad(loss))(TABLE, IDS), want, jnp.float64)
    per_row = jax.vmap(jax.grad(lambda t, i, g: jnp.sum(EMB(i, t) * g)), (None, 0, 0))(
        TABLE, IDS, G
    )
    assert_close(per_row.sum(0), add_at(IDS, G, 5), jnp.float64)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((jnp.asarray([0.0, 1.0]), TABLE), TypeError, "ids: expected an integer dtype"),
        ((jnp.asarray([True, False]), TABLE), TypeError, "ids"),
        ((IDS, jnp.ones((5, 3), jnp.int32)), TypeError, "table: expected a floating dtype"),
        ((IDS, jnp.ones(5)), ValueError, r"table: expected shape \(v, d\)"),
        ((IDS, jnp.ones((0, 3))), ValueError, "table: expected at least one row"),
    ],
    ids=["float-ids", "bool-ids", "int-table", "1d-table", "empty-table"],
)
def test_bad_inputs_raise_clear_errors(args, error, match):
    for fn in (EMB, jaxbp.embedding_fwd, REF):
        with pytest.raises(error, match=match):
            fn(*args)
