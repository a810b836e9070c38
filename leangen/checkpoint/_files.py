"""Which files make up a checkpoint: a directory, one file, an index, or a list.

Directory layouts are tried in ``DIRECTORY_LAYOUTS`` order; the first that matches
wins, so a Llama 3 repo's HF safetensors are preferred over its ``original/`` or
any consolidated ``.pth`` next to them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from leangen.errors import CheckpointError

CheckpointPath = Union[str, Path, Sequence[Union[str, Path]]]

# Globs tried in order inside a checkpoint directory. An index file names its shards.
DIRECTORY_LAYOUTS = (
    "model.safetensors.index.json",
    "*.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model*.bin",
    "consolidated.*.pth",
    "*.pt",
    "*.bin",
    "*.pth",
)


@dataclass(frozen=True)
class CheckpointFiles:
    files: tuple[Path, ...]
    config: dict | None  # config.json (HF) or params.json (Meta) next to the files


def resolve_files(checkpoint: CheckpointPath) -> CheckpointFiles:
    paths = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else [Path(p) for p in checkpoint]
    if not paths:
        raise CheckpointError("checkpoint: an empty list of files was given.")
    files: list[Path] = []
    for path in paths:
        files.extend(_expand(path.expanduser()))
    if len([f for f in files if f.name.startswith("consolidated.")]) > 1:
        raise CheckpointError(
            f"{files[0].parent}: several consolidated.*.pth files are model-parallel shards "
            "of each tensor, which leangen does not merge. Use the HF-format files instead."
        )
    return CheckpointFiles(tuple(dict.fromkeys(files)), read_config(files[0].parent))


def _expand(path: Path) -> list[Path]:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint path does not exist. Check checkpoint.path.")
    if path.is_file():
        return _shards_of_index(path) if path.name.endswith(".index.json") else [path]
    for pattern in DIRECTORY_LAYOUTS:
        found = sorted(path.glob(pattern))
        if found:
            return _shards_of_index(found[0]) if pattern.endswith(".index.json") else found
    raise CheckpointError(
        f"{path}: no checkpoint files found (looked for {', '.join(DIRECTORY_LAYOUTS)})."
    )


def _shards_of_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid index file (needs a 'weight_map'): {e}") from e
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(
                f"{index}: names shard '{shard.name}', which does not exist in {index.parent}. "
                "The download is incomplete: fetch the missing shard."
            )
    return shards


def read_config(directory: Path) -> dict | None:
    """The model folder's config.json (HF), else its params.json (Meta), as a dict; None
    when it has neither. Every reader of a folder's model config goes through here."""
    for name in ("config.json", "params.json"):
        data = read_json(Path(directory) / name)
        if data is not None:
            return data
    return None


def read_json(path: Path) -> dict | None:
    """A JSON object from a file of the model folder (config, tokenizer settings), None
    when there is no such file; bad JSON is one line naming the file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, not {type(data).__name__}.")
    return data
