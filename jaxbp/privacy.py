"""DP-SGD training (the GPT's and the MLP's): Poisson-sampled batches and the privacy spent.

The digits MLP (``jaxbp train --dp-clip C --noise σ``): an example is one image; every step
runs the whole training set (1438 images) with ``where`` marking the Poisson-sampled batch
(each image with probability ``q = B/N``), the clipped sum divided by ``B``; ``δ`` is
``10^⌊log₁₀(1/N)⌋`` (1e-4) unless ``--delta`` sets it. The GPT:

Index letters::

    N  windows of the training text (the examples)     q  the sampling rate, B/N
    B  the expected batch size                          s  steps of one stretch
    M  rows a step holds (B and its spread, a multiple of 8)     t  positions

``jaxbp train --model gpt --dp-clip C --noise σ`` trains with :func:`jaxbp.clipped_grad`:
each sequence's gradient clipped to norm ``C``, the sum noised with ``N(0, σ²C²)`` and
divided by ``B``. The privacy unit is one *window* of ``t + 1`` characters (an example);
windows overlap, so one character of the text is in up to ``t + 1`` of them and is protected
only as far as those windows together are.

**Sampling.** The accountant (``dp_accounting``'s privacy-loss-distribution accountant, a
maintained library: jaxbp writes none) assumes *Poisson* subsampling: every window joins a
step's batch independently with probability ``q = B/N``. So each step draws ``m ~ Bin(N, q)``
windows without replacement (the same distribution), and the batch size varies around
``B``. Shapes under ``jit`` cannot: a stretch of ``s`` steps is laid out ``(s, M, t)`` with
``M`` the largest ``m`` of the stretch rounded up to a multiple of 8, the missing rows masked
(``where=False``: an example with nothing valid adds nothing and is not counted), and the
clipped sum divided by the fixed ``B`` (``batch_size=B``), the estimator whose sensitivity
the accountant's analysis assumes. No window is ever dropped to fit a shape. Shuffled
fixed-size batches, as the plain training uses, would not be what the accountant analyses.

``dp_accounting`` is the ``privacy`` extra (in ``.[all]``); without it the run trains and
says that it cannot report ``ε``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from .per_example import check_clip_options, clipped_grad

__all__ = [
    "ACCOUNTANT", "available", "check_dp", "describe", "dp_setting", "epsilon", "examples_setting",
    "poisson_windows", "privacy_text", "spent",
]  # fmt: skip

ACCOUNTANT = "dp_accounting PLD (Poisson-subsampled Gaussian, composed over the steps)"


def available() -> bool:
    """True when ``dp_accounting`` can be imported."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        return False
    return True


def epsilon(rate: float, noise: float, steps: int, delta: float) -> float:
    """``ε`` at ``δ`` after ``steps`` steps of the Poisson-subsampled Gaussian mechanism with
    sampling rate ``q`` and noise multiplier ``σ`` (dp_accounting's PLD accountant);
    ``inf`` without noise. ``ImportError`` names the extra when ``dp_accounting`` is absent."""
    if noise <= 0:
        return math.inf
    if steps == 0:
        return 0.0
    try:
        import dp_accounting
    except ImportError:
        raise ImportError(
            'privacy accounting needs dp_accounting: pip install "jaxbp[privacy]"'
        ) from None
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps
    )
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def poisson_windows(
    data: np.ndarray, rng: np.random.Generator, rate: float, context: int, steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """``steps`` Poisson-sampled batches of windows of ``data`` (ids), laid out for one scan.

    Returns ``x, y (s, M, t)`` (the windows and the next characters), ``where (s, M, t)``
    (False on the padding rows) and the batch sizes ``m`` of the steps. Every one of the
    ``N = len(data) − t`` windows is in a step's batch with probability ``rate``, the steps
    independently.
    """
    n_windows = data.size - context
    sizes = [int(rng.binomial(n_windows, rate)) for _ in range(steps)]
    rows = max(8, -(-max(sizes) // 8) * 8)
    x = np.zeros((steps, rows, context), data.dtype)
    y = np.zeros((steps, rows, context), data.dtype)
    where = np.zeros((steps, rows, context), bool)
    offsets = np.arange(context + 1)
    for k, m in enumerate(sizes):
        start = rng.choice(n_windows, size=m, replace=False)
        windows = data[start[:, None] + offsets]
        x[k, :m], y[k, :m], where[k, :m] = windows[:, :-1], windows[:, 1:], True
    return x, y, where, sizes


def describe(rate: float, noise: float, clip: float, delta: float, batch: int,
             count: int, unit: str = "windows") -> dict[str, Any]:  # fmt: skip
    """What a DP run records of its privacy setting (the JSON's ``privacy``): ``unit`` names
    the examples (``"windows"`` of the GPT's text, the MLP's ``"examples"``), ``count`` how
    many there are (under the key ``unit``)."""
    return {"l2_clip": clip, "noise_multiplier": noise, "expected_batch": batch,
            "sampling_rate": rate, unit: count, "unit": unit, "delta": delta,
            "accountant": ACCOUNTANT, "sampling": "Poisson"}  # fmt: skip


def dp_setting(model, cfg: dict[str, Any], text) -> dict[str, Any]:
    """DP-SGD's step and privacy setting for :func:`jaxbp.train_gpt.train_gpt` (``cfg`` its
    configuration): ``step(params, x, y, where, key) -> (loss, grads)``, the clipped, noised
    gradient of a Poisson-sampled batch divided by the expected batch size, the sampling rate,
    ``δ`` and the noise key."""
    windows = text.train.size - cfg["context"]
    clipped = clipped_grad(model, l2_clip=cfg["dp_clip"], noise_multiplier=cfg["noise"],
                           batch_size=cfg["batch_size"], return_loss=True).jitted  # fmt: skip

    def step(params, x, y, where, key):
        # GPT(dropout>0): the masks from their own key, derived from the step's noise key
        drop = jax.random.fold_in(key, 1) if cfg.get("dropout") else None
        loss, grads, _ = clipped(params, x, y, where, drop, key if cfg["noise"] > 0 else None)
        return loss, grads

    return {
        **examples_setting(
            cfg["batch_size"], cfg["dp_clip"], cfg["noise"], windows, cfg["delta"], unit="windows"
        ),
        "step": step,
        "key": jax.random.fold_in(jax.random.PRNGKey(cfg["seed"]), 0xD9),
    }


def check_dp(dp_clip: float | None, noise: float, delta: float | None = None) -> None:
    """Clear errors for ``--dp-clip C`` / ``--noise σ`` / ``--delta δ`` before any work."""
    if dp_clip is None:
        if noise:
            raise ValueError(f"noise: --noise {noise} needs --dp-clip C (the noise std is σ·C)")
        if delta is not None:
            raise ValueError("--delta: only with --dp-clip (the δ of DP-SGD's (ε, δ))")
        return
    check_clip_options(dp_clip, noise, None, "bookkeeping")
    if delta is not None and not (isinstance(delta, float) and 0.0 < delta < 1.0):
        raise ValueError(f"delta: expected a number in (0, 1), got {delta!r}")


def examples_setting(batch: int, clip: float, noise: float | None, examples: int,
                     delta: float | None = None, unit: str = "examples"
                     ) -> dict[str, Any]:  # fmt: skip
    """DP-SGD's privacy setting for ``examples`` examples Poisson-sampled at ``q =
    batch/examples`` (the MLP's images; the GPT's windows with ``unit="windows"``): the rate,
    ``δ`` (default ``10^⌊log₁₀(1/examples)⌋``), what the run records (:func:`describe`),
    ``ε`` not yet spent."""
    rate = batch / examples
    delta = delta or 10.0 ** math.floor(math.log10(1.0 / examples))
    setting = describe(rate, float(noise or 0.0), clip, delta, batch, examples, unit=unit)
    return {"rate": rate, "delta": delta, "epsilon": None, "setting": setting,
            "accounted": available()}  # fmt: skip


def spent(dp: dict[str, Any], steps: int) -> float | None:
    """``ε`` after ``steps`` steps, or ``None`` without ``dp_accounting``."""
    if not dp["accounted"]:
        return None
    return epsilon(dp["rate"], dp["setting"]["noise_multiplier"], steps, dp["delta"])


def privacy_text(dp: dict[str, Any]) -> str:
    if dp["epsilon"] is None:
        return 'ε not accounted (pip install "jaxbp[privacy]")'
    return f"(ε, δ) = ({dp['epsilon']:.3g}, {dp['delta']:.0e})"
