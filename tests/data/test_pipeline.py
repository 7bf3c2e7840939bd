"""grain pipeline: batch contents, buckets, seeded shuffle, per-host shards, exact resume, bad samples."""

import numpy as np
import pytest

from qtl_jax.data import pipeline
from qtl_jax.data.templates import BadSample
from qtl_jax.data.tokenizer import load_tokenizer

CFG = pipeline.PipelineConfig(batch_size=4, image_size=32, image_tokens=15, max_length=512, buckets=(32, 48, 64))


def _loader(small_shapes, split="train", shard=(0, 1), **overrides):
    builder, tokenizer_dir = small_shapes
    cfg = pipeline.PipelineConfig(**{**CFG.__dict__, **overrides})
    return pipeline.make_loader(builder.as_data_source()[split], tokenizer_dir, cfg, *shard)


def _ids(batches):
    return [list(b["id"]) for b in batches]


def _flat(batches_of_ids):
    return [i for ids in batches_of_ids for i in ids]


def test_batches(small_shapes):
    batches = list(_loader(small_shapes))
    assert len(batches) == 80 // 4
    tok = load_tokenizer(small_shapes[1])
    for b in batches:
        assert b["images"].shape == (4, 32, 32, 3) and b["images"].dtype == np.uint8  # normalised on device
        assert b["input_ids"].shape[1] in CFG.buckets and b["input_ids"].dtype == np.int32
        assert (b["input_ids"] == -200).sum(axis=1).tolist() == [1] * 4  # one placeholder per sample
        assert np.all(np.diff(b["attention_mask"].astype(int), axis=1) <= 0)  # right padding
        for ids, labels, qtype in zip(b["input_ids"], b["labels"], b["question_type"], strict=True):
            supervised = labels[labels != -100]
            assert supervised[-1] == tok.eos_id and len(supervised) == 2  # one-word answer + </s>
            assert qtype in ("color", "shape", "count", "position", "exists")
            assert ids[-1] == 0 or ids[-1] == tok.eos_id


def test_answers_decode_to_the_records(small_shapes):
    import json

    builder, tokenizer_dir = small_shapes
    tok = load_tokenizer(tokenizer_dir)
    source = builder.as_data_source()["train"]
    by_id = {source[i]["id"].decode(): json.loads(source[i]["conversations"]) for i in range(len(source))}
    b = next(iter(_loader(small_shapes)))
    for sample_id, labels in zip(b["id"], b["labels"], strict=True):
        answer = tok.decode(labels[labels != -100][:-1])
        assert answer == by_id[sample_id][1]["value"]


def test_images_are_the_resized_pixels_and_the_tower_sees_what_the_float_path_fed_it(small_shapes):
    import jax

    from qtl_jax.data.preprocess import load_image, preprocess_image, resize_image
    from qtl_jax.models.siglip import SiglipConfig, SiglipVisionTower

    builder, _ = small_shapes
    source = builder.as_data_source()["train"]
    records = {source[i]["id"].decode(): bytes(source[i]["image"]) for i in range(len(source))}
    b = next(iter(_loader(small_shapes, image_size=48)))  # resized: the records are 32 px
    for sample_id, image in zip(b["id"], b["images"], strict=True):
        np.testing.assert_array_equal(image, resize_image(load_image(records[sample_id]), 48))
    # The batch the pipeline used to make: float32 in [-1, 1] on the host (4x the bytes to the device).
    old = np.stack([preprocess_image(load_image(records[i]), 48) for i in b["id"]])
    assert b["images"].nbytes * 4 == old.nbytes
    tower = SiglipVisionTower(SiglipConfig(width=128, depth=4, num_heads=4, mlp_dim=256, patch_size=16,
                                           image_size=48, select="all"))
    params = tower.init(jax.random.key(0), b["images"])
    features = jax.jit(lambda images: tower.apply(params, images)[0])
    np.testing.assert_allclose(features(b["images"]), features(old), rtol=0, atol=1e-6)


def test_seeded_shuffle(small_shapes):
    a, b = _ids(_loader(small_shapes, seed=3)), _ids(_loader(small_shapes, seed=3))
    assert a == b and a != _ids(_loader(small_shapes, seed=4))
    assert sorted(_flat(a)) == sorted(_flat(_ids(_loader(small_shapes, shuffle=False))))


def test_shards_are_disjoint_and_cover(small_shapes):
    s0 = _flat(_ids(_loader(small_shapes, shard=(0, 2))))
    s1 = _flat(_ids(_loader(small_shapes, shard=(1, 2))))
    assert not set(s0) & set(s1) and len(s0) + len(s1) == 80


def test_restored_iterator_yields_exactly_the_same_batches(small_shapes):
    loader = _loader(small_shapes, num_epochs=2)
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(20)]  # crosses the epoch boundary
    resumed = iter(_loader(small_shapes, num_epochs=2))
    resumed.set_state(state)
    got = [next(resumed) for _ in range(20)]
    for x, y in zip(expected, got, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_worker_processes_are_deterministic_and_see_every_record(small_shapes):
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags in its workers
    a, b = _ids(_loader(small_shapes, worker_count=2)), _ids(_loader(small_shapes, worker_count=2))
    assert a == b  # each worker batches its own slice of the shuffled records: same batches every run
    assert sorted(_flat(a)) == sorted(_flat(_ids(_loader(small_shapes))))


def test_over_length_samples_fail_or_are_skipped(small_shapes):
    with pytest.raises(BadSample, match="text tokens exceed the largest bucket 20"):
        list(_loader(small_shapes, buckets=(20,)))
    # Captions are longer than questions: with a 24-token bucket some captions are skipped, none fail. A skipped
    # sample keeps its place as an empty row, so every batch is full and the batch count is len // batch.
    batches = list(_loader(small_shapes, split="pretrain", template="pretrain", buckets=(24,),
                           on_bad_sample="skip"))
    assert len(batches) == 24 // 4 and all(b["input_ids"].shape == (4, 24) for b in batches)
    skipped = [(b, i) for b in batches for i, reason in enumerate(b["skipped"]) if reason]
    assert 0 < len(skipped) < 24
    for b, i in skipped:
        assert "text tokens exceed the largest bucket 24" in b["skipped"][i] and b["id"][i] in b["skipped"][i]
        assert not b["attention_mask"][i].any() and (b["labels"][i] == -100).all() and not b["images"][i].any()
    kept = [(b, i) for b in batches for i, reason in enumerate(b["skipped"]) if not reason]
    assert all(b["attention_mask"][i].any() for b, i in kept)


def test_bad_config():
    with pytest.raises(ValueError, match="buckets must be ascending"):
        pipeline.PipelineConfig(buckets=(64, 32))
    with pytest.raises(ValueError, match="on_bad_sample must be one of"):
        pipeline.PipelineConfig(on_bad_sample="ignore")
