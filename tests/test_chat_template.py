"""Chat prompts exactly as transformers' apply_chat_template(..., add_generation_prompt=True),
and never ending with an end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import LLAMA_TEMPLATE, copy_folder, edit_json, transformers_tokenizer

from leangen.decode.text import tokenize
from leangen.errors import ConfigError
from leangen.hf.chat_template import ChatTemplate
from leangen.hf.tokenizer import HFTokenizer, tokenizer_from_folder

SYSTEM_USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "kalo  mine?\n\nzequ 日本"}]
MULTI_TURN = [{"role": "user", "content": "kalo?"}, {"role": "assistant", "content": "mine ruti."},
              {"role": "user", "content": " and  vo\n"}]


def _hf_chat_ids(folder: Path, messages: list[dict]) -> list[int]:
    out = transformers_tokenizer(folder).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out if isinstance(out, list) else out["input_ids"])  # transformers 5: a BatchEncoding


@pytest.mark.parametrize("name", ["llama", "qwen"])
@pytest.mark.parametrize("messages", [SYSTEM_USER, MULTI_TURN], ids=["system+user", "multi-turn"])
def test_chat_ids_equal_apply_chat_template(tokenizer_folders, name, messages):
    tokens = tokenize(messages, HFTokenizer(tokenizer_folders[name])).tokens
    assert tokens == _hf_chat_ids(tokenizer_folders[name], messages)


def test_bos_from_the_template_is_not_added_twice(llama_tokenizer_folder):
    ours = HFTokenizer(llama_tokenizer_folder)
    tokens = tokenize(SYSTEM_USER, ours).tokens
    assert tokens[0] == ours.bos_id and tokens[1] != ours.bos_id


def test_qwen_prompt_ends_with_the_assistant_header(qwen_tokenizer_folder):
    ours = HFTokenizer(qwen_tokenizer_folder)
    tokens = tokenize([{"role": "user", "content": "kalo?"}], ours).tokens
    text = ours.decode(tokens, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen")  # the template's default system prompt
    assert text.endswith("<|im_start|>assistant\n")
    assert tokens[-1] not in ours.stop_tokens


def test_named_templates_use_default_and_jinja_file_is_read(tmp_path, llama_tokenizer_folder):
    folder = copy_folder(llama_tokenizer_folder, tmp_path)
    (folder / "chat_template.jinja").unlink()
    edit_json(folder / "tokenizer_config.json",
              chat_template=[{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
                             {"name": "default", "template": LLAMA_TEMPLATE}])
    assert tokenize(SYSTEM_USER, HFTokenizer(folder)).tokens == _hf_chat_ids(llama_tokenizer_folder, SYSTEM_USER)
    edit_json(folder / "tokenizer_config.json", chat_template=[{"name": "tool_use", "template": "x"}])
    with pytest.raises(ConfigError, match="no 'default'"):
        HFTokenizer(folder)


def test_globals_and_filters_as_in_transformers(tmp_path, llama_tokenizer_folder):
    """tojson (no HTML escaping, unicode kept), strftime_now, namespace, loop controls."""
    folder = copy_folder(llama_tokenizer_folder, tmp_path)
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}"
                "{% endif %}{% set ns.n = ns.n + 1 %}{{ m | tojson }}{% endfor %}"
                "{{ ns.n }}{{ strftime_now('%Y') }}{% if add_generation_prompt %}<|eot_id|>!{% endif %}")
    (folder / "chat_template.jinja").write_text(template)
    messages = SYSTEM_USER + [{"role": "user", "content": "<b>&'é 日本</b>"}]
    assert tokenize(messages, HFTokenizer(folder)).tokens == _hf_chat_ids(folder, messages)


def test_template_errors_are_one_line(tmp_path, llama_tokenizer_folder):
    with pytest.raises(ConfigError, match="unknown role ipython") as error:
        tokenize([{"role": "ipython", "content": "x"}], HFTokenizer(llama_tokenizer_folder))
    assert "\n" not in str(error.value)
    folder = copy_folder(llama_tokenizer_folder, tmp_path)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match="does not parse"):
        ChatTemplate.from_folder(folder, {}).render(SYSTEM_USER)


def test_no_template_refuses_a_chat_prompt_but_encodes_text(tmp_path, llama_tokenizer_folder):
    folder = copy_folder(llama_tokenizer_folder, tmp_path)
    (folder / "chat_template.jinja").unlink()
    ours = HFTokenizer(folder)
    assert ours.chat_template is None
    with pytest.raises(ConfigError, match="no chat template"):
        tokenize(SYSTEM_USER, ours)
    assert tokenize("kalo", ours).tokens == transformers_tokenizer(folder)("kalo")["input_ids"]


def test_torchtune_qwen2_prompt_has_no_trailing_end_of_turn(vocab_merges_folder):
    with pytest.warns(UserWarning, match="whitespace"):
        tokenizer = tokenizer_from_folder(vocab_merges_folder)
    messages = [{"role": "user", "content": "kalo mine"}]
    from torchtune.data import Message

    raw = tokenizer({"messages": [Message(role="user", content="kalo mine"),
                                  Message(role="assistant", content="")]}, inference=True)["tokens"]
    assert raw[-1] in tokenizer.stop_tokens  # torchtune's Qwen2Tokenizer ignores inference=True
    tokens = tokenize(messages, tokenizer).tokens
    assert tokens == raw[:-1] and tokens[-1] not in tokenizer.stop_tokens
    assert tokenizer.decode(tokens, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_a_template_that_ends_in_a_stop_token_is_kept_as_transformers_renders_it(tmp_path, llama_tokenizer_folder):
    """Phi-3's generation prompt is <|assistant|>, one of its generation_config stop tokens:
    only torchtune's own formats lose a trailing stop token, never a model's template."""
    folder = copy_folder(llama_tokenizer_folder, tmp_path)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '<|start_header_id|>' + m.content + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|end_header_id|>' }}{% endif %}")
    config = json.loads((folder / "generation_config.json").read_text())
    end_header = transformers_tokenizer(folder).convert_tokens_to_ids("<|end_header_id|>")
    edit_json(folder / "generation_config.json", eos_token_id=config["eos_token_id"] + [end_header])
    ours = HFTokenizer(folder)
    tokens = tokenize(SYSTEM_USER, ours).tokens
    assert tokens[-1] == end_header and end_header in ours.stop_tokens
    assert tokens == _hf_chat_ids(folder, SYSTEM_USER)


def test_generation_blocks_render_their_body_as_in_transformers(tmp_path, llama_tokenizer_folder):
    folder = copy_folder(llama_tokenizer_folder, tmp_path)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
        "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    messages = SYSTEM_USER + [{"role": "assistant", "content": "vo ze"}, {"role": "user", "content": "sa"}]
    assert tokenize(messages, HFTokenizer(folder)).tokens == _hf_chat_ids(folder, messages)
