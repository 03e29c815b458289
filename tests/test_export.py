"""Every public op and transform lowers for CUDA, checked on a CPU-only machine.

``jax.export.export(jax.jit(f), platforms=("cuda",))`` traces and lowers ``f`` to StableHLO
for the CUDA platform without a GPU and without compiling, so a change that cannot lower for
GPUs (a CPU-only primitive, a host callback, a platform-specific branch) fails here in CI.
Shapes are tiny and arguments are ``jax.ShapeDtypeStruct``s: nothing runs.
"""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import pytest

import jaxbp

export = pytest.importorskip("jax.export")

F32, I32 = jnp.float32, jnp.int32


def S(*shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


# name -> list of (positional args, keyword options); every public custom_vjp op needs one.
OP_CASES = {
    "dense": [((S(2, 3), S(3, 4), S(4)), {})],
    "relu": [((S(2, 3),), {})],
    "leaky_relu": [((S(2, 3),), {"negative_slope": 0.1})],
    "sigmoid": [((S(2, 3),), {})],
    "tanh": [((S(2, 3),), {})],
    "gelu": [((S(2, 3),), {}), ((S(2, 3),), {"approximate": False})],
    "softplus": [((S(2, 3),), {})],
    "silu": [((S(2, 3),), {})],
    "swish": [((S(2, 3),), {})],
    "softmax": [((S(2, 3),), {}), ((S(2, 3),), {"where": S(2, 3, dtype=jnp.bool_)})],
    "log_softmax": [((S(2, 3),), {}), ((S(2, 3),), {"where": S(2, 3, dtype=jnp.bool_)})],
    "mse": [((S(2, 3), S(2, 3)), {})],
    "sigmoid_binary_cross_entropy": [((S(2, 3), S(2, 3)), {})],
    "softmax_cross_entropy": [
        ((S(2, 3), S(2, dtype=I32)), {}),
        ((S(2, 3), S(2, 3)), {"label_smoothing": 0.1}),
    ],
    "linear_softmax_cross_entropy": [((S(2, 3), S(3, 5), S(2, dtype=I32), S(5)), {})],
    "embedding": [((S(2, 3, dtype=I32), S(7, 4)), {})],
    "position_embedding": [((S(2, 3, 4), S(5, 4)), {})],
    "layer_norm": [((S(2, 3, 4), S(4), S(4)), {})],
    "rms_norm": [((S(2, 3, 4), S(4)), {})],
    "dropout": [((S(2, 3), S(2, dtype=jnp.uint32)), {"rate": 0.25})],
    "attention": [
        ((S(2, 2, 4, 3), S(2, 2, 4, 3), S(2, 2, 4, 3)), {"strategy": "store"}),
        ((S(2, 2, 4, 3), S(2, 2, 4, 3), S(2, 2, 4, 3)), {"strategy": "recompute"}),
        ((S(2, 2, 4, 3), S(2, 2, 4, 3), S(2, 2, 4, 3)), {"causal": False}),
    ],
}


def _public_ops() -> list[str]:
    """Public names with hand-written rules beside them: ``op``, ``op_fwd``, ``op_bwd``."""
    names = set(jaxbp.__all__)
    return sorted(n for n in names if f"{n}_fwd" in names and f"{n}_bwd" in names)


def _export_cuda(f, *args):
    exported = export.export(jax.jit(f), platforms=("cuda",))(*args)
    assert exported.platforms == ("cuda",)
    assert "func.func public @main" in exported.mlir_module()
    return exported


def test_every_public_op_has_an_export_case():
    ops = _public_ops()
    assert len(ops) >= 10
    missing = [n for n in ops if n not in OP_CASES]
    assert not missing, (
        f"public op(s) {missing} have no entry in OP_CASES of tests/test_export.py: add "
        "small example arguments so that they are checked to lower for CUDA"
    )


def _accepts(op, options) -> bool:
    params = inspect.signature(op).parameters
    return all(k in params for k in options)


def _export_cuda_kw(f, args, arrays):
    exported = export.export(jax.jit(f), platforms=("cuda",))(*args, **arrays)
    assert exported.platforms == ("cuda",)
    assert "func.func public @main" in exported.mlir_module()


@pytest.mark.parametrize("name", [n for n in OP_CASES if hasattr(jaxbp, n)])
def test_op_forward_and_grad_lower_for_cuda(name):
    op = getattr(jaxbp, name)
    cases = [(a, o) for a, o in OP_CASES[name] if _accepts(op, o)]
    assert cases
    for args, options in cases:
        # Array options (masks) are traced arguments; the rest are static.
        arrays = {k: v for k, v in options.items() if isinstance(v, jax.ShapeDtypeStruct)}
        static = {k: v for k, v in options.items() if k not in arrays}

        def forward(*a, _s=static, **kw):
            return op(*a, **kw, **_s)

        def scalar(*a, _s=static, **kw):
            return jnp.sum(op(*a, **kw, **_s))

        floats = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
        _export_cuda_kw(forward, args, arrays)
        _export_cuda_kw(jax.grad(scalar, argnums=floats), args, arrays)


MLP = jaxbp.MLP((3, 5, 4), activation="gelu")


def _mlp_params():
    return jax.eval_shape(lambda: MLP.init(jax.random.PRNGKey(0), F32))


def test_mlp_value_and_grad_lowers_for_cuda():
    vg = jaxbp.value_and_grad(MLP)
    _export_cuda(vg, _mlp_params(), S(2, 3), S(2, dtype=I32))


def test_per_example_transforms_lower_for_cuda():
    params, x, y = _mlp_params(), S(2, 3), S(2, dtype=I32)
    _export_cuda(jaxbp.per_example_grads(MLP), params, x, y)
    _export_cuda(jaxbp.per_example_grad_norms(MLP), params, x, y)
    _export_cuda(jaxbp.clipped_grad(MLP, l2_clip=1.0), params, x, y)
    noisy = jaxbp.clipped_grad(MLP, l2_clip=1.0, noise_multiplier=0.5)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    _export_cuda(lambda p, x, y, k: noisy(p, x, y, key=k), params, x, y, key)


GPT = jaxbp.GPT(vocab=7, d=8, heads=2, layers=1, context=4)


@pytest.mark.parametrize("model", [GPT, dataclasses.replace(GPT, tied=True, attention="recompute")],
                         ids=["default", "tied-recompute"])  # fmt: skip
def test_gpt_value_and_grad_lowers_for_cuda(model):
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), F32))
    _export_cuda(jaxbp.value_and_grad(model).jitted, params, S(2, 4, dtype=I32),
                 S(2, 4, dtype=I32), None)  # fmt: skip
    bf16 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), params)
    _export_cuda(jaxbp.value_and_grad(model).jitted, bf16, S(2, 4, dtype=I32),
                 S(2, 4, dtype=I32), None)  # fmt: skip


@pytest.mark.parametrize("model", [GPT, dataclasses.replace(GPT, tied=True, attention="recompute")],
                         ids=["default", "tied-recompute"])  # fmt: skip
def test_gpt_per_example_transforms_lower_for_cuda(model):
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), F32))
    ids = S(2, 4, dtype=I32)
    _export_cuda(jaxbp.per_example_grad_norms(model).jitted, params, ids, ids, None)
    clipped = jaxbp.clipped_grad(model, l2_clip=1.0, noise_multiplier=0.5).jitted
    _export_cuda(clipped, params, ids, ids, None, jax.eval_shape(lambda: jax.random.PRNGKey(0)))
