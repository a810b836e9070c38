"""Shared fixtures: the tiny folders of tiny_models.py, built once per session and shared
read-only.

A test that changes files (truncates, deletes, renames) copies the folder into its own
tmp_path first (``tiny_models.copy_folder`` / ``copy_checkpoint``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from tiny_models import (
    TinyCheckpoint,
    make_hf_checkpoint,
    make_hub_folder,
    make_llama_tokenizer_folder,
    make_qwen_tokenizer_folder,
    make_tp_folders,
    make_variant_folder,
    make_vocab_merges_folder,
)

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine
# OpenMP's spinning workers make each forward ~100x slower (0.5 s instead of 5 ms).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def cache_home(tmp_path_factory, monkeypatch):
    """Each test's own $XDG_CACHE_HOME: the recipes' quantized cache (quantize_cache: auto)
    never writes to the real home, and no test sees another's entries."""
    folder = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(family, fmt=..., shards=..., tied=...)`` -> TinyCheckpoint, cached."""
    cache: dict[tuple, TinyCheckpoint] = {}

    def get(family: str, *, fmt: str = "safetensors", shards: bool = True,
            tied: bool | None = None) -> TinyCheckpoint:
        key = (family, fmt, shards, tied)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{fmt}")
            cache[key] = make_hf_checkpoint(family, root, fmt=fmt, shards=shards, tied=tied)
        return cache[key]

    return get



def _cached(build):
    """``get(name)`` -> ``build(name)``, each name built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def variant_folder(tmp_path_factory):
    """``variant_folder(variant)`` -> (path, transformers model) of tiny_models.VARIANTS."""
    return _cached(lambda variant: make_variant_folder(variant, tmp_path_factory.mktemp(variant)))


@pytest.fixture(scope="session")
def hub_folder(tmp_path_factory):
    """``hub_folder(variant)`` -> a folder as the Hub has it: model, tokenizer, chat template."""
    return _cached(lambda variant: make_hub_folder(variant, tmp_path_factory.mktemp(f"hub-{variant}")))


@pytest.fixture(scope="session")
def llama_tokenizer_folder(tmp_path_factory) -> Path:
    return make_llama_tokenizer_folder(tmp_path_factory.mktemp("llama-tok"))


@pytest.fixture(scope="session")
def qwen_tokenizer_folder(tmp_path_factory) -> Path:
    return make_qwen_tokenizer_folder(tmp_path_factory.mktemp("qwen-tok"))


@pytest.fixture(scope="session")
def tokenizer_folders(llama_tokenizer_folder, qwen_tokenizer_folder) -> dict[str, Path]:
    return {"llama": llama_tokenizer_folder, "qwen": qwen_tokenizer_folder}


@pytest.fixture(scope="session")
def vocab_merges_folder(tmp_path_factory) -> Path:
    return make_vocab_merges_folder(tmp_path_factory.mktemp("qwen-vocab"))


@pytest.fixture(scope="session")
def tp_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tensor-parallel tests' checkpoints, by name (tiny_models.make_tp_folders)."""
    return make_tp_folders(tmp_path_factory.mktemp("tp-checkpoints"))


def directory_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative name."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture
def digest():
    return directory_digest


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no file can be created in: a read-only bind mount where this process
    may mount (root in a container), else a folder without write permission."""
    import os
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        f"mount --bind '{folder}' '{folder}' && mount -o remount,ro,bind '{folder}'",
        shell=True, capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(folder)], capture_output=True)
            pytest.skip("root without mount rights: no folder here is read-only to this process")
        folder.chmod(0o555)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o755)
