"""Random-weight HF checkpoints of a preset's shape, written once and cached.

Layout is what ``huggingface_hub`` downloads: ``config.json``, sharded
``model-0000i-of-0000N.safetensors`` in bf16 with ``model.safetensors.index.json``,
and a tokenizer. Weights are generated tensor by tensor and written shard by shard,
so a 14.5 GB model never needs more than one shard in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.presets import Preset
from benchmarks.tokenizer_files import TOKENIZER_FILE, write_tokenizer

# Bump when the files written change, so stale caches are rebuilt.
_FORMAT_VERSION = 1
_MARKER = ".complete"
_INIT_STD = 0.02
_DISK_MARGIN = 2 << 30
# Rows generated at a time: bounds the fp32 scratch of randn to ~256 MB.
_CHUNK_ELEMENTS = 64 << 20


def hf_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Llama/Mistral HF checkpoint, in the order HF writes them."""
    d, ff, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or d // heads
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * hd, d),
            p + "self_attn.k_proj.weight": (kv * hd, d),
            p + "self_attn.v_proj.weight": (kv * hd, d),
            p + "self_attn.o_proj.weight": (d, heads * hd),
            p + "mlp.gate_proj.weight": (ff, d),
            p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        })
    shapes["model.norm.weight"] = (d,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, d)
    return shapes


def plan_shards(shapes: dict[str, tuple[int, ...]], max_bytes: int) -> list[list[str]]:
    """Greedy split in file order, like ``save_pretrained(max_shard_size=...)``."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = _numel(shape) * 2
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def checkpoint_bytes(preset: Preset) -> int:
    return sum(_numel(s) * 2 for s in hf_tensor_shapes(preset.hf_config).values())


def ensure_checkpoint(preset: Preset, cache_root: Path) -> Path:
    """The cached checkpoint directory for ``preset``, written first if missing or stale."""
    target = cache_root / preset.name
    fingerprint = _fingerprint(preset)
    marker = target / _MARKER
    if marker.exists() and marker.read_text() == fingerprint:
        return target
    _check_disk(cache_root, checkpoint_bytes(preset))
    # Write beside the target and rename, so an interrupted run never leaves a
    # half-written checkpoint that looks complete.
    staging = cache_root / f"{preset.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_checkpoint(preset, staging)
    write_tokenizer(preset, staging / TOKENIZER_FILE)
    (staging / _MARKER).write_text(fingerprint)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def write_checkpoint(preset: Preset, out: Path) -> None:
    config = preset.hf_config
    shapes = hf_tensor_shapes(config)
    shards = plan_shards(shapes, preset.max_shard_bytes)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random_tensor(name, shapes[name], gen) for name in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
        _drop_from_page_cache(out / fname)
        weight_map.update({name: fname for name in names})
    index = {"metadata": {"total_size": checkpoint_bytes(preset)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


def _drop_from_page_cache(path: Path) -> None:
    """Write a shard out and drop it from the page cache: writing a 14.5 GB model must not
    evict what other processes (or a benchmark running beside it) keep cached. The
    runner reads the shards again to warm the cache before it measures anything."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def shard_files(checkpoint_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_dir.glob("model-*.safetensors"))


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    # Norm weights of one keep activations in range, as in a trained model.
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
        n = min(_CHUNK_ELEMENTS, flat.numel() - start)
        flat[start:start + n] = torch.randn(n, generator=gen).mul_(_INIT_STD)
    return out


def _fingerprint(preset: Preset) -> str:
    blob = json.dumps([_FORMAT_VERSION, preset.hf_config, preset.tokenizer_kind,
                       preset.max_shard_bytes], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_disk(root: Path, nbytes: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < nbytes + _DISK_MARGIN:
        raise SystemExit(
            f"{root} has {free / 1e9:.1f} GB free; the checkpoint needs {nbytes / 1e9:.1f} GB "
            f"plus {_DISK_MARGIN / 1e9:.0f} GB margin. Free space or pass --cache-dir elsewhere."
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
