"""All tensors of a checkpoint under their stored names, across files, unread."""

from __future__ import annotations

from pathlib import Path

import torch

from leangen.checkpoint._files import CheckpointPath, resolve_files
from leangen.checkpoint._formats import FileReader, open_file
from leangen.errors import CheckpointError


class RawCheckpoint:
    """Stored names to (file, shape, dtype); tensors come from the mmap on request."""

    def __init__(self, readers: list[FileReader], config: dict | None):
        self.config = config
        self.files: tuple[Path, ...] = tuple(r.path for r in readers)
        self._owner: dict[str, FileReader] = {}
        self._meta: dict[str, tuple[torch.Size, torch.dtype]] = {}
        for reader in readers:
            for name, meta in reader.entries().items():
                if name in self._owner:
                    raise CheckpointError(
                        f"tensor '{name}' is stored twice: in {self._owner[name].path} and in "
                        f"{reader.path}. Pass only one checkpoint's files."
                    )
                self._owner[name] = reader
                self._meta[name] = meta
        if not self._owner:
            raise CheckpointError(f"{', '.join(map(str, self.files))}: holds no tensors.")

    def names(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> torch.Size:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def file_of(self, name: str) -> Path:
        return self._owner[name].path

    def tensor(self, name: str) -> torch.Tensor:
        return self._owner[name].tensor(name)

    def slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) ``[start, stop)`` as a view of the mmap.

        Only the pages under the slice are ever read, so a tensor-parallel rank that
        copies its shard to its device touches nothing else of the file.
        """
        size = self.shape(name)[dim]
        if not 0 <= start <= stop <= size:
            raise IndexError(f"slice [{start}:{stop}] out of range for '{name}' (dim {dim} has {size}).")
        return self.tensor(name).narrow(dim, start, stop - start)


def open_raw(checkpoint: CheckpointPath) -> RawCheckpoint:
    found = resolve_files(checkpoint)
    return RawCheckpoint([open_file(f) for f in found.files], found.config)
