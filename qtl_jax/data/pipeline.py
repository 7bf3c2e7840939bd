"""The input pipeline: tfds array_record data source -> grain -> fixed-shape batches (SPEC §5).

Per record: decode the image (PIL) and resize it as SigLIP's processor does, tokenize the conversation
with the template (IMAGE_TOKEN_INDEX marks the image), then batch. Batches are padded to the smallest of a
few fixed text lengths (`buckets`) that fits their longest sample, so a run compiles once per bucket. The
image is not expanded here: the model splices its N feature rows in place of the one placeholder
(`qtl_jax.models.tinyllava.splice`), which keeps the uplink free of N - 1 dummy text rows; `image_tokens`
only enters the length budget (`max_length` counts the N image rows).

grain provides the seeded shuffle, per-host sharding (`shard_index` / `shard_count`, default the JAX process),
optional worker processes and an iterator whose `get_state()` / `set_state()` restore the exact position:
a restored iterator yields exactly the batches the uninterrupted one would. With worker processes each
worker batches its own slice of the shuffled records, so batches differ from `worker_count=0` but are the
same on every run with the same worker count.

Batch: images uint8[B, S, S, 3], the resized pixels (`preprocess.resize_image`; the vision tower rescales and
normalises them on the device, so a batch crosses to the device in a quarter of the float32 bytes; zeros for
text-only samples, whose image rows the model never reads), input_ids int32[B, T],
attention_mask bool[B, T], labels int32[B, T] (-100 = not supervised), id str[B] (sample ids),
question_type str[B] (for per-type evaluation; "" for LLaVA data without one) and skipped str[B] (why a row
is empty: a skipped sample, with on_bad_sample="skip"; "" for real rows). Skipped samples keep their place as
empty rows, so the number of batches per epoch is len(source) // batch_size whatever is skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import grain.python as gp
import numpy as np

from qtl_jax.data.preprocess import load_image, resize_image
from qtl_jax.data.templates import IGNORE_INDEX, TEMPLATES, BadSample, encode

ON_BAD_SAMPLE = ("fail", "skip")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Attributes:
    template: "pretrain" (stage 1) or "llama" (stage 2).
    batch_size: per-host batch size.
    image_size: side of the preprocessed square images.
    image_tokens: feature rows per image in the model (728 paper, 9 tiny): counted against max_length.
    max_length: the model's sequence limit (text tokens + image rows).
    buckets: allowed padded text lengths, ascending; a sample longer than the largest is a bad sample.
    seed: shuffle seed.
    shuffle: shuffle the records (every epoch differently).
    num_epochs: passes over the data (None = forever).
    worker_count: grain worker processes (0 = in the main process).
    on_bad_sample: "fail" raises `BadSample` naming the sample; "skip" leaves an empty row in its place (no
      loss, excluded from the compressor statistics) and reports it in the batch's `skipped` field.
    drop_remainder: drop the last incomplete batch (keeps shapes static).
    """

    template: str = "llama"
    batch_size: int = 8
    image_size: int = 48
    image_tokens: int = 9
    max_length: int = 2048
    buckets: tuple[int, ...] = (32, 64, 128, 256)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    worker_count: int = 0
    on_bad_sample: str = "fail"
    drop_remainder: bool = True

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {self.on_bad_sample!r}")
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be ascending and distinct, got {self.buckets}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class _Encode(gp.MapTransform):
    """Record -> {image, input_ids, labels, id, question_type, bad}; `bad` holds the reason a sample is skipped."""

    def __init__(self, tokenizer_path: str, config: PipelineConfig):
        self.tokenizer_path = tokenizer_path
        self.config = config
        self._tokenizer = None

    def map(self, record):
        from qtl_jax.data.tokenizer import load_tokenizer

        cfg = self.config
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        sample_id = _text(record["id"])
        try:
            conversations = json.loads(_text(record["conversations"]))
            encoded = encode(conversations, self._tokenizer, cfg.template, cfg.max_length, sample_id,
                             cfg.image_tokens)
            if len(encoded.input_ids) > cfg.buckets[-1]:
                raise BadSample(f"sample {sample_id}: {len(encoded.input_ids)} text tokens exceed the largest "
                                f"bucket {cfg.buckets[-1]}")
            image = np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)
            if len(record["image"]):
                image = resize_image(load_image(bytes(record["image"]), sample_id), cfg.image_size)
        except BadSample as e:
            if cfg.on_bad_sample == "fail":
                raise
            # Skipped, but it keeps its place: collate turns it into an empty (fully padded) row, so the batch
            # shape and the number of steps stay as planned, and the reason travels with the batch.
            empty = np.zeros((0,), np.int32)
            return {"image": np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8), "input_ids": empty,
                    "labels": empty, "bad": str(e), "id": sample_id, "question_type": ""}
        return {"image": image, "input_ids": encoded.input_ids, "labels": encoded.labels, "bad": "",
                "id": sample_id, "question_type": _text(record.get("question_type", b""))}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def collate(elements, buckets: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Stacks encoded samples, right-padding text to the smallest bucket that fits the longest one; a skipped
    sample becomes an empty row (attention_mask all False, labels all -100) and its reason goes in `skipped`."""
    longest = max(len(e["input_ids"]) for e in elements)
    length = next(b for b in buckets if b >= longest)
    batch = len(elements)
    input_ids = np.zeros((batch, length), np.int32)
    labels = np.full((batch, length), IGNORE_INDEX, np.int32)
    mask = np.zeros((batch, length), bool)
    for i, e in enumerate(elements):
        n = len(e["input_ids"])
        input_ids[i, :n], labels[i, :n], mask[i, :n] = e["input_ids"], e["labels"], True
    return {"images": np.stack([e["image"] for e in elements]), "input_ids": input_ids,
            "attention_mask": mask, "labels": labels, "id": np.array([e["id"] for e in elements]),
            "question_type": np.array([e["question_type"] for e in elements]),
            "skipped": np.array([e["bad"] for e in elements])}


def make_loader(source, tokenizer_path: str, config: PipelineConfig, shard_index: int | None = None,
                shard_count: int | None = None) -> gp.DataLoader:
    """A grain DataLoader over a random-access source (e.g. `builder.as_data_source()["train"]`).

    Iterate it for batches; `it = iter(loader)`, `it.get_state()` / `it.set_state(state)` save and restore
    the position exactly.
    """
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} must be in [0, {shard_count})")
    sampler = gp.IndexSampler(
        num_records=len(source), shuffle=config.shuffle, seed=config.seed, num_epochs=config.num_epochs,
        shard_options=gp.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True),
    )
    operations = [_Encode(tokenizer_path, config),
                  gp.Batch(config.batch_size, drop_remainder=config.drop_remainder,
                           batch_fn=functools.partial(collate, buckets=config.buckets))]
    return gp.DataLoader(data_source=source, sampler=sampler, operations=operations,
                         worker_count=config.worker_count)
