"""Sampling from a trained GPT: the latest checkpoint ``jaxbp train --model gpt`` saved.

``jaxbp generate --checkpoint-dir DIR --prompt TEXT --chars N`` (and :func:`generate` from
Python) reads the folder without changing it, so a run may still be writing into it.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from .checkpoint import read_meta
from .datasets import load_shakespeare
from .gpt import GPT
from .train_gpt import GPT_DEFAULTS, _optimizer, characters_only, check_config

__all__ = ["generate", "load_checkpoint"]


def load_checkpoint(directory: str) -> tuple[GPT, dict[str, Any], Any, int]:
    """``(model, config, params, step)`` of the latest GPT checkpoint in ``directory``, read
    only. :class:`jaxbp.checkpoint.CheckpointError` names the folder when it holds no GPT
    checkpoint."""
    from .checkpoint import CheckpointError, restore

    _, meta = read_meta(directory)
    if meta.get("model") != "gpt":
        raise CheckpointError(
            f"checkpoint_dir: {directory!r} holds a checkpoint of --model "
            f"{meta.get('model')}, not of a GPT (jaxbp train --model gpt)"
        )
    cfg = {**GPT_DEFAULTS, **{k: v for k, v in meta["config"].items() if k in GPT_DEFAULTS}}
    model = check_config(cfg)
    template = model.init(jax.random.PRNGKey(0))
    template = {"params": template, "opt_state": _optimizer(cfg).init(template)}
    step, state, _ = restore(directory, template)
    return model, cfg, state["params"], step


def generate(
    checkpoint_dir: str, prompt: str = "\n", chars: int = 300, *, temperature: float = 0.8,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Sample ``chars`` characters after ``prompt`` from the GPT saved in ``checkpoint_dir``.

    Returns ``{"text": the continuation, "prompt", "step" (the checkpoint's), "chars",
    "temperature", "seed", "config"}``; the same ``seed`` gives the same text.
    ``ValueError`` names characters of the prompt outside the vocabulary.
    """
    text = load_shakespeare()
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt: expected at least one character, got {prompt!r}")
    try:
        ids = text.encode(prompt)
    except ValueError as e:
        raise ValueError(f"prompt: {str(e).split(': ', 1)[1]}") from None
    if not isinstance(chars, int) or isinstance(chars, bool) or chars < 0:
        raise ValueError(f"chars: expected an int ≥ 0, got {chars!r}")
    if not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    model, cfg, params, step = load_checkpoint(checkpoint_dir)
    model, params = characters_only(model, params, text.vocab_size)  # a padded vocabulary
    out = model.generate(params, jax.random.PRNGKey(seed), ids, chars, temperature=temperature)
    return {
        "text": text.decode(out[ids.size :]),
        "prompt": prompt,
        "step": step,
        "chars": chars,
        "temperature": temperature,
        "seed": seed,
        "config": {k: cfg[k] for k in ("d", "heads", "layers", "context")},
    }
