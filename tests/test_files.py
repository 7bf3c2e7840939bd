"""Atomic writes: the target holds the old content or the new one, never a part; no temporary file stays."""

import json
import os

import pytest

from qtl_jax import files


def test_write_json_and_text_replace_the_file_and_leave_nothing_else(tmp_path):
    path = tmp_path / "sub" / "a.json"  # the folder is created
    files.write_json(str(path), {"x": [1, 2.5], "y": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"x": [1, 2.5], "y": "é"}
    assert path.read_text() == '{\n  "x": [\n    1,\n    2.5\n  ],\n  "y": "\\u00e9"\n}'
    files.write_text(str(path), "new\r\n", newline="")
    assert path.read_bytes() == b"new\r\n"
    assert os.listdir(path.parent) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), files.atomic_open(str(path)) as f:
        f.write("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(KeyboardInterrupt), files.atomic_path(str(path)) as tmp:
        open(tmp, "wb").write(b"partial")
        raise KeyboardInterrupt
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_nested_writers_of_one_target_get_their_own_temporary_files(tmp_path):
    path = str(tmp_path / "a.bin")
    with files.atomic_open(path, "wb") as first, files.atomic_open(path, "wb") as second:
        assert first.name != second.name
        first.write(b"first")
        second.write(b"second")
    assert open(path, "rb").read() == b"first"  # the outer block ends last
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"), files.atomic_open(path, "a"):
        pass
