"""tfds builders: Shapes-VQA records and metadata; LLaVA-format data with every kind of bad input."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from qtl_jax.data import builders, shapes
from qtl_jax.data.templates import BadSample
from qtl_jax.data.tokenizer import load_tokenizer

from .conftest import SMALL


def test_shapes_builder_records_metadata_and_tokenizer(small_shapes):
    builder, tokenizer_dir = small_shapes
    sources = builder.as_data_source()
    assert {k: len(v) for k, v in sources.items()} == {"pretrain": 24, "train": 80, "validation": 20, "test": 20}
    record = sources["train"][0]
    conv = json.loads(record["conversations"])
    assert conv[0]["value"].startswith("<image>\n") and conv[1]["from"] == "gpt"
    image = np.asarray(Image.open(io.BytesIO(bytes(record["image"]))))
    assert image.shape == (32, 32, 3)
    # The record is the generator's sample, rendered with the split's seed: regenerate and compare.
    samples = {s.uid: s for s in builders.split_samples(SMALL, "train")}
    uid = record["id"].decode()
    index = int(uid.rsplit("-", 1)[1])
    np.testing.assert_array_equal(image, shapes.render(samples[uid].objects, 32, np.random.default_rng([1, index])))
    for split, source in sources.items():  # every split's records are its split_samples, one to one
        expected = {x.uid: x.to_json() for x in builders.split_samples(SMALL, split)}
        got = {r["id"].decode(): json.dumps({"id": r["id"].decode(), "conversations": json.loads(r["conversations"])})
               for r in (source[i] for i in range(len(source)))}
        assert got == expected
    with pytest.raises(ValueError, match="split must be one of"):
        builders.split_samples(SMALL, "val")
    baselines = builder.info.metadata["baselines"]
    assert set(baselines) == set(shapes.QUESTION_TYPES)
    assert baselines["exists"]["chance"] == 0.5
    tok = load_tokenizer(tokenizer_dir)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 0)
    ids = tok.tokenize("what color is the circle?")[0]
    assert len(ids) == 6 and 0 not in ids


def test_shapes_builder_is_cached(small_shapes, tmp_path):
    builder, _ = small_shapes
    again, _ = builders.prepare_shapes(str(builder._data_dir_root), SMALL)
    assert again.data_dir == builder.data_dir


def _png(color=(255, 0, 0)):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _llava(tmp_path, records, jsonl=False, extra_lines=()):
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    (tmp_path / "images" / "a.png").write_bytes(_png())
    (tmp_path / "images" / "bad.jpg").write_bytes(b"\xff\xd8 corrupt")
    path = tmp_path / ("data.jsonl" if jsonl else "data.json")
    if jsonl:
        path.write_text("\n".join([json.dumps(r) for r in records] + list(extra_lines)))
    else:
        path.write_text(json.dumps(records))
    return path


GOOD = {"id": "ok1", "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}
TEXT_ONLY = {"id": "txt", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello"}]}


@pytest.mark.parametrize("jsonl", [False, True])
def test_llava_builder(tmp_path, jsonl):
    path = _llava(tmp_path, [GOOD, TEXT_ONLY], jsonl)
    builder = builders.prepare_llava(str(tmp_path / "tfds"), str(path), str(tmp_path / "images"))
    source = builder.as_data_source()["train"]
    records = {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}
    assert set(records) == {"ok1", "txt"}
    assert bytes(records["ok1"]["image"]) == _png() and len(records["txt"]["image"]) == 0
    assert json.loads(records["txt"]["conversations"])[1]["value"] == "Hello"
    assert builder.info.metadata["skipped"] == 0


BAD = [
    ({"id": "b1", "image": "missing.png", "conversations": GOOD["conversations"]}, "sample b1: image file .*missing"),
    ({"id": "b2", "image": "bad.jpg", "conversations": GOOD["conversations"]}, "sample b2 .*cannot decode"),
    ({"id": "b3", "conversations": [{"from": "human", "value": "<image>\nQ?"}]}, "sample b3: .*without an answer"),
    ({"id": "b4", "conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]},
     "sample b4: .*role 'bot'"),
    ({"id": "b5", "conversations": []}, "sample b5: empty conversation"),
]


@pytest.mark.parametrize(("record", "message"), BAD, ids=[r["id"] for r, _ in BAD])
def test_llava_bad_sample_fails_naming_file_and_sample(tmp_path, record, message):
    path = _llava(tmp_path, [GOOD, record])
    with pytest.raises(BadSample, match=f"{path.name}: {message}"):
        builders.prepare_llava(str(tmp_path / "tfds"), str(path), str(tmp_path / "images"))


def test_llava_skip_counts_bad_samples(tmp_path, capsys):
    path = _llava(tmp_path, [GOOD] + [r for r, _ in BAD])
    builder = builders.prepare_llava(str(tmp_path / "tfds"), str(path), str(tmp_path / "images"),
                                     on_bad_sample="skip")
    assert len(builder.as_data_source()["train"]) == 1
    assert builder.info.metadata["skipped"] == len(BAD) and builder.info.metadata["samples"] == 1
    assert any("b4" in reason for reason in builder.info.metadata["skipped_reasons"])
    out = capsys.readouterr().out
    assert "1 samples converted, 5 skipped" in out and "sample b1: image file" in out
    assert "Downloading and preparing" not in out  # tfds's message for downloads: we download nothing


def test_llava_builder_streams_in_file_order_across_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(builders, "SAMPLES_PER_SHARD", 3)
    records = [dict(GOOD, id=f"s{i}", question_type="count" if i % 2 else "") for i in range(8)]
    records.insert(4, {"id": "bad", "image": "missing.png", "conversations": GOOD["conversations"]})
    path = _llava(tmp_path, records)
    builder = builders.prepare_llava(str(tmp_path / "tfds"), str(path), str(tmp_path / "images"), "skip")
    source = builder.as_data_source()["train"]
    assert [source[i]["id"].decode() for i in range(len(source))] == [f"s{i}" for i in range(8)]
    assert [source[i]["question_type"].decode() for i in range(3)] == ["", "count", ""]
    assert len(builder.info.splits["train"].shard_lengths) == 3  # 9 samples, 3 per shard; one was skipped


def test_llava_cache_is_keyed_on_the_file_and_image_folder(tmp_path, capsys):
    first = _llava(tmp_path / "one", [GOOD])
    second = _llava(tmp_path / "two", [GOOD, TEXT_ONLY])  # same file name, other folder, other content
    data_dir = str(tmp_path / "tfds")
    a = builders.prepare_llava(data_dir, str(first), str(tmp_path / "one" / "images"))
    b = builders.prepare_llava(data_dir, str(second), str(tmp_path / "two" / "images"))
    assert len(a.as_data_source()["train"]) == 1 and len(b.as_data_source()["train"]) == 2
    capsys.readouterr()
    again = builders.prepare_llava(data_dir, str(second), str(tmp_path / "two" / "images"))
    assert "reusing the converted copy" in capsys.readouterr().out and again.data_dir == b.data_dir
    second.write_text(json.dumps([GOOD, TEXT_ONLY, dict(GOOD, id="new")]))  # edited: converted anew
    assert len(builders.prepare_llava(data_dir, str(second), str(tmp_path / "two" / "images"))
               .as_data_source()["train"]) == 3
