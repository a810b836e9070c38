"""Family detection, key tables and per-tensor transforms, checked against torchtune's own."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import hf_state_dict

from leangen import ConversionError
from leangen.checkpoint.convert import (
    ALIASES,
    FAMILIES,
    Geometry,
    Transform,
    detect_family,
    family_named,
    plan,
)

HF_LLAMA_KEYS = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.0.{k}.weight" for k in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
QWEN2_KEYS = HF_LLAMA_KEYS + [f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"]
PHI3_KEYS = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
             "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.o_proj.weight",
             "model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight",
             "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"]
GEMMA2_KEYS = HF_LLAMA_KEYS[:2] + [
    f"model.layers.0.{k}.weight" for k in ("pre_feedforward_layernorm", "post_feedforward_layernorm")]
META_KEYS = ["tok_embeddings.weight", "norm.weight", "output.weight",
             "layers.0.attention.wq.weight", "layers.0.feed_forward.w1.weight"]
TUNE_KEYS = ["tok_embeddings.weight", "norm.scale", "layers.0.attn.q_proj.weight", "layers.0.mlp.w3.weight"]


@pytest.mark.parametrize("keys,family", [
    (HF_LLAMA_KEYS, "llama"), (QWEN2_KEYS, "qwen2"), (PHI3_KEYS, "phi3"),
    (GEMMA2_KEYS, "gemma2"), (META_KEYS, "llama"), (TUNE_KEYS, "llama"),
    (["language_model.model.embed_tokens.weight", "language_model.lm_head.weight"], "llama"),
])
def test_detect_family_from_key_names(keys, family):
    assert detect_family("auto", None, keys).name == family


@pytest.mark.parametrize("config,family", [
    ({"model_type": "llama"}, "llama"), ({"model_type": "mistral"}, "llama"),
    ({"model_type": "gemma"}, "llama"), ({"model_type": "gemma2"}, "gemma2"),
    ({"model_type": "qwen2"}, "qwen2"), ({"model_type": "phi3"}, "phi3"),
    ({"model_type": "unheard_of", "architectures": ["Qwen2ForCausalLM"]}, "qwen2"),
])
def test_detect_family_from_config(config, family):
    # The keys say llama: config.json wins over them.
    assert detect_family("auto", config, HF_LLAMA_KEYS).name == family


@pytest.mark.parametrize("name,family", [
    ("llama2", "llama"), ("llama3", "llama"), ("llama3_1", "llama"), ("llama3_2", "llama"),
    ("code_llama2", "llama"), ("mistral", "llama"), ("gemma", "llama"), ("gemma2", "gemma2"),
    ("qwen2", "qwen2"), ("qwen2_5", "qwen2"), ("phi3_mini", "phi3"), ("phi4", "phi3"),
    # torchtune's ModelType member names, as torchtune's own YAMLs spell them
    ("LLAMA3_2", "llama"), ("PHI3_MINI", "phi3"), ("QWEN2", "qwen2"),
])
def test_explicit_model_type_names(name, family):
    assert detect_family(name, {"model_type": "qwen2"}, PHI3_KEYS).name == family


def test_every_torchtune_decoder_model_type_is_known():
    from torchtune.training.checkpointing._utils import ModelType

    not_decoders = {"llama3_vision", "reward", "clip_text", "t5_encoder"}
    for member in ModelType:
        if member.value not in not_decoders:
            assert family_named(member.value) and family_named(member.name)


def test_unknown_model_type_lists_the_known_ones():
    with pytest.raises(ConversionError, match="unknown model_type 'falcon'.*phi3_mini.*qwen2"):
        family_named("falcon")


def test_undetectable_keys():
    with pytest.raises(ConversionError, match="cannot tell the model family.*transformer.h.0.attn.*model_type"):
        detect_family("auto", None, ["transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"])


def test_unknown_keys_in_a_known_family():
    shape = lambda _k: torch.Size([4, 4])  # noqa: E731
    expected = "1 checkpoint tensors are unknown to the 'llama' hf key table.*vision_tower"
    with pytest.raises(ConversionError, match=expected):
        plan(HF_LLAMA_KEYS + ["vision_tower.patch.weight"], shape, lambda _k: torch.float32,
             FAMILIES["llama"], Geometry(4, 2, 16))


@pytest.mark.parametrize("heads,head_dim,cols", [(4, 16, 64), (2, 32, 64), (3, 8, 5)])
def test_permutation_is_torchtunes(heads, head_dim, cols):
    from torchtune.models.convert_weights import hf_to_tune

    w = torch.randn(heads * head_dim, cols)
    expected = hf_to_tune({"model.layers.0.self_attn.q_proj.weight": w}, num_heads=heads,
                          num_kv_heads=heads, dim=cols, head_dim=head_dim)
    assert torch.equal(Transform(permute_heads=heads).apply(w), expected["layers.0.attn.q_proj.weight"])
    # Biases (1-D) go through the same row permutation.
    b = torch.randn(heads * head_dim)
    assert torch.equal(Transform(permute_heads=heads).apply(b),
                       Transform(permute_heads=heads).apply(b[:, None])[:, 0])


def test_phi3_split_is_torchtunes(tiny_checkpoint):
    from torchtune.models.phi3._convert_weights import phi3_hf_to_tune

    from leangen.checkpoint.view import open_checkpoint

    path = tiny_checkpoint("phi3").path
    expected = phi3_hf_to_tune(hf_state_dict(path), num_heads=4, num_kv_heads=2, dim=64)
    view = open_checkpoint(path)
    assert set(view) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(view.tensor(name), tensor), name


def test_phi3_split_must_cover_the_fused_rows():
    """Geometry that does not tile qkv_proj exactly is an error, not a silent mis-split."""
    shapes = {k: torch.Size([64, 64]) for k in PHI3_KEYS}
    shapes["model.layers.0.self_attn.qkv_proj.weight"] = torch.Size([128, 64])  # 4 heads + 2x2 kv of 16
    shapes["model.layers.0.mlp.gate_up_proj.weight"] = torch.Size([256, 64])
    args = (PHI3_KEYS, shapes.__getitem__, lambda _k: torch.float32, FAMILIES["phi3"])
    assert plan(*args, Geometry(4, 2, 16))["layers.0.attn.v_proj.weight"].shape == (32, 64)
    expected = r"'model.layers.0.self_attn.qkv_proj.weight' has shape \(128, 64\).*4 heads, 1 kv"
    with pytest.raises(ConversionError, match=expected):
        plan(*args, Geometry(4, 1, 16))
    with pytest.raises(ConversionError, match="qkv_proj.*4 heads.*4 kv"):
        plan(*args, Geometry(4, 4, 16))


def test_hf_qk_without_geometry_are_listed_but_refused_when_taken():
    shape = lambda _k: torch.Size([64, 64])  # noqa: E731
    entries = plan(HF_LLAMA_KEYS, shape, lambda _k: torch.float32, FAMILIES["llama"], None)
    assert entries["tok_embeddings.weight"].unavailable is None
    q = entries["layers.0.attn.q_proj.weight"]
    assert q.shape == (64, 64)
    assert re.search("layers.0.attn.q_proj.weight.*head counts.*config.json", q.unavailable)


def test_fused_phi3_without_geometry_cannot_even_be_listed():
    shapes = {k: torch.Size([64, 64]) for k in PHI3_KEYS}
    with pytest.raises(ConversionError, match="q_proj.weight.*head counts.*config.json"):
        plan(PHI3_KEYS, shapes.__getitem__, lambda _k: torch.float32, FAMILIES["phi3"], None)


def test_geometry_from_config():
    hf = {"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 256}
    assert Geometry.from_config(hf) == Geometry(8, 2, 32)
    assert Geometry.from_config({**hf, "num_key_value_heads": None, "head_dim": 64}) == Geometry(8, 8, 64)
    assert Geometry.from_config({"n_heads": 4, "n_kv_heads": 1, "dim": 64}) == Geometry(4, 1, 16)  # params.json
    assert Geometry.from_config(None) is None and Geometry.from_config({"vocab_size": 3}) is None


def test_aliases_point_at_families():
    assert set(ALIASES.values()) <= set(FAMILIES)
