"""Result files: written through a temp file beside the target and renamed into place.

The recipes check the folder before any work (``config.output_path``), add jsonl
lines as completions finish (each flushed whole, so Ctrl-C keeps them), and rename
once at the end. An old output file is replaced only when there is something to
replace it with.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator


class ResultFile:
    """``with ResultFile(path) as f: f.add_line(...)``. On an error or Ctrl-C the lines
    written so far are kept; if there are none, the old file stays as it was."""

    def __init__(self, path: Path):
        self.path = path
        fd, self._part = _new_part(path)
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        self.lines = 0

    def write(self, text: str) -> None:
        self._file.write(text)  # one write and a flush: the text is in the file whole or not at all
        self._file.flush()

    def add_line(self, text: str) -> None:
        self.write(text + "\n")
        self.lines += 1

    def close(self, *, keep: bool = True) -> None:
        self._file.close()
        if keep:
            os.replace(self._part, self.path)
        else:
            os.unlink(self._part)

    def __enter__(self) -> "ResultFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(keep=exc_type is None or self.lines > 0)


def write_result(path: Path, text: str) -> None:
    """A whole file at once, replaced atomically: ``path`` holds its old content or all of
    ``text``, never a part, even when the write fails or is interrupted."""
    with atomic_path(path) as part:
        Path(part).write_text(text, encoding="utf-8")


@contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """``with atomic_path(path) as part: <write the file part>``, by any writer (json,
    safetensors' ``save_file``): ``part`` is renamed over ``path`` when the block ends,
    and removed if it raises (Ctrl-C included), so ``path`` is never half-written."""
    fd, part = _new_part(path)
    os.close(fd)
    try:
        yield part
        os.replace(part, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(part)
        raise


def _new_part(path: Path) -> tuple[int, str]:
    """An empty temp file beside ``path`` (a rename across file systems would copy), with
    the mode ``path`` will have: mkstemp's 0600 would make the result private."""
    fd, part = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".part")
    os.fchmod(fd, _mode_for(path))
    return fd, part


def _mode_for(path: Path) -> int:
    """An existing file keeps its mode; a new one gets what open() would give it."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
