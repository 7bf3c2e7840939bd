"""The offline real-image dataset: scikit-learn's digits converted to LLaVA format."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from qtl_jax.data import digits
from qtl_jax.data.annotations import iter_annotations
from qtl_jax.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    return digits.build(out, log=lambda *_: None)


def test_split_is_stratified_disjoint_and_fixed():
    labels = load_digits().target
    parts = digits.split_indices(labels)
    assert {k: len(v) for k, v in parts.items()} == {"train": 1439, "validation": 179, "test": 179}
    every = np.concatenate(list(parts.values()))
    assert len(np.unique(every)) == len(labels) == 1797  # a partition
    for name in ("validation", "test"):  # each digit ~10% of its images in each held-out split
        counts = np.bincount(labels[parts[name]], minlength=10)
        assert np.all(np.abs(counts - np.bincount(labels) * 0.1) <= 1)
    again = digits.split_indices(labels)
    for name in parts:
        np.testing.assert_array_equal(parts[name], again[name])


def test_answers():
    assert [digits.answer("digit", d) for d in (0, 7)] == ["zero", "seven"]
    assert [digits.answer("parity", d) for d in (4, 7)] == ["even", "odd"]
    assert [digits.answer("size", d) for d in (4, 5)] == ["no", "yes"]
    with pytest.raises(ValueError, match="unknown question kind"):
        digits.answer("colour", 3)


def test_build_writes_llava_files_images_and_tokenizer(built):
    data = load_digits()
    counts = {}
    for name in digits.FILES:
        samples = [a.record for a in iter_annotations(os.path.join(built, name))]
        counts[name] = len(samples)
        for s in samples[:40]:
            index = int(s["image"].split("/")[1][:4])
            assert s["label"] == data.target[index]
            pixels = np.asarray(Image.open(os.path.join(built, s["image"])))
            np.testing.assert_array_equal(pixels, np.round(data.images[index] * 255 / 16).astype(np.uint8))
            answer = s["conversations"][-1]["value"]
            if s["question_type"] == "caption":
                assert answer == f"a handwritten {digits.NUMBER_WORDS[s['label']]}"
            else:
                assert answer == digits.answer(s["question_type"], s["label"])
    assert counts == {"pretrain.json": 1439, "train.json": 3 * 1439, "validation.json": 3 * 179,
                      "test.json": 3 * 179}
    tok = load_tokenizer(os.path.join(built, "tokenizer"))
    for word in [*digits.NUMBER_WORDS, "even", "odd", "yes", "no", "handwritten", "Which"]:
        assert tok.unk_id not in tok.tokenize(word)[0]
    # Built once: a second call reuses the folder.
    stamp = os.path.getmtime(os.path.join(built, "train.json"))
    assert digits.build(built) == built and os.path.getmtime(os.path.join(built, "train.json")) == stamp
    assert json.load(open(os.path.join(built, "validation.json")))[0]["question_type"] in digits.QUESTIONS
