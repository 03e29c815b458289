"""Per-example rules of every op with parameters, and the contributions algebra under them.

The oracle, per op: for each example ``k``, ``jax.vjp`` of the op's *plain twin*
(``op.reference``) on that example's rows alone, with that example's rows of ``g``: its
parameter cotangent is example ``k``'s gradient; ``jax.vmap`` over the examples. The rule
(``op.example_grads`` on ``op.fwd``'s residuals) must give the same per-example gradients
(materialised) and the same squared norms (from its Gram products, never formed), within
1e-12 in float64.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp import _contrib as C
from jaxbp._op import bwd_options
from tests.helpers import assert_close

F64 = jnp.float64


@dataclasses.dataclass(frozen=True)
class Rule:
    """An op with parameters, its arguments for ``n`` examples of ``T`` rows, and which of
    them are per-example (split by example for the oracle) and which are parameters."""

    id: str
    op: object
    make: object  # (rng, n, T) -> tuple of positional args of op.fwd
    split: tuple[int, ...]  # indices of the per-example arguments (rows example-major)
    params: dict  # parameter name -> index
    options: dict = dataclasses.field(default_factory=dict)

    def __str__(self):
        return self.id


def _x(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), F64)


def _ids(rng, n, T, v):
    ids = rng.integers(0, v, size=(n, T)).astype(np.int32)
    ids[:, :2] = ids[:, :1]  # a repeated id in every example: its rows add before the norm
    return jnp.asarray(ids)


V, D = 7, 4
RULES = [
    Rule("dense-rows", jaxbp.dense, lambda r, n, T: (_x(r, n * T, 3), _x(r, 3, 5), _x(r, 5)),
         (0,), {"w": 1, "b": 2}),
    Rule("dense-seq", jaxbp.dense, lambda r, n, T: (_x(r, n, T, 3), _x(r, 3, 2), _x(r, 2)),
         (0,), {"w": 1, "b": 2}),
    Rule("dense-nobias", jaxbp.dense, lambda r, n, T: (_x(r, n, T, 4), _x(r, 4, 3)),
         (0,), {"w": 1}),
    Rule("embedding", jaxbp.embedding, lambda r, n, T: (_ids(r, n, T, V), _x(r, V, D)),
         (0,), {"table": 1}),
    Rule("position_embedding", jaxbp.position_embedding,
         lambda r, n, T: (_x(r, n, T, D), _x(r, T + 2, D)), (0,), {"table": 1}),
    Rule("layer_norm", jaxbp.layer_norm,
         lambda r, n, T: (_x(r, n, T, D), _x(r, D), _x(r, D)), (0,), {"gamma": 1, "beta": 2},
         {"eps": 1e-3}),
    Rule("rms_norm", jaxbp.rms_norm, lambda r, n, T: (_x(r, n, T, D), _x(r, D)), (0,),
         {"gamma": 1}),
]  # fmt: skip


def _fused(options, bias=True, where=False):
    def make(r, n, T):
        labels = jnp.asarray(r.integers(0, V, size=(n * T,)).astype(np.int32))
        if options.get("ignore_index") is not None:
            labels = labels.at[1].set(options["ignore_index"])
        w = jnp.asarray(r.random((n * T,)) < 0.7) if where else None
        cw = jnp.asarray(r.uniform(0.5, 2.0, size=(V,)), F64) if options.get("_cw") else None
        return (_x(r, n * T, D), _x(r, D, V), labels, _x(r, V) if bias else None, w, cw)

    params = {"w": 1, "b": 3} if bias else {"w": 1}
    opts = {k: v for k, v in options.items() if k != "_cw"}
    return make, (0, 2, 4), params, opts


FUSED = {
    "fused": {},
    "fused-smoothing-zloss": {"label_smoothing": 0.2, "z_loss": 1e-2},
    "fused-softcap-ignore": {"softcap": 3.0, "ignore_index": 0},
    "fused-classweights-chunk3": {"_cw": True, "chunk_size": 3, "label_smoothing": 0.1},
    "fused-forward": {"strategy": "forward", "z_loss": 1e-3},
}
for _id, _opts in FUSED.items():
    _make, _split, _params, _o = _fused(_opts, bias=_id != "fused-forward", where=_id == "fused")
    RULES.append(Rule(_id, jaxbp.linear_softmax_cross_entropy, _make, _split, _params, _o))


def _oracle(rule, args, g, n):
    """Per-example parameter gradients ``{name: (n, *shape)}`` by vmapped ``jax.vjp`` of the
    op's plain twin on each example's rows (``(n·T, k…)`` or ``(n, T, k…)`` → ``(T, k…)``)."""
    names = list(rule.params)
    n_args = len(rule.op.arg_names)
    arg_names = jaxbp._tape.rule_arg_names(rule.op)
    trailing = {i: (1 if jnp.issubdtype(args[i].dtype, jnp.floating) else 0)
                for i in rule.split if args[i] is not None}  # fmt: skip

    def one(rows, g_k):
        full = list(args)
        for i, r in rows.items():
            full[i] = r

        def f(*ps):
            a = list(full)
            for name, p in zip(names, ps, strict=True):
                a[rule.params[name]] = p
            kw = {arg_names[i]: a[i] for i in range(n_args, len(a)) if a[i] is not None}
            return rule.op.reference(*a[:n_args], **kw, **rule.options)

        out, vjp = jax.vjp(f, *(args[rule.params[m]] for m in names))
        return vjp(g_k.reshape(out.shape))

    rows = {i: args[i].reshape(n, -1, *args[i].shape[args[i].ndim - k :])
            for i, k in trailing.items()}  # fmt: skip
    grads = jax.vmap(one)(rows, g.reshape(n, -1))
    return dict(zip(names, grads, strict=True))


def _rule_and_oracle(rule, n, T, seed=0):
    rng = np.random.default_rng(seed)
    args = rule.make(rng, n, T)
    out, res = rule.op.fwd(*args, **rule.options)
    g = jnp.asarray(rng.normal(size=out.shape), F64)
    if rule.op is jaxbp.linear_softmax_cross_entropy:  # the loss's seed: one per token
        g = jnp.asarray(rng.uniform(0.5, 1.5, size=out.shape), F64)
    rule_fn = rule.op.example_grads
    contribs = rule_fn(res, g, examples=n, **bwd_options(rule_fn, rule.options))
    return contribs, _oracle(rule, args, g, n)


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_example_grads_rule_equals_vmap_vjp_of_the_twin(rule):
    contribs, want = _rule_and_oracle(rule, n=3, T=4)
    assert sorted(contribs) == sorted(want)
    for name, c in contribs.items():
        assert_close(C.materialize(c), want[name], F64, name=f"{rule.id} d{name}")
        sq = np.sum(np.asarray(want[name]).reshape(3, -1) ** 2, axis=1)
        assert_close(C.sq_norm(c), sq, F64, name=f"{rule.id} ‖d{name}‖²")


@settings(max_examples=12, derandomize=True, deadline=None)
@given(n=st.integers(1, 4), T=st.integers(1, 5), i=st.integers(1, 6), o=st.integers(1, 6),
       method=st.sampled_from(["auto", "ghost", "outer"]))  # fmt: skip
def test_ghost_and_outer_products_agree_with_the_materialised_norm(n, T, i, o, method):
    rng = np.random.default_rng(n * 100 + T * 10 + i)
    a, d = _x(rng, n, T, i), _x(rng, n, T, o)
    c = C.Outer(C.Rows(a), C.Rows(d))
    g = np.einsum("nti,nto->nio", np.asarray(a), np.asarray(d))
    assert_close(C.sq_norm(c, method=method), np.sum(g**2, axis=(1, 2)), F64)


def test_one_hot_factors_equal_their_explicit_one_hot_matrices():
    rng = np.random.default_rng(3)
    n, T, S, v, d = 2, 4, 3, 5, 3
    ids_a = jnp.asarray([[0, 2, 2, 7], [4, 4, 1, -1]])  # 7 and -1: out of range, zero rows
    ids_b = jnp.asarray([[2, 0, 0], [1, 3, 4]])
    rows = _x(rng, n, S, v)
    onehot_a = np.asarray(jax.nn.one_hot(ids_a, v))  # jax.nn.one_hot: zeros out of range
    onehot_b = np.asarray(jax.nn.one_hot(ids_b, v))
    A, B = C.OneHot(ids_a, v), C.OneHot(ids_b, v)
    assert_close(C.gram(A, B), np.einsum("ntv,nsv->nts", onehot_a, onehot_b), F64)
    assert_close(C.gram(A, C.Rows(rows)), np.einsum("ntv,nsv->nts", onehot_a, rows), F64)
    assert_close(C.gram(C.Rows(rows), A), np.einsum("nsv,ntv->nst", rows, onehot_a), F64)
    r = _x(rng, n, T, d)
    assert_close(C.outer(A, C.Rows(r)), np.einsum("ntv,ntd->nvd", onehot_a, r), F64)


def test_tied_contributions_add_before_the_norm():
    """‖G + G'‖² with G from an embedding and G' from a transposed dense weight on the same
    (v, d) table: the cross term comes from a Gram of a one-hot and dense rows."""
    rng = np.random.default_rng(5)
    n, T, v, d = 3, 4, 6, 2
    ids = _ids(rng, n, T, v)
    g_emb, x, dz = _x(rng, n, T, d), _x(rng, n, T, d), _x(rng, n, T, v)
    emb = C.Outer(C.OneHot(ids, v), C.Rows(g_emb))  # (v, d)
    head = C.Outer(C.Rows(x), C.Rows(dz)).T  # (d, v) transposed to (v, d)
    total = np.asarray(C.materialize(emb) + C.materialize(head))
    want = np.sum(total.reshape(n, -1) ** 2, axis=1)
    got = C.sq_norm(emb) + C.sq_norm(head) + 2 * C.inner(emb, head, method="ghost")
    assert_close(got, want, F64)


def test_the_heads_logit_factor_is_never_an_n_t_v_array():
    n, T, d, v = 2, 3, 4, 37  # v chunked by 8: no (n, T, 37) or (n·T, 37) intermediate
    rng = np.random.default_rng(0)
    x, w = _x(rng, n * T, d), _x(rng, d, v)
    labels = jnp.asarray(rng.integers(0, v, size=(n * T,)).astype(np.int32))
    ids = jnp.asarray(rng.integers(0, v, size=(n, T)).astype(np.int32))
    g = jnp.ones((n * T,), F64)

    def norms(x, w):
        _, res = jaxbp.linear_softmax_cross_entropy.fwd(x, w, labels, chunk_size=8)
        c = jaxbp.linear_softmax_cross_entropy.example_grads(res, g, examples=n, chunk_size=8)
        tied = C.Outer(C.OneHot(ids, v), C.Rows(x.reshape(n, T, d)))
        return C.sq_norm(c["w"]) + C.inner(c["w"].T, tied)

    shapes = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.update(tuple(o.aval.shape) for o in eqn.outvars)
            for p in eqn.params.values():
                for sub in p if isinstance(p, tuple | list) else (p,):
                    if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(norms)(x, w).jaxpr)
    big = [s for s in shapes if v in s and (n * T in s or (n in s and T in s))]
    assert not big, big


def test_group_names_the_argument_when_rows_do_not_split_into_examples():
    with pytest.raises(ValueError, match=r"x: expected leading axes \(5,\) holding 2 examples"):
        C.group(jnp.zeros((5, 3)), 2, 1, "x")


def test_contributions_of_different_shapes_are_refused():
    rng = np.random.default_rng(0)
    a = C.Outer(C.Rows(_x(rng, 2, 1, 3)), C.Rows(_x(rng, 2, 1, 4)))
    with pytest.raises(ValueError, match=r"shapes \(3, 4\) and \(4, 3\)"):
        C.inner(a, a.T)
