"""A small real image dataset, offline: scikit-learn's handwritten digits (UCI optdigits test set, 1,797
8x8 grayscale scans of 43 writers) converted to LLaVA format.

    python -m qtl_jax.data.digits --out ~/qtl_data/digits

writes, in `--out`:
  images/NNNN.png           the 8x8 scans as 8-bit grayscale PNGs (0..16 scaled to 0..255); the model's
                            preprocessing resizes them (bicubic) to its input size like any user image
  pretrain.json             one caption per training image ("a handwritten seven"), for stage 1
  train.json                three questions per training image, for stage 2
  validation.json, test.json  the same questions on held-out images (evaluation files)
  tokenizer/                a word-level tokenizer of every word in these files and the templates
  README.txt                the commands that train on it

Splits are stratified by digit and fixed (seed 0): 80% train (1,437 images), 10% validation (180), 10% test
(180). Questions, one of each kind per image, with `question_type` and the digit as `label` on every record:
  digit   "Which digit is written in the image?"           -> zero .. nine (chance 0.10)
  parity  "Is the digit even or odd?"                      -> even | odd  (0.50)
  size    "Is the digit greater than four?"                -> yes | no    (0.50)
Answers are words, not numerals, so that the built word-level tokenizer has one token per answer.

This is the dataset the tiny recipe was *not* designed for: the images are real scans, the tower starts from
random weights, and nothing about the recipe was tuned on it (`--config.data.dataset=digits`).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from qtl_jax import files

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTIONS = {
    "digit": "Which digit is written in the image?",
    "parity": "Is the digit even or odd?",
    "size": "Is the digit greater than four?",
}
SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}
FILES = ("pretrain.json", "train.json", "validation.json", "test.json")


def answer(kind: str, digit: int) -> str:
    """The reference answer of a question kind for a digit."""
    if kind == "digit":
        return NUMBER_WORDS[digit]
    if kind == "parity":
        return "even" if digit % 2 == 0 else "odd"
    if kind == "size":
        return "yes" if digit > 4 else "no"
    raise ValueError(f"unknown question kind {kind!r}; expected one of {tuple(QUESTIONS)}")


def split_indices(labels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Stratified split of image indices: per digit, a fixed permutation cut 80/10/10 (sorted indices)."""
    rng = np.random.default_rng(seed)
    out = {name: [] for name in SPLITS}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        n_val = round(len(members) * SPLITS["validation"])
        n_test = round(len(members) * SPLITS["test"])
        out["validation"].append(members[:n_val])
        out["test"].append(members[n_val:n_val + n_test])
        out["train"].append(members[n_val + n_test:])
    return {name: np.sort(np.concatenate(parts)) for name, parts in out.items()}


def records(split: str, indices: np.ndarray, labels: np.ndarray) -> list[dict]:
    """LLaVA-format records of a split: captions for "pretrain", three questions per image otherwise."""
    out = []
    for i in indices.tolist():
        digit = int(labels[i])
        image = f"images/{i:04d}.png"
        if split == "pretrain":
            out.append({"id": f"digits-caption-{i:04d}", "image": image, "question_type": "caption", "label": digit,
                        "conversations": [{"from": "human", "value": "<image>"},
                                          {"from": "gpt", "value": f"a handwritten {NUMBER_WORDS[digit]}"}]})
            continue
        for kind, question in QUESTIONS.items():
            out.append({"id": f"digits-{split}-{i:04d}-{kind}", "image": image, "question_type": kind,
                        "label": digit,
                        "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                          {"from": "gpt", "value": answer(kind, digit)}]})
    return out


def build(out: str, log=print) -> str:
    """Writes the dataset into `out` (see the module docstring) unless it is complete there; returns `out`."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from qtl_jax.data.tokenizer import annotation_words, build_word_tokenizer

    out = os.path.expanduser(out)
    done = os.path.join(out, "README.txt")
    if os.path.isfile(done):
        return out
    digits = load_digits()
    scans, labels = np.asarray(digits.images), np.asarray(digits.target)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for i, scan in enumerate(scans):
        pixels = np.round(np.clip(scan, 0, 16) * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(os.path.join(out, "images", f"{i:04d}.png"))
    parts = split_indices(labels)
    files.write_json(os.path.join(out, "pretrain.json"), records("pretrain", parts["train"], labels), indent=1)
    for split, indices in parts.items():
        files.write_json(os.path.join(out, f"{split}.json"), records(split, indices, labels), indent=1)
    build_word_tokenizer(annotation_words([os.path.join(out, f) for f in FILES]), os.path.join(out, "tokenizer"))
    files.write_text(done, f"scikit-learn's handwritten digits in LLaVA format ({len(labels)} images: "
                     + ", ".join(f"{k} {len(v)}" for k, v in parts.items())
                     + ").\nThe tiny recipe trains on it with --config.data.dataset=digits (which builds it into "
                       "DATA_DIR/digits), or as any LLaVA-format data:\n  python train.py --config configs/finetune.py "
                       f"--workdir WORKDIR --config.data.dataset=llava --config.data.annotation_file={out}/train.json "
                       f"--config.data.image_root={out} --config.data.tokenizer={out}/tokenizer "
                       f"--config.stage1.data.annotation_file={out}/pretrain.json "
                       f"--config.stage1.data.image_root={out} "
                       f"--config.data.eval_files=validation={out}/validation.json\n")
    log(f"wrote scikit-learn's digits in LLaVA format to {out}: "
        + ", ".join(f"{k} {len(v)} images" for k, v in parts.items()))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Converts scikit-learn's handwritten digits to LLaVA format.")
    parser.add_argument("--out", default="~/qtl_data/digits", help="folder to write (default: %(default)s)")
    args = parser.parse_args(argv)
    print(open(os.path.join(build(args.out), "README.txt")).read(), end="")


if __name__ == "__main__":
    main()
