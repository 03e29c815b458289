"""The bundled data: the Shakespeare text as character ids, its split, batches, errors."""

import gzip
import hashlib
from importlib import resources

import numpy as np
import pytest

import jaxbp
from jaxbp.datasets import load_shakespeare

TEXT = load_shakespeare()


def _raw() -> str:
    data = resources.files("jaxbp").joinpath("data/tinyshakespeare.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")


def test_the_bundled_file_is_the_published_one():
    data = resources.files("jaxbp").joinpath("data/tinyshakespeare.txt.gz").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert digest == "bed00f18e91cda6838950656f0a95e07e0f4dbe8649a4b959f7602a7e53fbc6e"


def test_vocabulary_is_the_65_sorted_characters_and_the_split_covers_the_text():
    raw = _raw()
    assert len(raw) == 1_115_394
    assert TEXT.vocab == "".join(sorted(set(raw))) and TEXT.vocab_size == 65
    assert TEXT.train.dtype == np.int32 and TEXT.validation.dtype == np.int32
    assert TEXT.train.size + TEXT.validation.size == len(raw)
    assert TEXT.validation.size == round(0.1 * len(raw))
    # Validation is the end of the text, training the beginning: decoding gives the text back.
    assert TEXT.decode(TEXT.validation[-200:]) == raw[-200:]
    assert TEXT.decode(TEXT.train[:200]) == raw[:200]
    assert jaxbp.load_shakespeare is load_shakespeare


def test_encode_and_decode_are_inverse():
    s = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    assert TEXT.decode(TEXT.encode(s)) == s
    assert TEXT.encode("a").tolist() == [TEXT.vocab.index("a")]


def test_batch_targets_are_the_next_characters():
    x, y = TEXT.batch(np.random.default_rng(0), 4, 16)
    assert x.shape == y.shape == (4, 16)
    assert np.array_equal(x[:, 1:], y[:, :-1])
    x2, _ = TEXT.batch(0, 4, 16)  # an int seed
    assert np.array_equal(x, x2)
    xv, _ = TEXT.batch(1, 2, 8, split="validation")
    joined = TEXT.decode(TEXT.validation)
    assert TEXT.decode(xv[0]) in joined


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="characters"):
        TEXT.encode("é")
    with pytest.raises(ValueError, match="ids"):
        TEXT.decode([70])
    with pytest.raises(ValueError, match="split"):
        TEXT.batch(0, 1, 4, split="test")
    with pytest.raises(ValueError, match="context"):
        TEXT.batch(0, 1, 0)
    with pytest.raises(ValueError, match="validation_fraction"):
        load_shakespeare(validation_fraction=1.0)
