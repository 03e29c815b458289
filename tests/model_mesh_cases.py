"""Any model on 8 simulated CPU devices, for tests/parallel_worker.py ``single`` (the same
process as tests/mesh_cases.py): ``jaxbp.parallel.value_and_grad`` of a user's model and
``jaxbp.parallel.clipped_grad`` (DP-SGD) of the MLP, the GPT and a user's model on 1×8 and
2×4 meshes, the batch on ``data``, against one device; the errors. tests/test_parallel.py
asserts.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

SHAPES = ((8,), (2, 4))  # (data,) and (data, model): the model axis holds replicas here


def _mesh(shape):
    import jax

    return jax.make_mesh(shape, ("data", "model")[: len(shape)])


@dataclasses.dataclass(frozen=True)
class TokenTagger:
    """A user's model with a loss per token: ``x (n, t, i)`` → dense → tanh → dense →
    softmax CE against ``labels (n, t)``, masked by ``where (n, t)``, with ``class_weights
    (c,)`` the same for every example (so ``batch_axes`` says None there)."""

    i: int = 3
    h: int = 5
    c: int = 4
    batch_axes: ClassVar[tuple] = (0, 0, 0, None)

    def init(self, key, dtype):
        import jax

        ka, kb, kc, kd = jax.random.split(key, 4)
        return {
            "a": {"w": jax.random.normal(ka, (self.i, self.h), dtype),
                  "b": 0.1 * jax.random.normal(kb, (self.h,), dtype)},
            "b": {"w": jax.random.normal(kc, (self.h, self.c), dtype),
                  "b": 0.1 * jax.random.normal(kd, (self.c,), dtype)},
        }  # fmt: skip

    def forward(self, t, params, x, labels, where=None, class_weights=None):
        import jax.numpy as jnp

        import jaxbp

        n, tt, _ = x.shape
        h, r_a = t.fwd(jaxbp.dense, x.reshape(n * tt, -1), params["a"]["w"], params["a"]["b"])
        z, r_act = t.fwd(jaxbp.tanh, h)
        logits, r_b = t.fwd(jaxbp.dense, z, params["b"]["w"], params["b"]["b"])
        flat = None if where is None else where.reshape(-1)
        losses, r_loss = t.fwd(jaxbp.softmax_cross_entropy, logits, labels.reshape(-1), flat,
                               class_weights)  # fmt: skip
        valid = jnp.ones((n, tt), bool) if where is None else where
        return losses.reshape(n, tt), valid, (r_a, r_act, r_b, r_loss)

    def backward(self, t, state, seed):
        import jaxbp

        r_a, r_act, r_b, r_loss = state
        dlogits, _ = t.bwd(jaxbp.softmax_cross_entropy, r_loss, seed.reshape(-1))
        (dz,) = t.bwd(jaxbp.dense, r_b, dlogits, params=("b",))
        (dh,) = t.bwd(jaxbp.tanh, r_act, dz)
        t.bwd(jaxbp.dense, r_a, dh, params=("a",))


def _tagger_batch(rng, n=16, t=3):
    """``x (n, t, 3), labels (n, t), where (n, t), class_weights (4,)``: the first of the 8
    data shards with nothing valid, the second with one valid token."""
    import numpy as np

    x = rng.normal(size=(n, t, 3))
    labels = rng.integers(0, 4, (n, t)).astype(np.int32)
    where = rng.uniform(size=(n, t)) < 0.7
    where[:4] = False  # rows 0-1: shard 0 of 8; rows 0-3: half of shard 0 of 2
    where[2, 1] = True
    return x, labels, where, rng.uniform(0.5, 2.0, 4)


def _gpt_problem(rng):
    """A tied GPT with a mask: its first data shard (of 8) and one more sequence have nothing
    valid."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbp

    gpt = jaxbp.GPT(vocab=11, d=8, heads=2, layers=1, context=5, tied=True)
    params = gpt.init(jax.random.PRNGKey(7), jnp.float64)
    ids = rng.integers(0, 11, (8, 5)).astype(np.int32)
    targets = rng.integers(0, 11, (8, 5)).astype(np.int32)
    where = rng.uniform(size=(8, 5)) < 0.6
    where[0] = where[5] = False
    where[1, 0] = True
    return gpt, params, (ids, targets), {"where": where}


def case_model_value_and_grad_on_meshes(out, summary):
    """``parallel.value_and_grad`` of a user's models (float64) on 1×8 and 2×4 meshes, uneven
    masks, against ``jax.grad`` through the ops' plain twins on one device
    (``jaxbp.reference.value_and_grad``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbp
    from jaxbp import parallel
    from tests.parallel_worker import _save
    from tests.test_model import ResidualMLP

    rng = np.random.default_rng(41)
    tagger = TokenTagger()
    tp = tagger.init(jax.random.PRNGKey(0), jnp.float64)
    batch = _tagger_batch(rng)
    residual = ResidualMLP(i=5, d=4, f=6, c=3, blocks=2)
    rp = residual.init(jax.random.PRNGKey(1), jnp.float64)
    rb = (rng.normal(size=(16, 5)), rng.integers(0, 3, 16).astype(np.int32))
    actual, expected = {}, {}
    for shape in SHAPES:
        mesh = _mesh(shape)
        key = "x".join(map(str, shape))
        actual[f"{key}/tagger"] = parallel.value_and_grad(tagger, mesh)(tp, *batch)
        expected[f"{key}/tagger"] = jaxbp.reference.value_and_grad(tagger)(tp, *batch)
    actual["8/residual_mlp"] = parallel.value_and_grad(residual, _mesh((8,)))(rp, *rb)
    expected["8/residual_mlp"] = jaxbp.reference.value_and_grad(residual)(rp, *rb)
    _save(out, "model_value_and_grad_on_meshes", actual, expected, "float64",
          {"variants": sorted(actual)}, summary)  # fmt: skip


def case_dp_sgd_on_meshes(out, summary):
    """``parallel.clipped_grad`` (float64) of the MLP (mask, class weights), the GPT (tied,
    masked, a data shard with nothing valid) and a user's model on 1×8 and 2×4 meshes, with
    and without noise, against one device's ``jaxbp.clipped_grad`` with the same key."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbp
    from jaxbp import parallel
    from tests.parallel_worker import _save, _uneven_where

    rng = np.random.default_rng(42)
    mlp = jaxbp.MLP((5, 7, 4), activation="tanh")
    mp = mlp.init(jax.random.PRNGKey(2), jnp.float64)
    tagger = TokenTagger()
    tagger_batch = _tagger_batch(rng)
    problems = {
        "mlp": (mlp, mp, (rng.normal(size=(16, 5)), rng.integers(0, 4, 16).astype(np.int32)),
                {"where": _uneven_where(16, 8), "class_weights": rng.uniform(0.5, 2.0, 4)}),
        "gpt": _gpt_problem(rng),
        "tagger": (tagger, tagger.init(jax.random.PRNGKey(3), jnp.float64), tagger_batch, {}),
    }  # fmt: skip
    # per model: the options other than the noise (every option somewhere)
    options = {
        "mlp": {"l2_clip": 0.5, "return_loss": True},
        "gpt": {"l2_clip": 0.05, "method": "two_pass"},
        "tagger": {"l2_clip": 0.3, "batch_size": 16},
    }
    actual, expected, specs = {}, {}, {}
    for name, (model, params, batch, kw) in problems.items():
        for sigma in (0.0, 1.3):
            opts = dict(options[name], noise_multiplier=sigma)
            key = {"key": jax.random.key(5)} if sigma else {}
            one = jaxbp.clipped_grad(model, **opts)(params, *batch, **kw, **key)
            for shape in SHAPES:
                label = f"{'x'.join(map(str, shape))}/{name}/sigma={sigma}"
                f = parallel.clipped_grad(model, _mesh(shape), axis="data", **opts)
                actual[label], expected[label] = f(params, *batch, **kw, **key), one
                specs[label] = str(actual[label][-1].sharding.spec)
    _save(out, "dp_sgd_on_meshes", actual, expected, "float64",
          {"variants": sorted(actual), "norm_specs": specs}, summary)  # fmt: skip


def case_dp_sgd_collectives(out, summary):
    """The collectives of the compiled DP-SGD step (a user's model, 1×8 and 2×4, float64),
    read from the HLO (benchmarks/cases_parallel.collective_bytes): what the test expects is
    counted there from the parameters."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.cases_parallel import collective_bytes
    from jaxbp import parallel

    tagger = TokenTagger()
    params = tagger.init(jax.random.PRNGKey(0), jnp.float64)
    x, labels, where, cw = _tagger_batch(np.random.default_rng(0))
    info = {"parameters": int(sum(a.size for a in jax.tree.leaves(params)))}
    for shape in SHAPES:
        f = parallel.clipped_grad(tagger, _mesh(shape), l2_clip=1.0, noise_multiplier=1.0)
        hlo = f.jitted.lower(params, x, labels, where, cw, jax.random.key(0)).compile().as_text()
        sizes = dict(zip(("data", "model"), shape, strict=False))
        info["x".join(map(str, shape))] = collective_bytes(hlo, sizes)
    summary["dp_sgd_collectives"] = {"ok": True, "dtype": "float64", "info": info}


def case_model_mesh_errors(out, summary):
    """Errors before anything compiles: a mesh without the axis, a batch not divisible by
    it (for a user's model, the MLP and the GPT), an argument without the examples on its
    leading axis, tensor parallelism asked of a user's model, something that is no model."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbp
    from jaxbp import parallel

    mesh = _mesh((8,))
    tagger = TokenTagger()
    tp = tagger.init(jax.random.PRNGKey(0), jnp.float64)
    x, labels, where, cw = _tagger_batch(np.random.default_rng(0), n=12)
    gpt = jaxbp.GPT(vocab=11, d=8, heads=2, layers=1, context=5)
    mlp = jaxbp.MLP((3, 4))
    f = parallel.clipped_grad(tagger, mesh, l2_clip=1.0)
    vg = parallel.value_and_grad(tagger, mesh)
    ids = np.zeros((6, 5), np.int32)

    @dataclasses.dataclass(frozen=True)
    class NoAxes(TokenTagger):
        batch_axes: ClassVar[tuple] = None  # class_weights (c,) then looks per example

    attempts = {
        "no_axis": lambda: parallel.clipped_grad(tagger, mesh, axis="batch", l2_clip=1.0),
        "batch": lambda: f(tp, x, labels, where, cw),
        "batch_value_and_grad": lambda: vg(tp, x, labels, where, cw),
        "gpt_batch": lambda: parallel.clipped_grad(gpt, mesh, l2_clip=1.0)(
            gpt.init(jax.random.PRNGKey(0)), ids, ids),
        "mlp_batch": lambda: parallel.clipped_grad(mlp, mesh, l2_clip=1.0)(
            mlp.init(jax.random.PRNGKey(0)), np.zeros((4, 3), np.float32), np.zeros(4, np.int32)),
        "leading_axis": lambda: parallel.clipped_grad(NoAxes(), mesh, l2_clip=1.0)(
            tp, *_tagger_batch(np.random.default_rng(0))),
        "model_axis": lambda: parallel.value_and_grad(
            tagger, _mesh((2, 4)), axis="data", model_axis="model"),
        "not_a_model": lambda: parallel.clipped_grad("tagger", mesh, l2_clip=1.0),
        "clip": lambda: parallel.clipped_grad(tagger, mesh, l2_clip=0.0),
        "no_key": lambda: parallel.clipped_grad(tagger, mesh, l2_clip=1.0,
                                                noise_multiplier=1.0)(tp, x[:8], labels[:8]),
    }  # fmt: skip
    msgs = {}
    for name, fn in attempts.items():
        try:
            fn()
            msgs[name] = None
        except Exception as e:  # noqa: BLE001 - recorded, asserted on by the test
            msgs[name] = f"{type(e).__name__}: {e}"
    msgs["compiled_after_errors"] = f.jitted._cache_size() + vg.jitted._cache_size()
    summary["model_mesh_errors"] = {"ok": True, "dtype": None, "info": msgs}


CASES = [
    case_model_mesh_errors,
    case_model_value_and_grad_on_meshes,
    case_dp_sgd_on_meshes,
    case_dp_sgd_collectives,
]
