"""Every packaged config resolves, validates against its recipe's schema, and binds
its components' signatures, without weights (torchtune's config.validate)."""

import pytest
from omegaconf import OmegaConf
from torchtune import config as tt_config

from leangen.errors import ConfigError
from leangen.eval import EvalConfig
from leangen.generate import GenerateConfig
from leangen.recipe.cli import packaged_config_names, parse_args, resolve_config_path

GENERATE_CONFIGS = ["demo", "mistral7b", "llama2_7b", "code_llama2_7b", "llama3_1_8b", "llama3_2_1b",
                    "llama3_2_3b", "qwen2_5_0_5b", "qwen2_5_7b", "gemma_2b", "phi3_mini"]
EVAL_CONFIGS = ["eval_demo", "eval_mistral7b", "eval_llama2_7b", "eval_llama3_1_8b",
                "eval_llama3_2_1b", "eval_qwen2_5_0_5b", "eval_gemma_2b", "eval_phi3_mini"]
PACKAGED = ([(name, GenerateConfig, "generate") for name in GENERATE_CONFIGS]
            + [(name, EvalConfig, "eval") for name in EVAL_CONFIGS])


def test_all_promised_configs_are_packaged():
    assert set(GENERATE_CONFIGS + EVAL_CONFIGS) <= set(packaged_config_names())


@pytest.mark.parametrize("name, schema, recipe", PACKAGED)
def test_packaged_config_validates_binds_and_says_how_to_run(name, schema, recipe):
    cfg = parse_args(["--config", name], schema)
    tt_config.validate(cfg)  # binds model/tokenizer kwargs to the builders' signatures
    text = resolve_config_path(name).read_text()
    assert text.startswith("#") and f"tune run leangen/{recipe} --config {name}\n" in text


def test_no_packaged_name_shadows_a_torchtune_config():
    from torchtune._recipe_registry import get_all_recipes

    torchtune_names = {c.name for r in get_all_recipes() for c in r.configs}
    assert not torchtune_names & set(GENERATE_CONFIGS + EVAL_CONFIGS)


def test_name_with_yaml_suffix_and_path_resolve_to_the_same_file(tmp_path):
    packaged = resolve_config_path("demo")
    assert resolve_config_path("demo.yaml") == packaged
    copy = tmp_path / "mine.yaml"
    copy.write_text(packaged.read_text())
    assert resolve_config_path(str(copy)) == copy


def test_overrides_and_removals_work_as_in_torchtune():
    cfg = parse_args(["--config", "demo", "max_new_tokens=7", "temperature=0", "~top_k",
                      "checkpoint.path=/x"], GenerateConfig)
    assert cfg.max_new_tokens == 7 and cfg.temperature == 0
    assert cfg.top_k == GenerateConfig.top_k  # removed from the YAML: the schema default
    assert OmegaConf.select(cfg, "checkpoint.path") == "/x"


@pytest.mark.parametrize("override, expected", [
    ("not_a_key=1", "unknown key 'not_a_key'"),
    ("max_new_tokens=lots", "max_new_tokens takes an integer, e.g. max_new_tokens=300."),
    ("enable_kv_cache=maybe", "enable_kv_cache takes true or false"),
])
def test_unknown_keys_and_wrong_types_name_the_override(override, expected):
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", "demo", override], GenerateConfig)
    assert str(info.value).startswith(f"{override}: ") and expected in str(info.value)
    assert "\n" not in str(info.value) and ".yaml" not in str(info.value)


def test_unknown_config_lists_packaged_names():
    with pytest.raises(ConfigError, match="mistral7b"):
        resolve_config_path("no_such_config")
