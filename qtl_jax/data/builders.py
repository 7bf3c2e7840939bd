"""tensorflow-datasets builders (array_record, no TensorFlow needed): the built-in Shapes-VQA dataset and any
LLaVA-format dataset (SPEC §5).

Both write records of the same shape, so one pipeline reads either:
  id            Text, the sample id
  image         uint8[None] encoded image file bytes (PNG for Shapes-VQA, the original file for LLaVA data);
                empty for text-only samples
  conversations Text, the LLaVA turns as JSON
  question_type Text ("caption", "color", ... for Shapes-VQA; a LLaVA record's "question_type" or
                "category" field when it has one, for per-type scores; else "")

`prepare_shapes(data_dir, config)` generates Shapes-VQA once (cached in data_dir) and writes its word-level
tokenizer beside it. `prepare_llava(data_dir, annotation_file, image_root)` converts user data once (streamed:
bounded memory for any file size) and reuses the conversion while the file and image folder are unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from qtl_jax.data import shapes
from qtl_jax.data.annotations import iter_annotations
from qtl_jax.data.templates import TEMPLATE_WORDS, BadSample, format_prompt

ON_BAD_SAMPLE = ("fail", "skip")
# Datasets the project makes itself (config.data.dataset), besides "llava" (the user's files): Shapes-VQA,
# rendered here, and scikit-learn's handwritten digits converted to LLaVA format (qtl_jax.data.digits).
BUILT_IN = ("shapes", "digits")


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


@contextlib.contextmanager
def _quiet_tfds():
    """tfds logs warnings for what we do on purpose (a custom builder config; looking for a dataset that is
    not prepared yet): hide them while a builder is made and checked."""
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(level)


class _QuietBuilder:
    """tfds prints "Downloading and preparing dataset ..." for every build; ours download nothing (the
    builders say themselves what they do)."""

    def _log_download_bytes(self):
        pass

    def _log_download_done(self):
        pass


class ShapesVqa(_QuietBuilder, tfds.core.GeneratorBasedBuilder):
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


def prepare_shapes(data_dir: str, config: str | ShapesVqaConfig = "tiny", log=print):
    """Generates Shapes-VQA into `data_dir` unless it is there already, and its tokenizer.

    Returns:
      (builder, tokenizer folder). `builder.as_data_source()[split]` gives random access to the records.
    """
    from qtl_jax.data.tokenizer import build_word_tokenizer

    with _quiet_tfds():
        builder = ShapesVqa(data_dir=data_dir, config=config, file_format="array_record")
        prepared = builder.is_prepared()
    if not prepared:
        log(f"Shapes-VQA {builder.builder_config.name!r}: generating into {builder.data_dir} (once)")
        builder.download_and_prepare()
    tokenizer_dir = os.path.join(builder.data_dir, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        build_word_tokenizer(shapes_vocabulary(), tokenizer_dir)
    return builder, tokenizer_dir


# ----------------------------------------------------------------------------------------------- LLaVA
SAMPLES_PER_SHARD = 1000  # tfds holds one shard's samples in memory while writing it: this bounds the memory


@dataclasses.dataclass
class LlavaConfig(tfds.core.BuilderConfig):
    """A LLaVA-format dataset: annotation file (JSON list or JSONL) and the folder its image paths are in."""

    annotation_file: str = ""
    image_root: str = ""
    on_bad_sample: str = "fail"
    template: str = "llama"  # the samples are checked against it (pretrain: one caption each)


class LlavaFormat(_QuietBuilder, tfds.core.ShardBasedBuilder):
    """Any LLaVA-format dataset (LLaVA-Pretrain 558k, LLaVA-v1.5 mix665k, your own) as one `train` split.

    The annotation file is streamed (`qtl_jax.data.annotations`) and written shard by shard in file order
    (`SAMPLES_PER_SHARD` samples each), so memory does not grow with the dataset. Bad samples (missing or
    unreadable image, conversation without an answer, unknown role, malformed JSONL line) fail the build with
    a message naming the file and sample id, or, with `on_bad_sample="skip"`, are left out, counted in
    `info.metadata["skipped"]` (the first 100 reasons in `skipped_reasons`) and reported when the build ends.
    The pipeline shuffles at read time, so the file order on disk does not matter.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release.",
                                               "1.1.0": "Streamed, in file order; question_type from the record."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=_features(),
                                     metadata=tfds.core.MetadataDict())

    def _shard_iterators_per_split(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        if cfg.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {cfg.on_bad_sample!r}")
        total = sum(1 for _ in iter_annotations(cfg.annotation_file))  # a first, cheap pass: no images
        if not total:
            raise BadSample(f"{cfg.annotation_file}: the annotation file holds no samples")
        self._counts = {"samples": 0, "skipped": 0, "skipped_reasons": []}
        self._stream = self._examples()
        shards = -(-total // SAMPLES_PER_SHARD)
        return {"train": [lambda: itertools.islice(self._stream, SAMPLES_PER_SHARD)] * shards}

    def _download_and_prepare(self, dl_manager, download_config=None):
        try:
            super()._download_and_prepare(dl_manager, download_config)
        finally:
            if getattr(self, "_stream", None) is not None:
                self._stream.close()  # the annotation file, if the last shard stopped before its end
        counts = self._counts
        if not counts["samples"]:
            raise BadSample(f"{self.builder_config.annotation_file}: no usable sample "
                            f"({counts['skipped']} skipped: {counts['skipped_reasons'][:3]})")
        self.info.metadata.update(counts)

    def _examples(self):
        """(key, example) of every good sample in file order; bad ones fail or are counted."""
        cfg = self.builder_config
        counts = self._counts
        for annotation in iter_annotations(cfg.annotation_file):
            try:
                if annotation.error:
                    raise BadSample(annotation.error)
                example = self._example(annotation.record, annotation.sample_id)
            except BadSample as e:
                reason = str(e) if str(e).startswith(cfg.annotation_file) else f"{cfg.annotation_file}: {e}"
                if cfg.on_bad_sample == "fail":
                    raise BadSample(reason) from e
                counts["skipped"] += 1
                if len(counts["skipped_reasons"]) < 100:
                    counts["skipped_reasons"].append(reason)
                continue
            counts["samples"] += 1
            yield annotation.number, example

    def _example(self, record: dict, sample_id: str) -> dict:
        cfg = self.builder_config
        conversations = record["conversations"]
        format_prompt(conversations, cfg.template, sample_id)  # roles, answers, image placement
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
        question_type = record.get("question_type", record.get("category", ""))
        return {"id": sample_id, "image": image, "conversations": json.dumps(conversations),
                "question_type": str(question_type or "")}


def llava_cache_name(annotation_file: str, image_root: str, on_bad_sample: str, template: str = "llama") -> str:
    """The converted dataset's name: the annotation file's stem plus a hash of everything that decides its
    records (the file's full path, size and modification time, the image folder, the bad-sample policy, the
    template samples are checked against), so another file of the same name, an edited file or another image
    folder is converted anew."""
    stat = os.stat(annotation_file)
    key = json.dumps([os.path.abspath(annotation_file), stat.st_size, stat.st_mtime_ns,
                      os.path.abspath(image_root), on_bad_sample, template])
    stem = re.sub(r"[^a-z0-9_]", "_", os.path.splitext(os.path.basename(annotation_file))[0].lower())
    return f"{stem}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def prepare_llava(data_dir: str, annotation_file: str, image_root: str, on_bad_sample: str = "fail",
                  log=print, template: str = "llama"):
    """Converts a LLaVA-format dataset into array_record files under `data_dir` once; returns the builder.

    Image paths in the file are relative to `image_root`; samples are checked against `template` (the stage's).
    A later call with the same file (path, size and modification time), image folder, policy and template
    reuses the converted copy and says so through `log`.
    """
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"annotation file {annotation_file!r} does not exist")
    config = LlavaConfig(name=llava_cache_name(annotation_file, image_root, on_bad_sample, template),
                         annotation_file=os.path.abspath(annotation_file), image_root=os.path.abspath(image_root),
                         on_bad_sample=on_bad_sample, template=template)
    with _quiet_tfds():
        builder = LlavaFormat(data_dir=data_dir, config=config, file_format="array_record")
        prepared = builder.is_prepared()
    if prepared:
        log(f"{annotation_file}: reusing the converted copy in {builder.data_dir} "
            f"({builder.info.metadata.get('samples')} samples, {builder.info.metadata.get('skipped')} skipped)")
        return builder
    log(f"{annotation_file}: converting to array_record in {builder.data_dir} (once)")
    builder.download_and_prepare()
    meta = builder.info.metadata
    more = f"\n  ... {meta['skipped'] - 5} more in {builder.data_dir}/dataset_info.json" if meta["skipped"] > 5 else ""
    log(f"{annotation_file}: {meta['samples']} samples converted, {meta['skipped']} skipped"
        + "".join(f"\n  skipped: {r}" for r in meta["skipped_reasons"][:5]) + more)
    return builder
