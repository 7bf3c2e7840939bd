"""LLaVA annotation files read as a stream: every sample exactly once, across chunk boundaries, with errors that
name the file, line and sample."""

import json

import pytest

from qtl_jax.data import annotations
from qtl_jax.data.annotations import iter_annotations
from qtl_jax.data.templates import BadSample

TRICKY = [
    {"id": "a", "conversations": [{"from": "human", "value": "brackets ] [ } { and \"quotes\" \\ , inside"}]},
    {"id": 7, "image": "x.png", "conversations": [{"from": "gpt", "value": "ünïcødé 你好 " * 20}]},
    {"id": "c", "conversations": []},
]


@pytest.mark.parametrize("chunk", [1, 3, 17, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_json_list_is_parsed_exactly_whatever_the_chunk_size(tmp_path, monkeypatch, chunk, indent):
    monkeypatch.setattr(annotations, "CHUNK_CHARS", chunk)
    path = tmp_path / "a.json"
    path.write_text(json.dumps(TRICKY * 5, indent=indent, ensure_ascii=False), encoding="utf-8")
    got = list(iter_annotations(str(path)))
    assert [a.record for a in got] == TRICKY * 5
    assert [a.number for a in got] == list(range(1, 16)) and not any(a.error for a in got)
    assert got[1].sample_id == "7"


def test_jsonl_and_empty_list(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TRICKY) + "\n\n")
    assert [a.record for a in iter_annotations(str(path))] == TRICKY
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert list(iter_annotations(str(tmp_path / "empty.json"))) == []


@pytest.mark.parametrize("chunk", [4, 1 << 20])
def test_malformed_files(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(annotations, "CHUNK_CHARS", chunk)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(TRICKY[0]) + '\n{"id": "x", "conversations": [}\n[1, 2]\n')
    got = list(iter_annotations(str(path)))
    assert not got[0].error and got[0].record == TRICKY[0]
    assert "data.jsonl:2: malformed JSON line" in got[1].error
    assert "data.jsonl:3: sample 3 ([1, 2]) is not an object with a 'conversations' list" in got[2].error
    assert got[2].sample_id == "#3"
    (tmp_path / "broken.json").write_text('[\n  {"id": 1, "conversations": []},\n  {"id": 2,}\n]')
    with pytest.raises(BadSample, match=r"broken\.json: malformed JSON at line 3 column 12"):
        list(iter_annotations(str(tmp_path / "broken.json")))
    (tmp_path / "comma.json").write_text('[{"id": 1, "conversations": []},]')  # json.loads: column 33 too
    with pytest.raises(BadSample, match=r"comma\.json: malformed JSON at line 1 column 33: Expecting value"):
        list(iter_annotations(str(tmp_path / "comma.json")))
    (tmp_path / "open.json").write_text('[{"id": 1, "conversations": []}')
    with pytest.raises(BadSample, match=r"open\.json: malformed JSON .* the list is not closed"):
        list(iter_annotations(str(tmp_path / "open.json")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_annotations(str(tmp_path / "nope.json")))


def test_a_sample_larger_than_the_bound_is_an_error_not_a_memory_blowup(tmp_path, monkeypatch):
    monkeypatch.setattr(annotations, "CHUNK_CHARS", 8)
    monkeypatch.setattr(annotations, "MAX_SAMPLE_CHARS", 64)
    (tmp_path / "big.json").write_text(json.dumps([{"id": 1, "conversations": [], "pad": "x" * 500}]))
    with pytest.raises(BadSample, match=r"big\.json: malformed JSON at line 1 column 2: sample 1 is longer than 64"):
        list(iter_annotations(str(tmp_path / "big.json")))


def test_values_cut_by_a_chunk_boundary_and_wrong_types_are_per_sample_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(annotations, "CHUNK_CHARS", 2)
    (tmp_path / "a.json").write_text('[12345, {"conversations": {"from": "human"}}, {"image": ["a.png", "b.png"], '
                                     '"conversations": []}, {"conversations": []}]')
    got = list(iter_annotations(str(tmp_path / "a.json")))
    assert next(a.record for a in got) == 12345 and not got[3].error  # 12345, not 12 then a syntax error
    assert "sample 1 (12345) is not an object with a 'conversations' list" in got[0].error
    assert "sample 2" in got[1].error and "'conversations' list" in got[1].error
    assert "sample 3: 'image' must be one relative path" in got[2].error
