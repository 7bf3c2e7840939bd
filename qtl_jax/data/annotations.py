"""LLaVA-format annotation files, read as a stream (SPEC §5).

A file is a JSON list of samples or JSONL (one sample per line):
`{"id", "image": relative path (optional), "conversations": [{"from": "human"|"gpt", "value"}...]}`.
LLaVA-Pretrain (558k) and mix665k are single JSON lists of hundreds of MB; `iter_annotations` parses them one
sample at a time, so memory stays bounded by the largest sample whatever the file size.

Errors name the file: a JSON list with a syntax error cannot be read past it (`BadSample` with the line and
column); a malformed JSONL line (by line number), or a sample that is not an object with a "conversations"
list (by its position in the file), is reported per sample: the caller fails or skips it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

from qtl_jax.data.templates import BadSample

CHUNK_CHARS = 1 << 20  # read this many characters at a time
MAX_SAMPLE_CHARS = 64 << 20  # a sample larger than this is a malformed file, not a sample


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One sample of an annotation file.

    Attributes:
      number: 1-based position in the file (list index, or line number for JSONL).
      record: the parsed sample (a dict with "conversations" when `error` is empty).
      error: why the sample is unusable ("" when it is fine), naming file and position.
    """

    number: int
    record: Any
    error: str = ""

    @property
    def sample_id(self) -> str:
        if isinstance(self.record, dict) and self.record.get("id") is not None:
            return str(self.record["id"])
        return f"#{self.number}"


def _checked(path: str, number: int, record: Any) -> Annotation:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return Annotation(number, record, f"{path}: sample {number} ({str(record)[:60]}) is not an object with a "
                                          f"'conversations' list")
    if not isinstance(record.get("image") or "", str):
        return Annotation(number, record, f"{path}: sample {number}: 'image' must be one relative path, got "
                                          f"{record['image']!r} (one image per sample)")
    return Annotation(number, record)


def jsonl_lines(path: str, f):
    """(line number, parsed value, None) for each non-blank line of an open JSON-lines file, or (line number,
    None, error naming the file and line) for one that is not valid JSON."""
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as e:
            yield number, None, f"{path}:{number}: malformed JSON line ({e.msg})"


def iter_annotations(path: str) -> Iterator[Annotation]:
    """Streams the samples of a JSON-list or JSONL annotation file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path!r} does not exist")
    with open(path, encoding="utf-8-sig") as f:
        head = f.read(4096)
        f.seek(0)
        if head.lstrip().startswith("["):
            yield from _iter_json_list(path, f)
            return
        for number, record, error in jsonl_lines(path, f):
            yield Annotation(number, None, error) if error else _checked(f"{path}:{number}", number, record)


def _iter_json_list(path: str, f) -> Iterator[Annotation]:
    """Incremental parse of `[value, value, ...]`: holds one chunk plus the sample being parsed."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False
    line_base, column_base = 1, 0  # line number and 0-based column of buf[0]

    def fail(message: str, at: int):
        line = line_base + buf.count("\n", 0, at)
        newline = buf.rfind("\n", 0, at)
        column = (at - newline if newline >= 0 else column_base + at + 1)
        raise BadSample(f"{path}: malformed JSON at line {line} column {column}: {message}")

    def more(need_chars: int = CHUNK_CHARS) -> bool:
        nonlocal buf, pos, eof, line_base, column_base
        if eof:
            return False
        newlines = buf.count("\n", 0, pos)
        line_base += newlines
        column_base = pos - buf.rfind("\n", 0, pos) - 1 if newlines else column_base + pos
        buf = buf[pos:]
        pos = 0
        chunk = f.read(max(need_chars, CHUNK_CHARS))
        eof = not chunk
        buf += chunk
        return not eof

    def skip_space() -> str:
        """The next non-space character ("" at the end of the file), without consuming it."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not more():
                return ""

    if skip_space() != "[":
        fail("expected '['", pos)
    pos += 1
    number = 0
    if skip_space() == "]":
        return
    while True:
        number += 1
        while True:
            try:
                record, end = decoder.raw_decode(buf, pos)
                if end < len(buf) or eof:  # a value ending at the buffer's end (a number) may go on
                    break
                error = None
            except json.JSONDecodeError as e:
                error = e
            # Maybe the sample continues past the buffer: read more, unless it cannot be a sample.
            if len(buf) - pos > MAX_SAMPLE_CHARS:
                fail(f"sample {number} is longer than {MAX_SAMPLE_CHARS} characters", pos)
            shift = pos
            if not more(2 * (len(buf) - pos)):
                if error is None:
                    continue  # the file ended: the value is complete after all
                fail(error.msg, error.pos - shift)
        pos = end
        yield _checked(path, number, record)
        sep = skip_space()
        if sep == "]":
            return
        if sep != ",":
            fail(f"expected ',' or ']' after sample {number}" if sep else "the list is not closed", pos)
        pos += 1
        skip_space()
