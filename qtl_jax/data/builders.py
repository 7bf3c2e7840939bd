"""tensorflow-datasets builders (array_record, no TensorFlow needed): the built-in Shapes-VQA dataset and any
LLaVA-format dataset (SPEC §5).

Both write records of the same shape, so one pipeline reads either:
  id            Text, the sample id
  image         uint8[None] encoded image file bytes (PNG for Shapes-VQA, the original file for LLaVA data);
                empty for text-only samples
  conversations Text, the LLaVA turns as JSON
  question_type Text ("caption", "color", ... for Shapes-VQA; "" for LLaVA data)

`prepare_shapes(data_dir, config)` generates Shapes-VQA once (cached in data_dir) and writes its word-level
tokenizer beside it. `prepare_llava(data_dir, annotation_file, image_root)` converts user data.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from qtl_jax.data import shapes
from qtl_jax.data.templates import TEMPLATE_WORDS, BadSample, format_prompt

ON_BAD_SAMPLE = ("fail", "skip")


def _features():
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
        "conversations": tfds.features.Text(),
        "question_type": tfds.features.Text(),
    })


def encode_png(pixels: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return np.frombuffer(buffer.getvalue(), np.uint8)


# --------------------------------------------------------------------------------------------- Shapes-VQA
@dataclasses.dataclass
class ShapesVqaConfig(tfds.core.BuilderConfig):
    """Sizes of one Shapes-VQA variant (its name and version identify the generated files)."""

    image_size: int = 64
    num_qa: int = 20_000
    num_captions: int = 5_000
    num_eval: int = 1_000


SHAPES_CONFIGS = {
    "tiny": ShapesVqaConfig(name="tiny", description="48 px, 20k QA + 5k captions, 1k validation/test",
                            image_size=48, num_qa=20_000, num_captions=5_000, num_eval=1_000),
    "smoke": ShapesVqaConfig(name="smoke", description="48 px, 64 QA + 32 captions, 16 validation/test (tests)",
                             image_size=48, num_qa=64, num_captions=32, num_eval=16),
    "paper_size": ShapesVqaConfig(name="paper_size", description="384 px images (the paper's SigLIP input)",
                                  image_size=384, num_qa=20_000, num_captions=5_000, num_eval=1_000),
}
SPLIT_SEEDS = {"pretrain": 0, "train": 1, "validation": 2, "test": 3}


def split_samples(config: ShapesVqaConfig, split: str) -> list[shapes.Sample]:
    """The scenes and questions of one split of a Shapes-VQA variant (what its records were rendered from)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"Shapes-VQA split must be one of {tuple(SPLIT_SEEDS)}, got {split!r}")
    num_qa = {"pretrain": 0, "train": config.num_qa}.get(split, config.num_eval)
    num_captions = config.num_captions if split == "pretrain" else 0
    return shapes.generate_samples(split, SPLIT_SEEDS[split], num_qa, num_captions)


def _split_samples(config: ShapesVqaConfig) -> dict[str, list[shapes.Sample]]:
    return {split: split_samples(config, split) for split in SPLIT_SEEDS}


class ShapesVqa(tfds.core.GeneratorBasedBuilder):
    """The built-in dataset: rendered shapes with captions (split `pretrain`) and QA (`train`, `validation`,
    `test`); see `qtl_jax.data.shapes`. Its metadata holds chance and majority baselines per question type."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release.",
                                               "1.1.0": "tiny and smoke render at 48 px (16 px grid cells)."}
    BUILDER_CONFIGS: ClassVar[list] = list(SHAPES_CONFIGS.values())

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=_features(),
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager
        samples = _split_samples(self.builder_config)
        self.info.metadata["baselines"] = shapes.baselines(samples["train"], samples["test"] or samples["train"])
        self.info.metadata["image_size"] = self.builder_config.image_size
        # tfds cannot write an empty split: a config without captions simply has no `pretrain` split.
        return {split: self._generate_examples(split, items) for split, items in samples.items() if items}

    def _generate_examples(self, split: str, samples: list[shapes.Sample]):
        size = self.builder_config.image_size
        for i, sample in enumerate(samples):
            pixels = shapes.render(sample.objects, size, np.random.default_rng([SPLIT_SEEDS[split], i]))
            yield sample.uid, {"id": sample.uid, "image": encode_png(pixels),
                               "conversations": json.dumps(sample.conversations()),
                               "question_type": sample.question_type}


def shapes_vocabulary() -> list[str]:
    """Every word Shapes-VQA and the templates can produce (fixed by the generator, not by the data)."""
    from qtl_jax.data.tokenizer import split_words

    texts = [*TEMPLATE_WORDS, *shapes.QUESTION_WORDS, *shapes.COLORS, *shapes.SHAPES, *shapes.SIZES,
             *shapes.ROWS, *shapes.COLUMNS, *shapes.COUNT_WORDS, "yes no",
             *(shapes.position_phrase(r, c) for r in range(3) for c in range(3))]
    return sorted({word for text in texts for word in split_words(text)})


def prepare_shapes(data_dir: str, config: str | ShapesVqaConfig = "tiny"):
    """Generates Shapes-VQA into `data_dir` unless it is there already, and its tokenizer.

    Returns:
      (builder, tokenizer folder). `builder.as_data_source()[split]` gives random access to the records.
    """
    from qtl_jax.data.tokenizer import build_word_tokenizer

    builder = ShapesVqa(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare()
    tokenizer_dir = os.path.join(builder.data_dir, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        build_word_tokenizer(shapes_vocabulary(), tokenizer_dir)
    return builder, tokenizer_dir


# ----------------------------------------------------------------------------------------------- LLaVA
@dataclasses.dataclass
class LlavaConfig(tfds.core.BuilderConfig):
    """A LLaVA-format dataset: annotation file (JSON list or JSONL) and the folder its image paths are in."""

    annotation_file: str = ""
    image_root: str = ""
    on_bad_sample: str = "fail"


def read_annotations(path: str) -> list[dict]:
    """The samples of a LLaVA JSON (a list) or JSONL (one object per line) file; errors name file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadSample(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadSample(f"{path}:{number}: malformed JSON line ({e.msg})") from e
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or "conversations" not in record:
            raise BadSample(f"{path}: sample {number} ({str(record)[:60]}) has no 'conversations'")
    return records


class LlavaFormat(tfds.core.GeneratorBasedBuilder):
    """Any LLaVA-format dataset (LLaVA-Pretrain 558k, LLaVA-v1.5 mix665k, your own) as one `train` split.

    Bad samples (missing or unreadable image, conversation without an answer, unknown role) fail the build
    with a message naming the file and sample id, or, with `on_bad_sample="skip"`, are left out and counted
    in `info.metadata["skipped"]`.
    """

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass annotation_file and image_root in the LlavaConfig (local files only)."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=_features(),
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        if cfg.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {cfg.on_bad_sample!r}")
        records = read_annotations(cfg.annotation_file)
        good, skipped = [], []
        for number, record in enumerate(records, 1):
            sample_id = str(record.get("id", f"#{number}"))
            try:
                good.append(self._example(record, sample_id))
            except BadSample as e:
                if cfg.on_bad_sample == "fail":
                    raise BadSample(f"{cfg.annotation_file}: {e}") from e
                skipped.append(str(e))
        self.info.metadata["skipped"] = len(skipped)
        self.info.metadata["skipped_reasons"] = skipped[:100]
        self.info.metadata["samples"] = len(good)
        return {"train": self._generate_examples(good)}

    def _generate_examples(self, examples):
        yield from examples

    def _example(self, record: dict, sample_id: str):
        cfg = self.builder_config
        conversations = record["conversations"]
        format_prompt(conversations, "llama", sample_id)  # roles, answers, image placement
        image = np.zeros((0,), np.uint8)
        if record.get("image"):
            path = os.path.join(cfg.image_root, record["image"])
            if not os.path.isfile(path):
                raise BadSample(f"sample {sample_id}: image file {path!r} does not exist")
            with open(path, "rb") as f:
                data = f.read()
            from qtl_jax.data.preprocess import load_image

            load_image(data, f"{sample_id} ({path})")  # refuse corrupt files now, not mid-training
            image = np.frombuffer(data, np.uint8)
        return sample_id, {"id": sample_id, "image": image, "conversations": json.dumps(conversations),
                           "question_type": ""}


def prepare_llava(data_dir: str, annotation_file: str, image_root: str, on_bad_sample: str = "fail",
                  name: str | None = None):
    """Converts a LLaVA-format dataset into array_record files under `data_dir`; returns the builder."""
    name = name or os.path.splitext(os.path.basename(annotation_file))[0].replace(".", "_").lower()
    config = LlavaConfig(name=name, annotation_file=os.path.abspath(annotation_file),
                         image_root=os.path.abspath(image_root), on_bad_sample=on_bad_sample)
    builder = LlavaFormat(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare()
    return builder
