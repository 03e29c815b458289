"""Worker for tests/test_parallel.py: runs jaxbp.parallel on simulated CPU devices.

The device count of the CPU backend is fixed when JAX starts, so the mesh tests run here, in
a fresh process, never in the pytest process. Usage::

    python tests/parallel_worker.py single OUT            # 8 CPU devices, one process
    python tests/parallel_worker.py gpt OUT               # the GPT's cases, likewise
    python tests/parallel_worker.py multiprocess OUT --process-id K --num-processes 2 \\
        --coordinator 127.0.0.1:PORT                      # 4 CPU devices per process

Each case writes ``OUT/<case>.npz`` holding ``actual/<k>`` (the sharded result) and
``expected/<k>`` (one device's result, computed in the same process) for every leaf ``k``,
and ``OUT/summary[-K].json`` records per case ``{"ok", "dtype", "error", "info"}``. The
pytest side compares the arrays with ``tests.helpers.assert_close``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


def _set_device_count(count: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
    flags += f" --xla_force_host_platform_device_count={count}"
    if "xla_backend_optimization_level" not in flags:
        # The programs here are tiny: LLVM's optimisation is most of their compile time, and
        # it changes neither results nor XLA's buffer assignment (the memory figures).
        flags += " --xla_backend_optimization_level=0"
    # The compile flags tests/conftest.py probed for this jaxlib (see there).
    probed = os.environ.get("JAXBP_TEST_XLA_FLAGS", "").split()
    flags += " " + " ".join(f for f in probed if f.split("=")[0] not in flags)
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def _save(out, name, actual, expected, dtype, info=None, summary=None):
    import jax
    import numpy as np

    la, ta = jax.tree.flatten(actual)
    le, te = jax.tree.flatten(expected)
    if ta != te:
        raise AssertionError(f"{name}: structures differ: {ta} vs {te}")
    arrays = {f"actual/{k}": np.asarray(a) for k, a in enumerate(la)}
    arrays.update({f"expected/{k}": np.asarray(e) for k, e in enumerate(le)})
    np.savez(os.path.join(out, f"{name}.npz"), **arrays)
    summary[name] = {"ok": True, "dtype": str(dtype), "info": info or {}}


# ------------------------------------------------------------------------------ data


def _data(seed, n, i, c, dtype):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, i)).astype(dtype)
    labels = rng.integers(0, c, n).astype(np.int32)
    return rng, x, labels


def _uneven_where(n, shards):
    """Shard 0 fully masked, shard 1 keeps one row, the others lose a varying number."""
    import numpy as np

    where = np.ones(n, bool)
    per = n // shards
    where[:per] = False
    where[per : 2 * per - 1] = False
    for k in range(2, shards):
        where[k * per : k * per + (k % per)] = False
    return where


# ------------------------------------------------------------------------------ cases


def case_data_parallel_uneven_masks(out, summary):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbp
    from jaxbp import parallel

    mesh = parallel.make_mesh((8,), ("data",))
    model = jaxbp.MLP((6, 16, 12, 8), activation="tanh")
    params = model.init(jax.random.PRNGKey(0), jnp.float32)
    _, x, labels = _data(0, 32, 6, 8, np.float32)
    where = _uneven_where(32, 8)
    actual = parallel.value_and_grad(model, mesh)(params, x, labels, where=where)
    expected = jaxbp.value_and_grad(model)(params, x, labels, where=where)
    counts = where.reshape(8, -1).sum(1).tolist()
    _save(
        out,
        "data_parallel_uneven_masks",
        actual,
        expected,
        "float32",
        {"valid_per_shard": counts},
        summary,
    )


def case_data_parallel_float64_options(out, summary):
    """ignore_index + label smoothing + z-loss + class weights, float64: exact to 1e-12."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbp
    from jaxbp import parallel

    mesh = parallel.make_mesh((8,), ("data",))
    opts = {"ignore_index": -1, "label_smoothing": 0.1, "z_loss": 1e-3}
    model = jaxbp.MLP((5, 9, 6), activation="gelu", loss_options=opts)
    params = model.init(jax.random.PRNGKey(1), jnp.float64)
    rng, x, labels = _data(1, 24, 5, 6, np.float64)
    labels[[0, 1, 2, 7, 11, 20]] = -1  # ignored rows, unevenly spread over the shards
    labels[3:6] = -1  # shard 1 (rows 3..5) keeps nothing
    weights = rng.uniform(0.5, 2.0, 6)
    actual = parallel.value_and_grad(model, mesh)(params, x, labels, class_weights=weights)
    expected = jaxbp.reference.value_and_grad(model)(params, x, labels, class_weights=weights)
    _save(out, "data_parallel_float64_options", actual, expected, "float64", None, summary)


def case_data_parallel_mse_where(out, summary):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbp
    from jaxbp import parallel

    mesh = parallel.make_mesh((8,), ("data",))
    model = jaxbp.MLP((4, 7, 3), activation="sigmoid", loss="mse")
    params = model.init(jax.random.PRNGKey(2), jnp.float64)
    rng, x, _ = _data(2, 16, 4, 3, np.float64)
    target = rng.normal(size=(16, 3))
    where = _uneven_where(16, 8)
    actual = parallel.value_and_grad(model, mesh)(params, x, target, where=where)
    expected = jaxbp.reference.value_and_grad(model)(params, x, target, where=where)
    _save(out, "data_parallel_mse_where", actual, expected, "float64", None, summary)


def _ce_inputs(seed, n, c, dtype):
    import numpy as np

    rng = np.random.default_rng(seed)
    z = (3.0 * rng.normal(size=(n, c))).astype(dtype)
    labels = rng.integers(0, c, n).astype(np.int32)
    where = rng.uniform(size=n) < 0.8
    weights = rng.uniform(0.5, 2.0, c).astype(dtype)
    probs = rng.dirichlet(np.ones(c), n).astype(dtype)
    return z, labels, where, weights, probs


def case_vocab_parallel_integer_labels(out, summary):
    import jax
    import jax.numpy as jnp

    import jaxbp
    from jaxbp import parallel

    mesh = parallel.make_mesh((8,), ("model",))
    z, labels, where, weights, _ = _ce_inputs(3, 16, 64, "float32")
    labels[2] = -100
    opts = dict(label_smoothing=0.1, ignore_index=-100, z_loss=1e-3)

    def vp(z, w):
        loss = parallel.vocab_parallel_softmax_cross_entropy(
            z, labels, mesh, where=where, class_weights=w, **opts
        )
        return jnp.sum(loss * jnp.arange(1, 17, dtype=loss.dtype)), loss  # uneven cotangent

    def one(z, w):
        loss = jaxbp.softmax_cross_entropy(z, labels, where=where, class_weights=w, **opts)
        return jnp.sum(loss * jnp.arange(1, 17, dtype=loss.dtype)), loss

    (_, loss_a), grads_a = jax.jit(jax.value_and_grad(vp, argnums=(0, 1), has_aux=True))(z, weights)
    (_, loss_b), grads_b = jax.value_and_grad(one, argnums=(0, 1), has_aux=True)(z, weights)
    shard = grads_a[0].addressable_shards[0].data.shape
    info = {"dlogits_shard_shape": list(shard), "dlogits_spec": str(grads_a[0].sharding.spec)}
    _save(
        out,
        "vocab_parallel_integer_labels",
        (loss_a, grads_a),
        (loss_b, grads_b),
        "float32",
        info,
        summary,
    )


def case_vocab_parallel_probability_labels(out, summary):
    import jax
    import jax.numpy as jnp

    import jaxbp
    from jaxbp import parallel

    mesh = parallel.make_mesh((8,), ("model",))
    z, _, where, _, probs = _ce_inputs(4, 8, 32, "float64")

    def vp(z, y):
        return jnp.sum(parallel.vocab_parallel_softmax_cross_entropy(z, y, mesh, where=where))

    def one(z, y):
        return jnp.sum(jaxbp.reference.softmax_cross_entropy(z, y, where=where))

    a = jax.jit(jax.value_and_grad(vp, argnums=(0, 1)))(z, probs)
    b = jax.value_and_grad(one, argnums=(0, 1))(z, probs)
    _save(out, "vocab_parallel_probability_labels", a, b, "float64", None, summary)


def case_vocab_parallel_2x4_batch_and_classes(out, summary):
    import jax
    import jax.numpy as jnp

    import jaxbp
    from jaxbp import parallel

    mesh = parallel.make_mesh((2, 4), ("data", "model"))
    z, labels, where, weights, _ = _ce_inputs(5, 8, 16, "float32")

    def vp(z, w):
        loss = parallel.vocab_parallel_softmax_cross_entropy(
            z, labels, mesh, axis="model", batch_axis="data", where=where, class_weights=w
        )
        return jnp.sum(loss) / jnp.maximum(jnp.sum(where), 1).astype(loss.dtype)

    def one(z, w):
        loss = jaxbp.softmax_cross_entropy(z, labels, where=where, class_weights=w)
        return jnp.sum(loss) / jnp.maximum(jnp.sum(where), 1).astype(loss.dtype)

    a = jax.jit(jax.value_and_grad(vp, argnums=(0, 1)))(z, weights)
    b = jax.value_and_grad(one, argnums=(0, 1))(z, weights)
    info = {"dlogits_shard_shape": list(a[1][0].addressable_shards[0].data.shape)}
    _save(out, "vocab_parallel_2x4_batch_and_classes", a, b, "float32", info, summary)


def _fused_case(out, summary, name, mesh_shape, names, batch_axis, dtype, opts):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbp
    from jaxbp import parallel

    mesh = parallel.make_mesh(mesh_shape, names)
    rng = np.random.default_rng(9)
    n, d, v = 16, 8, 64
    x, w = rng.normal(size=(n, d)).astype(dtype), rng.normal(size=(d, v)).astype(dtype)
    b, cw = rng.normal(size=v).astype(dtype), rng.uniform(0.5, 2.0, v).astype(dtype)
    labels = rng.integers(0, v, n).astype(np.int32)
    labels[[1, 6]] = -100
    where = rng.uniform(size=n) < 0.8
    g = np.arange(1, n + 1).astype(dtype)  # an uneven cotangent: no shortcut for a mean

    def vp(x, w, b, cw):
        loss = parallel.vocab_parallel_linear_softmax_cross_entropy(
            x, w, labels, mesh, b, batch_axis=batch_axis, where=where, class_weights=cw,
            ignore_index=-100, **opts,
        )  # fmt: skip
        return jnp.sum(g * loss)

    def ref(x, w, b, cw):
        loss = jaxbp.reference.linear_softmax_cross_entropy(
            x, w, labels, b, where=where, class_weights=cw, ignore_index=-100, **opts
        )
        return jnp.sum(g * loss)

    a = jax.jit(jax.value_and_grad(vp, argnums=(0, 1, 2, 3)))(x, w, b, cw)
    e = jax.value_and_grad(ref, argnums=(0, 1, 2, 3))(x, w, b, cw)
    info = {"dw_shard_shape": list(a[1][1].addressable_shards[0].data.shape)}
    _save(out, name, a, e, dtype, info, summary)


def case_vocab_parallel_fused_float64_options(out, summary):
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, chunk_size=4)
    _fused_case(out, summary, "vocab_parallel_fused_float64_options", (8,), ("model",), None,
                "float64", opts)  # fmt: skip


def case_vocab_parallel_fused_2x4_float32(out, summary):
    _fused_case(out, summary, "vocab_parallel_fused_2x4_float32", (2, 4), ("data", "model"),
                "data", "float32", dict(chunk_size=5))  # fmt: skip


def case_mlp_2x4_vocab_parallel_last_layer(out, summary):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbp
    from jaxbp import parallel

    mesh = parallel.make_mesh((2, 4), ("data", "model"))
    model = jaxbp.MLP((6, 10, 16), activation="relu", loss_options={"label_smoothing": 0.05})
    params = model.init(jax.random.PRNGKey(3), jnp.float32)
    _, x, labels = _data(6, 16, 6, 16, np.float32)
    where = _uneven_where(16, 2)
    vg = parallel.value_and_grad(model, mesh, axis="data", model_axis="model")
    actual = vg(params, x, labels, where=where)
    expected = jaxbp.value_and_grad(model)(params, x, labels, where=where)
    info = {"last_w_spec": str(actual[1][-1]["w"].sharding.spec)}
    _save(out, "mlp_2x4_vocab_parallel_last_layer", actual, expected, "float32", info, summary)


def case_optax_steps(out, summary):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxbp
    from jaxbp import parallel

    mesh = parallel.make_mesh((8,), ("data",))
    model = jaxbp.MLP((6, 16, 8))
    params = model.init(jax.random.PRNGKey(4), jnp.float32)
    _, x, labels = _data(7, 32, 6, 8, np.float32)
    where = _uneven_where(32, 8)
    opt = optax.adam(1e-2)

    def make_step(vg):
        @jax.jit
        def step(params, state, x, labels, where):
            loss, grads = vg(params, x, labels, where=where)
            with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes int and float
                updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        return step

    results = []
    for vg in (parallel.value_and_grad(model, mesh), jaxbp.value_and_grad(model)):
        step, p, s, losses = make_step(vg), params, opt.init(params), []
        for _ in range(3):
            p, s, loss = step(p, s, x, labels, where)
            losses.append(loss)
        results.append((jnp.stack(losses), p))
    _save(out, "optax_steps", results[0], results[1], "float32", None, summary)


def case_errors(out, summary):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbp
    from jaxbp import parallel

    mesh = parallel.make_mesh((8,), ("data",))
    model = jaxbp.MLP((4, 8))
    params = model.init(jax.random.PRNGKey(0), jnp.float32)
    msgs = {}
    attempts = {
        "batch_not_divisible": lambda: parallel.value_and_grad(model, mesh)(
            params, np.zeros((12, 4), np.float32), np.zeros(12, np.int32)
        ),
        "unknown_axis": lambda: parallel.value_and_grad(model, mesh, axis="batch"),
        "classes_not_divisible": lambda: parallel.vocab_parallel_softmax_cross_entropy(
            jnp.zeros((4, 12), jnp.float32), jnp.zeros(4, jnp.int32), mesh, axis="data"
        ),
        "label_out_of_range": lambda: parallel.vocab_parallel_softmax_cross_entropy(
            jnp.zeros((4, 16), jnp.float32), jnp.array([0, 1, 16, 2], jnp.int32), mesh, axis="data"
        ),
    }
    for name, fn in attempts.items():
        try:
            fn()
            msgs[name] = None
        except Exception as e:  # noqa: BLE001 - recorded, asserted on by the test
            msgs[name] = f"{type(e).__name__}: {e}"
    summary["errors"] = {"ok": True, "dtype": None, "info": msgs}
    del jax


def case_memory(out, summary):
    """Compiled per-device memory of the vocab-parallel loss+grad vs one device's."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbp
    from jaxbp import parallel

    mesh = parallel.make_mesh((8,), ("model",))
    n, c = 64, 4096
    z, labels, *_ = _ce_inputs(8, n, c, "float32")
    zs = jax.device_put(z, NamedSharding(mesh, P(None, "model")))
    ls = jax.device_put(labels, NamedSharding(mesh, P()))

    def vp(z, labels):
        return jnp.mean(parallel.vocab_parallel_softmax_cross_entropy(z, labels, mesh))

    def one(z, labels):
        return jnp.mean(jaxbp.softmax_cross_entropy(z, labels))

    def total(fn, *args):
        m = jax.jit(jax.value_and_grad(fn)).lower(*args).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)

    a, b = total(vp, zs, ls), total(one, jnp.asarray(z), jnp.asarray(labels))
    summary["memory"] = {
        "ok": True,
        "dtype": "float32",
        "info": {"per_device": a, "one_device": b, "ratio": a / b},
    }
    del np


SINGLE = [
    case_data_parallel_uneven_masks,
    case_data_parallel_float64_options,
    case_data_parallel_mse_where,
    case_vocab_parallel_integer_labels,
    case_vocab_parallel_probability_labels,
    case_vocab_parallel_2x4_batch_and_classes,
    case_vocab_parallel_fused_float64_options,
    case_vocab_parallel_fused_2x4_float32,
    case_mlp_2x4_vocab_parallel_last_layer,
    case_optax_steps,
    case_errors,
    case_memory,
]


def _configure():
    import jax

    jax.config.update("jax_enable_x64", True)  # as the test suite: float64 available,
    jax.config.update("jax_numpy_dtype_promotion", "strict")  # and no silent promotion


def run_single(out, which="single"):
    """``single``: the cases above, tests/mesh_cases.py and tests/model_mesh_cases.py;
    ``gpt``: tests/gpt_mesh_cases.py."""
    _set_device_count(8)
    import jax

    _configure()
    if which == "gpt":
        from tests.gpt_mesh_cases import CASES as cases
    else:
        # jax.make_mesh meshes, ops inside a user's shard_map; any model, DP-SGD
        from tests import mesh_cases, model_mesh_cases

        cases = SINGLE + mesh_cases.CASES + model_mesh_cases.CASES
    summary = {"_devices": jax.device_count()}
    for case in cases:
        name = case.__name__.removeprefix("case_")
        t = time.perf_counter()
        try:
            case(out, summary)
        except Exception:  # noqa: BLE001 - one broken case must not hide the others
            summary[name] = {"ok": False, "error": traceback.format_exc()}
        summary.setdefault(name, {})["seconds"] = round(time.perf_counter() - t, 2)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def run_multiprocess(out, process_id, num_processes, coordinator):
    """Every process runs the same program on one global mesh of all processes' devices."""
    _set_device_count(4)
    import jax

    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator, num_processes=num_processes, process_id=process_id, initialization_timeout=60
    )
    _configure()
    import jax.numpy as jnp
    import numpy as np

    import jaxbp
    from jaxbp import parallel

    summary = {
        "_devices": jax.device_count(),
        "_local_devices": jax.local_device_count(),
        "_processes": jax.process_count(),
    }
    model = jaxbp.MLP((6, 16, 8))
    params = model.init(jax.random.PRNGKey(0), jnp.float32)  # same key: same values everywhere
    _, x, labels = _data(0, 32, 6, 8, np.float32)
    where = _uneven_where(32, 8)
    host = jax.tree.map(np.asarray, params)

    # Data parallel over all 8 devices of both processes.
    mesh = parallel.make_mesh((jax.device_count(),), ("data",))
    rep, row = parallel.P(), parallel.P("data")
    args = (parallel.shard(host, mesh, rep), parallel.shard(x, mesh, row),
            parallel.shard(labels, mesh, row))  # fmt: skip
    loss, grads = parallel.value_and_grad(model, mesh)(
        *args, where=parallel.shard(where, mesh, row)
    )
    actual = jax.tree.map(np.asarray, (loss, grads))  # replicated: readable on every process

    # (data=2 processes) × (model=4 local devices): the last layer split over classes.
    mesh2 = parallel.make_mesh((2, jax.device_count() // 2), ("data", "model"))
    host2 = [host[0], host[1]]
    sharded = [parallel.shard(host2[0], mesh2, rep),
               {"w": parallel.shard(host2[1]["w"], mesh2, parallel.P(None, "model")),
                "b": parallel.shard(host2[1]["b"], mesh2, parallel.P("model"))}]  # fmt: skip
    vg2 = parallel.value_and_grad(model, mesh2, axis="data", model_axis="model")
    loss2, grads2 = vg2(sharded, parallel.shard(x, mesh2, row), parallel.shard(labels, mesh2, row),
                        where=parallel.shard(where, mesh2, row))  # fmt: skip
    # The last layer's gradient is split over processes' devices: gather it to every host.
    from jax.experimental import multihost_utils

    actual2 = jax.tree.map(
        lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), (loss2, grads2)
    )

    # The GPT on the same (2, 4) mesh: batch over the processes, tensor parallel within each.
    gpt = jaxbp.GPT(vocab=16, d=16, heads=4, layers=2, context=8, tied=True)
    gpt_params = jax.tree.map(np.asarray, gpt.init(jax.random.PRNGKey(1), jnp.float64))
    rng = np.random.default_rng(5)
    ids, targets = (rng.integers(0, 16, (4, 8)).astype(np.int32) for _ in range(2))
    gpt_where = rng.uniform(size=(4, 8)) < 0.7
    gpt_where[:2] = False  # process 0's sequences all masked: the mean is still exact
    gpt_where[1, 3] = True
    placed = parallel.shard(gpt_params, mesh2, parallel.gpt_param_specs(gpt, "model"))
    f = parallel.value_and_grad(gpt, mesh2, axis="data", model_axis="model")
    loss3, grads3 = f(placed, *(parallel.shard(a, mesh2, row) for a in (ids, targets)),
                      where=parallel.shard(gpt_where, mesh2, row))  # fmt: skip
    actual3 = jax.tree.map(
        lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), (loss3, grads3)
    )

    # DP-SGD of the MLP over all 8 devices of both processes: the same key in both.
    dp_opts = {"l2_clip": 0.5, "noise_multiplier": 1.1}
    dp_key = {"key": jax.random.key(2)}
    grads4, norms4 = parallel.clipped_grad(model, mesh, **dp_opts)(
        *args, where=parallel.shard(where, mesh, row), **dp_key
    )
    actual4 = (jax.tree.map(np.asarray, grads4),
               np.asarray(multihost_utils.process_allgather(norms4, tiled=True)))  # fmt: skip

    if process_id == 0:  # one process's, one device's answer, on its first local device
        expected = jaxbp.value_and_grad(model)(params, x, labels, where=where)
        _save(out, "multiprocess_data_parallel", actual, expected, "float32", None, summary)
        _save(out, "multiprocess_2x4_last_layer", actual2, expected, "float32", None, summary)
        expected3 = jaxbp.reference.value_and_grad(gpt)(gpt_params, ids, targets, where=gpt_where)
        _save(out, "multiprocess_gpt_2x4", actual3, expected3, "float64", None, summary)
        expected4 = jaxbp.clipped_grad(model, **dp_opts)(params, x, labels, where=where, **dp_key)
        _save(out, "multiprocess_dp_sgd", actual4, expected4, "float32", None, summary)
        with open(os.path.join(out, "summary-0.json"), "w") as f:
            json.dump(summary, f, indent=1)
    jax.distributed.shutdown()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["single", "gpt", "multiprocess"])
    parser.add_argument("out")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--coordinator", default="127.0.0.1:12355")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.mode in ("single", "gpt"):
        run_single(args.out, args.mode)
    else:
        run_multiprocess(args.out, args.process_id, args.num_processes, args.coordinator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
