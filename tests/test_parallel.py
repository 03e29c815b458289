"""jaxbp.parallel on meshes of simulated CPU devices and across two real processes.

The CPU device count is fixed when JAX starts (``XLA_FLAGS=
--xla_force_host_platform_device_count=8``), so every mesh test runs in a subprocess,
``tests/parallel_worker.py``, which computes the sharded result and one device's result in
the same process and saves both; the assertions (``tests.helpers.assert_close`` at the
docs/edge_cases.md tolerances) run here. The rest of the suite never sees more than one device.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import assert_close

WORKER = Path(__file__).with_name("parallel_worker.py")
ROOT = WORKER.parent.parent
MULTIPROCESS_TIMEOUT_S = 360  # the two-process run (MLP and GPT): bounded, killed on timeout
SINGLE_TIMEOUT_S = 480  # one process, about 150 small compilations on 8 simulated devices


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)  # the worker sets the device count it needs
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _start(*args):
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout kills it and its children
    )


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _wait(procs, timeout_s):
    """Wait for ``procs`` until ``timeout_s`` from now; kill them all on timeout or failure.

    Returns ``(ok, message)`` rather than failing, so that one run's trouble is reported by
    its own tests."""
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
        for p in procs:
            remaining = max(deadline - time.monotonic(), 0.1)
            outputs.append(p.communicate(timeout=remaining)[0])
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout_s} s (killed)"
    finally:
        _kill(procs)
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            return False, f"worker exited with {p.returncode}:\n{out[-4000:]}"
    return True, ""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the 8-device run and the two-process run at once; wait for both."""
    single_out = tmp_path_factory.mktemp("parallel_single")
    mp_out = tmp_path_factory.mktemp("parallel_multiprocess")
    with socket.socket() as s:  # a free port on loopback for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp = [
        _start(
            "multiprocess",
            str(mp_out),
            "--process-id",
            str(k),
            "--num-processes",
            "2",
            "--coordinator",
            f"127.0.0.1:{port}",
        )  # fmt: skip
        for k in range(2)
    ]
    single = [_start("single", str(single_out))]
    mp_status = _wait(mp, MULTIPROCESS_TIMEOUT_S)
    single_status = _wait(single, SINGLE_TIMEOUT_S)
    return {
        "single": (single_out, "summary.json", single_status),
        "multiprocess": (mp_out, "summary-0.json", mp_status),
    }


def _result(runs, which):
    out, name, (ok, message) = runs[which]
    assert ok, f"{which} run: {message}"
    return out, json.loads((out / name).read_text())


@pytest.fixture(scope="module")
def single(runs):
    return _result(runs, "single")


@pytest.fixture(scope="module")
def multiprocess(runs):
    return _result(runs, "multiprocess")


def _compare(result, name):
    out, summary = result
    entry = summary.get(name)
    assert entry is not None, f"{name}: the worker did not run it"
    assert entry["ok"], f"{name} failed in the worker:\n{entry.get('error')}"
    data = np.load(out / f"{name}.npz")
    keys = sorted((k for k in data.files if k.startswith("actual/")), key=lambda k: int(k[7:]))
    assert keys, f"{name}: nothing saved"
    actual = [data[k] for k in keys]
    expected = [data["expected/" + k[7:]] for k in keys]
    assert_close(actual, expected, entry["dtype"], name=name)
    return entry


def test_worker_sees_eight_cpu_devices(single):
    assert single[1]["_devices"] == 8


def test_data_parallel_equals_one_device_with_uneven_masks(single):
    entry = _compare(single, "data_parallel_uneven_masks")
    counts = entry["info"]["valid_per_shard"]
    assert counts[0] == 0 and len(set(counts)) > 2  # an empty shard and uneven ones


def test_data_parallel_float64_options_match_autodiff_exactly(single):
    _compare(single, "data_parallel_float64_options")  # ignore_index, smoothing, z-loss, weights


def test_data_parallel_mse_with_where_matches_autodiff(single):
    _compare(single, "data_parallel_mse_where")


def test_vocab_parallel_ce_integer_labels_equals_one_device(single):
    entry = _compare(single, "vocab_parallel_integer_labels")
    assert entry["info"]["dlogits_shard_shape"] == [16, 8]  # each device: 64/8 classes
    assert entry["info"]["dlogits_spec"] == "P(None, 'model')"


def test_vocab_parallel_ce_probability_labels_gradients_match_autodiff(single):
    _compare(single, "vocab_parallel_probability_labels")


def test_vocab_parallel_ce_on_2x4_mesh_splits_rows_and_classes(single):
    entry = _compare(single, "vocab_parallel_2x4_batch_and_classes")
    assert entry["info"]["dlogits_shard_shape"] == [4, 4]  # (8/2 rows, 16/4 classes)


def test_vocab_parallel_fused_loss_matches_full_logits_autodiff_float64(single):
    entry = _compare(single, "vocab_parallel_fused_float64_options")  # smoothing, z, softcap
    assert entry["info"]["dw_shard_shape"] == [8, 8]  # w (d, v/8) on each device


def test_vocab_parallel_fused_loss_on_2x4_mesh_float32(single):
    entry = _compare(single, "vocab_parallel_fused_2x4_float32")
    assert entry["info"]["dw_shard_shape"] == [8, 16]  # w (d, v/4)


def test_mlp_with_vocab_parallel_last_layer_on_2x4_mesh_equals_one_device(single):
    entry = _compare(single, "mlp_2x4_vocab_parallel_last_layer")
    assert entry["info"]["last_w_spec"] == "P(None, 'model')"


def test_optax_adam_steps_match_one_device(single):
    _compare(single, "optax_steps")


def test_bad_meshes_and_labels_raise_clear_errors(single):
    msgs = single[1]["errors"]["info"]
    assert msgs["batch_not_divisible"].startswith("ValueError: x:")
    assert "(12) divisible by the 8 devices" in msgs["batch_not_divisible"]
    assert msgs["unknown_axis"].startswith("ValueError: axis:")
    assert msgs["classes_not_divisible"].startswith("ValueError: logits:")
    assert "classes c (12)" in msgs["classes_not_divisible"]
    assert msgs["label_out_of_range"].startswith("ValueError: labels:")


def test_vocab_parallel_per_device_memory_is_an_eighth(single):
    info = single[1]["memory"]["info"]
    assert info["ratio"] <= 1 / 8 + 0.05 * (1 / 8), info  # P9: within 5% of 1/8


# -- meshes as jax.make_mesh makes them; ops inside a user's own shard_map (mesh_cases.py) --


def test_jax_make_mesh_default_explicit_and_auto_meshes_give_one_device_gradients(single):
    entry = _compare(single, "jax_make_mesh_value_and_grad")
    import jax

    types = entry["info"]["axis_types"]
    if hasattr(jax.sharding, "AxisType"):
        assert types["Explicit"] == "(Explicit,)" and types["Auto"] == "(Auto,)"
    variants = entry["info"]["variants"]
    for how in ("unsharded", "sharded", "replicated", "mixed", "inside_jit", "2x4_last_layer"):
        assert f"default/{how}" in variants


def test_vocab_parallel_losses_on_jax_make_mesh_meshes_match_one_device(single):
    entry = _compare(single, "jax_make_mesh_vocab_parallel")
    assert any(v.startswith("default/2x4/jit") for v in entry["info"]["variants"])


def test_every_public_op_under_grad_in_a_user_shard_map_with_check_vma_matches_reference(single):
    from tests.settings import public_ops_with_rules

    entry = single[1].get("ops_in_user_shard_map")
    assert entry is not None and entry["ok"], entry and entry.get("error")
    info = entry["info"]
    assert not info["errors"], "ops that failed inside shard_map:\n" + "\n".join(
        f"{k}: {v}" for k, v in info["errors"].items()
    )
    missing = sorted(set(public_ops_with_rules()) - set(info["ops"]))
    assert not missing, f"public ops not run inside a user shard_map (mesh_cases.py): {missing}"
    assert "jaxbp.Op" in info["ops"]
    _compare(single, "ops_in_user_shard_map")


def test_every_forward_mode_twin_under_jvp_in_a_user_shard_map_matches_reference(single):
    """``jax.jvp`` of each ``jaxbp.forward_mode`` twin (and of a user's ``jaxbp.Op`` with a
    jvp rule) inside the user's own ``shard_map`` with ``check_vma=True``."""
    from tests.settings import public_ops_with_rules

    entry = single[1].get("twins_jvp_in_user_shard_map")
    assert entry is not None and entry["ok"], entry and entry.get("error")
    info = entry["info"]
    assert not info["errors"], "twins that failed inside shard_map:\n" + "\n".join(
        f"{k}: {v}" for k, v in info["errors"].items()
    )
    missing = sorted(set(public_ops_with_rules()) - set(info["ops"]))
    assert not missing, f"public ops not run inside a user shard_map (mesh_cases.py): {missing}"
    assert "jaxbp.Op" in info["ops"]
    _compare(single, "twins_jvp_in_user_shard_map")


def _explicit_entry(single, name):
    entry = single[1].get(name)
    assert entry is not None and entry["ok"], entry and entry.get("error")
    info = entry["info"]
    if info.get("skipped"):
        pytest.skip("this JAX has no Explicit mesh axes")
    assert not info["errors"], "failed on Explicit axes under jit:\n" + "\n".join(
        f"{k}: {v}" for k, v in info["errors"].items()
    )
    assert not info["wrong_types"], info["wrong_types"]
    return info


def test_every_forward_mode_twin_under_jit_jvp_on_explicit_axes_matches_reference_and_types(
    single,
):  # fmt: skip
    """No shard_map: each twin's ``jax.jvp`` on inputs typed on Explicit axes; each tangent
    has its output's sharding."""
    _explicit_entry(single, "twins_jvp_on_explicit_axes_under_jit")
    _compare(single, "twins_jvp_on_explicit_axes_under_jit")


def test_every_public_op_under_jit_grad_on_explicit_axes_matches_reference_and_types(single):
    """No shard_map: inputs on jax.make_mesh's Explicit axes, with jax.set_mesh and with
    typed inputs alone; each cotangent has its primal's sharding."""
    from tests.settings import public_ops_with_rules

    info = _explicit_entry(single, "ops_on_explicit_axes_under_jit")
    missing = sorted(set(public_ops_with_rules()) - set(info["ops"]))
    assert not missing, f"public ops not run on Explicit axes (mesh_cases.py): {missing}"
    assert "jaxbp.Op" in info["ops"]
    assert any(k.startswith("set_mesh/") for k in info["examples"])
    assert any(k.startswith("typed_inputs/") for k in info["examples"])
    _compare(single, "ops_on_explicit_axes_under_jit")


def test_explicit_loops_and_references_on_explicit_axes_give_one_device_results(single):
    """Plain ``jax.jit`` of the transforms, the batch on Explicit axes (no shard_map): one
    device's results; DP-SGD of a tied, masked GPT and of a user's model with the same
    noise draws."""
    info = _explicit_entry(single, "models_on_explicit_axes_under_jit")
    for name in ("gpt/value_and_grad", "tied_gpt/clipped_grad/noise", "user/clipped_grad/noise"):
        assert any(f"{name}/jit" in k for k in info["variants"]), (name, info["variants"])
    _compare(single, "models_on_explicit_axes_under_jit")


def test_dense_with_columns_split_over_model_sums_dx_over_model_in_user_shard_map(single):
    _compare(single, "tensor_parallel_dense_in_user_shard_map")


def test_checked_reports_an_out_of_range_id_on_one_device_of_a_user_shard_map(single):
    entry = single[1]["checked_inside_user_shard_map"]
    assert entry["ok"], entry.get("error")
    info = entry["info"]
    assert info["bad"] is not None and "got 7" in info["bad"], info
    assert info["good"] is None
    assert info["plain_nan_rows"] == [13]  # the plain call: that row is NaN, no error


# -- any model on a mesh: data parallelism and DP-SGD (model_mesh_cases.py) ---------------


def test_a_users_model_data_parallel_equals_autodiff_on_one_device(single):
    """float64 within 1e-12 of ``jax.grad`` through the ops' plain twins on one device, on
    1×8 and 2×4 meshes, a data shard with nothing valid, ``class_weights`` copied to every
    device (``batch_axes``), and docs/models.md's residual MLP."""
    entry = _compare(single, "model_value_and_grad_on_meshes")
    assert {"8/tagger", "2x4/tagger", "8/residual_mlp"} <= set(entry["info"]["variants"])


def test_dp_sgd_on_1x8_and_2x4_meshes_equals_one_devices_clipped_grad(single):
    """float64 within 1e-12, the noise included (the same key: the same draws): the MLP
    (mask, class weights), a tied GPT with a masked data shard, a user's model; both
    methods, ``batch_size`` and ``return_loss`` among them; the norms split like the batch."""
    entry = _compare(single, "dp_sgd_on_meshes")
    variants = set(entry["info"]["variants"])
    for shape in ("8", "2x4"):
        for model in ("mlp", "gpt", "tagger"):
            for sigma in ("0.0", "1.3"):
                assert f"{shape}/{model}/sigma={sigma}" in variants
    assert set(entry["info"]["norm_specs"].values()) == {"P('data',)"}


def test_dp_sgd_on_a_mesh_sums_the_clipped_gradient_once_and_nothing_else(single):
    """From the compiled HLO: one all-reduce over ``data`` of every parameter (float64) and
    of the valid-example count (int64), and no other collective; the noise moves nothing."""
    info = single[1]["dp_sgd_collectives"]["info"]
    for shape in ("8", "2x4"):
        assert info[shape] == {"all-reduce data": 8 * info["parameters"] + 8}, info[shape]


def test_any_model_on_a_mesh_refuses_bad_input_by_name_before_compiling(single):
    msgs = single[1]["model_mesh_errors"]["info"]
    assert msgs["no_axis"].startswith("ValueError: axis: expected one of the mesh axes")
    for key, name, n, fix in (("batch", "x", 12, 16), ("batch_value_and_grad", "x", 12, 16),
                              ("gpt_batch", "ids", 6, 8), ("mlp_batch", "x", 4, 8)):  # fmt: skip
        assert msgs[key].startswith(
            f"ValueError: {name}: expected the batch size n ({n}) divisible by the 8 devices "
            "of mesh axis 'data'"
        ), msgs[key]
        assert f"pad the batch to n = {fix}" in msgs[key]
    assert "axis of 1, 2, 3, 4, 6 or 12 devices divides it" in msgs["batch"]
    assert msgs["leading_axis"].startswith(
        "ValueError: class_weights: expected the examples on its leading axis (n = 16, as x), "
        "got shape (4,)"
    ) and "NoAxes.batch_axes" in msgs["leading_axis"]  # fmt: skip
    assert msgs["model_axis"].startswith("ValueError: model_axis: tensor parallelism")
    assert msgs["not_a_model"].startswith("TypeError: model: parallel.clipped_grad needs")
    assert msgs["clip"].startswith("ValueError: l2_clip:")
    assert msgs["no_key"].startswith("ValueError: key:")
    assert msgs["compiled_after_errors"] == 0


def test_two_processes_give_one_process_gradients(multiprocess):
    summary = multiprocess[1]
    assert summary["_processes"] == 2 and summary["_devices"] == 8
    assert summary["_local_devices"] == 4
    _compare(multiprocess, "multiprocess_data_parallel")


def test_two_processes_2x4_mesh_with_vocab_parallel_last_layer(multiprocess):
    _compare(multiprocess, "multiprocess_2x4_last_layer")


def test_two_processes_gpt_tensor_parallel_within_data_parallel_across(multiprocess):
    """(2, 4): the batch split over the two processes (one of them with every token
    masked), heads, MLP and vocabulary over each process's 4 devices; float64."""
    _compare(multiprocess, "multiprocess_gpt_2x4")


def test_two_processes_dp_sgd_equals_one_devices_clipped_grad_noise_included(multiprocess):
    """``parallel.clipped_grad`` of the MLP on the 8 devices of both processes, the batch
    (masked) over all of them, the same key in both: one device's result, the same draws."""
    _compare(multiprocess, "multiprocess_dp_sgd")


# -- in this process: one CPU device, a 1-device mesh ------------------------------------


def test_vocab_parallel_ce_on_a_one_device_mesh_equals_softmax_cross_entropy():
    import jax
    import jax.numpy as jnp

    import jaxbp
    from jaxbp import parallel

    mesh = parallel.make_mesh((1,), ("model",), devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(5, 7)))
    labels = jnp.asarray([0, 6, 3, -1, 2], jnp.int32)
    opts = dict(ignore_index=-1, label_smoothing=0.2, z_loss=1e-2)

    def total(loss_fn):
        return lambda z: jnp.sum(loss_fn(z) * jnp.arange(1.0, 6.0, dtype=z.dtype))

    vp = total(lambda z: parallel.vocab_parallel_softmax_cross_entropy(z, labels, mesh, **opts))
    ref = total(lambda z: jaxbp.reference.softmax_cross_entropy(z, labels, **opts))
    assert_close(jax.value_and_grad(vp)(z), jax.value_and_grad(ref)(z), jnp.float64)


def test_parallel_value_and_grad_rejects_bad_models_and_axes():
    import jax

    import jaxbp
    from jaxbp import parallel

    mesh = parallel.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    with pytest.raises(TypeError, match="model: parallel.value_and_grad needs a model with"):
        parallel.value_and_grad("mlp", mesh)
    with pytest.raises(ValueError, match="model_axis: the vocab-parallel last layer needs"):
        parallel.value_and_grad(jaxbp.MLP((3, 2), loss="mse"), mesh, model_axis="model")
    with pytest.raises(ValueError, match="model_axis: expected a mesh axis other than"):
        parallel.value_and_grad(jaxbp.MLP((3, 2)), mesh, axis="data", model_axis="data")
    with pytest.raises(ValueError, match="shape: expected a mesh of 1 devices"):
        parallel.make_mesh((2,), ("data",), devices=jax.devices()[:1])


def test_shard_map_compat_uses_this_jax_replication_check_keyword():
    import inspect

    from jaxbp.parallel import _mesh

    fn, name = _mesh._shard_map_impl()
    assert name in inspect.signature(fn).parameters  # check_vma (new) or check_rep (old)


def test_parallel_make_mesh_is_jax_make_mesh_with_its_axis_types():
    import jax

    from jaxbp import parallel

    devices = jax.devices()[:1]
    ours = parallel.make_mesh((1,), ("data",), devices=devices)
    theirs = jax.make_mesh((1,), ("data",), devices=devices)
    assert ours.axis_names == theirs.axis_names
    assert getattr(ours, "axis_types", None) == getattr(theirs, "axis_types", None)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        auto = parallel.make_mesh((1,), ("data",), devices=devices, axis_types=(axis_type.Auto,))
        assert auto.axis_types == (axis_type.Auto,)


def test_a_batch_axes_that_is_not_0_or_none_per_argument_is_a_type_error_naming_it():
    import dataclasses
    from typing import ClassVar

    import jax
    import jax.numpy as jnp

    from jaxbp import parallel
    from tests.model_mesh_cases import TokenTagger

    @dataclasses.dataclass(frozen=True)
    class Bad(TokenTagger):
        batch_axes: ClassVar[tuple] = (0, 1)  # too short, and 1 is no choice

    mesh = parallel.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    params = Bad().init(jax.random.PRNGKey(0), jnp.float32)
    x, labels = np.zeros((2, 3, 3), np.float32), np.zeros((2, 3), np.int32)
    for f in (
        parallel.clipped_grad(Bad(), mesh, l2_clip=1.0),
        parallel.value_and_grad(Bad(), mesh),
    ):
        with pytest.raises(TypeError, match=r"batch_axes: expected a tuple of one entry per"):
            f(params, x, labels, None, None)
        assert f.jitted._cache_size() == 0
