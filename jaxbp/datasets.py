"""Small real data sets shipped inside the package (no download, no scikit-learn at run time).

Index letters::

    n  examples      i  input features (64 pixels for digits)

``load_digits()`` returns the 1797 handwritten 8×8 digits of ``jaxbp/data/digits.npz``
(UCI optical digits, CC BY 4.0; see ``jaxbp/data/README.md``), flattened and scaled.
"""

from __future__ import annotations

import dataclasses
from importlib import resources

import numpy as np

__all__ = ["Split", "load_digits"]


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
