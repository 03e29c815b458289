"""jaxbp/_vma.py outside a shard_map: every type is invariant and nothing changes; the row
reductions of one device are the identity. (Inside a user's shard_map: tests/mesh_cases.py,
run on 8 devices by tests/test_parallel.py.)"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import _vma


def test_outside_a_shard_map_nothing_varies_and_nothing_is_summed():
    x = jnp.arange(3.0)
    assert (
        _vma.of(x) == frozenset() and _vma.of(None) == frozenset() and _vma.of(2.0) == frozenset()
    )
    assert _vma.union(x, {"a": x, "b": None}) == frozenset()
    assert _vma.pvary(x, frozenset()) is x and _vma.pvary(None, frozenset({"data"})) is None
    assert _vma.fit_cotangents((x, None), (frozenset(), frozenset())) == (x, None)


def test_static_rides_along_as_a_pytree_with_no_leaves():
    s = _vma.Static((frozenset({"data"}),))
    assert jax.tree.leaves(s) == []
    out = jax.jit(lambda s: s)(s)  # through a jit boundary: aux data, not an array
    assert out.value == s.value


def test_local_reductions_are_the_identity_and_the_first_column_is_zero():
    a = jnp.asarray([1.0, -2.0])
    np.testing.assert_array_equal(_vma.LOCAL.max(a), a)
    np.testing.assert_array_equal(_vma.LOCAL.sum(a), a)
    assert int(_vma.LOCAL.first_column(7, jnp.int32)) == 0
    assert _vma.Reduce("model") == _vma.Reduce("model")  # hashable, by axis
