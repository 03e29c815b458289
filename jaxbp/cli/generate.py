"""``jaxbp generate``: sample text from a GPT checkpoint of ``jaxbp train --model gpt``.

The checkpoint is the latest one in ``jaxbp train --model gpt --checkpoint-dir DIR``.

The arguments, their checks, and the printing; the work is
:func:`jaxbp.generate.generate` (the latest checkpoint in ``DIR``, read only, so a run may
still be writing into it).
"""

from __future__ import annotations

from ..checkpoint import CheckpointError, orbax, read_meta
from ..datasets import load_shakespeare
from ..generate import generate
from ..train_gpt import GPT_DEFAULTS
from ._args import json_path, nonnegative_int, positive_float, text_stream, write_json


def add_arguments(parser) -> None:
    """``jaxbp generate``'s arguments."""
    parser.add_argument(
        "--checkpoint-dir", metavar="DIR", required=True,
        help="the folder of jaxbp train --model gpt --checkpoint-dir DIR (its latest checkpoint)",
    )  # fmt: skip
    parser.add_argument("--prompt", metavar="TEXT", default="\n",
                        help="text to continue (default a new line)")  # fmt: skip
    parser.add_argument("--chars", metavar="N", type=nonnegative_int, default=300,
                        help="characters to generate (default 300)")  # fmt: skip
    parser.add_argument(
        "--temperature", metavar="T", type=positive_float, default=GPT_DEFAULTS["temperature"],
        help=f"sampling temperature (default {GPT_DEFAULTS['temperature']})",
    )  # fmt: skip
    parser.add_argument("--seed", metavar="S", type=int, default=0,
                        help="seed of the sampling (default 0)")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", type=json_path,
                        help="also write the text and settings as JSON (-: stdout)")  # fmt: skip


def validate(args) -> None:
    """orbax installed, a GPT checkpoint in the folder, a prompt of the vocabulary's
    characters; before anything is loaded or compiled."""
    if not args.prompt:
        raise ValueError("--prompt: expected at least one character, got ''")
    try:
        orbax()
    except ImportError as e:
        raise ValueError(f"--checkpoint-dir: {e}") from None
    try:
        _, meta = read_meta(args.checkpoint_dir)
    except CheckpointError as e:
        raise ValueError("--" + str(e).replace("_", "-", 1)) from None
    if meta.get("model") != "gpt":
        raise ValueError(
            f"--checkpoint-dir: {args.checkpoint_dir!r} holds a checkpoint of --model "
            f"{meta.get('model')}; generate samples from a GPT (jaxbp train --model gpt)"
        )
    missing = sorted(set(args.prompt) - set(load_shakespeare().vocab))
    if missing:
        raise ValueError(f"--prompt: characters {missing!r} are not in the vocabulary")


def run(args) -> int:
    """Print the prompt and its continuation (arguments already validated)."""
    out = text_stream(args)
    result = generate(
        args.checkpoint_dir, args.prompt, args.chars, temperature=args.temperature,
        seed=args.seed,
    )  # fmt: skip
    cfg = result["config"]
    print(
        f"GPT d={cfg['d']} heads={cfg['heads']} layers={cfg['layers']} "
        f"context={cfg['context']} at step {result['step']} of {args.checkpoint_dir}, "
        f"temperature {args.temperature}, seed {args.seed}:",
        file=out,
    )
    print(result["prompt"] + result["text"], file=out)
    write_json(args.json, {"checkpoint_dir": args.checkpoint_dir, **result})
    return 0
