"""docs/performance.md P9: data- and vocabulary-parallel hand-written backward on an 8-device mesh.

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


MEASURE = {"vocab": measure_vocab, "data": measure_data}


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
               *(f"--{k}={v}" for k, v in sizes.items())]  # fmt: skip
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads(proc.stdout.strip().splitlines()[-1])
        where = f"subprocess on {DEVICES} simulated CPU devices (times are not a speed-up)"
    tol = TOLERANCE.get(dtype, 1e-4)
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


def main(argv=None) -> int:
    """Subprocess entry: measure one kind on this process's devices, print JSON metrics."""
    p = argparse.ArgumentParser(description="P9 measurement on this process's devices")
    p.add_argument("kind", choices=sorted(MEASURE))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--v", type=int)
    p.add_argument("--width", type=int)
    args = p.parse_args(argv)
    if jax.device_count() < DEVICES:
        p.error(f"needs {DEVICES} devices, found {jax.device_count()} (set XLA_FLAGS)")
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    sizes = {"n": args.n, **({"v": args.v} if args.kind == "vocab" else {"width": args.width})}
    metrics = MEASURE[args.kind](**sizes, dtype=args.dtype, reps=args.reps, quick=args.quick)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
