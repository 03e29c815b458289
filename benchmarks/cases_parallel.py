"""docs/performance.md P9 and P15: data-, vocabulary- and tensor-parallel hand-written backward
on an 8-device mesh.

Index letters: n batch, v vocabulary (classes), i/o layer widths.

P9/vocab  ``jit(value_and_grad(mean ∘ jaxbp.parallel.vocab_parallel_softmax_cross_entropy))``
          with logits ``(n, v)`` split ``P(None, "model")`` over 8 devices, vs the same with
          ``jaxbp.softmax_cross_entropy`` on one device. Metrics: the gradient's relative
          error (target: float32 tolerance), the compiled per-device memory (arguments +
          outputs + temporaries, from ``memory_analysis()``) ÷ one device's (target ≤ 1/8 + 5%,
          i.e. ≤ 0.13125), and the time ratio.
P9/data   ``jaxbp.parallel.value_and_grad(model, mesh)`` (batch split over 8 devices,
          parameters replicated) vs ``jaxbp.value_and_grad(model)`` on one device, MLP
          ``(256, 512, 512, 10)``: gradient error (target: float32 tolerance), memory and time
          reported beside it (parameters are replicated, so memory is not 1/8 there).

P15/gpt   ``jaxbp.parallel.value_and_grad(gpt, mesh, axis="data", model_axis="model")`` on a
          ``(data, model)`` mesh of 8 devices, parameters laid out by
          ``parallel.gpt_param_specs``, vs ``jaxbp.value_and_grad(gpt)`` on one device:
          gradient error (float32 tolerance); per device, the split parameters' bytes ÷ their
          whole (≤ 1/P + 10%) and the compiled memory (arguments, outputs, temporaries) ÷ one
          device's; the bytes of every collective of the compiled HLO, per op and mesh axis
          (:func:`collective_bytes`), against Megatron-LM's count
          (:func:`megatron_bytes`): equal, and no other collective.

Eight devices are needed. When the harness process has at least 8 (a multi-GPU machine, or
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before ``python -m
benchmarks``), the case runs in-process on the first 8. Otherwise it runs itself in a
subprocess, ``python -m benchmarks.cases_parallel``, on 8 *simulated* CPU devices: the CPU
device count is fixed when JAX starts, so that is the only way. Simulated devices share the
host's cores, so their time ratio says nothing about a speed-up; memory and agreement are
exact either way.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import TOLERANCE, Case, Custom, Target, compile_side, interleaved, register

DEVICES = 8
ROOT = Path(__file__).resolve().parent.parent


def _rel_error(a, b) -> float:
    """Max over leaves of ``max|a − b| / max|b|``."""
    errs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x = np.asarray(jnp.asarray(x, jnp.float32) if x.dtype == jnp.bfloat16 else x, np.float64)
        y = np.asarray(jnp.asarray(y, jnp.float32) if y.dtype == jnp.bfloat16 else y, np.float64)
        errs.append(float(np.max(np.abs(x - y))) / max(float(np.max(np.abs(y))), 1e-30))
    return max(errs)


def _total(mem: dict | None) -> int | None:
    if not mem:
        return None
    return sum(mem.get(k, 0) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                       "temp_size_in_bytes"))  # fmt: skip


def _time_both(a, a_args, b, b_args, reps: int, quick: bool) -> dict:
    samples = interleaved(
        {"A": lambda: a(*a_args), "B": lambda: b(*b_args)},
        reps,
        warmup=2 if quick else 5,
        min_sample_s=0.002 if quick else 0.005,
    )
    ratios = [x / y for x, y in zip(samples["A"], samples["B"], strict=True)]
    return {
        "time_sharded_s": float(np.median(samples["A"])),
        "time_one_device_s": float(np.median(samples["B"])),
        "time_ratio": float(np.median(ratios)),
        "time_ratio_p10": float(np.percentile(ratios, 10)),
        "time_ratio_p90": float(np.percentile(ratios, 90)),
    }


def _memory_metrics(ma, mb) -> dict:
    """Per-device compiled bytes of A (sharded) and B (one device), and their ratios."""
    out: dict = {}
    if not ma or not mb:
        return out
    for side, mem in (("sharded", ma), ("one_device", mb)):
        out[f"{side}_argument_bytes"] = mem.get("argument_size_in_bytes")
        out[f"{side}_output_bytes"] = mem.get("output_size_in_bytes")
        out[f"{side}_temp_bytes"] = mem.get("temp_size_in_bytes")
    ta, tb = _total(ma), _total(mb)
    if tb:
        out["per_device_memory_ratio"] = ta / tb  # arguments + outputs + temporaries
    io_a = ma.get("argument_size_in_bytes", 0) + ma.get("output_size_in_bytes", 0)
    io_b = mb.get("argument_size_in_bytes", 0) + mb.get("output_size_in_bytes", 0)
    if io_b:
        out["per_device_io_ratio"] = io_a / io_b  # arguments + outputs only
    return out


def measure_vocab(n: int, v: int, dtype: str, reps: int, quick: bool) -> dict:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbp
    from jaxbp import parallel

    devices = jax.devices()[:DEVICES]
    mesh = parallel.make_mesh((DEVICES,), ("model",), devices=devices)
    rng = np.random.default_rng(0)
    z = jnp.asarray(3.0 * rng.normal(size=(n, v)).astype(np.float32)).astype(dtype)
    labels = jnp.asarray(rng.integers(0, v, n).astype(np.int32))
    zs = jax.device_put(z, NamedSharding(mesh, P(None, "model")))
    ls = jax.device_put(labels, NamedSharding(mesh, P()))
    z1, l1 = jax.device_put(z, devices[0]), jax.device_put(labels, devices[0])

    def sharded(z, labels):
        return jnp.mean(parallel.vocab_parallel_softmax_cross_entropy(z, labels, mesh))

    def one(z, labels):
        return jnp.mean(jaxbp.softmax_cross_entropy(z, labels))

    a, b = jax.jit(jax.value_and_grad(sharded)), jax.jit(jax.value_and_grad(one))
    ca, cb = compile_side(a, (zs, ls)), compile_side(b, (z1, l1))
    fa, fb = ca["compiled"], cb["compiled"]
    out_a, out_b = jax.block_until_ready(fa(zs, ls)), jax.block_until_ready(fb(z1, l1))
    metrics = {
        "grad_rel_error": _rel_error(out_a, out_b),
        "grad_shard_shape": list(out_a[1].addressable_shards[0].data.shape),
        **_memory_metrics(ca["memory"], cb["memory"]),
        **_time_both(fa, (zs, ls), fb, (z1, l1), reps, quick),
        "compile_s_a": ca["compile_s"],
        "compile_s_b": cb["compile_s"],
    }
    return metrics


def measure_data(n: int, width: int, dtype: str, reps: int, quick: bool) -> dict:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbp
    from jaxbp import parallel

    devices = jax.devices()[:DEVICES]
    mesh = parallel.make_mesh((DEVICES,), ("data",), devices=devices)
    model = jaxbp.MLP((256, width, width, 10))
    params = model.init(jax.random.PRNGKey(0), jnp.dtype(dtype))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(n, 256)).astype(np.float32)).astype(dtype)
    labels = jnp.asarray(rng.integers(0, 10, n).astype(np.int32))
    row = NamedSharding(mesh, P("data"))
    args_a = (jax.device_put(params, NamedSharding(mesh, P())), jax.device_put(x, row),
              jax.device_put(labels, row), None, None)  # fmt: skip
    args_b = (jax.device_put(params, devices[0]), jax.device_put(x, devices[0]),
              jax.device_put(labels, devices[0]), None, None)  # fmt: skip
    a = parallel.value_and_grad(model, mesh).jitted
    b = jaxbp.value_and_grad(model).jitted
    ca, cb = compile_side(a, args_a), compile_side(b, args_b)
    fa, fb = ca["compiled"], cb["compiled"]
    out_a, out_b = jax.block_until_ready(fa(*args_a)), jax.block_until_ready(fb(*args_b))
    return {
        "grad_rel_error": _rel_error(out_a, out_b),
        **_memory_metrics(ca["memory"], cb["memory"]),
        **_time_both(fa, args_a, fb, args_b, reps, quick),
        "compile_s_a": ca["compile_s"],
        "compile_s_b": cb["compile_s"],
    }


# ------------------------------------------------------------------- P15: the GPT on a mesh

_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\([^()]*\)|\w+\[[^\]]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
    r"(?P<start>-start)?\("
)
_ARRAY = re.compile(r"(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}  # fmt: skip


def _shape_bytes(shape: str, first_only: bool) -> int:
    total = 0
    for m in _ARRAY.finditer(shape):
        dims = [int(x) for x in m["dims"].split(",") if x]
        total += int(np.prod(dims, dtype=np.int64)) * _BYTES.get(m["dtype"], 4)
        if first_only:
            break
    return total


def _groups(line: str) -> list[list[int]] | None:
    """The device groups of a collective: ``replica_groups={{0,1},{2,3}}``, the iota form
    ``replica_groups=[2,2]<=[4]`` (with ``T(perm)``), or the pairs of a permute."""
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
    if m:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", m[1] + "}")]
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m[1])]
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        shape = [int(x) for x in m[1].split(",")]
        ids = np.arange(int(np.prod([int(x) for x in m[2].split(",")]))).reshape(
            [int(x) for x in m[2].split(",")]
        )
        if m[3]:
            ids = ids.transpose([int(x) for x in m[3].split(",")])
        return ids.reshape(shape).tolist()
    return None


def _axis_of(groups, mesh_shape: dict[str, int]) -> str:
    """The mesh axis whose device groups contain every group (or pair) of a collective."""
    if not groups:
        return "?"
    ids = np.arange(int(np.prod(list(mesh_shape.values())))).reshape(list(mesh_shape.values()))
    for k, name in enumerate(mesh_shape):
        rows = np.moveaxis(ids, k, -1).reshape(-1, mesh_shape[name])
        member = {int(d): r for r, row in enumerate(rows) for d in row}
        if all(len({member[d] for d in g}) == 1 for g in groups):
            return name
    return "?"


def collective_bytes(hlo: str, mesh_shape: dict[str, int]) -> dict[str, int]:
    """Bytes each device sends into collectives, per ``"<op> <axis>"``, from compiled HLO.

    An all-reduce counts its payload (what Megatron-LM's count counts: an all-reduce of
    ``n·t·d``); a collective-permute its payload times the share of devices that send to
    another device (a device "sending" to itself moves nothing). Asynchronous ``-start``
    forms count their operand.
    """
    out: dict[str, int] = {}
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m is None:
            continue
        op = m["op"]
        size = _shape_bytes(m["shape"], first_only=bool(m["start"]) and op != "all-reduce")
        groups = _groups(line)
        if groups and all(len(set(g)) == 1 for g in groups):
            continue  # every device alone in its group: nothing moves
        if op == "collective-permute" and groups:
            size = size * sum(a != b for a, b in groups) / len(groups)
        key = f"{op} {_axis_of(groups, mesh_shape)}"
        out[key] = out.get(key, 0) + int(round(size))
    return out


def megatron_bytes(model, mesh_shape: dict[str, int], n: int, t: int, dtype) -> dict[str, int]:
    """The bytes :func:`collective_bytes` should read for one step of
    :func:`jaxbp.parallel.value_and_grad` of ``model`` (``n`` sequences of ``t``), per device.

    Model axis (P devices), all-reduces: per block two of ``n_D·t·d`` forward and two
    backward (Megatron-LM's count), the embedding's forward and the head's backward
    (``n_D·t·d`` each), the head's row statistics (``n_D·t`` for the max, ``3·n_D·t`` for
    the sums); nothing else (the qkv columns are stored per head). Data axis
    (D devices): the gradient all-reduce, every parameter this device holds, and two
    scalars (the valid-token count, the loss).
    """
    from jaxbp import parallel

    D, Pm = mesh_shape["data"], mesh_shape["model"]
    s = jnp.dtype(dtype).itemsize
    acc = 4 if s < 4 else s  # float32 accumulation for half precision
    nd, d, L = n // D, model.d, model.layers
    out = {}
    if Pm > 1:
        ntd = nd * t * d
        out["all-reduce model"] = (2 * L + 1) * ntd * s + ntd * acc + (2 * L) * ntd * s
        out["all-reduce model"] += 4 * nd * t * acc
    if D > 1:
        shapes = jax.eval_shape(
            functools.partial(model.init, dtype=jnp.dtype(dtype)), jax.random.PRNGKey(0)
        )
        specs = parallel.gpt_param_specs(model, "model" if Pm > 1 else None)
        per_device = 0
        for a, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs,
                           is_leaf=lambda x: isinstance(x, parallel.P)), strict=True):  # fmt: skip
            split = [Pm if e == "model" else 1 for e in tuple(spec)]
            split += [1] * (len(a.shape) - len(split))
            per_device += int(np.prod([k // p for k, p in zip(a.shape, split, strict=True)]))
        count = jnp.dtype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32).itemsize
        out["all-reduce data"] = per_device * acc + acc + count
    return out


def measure_gpt(n: int, t: int, d: int, heads: int, layers: int, vocab: int, data: int,
                dtype: str, reps: int, quick: bool) -> dict:  # fmt: skip
    """P15: one step of the GPT on a ``(data, model)`` mesh of 8 devices against one device:
    gradients, compiled per-device memory, and the bytes of every collective in the HLO."""
    from jax.sharding import NamedSharding

    import jaxbp
    from jaxbp import parallel

    del reps, quick  # simulated devices share the host's cores: no timing here
    devices = jax.devices()[:DEVICES]
    shape = {"data": data, "model": DEVICES // data}
    mesh = jax.make_mesh(tuple(shape.values()), tuple(shape), devices=devices)
    model = jaxbp.GPT(vocab=vocab, d=d, heads=heads, layers=layers, context=t)
    params = model.init(jax.random.PRNGKey(0), jnp.dtype(dtype))
    rng = np.random.default_rng(2)
    ids = rng.integers(0, vocab, (n, t)).astype(np.int32)
    targets = rng.integers(0, vocab, (n, t)).astype(np.int32)
    specs = parallel.gpt_param_specs(model, "model")
    placed = parallel.shard(params, mesh, specs)
    rows = NamedSharding(mesh, parallel.P("data"))
    args_a = (placed, jax.device_put(ids, rows), jax.device_put(targets, rows), None)
    args_b = (jax.device_put(params, devices[0]), jax.device_put(ids, devices[0]),
              jax.device_put(targets, devices[0]), None)  # fmt: skip
    a = parallel.value_and_grad(model, mesh, axis="data", model_axis="model").jitted
    b = jaxbp.value_and_grad(model).jitted
    ca, cb = compile_side(a, args_a), compile_side(b, args_b)
    out_a = jax.block_until_ready(ca["compiled"](*args_a))
    out_b = jax.block_until_ready(cb["compiled"](*args_b))
    # The split parts: every parameter of the layout that is not replicated, per device.
    leaves = jax.tree.leaves(placed)
    split = [x for x in leaves if any(e is not None for e in x.sharding.spec)]
    split_full = sum(x.nbytes for x in split)
    split_local = sum(x.addressable_shards[0].data.nbytes for x in split)
    measured = collective_bytes(ca["compiled"].as_text(), shape)
    expected = megatron_bytes(model, shape, n, t, dtype)
    metrics: dict = {
        "grad_rel_error": _rel_error(out_a, out_b),
        **_memory_metrics(ca["memory"], cb["memory"]),
        "split_param_ratio": split_local / split_full,  # parameters and (alike) gradients
        "split_param_target": 1.1 / shape["model"],
        "collective_bytes": measured,
        "formula_bytes": expected,
        "compile_s_a": ca["compile_s"],
        "compile_s_b": cb["compile_s"],
    }
    total_m, total_f = sum(measured.values()), sum(expected.values())
    metrics["collective_bytes_ratio"] = total_m / total_f if total_f else float(total_m == 0)
    metrics["megatron_allreduce_ratio"] = measured.get("all-reduce model", 0) / max(
        expected.get("all-reduce model", 0), 1
    )
    metrics["unexpected_collectives"] = sorted(set(measured) - set(expected))
    metrics["bytes_equal_formula"] = float(measured == expected)  # per collective and axis
    metrics["split_within_target"] = float(
        metrics["split_param_ratio"] <= metrics["split_param_target"]
    )
    return metrics


MEASURE = {"vocab": measure_vocab, "data": measure_data, "gpt": measure_gpt}


def _run(kind: str, ctx, **sizes) -> Custom:
    """Measure in-process when 8 devices are here, else in a subprocess on 8 CPU devices."""
    dtype = ctx.dtype_name
    if jax.device_count() >= DEVICES:
        metrics = MEASURE[kind](**sizes, dtype=dtype, reps=ctx.reps, quick=ctx.quick)
        where = f"in-process on {DEVICES} {jax.default_backend()} devices"
    else:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
        ).strip()
        env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, "-m", "benchmarks.cases_parallel", kind, "--dtype", dtype,
               "--reps", str(ctx.reps), *(["--quick"] if ctx.quick else []),
               "--sizes", json.dumps(sizes)]  # fmt: skip
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads(proc.stdout.strip().splitlines()[-1])
        where = f"subprocess on {DEVICES} simulated CPU devices (times are not a speed-up)"
    tol = TOLERANCE.get(dtype, 1e-4)
    if "formula_bytes" in metrics:  # P15: one line per collective in the report's notes
        got, want = metrics["collective_bytes"], metrics["formula_bytes"]
        where += "; collective bytes per device (measured / Megatron-LM's count): " + ", ".join(
            f"{k} {got.get(k, 0):,} / {want.get(k, 0):,}" for k in sorted(set(got) | set(want))
        )
        metrics = {k: v for k, v in metrics.items() if not isinstance(v, dict | list)}
    metrics["grad_tolerance"] = tol
    metrics["grad_within_tolerance"] = 1.0 if metrics["grad_rel_error"] <= tol else 0.0
    return Custom(metrics=metrics, shapes=dict(sizes, devices=DEVICES), notes=where)


_GRAD = Target("grad_within_tolerance", ">=", 1.0, note="gradients equal to one device's")
_MEM = Target("per_device_memory_ratio", "<=", 1 / 8 * 1.05, note="1/8 + 5%")

for n, v in [(1024, 32768)]:
    register(
        Case(
            id=f"P9/vocab-n{n}-v{v}",
            group="P9",
            title="vocab-parallel softmax CE on 8 devices vs one device",
            build=functools.partial(_run, "vocab", n=n, v=v),
            quick_build=functools.partial(_run, "vocab", n=128, v=8192),
            quick_id="P9/vocab-n128-v8192",
            targets=(_GRAD, _MEM),
        )
    )
for n, width in [(1024, 512)]:
    register(
        Case(
            id=f"P9/data-n{n}-w{width}",
            group="P9",
            title="data-parallel manual MLP step on 8 devices vs one device",
            build=functools.partial(_run, "data", n=n, width=width),
            quick_build=functools.partial(_run, "data", n=256, width=128),
            quick_id="P9/data-n256-w128",
            targets=(_GRAD,),
        )
    )


_BYTES_OK = Target(
    "bytes_equal_formula",
    ">=",
    1.0,
    note="collective bytes from the HLO = Megatron-LM's count",
)
_SPLIT = Target("split_within_target", ">=", 1.0, note="split parts ≤ 1/P + 10% per device")
for n, t, d, heads, layers, vocab, data in [(8, 128, 256, 8, 2, 4096, 2)]:
    register(
        Case(
            id=f"P15/gpt-n{n}-t{t}-d{d}-L{layers}-v{vocab}-{data}x{DEVICES // data}",
            group="P15",
            title="GPT: data × tensor × vocabulary parallel on 8 devices vs one device",
            build=functools.partial(
                _run, "gpt", n=n, t=t, d=d, heads=heads, layers=layers, vocab=vocab, data=data
            ),  # fmt: skip
            quick_build=functools.partial(
                _run, "gpt", n=4, t=16, d=32, heads=8, layers=1, vocab=64, data=2
            ),  # fmt: skip
            quick_id=f"P15/gpt-n4-t16-d32-L1-v64-{data}x{DEVICES // data}",
            targets=(_GRAD, _BYTES_OK, _SPLIT),
        )
    )


def main(argv=None) -> int:
    """Subprocess entry: measure one kind on this process's devices, print JSON metrics."""
    p = argparse.ArgumentParser(description="P9 measurement on this process's devices")
    p.add_argument("kind", choices=sorted(MEASURE))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", type=json.loads, required=True, help='JSON: {"n": 1024, ...}')
    args = p.parse_args(argv)
    if jax.device_count() < DEVICES:
        p.error(f"needs {DEVICES} devices, found {jax.device_count()} (set XLA_FLAGS)")
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    metrics = MEASURE[args.kind](**args.sizes, dtype=args.dtype, reps=args.reps, quick=args.quick)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
