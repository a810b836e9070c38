"""Command-line values are what was typed: text keys take the text after the first '='
verbatim; only number, boolean and list keys are parsed. Checked on what reaches the model
(the prompt the generate recipe tokenizes) or on the resolved config value."""

import json

import pytest
from omegaconf import OmegaConf

from leangen.errors import ConfigError
from leangen.eval import EvalConfig
from leangen.generate import GenerateConfig, main
from leangen.recipe.cli import parse_args

TEXTS = [
    "yes",
    "Translate to French: good morning",
    "Question: what is 2+2?",
    "Q: 2+2? A:",
    "[1, 2, 3] reversed",
    'she said "hi" and \'bye\'',
    "one # two",
    "#hashtag",
    "{not a mapping}",
    "{x}",
    "- a leading dash",
    "-3",
    "naïve café ☃ 日本",
    "a=b, c=d",
    "true",
    "null and void",
    "None",
    "123",
    "1e3",
    "${not_an_interpolation}",
    "  spaces kept  ",
]


def _generate(capsys, tmp_path, *overrides):
    """The records a demo run writes: the prompt as given and the tokens it became."""
    out = tmp_path / "out.jsonl"
    code = main(["--config", "demo", "max_new_tokens=1", f"output_file={out}", *overrides])
    err = capsys.readouterr().err
    assert code == 0, err
    return [json.loads(line) for line in out.read_text().splitlines()]


def _demo_tokens(text: str) -> list[int]:
    from leangen.decode.text import tokenize
    from leangen.recipe.components import tokenizer_from_config

    tokenizer = tokenizer_from_config(parse_args(["--config", "demo"], GenerateConfig))
    return tokenize(text, tokenizer, add_bos="auto").tokens


@pytest.mark.parametrize("text", TEXTS)
def test_a_raw_prompt_reaches_the_model_as_typed(capsys, tmp_path, text):
    [record] = _generate(capsys, tmp_path, f"prompt={text}")
    assert record["prompt"] == text
    assert record["prompt_tokens"] == _demo_tokens(text)


@pytest.mark.parametrize("text", TEXTS)
def test_a_chat_prompt_reaches_the_model_as_typed(capsys, tmp_path, text):
    [record] = _generate(capsys, tmp_path, f"prompt.user={text}", "prompt.system=Be brief: one word.")
    assert record["prompt"] == [{"role": "system", "content": "Be brief: one word."},
                                {"role": "user", "content": text}]


def _value(key: str, override: str, schema=GenerateConfig, config: str = "demo"):
    cfg = parse_args(["--config", config, override], schema)
    return OmegaConf.select(cfg, key)


@pytest.mark.parametrize("override, key, expected", [
    ("prompt={system: be brief, user: yes}", "prompt", {"system": "be brief", "user": "yes"}),
    ("prompt.user=null", "prompt.user", None),
    ("prompt=null", "prompt", None),
    ("prompts_file=null", "prompts_file", None),
    ("output_file=", "output_file", ""),
    ("output_file=/tmp/a=b #1.jsonl", "output_file", "/tmp/a=b #1.jsonl"),
    ("metrics_file=yes", "metrics_file", "yes"),
    ("device=cpu", "device", "cpu"),
    ("enable_kv_cache=yes", "enable_kv_cache", True),
    ("enable_kv_cache=true", "enable_kv_cache", True),
    ("enable_kv_cache=false", "enable_kv_cache", False),
    ("compile=no", "compile", False),
    ("max_new_tokens=7", "max_new_tokens", 7),
    ("temperature=0.25", "temperature", 0.25),
    ("temperature=1", "temperature", 1.0),
    ("top_p=1e-1", "top_p", 0.1),
    ("top_k=null", "top_k", None),
    ("seed=null", "seed", None),
])
def test_a_typed_key_gets_its_type(override, key, expected):
    value = _value(key, override)
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("override, expected", [
    ("lm_eval.tasks=[a,b]", ["a", "b"]),
    ("lm_eval.tasks=[arc_easy, 'x y', yes, 1]", ["arc_easy", "x y", "yes", "1"]),  # items typed str
    ("lm_eval.tasks=arc_easy", ["arc_easy"]),
    ("lm_eval.tasks=yes", ["yes"]),
    ("lm_eval.tasks=[]", []),
])
def test_a_list_key_takes_a_list_or_one_item(override, expected):
    assert list(_value("lm_eval.tasks", override, EvalConfig, "eval_demo")) == expected


@pytest.mark.parametrize("override, expected", [
    ("perplexity.files=/data/a: b.txt", "/data/a: b.txt"),
    ("perplexity.files=[/a.txt, /b.txt]", ["/a.txt", "/b.txt"]),
    ("perplexity=null", None),
    ("lm_eval={tasks: [a], num_fewshot: 2}", {"tasks": ["a"], "num_fewshot": 2}),
])
def test_eval_blocks_read_by_their_schema(override, expected):
    key = override.split("=")[0]
    value = _value(key, override, EvalConfig, "eval_demo")
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if isinstance(expected, dict):
        value = {k: value[k] for k in expected}
    assert value == expected


@pytest.mark.parametrize("override, key, expected", [
    # free-form block kwargs: YAML as torchtune reads them...
    ("checkpoint.strict_config=false", "checkpoint.strict_config", False),
    ("model.max_seq_len=128", "model.max_seq_len", 128),
    ("checkpoint.path=[a.safetensors, b.safetensors]", "checkpoint.path", ["a.safetensors", "b.safetensors"]),
    ("tokenizer.max_seq_len=None", "tokenizer.max_seq_len", None),
    ("tokenizer.prompt_template='3'", "tokenizer.prompt_template", "3"),  # shell-quoted YAML string
    # ...but text YAML would turn into a mapping, cut at a comment, or fail on stays the text
    ("checkpoint.path=/models/run: 2", "checkpoint.path", "/models/run: 2"),
    ("checkpoint.path=/models/a #2", "checkpoint.path", "/models/a #2"),
    ("checkpoint.path=[unclosed", "checkpoint.path", "[unclosed"),
    ("checkpointer.checkpoint_files.max_filename=00004", "checkpointer.checkpoint_files.max_filename", "00004"),
    # torchtune's shorthand for a _component_ block
    ("model=torchtune.models.llama2.llama2_7b", "model._component_", "torchtune.models.llama2.llama2_7b"),
    ("tokenizer=auto", "tokenizer", "auto"),
])
def test_free_form_block_values(override, key, expected):
    value = _value(key, override)
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    assert value == expected


def test_removal_restores_the_schema_default():
    assert parse_args(["--config", "demo", "~top_p", "~max_new_tokens"], GenerateConfig).max_new_tokens == 300


@pytest.mark.parametrize("override, message", [
    ("max_new_tokens=abc", "max_new_tokens=abc: max_new_tokens takes an integer, e.g. max_new_tokens=300."),
    ("temperature=[1", "temperature=[1: temperature takes a number, e.g. temperature=0.6."),
    ("enable_kv_cache=maybe", "enable_kv_cache=maybe: enable_kv_cache takes true or false, e.g. "
                              "enable_kv_cache=true."),
    ("max_new_tokens=null", "max_new_tokens=null: max_new_tokens takes an integer"),
    ("max_new_tokens=", "max_new_tokens=: max_new_tokens takes an integer"),
    ("top_k=3.5", "top_k=3.5: top_k takes an integer or null"),
    ("prompt.user=[a, b]x", None),  # text: fine
    ("max_new_tokens.x=1", "max_new_tokens.x=1: 'max_new_tokens' takes an integer, so it has no keys inside."),
    ("max_new_token=3", "max_new_token=3: unknown key 'max_new_token'. Did you mean 'max_new_tokens'?"),
    ("~no_such_key", "~no_such_key: the config has no key 'no_such_key' to remove."),
    ("~model", "~model: Removing components from CLI is not supported"),
    ("just_a_word", "'just_a_word': an override is key=value"),
])
def test_unreadable_values_name_the_override(override, message):
    if message is None:
        parse_args(["--config", "demo", override], GenerateConfig)
        return
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", "demo", override], GenerateConfig)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value) and ".yaml" not in str(info.value)


@pytest.mark.parametrize("override, message", [
    ("lm_eval.tasks=[a", "lm_eval.tasks=[a: lm_eval.tasks takes a list [a, b] (or one item). Quote the "
                         "whole override for the shell"),
    ("lm_eval=foo", "lm_eval=foo: lm_eval takes a mapping {key: value, ...} or null"),
    ("lm_eval={task: [a]}", "lm_eval={task: [a]}: lm_eval takes a mapping {key: value, ...} of tasks, "
                            "include_path, num_fewshot, limit, apply_chat_template ('task' is not one)."),
])
def test_unreadable_eval_values_name_the_override(override, message):
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", "eval_demo", override], EvalConfig)
    assert str(info.value).startswith(message)


def test_a_bad_prompt_mapping_names_the_key(capsys):
    code = main(["--config", "demo", "prompt={usr: hi}"])
    assert code == 1
    assert capsys.readouterr().err.startswith("error: prompt.usr: a chat prompt has only 'system' and 'user'")


def test_a_plain_value_for_the_checkpoint_block_says_what_to_set(capsys):
    code = main(["--config", "demo", "checkpoint=/models/x"])
    assert code == 1
    assert capsys.readouterr().err == ("error: checkpoint: '/models/x' is not a block; set "
                                       "checkpoint.path=/path/to/model (a directory, a file or a list of files).\n")


def test_an_empty_value(capsys, tmp_path):
    [record] = _generate(capsys, tmp_path, "prompt=")
    assert record["prompt"] == "" and record["prompt_tokens"] == _demo_tokens("")
    assert main(["--config", "demo", "prompt.user="]) == 1
    assert capsys.readouterr().err == "error: prompt.user is empty: give the user's message.\n"
