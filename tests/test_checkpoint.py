"""Checkpoint files: formats, layouts, model_type detection, and every bad file."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import (
    FAMILIES,
    HEADS,
    HIDDEN,
    KV_HEADS,
    assert_logits_close,
    hf_logits,
    hf_state_dict,
    make_hf_checkpoint,
    tokens,
    tune_logits,
)

import leangen
from leangen import CheckpointError
from leangen.checkpoint import open_raw, read_config, resolve_files


def _torchtune_state_dict(family: str, path) -> dict[str, torch.Tensor]:
    """The HF checkpoint at ``path`` converted by torchtune's own converters."""
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.phi3._convert_weights import phi3_hf_to_tune
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

    sd = hf_state_dict(path)
    if family == "qwen2":
        return qwen2_hf_to_tune(sd, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=HIDDEN,
                                tie_word_embeddings=True)
    if family == "phi3":
        return phi3_hf_to_tune(sd, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=HIDDEN)
    return hf_to_tune(sd, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=HIDDEN,
                      head_dim=FAMILIES[family].builder_kwargs.get("head_dim"))


def _assert_loads_like_hf(tiny, checkpoint, **load_kwargs):
    model = leangen.load_model(tiny.builder, checkpoint, **tiny.builder_kwargs, **load_kwargs)
    ids = tokens(64)
    assert_logits_close(tune_logits(model, ids), hf_logits(tiny.hf_model, ids))


# --- formats ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "llama3_2"])
def test_meta_consolidated_pth(tiny_checkpoint, tmp_path, family):
    from torchtune.models.convert_weights import tune_to_meta

    tiny = tiny_checkpoint(family)
    meta = tune_to_meta(_torchtune_state_dict(family, tiny.path))
    assert "layers.0.attention.wq.weight" in meta
    assert ("output.weight" in meta) == (family == "llama")  # 3.2 ties it: not stored
    torch.save(meta, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(
        {"dim": HIDDEN, "n_layers": 2, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "norm_eps": 1e-5}))
    _assert_loads_like_hf(tiny, tmp_path)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma"])
def test_torchtune_format_pt(tiny_checkpoint, tmp_path, family):
    tiny = tiny_checkpoint(family)
    torch.save(_torchtune_state_dict(family, tiny.path), tmp_path / "model.pt")
    _assert_loads_like_hf(tiny, tmp_path / "model.pt")


def test_torchtune_recipe_checkpoint_wraps_the_state_dict(tiny_checkpoint, tmp_path):
    tiny = tiny_checkpoint("mistral")
    torch.save({"model": _torchtune_state_dict("mistral", tiny.path)}, tmp_path / "epoch_0.pt")
    _assert_loads_like_hf(tiny, tmp_path)


def test_torchtune_format_safetensors(tiny_checkpoint, tmp_path):
    tiny = tiny_checkpoint("llama")
    save_file(_torchtune_state_dict("llama", tiny.path), tmp_path / "model.safetensors")
    _assert_loads_like_hf(tiny, tmp_path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_explicit_torchtune_model_type(tiny_checkpoint, family):
    tiny = tiny_checkpoint(family)
    _assert_loads_like_hf(tiny, tiny.path, model_type=FAMILIES[family].model_type)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma"])
def test_model_type_from_key_names_without_config(tiny_checkpoint, tmp_path, family):
    tiny = tiny_checkpoint(family)
    bare = tmp_path / "bare"
    shutil.copytree(tiny.path, bare, ignore=shutil.ignore_patterns("*.json"))
    assert not (bare / "config.json").exists()
    _assert_loads_like_hf(tiny, sorted(bare.glob("*.safetensors")))  # a list of files


def test_model_type_from_config_json(tiny_checkpoint):
    """config.json's model_type picks the family even where the keys alone cannot."""
    tiny = tiny_checkpoint("phi3")
    assert leangen.open_checkpoint(tiny.path).family.name == "phi3"
    assert leangen.open_checkpoint(tiny_checkpoint("mistral").path).family.name == "llama"
    assert json.loads((tiny.path / "config.json").read_text())["model_type"] == "phi3"


def test_index_file_can_be_passed_directly(tiny_checkpoint):
    tiny = tiny_checkpoint("llama", fmt="bin")
    _assert_loads_like_hf(tiny, tiny.path / "pytorch_model.bin.index.json")


def test_safetensors_preferred_over_bin_and_consolidated(tiny_checkpoint, tmp_path):
    tiny = tiny_checkpoint("llama")
    shutil.copytree(tiny.path, tmp_path / "repo")
    torch.save({"garbage": torch.zeros(1)}, tmp_path / "repo" / "pytorch_model.bin")
    torch.save({"garbage": torch.zeros(1)}, tmp_path / "repo" / "consolidated.00.pth")
    found = resolve_files(tmp_path / "repo")
    assert {f.suffix for f in found.files} == {".safetensors"} and len(found.files) >= 2
    assert found.config["model_type"] == "llama"


# --- bad files ---------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}/nowhere: checkpoint path does not exist"):
        leangen.open_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="does not exist"):
        leangen.load_model(FAMILIES["llama"].builder, tmp_path / "nowhere", **FAMILIES["llama"].builder_kwargs)


def test_empty_directory_and_empty_list(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no checkpoint files found.*safetensors"):
        open_raw(tmp_path)
    with pytest.raises(CheckpointError, match="empty list"):
        open_raw([])


def test_unknown_suffix(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"model.gguf: unknown checkpoint format '.gguf'.*\.safetensors"):
        open_raw(tmp_path / "model.gguf")


def test_truncated_safetensors(tmp_path):
    path, builder, kwargs, _ = make_hf_checkpoint("llama", tmp_path)
    shard = sorted(path.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name}: not a readable safetensors file.*truncated"):
        leangen.load_model(builder, path, **kwargs)


@pytest.mark.parametrize("corruption", ["header length", "header json", "empty"])
def test_corrupt_safetensors_header(tmp_path, corruption):
    path, _, _, _ = make_hf_checkpoint("llama", tmp_path, shards=False)
    file = path / "model.safetensors"
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    file.write_bytes({"header length": b"\xff" * 8 + data[8:],
                      "header json": data[:8] + b"[" * n + data[8 + n:],
                      "empty": b""}[corruption])
    with pytest.raises(CheckpointError, match=f"{file}: not a readable safetensors file.*corrupt"):
        leangen.open_checkpoint(path)


def test_truncated_bin(tmp_path):
    path, builder, kwargs, _ = make_hf_checkpoint("llama", tmp_path, fmt="bin", shards=False)
    file = path / "pytorch_model.bin"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot be memory-mapped.*cut short"):
        leangen.load_model(builder, path, **kwargs)


@pytest.mark.parametrize("fmt,index", [("safetensors", "model.safetensors.index.json"),
                                        ("bin", "pytorch_model.bin.index.json")])
def test_index_names_a_missing_shard(tmp_path, fmt, index):
    path, builder, kwargs, _ = make_hf_checkpoint("llama", tmp_path, fmt=fmt)
    shard = sorted(path.glob(f"*.{fmt}"))[-1]
    shard.unlink()
    expected = f"{index}: names shard '{shard.name}', which does not exist.*missing shard"
    with pytest.raises(CheckpointError, match=expected):
        leangen.load_model(builder, path, **kwargs)


def test_invalid_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a valid index file.*weight_map"):
        open_raw(tmp_path)


def test_invalid_config_json(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint("llama").path, tmp_path / "repo")
    (tmp_path / "repo" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        open_raw(tmp_path / "repo")


def test_config_json_that_is_not_an_object(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint("llama").path, tmp_path / "repo")
    (tmp_path / "repo" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object, not list"):
        open_raw(tmp_path / "repo")


def test_read_config_falls_back_to_params_json(tmp_path):
    assert read_config(tmp_path) is None
    (tmp_path / "params.json").write_text('{"dim": 64}')
    assert read_config(tmp_path) == {"dim": 64}
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert read_config(tmp_path) == {"model_type": "llama"}  # config.json first


def test_tensor_stored_twice(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama", shards=False).path / "model.safetensors"
    shutil.copy(src, tmp_path / "a.safetensors")
    expected = r"tensor '[\w.]+' is stored twice: in .*model.safetensors and in .*a.safetensors"
    with pytest.raises(CheckpointError, match=expected):
        open_raw([src, tmp_path / "a.safetensors"])


def test_model_parallel_consolidated_shards_refused(tmp_path):
    for i in range(2):
        torch.save({"tok_embeddings.weight": torch.zeros(2, 2)}, tmp_path / f"consolidated.0{i}.pth")
    with pytest.raises(CheckpointError, match="several consolidated.*model-parallel"):
        open_raw(tmp_path)


def test_legacy_torch_save_refused(tmp_path):
    file = tmp_path / "pytorch_model.bin"
    torch.save({"model.embed_tokens.weight": torch.ones(4, 4)}, file, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot be memory-mapped.*Legacy.*safetensors"):
        open_raw(tmp_path)


class _Payload:
    """Pickles as a call to os.system that would create ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["zip", "legacy", "raw pickle"])
def test_pickle_with_code_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "code-ran"
    file = tmp_path / "pytorch_model.bin"
    state = {"model.embed_tokens.weight": torch.ones(4, 4), "evil": _Payload(marker)}
    if how == "raw pickle":
        file.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, file, _use_new_zipfile_serialization=how == "zip")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="pytorch_model.bin: (refused to unpickle|cannot be memory-mapped)") as e:
        leangen.open_checkpoint(tmp_path)
    assert not marker.exists()
    if how == "zip":
        message = str(e.value)
        assert "system" in message and "weights_only" in message  # names the blocked global
        assert "set to `False`" not in message  # never advises running the code


def test_non_state_dict_pickle(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt: holds a list, not a state dict"):
        open_raw(tmp_path)


def test_checkpoint_without_tensors(tmp_path):
    torch.save({"step": 3}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt: holds no tensors"):
        open_raw(tmp_path)
