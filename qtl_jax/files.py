"""Atomic file writes: a reader (or a run resumed after a kill) sees the old file or the new one, never half of one.

Every file the project writes outside orbax goes through `atomic_path` or `atomic_open`: a fresh temporary file in
the target's folder (a unique name, so concurrent writers never share one), renamed onto the target with
`os.replace` once the writing is done, and removed if it fails. Secrets are the exception:
`split.remote.security` creates its files 0o600 from the start and syncs them to disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """`with atomic_path(path) as tmp: ...` yields a fresh temporary file name next to `path` for a writer that
    takes a file name (safetensors); when the block ends without an exception the file is renamed
    onto `path`, otherwise removed. The folder is created if missing."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO[Any]]:
    """`with atomic_open(path) as f: ...` writes `f` into `path` when the block ends without an exception (see
    `atomic_path`). `mode` is "w" or "wb"; `open_kwargs` go to `open` (encoding, newline)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
        yield f


def write_text(path: str, text: str, **open_kwargs) -> None:
    """`text` into `path`, atomically (UTF-8 unless `open_kwargs` say otherwise)."""
    with atomic_open(path, "w", **{"encoding": "utf-8", **open_kwargs}) as f:
        f.write(text)


def write_json(path: str, value: Any, indent: int | None = 2) -> None:
    """`value` as JSON into `path`, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=indent)
