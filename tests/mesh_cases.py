"""More cases for tests/parallel_worker.py (same process, same 8 CPU devices): meshes as
``jax.make_mesh`` makes them, and every public op inside a user's own ``jax.shard_map``.

Each case saves ``actual`` (sharded) and ``expected`` (one device, or ``jax.grad`` of the
reference on the whole batch) with ``tests.parallel_worker._save``; tests/test_parallel.py
compares them.
"""

from __future__ import annotations


def _shard_map():
    import jax

    fn = getattr(jax, "shard_map", None)
    if fn is None:  # older JAX
        from jax.experimental.shard_map import shard_map as fn
    return fn


def _axis_types():
    """``{"default": None, "Explicit": (...), "Auto": (...)}`` as far as this JAX has them."""
    import jax

    kinds = {"default": None}
    axis_type = getattr(jax.sharding, "AxisType", None)
    for name in ("Explicit", "Auto"):
        if axis_type is not None and hasattr(axis_type, name):
            kinds[name] = getattr(axis_type, name)
    return kinds


def case_jax_make_mesh_value_and_grad(out, summary):
    """``parallel.value_and_grad`` on ``jax.make_mesh`` meshes of every axis type, with
    unsharded, sharded, replicated and oddly sharded inputs, 1-d and (2, 4)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbp
    from jaxbp import parallel
    from tests.parallel_worker import _data, _save, _uneven_where

    model = jaxbp.MLP((6, 16, 8), activation="tanh")
    params = model.init(jax.random.PRNGKey(5), jnp.float32)
    _, x, labels = _data(11, 16, 6, 8, np.float32)
    where = _uneven_where(16, 8)
    expected_one = jaxbp.value_and_grad(model)(params, x, labels, where=where)
    actual, expected, types = {}, {}, {}
    for kind, t in _axis_types().items():
        kw = {} if t is None else {"axis_types": (t,)}
        mesh = jax.make_mesh((8,), ("data",), **kw)
        types[kind] = str(mesh.axis_types) if hasattr(mesh, "axis_types") else "n/a"
        put = lambda a, spec, mesh=mesh: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
        inputs = {
            "unsharded": (params, x, labels, where),
            "sharded": (put(params, P()), put(x, P("data")), put(labels, P("data")),
                        put(where, P("data"))),
            "replicated": (put(params, P()), put(x, P()), put(labels, P()), put(where, P())),
            "mixed": (params, put(x, P()), put(labels, P("data")), where),
        }  # fmt: skip
        vg = parallel.value_and_grad(model, mesh, axis="data")
        for how, (p, xx, y, w) in inputs.items():
            actual[f"{kind}/{how}"] = vg(p, xx, y, where=w)
            expected[f"{kind}/{how}"] = expected_one
        jit_step = jax.jit(lambda p, xx, y, w, vg=vg: vg(p, xx, y, where=w))
        actual[f"{kind}/inside_jit"] = jit_step(*inputs["sharded"])
        expected[f"{kind}/inside_jit"] = expected_one
        # (2, 4): the last layer's classes over "model" as well.
        mesh2 = jax.make_mesh((2, 4), ("data", "model"), **({} if t is None else
                                                            {"axis_types": (t, t)}))  # fmt: skip
        vg2 = parallel.value_and_grad(model, mesh2, axis="data", model_axis="model")
        actual[f"{kind}/2x4_last_layer"] = vg2(params, x, labels, where=where)
        expected[f"{kind}/2x4_last_layer"] = expected_one
    _save(out, "jax_make_mesh_value_and_grad", actual, expected, "float32",
          {"axis_types": types, "variants": sorted(actual)}, summary)  # fmt: skip


def case_jax_make_mesh_vocab_parallel(out, summary):
    """The vocab-parallel losses under ``jax.grad`` on ``jax.make_mesh`` meshes: inside
    ``jit``, and eagerly under ``jax.set_mesh`` where this JAX has it."""
    import contextlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbp
    from jaxbp import parallel
    from tests.parallel_worker import _ce_inputs, _save

    z, labels, where, weights, _ = _ce_inputs(12, 16, 32, "float32")
    rng = np.random.default_rng(13)
    x, w = rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=(4, 32)).astype(np.float32)

    def losses(mesh, batch_axis):
        def ce(z, cw):
            loss = parallel.vocab_parallel_softmax_cross_entropy(
                z, labels, mesh, batch_axis=batch_axis, where=where, class_weights=cw
            )
            return jnp.sum(loss * jnp.arange(1, 17, dtype=loss.dtype))

        def fused(x, w):
            loss = parallel.vocab_parallel_linear_softmax_cross_entropy(
                x, w, labels, mesh, batch_axis=batch_axis, where=where, chunk_size=3
            )
            return jnp.sum(loss * jnp.arange(1, 17, dtype=loss.dtype))

        return ce, fused

    def one_ce(z, cw):
        loss = jaxbp.softmax_cross_entropy(z, labels, where=where, class_weights=cw)
        return jnp.sum(loss * jnp.arange(1, 17, dtype=loss.dtype))

    def one_fused(x, w):
        loss = jaxbp.reference.linear_softmax_cross_entropy(x, w, labels, where=where)
        return jnp.sum(loss * jnp.arange(1, 17, dtype=loss.dtype))

    expected_ce = jax.value_and_grad(one_ce, argnums=(0, 1))(z, weights)
    expected_fused = jax.value_and_grad(one_fused, argnums=(0, 1))(x, w)
    set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
    actual, expected = {}, {}
    for kind, t in _axis_types().items():
        for shape, names, batch_axis in (((8,), ("model",), None),
                                         ((2, 4), ("data", "model"), "data")):  # fmt: skip
            kw = {} if t is None else {"axis_types": (t,) * len(shape)}
            mesh = jax.make_mesh(shape, names, **kw)
            ce, fused = losses(mesh, batch_axis)
            modes = {"jit": contextlib.nullcontext}
            if set_mesh is not None:
                modes["set_mesh_eager"] = lambda mesh=mesh: set_mesh(mesh)
            for mode, ctx in modes.items():
                wrap = jax.jit if mode == "jit" else (lambda f: f)
                with ctx():
                    key = f"{kind}/{'x'.join(map(str, shape))}/{mode}"
                    actual[key + "/ce"] = wrap(jax.value_and_grad(ce, argnums=(0, 1)))(z, weights)
                    actual[key + "/fused"] = wrap(jax.value_and_grad(fused, argnums=(0, 1)))(x, w)
                expected[key + "/ce"], expected[key + "/fused"] = expected_ce, expected_fused
    _save(out, "jax_make_mesh_vocab_parallel", actual, expected, "float32",
          {"variants": sorted(actual)}, summary)  # fmt: skip


# --------------------------------------------------- every public op in a user's shard_map


def _op_inputs():
    """``{op: [(id, arrays, per_example names, options)]}``: n = 16 rows (2 per device)."""
    import numpy as np

    rng = np.random.default_rng(21)
    n, i, o, c = 16, 3, 5, 6

    def arr(*shape):
        return rng.normal(size=shape)

    def ids():
        return rng.integers(0, c, n).astype(np.int32)

    def z():
        return {"z": arr(n, c)}

    return {
        "dense": [("dense", {"x": arr(n, i), "w": arr(i, o), "b": arr(o)}, ("x",), {}),
                  ("dense-nobias", {"x": arr(n, i), "w": arr(i, o)}, ("x",), {})],
        "relu": [("relu", z(), ("z",), {})],
        "leaky_relu": [("leaky_relu", z(), ("z",), {"negative_slope": 0.2})],
        "sigmoid": [("sigmoid", z(), ("z",), {})],
        "tanh": [("tanh", z(), ("z",), {})],
        "gelu": [("gelu-erf", z(), ("z",), {"approximate": False}),
                 ("gelu-tanh", z(), ("z",), {"approximate": True})],
        "softplus": [("softplus", z(), ("z",), {})],
        "softmax": [("softmax", z(), ("z",), {}),
                    ("softmax-where", {**z(), "where": rng.uniform(size=(n, c)) < 0.7},
                     ("z", "where"), {})],
        "silu": [("silu", z(), ("z",), {})],
        "swish": [("swish", z(), ("z",), {})],
        "embedding": [("embedding", {"ids": rng.integers(0, 7, n).astype(np.int32),
                                     "table": arr(7, 4)}, ("ids",), {})],
        "position_embedding": [("position_embedding", {"x": arr(n, 4, 3), "table": arr(6, 3)},
                                ("x",), {})],
        "layer_norm": [("layer_norm", {"x": arr(n, 5), "gamma": arr(5), "beta": arr(5)},
                        ("x",), {})],
        "rms_norm": [("rms_norm", {"x": arr(n, 5), "gamma": arr(5)}, ("x",), {})],
        # The rows share one mask (broadcast_dims): inside a shard_map each device draws
        # for its own rows' shape, so a mask per row would differ from one device's.
        "dropout": [("dropout-rows-share-a-mask",
                     {"x": arr(n, 5), "key": np.asarray([0, 21], np.uint32)}, ("x",),
                     {"rate": 0.3, "broadcast_dims": (0,)})],
        "attention": [
            ("attention-store", {"q": arr(n, 2, 4, 3), "k": arr(n, 2, 4, 3), "v": arr(n, 2, 4, 3)},
             ("q", "k", "v"), {}),
            ("attention-recompute-2-blocks",
             {"q": arr(n, 1, 130, 2), "k": arr(n, 1, 130, 2), "v": arr(n, 1, 130, 2)},
             ("q", "k", "v"), {"strategy": "recompute"}),
        ],
        "log_softmax": [("log_softmax", z(), ("z",), {})],
        "mse": [("mse", {"pred": arr(n, c), "target": arr(n, c)}, ("pred", "target"), {})],
        "sigmoid_binary_cross_entropy": [
            ("bce", {"logits": arr(n, c), "labels": rng.uniform(size=(n, c))},
             ("logits", "labels"), {})],
        "softmax_cross_entropy": [
            ("ce-ids-all-options",
             {"logits": arr(n, c), "labels": ids(), "where": rng.uniform(size=n) < 0.8,
              "class_weights": rng.uniform(0.5, 2.0, c)},
             ("logits", "labels", "where"),
             {"label_smoothing": 0.1, "z_loss": 1e-3, "ignore_index": 2}),
            ("ce-probs", {"logits": arr(n, c), "labels": rng.dirichlet(np.ones(c), n)},
             ("logits", "labels"), {}),
        ],
        "linear_softmax_cross_entropy": [
            ("fused-recompute",
             {"x": arr(n, i), "w": arr(i, c), "labels": ids(), "b": arr(c),
              "class_weights": rng.uniform(0.5, 2.0, c)},
             ("x", "labels"), {"label_smoothing": 0.1, "softcap": 4.0, "chunk_size": 4}),
            ("fused-forward", {"x": arr(n, i), "w": arr(i, c), "labels": ids(), "b": arr(c)},
             ("x", "labels"), {"strategy": "forward", "z_loss": 1e-3}),
        ],
    }  # fmt: skip


def _user_op():
    """A user's own op (``jaxbp.Op``): ``y = max(x·w + b, 0)²``, as docs/custom_ops.md."""
    import jax.numpy as jnp

    import jaxbp

    def fwd(x, w, b):
        r = jnp.maximum(x @ w + b, 0.0)
        return r * r, (x, w, r)

    def bwd(res, g):
        x, w, r = res
        dz = 2.0 * g * r
        return dz @ w.T, x.T @ dz, dz.sum(axis=0)

    def jvp(res, tangents):  # ẏ = 2r ⊙ (ẋ·w + x·ẇ + ḃ)
        x, w, r = res
        dx, dw, db = tangents
        return 2.0 * r * (dx @ w + x @ dw + db)

    def ref(x, w, b):
        return jnp.maximum(x @ w + b, 0.0) ** 2

    return jaxbp.Op(fwd, bwd, ref, name="sqrelu", per_example=("x",), jvp=jvp)


def _all_op_cases(rng):
    """``[(op name, id, arrays, per-example names, options, op, reference)]``: every public
    op's examples (:func:`_op_inputs`) and a user's ``jaxbp.Op``, whose inputs come from
    ``rng``."""
    import jaxbp

    cases = [(name, cid, arrays, per_ex, opts, getattr(jaxbp, name),
              getattr(jaxbp.reference, name))
             for name, examples in _op_inputs().items()
             for cid, arrays, per_ex, opts in examples]  # fmt: skip
    user = _user_op()
    cases.append(("jaxbp.Op", "user-op", {"x": rng.normal(size=(16, 3)),
                                          "w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)},
                  ("x",), {}, lambda x, w, b: user(x, w, b),
                  lambda x, w, b: user.reference(x, w, b)))  # fmt: skip
    return cases


def _grad_in_shard_map(mesh, op, ref, raw, per_ex, opts, normal):
    """``(grad in the user's shard_map, grad of the reference on the whole batch)`` of
    ``psum(Σ g⊙op(...))`` for every floating argument; rows split over both mesh axes."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rows, both = P(("data", "model")), ("data", "model")
    arrays = {k: jnp.asarray(v) for k, v in raw.items()}
    diff = sorted(k for k, v in arrays.items() if jnp.issubdtype(v.dtype, jnp.floating))
    d = {k: arrays[k] for k in diff}
    rest = {k: v for k, v in arrays.items() if k not in diff}
    cot = jnp.asarray(normal(size=ref(**arrays, **opts).shape))

    def total(fn, d, rest, cot):
        return jnp.sum(cot * fn(**d, **rest, **opts))

    def local(d, rest, cot):
        return jax.grad(lambda d: jax.lax.psum(total(op, d, rest, cot), both))(d)

    dspec = {k: rows if k in per_ex else P() for k in d}
    rspec = {k: rows if k in per_ex else P() for k in rest}
    placed = [jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), t, sp)
              for t, sp in ((d, dspec), (rest, rspec), (cot, rows))]  # fmt: skip
    mapped = _shard_map()(local, mesh=mesh, in_specs=(dspec, rspec, rows), out_specs=dspec)
    actual = jax.jit(mapped)(*placed)  # check_vma=True: shard_map's default
    return actual, jax.grad(lambda d: total(ref, d, rest, cot))(d)


def case_ops_in_user_shard_map(out, summary):
    """Every public op (and a user's ``jaxbp.Op``) under ``jax.grad`` inside the user's own
    ``jax.shard_map`` with the default ``check_vma=True``: the batch split over both axes of
    a (2, 4) mesh, the weights replicated; the gradient of ``psum(Σ g⊙op(...))`` against
    ``jax.grad`` of the reference on the whole batch, for every floating argument."""
    import jax
    import numpy as np

    from tests.parallel_worker import _save

    kinds = _axis_types()
    t = kinds.get("Explicit")
    mesh = jax.make_mesh((2, 4), ("data", "model"), **({} if t is None else {"axis_types": (t, t)}))
    rng = np.random.default_rng(22)
    cases = _all_op_cases(rng)
    actual, expected, errors = {}, {}, {}
    for _, cid, raw, per_ex, opts, op, ref in cases:
        try:
            actual[cid], expected[cid] = _grad_in_shard_map(
                mesh, op, ref, raw, per_ex, opts, rng.normal
            )
        except Exception as e:  # noqa: BLE001 - reported per op by the test
            errors[cid] = f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"
    ops = sorted({c[0] for c in cases})
    _save(out, "ops_in_user_shard_map", actual, expected, "float64",
          {"ops": ops, "examples": sorted(actual), "errors": errors}, summary)  # fmt: skip


def _jvp_in_shard_map(mesh, twin, ref, raw, per_ex, opts, normal):
    """``(jax.jvp of the forward-mode twin in the user's shard_map, jax.jvp of the reference
    on the whole batch)`` along one random tangent of every floating argument; rows split
    over both mesh axes, the weights (and their tangents) replicated."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rows = P(("data", "model"))
    arrays = {k: jnp.asarray(v) for k, v in raw.items()}
    diff = sorted(k for k, v in arrays.items() if jnp.issubdtype(v.dtype, jnp.floating))
    d = {k: arrays[k] for k in diff}
    rest = {k: v for k, v in arrays.items() if k not in diff}
    t = {k: jnp.asarray(normal(size=v.shape)) for k, v in d.items()}

    def jvp(fn, d, rest, t):
        return jax.jvp(lambda d: fn(**d, **rest, **opts), (d,), (t,))[1]

    dspec = {k: rows if k in per_ex else P() for k in d}
    rspec = {k: rows if k in per_ex else P() for k in rest}
    placed = [jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), x, sp)
              for x, sp in ((d, dspec), (rest, rspec), (t, dspec))]  # fmt: skip
    mapped = _shard_map()(lambda d, r, t: jvp(twin, d, r, t), mesh=mesh,
                          in_specs=(dspec, rspec, dspec), out_specs=rows)  # fmt: skip
    return jax.jit(mapped)(*placed), jvp(ref, d, rest, t)


def case_twins_jvp_in_user_shard_map(out, summary):
    """Every public op's forward-mode twin (``jaxbp.forward_mode``) and a user's
    ``jaxbp.Op`` with a jvp rule under ``jax.jvp`` inside the user's own ``jax.shard_map``
    (``check_vma=True``), against ``jax.jvp`` of the reference on the whole batch."""
    import jax
    import numpy as np

    import jaxbp.forward_mode as fm
    from tests.parallel_worker import _save

    kinds = _axis_types()
    t = kinds.get("Explicit")
    mesh = jax.make_mesh((2, 4), ("data", "model"), **({} if t is None else {"axis_types": (t, t)}))
    rng = np.random.default_rng(23)
    cases = _all_op_cases(rng)
    user = fm.of(_user_op())
    actual, expected, errors = {}, {}, {}
    for name, cid, raw, per_ex, opts, _, ref in cases:
        twin = (lambda x, w, b: user(x, w, b)) if name == "jaxbp.Op" else getattr(fm, name)
        try:
            actual[cid], expected[cid] = _jvp_in_shard_map(
                mesh, twin, ref, raw, per_ex, opts, rng.normal
            )
        except Exception as e:  # noqa: BLE001 - reported per op by the test
            errors[cid] = f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"
    ops = sorted({c[0] for c in cases})
    _save(out, "twins_jvp_in_user_shard_map", actual, expected, "float64",
          {"ops": ops, "examples": sorted(actual), "errors": errors}, summary)  # fmt: skip


def case_tensor_parallel_dense_in_user_shard_map(out, summary):
    """``dense`` with ``w (i, o)`` split over "model" (columns) and x split over "data":
    ``dx = g_k·w_kᵀ`` differs per model shard, and the rule's cotangent for the replicated
    ``x`` must be its ``psum`` over "model"; ``dw``, ``db`` sum over "data"."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbp
    from tests.parallel_worker import _save

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    rng = np.random.default_rng(23)
    x, w, b = rng.normal(size=(8, 3)), rng.normal(size=(3, 8)), rng.normal(size=8)
    g = rng.normal(size=(8, 8))
    specs = (P("data"), P(None, "model"), P("model"), P("data", "model"))

    def local(x, w, b, g):
        def f(x, w, b):
            return jax.lax.psum(jnp.sum(g * jaxbp.tanh(jaxbp.dense(x, w, b))), ("data", "model"))

        return jax.grad(f, argnums=(0, 1, 2))(x, w, b)

    placed = [jax.device_put(jnp.asarray(a), NamedSharding(mesh, s))
              for a, s in zip((x, w, b, g), specs, strict=True)]  # fmt: skip
    mapped = _shard_map()(local, mesh=mesh, in_specs=specs, out_specs=specs[:3])
    actual = jax.jit(mapped)(*placed)

    def one(x, w, b):
        return jnp.sum(g * jaxbp.reference.tanh(jaxbp.reference.dense(x, w, b)))

    expected = jax.grad(one, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
    _save(out, "tensor_parallel_dense_in_user_shard_map", actual, expected, "float64", None,
          summary)  # fmt: skip


def case_checked_inside_user_shard_map(out, summary):
    """``checked(jit(shard_map(grad)))`` reports an out-of-range id seen on one device."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbp

    mesh = jax.make_mesh((8,), ("data",))
    z = jnp.asarray(np.random.default_rng(24).normal(size=(16, 4)))
    good = jnp.asarray(np.arange(16) % 4, jnp.int32)
    bad = good.at[13].set(7)

    def local(z, y):
        return jax.grad(lambda z: jax.lax.psum(jnp.sum(jaxbp.softmax_cross_entropy(z, y)), "data"))(
            z
        )

    f = jax.jit(
        _shard_map()(local, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
    )
    z, good, bad = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (z, good, bad))
    f(z, good)  # plain, warm
    err_bad, _ = jaxbp.checked(f)(z, bad)
    err_good, _ = jaxbp.checked(f)(z, good)
    plain = f(z, bad)  # plain again: NaN rows, no error
    summary["checked_inside_user_shard_map"] = {
        "ok": True,
        "dtype": None,
        "info": {
            "bad": err_bad.get(),
            "good": err_good.get(),
            "plain_nan_rows": np.flatnonzero(np.isnan(np.asarray(plain)).any(1)).tolist(),
        },
    }


# ------------------------------------- Explicit axes under plain jit (no shard_map at all)


def _explicit_mesh():
    """``jax.make_mesh((8,), ("data",))`` with Explicit axes, or ``None`` on a JAX without."""
    import jax

    t = _axis_types().get("Explicit")
    if t is None or not hasattr(jax.sharding, "auto_axes"):
        return None
    return jax.make_mesh((8,), ("data",), axis_types=(t,))


def _explicit_contexts(mesh):
    """How users give JAX the mesh: ``jax.set_mesh`` around the call, or only the inputs'
    types (arrays placed on the mesh, a plain ``jax.jit``)."""
    import contextlib

    import jax

    set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
    out = {"typed_inputs": contextlib.nullcontext}
    if set_mesh is not None:
        out["set_mesh"] = lambda: set_mesh(mesh)
    return out


def case_ops_on_explicit_axes_under_jit(out, summary):
    """Every public op (and a user's ``jaxbp.Op``) under ``jax.jit(jax.grad)`` with the batch
    split over an Explicit ``data`` axis and the weights replicated, no ``shard_map``: the
    gradient of ``Σ g⊙op(...)`` against ``jax.grad`` of the reference on one device, and
    each gradient's sharding against its argument's (JAX's rule: a cotangent has its
    primal's type)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tests.parallel_worker import _save

    mesh = _explicit_mesh()
    if mesh is None:
        summary["ops_on_explicit_axes_under_jit"] = {"ok": True, "dtype": None,
                                                     "info": {"skipped": True}}  # fmt: skip
        return
    rng = np.random.default_rng(25)
    cases = _all_op_cases(rng)
    actual, expected, errors, wrong_types = {}, {}, {}, {}
    for ctx_name, ctx in _explicit_contexts(mesh).items():
        for _, cid, raw, per_ex, opts, op, ref in cases:
            arrays = {k: jnp.asarray(v) for k, v in raw.items()}
            diff = sorted(k for k, v in arrays.items() if jnp.issubdtype(v.dtype, jnp.floating))
            cot = jnp.asarray(rng.normal(size=ref(**arrays, **opts).shape))

            def total(fn, d, rest, cot, opts=opts):
                return jnp.sum(cot * fn(**d, **rest, **opts))

            def spec(k, per_ex=per_ex):
                return P("data") if k in per_ex else P()

            placed = {k: jax.device_put(v, NamedSharding(mesh, spec(k))) for k, v in arrays.items()}
            d = {k: placed[k] for k in diff}
            rest = {k: v for k, v in placed.items() if k not in diff}
            key = f"{ctx_name}/{cid}"
            try:
                with ctx():
                    cot_p = jax.device_put(cot, NamedSharding(mesh, P("data")))
                    grads = jax.jit(jax.grad(lambda d, r, c, op=op: total(op, d, r, c)))(
                        d, rest, cot_p
                    )
                for k in diff:
                    got, want = jax.typeof(grads[k]).sharding.spec, jax.typeof(d[k]).sharding.spec
                    if tuple(got) != tuple(want):
                        wrong_types[f"{key}/{k}"] = f"{got} for an argument of {want}"
                one = {k: arrays[k] for k in diff}
                others = {k: arrays[k] for k in arrays if k not in diff}
                actual[key] = grads
                expected[key] = jax.grad(
                    lambda d, ref=ref, others=others, cot=cot: total(ref, d, others, cot)
                )(one)
            except Exception as e:  # noqa: BLE001 - reported per op by the test
                errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"
    ops = sorted({c[0] for c in cases})
    _save(out, "ops_on_explicit_axes_under_jit", actual, expected, "float64",
          {"ops": ops, "examples": sorted(actual), "errors": errors,
           "wrong_types": wrong_types}, summary)  # fmt: skip


def case_twins_jvp_on_explicit_axes_under_jit(out, summary):
    """Every forward-mode twin (and a user's ``jaxbp.Op`` with a jvp rule) under
    ``jax.jit(jax.jvp)`` with the batch split over an Explicit ``data`` axis (typed inputs,
    no ``shard_map``): the tangent against ``jax.jvp`` of the reference on one device, and
    its sharding against the output's."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbp.forward_mode as fm
    from tests.parallel_worker import _save

    mesh = _explicit_mesh()
    if mesh is None:
        summary["twins_jvp_on_explicit_axes_under_jit"] = {"ok": True, "dtype": None,
                                                           "info": {"skipped": True}}  # fmt: skip
        return
    rng = np.random.default_rng(26)
    user = fm.of(_user_op())
    actual, expected, errors, wrong_types = {}, {}, {}, {}
    for name, cid, raw, per_ex, opts, _, ref in _all_op_cases(rng):
        twin = (lambda x, w, b: user(x, w, b)) if name == "jaxbp.Op" else getattr(fm, name)
        arrays = {k: jnp.asarray(v) for k, v in raw.items()}
        diff = sorted(k for k, v in arrays.items() if jnp.issubdtype(v.dtype, jnp.floating))
        t = {k: jnp.asarray(rng.normal(size=arrays[k].shape)) for k in diff}

        def jvp(fn, d, rest, t, opts=opts):
            return jax.jvp(lambda d: fn(**d, **rest, **opts), (d,), (t,))

        def put(a, k, per_ex=per_ex):
            return jax.device_put(a, NamedSharding(mesh, P("data") if k in per_ex else P()))

        try:
            d = {k: put(arrays[k], k) for k in diff}
            rest = {k: put(v, k) for k, v in arrays.items() if k not in diff}
            out_, tangent = jax.jit(lambda d, r, t, twin=twin: jvp(twin, d, r, t))(
                d, rest, {k: put(v, k) for k, v in t.items()}
            )
            got, want = jax.typeof(tangent).sharding.spec, jax.typeof(out_).sharding.spec
            if tuple(got) != tuple(want):
                wrong_types[cid] = f"{got} for an output of {want}"
            actual[cid] = tangent
            expected[cid] = jvp(
                ref,
                {k: arrays[k] for k in diff},
                {k: v for k, v in arrays.items() if k not in diff},
                t,
            )[1]
        except Exception as e:  # noqa: BLE001 - reported per op by the test
            errors[cid] = f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"
    _save(out, "twins_jvp_on_explicit_axes_under_jit", actual, expected, "float64",
          {"examples": sorted(actual), "errors": errors, "wrong_types": wrong_types},
          summary)  # fmt: skip


def case_models_on_explicit_axes_under_jit(out, summary):
    """The explicit reverse loops (``value_and_grad`` of an MLP and of a GPT, per-example
    gradients and norms, ``clipped_grad`` of an MLP, of a tied and masked GPT and of a
    user's model, with noise) and their references, called and jitted with the batch placed
    on an Explicit ``data`` axis: the one-device results, gradients typed like the
    (replicated) parameters."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbp
    from tests.parallel_worker import _save

    mesh = _explicit_mesh()
    if mesh is None:
        summary["models_on_explicit_axes_under_jit"] = {"ok": True, "dtype": None,
                                                        "info": {"skipped": True}}  # fmt: skip
        return
    from tests.model_mesh_cases import TokenTagger

    rng = np.random.default_rng(26)
    mlp = jaxbp.MLP((6, 12, 5), activation="gelu")
    pm = mlp.init(jax.random.PRNGKey(1), jnp.float64)
    x, y = jnp.asarray(rng.normal(size=(16, 6))), jnp.asarray(rng.integers(0, 5, 16), jnp.int32)
    gpt = jaxbp.GPT(vocab=11, d=8, heads=2, layers=2, context=8)
    pg = gpt.init(jax.random.PRNGKey(2), jnp.float64)
    ids = jnp.asarray(rng.integers(0, 11, (16, 8)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 11, (16, 8)), jnp.int32)
    tied = jaxbp.GPT(vocab=11, d=8, heads=2, layers=1, context=8, tied=True)
    pt = tied.init(jax.random.PRNGKey(3), jnp.float64)
    mask = rng.uniform(size=(16, 8)) < 0.6
    mask[:2] = False  # the first data shard: nothing valid
    tagger = TokenTagger()
    pu = tagger.init(jax.random.PRNGKey(4), jnp.float64)
    xu, yu = jnp.asarray(rng.normal(size=(16, 3, 3))), jnp.asarray(rng.integers(0, 4, (16, 3)))
    noisy = {"l2_clip": 0.1, "noise_multiplier": 1.1}
    # name: (transform, inputs, which output holds the (replicated) gradients, or None, and
    # keyword arguments placed on the data axis): (loss, grads) and (grads, per-example
    # norms); the norms alone are split like the batch.
    transforms = {
        "mlp/value_and_grad": (jaxbp.value_and_grad(mlp), (pm, x, y), 1, {}),
        "mlp/reference.value_and_grad": (jaxbp.reference.value_and_grad(mlp), (pm, x, y), 1, {}),
        "mlp/per_example_grad_norms": (jaxbp.per_example_grad_norms(mlp), (pm, x, y), None, {}),
        "mlp/clipped_grad": (jaxbp.clipped_grad(mlp, l2_clip=0.5), (pm, x, y), 0, {}),
        "gpt/value_and_grad": (jaxbp.value_and_grad(gpt), (pg, ids, targets), 1, {}),
        "gpt/reference.value_and_grad": (
            jaxbp.reference.value_and_grad(gpt), (pg, ids, targets), 1, {}),
        "tied_gpt/clipped_grad/noise": (
            jaxbp.clipped_grad(tied, **noisy), (pt, ids, targets), 0, {"where": mask}),
        "user/clipped_grad/noise": (
            jaxbp.clipped_grad(tagger, **noisy), (pu, xu, yu), 0, {}),
    }  # fmt: skip
    actual, expected, errors, wrong_types = {}, {}, {}, {}
    for ctx_name, ctx in _explicit_contexts(mesh).items():
        for name, (f, (params, a, b), grads_at, kw) in transforms.items():
            key = f"{ctx_name}/{name}"
            rows = NamedSharding(mesh, P("data"))
            placed = (jax.device_put(params, NamedSharding(mesh, P())),
                      jax.device_put(a, rows), jax.device_put(b, rows))  # fmt: skip
            kw_placed = {k: jax.device_put(v, rows) for k, v in kw.items()}
            if "noise" in name:  # the same key, replicated
                kw, kw_placed = (dict(d, key=jax.random.key(6)) for d in (kw, kw_placed))
            try:
                with ctx():
                    eager = f(*placed, **kw_placed)
                    jitted = jax.jit(lambda *a, f=f, kw=kw_placed: f(*a, **kw))(*placed)
                if grads_at is not None:
                    for path, g in jax.tree_util.tree_leaves_with_path(jitted[grads_at]):
                        if any(e is not None for e in jax.typeof(g).sharding.spec):
                            wrong_types[f"{key}{jax.tree_util.keystr(path)}"] = str(
                                jax.typeof(g).sharding.spec
                            )
                one = f(params, a, b, **kw)
                actual[key + "/call"], expected[key + "/call"] = eager, one
                actual[key + "/jit"], expected[key + "/jit"] = jitted, one
            except Exception as e:  # noqa: BLE001 - reported by the test
                errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"
    _save(out, "models_on_explicit_axes_under_jit", actual, expected, "float64",
          {"errors": errors, "wrong_types": wrong_types, "variants": sorted(actual)},
          summary)  # fmt: skip


CASES = [
    case_jax_make_mesh_value_and_grad,
    case_jax_make_mesh_vocab_parallel,
    case_ops_in_user_shard_map,
    case_twins_jvp_in_user_shard_map,
    case_twins_jvp_on_explicit_axes_under_jit,
    case_tensor_parallel_dense_in_user_shard_map,
    case_checked_inside_user_shard_map,
    case_ops_on_explicit_axes_under_jit,
    case_models_on_explicit_axes_under_jit,
]
