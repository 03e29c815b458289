"""Small real data sets shipped inside the package (no download, no scikit-learn at run time).

Index letters::

    n  examples      i  input features (64 pixels for digits)
    t  characters (a text's length, or a model's context)      v  vocabulary

``load_digits()`` returns the 1797 handwritten 8×8 digits of ``jaxbp/data/digits.npz``
(UCI optical digits, CC BY 4.0), flattened and scaled. ``load_shakespeare()`` returns the
works of Shakespeare of ``jaxbp/data/tinyshakespeare.txt.gz`` (public domain, the "tiny
shakespeare" file of the char-rnn repository) as character ids with a train/validation
split. Sources and licences: ``jaxbp/data/README.md``.
"""

from __future__ import annotations

import dataclasses
import gzip
from importlib import resources

import numpy as np

__all__ = ["Split", "Text", "load_digits", "load_shakespeare"]


@dataclasses.dataclass(frozen=True)
class Split:
    """A train/test split: ``x_* (n, i)`` float32 in ``[0, 1]``, ``y_* (n,)`` int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """The digits data set, split into train and test with a fixed, seeded permutation.

    Args:
      test_fraction: share of the 1797 examples held out for testing (0.2 → 359 of 1797 examples).
      seed: seed of the permutation (NumPy ``default_rng``); the default split is the one the
        tests and ``jaxbp train`` report on.

    Returns:
      :class:`Split` with ``x (n, 64)`` float32 pixels scaled from 0–16 to ``[0, 1]`` and
      ``y (n,)`` int32 digits 0–9.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    with resources.files("jaxbp").joinpath("data/digits.npz").open("rb") as f:
        data = np.load(f)
        images, labels = data["images"], data["labels"]
    x = images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(16.0)
    y = labels.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    return Split(x[train], y[train], x[test], y[test])


@dataclasses.dataclass(frozen=True)
class Text:
    """A character-level corpus: ids ``(t,)`` int32 over a sorted vocabulary of ``v`` chars.

    ``train`` and ``validation`` are consecutive pieces of the text (the first
    ``1 − validation_fraction`` of it, then the rest), so no validation character was seen in
    training. :meth:`encode` / :meth:`decode` map between strings and ids.
    """

    vocab: str
    train: np.ndarray
    validation: np.ndarray

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        """Ids ``(t,)`` int32 of ``text``; ``ValueError`` names characters not in the vocabulary."""
        index = {ch: i for i, ch in enumerate(self.vocab)}
        missing = sorted(set(text) - set(index))
        if missing:
            raise ValueError(f"text: characters {missing!r} are not in the vocabulary")
        return np.fromiter((index[ch] for ch in text), np.int32, len(text))

    def decode(self, ids) -> str:
        """The string of ids ``(t,)``."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.vocab)):
            raise ValueError(
                f"ids: expected values in [0, {len(self.vocab)}), got {ids.min()}..{ids.max()}"
            )
        return "".join(self.vocab[i] for i in ids)

    def batch(self, key, batch_size: int, context: int, *, split: str = "train"):
        """``batch_size`` random windows: ``x (n, t)`` and the next characters ``y (n, t)``.

        ``key`` is a NumPy ``Generator`` or an int seed; ``split`` is ``"train"`` or
        ``"validation"``. ``y[:, j] = x[:, j + 1]`` within the text.
        """
        data = {"train": self.train, "validation": self.validation}.get(split)
        if data is None:
            raise ValueError(f"split: expected 'train' or 'validation', got {split!r}")
        if not 1 <= context < data.size:
            raise ValueError(f"context: expected 1 to {data.size - 1}, got {context}")
        rng = key if isinstance(key, np.random.Generator) else np.random.default_rng(key)
        start = rng.integers(0, data.size - context, size=batch_size)
        idx = start[:, None] + np.arange(context + 1)
        windows = data[idx]
        return windows[:, :-1], windows[:, 1:]


def load_shakespeare(*, validation_fraction: float = 0.1) -> Text:
    """The works of Shakespeare (1,115,394 characters, 65 distinct) as character ids.

    Args:
      validation_fraction: share of the text, taken from its end, held out for validation
        (0.1 → the last 111,539 characters).

    Returns:
      :class:`Text` with ``vocab`` (the 65 characters, sorted), ``train (t,)`` and
      ``validation (t,)`` int32 ids.

    Example:
      >>> from jaxbp.datasets import load_shakespeare
      >>> text = load_shakespeare()
      >>> text.vocab_size, text.decode(text.train[:14])
      (65, 'First Citizen:')
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction: expected a number in (0, 1), got {validation_fraction!r}"
        )
    with resources.files("jaxbp").joinpath("data/tinyshakespeare.txt.gz").open("rb") as f:
        raw = gzip.decompress(f.read()).decode("utf-8")
    vocab = "".join(sorted(set(raw)))
    table = np.full(max(map(ord, vocab)) + 1, -1, np.int32)
    table[[ord(ch) for ch in vocab]] = np.arange(len(vocab), dtype=np.int32)
    ids = table[np.frombuffer(raw.encode("utf-32-le"), np.uint32)]
    n_val = int(round(validation_fraction * ids.size))
    return Text(vocab, ids[: ids.size - n_val], ids[ids.size - n_val :])
