"""The GPT across 8 simulated CPU devices, for tests/parallel_worker.py ``gpt`` (its own
process, so that it runs beside the other mesh cases): ``jaxbp.parallel.value_and_grad`` of
a :class:`jaxbp.GPT` on ``jax.make_mesh`` meshes 1×8, 2×4, 4×2 and 8×1, against
``jax.value_and_grad`` of the plain-jnp twin on one device (``jaxbp.reference``), every
option of the GPT among them; the layout of the gradients; the collectives of the compiled
step against Megatron-LM's count; the errors. tests/test_parallel_gpt.py asserts.
"""

from __future__ import annotations

V, D, H, L, CONTEXT, T, N = 16, 16, 8, 2, 8, 6, 8  # t < context: pos rows t.. get 0


def _problem(rng, dtype, where_kind, data):
    """Ids, targets and a mask ``(N, T)``; ``"uneven"``: the first data shard fully masked,
    the second with one valid token, the others with some."""
    import numpy as np

    ids = rng.integers(0, V, (N, T)).astype(np.int32)
    targets = rng.integers(0, V, (N, T)).astype(np.int32)
    if where_kind is None:
        return ids, targets, None
    where = rng.uniform(size=(N, T)) < 0.7
    if where_kind == "uneven" and data > 1:
        per = N // data
        where[:per] = False
        where[per : 2 * per] = False
        where[per, 0] = True
    return ids, targets, where


# (mesh shape, tied, attention, where): every option on more than one mesh
CONFIGS = [
    ((1, 8), False, "store", "random"),
    ((2, 4), True, "recompute", "uneven"),
    ((2, 4), False, "store", "random"),
    ((4, 2), True, "store", None),
    ((8, 1), False, "recompute", "uneven"),
]


def case_gpt_tensor_parallel_meshes(out, summary):
    """float64, ``jax.make_mesh`` (Explicit axes), unplaced inputs: one device's results."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbp
    from jaxbp import parallel
    from tests.parallel_worker import _save

    rng = np.random.default_rng(31)
    actual, expected, info = {}, {}, {}
    for shape, tied, strategy, where_kind in CONFIGS:
        gpt = jaxbp.GPT(vocab=V, d=D, heads=H, layers=L, context=CONTEXT, tied=tied,
                        attention=strategy)  # fmt: skip
        params = gpt.init(jax.random.PRNGKey(len(actual)), jnp.float64)
        ids, targets, where = _problem(rng, np.float64, where_kind, shape[0])
        mesh = jax.make_mesh(shape, ("data", "model"))
        f = parallel.value_and_grad(gpt, mesh, axis="data", model_axis="model")
        key = f"{shape[0]}x{shape[1]}/tied={tied}/{strategy}/where={where_kind}"
        actual[key] = f(params, ids, targets, where=where)
        expected[key] = jaxbp.reference.value_and_grad(gpt)(params, ids, targets, where=where)
        grads = actual[key][1]
        info[key] = {
            "tok_shard": list(grads["tok"].addressable_shards[0].data.shape),
            "qkv_shard": list(
                grads["blocks"][0]["attn"]["qkv"]["w"].addressable_shards[0].data.shape
            ),  # fmt: skip
            "out_spec": str(grads["blocks"][0]["mlp"]["out"]["w"].sharding.spec),
        }
    # Plain data parallelism: model_axis=None on a 1-d mesh of 8.
    gpt = jaxbp.GPT(vocab=V, d=D, heads=H, layers=L, context=CONTEXT)
    params = gpt.init(jax.random.PRNGKey(9), jnp.float64)
    ids, targets, where = _problem(rng, np.float64, "uneven", 8)
    mesh = jax.make_mesh((8,), ("data",))
    actual["8/data-only"] = parallel.value_and_grad(gpt, mesh, axis="data")(
        params, ids, targets, where=where
    )
    expected["8/data-only"] = jaxbp.reference.value_and_grad(gpt)(params, ids, targets, where=where)
    _save(out, "gpt_tensor_parallel_meshes", actual, expected, "float64",
          {"variants": sorted(actual), "shards": info}, summary)  # fmt: skip


def case_gpt_placed_jitted_and_optax(out, summary):
    """Parameters placed by ``gpt_param_specs`` (Explicit and Auto axes), the step inside
    ``jax.jit`` with an optax update: one device's results, every gradient and updated
    parameter where its parameter was."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxbp
    from jaxbp import parallel
    from tests.mesh_cases import _axis_types
    from tests.parallel_worker import _save

    rng = np.random.default_rng(32)
    gpt = jaxbp.GPT(vocab=V, d=D, heads=4, layers=1, context=CONTEXT, tied=True)
    params = gpt.init(jax.random.PRNGKey(3), jnp.float64)
    ids, targets, where = _problem(rng, np.float64, "uneven", 2)
    opt = optax.adam(1e-2)
    one = jaxbp.reference.value_and_grad(gpt)(params, ids, targets, where=where)
    with jax.numpy_dtype_promotion("standard"):
        upd, _ = opt.update(one[1], opt.init(params), params)
    expected_step = (one[0], optax.apply_updates(params, upd))
    actual, expected, misplaced = {}, {}, {}
    for kind, t in _axis_types().items():
        if kind == "default":
            continue
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(t, t))
        specs = parallel.gpt_param_specs(gpt, "model")
        placed = parallel.shard(params, mesh, specs)
        f = parallel.value_and_grad(gpt, mesh, axis="data", model_axis="model")

        @jax.jit
        def step(p, s, ids, targets, where, f=f):
            loss, grads = f(p, ids, targets, where=where)
            with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
                updates, s = opt.update(grads, s, p)
            return loss, grads, optax.apply_updates(p, updates)

        loss, grads, new = step(placed, opt.init(placed), ids, targets, where)
        for name, tree in (("grads", grads), ("params", new)):
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree),
                                    jax.tree.leaves(placed), strict=True):  # fmt: skip
                if not a.sharding.is_equivalent_to(b.sharding, a.ndim):
                    misplaced[f"{kind}/{name}{jax.tree_util.keystr(path)}"] = str(a.sharding)
        actual[kind], expected[kind] = (loss, new), expected_step
        actual[kind + "/grads"], expected[kind + "/grads"] = grads, one[1]
    _save(out, "gpt_placed_jitted_and_optax", actual, expected, "float64",
          {"misplaced": misplaced, "variants": sorted(actual)}, summary)  # fmt: skip


def case_gpt_collectives(out, summary):
    """The bytes of every collective of the compiled 2×4 and 4×2 steps (float32), read from
    the HLO, against Megatron-LM's count (benchmarks P15)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbp
    from benchmarks.cases_parallel import collective_bytes, megatron_bytes
    from jaxbp import parallel

    rng = np.random.default_rng(33)
    gpt = jaxbp.GPT(vocab=V, d=D, heads=4, layers=L, context=CONTEXT)
    params = gpt.init(jax.random.PRNGKey(4), jnp.float32)
    ids, targets, _ = _problem(rng, np.float32, None, 1)
    info = {}
    for shape in ((2, 4), (4, 2)):
        mesh = jax.make_mesh(shape, ("data", "model"))
        placed = parallel.shard(params, mesh, parallel.gpt_param_specs(gpt, "model"))
        f = parallel.value_and_grad(gpt, mesh, axis="data", model_axis="model")
        hlo = f.jitted.lower(placed, ids, targets, None).compile().as_text()
        sizes = {"data": shape[0], "model": shape[1]}
        info[f"{shape[0]}x{shape[1]}"] = {
            "measured": collective_bytes(hlo, sizes),
            "formula": megatron_bytes(gpt, sizes, N, T, jnp.float32),
            "per_block_ntd": N // shape[0] * T * D * 4,
        }
    summary["gpt_collectives"] = {"ok": True, "dtype": "float32", "info": info}


def case_gpt_errors(out, summary):
    """Bad meshes and shapes: errors naming the sizes and what would divide, before any
    compilation (the compiled step's cache stays empty)."""
    import jax
    import numpy as np

    import jaxbp
    from jaxbp import parallel

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    ok = jaxbp.GPT(vocab=16, d=16, heads=4, layers=1, context=8)
    params = ok.init(jax.random.PRNGKey(0))
    f = parallel.value_and_grad(ok, mesh, axis="data", model_axis="model")
    bad_ids = np.zeros((3, 8), np.int32)
    attempts = {
        "no_model_axis": lambda: parallel.value_and_grad(
            ok, jax.make_mesh((8,), ("data",)), axis="data", model_axis="model"
        ),
        "no_data_axis": lambda: parallel.value_and_grad(ok, mesh, axis="batch"),
        "heads": lambda: parallel.value_and_grad(
            jaxbp.GPT(vocab=16, d=12, heads=6, layers=1, context=8), mesh, model_axis="model"
        ),
        "vocab": lambda: parallel.value_and_grad(
            jaxbp.GPT(vocab=65, d=16, heads=4, layers=1, context=8), mesh, model_axis="model"
        ),
        "batch": lambda: f(params, bad_ids, bad_ids),
    }
    msgs = {}
    for name, fn in attempts.items():
        try:
            fn()
            msgs[name] = None
        except Exception as e:  # noqa: BLE001 - recorded, asserted on by the test
            msgs[name] = f"{type(e).__name__}: {e}"
    msgs["compiled_after_errors"] = f.jitted._cache_size()
    summary["gpt_errors"] = {"ok": True, "dtype": None, "info": msgs}


CASES = [
    case_gpt_errors,
    case_gpt_tensor_parallel_meshes,
    case_gpt_placed_jitted_and_optax,
    case_gpt_collectives,
]
