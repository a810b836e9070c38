"""config.json -> builder (``model: auto``) and the cross-check of an explicit builder."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import (
    LLAMA3_ROPE,
    MAX_SEQ_LEN,
    VARIANTS,
    hf_logits,
    tokens,
    tune_logits,
)

import leangen
from leangen import ConversionError
from leangen.hf.config import ModelConfig, parse_config
from leangen.hf.families import builder_for
from leangen.recipe.components import model_from_config

SEQ_LEN = 96


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


# --- model: auto ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_auto_matches_transformers(variant_folder, variant):
    path, hf_model = variant_folder(variant)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the auto model passes its own cross-check
        model = leangen.load_model("auto", path, dtype="fp32")
    ids = tokens(SEQ_LEN)
    ours, theirs = tune_logits(model, ids), hf_logits(hf_model, ids)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_auto_picks_the_builder(variant_folder, variant):
    path, _ = variant_folder(variant)
    builder, kwargs = builder_for(ModelConfig.from_json(_config(path)))
    assert builder == VARIANTS[variant][3]
    if variant == "llama3-factor16":
        assert kwargs["scale_factor"] == 16.0 and kwargs["rope_base"] == 500000.0
    if variant == "llama-theta":
        assert kwargs["rope_base"] == 100000.0


def test_auto_kwargs_override_and_config_is_recorded(variant_folder):
    path, _ = variant_folder("mistral")
    model = leangen.load_model("auto", path, max_seq_len=MAX_SEQ_LEN)
    assert model.max_seq_len == MAX_SEQ_LEN
    # Mistral's sliding window is not refused (torchtune has none): recorded for the recipes.
    assert model.leangen.config.sliding_window == 4096
    assert model.leangen.config.model_type == "mistral"


def test_auto_through_the_recipe_config(variant_folder):
    path, hf_model = variant_folder("qwen2")
    cfg = OmegaConf.create({"model": "auto", "checkpoint": {"path": str(path)}, "dtype": "fp32"})
    model = model_from_config(cfg, torch.device("cpu"))
    ids = tokens(16)
    torch.testing.assert_close(tune_logits(model, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=1e-4)


def test_auto_without_config_json(tmp_path, variant_folder):
    path, _ = variant_folder("llama-untied")
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(leangen.ConfigError, match="model: auto needs an HF config.json"):
        leangen.load_model("auto", tmp_path)


def test_transformers_4_and_5_configs_parse_the_same(variant_folder):
    v5 = _config(variant_folder("llama3-factor16")[0])
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4["rope_theta"] = v5["rope_parameters"]["rope_theta"]
    v4["rope_scaling"] = {("type" if k == "rope_type" else k): v
                          for k, v in v5["rope_parameters"].items() if k != "rope_theta"}
    assert ModelConfig.from_json(v4) == ModelConfig.from_json(v5)
    assert builder_for(ModelConfig.from_json(v4)) == builder_for(ModelConfig.from_json(v5))
    assert parse_config({"dim": 64, "n_layers": 2}) is None  # Meta params.json: no cross-check


# --- what torchtune cannot build is refused in one line ---------------------------------

def _with(variant_config: dict, **changes) -> dict:
    out = dict(variant_config)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _rope(kind, **extra):
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, "factor": 4.0, **extra}}


UNSUPPORTED = {
    "yarn": ("llama-untied", _rope("yarn", original_max_position_embeddings=4096), "rope_scaling = 'yarn'"),
    "dynamic": ("llama-untied", _rope("dynamic"), "rope_scaling = 'dynamic'"),
    "linear (transformers 4)": ("llama-untied", {"rope_parameters": None, "rope_theta": 1e4,
                                                 "rope_scaling": {"type": "linear", "factor": 2.0}},
                                "rope_scaling = 'linear'"),
    "longrope": ("phi3", _rope("longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8),
                 "rope_scaling = 'longrope'"),
    "qwen2 yarn": ("qwen2", _rope("yarn"), "rope_scaling = 'yarn'"),
    "llama3 low_freq_factor": ("llama3-factor16", {"rope_parameters": {
        **LLAMA3_ROPE, "low_freq_factor": 2.0, "rope_theta": 5e5}}, "rope_scaling.low_freq_factor = 2.0"),
    "attention_bias": ("llama-untied", {"attention_bias": True}, "attention_bias = True"),
    "mlp_bias": ("llama-untied", {"mlp_bias": True}, "mlp_bias = True"),
    "hidden_act": ("llama-untied", {"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    "gemma hidden_act": ("gemma", {"hidden_act": "relu"}, "hidden_act = 'relu'"),
    "head_dim": ("llama-untied", {"head_dim": 32}, "head_dim = 32"),
    "partial_rotary_factor": ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                           "partial_rotary_factor": 0.75}},
                              "partial_rotary_factor = 0.75"),
    "gemma untied": ("gemma", {"tie_word_embeddings": False}, "tie_word_embeddings = False"),
    "phi3 tied": ("phi3", {"tie_word_embeddings": True}, "tie_word_embeddings = True"),
    "gemma2 layer_types": ("gemma2", {"layer_types": ["full_attention", "sliding_attention"]},
                           "layer_types = ['full_attention', 'sliding_attention']"),
    "model_type": ("llama-untied", {"model_type": "gpt_neox"}, "model_type = 'gpt_neox'"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_config_is_refused_in_one_line(variant_folder, case):
    variant, changes, words = UNSUPPORTED[case]
    config = ModelConfig.from_json(_with(_config(variant_folder(variant)[0]), **changes))
    with pytest.raises(ConversionError) as e:
        builder_for(config)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unsupported_config_is_refused_by_load_model(tmp_path, variant_folder):
    path, _ = variant_folder("llama-untied")
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(_with(_config(path), **_rope("yarn"))))
    with pytest.raises(ConversionError, match="config.json: rope_scaling = 'yarn'"):
        leangen.load_model("auto", tmp_path)


# --- an explicit builder is cross-checked against config.json ----------------------------

# (tiny checkpoint, builder, kwargs changed from the matching ones, words of the message)
MISMATCHES = {
    "rope base": ("llama", None, {"rope_base": 500000.0}, "rope_theta: builder 500000.0, checkpoint 10000.0"),
    "rope scaling factor": ("llama3_2", None, {"scale_factor": 8},
                            "rope_scaling: builder 'llama3(factor=8.0"),
    "no rope scaling": ("llama3_2", "torchtune.models.qwen2.qwen2", {"scale_factor": None},
                        "rope_scaling: builder None, checkpoint 'llama3(factor=32.0"),
    "norm eps": ("llama", None, {"norm_eps": 1e-6}, "rms_norm_eps: builder 1e-06, checkpoint 1e-05"),
    "heads": ("mistral", None, {"num_heads": 8, "num_kv_heads": 4},
              "num_attention_heads: builder 8, checkpoint 4"),
    "kv heads": ("llama", None, {"num_kv_heads": 4}, "num_key_value_heads: builder 4, checkpoint 2"),
    "intermediate": ("phi3", None, {"intermediate_dim": 256}, "intermediate_size: builder 256, checkpoint 128"),
    "tying": ("qwen2", None, {"tie_word_embeddings": False}, "tie_word_embeddings: builder False, checkpoint True"),
    "attention bias": ("qwen2", "torchtune.models.llama3_2.llama3_2", {"rope_base": 1e6, "scale_factor": 1},
                       "attention_bias: builder 'none', checkpoint 'qkv'"),
    "norm kind and activation": ("gemma", "torchtune.models.qwen2.qwen2",
                                 {"head_dim": None, "tie_word_embeddings": True},
                                 "hidden_act: builder 'silu', checkpoint 'gelu_pytorch_tanh'"),
    "gemma2 final softcapping": ("gemma2", "torchtune.models.gemma2.gemma2", {},
                                 "final_logit_softcapping: builder \"30.0 on the final norm's output"),
    "gemma2 attention softcapping": ("gemma2", None, {"hidden_capping_value": 20.0},
                                     "attn_logit_softcapping: builder 20.0, checkpoint 50.0"),
}


def _mismatch(tiny_checkpoint, case):
    family, builder, changes, words = MISMATCHES[case]
    path, default_builder, kwargs, _ = tiny_checkpoint(family)
    kwargs = {k: v for k, v in {**kwargs, **changes}.items() if v is not None}
    return path, builder or default_builder, kwargs, words


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_builder_that_differs_from_config_json_is_refused(tiny_checkpoint, case):
    path, builder, kwargs, words = _mismatch(tiny_checkpoint, case)
    with pytest.raises(ConversionError) as e:
        leangen.load_model(builder, path, **kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert "config.json" in str(e.value) and "strict_config" in str(e.value)


@pytest.mark.parametrize("case", ["rope base", "norm eps", "rope scaling factor"])
def test_strict_config_false_warns_and_loads(tiny_checkpoint, case):
    path, builder, kwargs, words = _mismatch(tiny_checkpoint, case)
    with pytest.warns(UserWarning, match="does not match the checkpoint's config.json") as record:
        model = leangen.load_model(builder, path, strict_config=False, **kwargs)
    assert words in str(record[0].message)
    assert model(tokens(8)).isfinite().all()


def test_named_builder_without_kwargs_is_checked(tiny_checkpoint):
    path = tiny_checkpoint("llama3_2").path
    with pytest.raises(ConversionError, match="vocab_size: builder 128256, checkpoint 128.*"
                                              "num_hidden_layers: builder 16, checkpoint 2"):
        leangen.load_model("torchtune.models.llama3_2.llama3_2_1b", path)


def test_recipe_key_strict_config_false_warns(tiny_checkpoint):
    path, builder, kwargs, _ = tiny_checkpoint("llama")
    model = {"_component_": builder, **kwargs, "rope_base": 500000.0}
    cfg = OmegaConf.create({"model": model, "checkpoint": {"path": str(path)}, "dtype": "auto"})
    with pytest.raises(ConversionError, match="rope_theta"):
        model_from_config(cfg, torch.device("cpu"))
    cfg.checkpoint.strict_config = False
    with pytest.warns(UserWarning, match="rope_theta: builder 500000.0, checkpoint 10000.0"):
        model_from_config(cfg, torch.device("cpu"))


def test_matching_builders_pass_the_check(tiny_checkpoint, variant_folder):
    path, _ = variant_folder("mistral")  # sliding_window 4096 in config.json: not a mismatch
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        leangen.load_model("torchtune.models.mistral.mistral", path, vocab_size=128, num_layers=2,
                           num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
                           max_seq_len=MAX_SEQ_LEN, rope_base=10000)


def test_shipped_demo_passes_the_check():
    from leangen.demo import demo_dir
    from leangen.recipe.cli import resolve_config_path

    cfg = OmegaConf.load(resolve_config_path("demo"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = leangen.load_model(cfg.model, demo_dir())
    assert model.leangen.config.rope_base == 10000.0
