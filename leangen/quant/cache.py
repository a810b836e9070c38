"""The quantized cache: torchao's quantized weights written once as plain tensors, then mmap'd.

A quantized load with a cache writes every quantized Linear's weight to one safetensors
file: a torchao tensor subclass is stored as its inner tensors (``__tensor_flatten__``:
packed ints, scales, zero points), and the subclass's class and flatten context go in
the header's metadata as JSON, never as a pickle. A later load with the same key swaps
each such Linear's weight for one rebuilt with ``__tensor_unflatten__`` from the cache
file's mmap: nothing is quantized again and no full-precision Linear weight is read.
Everything else (embedding, norms, biases, layers left unquantized) still comes from
the checkpoint's mmap.

An entry's file name says what it is for (the checkpoint's paths, builder, quantization,
dtype, device type); the key in its metadata adds what keeps it valid (the files' sizes,
mtimes and safetensors headers, config.json, the leangen/torch/torchao versions). A key
that differs marks the entry stale: it is rebuilt and replaced under the same name, so
old entries do not pile up.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import json
import os
import re
import struct
import tempfile
import time
import warnings
from contextlib import suppress
from importlib import metadata
from pathlib import Path
from typing import Any, Union

import torch
from omegaconf import DictConfig, OmegaConf

from leangen.errors import ConfigError
from leangen.load.dtypes import dtype_name
from leangen.quant.quantize import Quantizer, is_tensor_subclass

CacheSetting = Union[None, str, os.PathLike]

FORMAT = 1  # bump when the file's layout changes: older entries then read as stale
_METADATA = "leangen"  # the header metadata key holding the entry's JSON


class QuantCacheWarning(UserWarning):
    """The quantized cache was stale, corrupt or unwritable; the load went on without it."""


class _Unusable(Exception):
    """Why an entry cannot be read or written."""


def cache_dir(setting: CacheSetting) -> Path | None:
    """``auto``: ``$XDG_CACHE_HOME/leangen``, else ``~/.cache/leangen``; a path: that folder;
    None (or "null"): no cache."""
    if setting is None or setting is False or str(setting).lower() in ("null", "none", ""):
        return None
    if str(setting) != "auto":
        return Path(setting).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # the XDG spec says to ignore a relative XDG_CACHE_HOME
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "leangen"


def open_cache(setting: CacheSetting, files: tuple[Path, ...], config: dict | None,
               quantizer: Quantizer | None, dtype: torch.dtype, model: torch.nn.Module,
               **identity: Any) -> "QuantCache | None":
    """The cache entry for this load, or None when there is nothing to cache or it is off.

    ``model``: the meta-built model, whose Linears' widths decide the int4 groups used
    (a group that does not divide a layer falls back): the entry's name and key say those.

    ``identity``: what else decides the quantized tensors (builder, its kwargs, model
    type, the q/k layout...), as JSON-able values, callables or DictConfigs."""
    directory = cache_dir(setting)
    if directory is None or quantizer is None:
        return None
    _refuse_checkpoint_folder(directory, files)
    spec = quantizer.spec
    groups = quantizer.planned_groups(model)
    what = _canonical({
        "checkpoint": [str(f.resolve()) for f in files], **identity,
        # the groups used, not the one asked: asking 128 where every layer falls back to 64
        # quantizes exactly as asking 64 does, so both find the same entry
        "quantize": {"kind": spec.kind, "groups_used": groups},
        "device": quantizer.device.type,  # int4's packed layout differs per device
        "dtype": str(dtype),
    })
    valid = {
        "format": FORMAT,
        "files": [_file_identity(f) for f in files],
        "config_sha256": _sha256(json.dumps(config, sort_keys=True).encode()),
        "versions": _versions(),
    }
    used = "".join(f"-g{g}" for g in groups)  # int4: "-g32"; with a fallback "-g128-g64"
    name = (f"{_slug(files[0].resolve().parent.name)}-{spec.kind}{used}-{dtype_name(dtype)}-"
            f"{quantizer.device.type}-{_sha256(json.dumps(what, sort_keys=True).encode())[:16]}")
    return QuantCache(directory / f"{name}.safetensors", {**what, **valid})


class QuantCache:
    """One entry: ``install`` it on a meta-built model (a hit), or ``write`` it from a
    quantized one. ``status`` says what happened: "hit", "written" or "off"."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key = path, key
        self.status = "off"

    def report(self) -> dict[str, str | None]:
        return {"status": self.status, "file": str(self.path) if self.status != "off" else None}

    def install(self, model: torch.nn.Module, quantizer: Quantizer) -> set[str]:
        """On a hit, make each quantized Linear's weight the cached tensor (a tied output
        gets its own Linear, as the quantizer would do) and count them in the quantizer, as
        quantizing would have;
        return the parameter names that are now final. On a miss (a stale or corrupt
        entry is reported in one line), return an empty set and change nothing."""
        targets = quantizer.targets(model)
        weights = self._read({n: s for n, s in targets.items() if s is not None},
                             quantizer.dtype, quantizer.device)
        if weights is None:
            return set()
        for name, weight in weights.items():
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, attr)
            if type(linear) is not torch.nn.Linear:  # a TiedLinear: the embedding stays as it is
                linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
                setattr(parent, attr, linear)
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)  # .data cannot take a subclass
        quantizer.count_planned(targets)  # _check_fits: the entry holds exactly the planned Linears
        quantizer.note_fallbacks()
        self.status = "hit"
        return {f"{name}.weight" for name in weights}

    def _read(self, expected: dict[str, torch.Size], dtype: torch.dtype,
              device: torch.device) -> dict[str, torch.Tensor] | None:
        if not self.path.is_file():
            return None
        try:
            weights = _read_entry(self.path, self.key, device)
            _check_fits(weights, expected, dtype)
        except _Stale as e:
            _warn(f"quantized cache {self.path} is stale ({e}); rebuilding it.")
            return None
        except Exception as e:  # anything wrong with the entry: the checkpoint is the truth
            _warn(f"quantized cache {self.path} is corrupt ({_one_line(e)}); rebuilding it.")
            return None
        return weights

    def write(self, model: torch.nn.Module) -> None:
        """Store the model's quantized Linear weights as the entry (atomically); a folder
        that cannot be written to is reported in one line and the run goes on."""
        tensors: dict[str, torch.Tensor] = {}
        try:
            nodes = {name: _flatten(f"{name}.weight", module.weight, tensors)
                     for name, module in model.named_modules()
                     if type(module) is torch.nn.Linear and is_tensor_subclass(module.weight)}
            entry = json.dumps({"key": self.key, "weights": nodes})
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_save(tensors, {_METADATA: entry}, self.path)
        except (OSError, _Unusable) as e:
            _warn(f"cannot write the quantized cache {self.path} ({_one_line(e)}); "
                  "this run goes on without it.")
            return
        self.status = "written"


class _Stale(_Unusable):
    pass


# -- reading ---------------------------------------------------------------------------

def _read_entry(path: Path, key: dict, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    file = safe_open(str(path), framework="pt", device="cpu")  # checks the header and file size
    entry = json.loads((file.metadata() or {})[_METADATA])
    if entry["key"] != key:
        changed = [k for k in key if entry["key"].get(k) != key[k]]
        raise _Stale(f"{', '.join(changed) or 'its key'} changed")
    return {name: _unflatten(node, file, device) for name, node in entry["weights"].items()}


def _unflatten(node: dict, file, device: torch.device) -> torch.Tensor:
    if "tensor" in node:  # an inner tensor: the cache file's mmap (CPU), or a copy on the device
        t = file.get_tensor(node["tensor"])
        if list(t.shape) != node["shape"] or str(t.dtype) != node["dtype"]:
            raise _Unusable(f"'{node['tensor']}' is {dtype_name(t.dtype)} {list(t.shape)}, "
                            f"not {node['dtype'].removeprefix('torch.')} {node['shape']}")
        return t if device.type == "cpu" else t.to(device)
    cls = _torchao_class(node["class"])
    inner = {name: _unflatten(child, file, device) for name, child in node["inner"].items()}
    return cls.__tensor_unflatten__(inner, _decode(node["context"]), torch.Size(node["size"]),
                                    tuple(node["stride"]))


def _check_fits(weights: dict[str, torch.Tensor], expected: dict[str, torch.Size],
                dtype: torch.dtype) -> None:
    """The entry quantizes exactly the Linears this load would, with their shapes."""
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise _Unusable(f"{len(missing)} quantized layers missing (first: {missing[:1]}), "
                        f"{len(extra)} unknown (first: {extra[:1]})")
    for name, weight in weights.items():
        if weight.shape != expected[name] or weight.dtype != dtype:
            raise _Unusable(f"'{name}' is {weight.dtype} {tuple(weight.shape)}, the model "
                            f"wants {dtype} {tuple(expected[name])}")


# -- writing ---------------------------------------------------------------------------

def _flatten(name: str, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict:
    """``t`` as a JSON node; its plain inner tensors go into ``tensors`` under ``name.<attr>``."""
    if not is_tensor_subclass(t):
        if not t.is_contiguous():  # a stored tensor is rebuilt contiguous: refuse, not corrupt
            raise _Unusable(f"'{name}' is not contiguous")
        tensors[name] = t.detach()
        return {"tensor": name, "shape": list(t.shape), "dtype": str(t.dtype)}
    inner, context = t.__tensor_flatten__()
    return {"class": _class_path(type(t)), "context": _encode(context), "size": list(t.shape),
            "stride": list(t.stride()),
            "inner": {attr: _flatten(f"{name}.{attr}", getattr(t, attr), tensors) for attr in inner}}


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    """Written to a temp file in the cache folder, then renamed: a reader (or a second
    process writing the same entry) sees the old file or the whole new one, never a part."""
    from safetensors.torch import save_file

    _remove_stale_parts(path)
    fd, part = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        save_file(tensors, part, metadata=meta)  # writes from the tensors' memory: no copy
        os.chmod(part, 0o666 & ~_umask())  # mkstemp's 0600 would hide a shared cache folder
        os.replace(part, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(part)
        raise


# A part file this old belongs to a writer that was killed (SIGKILL, OOM, power): no
# write of one entry takes an hour, so a younger one may be another process's, in flight.
STALE_PART_SECONDS = 3600


def _remove_stale_parts(path: Path) -> None:
    """Delete this entry's temp files left by killed writers: each is as big as the entry
    (gigabytes for a 7B model), and nothing else would ever remove them."""
    now = time.time()
    for part in path.parent.glob(f".{path.name}.*.part"):
        with suppress(OSError):  # another process may remove it first
            if now - part.stat().st_mtime > STALE_PART_SECONDS:
                part.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- the flatten context as JSON: the few types torchao puts there, each tagged ----------

def _encode(v: Any) -> Any:
    if isinstance(v, enum.Enum):  # before int: an IntEnum is an int
        return {"enum": _class_path(type(v)), "name": v.name}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.dtype):
        return {"dtype": dtype_name(v)}
    if isinstance(v, torch.Size):  # before tuple: a Size is one
        return {"size": list(v)}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, tuple):
        return {"tuple": [_encode(x) for x in v]}
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: _encode(x) for k, x in v.items()}}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # torchao's layouts
        return {"dataclass": _class_path(type(v)),
                "fields": {f.name: _encode(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}}
    raise _Unusable(f"a {type(v).__name__} in a quantized tensor's context cannot be stored")


_DECODERS = {
    "enum": lambda v: getattr(_torchao_class(v["enum"]), v["name"]),
    "dtype": lambda v: _dtype(v["dtype"]),
    "size": lambda v: torch.Size(v["size"]),
    "tuple": lambda v: tuple(_decode(x) for x in v["tuple"]),
    "dict": lambda v: {k: _decode(x) for k, x in v["dict"].items()},
    "dataclass": lambda v: _torchao_class(v["dataclass"])(**{k: _decode(x) for k, x in v["fields"].items()}),
}


def _decode(v: Any) -> Any:
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict):
        tag = next(t for t in _DECODERS if t in v)
        return _DECODERS[tag](v)
    return v


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise _Unusable(f"'{name}' is not a torch dtype")
    return dtype


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _torchao_class(path: str) -> type:
    """Only torchao's classes: a cache file names what it rebuilds, but cannot make
    leangen import or call anything else."""
    module, _, qualname = path.partition(":")
    if module.split(".")[0] != "torchao":
        raise _Unusable(f"class {path} is not torchao's")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# -- the key -------------------------------------------------------------------------

def _versions() -> dict[str, str]:
    return {name: _version(name) for name in ("leangen", "torch", "torchao")}


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        # Run from a source tree on PYTHONPATH (not pip-installed): no version to read, so
        # the code that writes and reads entries stands in for it.
        module = importlib.import_module(name)
        files = sorted(Path(module.__file__).parent.rglob("*.py"))
        return "source-" + hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    identity = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if path.suffix == ".safetensors":  # names, shapes, dtypes and offsets of every tensor
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            identity["header_sha256"] = _sha256(f.read(length))
    return identity


def _canonical(value: Any) -> Any:
    """JSON-able, as a stored key reads back: builders by dotted name, configs as dicts."""
    def default(v):
        if isinstance(v, DictConfig):
            return OmegaConf.to_container(v, resolve=True)
        if callable(v):
            return f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', repr(v))}"
        return repr(v)
    return json.loads(json.dumps(value, default=default, sort_keys=True))


def _refuse_checkpoint_folder(directory: Path, files: tuple[Path, ...]) -> None:
    target = directory.expanduser().resolve()
    for folder in {f.resolve().parent for f in files}:
        if target == folder or folder in target.parents:
            raise ConfigError(f"quantize_cache: {directory} is in the checkpoint's folder {folder}, "
                              "which leangen never writes to (a .safetensors file there would be read "
                              "as a shard). Use auto or another folder.")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:64] or "model"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _warn(message: str) -> None:
    warnings.warn(message, QuantCacheWarning, stacklevel=4)
