"""``jaxbp.parallel.value_and_grad`` of a :class:`jaxbp.GPT`: data, tensor and vocabulary
parallelism on 8 simulated CPU devices (tests/gpt_mesh_cases.py, run by
tests/parallel_worker.py in its own process beside tests/test_parallel.py's), the layout of
the parameters, and the command line's ``--mesh``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from tests.test_parallel import ROOT, _compare, _env, _start, _wait

GPT_TIMEOUT_S = 420  # about 2 minutes alone on 2 cores, with no compilation cache


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_gpt")
    ok, message = _wait([_start("gpt", str(out))], GPT_TIMEOUT_S)
    assert ok, f"gpt run: {message}"
    return out, json.loads((out / "summary.json").read_text())


def test_gpt_on_1x8_2x4_4x2_8x1_meshes_equals_autodiff_on_one_device(gpt):
    """float64 within 1e-12 of jax.value_and_grad of the plain twin, for tied and untied
    embeddings, both attention strategies, no mask, random masks and a data shard with
    every token masked; and model_axis=None (data parallelism alone)."""
    entry = _compare(gpt, "gpt_tensor_parallel_meshes")
    variants = entry["info"]["variants"]
    for shape in ("1x8", "2x4", "4x2", "8x1"):
        assert any(v.startswith(shape + "/") for v in variants), (shape, variants)
    for option in ("tied=True", "tied=False", "/store", "/recompute", "where=None",
                   "where=uneven", "where=random"):  # fmt: skip
        assert any(option in v for v in variants), (option, variants)
    assert "8/data-only" in variants


def test_gpt_gradients_are_split_over_the_model_axis_like_the_parameters(gpt):
    shards = gpt[1]["gpt_tensor_parallel_meshes"]["info"]["shards"]
    for key, info in shards.items():
        p = int(key.split("/")[0].split("x")[1])
        assert info["tok_shard"] == [16 // p, 16], key  # vocabulary rows V/P
        assert info["qkv_shard"] == [16, 48 // p], key  # 3d/P columns
        assert info["out_spec"] == "P('model', None)", key  # the row-split projection


def test_gpt_placed_parameters_under_jit_with_optax_stay_where_they_are(gpt):
    entry = _compare(gpt, "gpt_placed_jitted_and_optax")
    assert entry["info"]["misplaced"] == {}
    assert {"Explicit", "Explicit/grads"} <= set(entry["info"]["variants"])


def test_gpt_collective_bytes_in_the_hlo_are_megatrons_count_and_nothing_more(gpt):
    """Counted here from the model (n 8, t 6, d 16, 2 blocks, float32), independently of
    benchmarks/cases_parallel.megatron_bytes, which the HLO must also match."""
    info = gpt[1]["gpt_collectives"]["info"]
    n, t, d, layers, f32 = 8, 6, 16, 2, 4
    for shape, data in (("2x4", 2), ("4x2", 4)):
        got, formula = info[shape]["measured"], info[shape]["formula"]
        assert got == formula, (shape, got, formula)
        ntd = n // data * t * d * f32
        # per block 2 forward + 2 backward, the embedding's forward, the head's backward;
        # the head's row statistics: max (n·t) and three sums (3·n·t)
        assert got["all-reduce model"] == (4 * layers + 2) * ntd + 4 * (n // data) * t * f32
        # the qkv columns are per head: no collective-permute, no other collective at all
        assert set(got) == {"all-reduce model", "all-reduce data"}, got


def test_gpt_bad_meshes_and_shapes_raise_naming_sizes_before_compiling(gpt):
    msgs = gpt[1]["gpt_errors"]["info"]
    assert msgs["no_model_axis"].startswith("ValueError: model_axis: expected one of the mesh")
    assert msgs["no_data_axis"].startswith("ValueError: axis: expected one of the mesh axes")
    assert "number of heads (6) divisible by the 4 devices" in msgs["heads"]
    assert "axis of 1, 2, 3 or 6 devices" in msgs["heads"] and "heads = 4 or 12" in msgs["heads"]
    assert "vocabulary size (65) divisible by the 4 devices" in msgs["vocab"]
    assert "vocab = 68" in msgs["vocab"]
    assert msgs["batch"].startswith("ValueError: ids: expected the batch size n (3)")
    assert "pad the batch to n = 4" in msgs["batch"]
    assert msgs["compiled_after_errors"] == 0


# -- in this process: the layout, one device --------------------------------------------


def test_gpt_param_specs_split_what_megatron_splits():
    import jax

    import jaxbp
    from jaxbp import parallel

    P = parallel.P
    for tied in (False, True):
        gpt = jaxbp.GPT(vocab=8, d=8, heads=2, layers=2, context=4, tied=tied)
        specs = parallel.gpt_param_specs(gpt, "m")
        params = gpt.init(jax.random.PRNGKey(0))
        assert jax.tree.structure(params) == jax.tree.structure(
            specs, is_leaf=lambda s: isinstance(s, P)
        )
        assert specs["tok"] == P("m", None) and specs["pos"] == P()
        blk = specs["blocks"][1]
        assert blk["attn"]["qkv"] == {"w": P(None, "m"), "b": P("m")}  # columns
        assert blk["attn"]["proj"] == {"w": P("m", None), "b": P()}  # rows
        assert blk["mlp"]["fc"] == {"w": P(None, "m"), "b": P("m")}
        assert blk["mlp"]["out"] == {"w": P("m", None), "b": P()}
        assert blk["ln1"] == {"gamma": P(), "beta": P()}
        assert ("head" in specs) == (not tied)
    everything = jax.tree.leaves(
        parallel.gpt_param_specs(gpt, None), is_leaf=lambda s: isinstance(s, P)
    )
    assert all(all(e is None for e in s) for s in everything)


def test_gpt_on_a_one_device_mesh_equals_one_device_float64():
    import jax
    import jax.numpy as jnp

    import jaxbp
    from jaxbp import parallel
    from tests.helpers import assert_close

    gpt = jaxbp.GPT(vocab=11, d=8, heads=2, layers=1, context=5, tied=True)
    params = gpt.init(jax.random.PRNGKey(0), jnp.float64)
    rng = np.random.default_rng(0)
    ids, targets = (rng.integers(0, 11, (3, 5)).astype(np.int32) for _ in range(2))
    where = rng.uniform(size=(3, 5)) < 0.5
    mesh = parallel.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    got = parallel.value_and_grad(gpt, mesh, model_axis="model")(params, ids, targets, where=where)
    want = jaxbp.reference.value_and_grad(gpt)(params, ids, targets, where=where)
    assert_close(got, want, jnp.float64)
    none = np.zeros((3, 5), bool)  # every token masked: loss 0, gradients 0
    loss, grads = parallel.value_and_grad(gpt, mesh)(params, ids, targets, where=none)
    assert float(loss) == 0.0 and all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


def test_parallel_value_and_grad_rejects_an_out_of_range_id_like_one_device():
    import jax

    import jaxbp
    from jaxbp import parallel

    gpt = jaxbp.GPT(vocab=5, d=4, heads=1, layers=1, context=3)
    mesh = parallel.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    f = parallel.value_and_grad(gpt, mesh, model_axis="model")
    ids = np.array([[0, 1, 5]], np.int32)
    with pytest.raises(ValueError, match="ids"):
        f(gpt.init(jax.random.PRNGKey(0)), ids, np.zeros((1, 3), np.int32))
    loss, _ = f.jitted(gpt.init(jax.random.PRNGKey(0)), ids, np.zeros((1, 3), np.int32), None)
    assert math.isnan(float(loss))  # under jit: NaN, never a silently wrong number


@pytest.mark.parametrize("model_axis", [None, "model"])
def test_a_gpt_with_dropout_on_a_mesh_is_refused_naming_the_rate(model_axis):
    import jax

    import jaxbp
    from jaxbp import parallel

    gpt = jaxbp.GPT(vocab=5, d=4, heads=1, layers=1, context=3, dropout=0.1)
    mesh = parallel.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"GPT\(dropout=0.1\) on a mesh"):
        parallel.value_and_grad(gpt, mesh, model_axis=model_axis)
    with pytest.raises(ValueError, match=r"GPT\(dropout=0.1\) on a mesh"):
        parallel.clipped_grad(gpt, mesh, l2_clip=1.0)


# -- the command line: jaxbp train --model gpt --mesh data=2,model=4 ---------------------

TINY = ["--d", "16", "--heads", "4", "--layers", "1", "--context", "8", "--batch-size", "4",
        "--eval-batches", "1", "--sample-chars", "12"]  # fmt: skip


def test_train_gpt_on_a_simulated_2x4_mesh_has_one_devices_loss_curve(tmp_path):
    """A fresh process with one CPU device asks for 8 simulated ones itself; ``--check``
    trains again on one device and compares the curves (float32 tolerance)."""
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxbp", "train", "--model", "gpt", *TINY, "--steps", "4",
         "--log-every", "2", "--mesh", "data=2,model=4", "--check", "--json", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["config"]["mesh"] == {"data": 2, "model": 4}
    assert data["config"]["vocab"] == 68  # 65 characters padded to a multiple of 4
    assert data["check"]["passed"] and data["check"]["steps"] == 4
    assert data["check"]["max_rel_difference"] <= 1e-4
    assert len(data["sample"]) == 12  # characters only: the padding ids are never drawn
    assert "data=2,model=4 mesh of cpu devices (vocabulary 68)" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--mesh", "data=2,model=4"], "needs 8 devices, this process has 1"),
        (["--mesh", "data=3"], "batch_size: expected a multiple of the 3 devices"),
        (["--mesh", "model=8"], "heads: expected a multiple of the 8 devices"),
        (["--mesh", "data=2,data=2"], "expected axis sizes like data=2,model=4"),
        (["--mesh", "data=0"], "expected"),
        (["--mesh", "rows=2"], "expected axis sizes like data=2,model=4"),
    ],
)
def test_train_gpt_mesh_usage_errors_before_any_work(argv, needle, capsys, monkeypatch):
    import jax

    from jaxbp.cli import main

    jax.devices()  # this process's backend has started: it keeps its one CPU device

    def forbidden(*args, **kwargs):
        raise AssertionError("the work started before the arguments were checked")

    monkeypatch.setattr("jaxbp.cli.train.train_gpt", forbidden)
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "gpt", *argv])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_mesh_is_only_for_the_gpt(capsys):
    from jaxbp.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--mesh", "data=2"])
    assert e.value.code == 2 and "--mesh: only for --model gpt" in capsys.readouterr().err
