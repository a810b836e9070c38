"""open_checkpoint and load_tensors: the lazy torchtune-named view, without a model."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import (
    HIDDEN,
    INTERMEDIATE,
    KV_HEADS,
    VOCAB,
    assert_logits_close,
    hf_logits,
    hf_state_dict,
    tokens,
    tune_logits,
)

import leangen
from leangen import ConversionError
from leangen.checkpoint.convert import ROTATE_HALF
from leangen.load.rope import qk_layout


def test_load_tensors_embedding_and_output(tiny_checkpoint):
    path, _, _, hf_model = tiny_checkpoint("llama")
    got = leangen.load_tensors(path, ["tok_embeddings.weight", "output.weight"])
    assert list(got) == ["tok_embeddings.weight", "output.weight"]
    assert torch.equal(got["tok_embeddings.weight"], hf_model.model.embed_tokens.weight)
    assert torch.equal(got["output.weight"], hf_model.lm_head.weight)
    assert not torch.equal(got["output.weight"], got["tok_embeddings.weight"])


@pytest.mark.parametrize("family", ["llama3_2", "qwen2", "gemma"])
def test_load_tensors_output_falls_back_to_tied_embedding(tiny_checkpoint, family):
    path, _, _, hf_model = tiny_checkpoint(family)
    got = leangen.load_tensors(path, ["output.weight"])
    assert torch.equal(got["output.weight"], hf_model.model.embed_tokens.weight)


def test_load_tensors_bin(tiny_checkpoint):
    path, _, _, hf_model = tiny_checkpoint("mistral", fmt="bin")
    got = leangen.load_tensors(path, ["layers.1.mlp.w3.weight"])
    assert torch.equal(got["layers.1.mlp.w3.weight"], hf_model.model.layers[1].mlp.up_proj.weight)


QKV = ["layers.1.attn.q_proj.weight", "layers.1.attn.k_proj.weight", "layers.1.attn.v_proj.weight"]


def _torchtune_converted(family: str, path, config) -> dict[str, torch.Tensor]:
    """The HF files as torchtune's own convert_weights turns them into a torchtune state dict."""
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.phi3._convert_weights import phi3_hf_to_tune
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

    convert = {"phi3": phi3_hf_to_tune, "qwen2": qwen2_hf_to_tune}.get(family, hf_to_tune)
    kwargs = {"head_dim": getattr(config, "head_dim", None)} if convert is not phi3_hf_to_tune else {}
    return convert(hf_state_dict(path), num_heads=config.num_attention_heads,
                   num_kv_heads=config.num_key_value_heads, dim=config.hidden_size, **kwargs)


@pytest.mark.parametrize("family", ["llama", "llama3_2", "gemma", "phi3", "qwen2"])
def test_load_tensors_qk_default_to_torchtune_conversion(tiny_checkpoint, family):
    """By default q/k come in torchtune's layout, exactly as torchtune's converters give them."""
    path, _, _, hf_model = tiny_checkpoint(family)
    expected = _torchtune_converted(family, path, hf_model.config)
    got = leangen.load_tensors(path, QKV)
    for name in QKV:
        assert torch.equal(got[name], expected[name]), name


def test_with_qk_layout_gives_the_rows_open_checkpoint_gives(tiny_checkpoint):
    path = tiny_checkpoint("llama").path
    default = leangen.open_checkpoint(path)
    relaid = default.with_qk_layout(ROTATE_HALF)
    direct = leangen.open_checkpoint(path, qk_layout=ROTATE_HALF)
    assert relaid.raw is default.raw  # the files are not opened again
    for name in QKV:
        assert torch.equal(relaid.tensor(name), direct.tensor(name)), name
    assert not torch.equal(relaid.tensor(QKV[0]), default.tensor(QKV[0]))  # the layouts differ


@pytest.mark.parametrize("family", ["llama", "llama3_2", "gemma", "phi3", "qwen2"])
def test_load_tensors_qk_equal_the_loaded_model(tiny_checkpoint, family):
    """Asked for the loaded model's RoPE layout, load_tensors gives its q/k (the stored HF rows)."""
    path, builder, kwargs, hf_model = tiny_checkpoint(family)
    model = leangen.load_model(builder, path, **kwargs)
    assert qk_layout(model) == ROTATE_HALF  # HF rows: RotateHalf, or the family's own RoPE
    got = leangen.load_tensors(path, QKV, qk_layout=qk_layout(model))
    for name in QKV:
        assert torch.equal(got[name], model.get_parameter(name)), name
    hf_q = hf_model.model.layers[1].self_attn
    if family != "phi3":  # phi3 stores a fused qkv_proj
        assert torch.equal(got[QKV[0]], hf_q.q_proj.weight)
    # torchtune's own layout (the default) differs from the model's where torchtune interleaves.
    default = leangen.load_tensors(path, QKV[:1])[QKV[0]]
    assert torch.equal(default, got[QKV[0]]) == (family in ("phi3", "qwen2"))


def test_load_tensors_unknown_name(tiny_checkpoint):
    path = tiny_checkpoint("llama").path
    with pytest.raises(ConversionError, match="'layers.9.attn.q_proj.weight' is not in the checkpoint"):
        leangen.load_tensors(path, ["layers.9.attn.q_proj.weight"])


def _with_prefix(src, dst, renames):
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    for f in src.glob("*.safetensors"):
        tensors = load_file(f)
        out = {}
        for k, v in tensors.items():
            for old, new in renames:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            out[k] = v.clone()
        save_file(out, dst / f.name)
    return dst


def test_language_model_prefix(tiny_checkpoint, tmp_path):
    """A VLM-style export (language_model.model.*, language_model.lm_head.*) loads as is."""
    path, builder, kwargs, hf_model = tiny_checkpoint("llama", shards=False)
    wrapped = _with_prefix(path, tmp_path / "vlm", [("model.", "language_model.model."),
                                                     ("lm_head.", "language_model.lm_head.")])
    assert all(k.startswith("language_model.") for k in load_file(wrapped / "model.safetensors"))
    got = leangen.load_tensors(wrapped, ["tok_embeddings.weight", "output.weight"])
    assert torch.equal(got["tok_embeddings.weight"], hf_model.model.embed_tokens.weight)
    assert torch.equal(got["output.weight"], hf_model.lm_head.weight)
    model = leangen.load_model(builder, wrapped, **kwargs)
    ids = tokens(32)
    assert_logits_close(tune_logits(model, ids), hf_logits(hf_model, ids))


# --- open_checkpoint ---------------------------------------------------------------

def test_open_checkpoint_lists_names_shapes_dtypes(tiny_checkpoint):
    path = tiny_checkpoint("llama").path
    view = leangen.open_checkpoint(path)
    assert isinstance(view, leangen.Checkpoint)
    assert len(view) == 3 + 2 * 9 and "norm.scale" in view and "model.norm.weight" not in view
    assert set(view) == set(view.names())
    assert view.shape("tok_embeddings.weight") == (VOCAB, HIDDEN)
    assert view.shape("layers.0.attn.k_proj.weight") == (KV_HEADS * 16, HIDDEN)
    assert view.shape("layers.1.mlp.w2.weight") == (HIDDEN, INTERMEDIATE)
    assert {view.dtype(n) for n in view} == {torch.float32}
    assert set(view.files) == set(path.glob("*.safetensors"))


def test_open_checkpoint_phi3_lists_split_tensors(tiny_checkpoint):
    view = leangen.open_checkpoint(tiny_checkpoint("phi3").path)
    assert view.shape("layers.0.attn.q_proj.weight") == (HIDDEN, HIDDEN)
    assert view.shape("layers.0.attn.k_proj.weight") == (KV_HEADS * 16, HIDDEN)
    assert view.shape("layers.0.attn.v_proj.weight") == (KV_HEADS * 16, HIDDEN)
    assert view.shape("layers.0.mlp.w1.weight") == view.shape("layers.0.mlp.w3.weight") == (INTERMEDIATE, HIDDEN)


SLICED = [
    ("llama", "layers.0.attn.q_proj.weight"),  # permuted, 4 heads of 16 rows
    ("llama", "layers.1.attn.k_proj.weight"),  # permuted, 2 kv heads
    ("llama", "layers.0.mlp.w1.weight"),  # untransformed
    ("gemma", "layers.0.attn.q_proj.weight"),  # permuted, head_dim 32 != 64 / 4
    ("phi3", "layers.0.attn.k_proj.weight"),  # a row range of the fused qkv_proj
    ("phi3", "layers.1.mlp.w3.weight"),  # a row range of the fused gate_up_proj
]


@pytest.mark.parametrize("family,name", SLICED)
@pytest.mark.parametrize("start,stop", [(0, 16), (16, 32), (3, 21), (7, 8), (0, 32)])
def test_row_slice_equals_slice_of_full_tensor(tiny_checkpoint, family, name, start, stop):
    view = leangen.open_checkpoint(tiny_checkpoint(family).path)
    full = view.tensor(name)
    assert torch.equal(view.slice(name, start, stop), full[start:stop])


@pytest.mark.parametrize("family,name", SLICED)
@pytest.mark.parametrize("start,stop", [(0, 32), (5, 37), (63, 64)])
def test_column_slice_equals_slice_of_full_tensor(tiny_checkpoint, family, name, start, stop):
    view = leangen.open_checkpoint(tiny_checkpoint(family).path)
    assert torch.equal(view.slice(name, start, stop, dim=1), view.tensor(name)[:, start:stop])


def test_row_slice_of_bias(tiny_checkpoint):
    view = leangen.open_checkpoint(tiny_checkpoint("qwen2").path)
    name = "layers.0.attn.q_proj.bias"
    assert torch.equal(view.slice(name, 5, 40), view.tensor(name)[5:40])


def test_whole_heads_slice_uses_only_its_rows(tiny_checkpoint, monkeypatch):
    """A head-aligned shard of a permuted tensor is computed from exactly its stored rows."""
    view = leangen.open_checkpoint(tiny_checkpoint("llama").path)
    name = "layers.0.attn.q_proj.weight"
    full = view.tensor(name)
    poisoned = view.stored(name).clone()
    poisoned[:16] = float("nan")  # only head 1 (rows 16:32) is real
    poisoned[32:] = float("nan")
    monkeypatch.setattr(view, "stored", lambda _name: poisoned)
    assert torch.equal(view.slice(name, 16, 32), full[16:32])


def test_slice_out_of_range(tiny_checkpoint):
    view = leangen.open_checkpoint(tiny_checkpoint("llama").path)
    with pytest.raises(IndexError, match="out of range for 'layers.0.attn.q_proj.weight'"):
        view.slice("layers.0.attn.q_proj.weight", 0, 65)


def test_embedding_loads_from_an_hf_folder_without_config_json(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint("llama")
    bare = tmp_path / "bare"
    shutil.copytree(ckpt.path, bare)
    (bare / "config.json").unlink()
    embed = leangen.load_tensors(bare, ["tok_embeddings.weight"])["tok_embeddings.weight"]
    torch.testing.assert_close(embed, ckpt.hf_model.model.embed_tokens.weight)
    view = leangen.open_checkpoint(bare)
    assert view.shape("layers.0.attn.q_proj.weight") == ckpt.hf_model.model.layers[0].self_attn.q_proj.weight.shape
    # torchtune's layout (the default) is a permutation within heads, which needs head counts...
    with pytest.raises(ConversionError, match="layers.0.attn.q_proj.weight.*head counts"):
        view.tensor("layers.0.attn.q_proj.weight")
    # ...the stored rotate-half layout does not: the rows as stored.
    q = leangen.load_tensors(bare, ["layers.0.attn.q_proj.weight"], qk_layout=ROTATE_HALF)
    assert torch.equal(q["layers.0.attn.q_proj.weight"], ckpt.hf_model.model.layers[0].self_attn.q_proj.weight)
