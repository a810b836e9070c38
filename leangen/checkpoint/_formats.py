"""Readers for one checkpoint file each, chosen by suffix through ``READERS``.

A reader lists names, shapes and dtypes from the file's header and hands out
tensors backed by a private (copy-on-write) mmap of the file, so nothing is read
until a page is touched and nothing can ever be written back to the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Protocol

import torch
from safetensors import safe_open

from leangen.errors import CheckpointError

# safetensors' dtype codes (``get_slice(...).get_dtype()``) to torch dtypes.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class FileReader(Protocol):
    path: Path

    def entries(self) -> dict[str, tuple[torch.Size, torch.dtype]]: ...

    def tensor(self, name: str) -> torch.Tensor: ...


class SafetensorsReader:
    """safetensors: the header gives names, shapes and dtypes without reading data."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            self._entries = {}
            for name in self._file.keys():
                info = self._file.get_slice(name)
                self._entries[name] = (torch.Size(info.get_shape()), _SAFETENSORS_DTYPES[info.get_dtype()])
        except Exception as e:  # safetensors raises its own SafetensorError and OSErrors
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({e}). The file is probably "
                "truncated or corrupt: download or copy it again."
            ) from e

    def entries(self):
        return self._entries

    def tensor(self, name):
        # safetensors >= 0.4 hands back a view of a MAP_PRIVATE mapping: zero copy.
        return self._file.get_tensor(name)


class TorchPickleReader:
    """torch.save zip files (HF .bin, Meta .pth, torchtune .pt), mmap'd, weights only."""

    def __init__(self, path: Path):
        self.path = path
        try:
            loaded = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refused to unpickle: it needs code beyond plain tensors "
                f"(weights_only=True rejected it: {_blocked(e)}). leangen never "
                "runs code from a checkpoint; convert it to safetensors in a trusted environment."
            ) from e
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise CheckpointError(
                f"{path}: cannot be memory-mapped as a torch.save zip file ({str(e).splitlines()[0]}). "
                "Legacy (pre-1.6) or raw pickles are not supported: re-save it with torch.save, "
                "or convert it to safetensors. If the file was cut short, copy it again."
            ) from e
        self._tensors = _tensor_dict(loaded, path)

    def entries(self):
        return {name: (t.shape, t.dtype) for name, t in self._tensors.items()}

    def tensor(self, name):
        return self._tensors[name]


def _blocked(error: pickle.UnpicklingError) -> str:
    """The line of torch's message that names what was refused. Its first line is a
    generic preamble that suggests weights_only=False, which leangen must not echo."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(error).__name__])[0]


def _tensor_dict(loaded, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a torch.load result (torchtune wraps it under ``model``)."""
    if isinstance(loaded, dict) and len(loaded) == 1:
        (only,) = loaded.values()
        if isinstance(only, dict):
            loaded = only
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a state dict of tensors.")
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


READERS: dict[str, Callable[[Path], FileReader]] = {
    ".safetensors": SafetensorsReader,
    ".bin": TorchPickleReader,
    ".pt": TorchPickleReader,
    ".pth": TorchPickleReader,
}


def open_file(path: Path) -> FileReader:
    reader = READERS.get(path.suffix)
    if reader is None:
        raise CheckpointError(
            f"{path}: unknown checkpoint format '{path.suffix}'. "
            f"Supported: {', '.join(sorted(READERS))}."
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist.")
    return reader(path)
