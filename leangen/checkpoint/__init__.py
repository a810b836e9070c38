"""Checkpoint files: formats, file layouts, and a lazy view of stored tensors."""

from leangen.checkpoint._files import (
    DIRECTORY_LAYOUTS,
    CheckpointPath,
    read_config,
    read_json,
    resolve_files,
)
from leangen.checkpoint._formats import READERS, open_file
from leangen.checkpoint._store import RawCheckpoint, open_raw

__all__ = [
    "CheckpointPath", "DIRECTORY_LAYOUTS", "READERS", "RawCheckpoint",
    "open_file", "open_raw", "read_config", "read_json", "resolve_files",
]
